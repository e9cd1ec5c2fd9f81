"""mem_index="ivf-gemm" (``fot.search.IVFGemmSearch``): IVF lists of slot ids, probed lists scored with GEMMs.

References, each independent of the code under test:
  * a float64 brute force over the valid keys (``brute_topk``), compared tie-aware (``assert_same_topk``): with
    every list probed the search is exact;
  * ``exact_topk`` for recall (``recall_at_k``, tie-aware);
  * the same tiny model with ``mem_index="exact"``, for the whole model's logits.
"""

from __future__ import annotations

import pytest
import torch

import fot
from fot.search import IVFGemmSearch, IVFScanSearch, default_search_factory, exact_topk, recall_at_k
from tests.test_knn_memory import assert_same_topk, brute_topk, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.tiny import TOL64, left_pad_mask, max_err, tiny_config, tiny_model, tokens

W, L = 64, 32  # the tiny window and last context length (tests/tiny.py)


def small_factory(nprobe: int | None = None, rebuild_growth: float = 2):
    """ivf-gemm (and ivf-scan, its compiled search) backends that train on 64 keys (so the approximate path runs on
    tiny memories)."""

    def factory(config, layer_idx):
        backend = {"ivf-gemm": IVFGemmSearch, "ivf-scan": IVFScanSearch}.get(config.mem_index)
        if backend is not None:
            return backend(nprobe or config.mem_nprobe, min_train=64, rebuild_growth=rebuild_growth)
        return default_search_factory(config, layer_idx)

    return factory


def filled(M=200, B=2, G=2, window=50, keys=None, seed=0, mem_index="ivf-gemm", **cfg):
    """A cache whose memory layer 1 holds ``keys`` (default: random [B, G, M, H]) appended window by window."""
    config = tiny_config(num_key_value_heads=G, mem_top_k=4, mem_index=mem_index, **cfg)
    cache = fot.LongLlamaCache(config, search_factory=small_factory(rebuild_growth=cfg.pop("growth", 2)))
    g = torch.Generator().manual_seed(seed)
    if keys is None:
        keys = torch.randn(B, G, M, config.head_dim, generator=g)
    for s in range(0, keys.shape[2], window):
        chunk = keys[:, :, s : s + window]
        cache.append_memory(1, chunk, torch.randn(chunk.shape, generator=g), None)
    return cache, keys


def assert_exact(search, view, q_BGXH, k):
    """Every row and KV head: the search equals float64 brute force over the valid slots (tie-aware)."""
    idx = search.search(q_BGXH, view, k)
    for b in range(q_BGXH.shape[0]):
        valid = None if view.valid_BM is None else view.valid_BM[b]
        for g in range(q_BGXH.shape[1]):
            keys = view.k_BGMH[b, g].float()
            got = idx[b, g]
            if valid is not None:
                assert ((got == -1) | valid[got.clamp(min=0)]).all(), "an invalid slot was retrieved"
            ref = brute_topk(q_BGXH[b, g], keys, valid, k)
            assert_same_topk(got, ref, q_BGXH[b, g].double() @ keys.double().T)
    return idx


def clustered_keys(M, B=1, G=2, H=16, clusters=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(B, G, clusters, H, generator=g) * 3
    pick = torch.randint(0, clusters, (B, G, M), generator=g)
    return centers.gather(2, pick[..., None].expand(-1, -1, -1, H)) + torch.randn(B, G, M, H, generator=g)


def test_every_list_probed_equals_brute_force_with_invalid_slots():
    assert_every_list_probed_equals_brute_force(filled(mem_nprobe=4096)[0])


def assert_every_list_probed_equals_brute_force(cache):
    """A cache from ``filled(mem_nprobe=4096, ...)``: exact on rows with a random validity mask and with fewer
    valid slots than K."""
    store, search = cache.memories[1], cache.searches[1]
    assert search.nlist > 1 and search.trained_at == 200  # trained at 100 keys, retrained at 200 (x2 growth)
    assert int(search.outlier_BGM.sum()) > 0  # the outlier list takes part too
    g = torch.Generator().manual_seed(1)
    cache.clear_memory(rows=[1])
    store.valid_BM[0, :200] = torch.rand(200, generator=g) > 0.3  # row 0: a random validity mask
    store.valid_BM[1, [7, 150]] = True  # row 1: two valid slots, fewer than K
    q = torch.randn(2, 2, 9, store.k_BGMH.shape[-1], generator=g)
    idx = assert_exact(search, store.view(), q, 4)
    assert (idx[1, :, :, 2:] == -1).all()
    # k larger than memory: every valid slot, then -1
    idx = search.search(q, store.view(), 300)
    assert (idx[0, :, :, int(store.valid_BM[0, :200].sum()) :] == -1).all()


def test_scores_equal_exact_topk_and_bfloat16_memory_reads_the_same_keys():
    """With every list probed, the retrieved slots' scores equal exact_topk's, best first, on a bfloat16 store
    (the keys are read through one strided view of the store's buffer)."""
    cache, _ = filled(M=300, window=60, mem_nprobe=4096, mem_dtype="bfloat16")
    store, search = cache.memories[1], cache.searches[1]
    view = store.view()
    q = torch.randn(2, 2, 13, view.k_BGMH.shape[-1], generator=torch.Generator().manual_seed(4))
    idx = search.search(q, view, 8)
    exact_s, _ = exact_topk(q, view.k_BGMH, None, 8)
    b = torch.arange(2)[:, None, None, None]
    g = torch.arange(2)[None, :, None, None]
    got_s = (view.k_BGMH[b, g, idx].float() * q[..., None, :]).sum(-1)
    assert torch.allclose(got_s.sort(-1, descending=True).values, exact_s, atol=1e-5)


def test_fifo_eviction_never_returns_evicted_keys():
    m = 96
    cache, keys = filled(M=230, B=1, window=46, mem_max_tokens=m, mem_nprobe=4096)
    store, search = cache.memories[1], cache.searches[1]
    assert store.total_appended == 230 and store.length == m and search.nlist > 0
    view = store.view()
    kept = keys[0, :, -m:]  # the last m keys appended, in some slot order
    assert torch.equal(view.k_BGMH[0].sort(1).values.sort(2).values, kept.sort(1).values.sort(2).values)
    q = torch.randn(1, 2, 11, keys.shape[-1], generator=torch.Generator().manual_seed(5))
    assert_exact(search, view, q, 6)


def test_int8_memory_is_searched_on_its_dequantized_keys():
    cache, _ = filled(M=200, mem_nprobe=4096, mem_dtype="int8")
    store, search = cache.memories[1], cache.searches[1]
    view = store.view()
    q = torch.randn(2, 2, 7, view.k_BGMH.shape[-1], generator=torch.Generator().manual_seed(6))
    assert_exact(search, view, q, 5)


def test_recall_on_clustered_keys_grows_with_nprobe():
    keys = clustered_keys(1024)
    cache, _ = filled(keys=keys, B=1, window=128, mem_nprobe=1)
    store, search = cache.memories[1], cache.searches[1]
    view = store.view()
    g = torch.Generator().manual_seed(7)
    q = keys[:, :, torch.randint(0, 1024, (96,), generator=g)] + 0.3 * torch.randn(1, 2, 96, keys.shape[-1], generator=g)
    exact, _ = exact_topk(q, view.k_BGMH, None, 8)
    recall = {}
    for nprobe in (1, 4, search.nlist):
        search.nprobe = nprobe
        hits, wanted = recall_at_k(q, view.k_BGMH, search.search(q, view, 8), exact)
        recall[nprobe] = hits / wanted
    assert search.nlist == 64  # 2 sqrt(1024) lists
    assert recall[1] < recall[4] <= recall[search.nlist] == 1.0, recall
    assert recall[4] >= 0.9, recall


def test_new_keys_join_their_nearest_list_without_retraining_and_far_ones_are_searched_exactly():
    cache, keys = filled(M=128, B=1, window=64, mem_nprobe=1, growth=4)
    store, search = cache.memories[1], cache.searches[1]
    centroids = search.centroids_BGCD.clone()
    assert search.trained_at == 64 and int((search.near_BGM >= 0).sum()) == 2 * 128
    # a key in a new direction, no longer than the others: far from every centroid, so an outlier
    H = keys.shape[-1]
    far = torch.zeros(1, 2, 1, H)
    far[..., 0] = keys.norm(dim=-1).max() * 0.9
    near = keys[:, :, :20] + 0.01  # next to trained keys
    slots = store.append(torch.cat([near, far], 2), torch.zeros(1, 2, 21, H), None)
    search.update(store, slots, evicted=False)
    assert torch.equal(search.centroids_BGCD, centroids) and search.trained_at == 64  # not retrained
    assert bool(search.outlier_BGM[0, :, int(slots[-1])].all())
    # each near key sits in the list of its nearest centroid: the one its twin was assigned to, or as close
    lifted = search._lift(store.keys_at(slots[:20]))
    d = torch.cdist(lifted[0], centroids[0]).pow(2)
    got = search.near_BGM[0, :, slots[:20]].long()
    assert torch.allclose(d.gather(-1, got[..., None]).squeeze(-1), d.min(-1).values, rtol=1e-4, atol=1e-4)
    # one probed list is enough to find the outlier for a query that points at it
    q = far.clone()
    idx = search.search(q, store.view(), 1)
    assert int(idx[0, 0, 0, 0]) == int(slots[-1]) and int(idx[0, 1, 0, 0]) == int(slots[-1])


def test_retrains_with_more_lists_when_memory_has_grown():
    cache, _ = filled(M=320, B=1, window=64, mem_nprobe=4096)
    search = cache.searches[1]
    assert search.trained_at == 256 and search.nlist == 32  # nlist_for(256); it was 16 at 64 and 128 keys
    assert int((search.near_BGM >= 0).sum()) == 2 * 320  # the window after the retraining was added too


def test_copy_select_batch_and_save_load_keep_the_index(tmp_path):
    model = tiny_model(num_key_value_heads=2, mem_top_k=3, mem_index="ivf-gemm", mem_nprobe=2)
    ids = tokens(2, L + 5 * W, seed=35)
    with torch.no_grad():
        cache = model(ids, past_key_values=fot.LongLlamaCache(model.config, search_factory=small_factory())).past_key_values
    search = cache.searches[1]
    assert search.nlist and search.trained_at < cache.memory_length  # extended after its training
    view = cache.memories[1].view()
    q = torch.randn(2, 2, 5, model.config.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    want = search.search(q, view, 3)
    # copy: the same answers, then independent
    twin = cache.copy()
    assert torch.equal(twin.searches[1].search(q, twin.memories[1].view(), 3), want)
    twin.append_memory(1, torch.randn(2, 2, 64, model.config.head_dim, dtype=torch.float64),
                       torch.zeros(2, 2, 64, model.config.head_dim, dtype=torch.float64), None)  # fmt: skip
    assert search.near_BGM.shape[2] == cache.memory_length < twin.memory_length
    assert torch.equal(search.search(q, view, 3), want)
    # save and load: the very index, not one retrained on the loaded memory
    path = tmp_path / "c.fotcache"
    cache.save(path)
    loaded = fot.LongLlamaCache.load(path, model.config, search_factory=small_factory())
    other = loaded.searches[1]
    assert (other.trained_at, other.bound_sq) == (search.trained_at, search.bound_sq)
    assert torch.equal(other.centroids_BGCD, search.centroids_BGCD)
    assert torch.equal(other.search(q, loaded.memories[1].view(), 3), want)
    # select_batch: row 0 of the new batch is old row 1, twice
    cache.reorder_cache(torch.tensor([1, 1]))
    swapped = cache.searches[1].search(q[[1, 1]], cache.memories[1].view(), 3)
    assert torch.equal(swapped[0], want[1]) and torch.equal(swapped[1], want[1])


def assert_model_with_every_list_probed_equals_exact(mem_index: str, factory, **cfg):
    """The whole tiny model (memory layers, GQA, padding in memory): ``mem_index`` probing every list gives the
    logits of exact top-k search, and probing one list does not (so the approximate path really ran)."""
    ids = tokens(2, L + 4 * W, seed=7)
    mask = left_pad_mask([L + 4 * W, L + 4 * W - 70], L + 4 * W)
    exact = tiny_model(num_key_value_heads=2, mem_top_k=4, mem_index="exact", **cfg)
    ivf = tiny_model(num_key_value_heads=2, mem_top_k=4, mem_index=mem_index, mem_nprobe=4096, **cfg)
    with torch.no_grad():
        expected = exact(ids, attention_mask=mask).logits
        out = ivf(ids, attention_mask=mask, past_key_values=fot.LongLlamaCache(ivf.config, search_factory=factory()))
        assert out.past_key_values.searches[1].nlist > 1
        assert max_err(out.logits, expected, mask) < TOL64
        one = ivf(ids, attention_mask=mask, past_key_values=fot.LongLlamaCache(ivf.config, search_factory=factory(1)))
        assert max_err(one.logits, expected, mask) > 1e-3


def test_model_with_every_list_probed_equals_exact():
    assert_model_with_every_list_probed_equals_exact("ivf-gemm", small_factory)


def test_config_names_the_index():
    assert tiny_config(mem_index="ivf-gemm", mem_top_k=8).mem_index == "ivf-gemm"
    with pytest.raises(ValueError, match="ivf-gemm"):
        tiny_config(mem_index="ivf-gem", mem_top_k=8)
