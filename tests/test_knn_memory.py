"""kNN memory (issue 3): the store, the search backends, top-k attention in the model, FIFO, clear, persistence,
RAM accounting and bad input.

References used here, each independent of the code under test:
  * ``faiss.knn`` (exact inner-product search) and a float64 brute force, compared TIE-AWARE: two answers agree
    when the sorted scores of what they retrieved agree (which slot wins a tie is arbitrary);
  * ``TopKNaive``: the float64 spec of tests/naive.py extended with top-k retrieval (each query's own top-k
    memory slots by inner product of the ROTATED query with the pre-RoPE key of its KV head, in the same
    softmax as its local keys), a FIFO-bounded memory and row clearing;
  * dense attention (mem_top_k=None) for top-k with k >= memory size, and the unsaved cache for a loaded one.
"""

from __future__ import annotations

import builtins
import math
import sys

import pytest
import torch
from safetensors.torch import save_file

import fot
import fot.search
from fot.cache import save_cache
from fot.memory import MemoryStore
from fot.search import FaissIVFSQ8Search, FaissIVFSearch, default_search_factory, exact_topk, lift_keys, make_search, recall_at_k
from tests.naive import MASKED, NaiveLongLlama, Spec, rotate, weights_f64
from tests.tiny import TOL64, left_pad_mask, max_err, tiny_config, tiny_model, tokens

W, L = 64, 32  # the tiny window and last context length (tests/tiny.py)
N_LONG = L + 3 * W  # three memory windows (192 memory tokens), then the last L tokens


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: a second intra-op thread only adds barrier waits (seconds per test on a busy
    2-core machine), so this module runs torch on one thread and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def faiss1():
    """faiss with one OpenMP thread (the CI machine has 2 cores; torch already uses them)."""
    faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install 'fot[faiss]')")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield faiss
    faiss.omp_set_num_threads(before)


IVF_BACKENDS = {"faiss-ivf": FaissIVFSearch, "faiss-ivf-sq8": FaissIVFSQ8Search}


def small_ivf_factory(rebuild_growth: float = 2):
    """A search factory whose IVF indexes train on tiny memories (64 keys), so the approximate path really runs;
    other backends as configured."""

    def factory(config, layer_idx):
        if config.mem_index in IVF_BACKENDS:
            cls = IVF_BACKENDS[config.mem_index]
            return cls(config.mem_nprobe, min_train=64, rebuild_growth=rebuild_growth)
        return default_search_factory(config, layer_idx)

    return factory


@pytest.fixture
def small_ivf():
    return small_ivf_factory()


def small_ivf_cache(model, factory):
    """A fresh cache for ``model`` whose search backends come from ``factory``."""
    return fot.LongLlamaCache(model.config, search_factory=factory)


def sorted_scores(scores_XM: torch.Tensor, ids_XK: torch.Tensor) -> list[list[float]]:
    """Per query, the float64 scores of the retrieved slots (ids >= 0), sorted descending."""
    out = []
    for x in range(ids_XK.shape[0]):
        ids = ids_XK[x][ids_XK[x] >= 0]
        assert ids.unique().numel() == ids.numel(), f"query {x} retrieved a slot twice: {ids.tolist()}"
        out.append(sorted(scores_XM[x, ids].tolist(), reverse=True))
    return out


def assert_same_topk(ids_XK, ref_XK, scores_XM, atol=1e-5):
    """Tie-aware: same number retrieved per query and the same multiset of (true) scores.

    This implies the k-th scores agree and every retrieved score is >= the other answer's k-th score.
    """
    got, ref = sorted_scores(scores_XM, ids_XK), sorted_scores(scores_XM, ref_XK)
    for x, (a, b) in enumerate(zip(got, ref)):
        assert len(a) == len(b), f"query {x}: retrieved {len(a)} slots, reference {len(b)}"
        assert torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                              atol=atol, rtol=0), f"query {x}: scores {a} vs reference {b}"  # fmt: skip


def brute_topk(q_XH, k_MH, valid_M, k):
    """float64 brute force: ids [X, k] of the best valid slots, -1 where fewer than k are valid."""
    s = q_XH.double() @ k_MH.double().T
    if valid_M is not None:
        s = s.masked_fill(~valid_M[None, :], float("-inf"))
    top = s.topk(min(k, s.shape[1]), dim=1)
    ids = top.indices.masked_fill(torch.isneginf(top.values), -1)
    return torch.nn.functional.pad(ids, (0, k - ids.shape[1]), value=-1)


def ivf_indexes(search) -> list:
    return [head.index for head in search.indexes.values()]


def assert_exact_search(idx_BGXK, q_BGXH, view, k: int) -> None:
    """Row 0's search results equal float64 brute force over every key (tie-aware), for every KV head."""
    for g in range(q_BGXH.shape[1]):
        k_MH = view.k_BGMH[0, g]
        scores = q_BGXH[0, g].double() @ k_MH.double().T
        assert_same_topk(idx_BGXK[0, g], brute_topk(q_BGXH[0, g], k_MH, None, k), scores)


def ivf_sizes(search) -> list[int]:
    """Keys each (row, KV head) index holds: in its lists plus its exactly searched outliers."""
    return [head.index.ntotal + head.outliers.numel() for head in search.indexes.values()]


def set_nprobe(search, nprobe: int) -> None:
    search.nprobe = nprobe
    for index in ivf_indexes(search):
        index.nprobe = nprobe


class TopKNaive(NaiveLongLlama):
    """tests/naive.py's float64 spec plus kNN memory, FIFO-bounded memory and clearing rows.

    * ``top_k``: in a memory layer, query (b, head n, token t) scores every VALID memory slot of KV head
      g = n // R by (rotated q) . (pre-RoPE memory key) / sqrt(H), keeps its own top_k of them and puts those
      scores in one softmax with its local scores (masked local keys score -1e6). None: dense (the base spec).
    * ``max_tokens``: after every write, memory keeps only its most recent max_tokens slots.
    """

    def __init__(self, model, policy="slide", top_k=None, max_tokens=None):
        super().__init__(weights_f64(model), Spec(model.config), policy)
        self.top_k, self.max_tokens = top_k, max_tokens

    def _to_memory(self, st, k, v, valid):
        super()._to_memory(st, k, v, valid)
        if self.max_tokens is not None:
            m = self.max_tokens
            st.mk, st.mv, st.mvalid = st.mk[:, :, -m:], st.mv[:, :, -m:], st.mvalid[:, -m:]

    def clear_rows(self, rows) -> None:
        for idx in self.s.mem_layers:
            self.layers[idx].mvalid[rows] = False

    def _attention(self, idx, x_BTD, valid_BT, memory_bound: bool = False):
        if self.top_k is None or idx not in self.s.mem_layers:
            return super()._attention(idx, x_BTD, valid_BT, memory_bound)
        assert self.s.mem_heads is None, "this top-k spec reads memory with every head"
        s, w, st = self.s, self.w, self.layers[idx]
        p = f"model.layers.{idx}.self_attn."
        B, T, _ = x_BTD.shape
        N, G, H = s.num_heads, s.num_kv_heads, s.head_dim
        q = (x_BTD @ w[p + "q_proj.weight"].T).view(B, T, N, H).transpose(1, 2)
        k = (x_BTD @ w[p + "k_proj.weight"].T).view(B, T, G, H).transpose(1, 2)
        v = (x_BTD @ w[p + "v_proj.weight"].T).view(B, T, G, H).transpose(1, 2)
        keys_raw, values = torch.cat([st.k, k], 2), torch.cat([st.v, v], 2)
        key_valid = torch.cat([st.valid, valid_BT], 1)
        S = keys_raw.shape[2]
        q_pos = list(range(S - T, S))
        q = rotate(q, q_pos, s.theta)
        keys = rotate(keys_raw, list(range(S)), s.theta)
        causal_TS = torch.tensor([[j <= qp for j in range(S)] for qp in q_pos])
        out = torch.zeros(B, N, T, H, dtype=torch.float64)
        M = st.mk.shape[2]
        for b in range(B):
            visible_TS = causal_TS & key_valid[b][None, :]
            for n in range(N):
                g = n // (N // G)  # the KV head of query head n
                sc_TS = (q[b, n] @ keys[b, g].T / math.sqrt(H)).masked_fill(~visible_TS, MASKED)
                if M == 0:
                    out[b, n] = torch.softmax(sc_TS, 1) @ values[b, g]
                    continue
                # every query's own top-k among the VALID slots (an invalid one scores -inf: weight 0)
                msc_TM = q[b, n] @ st.mk[b, g].T / math.sqrt(H)
                msc_TM = msc_TM.masked_fill(~st.mvalid[b][None, :], float("-inf"))
                top = msc_TM.topk(min(self.top_k, M), dim=1)
                probs = torch.softmax(torch.cat([sc_TS, top.values], 1), 1)
                v_sel_TKH = st.mv[b, g][top.indices]
                out[b, n] = probs[:, :S] @ values[b, g] + torch.einsum("tk,tkh->th", probs[:, S:], v_sel_TKH)
        o = out.transpose(1, 2).reshape(B, T, N * H)
        return o @ w[p + "o_proj.weight"].T, k, v


# ----------------------------------------------------------------------------- 1. exact_topk vs faiss.knn
def _knn_case(seed, B=2, G=2, X=17, M=97, H=16, dup=False, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: inner products are exact in fp32, so ties are exact ties
        q = torch.randint(-2, 3, (B, G, X, H), generator=g).float()
        k = torch.randint(-2, 3, (B, G, M, H), generator=g).float()
    else:
        q, k = torch.randn(B, G, X, H, generator=g), torch.randn(B, G, M, H, generator=g)
    if dup:  # every key appears several times: many exactly tied scores
        base = k[:, :, : M // 4 + 1]
        k = base.repeat(1, 1, 4, 1)[:, :, :M][:, :, torch.randperm(M, generator=g)]
    return q, k


@pytest.mark.parametrize(
    "case", [dict(), dict(dup=True), dict(integer=True), dict(integer=True, dup=True), dict(X=3, M=257, H=8)]
)
@pytest.mark.parametrize("block", [16384, 7])  # 7: the blockwise merge of exact_topk across many blocks
@pytest.mark.parametrize("query_block", [128, 4])  # 4: tiles of 4 queries, the last one short (X = 17 or 3)
def test_exact_topk_equals_faiss_knn_tie_aware(faiss1, case, block, query_block):
    q, k = _knn_case(seed=len(case) + block, **case)
    K = 5
    scores, idx = exact_topk(q, k, None, K, block, query_block)
    assert idx.shape == (*q.shape[:3], K) and idx.dtype == torch.long
    n_ties = 0
    for b in range(q.shape[0]):
        for g in range(q.shape[1]):
            true = q[b, g].double() @ k[b, g].double().T  # [X, M]
            _, ref = faiss1.knn(q[b, g].numpy(), k[b, g].numpy(), K, metric=faiss1.METRIC_INNER_PRODUCT)
            assert_same_topk(idx[b, g], torch.from_numpy(ref).long(), true)
            # the returned scores are the retrieved slots' scores, best first
            assert torch.allclose(scores[b, g].double(), true.gather(1, idx[b, g]), atol=1e-5)
            assert (scores[b, g][:, 1:] <= scores[b, g][:, :-1]).all()
            kth = true.gather(1, idx[b, g])[:, -1:]
            n_ties += int(((true - kth).abs() < 1e-9).sum() - kth.numel())
    if case.get("dup") or case.get("integer"):
        assert n_ties > 0  # the case really has ties at the k-th score


@pytest.mark.parametrize("case", [dict(), dict(dup=True), dict(integer=True), dict(invalid=True)])
@pytest.mark.parametrize("group", [2, 3, 8])
def test_select_topk_equals_torch_topk(case, group):
    """The staged selection against torch.topk on rows long enough for two or three stages (min_size 16), with
    ties (repeated or small-integer values), invalid (-inf) values and rows whose length no group size divides:
    the same values best first, at positions that hold them, each position once."""
    from fot.search import select_topk

    g = torch.Generator().manual_seed(group)
    for M in (97, 257, 1000):
        if case.get("integer"):
            s = torch.randint(-3, 4, (13, M), generator=g).float()
        else:
            s = torch.randn(13, M, generator=g)
        if case.get("dup"):
            s = s[:, torch.randint(0, M // 5, (M,), generator=g)]
        if case.get("invalid"):
            s[torch.rand(13, M, generator=g) < 0.7] = float("-inf")
            s[0, 3:] = float("-inf")  # fewer valid values than k
        k = 7
        top, pos = select_topk(s, k, group=group, min_size=16)
        want, _ = s.topk(k, dim=-1)
        assert torch.equal(top, want)
        assert torch.equal(s.gather(-1, pos), top)
        assert all(row.unique().numel() == k for row in pos)


def test_exact_topk_never_retrieves_invalid_slots_and_pads_with_minus_one(faiss1):
    g = torch.Generator().manual_seed(5)
    B, G, X, M, H, K = 3, 2, 11, 50, 8, 6
    q, k = torch.randn(B, G, X, H, generator=g), torch.randn(B, G, M, H, generator=g)
    valid = torch.rand(B, M, generator=g) > 0.5
    valid[1] = False
    valid[1, [3, 40]] = True  # row 1: only 2 valid slots, fewer than K
    valid[2] = False  # row 2: nothing valid at all
    scores, idx = exact_topk(q, k, valid, K, block=13, query_block=3)
    for b in range(B):
        ok = valid[b].nonzero().flatten()
        n = min(K, ok.numel())
        assert (idx[b, :, :, n:] == -1).all() and torch.isneginf(scores[b, :, :, n:]).all()
        assert (idx[b, :, :, :n] >= 0).all()
        assert valid[b][idx[b, :, :, :n]].all()  # never an invalid slot
        for gg in range(G):
            if ok.numel() == 0:
                continue
            _, ref = faiss1.knn(q[b, gg].numpy(), k[b, gg, ok].contiguous().numpy(), n,
                                metric=faiss1.METRIC_INNER_PRODUCT)  # fmt: skip
            ref = ok[torch.from_numpy(ref).long()]  # back to slot numbers
            true = q[b, gg].double() @ k[b, gg].double().T
            assert_same_topk(idx[b, gg, :, :n], ref, true)
    # fewer slots than K altogether
    _, idx = exact_topk(q, k[:, :, :3], None, K)
    assert (idx[..., 3:] == -1).all()
    assert torch.equal(idx[..., :3].sort(-1).values, torch.arange(3).expand(B, G, X, 3))


def _filled_cache(backend, M=200, B=2, G=2, seed=0, window=50, search_factory=default_search_factory, **cfg):
    """A cache whose memory layer 1 holds M random keys appended window by window (through the real wiring)."""
    config = tiny_config(num_key_value_heads=G, mem_top_k=4, mem_index=backend, **cfg)
    cache = fot.LongLlamaCache(config, search_factory=search_factory)
    g = torch.Generator().manual_seed(seed)
    H = config.head_dim
    keys = torch.randn(B, G, M, H, generator=g)
    for s in range(0, M, window):
        chunk = keys[:, :, s : s + window]
        cache.append_memory(1, chunk, torch.randn(chunk.shape, generator=g), None)
    return cache, keys


@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-ivf"])
def test_every_backend_search_equals_brute_force_with_invalid_slots(faiss1, small_ivf, backend):
    cache, _ = _filled_cache(backend, mem_nprobe=4096, search_factory=small_ivf)
    store, search = cache.memories[1], cache.searches[1]
    if backend == "faiss-ivf":
        assert ivf_indexes(search) and all(ix.is_trained for ix in ivf_indexes(search))
        assert set(ivf_sizes(search)) == {200}
        set_nprobe(search, max(ix.nlist for ix in ivf_indexes(search)))  # every list: exact
    g = torch.Generator().manual_seed(1)
    cache.clear_memory(rows=[1])
    store.valid_BM[0, :200] = torch.rand(200, generator=g) > 0.3  # row 0: a random validity mask
    store.valid_BM[1, [7, 150]] = True  # row 1: two valid slots, fewer than K
    view = store.view()
    q = torch.randn(2, 2, 9, store.k_BGMH.shape[-1], generator=g)
    K = 4
    idx = search.search(q, view, K)
    for b in range(2):
        for gg in range(2):
            ref = brute_topk(q[b, gg], view.k_BGMH[b, gg], view.valid_BM[b], K)
            got = idx[b, gg]
            assert ((got == -1) | view.valid_BM[b][got.clamp(min=0)]).all()
            assert_same_topk(got, ref, q[b, gg].double() @ view.k_BGMH[b, gg].double().T)
    assert (idx[1, :, :, 2:] == -1).all()


# ----------------------------------------------------------------------------- 2. k >= memory size == dense
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8"])
def test_top_k_at_least_memory_size_equals_dense(faiss1, small_ivf, backend, impl):
    ids = tokens(2, N_LONG, seed=7)
    mask = left_pad_mask([N_LONG, N_LONG - 70], N_LONG)  # row 1 has padding in memory (invalid slots)
    dense = tiny_model(attn_impl=impl, num_key_value_heads=2)
    nlist = FaissIVFSearch.nlist_for(W)  # the IVF index trains once, on the first window (64 keys)
    knn = tiny_model(attn_impl=impl, num_key_value_heads=2, mem_top_k=N_LONG, mem_index=backend, mem_nprobe=nlist)
    with torch.no_grad():
        expected = dense(ids, attention_mask=mask).logits
        out = knn(ids, attention_mask=mask, past_key_values=small_ivf_cache(knn, small_ivf))
        assert max_err(out.logits, expected, mask) < TOL64
        if backend in IVF_BACKENDS:  # the approximate index really ran, visiting every list
            idx = ivf_indexes(out.past_key_values.searches[1])
            assert idx and all(ix.nlist == nlist and ix.nprobe == nlist for ix in idx)
        # the comparison can fail: with a small k the same backend is not dense
        knn.config.mem_top_k = 2
        small_k = knn(ids, attention_mask=mask, past_key_values=small_ivf_cache(knn, small_ivf)).logits
        assert max_err(small_k, expected, mask) > 1e-3


# ----------------------------------------------------------------------------- 3. top-k semantics vs float64 spec
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_top_k_model_equals_float64_top_k_spec_with_gqa(impl):
    model = tiny_model(attn_impl=impl, num_key_value_heads=2, mem_layers=[1, 2], mem_top_k=3, mem_index="exact")
    n = N_LONG + 17
    ids = tokens(2, n, seed=3)
    mask = left_pad_mask([n, n - 40], n)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    expected = TopKNaive(model, top_k=3).prefill(ids, mask.bool())
    assert max_err(logits, expected, mask) < TOL64
    # top-k matters here: the dense spec is far away, so the comparison above can fail
    dense = TopKNaive(model).prefill(ids, mask.bool())
    assert max_err(dense, expected, mask) > 1e-2


# ----------------------------------------------------------------------------- 4. approximate recall, updates
def _recall(ids_XK, ref_XK) -> float:
    hits = (ids_XK[:, :, None] == ref_XK[:, None, :]).any(-1) & (ids_XK >= 0)
    return hits.sum().item() / (ref_XK >= 0).sum().item()


def test_recall_at_k_is_tie_aware():
    """``recall_at_k`` (the benchmarks' recall) against a float64 brute force: a key tied with the k-th best
    is a hit whatever its slot, a worse key or a missing (-1) slot is not, rows with fewer than k keys count
    only what exists, and the recall of an id-for-id copy of the exact answer is 1."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    keys[0, 0, 10:13] = keys[0, 0, 5]  # four identical keys in head 0
    q = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    q[0, 0, 0] = keys[0, 0, 5] * 3  # head 0, query 0: the four copies are its top 4
    k = 3
    scores, idx = exact_topk(q.float(), keys.float(), None, k)
    assert recall_at_k(q, keys, idx, scores) == (2 * 6 * k, 2 * 6 * k)
    exact_set = set(idx[0, 0, 0].tolist())
    spare = ({5, 10, 11, 12} - exact_set).pop()  # the tied copy the exact search left out
    found = idx.clone()
    found[0, 0, 0, 0] = spare  # tied: still a hit
    assert recall_at_k(q, keys, found, scores) == (2 * 6 * k, 2 * 6 * k)
    brute = q[0, 1, 1] @ keys[0, 1].T  # float64 ranking of head 1, query 1
    worst = int(brute.argmin())
    found[0, 1, 1, 2] = worst  # strictly below the k-th best: a miss
    found[0, 1, 2, 0] = -1  # nothing found: a miss
    assert float(brute[worst]) < float(brute.sort(descending=True).values[k - 1])
    assert recall_at_k(q, keys, found, scores) == (2 * 6 * k - 2, 2 * 6 * k)
    short_scores = scores.clone()
    short_scores[0, 1, 3, 1:] = float("-inf")  # a row where only one key exists
    assert recall_at_k(q, keys, found, short_scores) == (2 * 6 * k - 2 - 2, 2 * 6 * k - 2)


@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [2, 300])  # one advanced-indexing call / per-head index_select into the output
def test_gather_memory_returns_each_querys_slots_of_its_kv_head(mem_dtype, T):
    from fot.attention import MemoryKV, gather_memory

    g = torch.Generator().manual_seed(3)
    B, G, R, M, H, K = 2, 2, 3, 50, 8, 7
    keys, values = (torch.randn(B, G, M, H, generator=g).to(mem_dtype) for _ in range(2))
    idx = torch.randint(-1, M, (B, G * R, T, K), generator=g)
    k_sel, v_sel = gather_memory(MemoryKV(keys, values, None), idx, torch.float32)
    assert k_sel.dtype == v_sel.dtype == torch.float32 and k_sel.shape == (B, G * R, T, K, H)
    for b in range(B):
        for n in range(G * R):
            slots = idx[b, n].clamp(min=0)  # -1 reads slot 0; attention masks it
            assert torch.equal(k_sel[b, n], keys[b, n // R][slots].float())
            assert torch.equal(v_sel[b, n], values[b, n // R][slots].float())


def test_top_k_gathers_reuse_one_scratch_buffer_without_changing_results():
    """A prefill's top-k gathers all write into the cache's scratch (allocated once, not per block), and no
    output aliases it: later blocks overwriting the buffer leave earlier windows' results intact."""
    from fot.cache import GatherScratch

    class RecordingScratch(GatherScratch):
        def __init__(self):
            super().__init__()
            self.buffers = []

        def take(self, shape, dtype, device):
            k, v = super().take(shape, dtype, device)
            self.buffers.append(k.untyped_storage().data_ptr())
            return k, v

    model = tiny_model(mem_layers=[0, 2], mem_top_k=24, dtype=torch.float32)  # 64 x 24 rows: index_select
    ids = tokens(2, 6 * W + 200, seed=8)  # 6 windows to memory, then 200 tokens: blocks of 128 queries
    with torch.no_grad():
        reused = model(ids, past_key_values=fot.LongLlamaCache(model.config, gather_scratch=RecordingScratch))
    buffers = reused.past_key_values.scratch.buffers
    assert len(buffers) > 10 and len(set(buffers)) == 1
    with torch.no_grad():  # fresh tensors for every gather instead
        fresh = model(ids, past_key_values=fot.LongLlamaCache(model.config, gather_scratch=lambda: None))
    assert fresh.past_key_values.scratch is None
    assert torch.equal(reused.logits, fresh.logits)
    assert isinstance(fot.LongLlamaCache(model.config).scratch, GatherScratch)  # the default


def test_ivf_recall_grows_with_nprobe_and_is_exact_at_nlist(faiss1, small_ivf):
    cache, _ = _filled_cache("faiss-ivf", M=512, B=1, G=2, window=512, mem_nprobe=1, search_factory=small_ivf)
    store, search = cache.memories[1], cache.searches[1]
    nlist = ivf_indexes(search)[0].nlist
    assert nlist == FaissIVFSearch.nlist_for(512) and nlist >= 16
    q = torch.randn(1, 2, 200, store.k_BGMH.shape[-1], generator=torch.Generator().manual_seed(9))
    view, K = store.view(), 10
    ref = [brute_topk(q[0, g], view.k_BGMH[0, g], None, K) for g in range(2)]
    recalls = {}
    for nprobe in [1, 2, 4, 8, 16, 32, nlist]:
        set_nprobe(search, nprobe)
        idx = search.search(q, view, K)
        recalls[nprobe] = sum(_recall(idx[0, g], ref[g]) for g in range(2)) / 2
    values = [recalls[p] for p in sorted(recalls)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])), recalls
    assert recalls[nlist] == 1.0
    assert 0.0 < recalls[1] < 0.9, recalls  # nprobe=1 is genuinely approximate on random keys


def test_ivf_sq8_lists_rank_like_brute_force_in_a_quarter_of_the_bytes(faiss1, small_ivf):
    """faiss-ivf-sq8 against float64 brute force and against faiss-ivf on the same keys, every list probed: its
    8-bit lists only perturb the order of near-equal scores (recall@10 >= 0.9, where random keys in 16 dims leave
    little gap at the 10th score), it returns valid distinct slots, and it keeps one byte per lifted column (H + 1
    padded to a multiple of 8, where FAISS scans 8-bit codes with SIMD) in its lists where faiss-ivf keeps 4 (H + 1)."""
    K = 10
    caches = {b: _filled_cache(b, M=1024, B=1, G=2, window=256, mem_nprobe=4096, search_factory=small_ivf)
              for b in IVF_BACKENDS}  # fmt: skip
    (flat, keys), (sq8, keys_sq8) = caches["faiss-ivf"], caches["faiss-ivf-sq8"]
    assert torch.equal(keys, keys_sq8)
    view = sq8.memories[1].view()
    q = torch.randn(1, 2, 200, keys.shape[-1], generator=torch.Generator().manual_seed(12))
    recall = {}
    for name, cache in (("faiss-ivf", flat), ("faiss-ivf-sq8", sq8)):
        search = cache.searches[1]
        set_nprobe(search, max(ix.nlist for ix in ivf_indexes(search)))
        idx = search.search(q, view, K)
        ref = [brute_topk(q[0, g], view.k_BGMH[0, g], None, K) for g in range(2)]
        recall[name] = sum(_recall(idx[0, g], ref[g]) for g in range(2)) / 2
        sorted_scores(q[0, 0].double() @ view.k_BGMH[0, 0].double().T, idx[0, 0])  # asserts distinct slots
        assert (idx >= 0).all()
    assert recall["faiss-ivf"] == 1.0 and 0.9 <= recall["faiss-ivf-sq8"] < 1.0, recall
    f, s8 = (c.searches[1] for c in (flat, sq8))
    H1 = keys.shape[-1] + 1
    width = -(-H1 // 8) * 8
    for search, d, code in ((f, H1, 4 * H1), (s8, width, width)):
        assert all(h.index.d == d for h in search.indexes.values())
        expected = sum(h.index.ntotal * (code + 8) + h.index.nlist * d * 4 + h.outliers.numel() * 8
                       for h in search.indexes.values())  # fmt: skip
        assert search.nbytes() == expected
    assert s8.nbytes() < 0.5 * f.nbytes()


def test_ivf_incremental_appends_are_findable_without_retraining(faiss1):
    cache, _ = _filled_cache("faiss-ivf", M=128, B=1, G=2, window=64, mem_nprobe=1,
                             search_factory=small_ivf_factory(rebuild_growth=4))  # fmt: skip
    store, search = cache.memories[1], cache.searches[1]
    trained = ivf_indexes(search)
    assert search.trained_at == 64 and set(ivf_sizes(search)) == {128}  # window 2 was added, untrained
    g = torch.Generator().manual_seed(4)
    # the longest keys so far (each its own top-1), yet within the lifting bound: no rebuild
    new = torch.nn.functional.normalize(torch.randn(1, 2, 40, store.k_BGMH.shape[-1], generator=g), dim=-1)
    new = new * 1.1 * store.view().k_BGMH.norm(dim=-1).max()
    cache.append_memory(1, new, torch.randn(new.shape, generator=g), None)
    assert all(a is b for a, b in zip(ivf_indexes(search), trained)) and search.trained_at == 64  # not retrained
    assert set(ivf_sizes(search)) == {168}
    # nprobe=1: a query equal to a new key probes the list that key was assigned to, and finds it first
    idx = search.search(new, store.view(), 3)
    assert torch.equal(idx[0, :, :, 0], torch.arange(128, 168).expand(2, 40))
    set_nprobe(search, trained[0].nlist)
    q = torch.randn(1, 2, 30, new.shape[-1], generator=g)
    view = store.view()
    idx = search.search(q, view, 5)
    assert_exact_search(idx, q, view, 5)


def test_ivf_lists_hold_each_key_at_its_nearest_centroid(faiss1, small_ivf):
    """Keys enter the lists chosen by fot's own assignment (one GEMM, then ``add_core``): each listed key's
    centroid is its nearest in float64, and lists plus outliers hold every slot once (trained at 64, 128 and
    256 keys, with windows added in between)."""
    from faiss.contrib.inspect_tools import get_invlist

    cache, _ = _filled_cache("faiss-ivf", M=320, B=1, G=2, window=64, mem_nprobe=1, search_factory=small_ivf)
    store, search = cache.memories[1], cache.searches[1]
    for (_, g), head in search.indexes.items():
        index = head.index
        lifted = torch.from_numpy(lift_keys(store.view().k_BGMH[0, g], search.bound_sq)).double()
        centroids = torch.from_numpy(index.quantizer.reconstruct_n(0, index.nlist)).double()
        dist = torch.cdist(lifted, centroids).pow(2)  # [M, nlist]
        seen = [head.outliers]
        for list_no in range(index.nlist):
            ids = torch.from_numpy(get_invlist(index.invlists, list_no)[0]).long()
            assert torch.all(dist[ids, list_no] <= dist[ids].min(1).values + 1e-4), list_no
            seen.append(ids)
        assert torch.equal(torch.cat(seen).sort().values, torch.arange(320))


def test_ivf_retrains_with_more_lists_when_memory_has_grown(faiss1, small_ivf):
    cache, _ = _filled_cache("faiss-ivf", M=320, B=1, G=2, window=64, mem_nprobe=4096, search_factory=small_ivf)
    store, search = cache.memories[1], cache.searches[1]
    # trained at 64 keys, then retrained each time memory doubled (IVF_REBUILD_GROWTH): at 128 and 256 keys
    assert search.rebuild_growth == 2 and search.trained_at == 256
    indexes = ivf_indexes(search)
    assert len(indexes) == 2
    assert all(ix.nlist == FaissIVFSearch.nlist_for(256) > FaissIVFSearch.nlist_for(64) for ix in indexes)
    assert set(ivf_sizes(search)) == {320}  # the window after the retraining was added too
    q = torch.randn(1, 2, 25, store.k_BGMH.shape[-1], generator=torch.Generator().manual_seed(8))
    view = store.view()
    idx = search.search(q, view, 6)  # nprobe >= nlist: exact
    assert_exact_search(idx, q, view, 6)


def test_ivf_keys_far_from_every_centroid_are_searched_exactly(faiss1):
    """Keys of a direction k-means never saw go to the outliers, which every query searches exactly: with one
    probed list, queries along those keys still get them first, merged with the lists' candidates by score."""
    cache, _ = _filled_cache("faiss-ivf", M=128, B=1, G=2, window=64, mem_nprobe=1,
                             search_factory=small_ivf_factory(rebuild_growth=4))  # fmt: skip
    store, search = cache.memories[1], cache.searches[1]
    H = store.k_BGMH.shape[-1]
    g = torch.Generator().manual_seed(11)
    keys = store.view().k_BGMH
    direction = torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    spread = 0.02 * torch.randn(1, 2, 8, H, generator=g)
    # a tight new cluster, within the lifting bound
    new = torch.nn.functional.normalize(direction + spread, dim=-1) * 1.1 * keys.norm(dim=-1).max()
    cache.append_memory(1, new, torch.randn(new.shape, generator=g), None)
    assert search.trained_at == 64  # no rebuild: the new keys are within the lifting bound
    heads = list(search.indexes.values())
    assert all(set(range(128, 136)) <= set(h.outliers.tolist()) for h in heads)
    view = store.view()
    q = direction.expand(1, 2, 5, H) * 3.0
    idx = search.search(q, view, 8)
    assert_exact_search(idx, q, view, 8)
    assert all(set(row) == set(range(128, 136)) for row in idx[0].reshape(-1, 8).tolist())
    # without the outlier search, one probed list misses them
    saved = [h.outliers for h in heads]
    for h in heads:
        h.outliers = torch.zeros(0, dtype=torch.long)
    search._padded = None  # the search's padded copy of the outliers
    missed = search.search(q, view, 8)
    assert not set(range(128, 136)) <= set(missed[0, 0, 0].tolist())
    for h, o in zip(heads, saved):
        h.outliers = o
    search._padded = None


def test_ivf_rebuilds_when_a_key_is_longer_than_the_lifting_bound(faiss1):
    cache, _ = _filled_cache("faiss-ivf", M=128, B=1, G=2, window=64, mem_nprobe=4096,
                             search_factory=small_ivf_factory(rebuild_growth=4))  # fmt: skip
    store, search = cache.memories[1], cache.searches[1]
    before = ivf_indexes(search)
    g = torch.Generator().manual_seed(12)
    new = 10 * torch.randn(1, 2, 16, store.k_BGMH.shape[-1], generator=g)  # far beyond 1.25x the longest key
    cache.append_memory(1, new, torch.randn(new.shape, generator=g), None)
    assert search.trained_at == 144 and all(a is not b for a, b in zip(ivf_indexes(search), before))
    assert search.bound_sq >= float(new.pow(2).sum(-1).max())
    q = torch.randn(1, 2, 20, new.shape[-1], generator=g)
    view = store.view()
    idx = search.search(q, view, 7)
    assert_exact_search(idx, q, view, 7)


def test_ivf_fifo_eviction_never_returns_evicted_keys(faiss1, small_ivf):
    m = 150
    cache, keys = _filled_cache("faiss-ivf", M=140, B=1, G=2, window=70, mem_max_tokens=m, mem_nprobe=4096,
                                search_factory=small_ivf)  # fmt: skip
    store, search = cache.memories[1], cache.searches[1]
    assert ivf_indexes(search)
    nlist = ivf_indexes(search)[0].nlist
    set_nprobe(search, nlist)
    g = torch.Generator().manual_seed(11)
    old = keys[:, :, :60].clone()  # the 60 oldest keys will be evicted (140 + 70 = 210 > 150)
    new = torch.randn(1, 2, 70, keys.shape[-1], generator=g)
    cache.append_memory(1, new, torch.randn(new.shape, generator=g), None)
    assert store.length == m and store.total_appended == 210
    view = store.view()
    current = view.k_BGMH
    # the store holds exactly keys 60..139 and the 70 new ones
    held = torch.cat([keys[:, :, 60:], new], dim=2)
    for gg in range(2):
        assert torch.equal(current[0, gg].sort(0).values, held[0, gg].sort(0).values)
    assert set(ivf_sizes(search)) == {m}  # evicted vectors were removed, not kept
    q = torch.cat([old, torch.randn(1, 2, 20, keys.shape[-1], generator=g)], dim=2)
    idx = search.search(q, view, 5)
    for gg in range(2):
        got = idx[0, gg]
        assert ((got >= 0) & (got < m)).all()
        true = q[0, gg].double() @ current[0, gg].double().T
        assert_same_topk(got, brute_topk(q[0, gg], current[0, gg], None, 5), true)


# ----------------------------------------------------------------------------- 5. FIFO
@pytest.mark.parametrize("top_k, impl", [(None, "torch"), (None, "reference"), (3, "torch")])
def test_fifo_model_equals_spec_keeping_the_last_m_tokens(top_k, impl):
    m = 100  # not a multiple of the window: the ring wraps in the middle of a window
    model = tiny_model(attn_impl=impl, num_key_value_heads=2, mem_max_tokens=m, mem_top_k=top_k)
    n = L + 5 * W
    ids = tokens(1, n, seed=12)
    with torch.no_grad():
        out = model(ids)
    assert out.past_key_values.memory_length == m and out.past_key_values.memories[1].next_slot != 0
    expected = TopKNaive(model, top_k=top_k, max_tokens=m).prefill(ids)
    assert max_err(out.logits, expected) < TOL64
    unbounded = TopKNaive(model, top_k=top_k).prefill(ids)
    assert max_err(unbounded, expected) > 1e-2  # eviction changes the answer, so the check can fail


def test_fifo_decoding_evicts_the_oldest_tokens():
    m = 100
    model = tiny_model(num_key_value_heads=2, mem_max_tokens=m)
    ids = tokens(2, N_LONG, seed=13)
    naive = TopKNaive(model, policy="slide", max_tokens=m)
    naive.prefill(ids)
    with torch.no_grad():
        cache = model(ids).past_key_values
        nxt = tokens(2, 80, seed=14)
        for t in range(80):  # slides twice: evicted local tokens push the oldest memory out
            got = model(nxt[:, t : t + 1], past_key_values=cache).logits
            assert max_err(got, naive.step(nxt[:, t : t + 1])) < TOL64
    assert cache.memory_length == m


@pytest.mark.parametrize("m", [100, 1500])
def test_store_ring_holds_exactly_the_last_m_appended(m):
    g = torch.Generator().manual_seed(m)
    store = MemoryStore(torch.float32, max_tokens=m)
    B, G, H = 2, 1, 2
    ids_so_far, valid_so_far = [], []
    counter = 0
    for step in range(60):
        T = int(torch.randint(1, 120, (1,), generator=g)) if step != 30 else m + 37  # one append larger than m
        k = torch.zeros(B, G, T, H)
        k[..., 0] = torch.arange(counter, counter + T, dtype=torch.float32)  # unique id per token
        k[..., 1] = torch.randn(B, G, T, generator=g)
        valid = torch.rand(B, T, generator=g) > 0.2 if step % 3 == 0 else None
        slots = store.append(k, -k, valid)
        counter += T
        ids_so_far += list(range(counter - T, counter))
        valid_so_far.append(torch.ones(B, T, dtype=torch.bool) if valid is None else valid)
        # the returned slots hold the newest min(T, m) tokens, in order
        kept = min(T, m)
        assert torch.equal(store.k_BGMH[:, :, slots.long(), 0], k[:, :, -kept:, 0])
        view = store.view()
        n = min(counter, m)
        assert store.length == n and view.k_BGMH.shape[2] == n
        ids = view.k_BGMH[0, 0, :, 0].long()
        assert sorted(ids.tolist()) == ids_so_far[-n:]  # exactly the last m, as a set
        assert torch.equal(view.v_BGMH, -view.k_BGMH)
        all_valid = torch.cat(valid_so_far, dim=1)
        want = all_valid[:, ids]  # validity follows each token to its slot
        got = torch.ones_like(want) if view.valid_BM is None else view.valid_BM
        assert torch.equal(got, want)
    assert store.total_appended == counter


# ----------------------------------------------------------------------------- 6. clear(rows)
@pytest.mark.parametrize("backend", [None, "exact", "faiss-flat", "faiss-ivf"])
def test_clear_row_forgets_only_that_rows_memory(faiss1, small_ivf, backend):
    top_k = None if backend is None else 3
    model = tiny_model(num_key_value_heads=2, mem_top_k=top_k, mem_index=backend or "exact", mem_nprobe=4096)
    ids = tokens(2, N_LONG, seed=21)
    with torch.no_grad():
        cache = model(ids, past_key_values=small_ivf_cache(model, small_ivf)).past_key_values
        n_mem = cache.memory_length
        if backend == "faiss-ivf":
            assert ivf_indexes(cache.searches[1])  # trained: the approximate index answers
        kept = TopKNaive(model, top_k=top_k)
        kept.prefill(ids)
        cleared = kept.clone()
        cleared.clear_rows([0])
        cache.clear_memory(rows=[0])
        nxt = tokens(2, 36, seed=22)
        for t in range(36):  # step 33 slides the window: new tokens then enter row 0's memory again
            step = nxt[:, t : t + 1]
            got = model(step, past_key_values=cache).logits
            want_kept, want_cleared = kept.step(step), cleared.step(step)
            assert max_err(got[0], want_cleared[0]) < TOL64  # row 0: as if it had no memory
            assert max_err(got[1], want_kept[1]) < TOL64  # row 1: unchanged
            if t == 0:
                assert max_err(want_kept[0], want_cleared[0]) > 1e-3  # clearing matters for row 0
        valid = cache.memories[1].view().valid_BM
        assert not valid[0, :n_mem].any() and valid[0, n_mem:].all() and valid[1].all()


# ----------------------------------------------------------------------------- 7. persistence
def _greedy_steps(model, cache, first_BT, n):
    """Greedy decoding from ``cache``: logits of every step [B, n, V] (fp64) and the tokens fed."""
    tok, logits, fed = first_BT, [], []
    for _ in range(n):
        fed.append(tok)
        out = model(tok, past_key_values=cache).logits[:, -1:]
        logits.append(out)
        tok = out.argmax(-1)
    return torch.cat(logits, 1), torch.cat(fed, 1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(mem_top_k=3),
        dict(mem_top_k=3, mem_max_tokens=100, num_key_value_heads=2),
        dict(mem_dtype="bfloat16"),
    ],
    ids=["dense", "topk-exact", "topk-fifo-gqa", "dense-bf16"],
)
def test_save_load_round_trip_continues_identically(tmp_path, overrides):
    model = tiny_model(**overrides)
    ids = tokens(2, N_LONG + 5, seed=31)
    mask = left_pad_mask([N_LONG + 5, N_LONG - 20], N_LONG + 5)
    path = tmp_path / "doc.fotcache"
    with torch.no_grad():
        cache = model(ids, attention_mask=mask).past_key_values
        cache.save(path)
        loaded = fot.LongLlamaCache.load(path, model.config)
        assert loaded.seen_tokens == cache.seen_tokens and loaded.local_length == cache.local_length
        for i, store in cache.memories.items():
            twin = loaded.memories[i]
            counters = lambda st: (st.length, st.next_slot, st.total_appended)  # noqa: E731
            assert counters(twin) == counters(store)
            assert torch.equal(twin.view().k_BGMH, store.view().k_BGMH) and twin.view().k_BGMH.dtype == store.dtype
        first = tokens(2, 1, seed=32)
        # 40 greedy steps: the local window slides (memory grows; with FIFO the ring evicts from next_slot)
        want, fed = _greedy_steps(model, cache, first, 40)
        got, fed_loaded = _greedy_steps(model, loaded, first, 40)
    assert torch.equal(fed, fed_loaded)
    assert max_err(got, want) < 1e-12
    assert cache.memory_length == loaded.memory_length and cache.seen_tokens == loaded.seen_tokens
    if model.config.mem_max_tokens:
        assert cache.memories[1].total_appended > N_LONG  # the continuation really evicted


@pytest.mark.parametrize("backend", list(IVF_BACKENDS))
def test_faiss_ivf_cache_reloads_with_bitwise_identical_logits(faiss1, small_ivf, tmp_path, backend):
    """The IVF index is saved with the cache: retraining it on load (on all of memory at once, where the saved
    one was trained on part of it and then extended) retrieves other slots and changes the logits."""
    model = tiny_model(num_key_value_heads=2, mem_top_k=3, mem_index=backend, mem_nprobe=2)
    ids = tokens(2, N_LONG + 5, seed=35)
    path = tmp_path / "ivf.fotcache"
    with torch.no_grad():
        cache = model(ids, past_key_values=small_ivf_cache(model, small_ivf)).past_key_values
        search = cache.searches[1]
        assert ivf_indexes(search) and search.trained_at < cache.memory_length  # extended after its training
        cache.save(path)
        saved_length = cache.memory_length
        loaded = fot.LongLlamaCache.load(path, model.config, search_factory=small_ivf)
        twin = loaded.searches[1]
        assert (twin.trained_at, twin.bound_sq) == (search.trained_at, search.bound_sq)
        first = tokens(2, 1, seed=36)
        want, fed = _greedy_steps(model, cache, first, 40)
        got, fed_loaded = _greedy_steps(model, loaded, first, 40)
    assert torch.equal(fed, fed_loaded) and torch.equal(got, want)
    exact = fot.LongLlamaCache.load(path, tiny_config(num_key_value_heads=2, mem_top_k=3, mem_index="exact"))
    assert exact.memory_length == saved_length  # another backend reads the same file (no index state)


def _saved(tmp_path, **overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():
        cache = model(tokens(1, N_LONG, seed=33)).past_key_values
    path = tmp_path / "c.safetensors"
    cache.save(path)
    return model, cache, path


def test_byte_flipped_tensor_data_is_reported_corrupt(tmp_path):
    model, _, path = _saved(tmp_path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, raw tensors
    start = 8 + header_len
    for pos in [start, start + (len(data) - start) // 2, len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="corrupt"):
            fot.LongLlamaCache.load(path, model.config)
    path.write_bytes(data)
    fot.LongLlamaCache.load(path, model.config)  # the pristine file loads


def test_byte_flipped_header_counter_is_an_error(tmp_path):
    model, cache, path = _saved(tmp_path, mem_max_tokens=100)
    store = cache.memories[1]
    data = path.read_bytes()
    needle = f'\\"next_slot\\": {store.next_slot}'.encode()
    assert data.count(needle) == 1, data[:400]
    pos = data.index(needle) + len(needle) - 1
    bad = bytearray(data)
    bad[pos] = ord("0") if bad[pos] != ord("0") else ord("1")  # one digit of next_slot changes
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupt"):  # today: loads with next_slot off by a few slots
        fot.LongLlamaCache.load(path, model.config)


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("mem_layers", dict(mem_layers=[2])),
        ("num_key_value_heads", dict(num_key_value_heads=2)),
        ("mem_dtype", dict(mem_dtype="bfloat16")),
        ("mem_max_tokens", dict(mem_max_tokens=500)),
        ("rope_theta", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    ],
)
def test_cache_for_a_different_config_is_refused_naming_the_field(tmp_path, field, overrides):
    _, _, path = _saved(tmp_path)
    with pytest.raises(ValueError, match=field):
        fot.LongLlamaCache.load(path, tiny_config(**overrides))
    fot.LongLlamaCache.load(path, tiny_config(mem_top_k=5))  # the search backend is not part of the fingerprint


def test_non_fot_files_are_refused_clearly(tmp_path):
    config = tiny_config()
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="not a fot cache"):
        fot.LongLlamaCache.load(plain, config)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(ValueError, match="not a readable fot cache"):
        fot.LongLlamaCache.load(junk, config)
    with pytest.raises(ValueError, match="not a readable fot cache"):
        fot.LongLlamaCache.load(tmp_path / "missing.safetensors", config)


def _disk_full_writer(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)  # the temp file is written in full ...
    with open(filename, "r+b") as f:
        f.truncate(100)  # ... then the disk "fills up" halfway through
    raise OSError(28, "No space left on device")


def test_save_is_atomic_when_writing_fails(tmp_path):
    model, cache, path = _saved(tmp_path)
    before = path.read_bytes()
    with torch.no_grad():
        model(tokens(1, 5, seed=34), past_key_values=cache)  # the cache changed since it was saved
    with pytest.raises(OSError):
        save_cache(cache, path, writer=_disk_full_writer)
    assert path.read_bytes() == before  # the old file is intact ...
    fot.LongLlamaCache.load(path, model.config)  # ... and still loads
    fresh = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        save_cache(cache, fresh, writer=_disk_full_writer)
    assert not fresh.exists()  # no partial file at a new target either


def test_failed_save_leaves_no_temp_file(tmp_path):
    _, cache, path = _saved(tmp_path)
    with pytest.raises(OSError):
        save_cache(cache, path, writer=_disk_full_writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


_KILLED_SAVE = """
import os, sys, time
import torch
import fot
from tests.tiny import tiny_config

cache = fot.LongLlamaCache(tiny_config())
keys = torch.randn(1, 4, 200_000, 16)  # 25 MB of keys and values
cache.append_memory(1, keys, keys, None)
real_replace = os.replace

def stalled_replace(src, dst):  # the temporary file is complete; the process is killed before the rename
    print("written", flush=True)
    time.sleep(600)

os.replace = stalled_replace
cache.save(sys.argv[1])
"""


@pytest.mark.parametrize("then", ["save", "load"])
def test_killed_save_leaves_no_temporary_file_after_the_next_save_or_load(tmp_path, then):
    import os
    import signal
    import subprocess
    from pathlib import Path

    _, cache, path = _saved(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)], cwd=repo, stdout=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        assert child.stdout.readline().strip() == b"written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = [p for p in tmp_path.iterdir() if p.name not in before]
    sizes = [f.stat().st_size for p in left for f in p.rglob("*") if f.is_file()]
    assert left and max(sizes) > 20_000_000  # the fault: a full-size temporary file stays behind
    if then == "save":
        cache.save(path)
    else:
        fot.LongLlamaCache.load(path, tiny_config())
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_save_to_an_unwritable_folder_names_the_path_given(tmp_path):
    _, cache, _ = _saved(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "c.safetensors"
    with pytest.raises(OSError, match=f"cannot write the cache to {target}: ") as err:
        cache.save(target)
    assert ".tmp" not in str(err.value)
    missing = tmp_path / "missing" / "c.safetensors"
    with pytest.raises(OSError, match=f"cannot write the cache to {missing}: ") as err:
        cache.save(missing)
    assert ".tmp" not in str(err.value)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes to read-only folders")  # fmt: skip
def test_save_to_a_read_only_folder_names_the_path_given(tmp_path):
    _, cache, _ = _saved(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match=f"cannot write the cache to {folder / 'c.safetensors'}: ") as err:
            cache.save(folder / "c.safetensors")
        assert ".tmp" not in str(err.value)
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------- 8. RAM accounting
def _held_bytes(*tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize(
    "backend, max_tokens", [("exact", None), ("faiss-flat", None), ("faiss-ivf", None), ("exact", 1500)]
)
def test_memory_ram_within_1_25x_of_keys_and_values(faiss1, small_ivf, backend, max_tokens):
    config = tiny_config(mem_layers=[0, 2], num_key_value_heads=2, mem_top_k=4, mem_index=backend,
                         mem_max_tokens=max_tokens, mem_dtype="bfloat16")  # fmt: skip
    cache = fot.LongLlamaCache(config, search_factory=small_ivf)
    g = torch.Generator().manual_seed(41)
    B, G, H = 2, 2, config.head_dim
    for step in range(50):  # 50 windows of 64 tokens: 3200 per layer
        for layer in config.mem_layers:
            k = torch.randn(B, G, W, H, generator=g)
            cache.append_memory(layer, k, torch.randn(B, G, W, H, generator=g), None)
        n = cache.memory_length
        stats = cache.memory_bytes()
        # the minimum: keys + values of every memory layer in mem_dtype (bf16: 2 bytes)
        assert stats["keys_values"] == len(config.mem_layers) * 2 * B * G * n * H * 2
        held = sum(_held_bytes(s.k_BGMH, s.v_BGMH, s.valid_BM) for s in cache.memories.values())
        assert stats["allocated"] == held  # what is reported is what the buffers really hold
        if n >= 1024:  # past the initial allocation
            validity = len(config.mem_layers) * B * math.ceil(1.25 * n) + 64
            assert stats["allocated"] <= 1.25 * stats["keys_values"] + validity, (n, stats)
    assert cache.memory_length == (3200 if max_tokens is None else max_tokens)
    if backend == "faiss-ivf":
        serialized = sum(faiss1.serialize_index(ix).nbytes for s in cache.searches.values() for ix in ivf_indexes(s))
        assert stats["index"] > 0 and 0.8 * serialized <= stats["index"] <= 1.25 * serialized, (stats, serialized)
    else:
        assert stats["index"] == 0


@pytest.mark.parametrize("top_k, max_tokens", [(None, None), (4, None), (4, 1500)])
def test_prefill_allocates_each_memory_once_at_its_final_size(top_k, max_tokens):
    """A fresh forward announces how many tokens go to memory, so each store is allocated once, exactly,
    instead of growing (and copying all of memory) step by step; the outputs do not change."""
    model = tiny_model(mem_layers=[0, 2], mem_top_k=top_k, mem_max_tokens=max_tokens, dtype=torch.float32)
    ids = tokens(2, 40 * W + 32, seed=5)  # 2560 tokens go to memory, past the initial 1024-slot allocation
    with torch.no_grad():
        out = model(ids, use_cache=True)
    final = 2560 if max_tokens is None else max_tokens
    for store in out.past_key_values.memories.values():
        assert store.allocations == 1 and store.capacity == store.length == final
    growing = fot.LongLlamaCache(model.config, preallocate_memory=False)  # grows step by step instead
    with torch.no_grad():
        stepwise = model(ids, past_key_values=growing, use_cache=True)
    assert all(store.allocations > 1 for store in stepwise.past_key_values.memories.values())
    assert torch.equal(out.logits, stepwise.logits)


# ----------------------------------------------------------------------------- 9. bad input
@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_mem_top_k_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="mem_top_k"):
        tiny_config(mem_top_k=bad)


@pytest.mark.parametrize("bad", ["annoy", "FAISS-IVF", "hnsw", None])
def test_unknown_mem_index_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="mem_index"):
        tiny_config(mem_top_k=4, mem_index=bad)
    with pytest.raises(ValueError, match="mem_index"):
        make_search(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_keys_reaching_memory_name_the_layer(value):
    cache = fot.LongLlamaCache(tiny_config(mem_layers=[0, 2]))
    k = torch.randn(1, 4, 8, 16)
    cache.append_memory(2, k, k, None)
    bad = k.clone()
    bad[0, 1, 3, 5] = value
    with pytest.raises(ValueError, match="memory layer 2"):
        cache.append_memory(2, bad, k, None)
    with pytest.raises(ValueError, match="memory layer 0"):
        cache.append_memory(0, k, bad, None)  # values too
    assert cache.memories[2].length == 8 and cache.memories[0].length == 0  # nothing was written
    # through the model: a NaN weight below the memory layer poisons what it would remember
    model = tiny_model(mem_layers=[1])
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = value
        with pytest.raises(ValueError, match="memory layer 1"):
            model(tokens(1, N_LONG, seed=42))


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_faiss_missing_names_the_extra(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"fot\[faiss\]"):
        make_search(backend)
    with pytest.raises(ImportError, match=r"fot\[faiss\]"):
        fot.LongLlamaCache(tiny_config(mem_top_k=4, mem_index=backend))
    assert make_search("exact").name == "exact"  # the exact backend needs no faiss


def test_faiss_missing_via_import_hook_names_the_extra(monkeypatch):
    real = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"pip install 'fot\[faiss\]'"):
        make_search("faiss-flat")


def test_faiss_ivf_with_autograd_is_refused(faiss1):
    model = tiny_model(mem_top_k=4, mem_index="faiss-ivf").train()
    ids = tokens(1, N_LONG, seed=43)
    with pytest.raises(ValueError, match="faiss-ivf"):
        model(ids, labels=ids)
    with torch.no_grad():  # the same model in inference is fine
        model(ids)
    exact = tiny_model(mem_top_k=4, mem_index="exact").train()
    exact(ids, labels=ids).loss.backward()  # and training with the exact index works
