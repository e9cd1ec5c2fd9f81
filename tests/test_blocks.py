"""Block retrieval (``mem_blocks``, fot/blocks.py) against the float64 spec of tests/naive.py and against dense
attention, which it equals when every block is read."""

import pytest
import torch

from fot.attention import fused_block_attention, reference_block_attention
from fot.blocks import BlockIndex, chunk_queries, unchunk_queries
from fot.budget import index_bytes
from fot.memory import MemoryStore
from fot.types import BlockChoice, LocalKV, MemoryKV
from tests.naive import NaiveLongLlama, Spec, naive_block_choice, naive_logits, weights_f64
from tests.tiny import TOL32, TOL64, max_err, tiny_model, tokens


def _store(B, G, M, H, seed, invalid_every=0):
    g = torch.Generator().manual_seed(seed)
    store = MemoryStore(torch.float32)
    k = torch.randn(B, G, M, H, generator=g)
    v = torch.randn(B, G, M, H, generator=g)
    valid = None
    if invalid_every:
        valid = torch.ones(B, M, dtype=torch.bool)
        valid[0, ::invalid_every] = False
    # written in three appends, as windows are, so the index is updated block by block
    for a, b in ((0, 37), (37, 70), (70, M)):
        store.append(k[:, :, a:b], v[:, :, a:b], None if valid is None else valid[:, a:b], training=False)
    return store


@pytest.mark.parametrize("invalid_every", [0, 3])
def test_chosen_blocks_equal_the_float64_spec(invalid_every):
    B, G, R, T, H, M, S, n, chunk = 2, 2, 3, 13, 8, 101, 8, 4, 5  # 13 blocks, the last one partly filled
    store = _store(B, G, M, H, seed=1, invalid_every=invalid_every)
    index = BlockIndex(S, n, chunk)
    index.update(store, torch.arange(M), evicted=False)
    q = torch.randn(B, G * R, T, H, generator=torch.Generator().manual_seed(2))
    got = index.choose(q, n, chunk)
    assert got.shape == (B, G, 3, n)
    view = store.view()
    valid = view.valid_BM if view.valid_BM is not None else torch.ones(B, M, dtype=torch.bool)
    for b in range(B):
        for g in range(G):
            want = naive_block_choice(q[b, g * R:(g + 1) * R], view.k_BGMH[b, g], valid[b], S, n, chunk)
            assert [set(got[b, g, c].tolist()) for c in range(3)] == want


def test_index_updated_window_by_window_equals_one_built_at_once():
    store = _store(1, 2, 101, 8, seed=3, invalid_every=4)
    once = BlockIndex(8, 4, 5)
    once.update(store, torch.arange(101), evicted=False)
    incremental = BlockIndex(8, 4, 5)
    for a, b in ((0, 37), (37, 70), (70, 101)):
        incremental.update(store, torch.arange(a, b), evicted=False)
    for name in ("kmin_BGXH", "kmax_BGXH", "filled_BGX"):
        x, y = getattr(once, name)[:, :, :13], getattr(incremental, name)[:, :, :13]
        assert torch.equal(x, y), name
    # a block whose keys are all invalid is never chosen
    store2 = _store(1, 1, 40, 8, seed=4)
    store2.clear()
    index = BlockIndex(8, 4, 5)
    index.update(store2, torch.arange(40), evicted=False)
    assert (index.choose(torch.randn(1, 1, 3, 8), 4, 5) == -1).all()


def test_chunking_round_trips():
    q = torch.randn(2, 6, 11, 4)
    chunked = chunk_queries(q.reshape(2, 3, 2, 11, 4), 4)
    assert chunked.shape == (2, 3, 3, 8, 4)
    assert torch.equal(unchunk_queries(chunked, 2, 11), q)
    # rows within a chunk are (query head, query): chunk 1 of KV head 0 starts with head 0's query 4
    assert torch.equal(chunked[0, 0, 1, 0], q[0, 0, 4])
    assert torch.equal(chunked[0, 0, 1, 4], q[0, 1, 4])


@pytest.mark.parametrize("invalid_every", [0, 3])
def test_fused_block_attention_equals_reference(invalid_every):
    B, G, R, T, H, M, S, n, chunk = 2, 2, 2, 11, 8, 101, 8, 3, 4
    store = _store(B, G, M, H, seed=5, invalid_every=invalid_every)
    index = BlockIndex(S, n, chunk)
    index.update(store, torch.arange(M), evicted=False)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, G * R, T, H, generator=g, dtype=torch.float64)
    local = LocalKV(torch.randn(B, G, T + 5, H, generator=g, dtype=torch.float64),
                    torch.randn(B, G, T + 5, H, generator=g, dtype=torch.float64), None)
    view = store.view()
    memory = MemoryKV(view.k_BGMH.double(), view.v_BGMH.double(), view.valid_BM)
    choice = BlockChoice(index.choose(q, n, chunk), S, chunk)
    want = reference_block_attention(q, local, memory, choice)
    assert max_err(fused_block_attention(q, local, memory, choice), want) < TOL64
    # reading no memory is a different result, so the comparison can fail
    assert max_err(fused_block_attention(q, local, None, None), want) > 1e-2


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("overlap", [0, 16])
def test_model_with_block_retrieval_equals_spec(impl, overlap):
    # W 64, L 32, 300 tokens: 268 tokens in memory = 34 blocks of 8; each 16-query chunk reads 3 of them.
    model = tiny_model(attn_impl=impl, mem_blocks=3, mem_block_size=8, mem_block_queries=16, window_overlap=overlap)
    ids = tokens(1, 300, seed=21)
    with torch.no_grad():
        logits = model(ids).logits
    expected = naive_logits(model, model.config, ids)
    assert max_err(logits, expected) < TOL64
    # reading 3 blocks is not reading all of memory, so the comparison above can fail
    assert max_err(naive_logits(model, model.config, ids, mem_blocks=None), expected) > 1e-2


def test_decoding_with_block_retrieval_equals_spec():
    model = tiny_model(attn_impl="torch", mem_blocks=2, mem_block_size=8, mem_block_queries=16)
    ids = tokens(1, 200, seed=22)
    steps = tokens(1, 40, seed=23)
    naive = NaiveLongLlama(weights_f64(model), Spec(model.config), policy="slide")
    naive.prefill(ids)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for t in range(steps.shape[1]):  # a step of one token is a chunk of one query
            got = model(steps[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            assert max_err(got, naive.step(steps[:, t:t + 1])) < TOL64


def test_reading_every_block_is_dense_attention():
    dense = tiny_model(attn_impl="torch", window_overlap=16)
    blocks = tiny_model(attn_impl="torch", window_overlap=16, mem_blocks=64, mem_block_size=8, mem_block_queries=7)
    ids = tokens(2, 300, seed=24)
    with torch.no_grad():
        assert max_err(blocks(ids).logits, dense(ids).logits) < TOL64


def test_float32_model_with_block_retrieval_is_close_to_spec():
    model = tiny_model(dtype=torch.float32, attn_impl="torch", mem_blocks=4, mem_block_size=16,
                       mem_block_queries=32)  # fmt: skip
    ids = tokens(1, 300, seed=25)
    with torch.no_grad():
        logits = model(ids).logits
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL32


def test_saved_cache_rebuilds_the_block_index(tmp_path):
    model = tiny_model(attn_impl="torch", mem_blocks=3, mem_block_size=8, mem_block_queries=16)
    ids, more = tokens(1, 300, seed=26), tokens(1, 5, seed=27)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache.save(tmp_path / "cache.safetensors")
        loaded = type(cache).load(tmp_path / "cache.safetensors", model.config)
        want = model(more, past_key_values=cache, use_cache=True).logits
        got = model(more, past_key_values=loaded, use_cache=True).logits
    assert torch.equal(got, want)


def test_block_retrieval_settings_are_checked():
    with pytest.raises(ValueError, match="set one of them to None"):
        tiny_model(mem_blocks=4, mem_top_k=8)
    with pytest.raises(ValueError, match="mem_block_size=0 must be a positive int"):
        tiny_model(mem_blocks=4, mem_block_size=0)
    model = tiny_model(attn_impl="torch", mem_blocks=2, mem_block_size=8).train()
    with pytest.raises(ValueError, match="mem_blocks \\(block retrieval\\) is for inference"):
        model(tokens(1, 100, seed=28))


def test_budget_counts_the_block_bounds():
    model = tiny_model(mem_blocks=4, mem_block_size=8)
    # 100 slots = 13 blocks of 8: two fp32 bound vectors and a flag per block and KV head
    G, H = model.config.num_key_value_heads, model.config.head_dim
    assert index_bytes(model.config, 100) == G * 13 * (2 * H * 4 + 1)
    with torch.no_grad():
        cache = model(tokens(1, 300, seed=29), use_cache=True).past_key_values
    index = cache.searches[model.config.mem_layers[0]]
    assert index.nbytes() >= index_bytes(model.config, 268)


def test_block_retrieval_has_no_triton_path():
    from fot.cache import LongLlamaCache
    from fot.plan import resolve_plan

    config = tiny_model(mem_blocks=2).config
    with pytest.raises(ValueError, match="no Triton kernel; set attn_impl='torch'"):
        resolve_plan(config, LongLlamaCache(config), impl="triton", training=False, crossbatch=False, padded=False,
                     last_context_length=None, cache_policy=None)  # fmt: skip
    plan = resolve_plan(config, LongLlamaCache(config), impl="torch", training=False, crossbatch=False, padded=False,
                        last_context_length=None, cache_policy=None)  # fmt: skip
    assert plan.memory_mode == "block" and plan.attention_kind == "block" and plan.window_group == 1
