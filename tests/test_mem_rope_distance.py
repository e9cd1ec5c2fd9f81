"""``mem_rope_distance``: memory scored by queries rotated at position D instead of their own, on every inference
path that takes it, against the float64 spec of tests/naive.py (which rotates the unrotated query at D)."""

import pytest
import torch

import fot

from tests.naive import decoding_error, naive_logits
from tests.tiny import TOL64, max_err, tiny_model, tokens

D = 100


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("extra", [
    {},  # dense memory (window groups are off under the setting: one window at a time)
    {"window_overlap": 16},
    {"mem_top_k": 512, "mem_index": "exact"},  # top-k covering all of memory
    {"mem_top_k": 4, "mem_index": "exact"},  # top-k reading a few slots: the search ranks by the memory queries
    {"mem_attention_grouping": (2, 16)},  # dense in (heads, queries) blocks
    {"mem_score_bias": 1.5},  # with the offset
    {"num_key_value_heads": 2, "mem_top_k": 4, "mem_index": "exact"},  # GQA: searched per KV head
], ids=["dense", "overlap", "topk-all", "topk-4", "grouping", "bias", "gqa-topk-4"])
def test_memory_at_a_fixed_distance_equals_spec(impl, extra):
    model = tiny_model(attn_impl=impl, mem_rope_distance=D, **extra)
    ids = tokens(1, 300, seed=41)
    with torch.no_grad():
        logits = model(ids).logits
    top_k = {"top_k": 4} if extra.get("mem_top_k") == 4 else {}  # the spec's exact top-k by the memory queries
    expected = naive_logits(model, model.config, ids, **top_k)
    assert max_err(logits, expected) < TOL64
    # the distance changes the result (so the comparison above can fail), and so do other distances
    assert max_err(naive_logits(model, model.config, ids, mem_rope_distance=None, **top_k), expected) > 1e-3
    assert max_err(naive_logits(model, model.config, ids, mem_rope_distance=7, **top_k), expected) > 1e-3


@pytest.mark.parametrize("extra", [{}, {"mem_top_k": 512, "mem_index": "exact"}], ids=["dense", "topk"])
def test_memory_at_a_fixed_distance_in_decoding_equals_spec(extra):
    model = tiny_model(attn_impl="torch", mem_rope_distance=D, **extra)
    assert decoding_error(model, tokens(1, 200, seed=42), tokens(1, 10, seed=43)) < TOL64


@pytest.mark.parametrize("value, message", [
    (-1, "mem_rope_distance=-1 must be None (the reference) or an int >= 0"),
    (True, "mem_rope_distance=True must be None"),
    (2.5, "mem_rope_distance=2.5 must be None"),
])
def test_mem_rope_distance_is_checked(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(mem_rope_distance=value)
    with pytest.raises(ValueError, match="mem_positionals=False turns RoPE off"):
        tiny_model(mem_rope_distance=64, mem_positionals=False)
    model = tiny_model()
    with pytest.raises(ValueError, match="must be None"):
        model.config.mem_rope_distance = -3  # a validated field: setattr checks it too
    assert model.config.mem_rope_distance is None


@pytest.mark.parametrize("case, message", [
    ("training", "not for training"),
    ("blocks", "not for block retrieval"),
    ("triton", "not for Triton; set mem_rope_distance=None or attn_impl='torch'"),
])
def test_paths_without_the_setting_refuse_it(case, message):
    from fot.plan import resolve_plan

    extra = {"mem_blocks": 4, "mem_block_size": 8} if case == "blocks" else {}
    model = tiny_model(mem_rope_distance=D, **extra)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_plan(model.config, fot.LongLlamaCache(model.config), impl="triton" if case == "triton" else "torch",
                     training=case == "training", crossbatch=False, padded=False, last_context_length=None,
                     cache_policy=None)
    if case == "training":  # and a training forward says so before it runs
        with pytest.raises(ValueError, match=message):
            model.train()(tokens(1, 100, seed=44), labels=tokens(1, 100, seed=44))
