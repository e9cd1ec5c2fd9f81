"""``mem_heads``: memory read by some query heads only, on every inference path that takes it, against the float64
spec of tests/naive.py (whose other heads attend to their local window alone), and what memory then holds."""

import json

import pytest
import torch

import fot
from fot.config import parse_mem_heads

from tests.naive import decoding_error, naive_logits
from tests.tiny import TOL64, max_err, tiny_model, tokens

# unit_tiny: 3 layers, 4 query heads; memory layers [1] unless a case says otherwise
HEADS = {1: [0, 3]}


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("extra", [
    {},  # dense memory (window groups are off under the setting: one window at a time)
    {"window_overlap": 16},
    {"mem_top_k": 4, "mem_index": "exact"},  # top-k: the listed heads' queries search their own memory heads
    {"mem_rope_distance": 100, "mem_top_k": 4, "mem_index": "exact"},  # with memory at a fixed distance
    {"mem_score_bias": 1.5},
    {"num_key_value_heads": 2, "mem_top_k": 4, "mem_index": "exact"},  # GQA: heads 0 and 3 read KV heads 0 and 1
    {"num_key_value_heads": 2, "mem_heads": {1: [2, 3]}},  # GQA: both listed heads read KV head 1
    {"mem_layers": [0, 2], "mem_heads": {2: [1]}},  # layer 0 reads memory with every head, layer 2 with one
    {"mem_heads_scope": "prefill"},  # the listed heads alone only in windows bound for memory
    {"mem_heads_scope": "prefill", "num_key_value_heads": 2, "mem_top_k": 4, "mem_index": "exact",
     "mem_rope_distance": 100},
    # a layer with no head: memory only in the last window there, beside a layer with two heads
    {"mem_heads_scope": "prefill", "mem_layers": [1, 2], "mem_heads": {1: [], 2: [0, 3]}, "mem_top_k": 4,
     "mem_index": "exact"},
], ids=["dense", "overlap", "topk-4", "distance", "bias", "gqa-topk", "gqa-shared", "two-layers", "prefill",
        "prefill-gqa-topk", "prefill-no-head"])
def test_memory_read_by_some_heads_equals_spec(impl, extra):
    extra = {"mem_heads": HEADS, **extra}
    model = tiny_model(attn_impl=impl, **extra)
    ids = tokens(1, 300, seed=51)
    with torch.no_grad():
        logits = model(ids).logits
    top_k = {"top_k": 4} if extra.get("mem_top_k") == 4 else {}  # the spec's exact top-k
    expected = naive_logits(model, model.config, ids, **top_k)
    assert max_err(logits, expected) < TOL64
    # the heads matter (so the comparison above can fail): every head, or no memory, is another model
    assert max_err(naive_logits(model, model.config, ids, mem_heads=None, **top_k), expected) > 1e-3
    assert max_err(naive_logits(model, model.config, ids, mem_layers=[], **top_k), expected) > 1e-3


@pytest.mark.parametrize("extra", [{}, {"mem_top_k": 512, "mem_index": "exact"}, {"mem_heads_scope": "prefill"}],
                         ids=["dense", "topk-all", "prefill"])
def test_memory_read_by_some_heads_in_decoding_equals_spec(extra):
    model = tiny_model(attn_impl="torch", mem_heads=HEADS, num_key_value_heads=2, **extra)
    assert decoding_error(model, tokens(1, 200, seed=52), tokens(1, 10, seed=53)) < TOL64


@pytest.mark.parametrize("mem_index", ["ivf-scan", "ivf-gemm"])
def test_an_ivf_index_with_every_list_probed_equals_exact_search_with_some_heads(mem_index):
    """ivf-scan's attention reads the scan's own scores of the listed heads (``scored_topk_attention``); GQA, padding
    in memory, and probing one list differs (so the index really ran)."""
    from tests.test_search_ivf_gemm import assert_model_with_every_list_probed_equals_exact, small_factory

    assert_model_with_every_list_probed_equals_exact(mem_index, small_factory, mem_heads=HEADS)


def test_memory_stores_one_kv_head_per_listed_head_and_the_budget_counts_them():
    from fot import budget

    model = tiny_model(num_key_value_heads=2, mem_layers=[0, 1], mem_heads={1: [1, 2, 3]})  # KV heads 0, 1, 1
    ids = tokens(1, 300, seed=55)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    full, listed = cache.memories[0].view(), cache.memories[1].view()
    assert full.k_BGMH.shape[1] == 2 and listed.k_BGMH.shape[1] == 3
    # the stored heads are the KV heads the listed heads read: KV head 1 twice, from a model that stores both
    every = tiny_model(num_key_value_heads=2, mem_layers=[0, 1])
    with torch.no_grad():
        reference = every(ids, use_cache=True).past_key_values.memories[1].view()
    torch.testing.assert_close(listed.k_BGMH, reference.k_BGMH[:, [0, 1, 1]], rtol=0, atol=0)
    torch.testing.assert_close(listed.v_BGMH, reference.v_BGMH[:, [0, 1, 1]], rtol=0, atol=0)
    # the RAM budget counts 2 + 3 stored heads, not 2 + 2 (keys and values, float64 memory here, + validity)
    est = budget.estimate_memory(model.config, 300 + model.config.last_context_length)
    slot = lambda g: fot.memory.per_slot_bytes(model.config.mem_torch_dtype, g, model.config.head_dim)  # noqa: E731
    assert est.memory == 300 * (slot(2) + slot(3))


def test_scope_prefill_keeps_every_kv_head_and_reads_with_every_head_in_the_last_window():
    ids = tokens(1, 300, seed=57)
    prefill = tiny_model(mem_heads=HEADS, mem_heads_scope="prefill", num_key_value_heads=2)
    with torch.no_grad():
        cache = prefill(ids, use_cache=True).past_key_values
    assert cache.memories[1].view().k_BGMH.shape[1] == 2  # every KV head: the last window reads with every head
    from fot import budget

    assert budget.memory_kv_heads(prefill.config, 1) == 2
    # the last window differs from scope "all" (every head reads there), the prefilled memory from every head's
    spec = naive_logits(prefill, prefill.config, ids)
    assert max_err(naive_logits(prefill, prefill.config, ids, mem_heads_scope="all"), spec) > 1e-3
    assert max_err(naive_logits(prefill, prefill.config, ids, mem_heads=None), spec) > 1e-3
    with pytest.raises(ValueError, match="mem_heads_scope='everywhere' is unknown; use one of all, prefill"):
        tiny_model(mem_heads=HEADS, mem_heads_scope="everywhere")


def test_a_layer_with_no_head_searches_memory_only_in_the_last_window(monkeypatch):
    """Under scope "prefill", {layer: []} skips that layer's search in every window bound for memory."""
    from fot.cache import MemoryReader

    calls = []
    search = MemoryReader.retrieve_scored
    monkeypatch.setattr(MemoryReader, "retrieve_scored", lambda self, q: calls.append(q.shape[1]) or search(self, q))
    both = dict(mem_layers=[1, 2], mem_top_k=4, mem_index="exact", mem_heads_scope="prefill")
    ids = tokens(1, 300, seed=58)  # windows of 64 over the first 268 tokens, then the last 32
    with torch.no_grad():
        tiny_model(mem_heads={1: [], 2: [0, 3]}, **both)(ids)
        skipped = len(calls)
        calls.clear()
        tiny_model(mem_heads={1: [1], 2: [0, 3]}, **both)(ids)
    # layer 2 searches in windows 2-5 and the last window, layer 1 in the last window only (4 heads each time)
    assert skipped == 5 + 1 and len(calls) == 5 + 5 and set(calls) == {4}


@pytest.mark.parametrize("spec, expected", [
    ("18.6,18.7, 21.8", {18: [6, 7], 21: [8]}),
    ({"21": [8, 2], 3: (1,)}, {3: [1], 21: [2, 8]}),
    ({"4": [], "2": [1]}, {2: [1], 4: []}),  # a layer with no head is kept
    ("4.,2.1", {2: [1], 4: []}),
    (None, None),
])
def test_mem_heads_forms(spec, expected):
    assert parse_mem_heads(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ({2: [0]}, "mem_heads lists layer 2, which is not a memory layer"),
    ({1: [4]}, "has num_attention_heads=4"),
    ("1.x", "are not both indices"),
    ("1", "'1' is not layer.head"),
    ({1: []}, "gives memory layer 1 no head, so it would never read memory; drop it from mem_layers, or use "
              "mem_heads_scope='prefill'"),
    ("1.1,1.1", "lists head 1 of layer 1 twice"),
    ({1: 3}, "not a list of heads"),
    ([1, 2], "must be None"),
])
def test_bad_mem_heads_are_one_line_errors_naming_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(mem_heads=spec)


def test_the_config_stores_and_reloads_mem_heads(tmp_path):
    model = tiny_model(mem_heads="1.3,1.0")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mem_heads"] == {"1": [0, 3]}
    again = fot.LongLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert again.config.mem_heads == {1: [0, 3]}
    ids = tokens(1, 200, seed=56)
    with torch.no_grad():
        assert max_err(again(ids).logits, model(ids).logits) == 0
    # turning memory off needs mem_heads off too, and the error says so
    with pytest.raises(ValueError, match="not a memory layer"):
        fot.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[])
    assert fot.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[], mem_heads=None).config.mem_layers == []


@pytest.mark.parametrize("case, message", [
    ("training", "not for training"),
    ("blocks", "not for block retrieval"),
    ("triton", "not for Triton; set mem_heads=None or attn_impl='torch'"),
])
def test_paths_without_the_setting_refuse_it(case, message):
    from fot.plan import resolve_plan

    extra = {"mem_blocks": 4, "mem_block_size": 8} if case == "blocks" else {}
    model = tiny_model(mem_heads=HEADS, **extra)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_plan(model.config, fot.LongLlamaCache(model.config), impl="triton" if case == "triton" else "torch",
                     training=case == "training", crossbatch=False, padded=False, last_context_length=None,
                     cache_policy=None)
