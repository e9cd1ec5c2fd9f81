"""Caching and generation: memory growth, incremental decoding under both cache policies, and generate().

Incremental results are compared with the naive decoder of tests/naive.py, which restates the policies:
before a chunk of T tokens attends, if local + T > W, "flush" moves the whole local window to memory (memory
layers) or drops it (other layers); "slide" keeps the most recent min(local, L, W - T) tokens, re-positioned
from 0. Evicted raw keys, values and padding validity enter memory.
"""

import math

import pytest
import torch
from transformers import DynamicCache

import fot
from fot.memory import MemoryStore
from tests.naive import NaiveLongLlama, Spec, weights_f64
from tests.tiny import BF16_MAX, TOL64, close_with_bf16_memory, left_pad_mask, max_err, tiny_model, tokens


def naive_for(model, policy, last_context_length=None):
    return NaiveLongLlama(weights_f64(model), Spec(model.config), policy, last_context_length)


def naive_continue(naive: NaiveLongLlama, ids: torch.Tensor, valid=None) -> torch.Tensor:
    """A call on a non-empty cache (fot.model rule 4): windows of W over the first N - L tokens, then the
    last L tokens, each run as one cache step."""
    N, W, L = ids.shape[1], naive.s.window, naive.L
    n_mem = max(N - L, 0)
    bounds = [(s, min(s + W, n_mem)) for s in range(0, n_mem, W)] + [(n_mem, N)]
    return torch.cat(
        [naive.step(ids[:, s:e], None if valid is None else valid[:, s:e]) for s, e in bounds], dim=1
    )


def naive_greedy(model, ids, k, policy, valid=None, last_context_length=None):
    """Greedy decoding with the naive spec: prefill, then one token at a time (argmax of fp32 logits)."""
    naive = naive_for(model, policy, last_context_length)
    logits = naive.prefill(ids, valid)[:, -1]
    out = []
    for _ in range(k):
        tok = logits.float().argmax(-1, keepdim=True)
        out.append(tok)
        logits = naive.step(tok)[:, -1]
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------- memory store
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_store_keeps_exact_content_and_grows_geometrically(dtype):
    g = torch.Generator().manual_seed(0)
    store = MemoryStore(dtype)
    ks, vs, valids, capacities = [], [], [], []
    total = 0
    for i in range(400):
        t = int(torch.randint(1, 40, (1,), generator=g))
        k = torch.randn(2, 3, t, 4, generator=g)
        v = torch.randn(2, 3, t, 4, generator=g)
        valid = None if i < 200 else torch.rand(2, t, generator=g) > 0.2
        store.append(k, v, valid)
        ks.append(k), vs.append(v), valids.append(torch.ones(2, t, dtype=torch.bool) if valid is None else valid)
        total += t
        capacities.append(store.capacity)
        if i == 199:
            assert store.view().valid_BM is None  # no padding appended yet
    mem = store.view()
    assert store.length == total and mem.k_BGMH.shape == (2, 3, total, 4)
    assert torch.equal(mem.k_BGMH, torch.cat(ks, dim=2).to(dtype))
    assert torch.equal(mem.v_BGMH, torch.cat(vs, dim=2).to(dtype))
    assert torch.equal(mem.valid_BM, torch.cat(valids, dim=1))
    changes = [(a, b) for a, b in zip(capacities, capacities[1:]) if a != b]
    assert total > 7000
    # geometric growth: each reallocation multiplies the capacity (>= 1.2x), so there are O(log n) of them
    assert all(b >= 1.2 * a for a, b in changes), changes
    assert len(changes) <= 2 + math.log(total / 1024) / math.log(1.2) < 20  # vs. 400 appends
    assert total <= store.capacity < 2 * total
    # batch surgery keeps rows intact
    store.select_batch(torch.tensor([1, 1, 0]))
    mem = store.view()
    assert torch.equal(mem.k_BGMH[2], torch.cat(ks, dim=2)[0].to(dtype))
    assert torch.equal(mem.valid_BM[0], torch.cat(valids, dim=1)[1])


# ----------------------------------------------------------------------------- incremental decoding
@pytest.mark.parametrize(
    "policy, impl, overrides",
    [
        ("flush", "torch", {}),
        ("slide", "torch", {}),
        ("flush", "reference", {"num_key_value_heads": 2, "mem_dtype": "bfloat16"}),
        ("slide", "reference", {"num_key_value_heads": 2, "mem_dtype": "bfloat16", "mem_layers": [0, 2]}),
        ("slide", "torch", {"mem_positionals": False, "mem_layers": [0, 1]}),
    ],
)
def test_token_by_token_decoding_equals_spec(policy, impl, overrides):
    model = tiny_model(attn_impl=impl, **overrides)
    ids = tokens(1, 100, seed=11)
    cont = tokens(1, 75, seed=12)  # 32 local + 75 > W=64: at least one eviction
    naive = naive_for(model, policy)
    cache = fot.LongLlamaCache(model.config, cache_policy=policy)
    bf16 = overrides.get("mem_dtype") == "bfloat16"
    tol = BF16_MAX if bf16 else TOL64
    actual, expected = [], []
    with torch.no_grad():
        actual.append(model(ids, past_key_values=cache).logits)
        expected.append(naive.prefill(ids))
        assert max_err(actual[-1], expected[-1]) < tol
        locals_seen = []
        for t in range(cont.shape[1]):
            tok = cont[:, t : t + 1]
            actual.append(model(tok, past_key_values=cache).logits)
            expected.append(naive.step(tok))
            assert max_err(actual[-1], expected[-1]) < tol, f"step {t}"
            assert (cache.local_length, cache.memory_length) == (naive.local_length, naive.memory_length)
            locals_seen.append(cache.local_length)
    if bf16:  # see tests/tiny.py: rare bf16 rounding flips, judged over the whole run
        assert close_with_bf16_memory(torch.cat(actual, dim=1), torch.cat(expected, dim=1))
    assert cache.seen_tokens == 175
    # the saw-tooth of each policy really happened
    if policy == "flush":
        assert 64 in locals_seen and 1 in locals_seen
    else:
        assert 64 in locals_seen and 33 in locals_seen and min(locals_seen) == 33


def test_local_window_buffers_grow_past_their_initial_capacity():
    # W = 320 > the local buffer's initial 256 slots: decoding must grow it without losing content.
    model = tiny_model(max_position_embeddings=320, last_context_length=250, num_hidden_layers=2, mem_layers=[1])
    ids, cont = tokens(1, 300, seed=30), tokens(1, 75, seed=31)
    naive = naive_for(model, "slide")
    cache = fot.LongLlamaCache(model.config)
    with torch.no_grad():
        assert max_err(model(ids, past_key_values=cache).logits, naive.prefill(ids)) < TOL64
        for t in range(cont.shape[1]):
            tok = cont[:, t : t + 1]
            assert max_err(model(tok, past_key_values=cache).logits, naive.step(tok)) < TOL64, f"step {t}"
    assert cache.memory_length == naive.memory_length > 50  # the slide happened too


@pytest.mark.parametrize("policy", ["flush", "slide"])
def test_chunked_continuation_with_padding_equals_spec(policy):
    """Multi-token chunks on a cache; padding from the prefill must stay masked after it moves to memory."""
    model = tiny_model(mem_layers=[0, 1])
    n = 90
    ids = tokens(2, n, seed=13)
    mask = left_pad_mask([n, n - 75], n)  # row 1: pads in a memory window and in the local window
    naive = naive_for(model, policy)
    cache = fot.LongLlamaCache(model.config, cache_policy=policy)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
        assert max_err(logits, naive.prefill(ids, mask.bool()), mask) < TOL64
        seen = n
        for i, t in enumerate([5, 17, 30, 64, 3, 50]):
            chunk = tokens(2, t, seed=20 + i)
            seen += t
            full_mask = torch.cat([mask, torch.ones(2, seen - n, dtype=torch.long)], dim=1)  # [B, seen + new]
            logits = model(chunk, attention_mask=full_mask, past_key_values=cache).logits
            assert max_err(logits, naive_continue(naive, chunk)) < TOL64, f"chunk {i}"
            assert (cache.local_length, cache.memory_length) == (naive.local_length, naive.memory_length)
    assert not bool(cache.memories[0].view().valid_BM[1, :10].any())


def test_long_continuation_is_split_into_windows_then_last_context():
    """fot.model's rule 4: a long call on a non-empty cache runs plan_chunks' pieces as cache steps."""
    model = tiny_model()
    ids, more = tokens(1, 50, seed=14), tokens(1, 150, seed=15)
    naive = naive_for(model, "slide")
    cache = fot.LongLlamaCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        naive.prefill(ids)
        logits = model(more, past_key_values=cache).logits
    expected = torch.cat([naive.step(more[:, s:e]) for s, e in [(0, 64), (64, 118), (118, 150)]], dim=1)
    assert max_err(logits, expected) < TOL64
    assert max_err(logits, naive_for(model, "slide").prefill(more)) > 1e-2  # the cache mattered


def test_slide_keeps_context_that_flush_drops():
    model = tiny_model()
    ids, cont = tokens(1, 64, seed=16), tokens(1, 8, seed=17)  # local is full: the next token overflows
    results = {}
    for policy in ("flush", "slide"):
        naive = naive_for(model, policy)
        cache = fot.LongLlamaCache(model.config, cache_policy=policy)
        with torch.no_grad():
            model(ids, past_key_values=cache, last_context_length=64)
            naive.L = 64
            naive.prefill(ids)
            naive.L = 32  # the slide rule keeps min(local, L, W - T) with the config's L
            results[policy] = model(cont, past_key_values=cache).logits
        assert max_err(results[policy], naive.step(cont)) < TOL64
    assert max_err(results["flush"], results["slide"]) > 1e-2


def test_cache_policy_override_on_forward():
    model = tiny_model(cache_policy="slide")
    ids, cont = tokens(1, 60, seed=18), tokens(1, 10, seed=19)
    naive = naive_for(model, "flush")
    cache = fot.LongLlamaCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, last_context_length=60)
        naive.L = 60
        naive.prefill(ids)
        logits = model(cont, past_key_values=cache, cache_policy="flush").logits
    assert cache.local_length == 10
    assert max_err(logits, naive.step(cont)) < TOL64
    # the override was for that call only: the cache still slides
    assert cache.policy == "slide"
    naive.policy = "slide"
    more = tokens(1, 60, seed=20)  # 10 + 60 > 64: slide keeps min(10, L, 64 - 60) = 4 tokens, flush none
    with torch.no_grad():
        logits = model(more, past_key_values=cache, last_context_length=60).logits
    assert cache.policy == "slide" and cache.local_length == 64
    assert max_err(logits, naive.step(more)) < TOL64


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("policy", ["flush", "slide"])
def test_greedy_generate_equals_manual_loop_and_spec(policy):
    model = tiny_model(mem_layers=[1, 2])
    ids = tokens(1, 100, seed=21)
    k = 40  # local 32 + 40 > W = 64: the local cache overflows during generation
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=k, do_sample=False, cache_policy=policy)
        cache = fot.LongLlamaCache(model.config, cache_policy=policy)
        logits = model(ids, past_key_values=cache).logits[:, -1]
        manual = []
        for _ in range(k):
            tok = logits.float().argmax(-1, keepdim=True)
            manual.append(tok)
            logits = model(tok, past_key_values=cache).logits[:, -1]
    assert torch.equal(out[:, :100], ids)
    assert torch.equal(out[:, 100:], torch.cat(manual, dim=1))
    assert torch.equal(out[:, 100:], naive_greedy(model, ids, k, policy))


def test_policies_generate_differently_after_overflow():
    model = tiny_model(mem_layers=[1, 2])
    ids = tokens(1, 100, seed=21)
    with torch.no_grad():
        flush = model.generate(ids, max_new_tokens=40, do_sample=False, cache_policy="flush")
        slide = model.generate(ids, max_new_tokens=40, do_sample=False, cache_policy="slide")
    assert torch.equal(flush[:, :132], slide[:, :132])  # identical until the first overflow
    assert not torch.equal(flush, slide)


def test_sampling_equals_manual_multinomial_loop():
    model = tiny_model()
    ids = tokens(1, 80, seed=22)
    k, temperature = 40, 0.7
    torch.manual_seed(123)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=k, do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    torch.manual_seed(123)
    cache = fot.LongLlamaCache(model.config)
    manual = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        for _ in range(k):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, num_samples=1)
            manual.append(tok)
            logits = model(tok, past_key_values=cache).logits[:, -1]
    assert torch.equal(out[:, 80:], torch.cat(manual, dim=1))
    assert len(set(out[0, 80:].tolist())) > 5  # really sampled, not greedy-like


def test_top_k_1_sampling_equals_greedy():
    model = tiny_model()
    ids = tokens(1, 100, seed=23)
    with torch.no_grad():
        sampled = model.generate(ids, max_new_tokens=35, do_sample=True, top_k=1)
    assert torch.equal(sampled[:, 100:], naive_greedy(model, ids, 35, "slide"))


def test_beam_search_equals_brute_force_beam_search_on_the_spec():
    model = tiny_model(mem_layers=[1, 2])
    ids = tokens(1, 90, seed=24)
    beams, k = 3, 8
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=k, num_beams=beams, num_return_sequences=beams, do_sample=False,
            length_penalty=0.0, early_stopping=True, output_scores=True, return_dict_in_generate=True,
            cache_policy="flush", last_context_length=60,  # 60 + 8 > 64: beams overflow and flush
        )
    # brute force: every step extend every beam by every token, keep the best `beams` cumulative log-probs
    root = naive_for(model, "flush", last_context_length=60)
    first = root.prefill(ids)[:, -1]
    frontier = [(0.0, [], root, first)]
    for _ in range(k):
        candidates = []
        for score, toks, state, logits in frontier:
            logp = torch.log_softmax(logits.float(), dim=-1)[0]
            for tok in range(logp.shape[0]):
                candidates.append((score + logp[tok].item(), toks + [tok], state))
        candidates.sort(key=lambda c: -c[0])
        frontier = []
        for score, toks, state in candidates[:beams]:
            child = state.clone()
            frontier.append((score, toks, child, child.step(torch.tensor([[toks[-1]]]))[:, -1]))
    expected = torch.tensor([toks for _, toks, _, _ in frontier])
    assert torch.equal(out.sequences[:, 90:], expected)
    assert torch.allclose(out.sequences_scores.double(), torch.tensor([s for s, *_ in frontier], dtype=torch.float64), atol=1e-4)


def test_batched_generation_with_left_padding_equals_spec():
    model = tiny_model(mem_layers=[0, 1])
    n = 100
    ids = tokens(2, n, seed=25)
    mask = left_pad_mask([n, n - 70], n)
    ids[1, :70] = 0  # pad token
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, cache_policy="flush")
    assert torch.equal(out[:, n:], naive_greedy(model, ids, 40, "flush", valid=mask.bool()))


def test_padded_row_generates_like_the_unpadded_row_within_one_window():
    # Prompt <= L and no overflow: RoPE is relative, so left padding must not change anything.
    model = tiny_model()
    ids = tokens(2, 30, seed=26)
    mask = left_pad_mask([30, 18], 30)
    ids[1, :12] = 0
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        alone = model.generate(ids[1:, 12:], max_new_tokens=12, do_sample=False)
        first = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(batched[1:, 30:], alone[:, 18:])
    assert torch.equal(batched[:1, 30:], first[:, 30:])


def test_last_context_length_passed_to_generate():
    model = tiny_model()
    ids = tokens(1, 100, seed=27)
    with torch.no_grad():
        one = model.generate(ids, max_new_tokens=1, do_sample=False, last_context_length=16, return_dict_in_generate=True)
        # 16 + 55 > W = 64: the slide after step 48 keeps the override's 16 tokens, not the config's 32
        out = model.generate(ids, max_new_tokens=55, do_sample=False, last_context_length=16, cache_policy="slide")
    cache = one.past_key_values
    assert (cache.local_length, cache.memory_length) == (16, 84)
    assert torch.equal(out[:, 100:], naive_greedy(model, ids, 55, "slide", last_context_length=16))


# ----------------------------------------------------------------------------- errors
def test_forward_rejects_foreign_caches_and_position_ids():
    model = tiny_model()
    ids = tokens(1, 10)
    with pytest.raises(TypeError, match="LongLlamaCache"):
        model(ids, past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="LongLlamaCache"):
        model.generate(ids, max_new_tokens=2, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(10)[None])
    with pytest.raises(ValueError, match="cache_policy"):
        model(ids, cache_policy="lru")
    with pytest.raises(ValueError, match="last_context_length"):
        model(ids, last_context_length=65)
    with pytest.raises(ValueError, match="cache_policy"):
        model(ids, past_key_values=fot.LongLlamaCache(model.config, cache_policy="lru"))


def test_generate_continues_a_prefilled_cache():
    # Multi-turn use: the cache already holds all but the last prompt token; generate feeds only the rest.
    model = tiny_model(mem_layers=[1, 2])
    ids = tokens(1, 120, seed=32)
    cache = fot.LongLlamaCache(model.config, cache_policy="flush")
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
    naive = naive_for(model, "flush")
    naive.prefill(ids[:, :-1])
    logits = naive.step(ids[:, -1:])[:, -1]
    expected = []
    for _ in range(40):
        tok = logits.float().argmax(-1, keepdim=True)
        expected.append(tok)
        logits = naive.step(tok)[:, -1]
    assert torch.equal(out[:, 120:], torch.cat(expected, dim=1))
    assert cache.seen_tokens == 159


def test_cache_batch_surgery_equals_running_the_selected_rows():
    model = tiny_model(mem_layers=[0, 1])
    ids, cont = tokens(2, 110, seed=33), tokens(2, 40, seed=34)
    with torch.no_grad():
        cache = fot.LongLlamaCache(model.config, cache_policy="flush")
        model(ids, past_key_values=cache)
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        cache.reorder_cache(torch.tensor([3, 0, 2, 1]))  # rows 1, 0, 1, 0
        cache.batch_select_indices(torch.tensor([1, 2]))  # rows 0, 1
        order = torch.tensor([0, 1])
        fresh = fot.LongLlamaCache(model.config, cache_policy="flush")
        model(ids[order], past_key_values=fresh)
        for t in range(0, 40, 5):  # crosses the flush at local 64
            chunk = cont[:, t : t + 5]
            assert torch.equal(
                model(chunk, past_key_values=cache).logits, model(chunk, past_key_values=fresh).logits
            )
    # and a non-trivial permutation: rows swapped
    with torch.no_grad():
        swapped = fot.LongLlamaCache(model.config)
        model(ids, past_key_values=swapped)
        swapped.reorder_cache(torch.tensor([1, 0]))
        logits = model(cont, past_key_values=swapped).logits
    naive = naive_for(model, "slide")
    naive.prefill(ids.flip(0))
    assert max_err(logits, naive_continue(naive, cont)) < TOL64  # row 0 continues ids[1], row 1 ids[0]
