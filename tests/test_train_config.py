"""Run configs: every shipped YAML validates, every config error names its key, the 3B/7B recipes build on the
meta device with the published shapes and parameter counts."""

from pathlib import Path

import pytest
import torch

import fot
from train.build import build_config
from train.config import load_config, parse_overrides, resolve_grad_accum
from train.objective import Objective

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    spec = load_config(path)
    cfg = build_config(spec)  # the model fields are valid LongLlamaConfig fields
    assert cfg.use_cache is False


def params(hidden, ffn, layers, vocab=32000):
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize(
    "name, hidden, ffn, layers, mem_layers, expected_b, ranges",
    [("openllama_3b", 3200, 8640, 26, [6, 12, 18], 3.43, [0, 2, 3, 3]),
     ("openllama_7b", 4096, 11008, 32, [8, 16, 24], 6.74, [0, 3, 7, 7])],
)
def test_real_recipes_on_meta_device(name, hidden, ffn, layers, mem_layers, expected_b, ranges):
    spec = load_config(ROOT / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = fot.LongLlamaForCausalLM(build_config(spec))
    n = sum(p.numel() for p in model.parameters())
    assert n == params(hidden, ffn, layers)
    assert round(n / 1e9, 2) == expected_b
    assert model.model.embed_tokens.weight.shape == (32000, hidden)
    assert model.lm_head.weight.shape == (32000, hidden)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (hidden, hidden)
    assert layer.self_attn.k_proj.weight.shape == (hidden, hidden)
    assert layer.mlp.gate_proj.weight.shape == (ffn, hidden)
    assert [i for i, l in enumerate(model.model.layers) if l.self_attn.is_memory_layer] == mem_layers
    # the recipe: windows, batch, optimizer, scale
    cfg = model.config
    assert cfg.max_position_embeddings == 2048 and spec.data.window == 2048 and spec.data.pack == 4
    assert spec.train.batch_tokens == 256 * 1024
    for world in (1, 2, 4, 8):
        accum = resolve_grad_accum(spec, 2048, world)
        assert spec.train.micro_batch_size * 2048 * accum * world == 262144
    o = spec.optim
    assert (o.lr, o.weight_decay, o.beta2, o.grad_clip, o.schedule) == (2e-5, 0.01, 0.95, 1.0, "constant")
    assert spec.parallel.strategy == "fsdp2" and spec.train.dtype == "bfloat16"
    assert spec.train.activation_checkpointing is True
    plan = Objective(spec.crossbatch, spec.train.micro_batch_size, 4, 10, 0).plan(0)
    last_pack = slice(spec.train.micro_batch_size - 4, None)
    pos, neg = plan.counts()
    quarters = list(zip(pos[last_pack].tolist(), neg[last_pack].tolist()))
    assert [p + q for p, q in quarters] == ranges


def test_overrides_parse_yaml_values():
    assert parse_overrides(["--optim.lr=2.0e-5", "--run.resume=true", "--model.mem_layers=[2,3]", "--checkpoint",
                            "dir"]) == {"optim.lr": 2e-5, "run.resume": True, "model.mem_layers": [2, 3],
                                        "checkpoint": "dir"}
    spec = load_config(ROOT / "configs/ci_tiny.yaml", parse_overrides(["--train.max_steps=3", "--optim.lr=1"]))
    assert spec.train.max_steps == 3 and spec.optim.lr == 1.0  # an int is accepted for a float
    spec = load_config(ROOT / "configs/ci_tiny.yaml", parse_overrides(["--optim.lr=2e-5"]))
    assert spec.optim.lr == 2e-5  # YAML 1.1 reads 2e-5 as a string; a number-shaped string is a float


CI = ROOT / "configs" / "ci_tiny.yaml"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"nonsense": 1}, "unknown config key 'nonsense'"),
        ({"optim.lrr": 1e-3}, r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\); known keys of optim: "
                              "beta1, "),
        ({"optim": {"lrr": 1e-3}}, r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ({"nonsense.x": 1}, "unknown config key 'nonsense'; known keys of the config: adapter, checkpoint"),
        ({"model.hiden_size": 8}, r"unknown config key 'model.hiden_size' \(did you mean 'model.hidden_size'"),
        ({"optim.lr": "fast"}, "optim.lr: .*'fast'.*Float"),
        ({"train.max_steps": 2.5}, "train.max_steps: .*'2.5'.*Integer"),
        ({"run.resume": "yes please"}, "run.resume: .*'yes please'.*bool"),
        ({"train.dtype": "float16"}, r"train.dtype: .*'float16'.*\['float32', 'bfloat16'\]"),
        ({"crossbatch.layout": "ring"}, r"crossbatch.layout: .*'ring'.*\['reference', 'paper', 'none'\]"),
        ({"data.window": "big"}, "data.window: .*'big'.*Integer"),
        ({"adapter.layers": "all"}, r"adapter.layers: .*'all'.*list\[int\].*memory"),
        ({"data.paths": "books.parquet"}, "data.paths: .*str.*list"),
        ({"crossbatch.d_choices": [2, "x"]}, r"crossbatch.d_choices\[1\]: .*'x'.*Integer"),
        ({"data.mix": 3}, r"data.mix: .*int.*Dict\[str, float\]"),
        ({"data.mix": {"recall": "x"}}, "data.mix.recall: .*'x'.*Float"),
        ({"model.mem_layers": "two"}, "model.mem_layers='two': 'two' is not an integer; use 'all'"),
        ({"model.mem_layers": "every:0"}, "model.mem_layers='every:0': in 'every:0' N must be >= 1"),
        ({"model.mem_layers": 2}, "model.mem_layers: .*int.*list"),
        ({"model.mem_layers": [1, "a"]}, r"model.mem_layers\[1\]: .*'a'.*Integer"),
        ({"model.vocab_size": True}, "model.vocab_size: .*'True'.*Integer"),
        ({"data": 3}, "data: .*int.*DataConfig"),
        ({"optim.lr.x": 1}, "optim.lr: .*Float"),
        ({"train.micro_batch_size": 6}, "train.micro_batch_size=6 must be a positive multiple of data.pack=4"),
        ({"data.pack": 0}, "data.pack"),
        ({"train.grad_accum": 0}, "train.grad_accum"),
        ({"train.max_steps": 0}, "train.max_steps"),
        ({"data.window": 1}, "data.window"),
        ({"data.source": "files"}, "data.paths"),
        ({"data.source": "hub"}, "data.hub_name"),
        ({"data.synthetic_kind": "passkey"}, "data.tokenizer is required"),
        ({"data.tokenizer": "checkpoint"}, "data.tokenizer=checkpoint needs a checkpoint"),
        ({"data.passkey_fraction": 2.0}, "data.passkey_fraction"),
        ({"crossbatch.range": -1}, "crossbatch.range"),
        ({"crossbatch.ranges": [0, 1]}, "crossbatch.ranges"),
        ({"crossbatch.layout": "paper", "crossbatch.d": 3}, r"crossbatch d=3 .* documents per micro-batch"),
        ({"crossbatch.layout": "paper", "crossbatch.schedule": "sampled", "crossbatch.d_choices": []}, "d_choices"),
        ({"crossbatch.layout": "paper", "crossbatch.schedule": "switch", "crossbatch.d": 1,
          "crossbatch.d_after": 64}, "crossbatch d=64"),
        ({"optim.lr": 0}, "optim.lr must be > 0"),
        ({"optim.beta2": 1.0}, "optim.beta1 and optim.beta2"),
        ({"optim.min_lr_ratio": 2}, "optim.min_lr_ratio"),
        ({"run.keep_last": 0}, "run.keep_last"),
        ({"train.batch_tokens": 0}, "train.batch_tokens"),
        ({"preset": "gpt5"}, "preset='gpt5' is unknown"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(CI, overrides)


def test_values_of_every_kind_are_accepted(tmp_path):
    """Optionals, a list-or-choice union, a mapping that replaces its default, an empty section, interpolation."""
    spec = load_config(CI, {"data.window": None, "adapter.layers": "memory", "data.mix": {"recall": 1},
                            "model.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert spec.data.window is None and spec.adapter.layers == "memory"
    assert spec.data.mix == {"recall": 1.0}  # replaced, not merged with the default recall/lookup/copy
    assert spec.model["rope_parameters"]["rope_theta"] == 10000.0 and spec.model["mem_layers"] == [1]
    assert load_config(CI, {"adapter.layers": [0, 2]}).adapter.layers == [0, 2]
    # a compact mem_layers form stays as written in the run config and is resolved when the model config is built
    compact = load_config(CI, parse_overrides(["--model.mem_layers=all"]))
    assert compact.model["mem_layers"] == "all" and build_config(compact).mem_layers == [0, 1]
    config = tmp_path / "run.yaml"
    config.write_text("log:\nrun:\n  out_dir: runs/x\ndata:\n  tokenizer: ${run.out_dir}/tok\n  mix: {copy: 2}\n")
    spec = load_config(config)
    assert spec.log.every == 1 and spec.data.tokenizer == "runs/x/tok" and spec.data.mix == {"copy": 2.0}


def test_file_and_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(bad)
    bad.write_text("train:\n  max_steps: [3\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML: while parsing a flow sequence"):
        load_config(bad)
    spec = load_config(CI, {"train.batch_tokens": 1000})
    with pytest.raises(ValueError, match="train.batch_tokens=1000 is not a multiple"):
        resolve_grad_accum(spec, 32, 2)
    with pytest.raises(ValueError, match="mem_layers"):  # LongLlamaConfig's own validation
        build_config(load_config(CI, {"model.mem_layers": [7]}))
    with pytest.raises(ValueError, match="mem_layers='5:' selects no layer of a model with num_hidden_layers=2"):
        build_config(load_config(CI, {"model.mem_layers": "5:"}))
    with pytest.raises(ValueError, match="override --x has no value"):
        parse_overrides(["--x"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["x=1"])


def test_a_missing_checkpoint_directory_is_named_as_missing(monkeypatch, tmp_path):
    """A local run directory that is not there (an earlier stage not yet run) says so, instead of reporting only
    the failed Hub lookup that transformers tries next."""
    from train.crossbatch import model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_config(ROOT / "configs" / "demo_stage7s.yaml", {"checkpoint": str(tmp_path / "demo_model")})
    with pytest.raises(ValueError, match="no such directory here .* run that stage first"):
        model_config(spec)
    (tmp_path / "demo_model").mkdir()  # there, but without a config.json: the other message
    with pytest.raises(ValueError, match="has no readable config.json"):
        model_config(spec)


def test_make_demo_model_chains_each_stage_from_the_one_before():
    """`make demo-model` (read with make -n): every stage trains from a checkpoint an earlier step wrote (a stage's
    final/ or the interpolation's output), with the tokenizer the recipe builds, and the check evaluates the last
    stage's final/ checkpoint, so a config edited out of order fails here, not hours into a run."""
    import shlex
    import subprocess

    dry = subprocess.run(["make", "-n", "demo-model"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    written = {None}  # what earlier steps wrote; stage 0 starts from random weights
    last = None
    tokenizer = None
    for line in dry.stdout.replace("\\\n", "").splitlines():
        argv = shlex.split(line)
        if "train.synthetic" in argv and "tokenizer" in argv:
            tokenizer = argv[argv.index("--out") + 1]
        elif "train.interpolate" in argv:
            assert {argv[argv.index("--base") + 1], argv[argv.index("--tuned") + 1]} <= written
            written.add(argv[argv.index("--out") + 1])
        elif "train/crossbatch.py" in argv:
            spec = load_config(ROOT / argv[argv.index("--config") + 1])
            assert spec.checkpoint in written, f"{argv[-1]}: checkpoint {spec.checkpoint} is not written before it"
            assert spec.data.tokenizer in (None, tokenizer), argv[-1]
            last = f"{spec.run.out_dir}/final"
            written.add(last)
        elif "eval/passkey.py" in argv:
            assert argv[argv.index("--model") + 1] == last
    assert last == "runs/demo_stage8/final"
