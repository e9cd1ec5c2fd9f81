"""mem_index="ivf-scan" (``fot.search.IVFScanSearch``): ivf-gemm's index searched by the compiled scan of
fot/csrc/ivf_scan.cpp (built by ``fot.native``).

References, each independent of the code under test:
  * a float64 brute force over the valid keys (``brute_topk``), compared tie-aware (``assert_same_topk``): with
    every list probed the search is exact;
  * ivf-gemm on the very same index (its state loaded into the scan): the same lists probed, so the same keys;
  * the same tiny model with ``mem_index="exact"``, for the whole model's logits.
"""

from __future__ import annotations

import pytest
import torch

from fot import native
from fot.attention import reference_topk_attention, scored_topk_attention
from fot.search import IVFGemmSearch, IVFScanSearch
from fot.types import LocalKV, MemoryKV
from tests import test_search_ivf_gemm as ivf_gemm_tests
from tests.test_knn_memory import brute_topk, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.test_search_ivf_gemm import assert_model_with_every_list_probed_equals_exact, clustered_keys, small_factory
from tests.tiny import tiny_config


def filled(**cfg):
    return ivf_gemm_tests.filled(mem_index="ivf-scan", **cfg)


@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_every_list_probed_equals_brute_force_with_invalid_slots(mem_dtype):
    ivf_gemm_tests.assert_every_list_probed_equals_brute_force(filled(mem_nprobe=4096, mem_dtype=mem_dtype)[0])


@pytest.mark.parametrize("nprobe", [1, 3])
def test_finds_what_ivf_gemm_finds_on_the_same_index(nprobe):
    """Few lists probed (the approximate path): the scan returns ivf-gemm's slots on the very same index, for
    every query, and misses some of the exact top k (so the probing really limited it)."""
    keys = clustered_keys(1024, B=2, G=2)
    cache, _ = filled(keys=keys, window=128, mem_dtype="bfloat16", mem_nprobe=nprobe)
    store, scan = cache.memories[1], cache.searches[1]
    gemm = IVFGemmSearch(nprobe, min_train=64)
    gemm.load_state(store, *scan.state())
    view = store.view()
    g = torch.Generator().manual_seed(7)
    q = keys[:, :, torch.randint(0, 1024, (96,), generator=g)] + 0.5 * torch.randn(2, 2, 96, keys.shape[-1], generator=g)
    got, want = scan.search(q, view, 8), gemm.search(q, view, 8)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    exact = torch.stack([torch.stack([brute_topk(q[b, h], view.k_BGMH[b, h].float(), None, 8) for h in range(2)])
                         for b in range(2)])  # fmt: skip
    assert not torch.equal(got.sort(-1).values, exact.sort(-1).values)
    # the kernel's counting sort builds ivf-gemm's lists exactly, slots not indexed (-1) left out
    for search in (scan, gemm):
        search.near_BGM[0, 1, [5, 700]] = -1
    mine, theirs = scan._build_lists(view.size), gemm._build_lists(view.size)
    assert mine.order.numel() == 4 * 1024 - 2
    for name in ("order", "off", "length"):
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name


def test_two_threads_give_the_answer_of_one():
    cache, _ = filled(M=400, B=2, G=4, window=100, mem_nprobe=2, mem_dtype="bfloat16")
    store, search = cache.memories[1], cache.searches[1]
    q = torch.randn(2, 4, 33, store.k_BGMH.shape[-1], generator=torch.Generator().manual_seed(3))
    one = search.search(q, store.view(), 5)
    torch.set_num_threads(2)
    assert torch.equal(search.search(q, store.view(), 5), one)


@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_model_with_every_list_probed_equals_exact(mem_dtype):
    """Memory attention reads the scan's own scores (``scored_topk_attention``) here; the exact model scores its
    gathered keys (``fused_topk_attention``)."""
    assert_model_with_every_list_probed_equals_exact("ivf-scan", small_factory, mem_dtype=mem_dtype)


@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_from_the_scans_scores_equals_the_float64_reference(mem_dtype, threads):
    """``scored_topk_attention`` (the compiled softmax over the search's scores, values read in place) against
    ``reference_topk_attention`` in float64 on the same slots: GQA, a memory view of a larger store buffer, invalid
    and missing (-1) slots, a query with nothing retrieved, and a score bias."""
    g = torch.Generator().manual_seed(11)
    B, G, N, T, H, C, M, S, K = 2, 2, 6, 70, 16, 300, 250, 90, 8
    k_buf, v_buf = (torch.randn(B, G, C, H, generator=g).to(mem_dtype) for _ in range(2))
    valid = torch.rand(B, M, generator=g) > 0.2
    memory = MemoryKV(k_buf[:, :, :M], v_buf[:, :, :M], valid, score_bias=0.5)
    local = LocalKV(torch.randn(B, G, S, H, generator=g), torch.randn(B, G, S, H, generator=g), None)
    q, q_mem = (torch.randn(B, N, T, H, generator=g) for _ in range(2))
    idx = torch.randint(0, M, (B, N, T, K), generator=g)
    idx = torch.where(valid.gather(1, idx.view(B, -1)).view_as(idx), idx, -1)  # the search never returns invalid
    idx[:, :, :5, 3:] = -1
    idx[1, 2, 7] = -1  # nothing retrieved: local attention alone
    k_sel = memory.k_BGMH.float().repeat_interleave(N // G, 1).gather(2, idx.clamp(min=0).view(B, N, T * K, 1)
                                                                       .expand(-1, -1, -1, H)).view(B, N, T, K, H)  # fmt: skip
    s_mem = torch.einsum("bnth,bntkh->bntk", q_mem, k_sel).masked_fill(idx < 0, float("-inf"))
    torch.set_num_threads(threads)
    got = scored_topk_attention(q, local, memory, idx, s_mem)
    memory64 = MemoryKV(memory.k_BGMH.double(), memory.v_BGMH.double(), valid, score_bias=0.5)
    local64 = LocalKV(local.k_BGSH.double(), local.v_BGSH.double(), None)
    want = reference_topk_attention(q.double(), local64, memory64, idx, q_mem.double())
    assert (got.double() - want).abs().max() < 1e-5
    assert (got[1, 2, 7].double() - reference_topk_attention(q.double(), local64, None, None)[1, 2, 7]).abs().max() < 1e-5


def test_int8_memory_is_refused_in_one_line():
    cache, keys = filled(M=200, mem_nprobe=4, mem_dtype="int8")
    store, search = cache.memories[1], cache.searches[1]
    q = torch.randn(2, 2, 3, keys.shape[-1])
    with pytest.raises(RuntimeError, match="mem_dtype='bfloat16' or mem_index='ivf-gemm'"):
        search.search(q, store.view(), 4)


def test_the_kernel_is_built_once_per_source_and_a_missing_compiler_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FOT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    native.ivf_scan()
    built = list((tmp_path / "native").glob("ivf_scan-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_LOADED", {})
    native.ivf_scan()  # from the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "native").iterdir())) == 1
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "CSRC", tmp_path / "no-csrc")  # as in checkpoint code, which carries no fot/csrc
    with pytest.raises(RuntimeError, match="ships with the installed fot"):
        native.ivf_scan()
    monkeypatch.undo()
    monkeypatch.setenv("FOT_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("CXX", "no-such-compiler-fot")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*mem_index='ivf-gemm'"):
        native.ivf_scan()


def test_config_names_the_index():
    assert tiny_config(mem_index="ivf-scan", mem_top_k=8).mem_index == "ivf-scan"


@pytest.mark.parametrize("C, p", [(5, 5), (7, 3), (16, 16), (37, 16), (512, 16)])
def test_list_choice_is_each_rows_top_p(C, p):
    """The kernel's choice of lists (any order) is torch.topk's set, whatever the row length's remainder by the
    kernel's block of 16."""
    s = torch.randn(33, C, generator=torch.Generator().manual_seed(C))
    got = IVFScanSearch()._top_lists(s.view(1, 33, C), p).view(33, p)
    assert torch.equal(got.sort(-1).values, s.topk(p, dim=-1).indices.sort(-1).values)


def test_memory_offloaded_to_disk_is_read_in_place(tmp_path):
    """A memory-mapped store (``mem_offload="disk"``): the scan reads its keys where they lie and finds what
    ivf-gemm finds on the same index."""
    from fot.memory import MemoryStore

    g = torch.Generator().manual_seed(0)
    store = MemoryStore(torch.bfloat16, offload_dir=tmp_path)
    keys = torch.randn(1, 2, 300, 16, generator=g)
    for i in range(0, 300, 60):
        store.append(keys[:, :, i : i + 60], keys[:, :, i : i + 60], None)
    scan = IVFScanSearch(2, min_train=64)
    scan.update(store, torch.arange(300), evicted=False)
    gemm = IVFGemmSearch(2, min_train=64)
    gemm.load_state(store, *scan.state())
    q = torch.randn(1, 2, 7, 16, generator=g)
    got, want = scan.search(q, store.view(), 5), gemm.search(q, store.view(), 5)
    assert any(tmp_path.iterdir()) and torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_slots_appended_one_at_a_time_are_scored_by_every_query_until_the_lists_are_rebuilt():
    """Decoding appends a slot a token: the lists stay as built and the new slots (the tail) are scored exactly by
    every query, so with every list probed the search still equals float64 brute force, and with one list probed
    a query equal to a new key finds it. Past ``TAIL_MAX`` new slots, or when a slot is overwritten, the lists are
    rebuilt."""
    keys = clustered_keys(1024, B=2, G=2)
    cache, _ = filled(keys=keys, window=128, mem_dtype="bfloat16", mem_nprobe=4096)
    store, scan = cache.memories[1], cache.searches[1]
    g = torch.Generator().manual_seed(5)
    H = keys.shape[-1]
    scan.search(torch.randn(2, 2, 4, H, generator=g), store.view(), 4)  # builds the lists
    built = scan._lists
    new = []
    for _ in range(3):
        k = 4 * torch.randn(2, 2, 1, H, generator=g)  # long keys: each is its own query's best match
        cache.append_memory(1, k, torch.randn(k.shape, generator=g), None)
        new.append(k)
        assert scan._lists is built  # not rebuilt: the new slots wait in the tail
        ivf_gemm_tests.assert_exact(scan, store.view(), torch.randn(2, 2, 9, H, generator=g), 4)
    assert built.M == 1024 and store.view().size == 1027
    scan.nprobe = 1
    q = torch.cat(new, 2).float()
    idx = scan.search(q, store.view(), 1)
    assert torch.equal(idx[..., 0], torch.arange(1024, 1027).expand(2, 2, 3))
    scan.TAIL_MAX = 4
    cache.append_memory(1, *(torch.randn(2, 2, 2, H, generator=g) for _ in range(2)), None)
    assert scan._lists is None  # 5 new slots > TAIL_MAX: rebuilt at the next search
    scan.search(q, store.view(), 1)
    assert scan._lists.M == 1029


@pytest.mark.parametrize("mem_dtype", ["float32", "bfloat16"])
def test_before_the_first_training_every_slot_is_scored_exactly(mem_dtype):
    """Below ``min_train`` keys there is no index: the kernel scores every slot (all of memory as its tail), equal
    to float64 brute force with a random validity mask and with fewer valid slots than k, and its scores are the
    products of the slots it returns."""
    cache, _ = filled(M=60, window=20, mem_dtype=mem_dtype)
    store, search = cache.memories[1], cache.searches[1]
    assert search.centroids_BGCD is None
    g = torch.Generator().manual_seed(2)
    cache.clear_memory(rows=[1])
    store.valid_BM[0, :60] = torch.rand(60, generator=g) > 0.3
    store.valid_BM[1, [3, 41]] = True
    q = torch.randn(2, 2, 7, store.k_BGMH.shape[-1], generator=g)
    idx = ivf_gemm_tests.assert_exact(search, store.view(), q, 4)
    assert (idx[1, :, :, 2:] == -1).all()
    ids, scores = search.search_scored(q, store.view(), 4)
    keys = store.view().k_BGMH.float()
    want = torch.einsum("bgxh,bgxkh->bgxk", q, keys[torch.arange(2)[:, None, None, None],
                                                      torch.arange(2)[None, :, None, None], ids.clamp(min=0)])
    assert torch.allclose(scores[ids >= 0], want[ids >= 0], atol=1e-5)
    assert torch.isneginf(scores[ids < 0]).all()


def test_fifo_eviction_between_searches_rebuilds_the_lists():
    """A FIFO memory overwrites old slots: lists built before the overwrite would name keys that are gone, so the
    next search rebuilds them and equals brute force over the memory as it now is, whether slots are overwritten a
    window or one at a time."""
    m = 96
    cache, keys = filled(M=230, B=1, window=46, mem_max_tokens=m, mem_nprobe=4096, mem_dtype="bfloat16")
    store, search = cache.memories[1], cache.searches[1]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 11, keys.shape[-1], generator=g)
    ivf_gemm_tests.assert_exact(search, store.view(), q, 6)
    for _ in range(3):  # one slot at a time, as decoding does, each overwriting the oldest key
        k = 3 * torch.randn(1, 2, 1, keys.shape[-1], generator=g)
        cache.append_memory(1, k, torch.randn(k.shape, generator=g), None)
        assert search._lists is None
        idx = ivf_gemm_tests.assert_exact(search, store.view(), q, 6)
        assert store.view().size == m
    assert search._lists.M == m and idx.max() < m
