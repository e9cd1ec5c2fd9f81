"""With memory unused, our logits equal Hugging Face LlamaForCausalLM's on the same weights."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny import TINY, left_pad_mask, max_err, tiny_model, tokens

PARITY = 1e-5  # fp32, same math in a different order


def hf_twin(model) -> LlamaForCausalLM:
    cfg = model.config
    hf_cfg = LlamaConfig(
        **{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps")},
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize(
    "overrides",
    [
        {"mem_layers": []},
        {"mem_layers": [], "num_key_value_heads": 2},
        {"mem_layers": [1]},  # a memory layer, but the input fits in the last window: memory stays empty
        {"mem_layers": [0, 2], "num_key_value_heads": 1, "attn_impl": "reference"},
        {"mem_layers": [1], "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        {"mem_layers": [2], "tie_word_embeddings": True},
    ],
)
def test_single_window_logits_equal_llama(overrides):
    model = tiny_model(dtype=torch.float32, **overrides)
    hf = hf_twin(model)
    ids = tokens(2, 32, seed=1)  # N = L: a single window
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True)
        theirs = hf(ids, output_hidden_states=True)
    assert max_err(ours.logits, theirs.logits) < PARITY
    assert theirs.logits.abs().max() > 1.0  # non-trivial logits
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.num_hidden_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert max_err(a, b) < PARITY
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_left_padding_equals_llama_at_valid_positions(impl):
    # HF without position_ids numbers positions from the first column, padding included; so does our window.
    model = tiny_model(dtype=torch.float32, mem_layers=[1], attn_impl=impl)
    hf = hf_twin(model)
    ids = tokens(3, 30, seed=2)
    mask = left_pad_mask([30, 21, 4], 30)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
        unmasked = hf(ids).logits
    assert max_err(ours, theirs, mask) < PARITY
    assert max_err(unmasked, theirs, mask) > 1e-2  # the mask matters at valid positions


def test_multi_window_input_is_not_plain_llama():
    # Beyond L tokens LongLLaMA windows the input, so it must differ from full causal attention.
    model = tiny_model(dtype=torch.float32, mem_layers=[])
    hf = hf_twin(model)
    ids = tokens(1, 60, seed=3)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert max_err(ours[:, :28], theirs[:, :28]) < PARITY  # the first window (28 tokens) sees the same context
    assert max_err(ours[:, 28:], theirs[:, 28:]) > 1e-2
