"""End-to-end trainer runs on configs/ci_tiny.yaml: 2-process torchrun (DDP and FSDP2, gloo), SIGKILL + resume,
from a LLaMA checkpoint, activation checkpointing, bf16, the final HF directory, wandb's missing-package error."""

import json
import os
import signal
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fot
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "configs" / "ci_tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer(*args, torchrun: int = 0) -> list[str]:
    entry = str(ROOT / "train" / "crossbatch.py")
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", entry,
                *args]
    return [sys.executable, entry, *args]


def run_in_process(tmp_path, **overrides):
    from train.crossbatch import train

    overrides.setdefault("run.out_dir", str(tmp_path / "run"))
    overrides.setdefault("parallel.strategy", "none")
    spec = load_config(CI, overrides)
    return train(spec)


@pytest.mark.slow
def test_two_process_ddp_and_fsdp2_loss_falls(tmp_path):
    curves = {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        cmd = trainer("--config", str(CI), f"--run.out_dir={out}", f"--parallel.strategy={strategy}",
                      "--train.max_steps=12", "--run.save_every=6", torchrun=2)
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = metrics(out)
        assert [r["step"] for r in records] == list(range(1, 13))
        for r in records:
            assert {"step", "loss", "lr", "tokens_per_s", "positives", "negatives"} <= set(r)
            assert r["tokens"] == 8 * 32 * 2 * 2  # rows x window x accumulation x ranks
        losses = [r["loss"] for r in records]
        assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
        assert (out / "config.yaml").is_file() and (out / "step_00000006" / "rank1.pt").is_file()
        model = fot.LongLlamaForCausalLM.from_pretrained(out / "final")
        assert model.config.mem_layers == [1]
        assert torch.isfinite(model(torch.tensor([[1, 3, 7, 4, 9]])).logits).all()
        curves[strategy] = losses
    # the same data, init and math: FSDP2 sharding reproduces DDP's curve
    assert max(abs(a - b) / a for a, b in zip(curves["ddp"], curves["fsdp2"])) < 1e-4
    # only rank 0 writes and logs
    assert "[rank1]" not in proc.stderr


@pytest.mark.slow
def test_two_process_run_with_negatives_gathered_across_ranks(tmp_path):
    out = tmp_path / "across"
    cmd = trainer("--config", str(CI), f"--run.out_dir={out}", "--parallel.strategy=ddp", "--train.max_steps=6",
                  "--crossbatch.layout=paper", "--crossbatch.d=2", "--crossbatch.gather_across_ranks=true",
                  torchrun=2)  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["negatives"] > 0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    args = ["--config", str(CI), "--run.save_final=false", "--run.save_every=4", "--parallel.strategy=none"]
    full = tmp_path / "full"
    proc = subprocess.run(trainer(*args, f"--run.out_dir={full}"), env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    child = subprocess.Popen(trainer(*args, f"--run.out_dir={killed}"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once step 10 is logged: checkpoints 4 and 8 exist, steps 9-10 are lost
        path = killed / "metrics.jsonl"
        if path.exists() and '"step": 10,' in path.read_text():
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not any(r["step"] == 20 for r in metrics(killed))
    proc = subprocess.run(trainer(*args, f"--run.out_dir={killed}", "--run.resume=true"), env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 21))  # every step exactly once: none lost, none duplicated
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), (x, y)
        assert x["lr"] == y["lr"]
    assert not list(killed.glob(".step_*.tmp"))  # stale partial checkpoints are cleaned up


def test_from_llama_checkpoint_with_memory_layers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "llama")
    out = run_in_process(tmp_path, checkpoint=str(tmp_path / "llama"), preset=None,
                         model={"mem_layers": [1], "mem_dtype": "float32"},
                         **{"train.max_steps": 2, "run.save_every": 0, "optim.lr": 1e-4})
    model = fot.LongLlamaForCausalLM.from_pretrained(out / "final")
    assert model.config.mem_layers == [1] and model.config.num_key_value_heads == 2
    # trained with use_cache=False, but generate() from final/ runs with a cache (not re-reading the prompt)
    assert model.config.use_cache and model.generation_config.use_cache
    before = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    after = model.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    assert 0 < (before - after).abs().max() < 1e-2  # trained a little, starting from the LLaMA weights


def test_lora_run_trains_only_adapters_saves_them_and_resumes(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'fot[dev]')")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "llama")
    common = dict(checkpoint=str(tmp_path / "llama"), preset=None, model={"mem_layers": [1], "mem_dtype": "float32"},
                  adapter={"kind": "lora", "r": 4, "alpha": 8.0, "layers": "memory"})
    steps = {"train.max_steps": 4, "optim.lr": 1e-2}
    whole = run_in_process(tmp_path / "whole", **common, **steps, **{"run.save_every": 0})
    final = whole / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    base = fot.LongLlamaForCausalLM.from_pretrained(tmp_path / "llama", mem_layers=[1], mem_dtype="float32").eval()
    tuned = peft.PeftModel.from_pretrained(base, final).eval()
    one_call = fot.LongLlamaForCausalLM.from_pretrained(final, mem_layers=[1], mem_dtype="float32").eval()
    adapted = {n for n, _ in tuned.named_parameters() if "lora_" in n}
    assert adapted and all(".layers.1." in n for n in adapted)  # only the memory layer
    ids = torch.randint(3, 64, (1, 80))
    with torch.no_grad():
        plain = fot.LongLlamaForCausalLM.from_pretrained(tmp_path / "llama", mem_layers=[1], mem_dtype="float32")
        assert (tuned(input_ids=ids).logits - plain(ids).logits).abs().max() > 1e-4  # the adapter changed it
        assert torch.equal(one_call(ids).logits, tuned(input_ids=ids).logits)  # base + adapter in one call
        merged = tuned.merge_and_unload()
        for name, w in merged.state_dict().items():  # the base weights themselves never moved
            if "layers.1.self_attn" not in name:
                assert torch.equal(w, hf.state_dict()[name]), name
    # a new run can start from the saved adapter: its first loss is the trained model's, not the base's
    again = run_in_process(tmp_path / "again", **{**common, "adapter": {**common["adapter"], "init": str(final)}},
                           **{"train.max_steps": 1, "optim.lr": 1e-2, "run.save_every": 0, "run.save_final": False})
    fresh_first, trained_last = metrics(whole)[0]["loss"], metrics(whole)[-1]["loss"]
    cont_first = metrics(again)[0]["loss"]
    assert abs(cont_first - fresh_first) > 1e-4 and abs(cont_first - trained_last) < abs(cont_first - fresh_first)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_config(CI, {"adapter": {"kind": "lora", "init": str(tmp_path)}})
    # resumed from its step-2 checkpoint (adapter weights and their optimizer state), steps 3-4 come out the same
    part = run_in_process(tmp_path / "part", **common, **steps, **{"run.save_every": 2, "run.save_final": False})
    run_in_process(tmp_path / "part", **common, **steps, **{"run.save_every": 2, "run.resume": True,
                                                            "run.save_final": False})
    records = metrics(part)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(part / "step_00000002" / "dcp")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), weights  # adapters only, never the frozen base
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(whole)]


def test_activation_checkpointing_is_exact_and_bf16_trains(tmp_path):
    common = {"train.max_steps": 3, "run.save_every": 0, "run.save_final": False}
    plain = run_in_process(tmp_path / "a", **common)
    ckpt = run_in_process(tmp_path / "b", **common, **{"train.activation_checkpointing": True})
    for x, y in zip(metrics(plain), metrics(ckpt)):
        assert abs(x["loss"] - y["loss"]) < 1e-6
    bf16 = run_in_process(tmp_path / "c", **common, **{"train.dtype": "bfloat16"})
    losses = [r["loss"] for r in metrics(bf16)]
    assert all(abs(x - y["loss"]) < 0.05 for x, y in zip(losses, metrics(plain)))
    assert (plain / "config.yaml").read_text().count("max_steps: 3") == 1


def test_paper_layout_run_logs_d_and_counts(tmp_path):
    out = run_in_process(tmp_path, **{"data.pack": 2, "crossbatch.layout": "paper", "crossbatch.schedule": "sampled",
                                      "crossbatch.d_choices": [1, 4], "train.max_steps": 4, "run.save_every": 0,
                                      "run.save_final": False})
    for r in metrics(out):
        assert r["d"] in (1, 4)
        assert r["positives"] == 0.5 and r["negatives"] == 0.5 * (r["d"] - 1)  # rows with a previous window


def test_wandb_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="log.wandb=true needs the wandb package"):
        run_in_process(tmp_path, **{"log.wandb": True, "train.max_steps": 1})


def test_cli_without_a_config_stops_at_once():
    """Without --config the defaults would build a multi-billion-parameter model and exhaust host memory."""
    start = time.perf_counter()
    proc = subprocess.run(trainer(), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--config" in proc.stderr
    assert time.perf_counter() - start < 60


def test_cli_reports_config_errors(tmp_path):
    proc = subprocess.run(trainer("--config", str(CI), "--optim.lrr=1"), env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown config key 'optim.lrr'" in proc.stderr


def test_max_minutes_stops_saves_and_resume_finishes_the_same_run(tmp_path, caplog):
    """train.max_minutes ends the run after the step that passes it: that step is checkpointed and final/ is
    written; a resume continues to max_steps with the schedule of the whole run and matches an uninterrupted run."""
    full = run_in_process(tmp_path / "a", **{"run.save_final": False, "run.save_every": 0})
    cut = tmp_path / "b" / "run"
    with caplog.at_level("INFO", logger="train"):
        run_in_process(tmp_path / "b", **{"train.max_minutes": 1e-6, "run.save_every": 0})
    assert "train.max_minutes=1e-06 reached: stopped after step 1 of" in caplog.text
    assert [r["step"] for r in metrics(cut)] == [1]
    assert (cut / "step_00000001").is_dir() and (cut / "final" / "config.json").is_file()
    run_in_process(tmp_path / "b", **{"run.resume": True, "run.save_final": False, "run.save_every": 0})
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), (x, y)
        assert x["lr"] == y["lr"]


def test_max_minutes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="train.max_minutes must be a positive number"):
        run_in_process(tmp_path, **{"train.max_minutes": 0})


def test_schedule_steps_stops_part_way_down_the_longer_schedule(tmp_path):
    """optim.schedule_steps > max_steps: the run is the first max_steps steps of the longer run, lr and loss."""
    common = {"optim.schedule": "cosine", "optim.warmup_steps": 2, "run.save_final": False, "run.save_every": 0}
    full = run_in_process(tmp_path / "a", **common)
    part = run_in_process(tmp_path / "b", **common, **{"train.max_steps": 8, "optim.schedule_steps": 20})
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9)) and len(a) == 20
    assert a[7]["lr"] > a[-1]["lr"]  # the cosine is still on its way down at step 8
    for x, y in zip(a, b):
        assert x["lr"] == y["lr"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
