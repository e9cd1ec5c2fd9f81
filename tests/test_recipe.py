"""``fot.recipe`` and ``fot.convert --recipe``: the every-layer setting applied to any Hugging Face Llama
checkpoint, checked against the float64 spec (tests/naive.py) and HF ``LlamaForCausalLM`` on the same weights."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fot
from fot.config import RECIPES
from fot.convert import main as convert_main

from tests.naive import naive_logits
from tests.tiny import close_with_bf16_memory, max_err, tokens

ROOT = Path(__file__).resolve().parents[1]

# The setting docs/results.md measures as the recommended one ("SmolLM2-135M, long-context setting"). Changing the
# recipe changes what every figure there describes, so this test has to change with it.
MEASURED = {
    "mem_layers": "all", "max_position_embeddings": 512, "last_context_length": 256, "mem_top_k": 32,
    "mem_index": "ivf-scan", "mem_nprobe": 16, "mem_dtype": "bfloat16", "window_overlap": 32, "mem_score_bias": 0.0,
    "mem_rope_distance": 512, "mem_heads": None, "mem_heads_scope": "all",
}
# the recipe scaled to a tiny model: a window of 32 instead of 512, and k 4 so that retrieval chooses
SMALL = {"max_position_embeddings": 32, "last_context_length": 16, "window_overlap": 4, "mem_rope_distance": 32,
         "mem_top_k": 4}


def test_every_layer_is_the_measured_setting():
    assert fot.recipe("every-layer") == MEASURED
    got = fot.recipe("every-layer", mem_top_k=64)
    assert got["mem_top_k"] == 64 and RECIPES["every-layer"]["mem_top_k"] == 32  # a copy, the table untouched


def test_every_recipe_sets_every_memory_field():
    """So applying one leaves nothing of an earlier setting, and fot ask's cache compares all of them."""
    from fot.config import MEMORY_FIELDS

    assert all(set(fields) == set(MEMORY_FIELDS) for fields in RECIPES.values())
    assert set(MEMORY_FIELDS) <= set(fot.LongLlamaConfig().to_dict())


def test_bad_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown recipe 'every'; choose one of every-layer"):
        fot.recipe("every")
    with pytest.raises(ValueError, match="sets no field mem_topk"):
        fot.recipe("every-layer", mem_topk=8)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A plain HF Llama checkpoint (model_type "llama", GQA), random weights, as a user's own model would be."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so attention is not uniform
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path


def test_a_plain_llama_with_the_recipe_equals_the_spec(hf_llama):
    model = fot.LongLlamaForCausalLM.from_pretrained(hf_llama, dtype=torch.float64,
                                                     **fot.recipe("every-layer", **SMALL)).eval()  # fmt: skip
    c = model.config
    assert c.mem_layers == [0, 1, 2] and (c.mem_index, c.mem_dtype) == ("ivf-scan", "bfloat16")
    # 200 distinct tokens: 6 windows through memory, fewer keys than an IVF index trains on. Layer 0's keys depend
    # on the token alone, so a repeated token would tie in the top-k, which the spec breaks differently.
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(5))[:200].unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    expected = naive_logits(model, c, ids, top_k=SMALL["mem_top_k"])  # exact top-k, bf16 memory
    assert close_with_bf16_memory(logits, expected)
    # memory matters here, so the comparison can fail: the spec without memory is far from it
    assert max_err(naive_logits(model, c, ids, mem_layers=[]), expected) > 1e-2


def test_a_prompt_within_the_last_window_equals_hf_llama(hf_llama):
    """With the recipe, a prompt of at most last_context_length tokens is the original model's forward."""
    ours = fot.LongLlamaForCausalLM.from_pretrained(hf_llama, dtype=torch.float32,
                                                    **fot.recipe("every-layer", **SMALL)).eval()  # fmt: skip
    theirs = LlamaForCausalLM.from_pretrained(hf_llama, dtype=torch.float32).eval()
    ids = tokens(2, SMALL["last_context_length"], seed=6)
    with torch.no_grad():
        assert max_err(ours(ids).logits, theirs(ids).logits) < 1e-5


def test_convert_applies_the_recipe_to_a_plain_llama(hf_llama, tmp_path, capsys):
    out = tmp_path / "long"
    convert_main(["--from", str(hf_llama), "--recipe", "every-layer", "--window", "64", "--last-context-length", "32",
                  "--out", str(out)])  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "longllama" and saved["mem_layers"] == [0, 1, 2]
    assert (saved["max_position_embeddings"], saved["last_context_length"]) == (64, 32)  # flags override the recipe
    kept = [k for k in MEASURED if k not in ("mem_layers", "max_position_embeddings", "last_context_length")]
    assert {k: saved[k] for k in kept} == {k: MEASURED[k] for k in kept}
    weights = "model.safetensors"
    assert (out / weights).read_bytes() == (hf_llama / weights).read_bytes()  # the weights, copied unchanged
    assert "saved to" in capsys.readouterr().out


def test_the_recipe_replaces_every_memory_field_of_a_fot_checkpoint(hf_llama, tmp_path):
    """Applied to a checkpoint with other memory settings, the recipe leaves none of them behind."""
    other = tmp_path / "other"
    convert_main(["--from", str(hf_llama), "--mem-layers", "1", "--window", "64", "--last-context-length", "32",
                  "--mem-top-k", "none", "--mem-heads", "1.0,1.3", "--mem-heads-scope", "prefill",
                  "--mem-score-bias", "1", "--out", str(other)])  # fmt: skip
    assert json.loads((other / "config.json").read_text())["mem_heads"] == {"1": [0, 3]}
    convert_main(["--from", str(other), "--recipe", "every-layer", "--out", str(other)])
    saved = json.loads((other / "config.json").read_text())
    assert {k: saved[k] for k in MEASURED if k != "mem_layers"} == {k: v for k, v in MEASURED.items()
                                                                    if k != "mem_layers"}  # fmt: skip
    assert saved["mem_layers"] == [0, 1, 2]


def test_gguf_conversion_takes_the_recipe_for_its_required_flags(capsys):
    with pytest.raises(SystemExit):  # nothing names the window: the error says how to give it
        convert_main(["--gguf", "missing.gguf", "--out", "unused"])
    assert "--gguf needs --mem-layers, --window, --last-context-length (or --recipe every-layer" in \
        capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_smollm2_applies_the_recipe_and_each_variable_one_field():
    def dry_run(*variables) -> str:
        out = subprocess.run(["make", "-n", "smollm2", *variables], cwd=ROOT, capture_output=True, text=True)
        return out.stdout

    assert "fot.convert --from models/smollm2-fot --recipe every-layer --out models/smollm2-fot" in dry_run()
    assert "--recipe every-layer --mem-top-k 64 --mem-index faiss-ivf --out" in \
        dry_run("SMOLLM2_TOP_K=64", "SMOLLM2_INDEX=faiss-ivf")
