"""A resumed run keeps its config: changes to what the run learns are refused (each named) before anything in the
run directory is overwritten, safe changes pass with a note, and run.force_config_change forces. User errors of
the trainer (malformed YAML, a bad key or value, mem_layers out of range, an unwritable run directory) are one
line on stderr with exit status 2, found before any model is built."""

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train.config import RunSpec, dump_yaml, load_config, resume_changes

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "configs" / "ci_tiny.yaml"
RUN = {"parallel.strategy": "none", "train.max_steps": 4, "run.save_every": 2, "run.save_final": False}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_in_process(out: Path, **overrides) -> Path:
    from train.crossbatch import train

    return train(load_config(CI, {**RUN, "run.out_dir": str(out), **overrides}))


def changes(saved: dict, **overrides):
    return resume_changes(dump_yaml(load_config(CI, saved)), load_config(CI, {**saved, **overrides}), "OUT")


@pytest.mark.parametrize("key, value", [
    ("train.seed", 5), ("model.mem_layers", [0]), ("optim.lr", 1.0), ("data.pack", 2), ("crossbatch.range", 2),
    ("adapter.kind", "lora"), ("train.micro_batch_size", 16), ("train.batch_tokens", 1024), ("train.dtype",
    "bfloat16"), ("train.grad_accum", 1), ("preset", None), ("model.vocab_size", 512), ("data.window", 16)])
def test_changes_to_what_the_run_learns_are_refused(key, value):
    refused, allowed = changes({}, **{key: value})
    assert len(refused) == 1 and refused[0].startswith(f"{key}: ") and allowed == [], (refused, allowed)


@pytest.mark.parametrize("key, value", [
    ("train.max_steps", 40), ("log.every", 5), ("run.save_every", 3), ("run.keep_last", 4),
    ("parallel.timeout_s", 30.0), ("run.out_dir", "elsewhere"), ("train.device", "auto"), ("parallel.strategy", "fsdp2")])
def test_safe_changes_are_allowed(key, value):
    refused, allowed = changes({}, **{key: value})
    assert refused == [] and len(allowed) == 1 and allowed[0].startswith(f"{key}: "), (refused, allowed)


def test_a_key_the_saved_config_lacks_counts_as_its_default():
    """A run saved before a key existed resumes unchanged when the new key keeps its default."""
    tree = yaml.safe_load(dump_yaml(load_config(CI)))
    del tree["parallel"]["timeout_s"], tree["optim"]["min_lr_ratio"]
    assert resume_changes(yaml.safe_dump(tree), load_config(CI), "OUT") == ([], [])
    assert RunSpec().optim.min_lr_ratio == 0.1  # so this one is refused: the run used the old default
    refused, _ = resume_changes(yaml.safe_dump(tree), load_config(CI, {"optim.min_lr_ratio": 0.5}), "OUT")
    assert refused == ["optim.min_lr_ratio: 0.1 -> 0.5"]


def test_a_changed_resume_is_refused_before_the_run_directory_changes(tmp_path, caplog):
    run = train_in_process(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as err:
        train_in_process(run, **{"run.resume": True, "train.seed": 5, "model.mem_layers": [0], "optim.lr": 1.0})
    message = str(err.value)
    for change in ("model.mem_layers: [1] -> [0]", "optim.lr: 0.003 -> 1.0", "train.seed: 0 -> 5"):
        assert change in message
    assert "--run.force_config_change=true" in message and "\n" not in message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml too
    (run / "config.yaml").rename(tmp_path / "config.yaml")  # without it, the newest checkpoint's copy is compared
    with pytest.raises(ValueError, match=r"train.seed: 0 -> 5 \(saved in .*step_00000002/config.yaml\)"):
        train_in_process(run, **{"run.resume": True, "train.seed": 5})
    (tmp_path / "config.yaml").rename(run / "config.yaml")
    with caplog.at_level(logging.INFO):
        train_in_process(run, **{"run.resume": True, "train.max_steps": 6, "run.keep_last": 3})
    notes = [r.getMessage() for r in caplog.records if "config change allowed" in r.getMessage()]
    assert notes == ["resume: config change allowed: train.max_steps: 4 -> 6",
                     "resume: config change allowed: run.keep_last: 2 -> 3"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_in_process(run, **{"run.resume": True, "train.max_steps": 8, "optim.lr": 1e-3,
                                 "run.force_config_change": True})
    forced = [r.getMessage() for r in caplog.records if "forced config change" in r.getMessage()]
    assert forced == ["resume: forced config change (run.force_config_change=true): optim.lr: 0.003 -> 0.001"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 9))


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.crossbatch", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_one_line_error(proc, *needles):
    """Exit status 2 and the error in one last line of stderr; earlier lines may only be the run's log and
    library warnings (transformers' note on loading a LLaMA config), never a traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("crossbatch.py: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and sum("error:" in line for line in lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [3\n")
    assert_one_line_error(cli("--config", str(bad)), str(bad), "is not valid YAML")


@pytest.mark.parametrize("args, needle", [
    (["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--train.max_steps=many"], "train.max_steps: Value 'many' of type 'str' could not be converted to Integer"),
    (["--parallel.timeout_s=0"], "parallel.timeout_s must be > 0"),
    (["--nonsense"], "override --nonsense has no value"),
])
def test_bad_keys_and_values_are_one_line(args, needle):
    assert_one_line_error(cli("--config", str(CI), *args), needle)


def test_missing_config_flag_is_one_line():
    assert_one_line_error(cli(), "--config")


def test_mem_layers_out_of_range_is_found_before_the_weights_are_read(tmp_path):
    """The checkpoint's weights file is garbage: an error about mem_layers proves it was never opened."""
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64}))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    start = time.perf_counter()
    proc = cli("--config", str(CI), f"--checkpoint={ckpt}", "--preset=null", "--model.mem_layers=[5]",
               f"--run.out_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "mem_layers contains 5", "num_hidden_layers=2")
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("where", ["/proc/x", "file"])
def test_unwritable_run_directory_is_one_line(where, tmp_path):
    if where == "file":
        (tmp_path / "file").write_text("a file, not a directory")
        where = str(tmp_path / "file" / "run")
    assert_one_line_error(cli("--config", str(CI), f"--run.out_dir={where}"), f"run.out_dir '{where}'",
                          "cannot be created and written")


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused(tmp_path):
    """Without the check, the earlier run's higher-numbered checkpoints survive pruning and the new run's own
    checkpoints are deleted."""
    run = train_in_process(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    steps = ", ".join(sorted(p.name for p in run.glob("step_*")))
    assert steps.startswith("step_")
    with pytest.raises(ValueError, match=re.escape(f"already holds a run ({steps}): continue it with "
                                                   "--run.resume=true, or choose another run.out_dir")):
        train_in_process(run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError from inside the training loop is not a user error: it keeps its traceback."""
    code = ("import sys, train.crossbatch as t\n"
            "def broken(*a, **k): raise ValueError('bug in a training step')\n"
            "t.train_step = broken\n"
            "t.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(CI), f"--run.out_dir={tmp_path / 'run'}",
                           "--parallel.strategy=none"], env=ENV, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: bug in a training step" in proc.stderr
