"""Round trips through our format, a plain LLaMA checkpoint and a published-LongLLaMA-format directory."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fot
from tests.naive import naive_logits
from tests.reference_format import reference_config_dict
from tests.tiny import TINY, TOL32, TOL64, max_err, randomize_, tiny_config, tiny_model, tokens


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(ours[name], tensor.to(ours[name].dtype)), name
        assert ours[name].dtype == tensor.dtype, name


def test_our_format_round_trip(tmp_path):
    model = tiny_model(
        dtype=torch.float32, mem_layers=[0, 2], last_context_length=24, cache_policy="flush",
        mem_attention_grouping=(2, 5), mem_positionals=False, num_key_value_heads=2,
    )
    model.save_pretrained(tmp_path)
    ids = tokens(1, 150, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    for cls in (fot.LongLlamaForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is fot.LongLlamaForCausalLM
        cfg = loaded.config
        assert cfg.mem_layers == [0, 2] and cfg.last_context_length == 24 and cfg.cache_policy == "flush"
        assert cfg.mem_attention_grouping == (2, 5) and cfg.mem_positionals is False and cfg.mem_dtype == "float32"
        assert cfg.num_key_value_heads == 2
        assert_same_weights(loaded, model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def save_plain_llama(path, max_position_embeddings):
    hf_cfg = LlamaConfig(
        **{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps")},
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(hf_cfg)).eval()
    hf.save_pretrained(path)
    return hf


def check_plain_llama_load(model, hf):
    assert isinstance(model, fot.LongLlamaForCausalLM)
    cfg = model.config
    assert cfg.mem_layers == [1] and cfg.num_key_value_heads == 2 and cfg.mem_dtype == "float32"
    assert cfg.max_position_embeddings == 64 and cfg.last_context_length == 32
    assert_same_weights(model, hf.state_dict())
    ids = tokens(2, 32, seed=2)
    with torch.no_grad():
        assert max_err(model(ids).logits, hf(ids).logits) < 1e-5
        long_ids = tokens(1, 130, seed=3)
        assert max_err(model(long_ids).logits, naive_logits(model, model.config, long_ids)) < TOL32


def test_plain_llama_checkpoint_loads_with_memory_overrides(tmp_path):
    # A LLaMA with a 2048 window: the default last_context_length (1024) is valid before the overrides apply.
    hf = save_plain_llama(tmp_path, 2048)
    model = fot.LongLlamaForCausalLM.from_pretrained(
        tmp_path, mem_layers=[1], max_position_embeddings=64, last_context_length=32, mem_dtype="float32"
    ).eval()
    check_plain_llama_load(model, hf)


def test_small_window_llama_checkpoint_loads_with_last_context_override(tmp_path):
    hf = save_plain_llama(tmp_path, 64)
    model = fot.LongLlamaForCausalLM.from_pretrained(
        tmp_path, mem_layers=[1], last_context_length=32, mem_dtype="float32"
    ).eval()
    check_plain_llama_load(model, hf)


def write_reference_checkpoint(path, state_dict, **config_overrides):
    (path / "config.json").write_text(json.dumps(reference_config_dict(**config_overrides)))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"))


def test_reference_format_directory_loads_without_remote_code(tmp_path):
    source = tiny_model(dtype=torch.float32, mem_layers=[0, 2], mem_dtype="float32")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    write_reference_checkpoint(tmp_path, state, mem_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(model) is fot.LongLlamaForCausalLM
    assert model.config.mem_layers == [0, 2] and model.config.last_context_length == 32
    assert_same_weights(model, state)
    ids = tokens(1, 140, seed=4)
    with torch.no_grad():
        logits = model(ids).logits
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL32


def test_reference_format_default_dtype_keeps_weights(tmp_path):
    # No dtype argument: whatever dtype transformers picks, the values must be the saved ones in that dtype.
    source = tiny_model(dtype=torch.float32)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    write_reference_checkpoint(tmp_path, state)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name


def test_from_pretrained_overrides_land_on_config_and_take_effect(tmp_path):
    base = tiny_model(dtype=torch.float32, mem_layers=[1])
    base.save_pretrained(tmp_path)
    ids = tokens(1, 150, seed=5)
    model = fot.LongLlamaForCausalLM.from_pretrained(
        tmp_path, mem_layers=[0, 2], mem_dtype="bfloat16", mem_attention_grouping=(1, 7), last_context_length=16,
        mem_positionals=False, torch_attention=True,
    ).eval()
    cfg = model.config
    assert cfg.mem_layers == [0, 2] and cfg.mem_dtype == "bfloat16" and cfg.mem_attention_grouping == (1, 7)
    assert cfg.last_context_length == 16 and cfg.mem_positionals is False and cfg.torch_attention is True
    with torch.no_grad():
        out = model(ids, use_cache=True)
        default = base(ids).logits
    assert set(out.past_key_values.memories) == {0, 2}
    assert out.past_key_values.memories[0].view().k_BGMH.dtype == torch.bfloat16
    assert out.past_key_values.local_length == 16
    expected = naive_logits(model, cfg, ids)
    assert max_err(out.logits, expected) < 2e-3  # bf16 memory: see tests/tiny.py
    assert max_err(default, expected) > 1e-1


def test_mem_positionals_override_matches_spec(tmp_path):
    base = tiny_model(dtype=torch.float64, mem_layers=[1])
    base.save_pretrained(tmp_path)
    ids = tokens(1, 150, seed=6)
    model = fot.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_positionals=False, dtype=torch.float64).eval()
    with torch.no_grad():
        logits, default = model(ids).logits, base(ids).logits
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL64
    assert max_err(logits, default) > 1e-2


def test_invalid_override_is_rejected_at_model_build(tmp_path):
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mem_layers"):
        fot.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[7])
    with pytest.raises(ValueError, match="last_context_length"):
        fot.LongLlamaForCausalLM.from_pretrained(tmp_path, last_context_length=65)


def test_auto_classes_are_registered():
    cfg = tiny_config()
    assert isinstance(AutoModel.from_config(cfg), fot.LongLlamaModel)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), fot.LongLlamaForCausalLM)
    auto_cfg = AutoConfig.for_model("longllama", **{k: v for k, v in TINY.items() if k != "mem_layers"}, mem_layers=[2])
    assert isinstance(auto_cfg, fot.LongLlamaConfig) and auto_cfg.mem_layers == [2]
