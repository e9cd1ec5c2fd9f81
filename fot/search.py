"""Key search for top-k (kNN) memory: which memory slots each query attends to.

Shape legend: B batch, G KV heads, X queries per KV head (the R query heads of a KV head times T tokens),
M memory slots, K retrieved per query, H head dim.

Every backend answers the same question: for each query, the K slots of its KV head's memory with the largest
inner product q . k among the *valid* slots (-1 where fewer than K valid slots exist). The score is the
attention logit itself (queries rotated at their local position, memory keys at position 0), so with K >= M
top-k attention equals dense attention.

Backends (``mem_index``):
  * "exact": tiled matmul + a staged top-k selection (``exact_topk``, ``select_topk``); the reference for the
    others.
  * "faiss-flat": FAISS brute-force inner-product search (``faiss.knn``; ``knn_gpu`` on CUDA tensors). No
    index is kept: it searches the store's keys directly, so FIFO eviction and clearing need no bookkeeping.
  * "faiss-ivf": one FAISS IVF-Flat index per (batch row, KV head). Inner-product search is reduced to L2
    search exactly (MIPS -> NN): a key k is stored as [k, sqrt(R^2 - |k|^2)] and a query q as [q, 0], so
    |q' - k'|^2 = |q|^2 + R^2 - 2 q.k ranks keys exactly as q.k does, while k-means clustering and probing work
    in the L2 geometry they are built for (inner-product IVF favours large-norm centroids and misses keys:
    on the trained demo model's passkey keys at 16K, recall@32 0.80 -> 0.96 at nprobe 16 of 256 lists). R is
    ``IVF_NORM_MARGIN`` x the largest key norm at training. The index is trained (k-means) once memory holds
    ``IVF_MIN_TRAIN`` keys and rebuilt, with ``nlist`` ~ 2 sqrt(M), whenever memory has grown
    ``IVF_REBUILD_GROWTH``x since or a new key's norm exceeds R; until the first training it searches exactly.
    New keys are added after every window, overwritten slots (FIFO) are removed by id. ``nprobe`` lists are
    visited per query. Keys that k-means places badly (farther from their centroid than 99.5% of the training
    keys: rare tokens such as a pass key's digits, or keys of a distribution that arrived after training) are
    kept out of the lists and searched exactly by every query, then merged with the IVF candidates by their
    exact scores. Without that, a key added after the last training could sit in a list no query probes. The
    exact set is capped at ``IVF_OUTLIER_FRACTION`` of the keys: when drift makes more keys far, the least far
    go to their lists, so the exact search never costs more than a 1% brute force (or 64 keys).
  * "faiss-ivf-sq8": "faiss-ivf" whose lists hold each lifted key's residual to its centroid in 8 bits per value
    instead of 32 (``FaissIVFSQ8Search``): the store keeps the one full copy of the keys, and the lists take
    H + 1 rounded up to a multiple of 8 bytes per key (72 at H = 64) instead of 4 (H + 1).
  * "ivf-gemm": the IVF of "faiss-ivf" (lifted keys, k-means lists of about 2 sqrt(M) per head, outliers searched
    by every query, retrained at each doubling) kept in torch and scored with dense matmuls (``IVFGemmSearch``).
    Its lists are slot ids grouped by list (CSR: offsets and one argsort of every slot's list), not copies of
    the keys: 13 bytes per key and KV head (int32 slot order, int32 nearest list, fp32 distance to it, the
    outlier flag) beside the store's keys, which a search reads in place. A window's queries score the centroids in one batched GEMM,
    each takes its top ``nprobe`` lists and its head's outlier list, and the (query, list) pairs are grouped by
    list: lists whose query count and length round up to the same powers of two form a bucket, scored with one
    ``bmm`` (padding at most doubles a bucket's work). The scores are copied into one row per query in runs of
    ``SCORE_CHUNK`` and reduced to its top k by ``select_topk``. New keys join their nearest list after every
    window without retraining; overwritten slots (FIFO) just change list. No faiss needed.
  * "ivf-scan": ivf-gemm's index, probed the same way, but each query's top k is found by a compiled scan
    (fot/csrc/ivf_scan.cpp, built with the system's C++ compiler on first use by ``fot.native``): each list is
    visited once, its keys gathered into a transposed fp32 block and scored against the queries that probe it,
    six queries by sixteen keys at a time in registers, and a score is kept only if it beats its query's
    current k-th best. Nothing the size of a query's row is written, which is what costs
    ivf-gemm most on a CPU. CPU only, bf16 or fp32 memory; the same lists, so the same keys are found. It
    returns the scores of the slots it found (``search_scored``), from which top-k attention applies the
    softmax to the values alone (``fot.attention.scored_topk_attention``); slots appended since the lists were
    built (up to ``TAIL_MAX``: decoding) are scored by every query instead of rebuilding the lists per token.
faiss is optional: asking for a faiss backend without it raises an error naming the extra to install.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import DEFAULT_NPROBE, MEM_INDEXES, LongLlamaConfig
from .memory import MemoryStore
from .types import MemoryKV, QuantizedMemoryKV, flat_rows

logger = logging.getLogger(__name__)

SEARCH_BLOCK = 16384  # memory slots scored at once by the exact search
SEARCH_QUERY_BLOCK = 128  # queries scored at once by the exact search (a tile of 8 MiB at SEARCH_BLOCK slots)
SELECT_GROUP = 8  # values per group in the staged top-k selection (``select_topk``)
SELECT_MIN = 8192  # rows at least this long are selected in stages; shorter ones by torch.topk at once
IVF_MIN_TRAIN = 4096  # keys before an IVF index is first trained
IVF_REBUILD_GROWTH = 2  # retrain when memory has grown this much since the last training
IVF_NORM_MARGIN = 1.25  # R (the MIPS -> L2 bound) over the largest key norm at training
IVF_POINTS_PER_LIST = 32  # k-means trains on at most this many sampled keys per list
IVF_OUTLIER_QUANTILE = 0.995  # keys farther from their centroid than this quantile at training are outliers
IVF_OUTLIER_FRACTION = 0.01  # at most this share of a head's keys (the farthest) is searched exactly,
IVF_OUTLIER_MIN = 64  # or this many, whichever is more
KMEANS_ITERS = 10  # Lloyd iterations of ivf-gemm's k-means
SCORE_CHUNK = 16  # ivf-gemm copies scores into each query's row in runs of this many (list blocks round up to it)
ASSIGN_BLOCK = 8192  # keys assigned to their nearest centroid at once by ivf-gemm (bounds a [block, nlist] matrix)


def import_faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mem_index='faiss-*' needs FAISS: pip install 'fot[faiss]' (faiss-cpu) or 'fot[faiss-gpu]'."
        ) from err
    return faiss


def exact_topk(q_BGXH: torch.Tensor, k_BGMH: torch.Tensor, valid_BM: torch.Tensor | None, k: int,
               block: int = SEARCH_BLOCK, query_block: int = SEARCH_QUERY_BLOCK):  # fmt: skip
    """Exact top-k by inner product (fp32). Returns (scores, idx) [B, G, X, K], best first.

    Scores are made in tiles of ``query_block`` queries x ``block`` slots, all written into one buffer that the
    call reuses, and each tile's top-k is merged with the best so far. The [X, M] score matrix of a KV head is
    never materialised: on CPU a fresh matrix of that size costs a page fault per 4 KiB on first write and a trip
    through RAM, which took longer than the matmul itself (30 memory layers of SmolLM2 at 8K tokens: 188 s of
    matmul for 1.2 TFLOP, 6 GFLOP/s, while the model's own GEMMs ran at 24).
    """
    B, G, X, _ = q_BGXH.shape
    M = k_BGMH.shape[2]
    kk = min(k, M)
    q = q_BGXH.detach().float()  # a search is not differentiated (it picks slots), and mm(out=) refuses autograd
    best_s = q.new_empty((B, G, X, kk))
    best_i = torch.empty((B, G, X, kk), dtype=torch.long, device=q.device)
    tile = q.new_empty(min(query_block, X) * min(block, M))  # reused by every tile of this call
    for m0 in range(0, M, block):
        m1 = min(m0 + block, M)
        keys_BGmH = k_BGMH[:, :, m0:m1].detach().float()  # converted once per slot block, for every query
        invalid_Bm = None if valid_BM is None else ~valid_BM[:, m0:m1]
        for b in range(B):
            for g in range(G):
                keys_Hm = keys_BGmH[b, g].T
                for x0 in range(0, X, query_block):
                    x1 = min(x0 + query_block, X)
                    s = tile[: (x1 - x0) * (m1 - m0)].view(x1 - x0, m1 - m0)
                    torch.mm(q[b, g, x0:x1], keys_Hm, out=s)
                    if invalid_Bm is not None:
                        s.masked_fill_(invalid_Bm[b], float("-inf"))
                    blk_s, blk_i = select_topk(s, min(kk, m1 - m0))
                    if m0 == 0:  # the first block holds at least kk slots
                        best_s[b, g, x0:x1], best_i[b, g, x0:x1] = blk_s, blk_i
                        continue
                    # merge two sorted candidate lists
                    cand_s = torch.cat([best_s[b, g, x0:x1], blk_s], dim=-1)
                    cand_i = torch.cat([best_i[b, g, x0:x1], blk_i + m0], dim=-1)
                    top_s, pos = cand_s.topk(kk, dim=-1)
                    best_s[b, g, x0:x1], best_i[b, g, x0:x1] = top_s, cand_i.gather(-1, pos)
    best_i = best_i.masked_fill(torch.isneginf(best_s), -1)
    if kk < k:  # fewer slots than K
        pad = k - kk
        best_i = torch.nn.functional.pad(best_i, (0, pad), value=-1)
        best_s = torch.nn.functional.pad(best_s, (0, pad), value=float("-inf"))
    return best_s, best_i


def select_topk(s_RM: torch.Tensor, k: int, group: int = SELECT_GROUP, min_size: int = SELECT_MIN):
    """``s_RM.topk(k, dim=-1)``: the k largest values of each row, best first, and their positions (which of
    several equal values is chosen may differ), selected in stages for long rows.

    The M values of a row fall into n = M // ``group`` groups, group j holding positions j, j + n, j + 2n, ...
    (the last M - n * group values join the candidates directly). The k groups with the largest maxima hold the
    k largest values: each of them holds a value at least their smallest maximum, so the k-th largest value
    reaches it too, and a group whose maximum is below it holds none of the k largest. So the answer is the top k
    of those k groups' k * ``group`` values, and the k best groups are found the same way from the n maxima.
    torch.topk on CPU slows sharply on long rows: on [128, 16384] scores it took 14-25 ms where this takes
    2.2-2.4 ms (1.6x faster at 8192, no faster at 4096 and below), so rows shorter than ``min_size`` go to it
    directly.
    """
    M = s_RM.shape[-1]
    if M < max(min_size, 2 * k * group):
        return s_RM.topk(k, dim=-1)
    n = M // group
    max_Rn = s_RM[..., : n * group].unflatten(-1, (group, n)).amax(-2)  # [R, n]: group j's maximum
    _, best_groups_Rk = select_topk(max_Rn, k, group, min_size)
    offsets = torch.arange(0, n * group, n, device=s_RM.device)
    pos_RC = (best_groups_Rk[..., None] + offsets).flatten(-2)  # [R, k * group] positions of their values
    if n * group < M:
        tail = torch.arange(n * group, M, device=s_RM.device)
        pos_RC = torch.cat([pos_RC, tail.expand(*pos_RC.shape[:-1], -1)], dim=-1)
    top_Rk, at_Rk = s_RM.gather(-1, pos_RC).topk(k, dim=-1)
    return top_Rk, pos_RC.gather(-1, at_Rk)


def recall_at_k(q_BGXH, k_BGMH, found_BGXK, exact_scores_BGXK, rtol: float = 1e-5) -> tuple[int, int]:
    """Tie-aware recall of a search: (hits, wanted) over all rows.

    A found slot is a hit when its exact score q . k reaches the row's k-th best exact score (within ``rtol``
    of it): among keys with equal scores (repeated text gives identical keys) any choice is correct, and
    comparing slot ids would count it as a miss. ``wanted`` counts the exact results that exist (finite
    ``exact_scores``, e.g. from ``exact_topk``); a row's hits are capped at its wanted count.
    """
    B, G = q_BGXH.shape[:2]
    found = found_BGXK.to(k_BGMH.device)
    b_idx = torch.arange(B, device=found.device)[:, None, None, None]
    g_idx = torch.arange(G, device=found.device)[None, :, None, None]
    keys = k_BGMH[b_idx, g_idx, found.clamp(min=0)].double()  # [B, G, X, K, H]
    scores = (keys * q_BGXH.double()[..., None, :]).sum(-1)
    exact = exact_scores_BGXK.double()
    finite = torch.isfinite(exact)
    kth = exact.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)  # the k-th best existing score
    hit = (found >= 0) & (scores >= kth - rtol * kth.abs().clamp(min=1.0))
    wanted = finite.sum(-1)
    return int(torch.minimum(hit.sum(-1), wanted).sum()), int(wanted.sum())


class KeySearch:
    """Interface: ``update`` after the store changed, ``search`` for top-k slot indices."""

    name = "abstract"
    trainable = True  # retrieval is a fixed function of memory, so a recomputed (checkpointed) forward agrees

    def update(self, store: MemoryStore, slots: torch.Tensor, evicted: bool) -> None:
        """Called after ``store.append`` wrote ``slots`` (``evicted``: they overwrote older keys)."""

    def search(self, q_BGXH: torch.Tensor, view: MemoryKV, k: int) -> torch.Tensor:
        """Top-k slot indices [B, G, X, K] (-1 = none) among the valid slots of ``view``."""
        raise NotImplementedError

    def search_scored(self, q_BGXH: torch.Tensor, view: MemoryKV, k: int):
        """(``search``'s indices, their fp32 scores q . k [B, G, X, K] (-inf where -1) or None). A backend that
        computes the exact products of the slots it returns gives them, so that top-k attention reads only the
        values; the others give None and attention scores the slots itself."""
        return self.search(q_BGXH, view, k), None

    def select_batch(self, index: torch.Tensor) -> None:
        """Follow a batch reorder/selection of the store."""

    def reset(self) -> None:
        """Forget any index state (the store was cleared or reloaded)."""

    def nbytes(self) -> int:
        """Bytes held by the index itself, beyond the store's keys and values."""
        return 0

    def copy(self) -> "KeySearch":
        """An independent copy for a copied cache (stateless backends share nothing mutable)."""
        return copy.copy(self)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a saved cache must hold to restore this index exactly: (tensors, JSON-able fields).
        Backends that keep no index (they search the store's keys directly) have nothing to save."""
        return {}, {}

    def load_state(self, store: MemoryStore, tensors: dict[str, torch.Tensor], info: dict | None) -> None:
        """Restore from ``state()`` of the same backend (``info`` None: the file holds none, e.g. it was saved
        with another backend); ``store`` is the already loaded memory."""

    def _index_loaded(self, store: MemoryStore) -> None:
        """Index every key of a loaded store whose file holds no index of this backend."""
        if store.length:
            logger.info("fot: the saved cache holds no %s index; training one on its %d keys", self.name, store.length)
            self.update(store, torch.arange(store.length), evicted=False)


class ExactSearch(KeySearch):
    """Blockwise matmul + ``torch.topk`` over ``block`` memory slots at a time (``exact_topk``)."""

    name = "exact"

    def __init__(self, block: int = SEARCH_BLOCK):
        self.block = block

    def search(self, q_BGXH, view, k):
        return exact_topk(q_BGXH, view.k_BGMH, view.valid_BM, k, self.block)[1]


def _faiss_rows(q_BGXH, view: MemoryKV):
    """Yield (b, g, queries [X, H] fp32 contiguous, keys [M, H] fp32 contiguous, valid [M] or None)."""
    B, G = q_BGXH.shape[:2]
    for b in range(B):
        valid = None if view.valid_BM is None else view.valid_BM[b]
        for g in range(G):
            yield b, g, q_BGXH[b, g].float().contiguous(), view.k_BGMH[b, g].float().contiguous(), valid


class FaissFlatSearch(KeySearch):
    name = "faiss-flat"

    def __init__(self):
        self.faiss = import_faiss()
        self._gpu_res = None

    def _knn(self, xq, xb, k):
        faiss = self.faiss
        if xq.is_cuda:
            # torch tensors in, torch tensors out, no host copy. In a try, like every faiss import, so that checkpoint
            # code (save_pretrained(save_code=True)) does not list faiss among the packages it requires.
            try:
                import faiss.contrib.torch_utils  # noqa: F401
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("mem_index='faiss-*' on CUDA needs faiss-gpu: pip install 'fot[faiss-gpu]'.") from err

            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("mem_index='faiss-flat' on CUDA tensors needs faiss-gpu: pip install 'fot[faiss-gpu]'.")
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            _, ids = faiss.knn_gpu(self._gpu_res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
            return ids.long()
        _, ids = faiss.knn(xq.numpy(), xb.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(ids).long()

    def search(self, q_BGXH, view, k):
        """``faiss.knn`` takes no ID selector, so invalid slots are left out of the keys it gets (the keys are
        copied to contiguous fp32 for it anyway) and its answers are mapped back to slots."""
        B, G, X, _ = q_BGXH.shape
        out = torch.full((B, G, X, k), -1, dtype=torch.long, device=q_BGXH.device)
        for b, g, xq, xb, valid in _faiss_rows(q_BGXH, view):
            slots = None
            if valid is not None:
                slots = valid.nonzero().squeeze(1)
                xb = xb[slots.to(xb.device)]
            if xb.shape[0] == 0:
                continue
            ids = self._knn(xq, xb, min(k, xb.shape[0])).to(out.device)
            if slots is not None:
                ids = torch.where(ids >= 0, slots.to(out.device)[ids.clamp(min=0)], ids)
            out[b, g, :, : ids.shape[1]] = ids
        return out


def lift_keys(keys: torch.Tensor, bound_sq: float, width: int | None = None):
    """Keys [n, H] -> float32 numpy [n, H + 1]: [k, sqrt(R^2 - |k|^2)] (the MIPS -> L2 reduction), followed by
    zeros up to ``width`` columns when given (zeros change no distance to a query padded the same way)."""
    k = keys.float().cpu()
    extra = (bound_sq - k.pow(2).sum(1, keepdim=True)).clamp(min=0).sqrt()
    pad = k.new_zeros(k.shape[0], max((width or 0) - k.shape[1] - 1, 0))
    return torch.cat([k, extra, pad], 1).contiguous().numpy()


@dataclass
class _IVFHead:
    """The index of one (batch row, KV head): IVF lists, their quantizer (kept alive with the index), the
    squared distance beyond which a key is an outlier, and the outliers' slots (searched exactly) with their
    squared distances to the nearest centroid."""

    index: object
    quantizer: object
    radius: float
    outliers: torch.Tensor
    outlier_dist: torch.Tensor
    centroids: torch.Tensor  # [nlist, H + 1] fp32, the quantizer's, for assigning new keys with one GEMM

    def assign(self, lifted) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance to the nearest centroid, its list) of each lifted key [n, H + 1] (numpy)."""
        x = torch.from_numpy(lifted)
        d = torch.addmm(self.centroids.pow(2).sum(1), x, self.centroids.T, alpha=-2)  # |c|^2 - 2 x.c
        best, lists = d.min(1)
        return best + x.pow(2).sum(1), lists


class FaissIVFSearch(KeySearch):
    """IVF-Flat per (batch row, KV head) over lifted keys (L2 = exact inner-product ranking), trained on the
    memory itself and rebuilt as it grows, with badly placed keys searched exactly (module docstring)."""

    name = "faiss-ivf"
    trainable = False  # the index changes as memory grows, so a recomputed forward could retrieve differently

    def __init__(self, nprobe: int = DEFAULT_NPROBE, min_train: int = IVF_MIN_TRAIN,
                 rebuild_growth: float = IVF_REBUILD_GROWTH):  # fmt: skip
        """``min_train``: keys before the first training; ``rebuild_growth``: retrain when memory has grown by
        this factor since the last training (module docstring)."""
        self.faiss = import_faiss()
        self.nprobe = nprobe
        self.min_train = min_train
        self.rebuild_growth = rebuild_growth
        self.indexes: dict[tuple[int, int], _IVFHead] = {}
        self.trained_at = 0  # memory size at the last (re)training
        self.bound_sq = 0.0  # R^2 of the lifting
        self._padded = None  # every head's outliers, padded (rebuilt after any change)

    def reset(self) -> None:
        self.indexes = {}
        self.trained_at = 0
        self.bound_sq = 0.0
        self._padded = None

    def copy(self) -> "FaissIVFSearch":
        """Every head's index cloned (each clone owns its quantizer), so the two caches then grow apart."""
        new = copy.copy(self)
        new._padded = None
        new.indexes = {key: _IVFHead(self.faiss.clone_index(h.index), None, h.radius, h.outliers.clone(),
                                     h.outlier_dist.clone(), h.centroids) for key, h in self.indexes.items()}  # fmt: skip
        return new

    def select_batch(self, index: torch.Tensor) -> None:
        """Row b of the new batch takes the indexes of old row index[b]; repeated rows get their own copy."""
        self._padded = None
        used, new = set(), {}
        for b, src in enumerate(index.tolist()):
            for (ob, g), head in self.indexes.items():
                if ob != src:
                    continue
                if (ob, g) in used:  # the clone owns its own quantizer
                    head = _IVFHead(self.faiss.clone_index(head.index), None, head.radius, head.outliers.clone(),
                                    head.outlier_dist.clone(), head.centroids)
                used.add((ob, g))
                new[(b, g)] = head
        self.indexes = new

    def state(self):
        """Every head's index serialized with FAISS (lists, ids and quantizer), its outliers and radius: a reloaded
        cache then searches with the very index it was saved with. A rebuilt one would be trained on the whole
        memory at once, not on the memory at the last training plus the keys added since, and retrieve
        differently."""
        tensors: dict[str, torch.Tensor] = {}
        radius = {}
        for (b, g), head in self.indexes.items():
            tensors[f"{b}.{g}.index"] = torch.from_numpy(self.faiss.serialize_index(head.index))
            tensors[f"{b}.{g}.outliers"] = head.outliers.clone()
            tensors[f"{b}.{g}.outlier_dist"] = head.outlier_dist.clone()
            radius[f"{b}.{g}"] = head.radius
        return tensors, {"trained_at": self.trained_at, "bound_sq": self.bound_sq, "radius": radius}

    def load_state(self, store, tensors, info):
        self.reset()
        if info is None:  # saved with another backend: train on the loaded memory
            self._index_loaded(store)
            return
        self.trained_at, self.bound_sq = info["trained_at"], info["bound_sq"]
        for key, radius in info["radius"].items():
            b, g = (int(x) for x in key.split("."))
            index = self.faiss.deserialize_index(tensors[f"{key}.index"].numpy())
            index.nprobe = self.nprobe
            self.indexes[(b, g)] = _IVFHead(index, None, radius, tensors[f"{key}.outliers"],
                                            tensors[f"{key}.outlier_dist"], _centroids(self.faiss, index))  # fmt: skip

    @staticmethod
    def lifted_width(head_dim: int) -> int:
        """Columns of a lifted key: the head dim plus the lifting column."""
        return head_dim + 1

    def _new_index(self, quantizer, d: int, nlist: int):
        """An untrained IVF index whose lists hold the lifted keys as fp32 vectors (IVF-Flat)."""
        return self.faiss.IndexIVFFlat(quantizer, d, nlist, self.faiss.METRIC_L2)

    @staticmethod
    def nlist_for(n_keys: int) -> int:
        return int(min(4096, max(16, 2 ** round(math.log2(math.sqrt(n_keys) * 2)))))

    def _build(self, store: MemoryStore, reason: str) -> None:
        faiss = self.faiss
        view = store.view()
        B, G, M, H = view.k_BGMH.shape
        nlist = self.nlist_for(M)
        norms = view.k_BGMH.float().pow(2).sum(-1)
        if view.valid_BM is not None:
            norms = norms.masked_fill(~view.valid_BM[:, None, :], 0.0)
        self.bound_sq = float(norms.max()) * IVF_NORM_MARGIN**2
        self.indexes = {}
        n_out = 0
        for b in range(B):
            for g in range(G):
                width = self.lifted_width(H)
                keys = lift_keys(view.k_BGMH[b, g], self.bound_sq, width)
                quantizer = faiss.IndexFlatL2(width)
                index = self._new_index(quantizer, width, nlist)
                index.cp.min_points_per_centroid = 1  # training on the memory itself; no warning spam
                index.cp.max_points_per_centroid = IVF_POINTS_PER_LIST
                index.train(keys)
                index.nprobe = self.nprobe
                head = _IVFHead(index, quantizer, 0.0, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                _centroids(faiss, index))  # fmt: skip
                assigned = head.assign(keys)
                head.radius = float(torch.quantile(assigned[0].double(), IVF_OUTLIER_QUANTILE))
                self._add(head, keys, torch.arange(M), view.k_BGMH[b, g], assigned)
                n_out += head.outliers.numel()
                self.indexes[(b, g)] = head
        self.trained_at = M
        # debug, not info: a long prompt retrains every layer's index at each doubling (a dozen lines a prompt)
        logger.debug("fot: trained IVF indexes (nlist=%d) on %d keys per head (%s); %.1f%% searched exactly",
                    nlist, M, reason, 100.0 * n_out / max(B * G * M, 1))

    def _add(self, head: _IVFHead, lifted, slots: torch.Tensor, keys_MH: torch.Tensor, assigned=None) -> None:
        """Add lifted keys to the lists, or to the outliers when they are far from every centroid; past the
        cap, the least far outliers move to their lists (``keys_MH``: the head's stored keys, for lifting).
        ``assigned``: ``head.assign(lifted)`` when the caller has it."""
        dist, lists = head.assign(lifted) if assigned is None else assigned
        far = dist > head.radius
        near = ~far
        self._add_to_lists(head, lifted[near.numpy()], slots[near], lists[near])
        if not bool(far.any()):
            return
        head.outliers = torch.cat([head.outliers, slots[far]])
        head.outlier_dist = torch.cat([head.outlier_dist, dist[far]])
        cap = max(IVF_OUTLIER_MIN, int(IVF_OUTLIER_FRACTION * (head.index.ntotal + head.outliers.numel())))
        if head.outliers.numel() > cap:
            order = head.outlier_dist.argsort(descending=True)
            demoted = head.outliers[order[cap:]]
            head.outliers, head.outlier_dist = head.outliers[order[:cap]], head.outlier_dist[order[:cap]]
            moved = lift_keys(keys_MH[demoted.to(keys_MH.device)], self.bound_sq, head.index.d)
            self._add_to_lists(head, moved, demoted, head.assign(moved)[1])

    def _add_to_lists(self, head: _IVFHead, lifted, slots: torch.Tensor, lists: torch.Tensor) -> None:
        """Append lifted keys (numpy [n, H + 1]) with ids ``slots`` to the lists already chosen for them."""
        if not len(lifted):
            return
        try:  # in a try, as every faiss import: checkpoint code must not require faiss (fot.modeling, save_code)
            from faiss.contrib.ivf_tools import add_preassigned
        except ImportError as err:  # pragma: no cover - faiss was imported when this index was built
            raise ImportError("mem_index='faiss-ivf' needs FAISS: pip install 'fot[faiss]'.") from err

        x = np.ascontiguousarray(lifted, dtype="float32")
        ids = np.ascontiguousarray(slots.numpy(), dtype="int64")
        add_preassigned(head.index, x, np.ascontiguousarray(lists.numpy(), dtype="int64"), ids)

    def update(self, store, slots, evicted):
        if store.length < self.min_train:
            return
        self._padded = None
        if not self.indexes:
            self._build(store, "first training")
            return
        if store.length >= self.rebuild_growth * self.trained_at:
            self._build(store, f"memory grew {self.rebuild_growth}x")
            return
        new_keys = store.keys_at(slots)  # dequantized for an int8 store
        if float(new_keys.float().pow(2).sum(-1).max()) > self.bound_sq:
            self._build(store, "a new key is longer than the lifting bound")
            return
        ids = np.ascontiguousarray(slots.numpy(), dtype="int64")
        for (b, g), head in self.indexes.items():
            if evicted:
                head.index.remove_ids(ids)
                kept = ~torch.isin(head.outliers, slots)
                head.outliers, head.outlier_dist = head.outliers[kept], head.outlier_dist[kept]
            self._add(head, lift_keys(new_keys[b, g], self.bound_sq, head.index.d), slots, _HeadKeys(store, b, g))

    def search(self, q_BGXH, view, k):
        if not self.indexes:  # not trained yet: memory is still small, search it exactly
            return ExactSearch().search(q_BGXH, view, k)
        B, G, X, _ = q_BGXH.shape
        q = q_BGXH.float().cpu()
        width = next(iter(self.indexes.values())).index.d
        lifted = torch.cat([q, q.new_zeros(B, G, X, width - q.shape[-1])], -1)  # [q, 0]: ascending L2 = descending q.k
        out = torch.full((B, G, X, k), -1, dtype=torch.long)
        dist = torch.full((B, G, X, k), float("inf"))  # squared L2 of each candidate
        valid_BM = None if view.valid_BM is None else view.valid_BM.cpu()
        out_np, dist_np = out.numpy(), dist.numpy()  # FAISS writes each head's results straight into them
        selectors = _valid_selectors(valid_BM, B)
        for (b, g), head in self.indexes.items():
            params = None
            if selectors[b] is not None:  # only valid slots are candidates; nprobe must be given again here
                params = self.faiss.SearchParametersIVF(sel=selectors[b][0], nprobe=head.index.nprobe)
            head.index.search(lifted[b, g].numpy(), k, params=params, D=dist_np[b, g], I=out_np[b, g])
        if any(head.outliers.numel() for head in self.indexes.values()):
            if self._padded is None:
                self._padded = _padded_outliers(self.indexes, view, B, G)
            # |[q,0] - [k, sqrt(R^2 - |k|^2)]|^2 = |q|^2 + R^2 - 2 q.k: the candidates' exact scores, no gather
            s_kept = (q.pow(2).sum(-1, keepdim=True) + self.bound_sq - dist) / 2
            s_kept = s_kept.masked_fill(out < 0, float("-inf"))
            out = _merge_outliers(q, valid_BM, out, s_kept, self._padded, k)
        return out.to(q_BGXH.device)

    def nbytes(self) -> int:
        total = 0
        for head in self.indexes.values():
            index = head.index
            lists = index.invlists
            n = sum(lists.list_size(i) for i in range(index.nlist))
            total += n * (index.code_size + 8) + index.nlist * index.d * 4  # encoded lifted keys + ids, centroids
            total += head.outliers.numel() * 8
        return total


class FaissIVFSQ8Search(FaissIVFSearch):
    """``faiss-ivf`` whose lists hold each lifted key's residual to its centroid in 8 bits per dimension
    (FAISS ``IndexIVFScalarQuantizer``, ``QT_8bit``, ranges trained per dimension) instead of fp32: one byte per
    lifted column (``lifted_width``: 72 at H = 64) instead of 4 (H + 1). The store keeps the one full copy of the keys; the lists keep only what ranks the
    keys inside the probed lists, so scores within a list are approximate (the residuals' quantization step)
    as well as the choice of lists. Outliers are still searched exactly and merged by their exact scores."""

    name = "faiss-ivf-sq8"

    @staticmethod
    def lifted_width(head_dim: int) -> int:
        """H + 1 rounded up to a multiple of 8 with zero columns: FAISS scans 8-bit codes with SIMD only then (at
        H + 1 = 65 its scalar path searched 4.4x slower than IVF-Flat; at 72, 1.2x)."""
        return -(-(head_dim + 1) // 8) * 8

    def _new_index(self, quantizer, d: int, nlist: int):
        faiss = self.faiss
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2,
                                             True)  # fmt: skip


class _HeadKeys:
    """The stored keys of one (batch row, KV head), indexed by slots: ``keys[slots]`` -> [n, H] (read through
    ``MemoryStore.keys_at``, so an int8 store dequantizes only those)."""

    def __init__(self, store: MemoryStore, b: int, g: int):
        self.store, self.b, self.g = store, b, g

    @property
    def device(self):
        return self.store.k_BGMH.device

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        return self.store.keys_at(slots)[self.b, self.g]


def _valid_selectors(valid_BM: torch.Tensor | None, B: int) -> list:
    """Per batch row, (a FAISS ``IDSelectorBitmap`` of its valid slots, the bitmap it reads), or None when every
    slot is valid. The bitmap is returned with the selector because the selector does not own it."""
    if valid_BM is None:
        return [None] * B
    faiss = import_faiss()
    selectors = []
    for row in valid_BM:
        if bool(row.all()):
            selectors.append(None)
            continue
        bitmap = np.packbits(row.numpy(), bitorder="little")  # bit i of the bitmap: slot i is valid
        selectors.append((faiss.IDSelectorBitmap(bitmap), bitmap))
    return selectors


def _centroids(faiss, index) -> torch.Tensor:
    """The IVF quantizer's centroids, fp32 [nlist, d]."""
    return torch.from_numpy(faiss.downcast_index(index.quantizer).reconstruct_n(0, index.nlist))


def _padded_outliers(heads: dict, view: MemoryKV, B: int, G: int):
    """Every head's outlier slots as one [B, G, n] tensor (padded with slot 0), its [B, G, n] mask and the
    slots' keys [B, G, n, H] in fp32. Valid until the next update (which is the only way slots change)."""
    n = max(head.outliers.numel() for head in heads.values())
    slots = torch.zeros(B, G, n, dtype=torch.long)
    ok = torch.zeros(B, G, n, dtype=torch.bool)
    for (b, g), head in heads.items():
        m = head.outliers.numel()
        slots[b, g, :m], ok[b, g, :m] = head.outliers, True
    keys = view.gather_keys(torch.arange(B)[:, None, None], torch.arange(G)[None, :, None], slots).cpu()
    return slots, ok, keys


def _merge_outliers(q_BGXH, valid_BM, kept_BGXK, s_kept, padded, k: int) -> torch.Tensor:
    """The best k of the IVF candidates ``kept_BGXK`` (-1 = none; scores ``s_kept``) and every head's exactly
    searched outlier slots (``padded``: ``_padded_outliers``), ranked by q . k (invalid slots excluded); all
    heads at once."""
    B, G, X, _ = q_BGXH.shape
    slots, ok, k_out = padded
    n = slots.shape[-1]
    if valid_BM is not None:
        ok = ok & valid_BM[torch.arange(B)[:, None, None], slots]
    s_out = q_BGXH @ k_out.transpose(-1, -2)  # [B, G, X, n]
    s_out = s_out.masked_fill(~ok[:, :, None, :], float("-inf"))
    scores, best = torch.cat([s_kept, s_out], -1).topk(k, dim=-1)  # one selection over both candidate sets
    ids = torch.cat([kept_BGXK, slots[:, :, None, :].expand(B, G, X, n)], -1).gather(-1, best)
    return ids.masked_fill(torch.isneginf(scores), -1)


def _ceil_log2(n: torch.Tensor) -> torch.Tensor:
    """ceil(log2(n)) of positive integers, elementwise (0 for n = 1)."""
    return torch.ceil(torch.log2(n.double())).long()


def _kmeans(x_nD: torch.Tensor, C: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means in L2 on the rows of ``x_nD`` (fp32): C centroids [C, D], started from C distinct rows.
    A centroid that loses every point keeps its place (it is then an empty list until keys arrive near it)."""
    n = x_nD.shape[0]
    cent_CD = x_nD[torch.randperm(n, generator=generator)[:C].to(x_nD.device)].clone()
    for _ in range(iters):
        # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c; |x|^2 does not change the argmin
        d_nC = torch.addmm(cent_CD.pow(2).sum(1), x_nD, cent_CD.T, alpha=-2)
        assign_n = d_nC.argmin(1)
        sums_CD = torch.zeros_like(cent_CD).index_add_(0, assign_n, x_nD)
        counts_C = torch.bincount(assign_n, minlength=C).to(x_nD.dtype)
        filled = counts_C > 0
        cent_CD[filled] = sums_CD[filled] / counts_C[filled, None]
    return cent_CD


@dataclass
class _Lists:
    """The inverted lists of every (batch row, KV head) in one slot order, rebuilt from the per-slot assignment
    after each update (CSR: list l holds ``order[off[l]:off[l] + length[l]]``). List ids are global: head h's
    list c is h * (C + 1) + c, and c = C is its outlier list, which every query of the head probes.

    ``order`` holds h * M + slot for every indexed slot, so that one index names the head and the slot."""

    order: torch.Tensor  # [n indexed] int32 (B G M < 2^31)
    off: torch.Tensor  # [BG * (C + 1)] int64, start of each list in ``order``
    length: torch.Tensor  # [BG * (C + 1)] int64
    M: int  # slots per head when built


class TensorIndex(KeySearch):
    """A backend whose state is batch-major tensors, named in ``TENSORS`` (attributes, None until built): copied by
    cloning them, reordered with the batch by indexing their first dimension."""

    TENSORS: tuple[str, ...] = ()

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    def copy(self) -> "TensorIndex":
        new = copy.copy(self)
        for name, t in self._tensors().items():
            setattr(new, name, t.clone())
        return new

    def select_batch(self, index: torch.Tensor) -> None:
        """Row b of the new batch takes the index of old row index[b]."""
        for name, t in self._tensors().items():
            setattr(self, name, t.index_select(0, index.to(t.device)))


class IVFGemmSearch(TensorIndex):
    """IVF whose probed lists are scored with dense GEMMs in torch (module docstring, "ivf-gemm").

    Per (batch row, KV head): ``nlist`` centroids from k-means on the lifted keys (the MIPS -> L2 reduction of
    faiss-ivf, ``lift_keys``), each slot's nearest centroid and squared distance to it, and the outlier flag.
    The lists themselves are slot ids grouped by list (``_Lists``), so the store keeps the one copy of the keys.
    A search scores every query against the centroids in one batched GEMM, takes its top ``nprobe`` lists plus
    its head's outlier list, groups the (query, list) pairs by list and scores each group against its list's keys
    with one ``bmm`` per bucket of lists of similar sizes (query count and length, both rounded up to a power of
    two, so padding at most doubles the work). The scores land in one row per query, which ``select_topk``
    reduces to the query's top k.
    """

    name = "ivf-gemm"
    trainable = False  # the index changes as memory grows, so a recomputed forward could retrieve differently

    def __init__(self, nprobe: int = DEFAULT_NPROBE, min_train: int = IVF_MIN_TRAIN,
                 rebuild_growth: float = IVF_REBUILD_GROWTH, kmeans_iters: int = KMEANS_ITERS):  # fmt: skip
        """``min_train``: keys before the first training; ``rebuild_growth``: retrain when memory has grown by
        this factor since the last training; ``kmeans_iters``: Lloyd iterations per training."""
        self.nprobe = nprobe
        self.min_train = min_train
        self.rebuild_growth = rebuild_growth
        self.kmeans_iters = kmeans_iters
        self.scored = 0  # (query, key) products of every search so far, centroids included, padding not (benchmarks)
        self.reset()

    def reset(self) -> None:
        self.trained_at = 0  # memory size at the last (re)training
        self.bound_sq = 0.0  # R^2 of the lifting
        self.centroids_BGCD: torch.Tensor | None = None  # lifted centroids, D = H + 1
        self.radius_BG: torch.Tensor | None = None  # squared distance beyond which a key is an outlier
        self.near_BGM: torch.Tensor | None = None  # int32 nearest centroid of each slot (-1: not indexed)
        self.dist_BGM: torch.Tensor | None = None  # fp32 squared distance to it
        self.outlier_BGM: torch.Tensor | None = None  # bool: searched by every query instead of in its list
        self._lists: _Lists | None = None

    @property
    def nlist(self) -> int:
        return 0 if self.centroids_BGCD is None else self.centroids_BGCD.shape[2]

    TENSORS = ("centroids_BGCD", "radius_BG", "near_BGM", "dist_BGM", "outlier_BGM")

    def select_batch(self, index: torch.Tensor) -> None:
        super().select_batch(index)
        self._lists = None

    def nbytes(self) -> int:
        """The per-slot arrays and centroids, plus the lists (int32 slot order, int64 offsets and lengths) at the
        size the next search builds them, whether or not they are built now."""
        total = sum(t.numel() * t.element_size() for t in self._tensors().values())
        if self.near_BGM is not None:
            B, G, _ = self.near_BGM.shape
            total += 4 * int((self.near_BGM >= 0).sum()) + 16 * B * G * (self.nlist + 1)
        return total

    @staticmethod
    def bytes_for(slots: int, nlist: int, head_dim: int) -> int:
        """``nbytes`` of one (batch row, KV head) holding ``slots`` keys in ``nlist`` lists (``fot.budget``):
        13 bytes a key (int32 order and nearest list, fp32 distance, bool outlier flag), and per list its lifted
        centroid and its offset and length."""
        return 13 * slots + nlist * (head_dim + 1) * 4 + 16 * (nlist + 1)

    def state(self):
        """The centroids and every slot's assignment: a reloaded cache searches exactly as the saved one did (a
        rebuilt index would be trained on the whole memory at once and retrieve differently)."""
        if self.centroids_BGCD is None:
            return {}, {"trained_at": 0, "bound_sq": 0.0}
        return ({n: t.clone() for n, t in self._tensors().items()},
                {"trained_at": self.trained_at, "bound_sq": self.bound_sq})  # fmt: skip

    def load_state(self, store, tensors, info):
        self.reset()
        if info is None:  # saved with another backend: train on the loaded memory
            self._index_loaded(store)
        else:
            self.trained_at, self.bound_sq = info["trained_at"], info["bound_sq"]
            for name, t in tensors.items():
                setattr(self, name, t.clone())

    # ------------------------------------------------------------------ building and updating
    def _lift(self, k_xH: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H + 1] fp32: [k, sqrt(R^2 - |k|^2)] (``lift_keys``, in torch)."""
        k = k_xH.float()
        extra = (self.bound_sq - k.pow(2).sum(-1, keepdim=True)).clamp(min=0).sqrt()
        return torch.cat([k, extra], -1)

    def _assign(self, lifted_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance to the nearest centroid [B, G, T] fp32, its index [B, G, T] int32)."""
        c = self.centroids_BGCD
        best, near = [], []
        for t0 in range(0, lifted_BGTD.shape[2], ASSIGN_BLOCK):  # bounds the [T, C] distance block
            x = lifted_BGTD[:, :, t0 : t0 + ASSIGN_BLOCK]
            d = torch.matmul(x, c.transpose(-1, -2)).mul_(-2).add_(c.pow(2).sum(-1)[:, :, None, :])
            b, n = d.min(-1)
            best.append(b + x.pow(2).sum(-1))
            near.append(n.int())
        return torch.cat(best, 2).clamp(min=0), torch.cat(near, 2)

    def _build(self, store: MemoryStore, reason: str) -> None:
        view = store.view()
        k_BGMH = view.k_BGMH.float()
        B, G, M, H = k_BGMH.shape
        C = min(FaissIVFSearch.nlist_for(M), M)
        norms = k_BGMH.pow(2).sum(-1)
        if view.valid_BM is not None:
            norms = norms.masked_fill(~view.valid_BM[:, None, :], 0.0)
        self.bound_sq = float(norms.max()) * IVF_NORM_MARGIN**2
        lifted = self._lift(k_BGMH)  # [B, G, M, H + 1]
        gen = torch.Generator().manual_seed(0)  # a rebuild is a function of the memory alone
        n_train = min(M, C * IVF_POINTS_PER_LIST)
        cents = []
        for b in range(B):
            for g in range(G):
                sample = torch.randperm(M, generator=gen)[:n_train].to(lifted.device)
                cents.append(_kmeans(lifted[b, g, sample], C, self.kmeans_iters, gen))
        self.centroids_BGCD = torch.stack(cents).view(B, G, C, H + 1)
        self.dist_BGM, self.near_BGM = self._assign(lifted)
        kth = max(1, math.ceil(IVF_OUTLIER_QUANTILE * M))
        self.radius_BG = self.dist_BGM.kthvalue(kth, dim=-1).values
        self.outlier_BGM = self.dist_BGM > self.radius_BG[..., None]
        self._cap_outliers()
        self.trained_at = M
        self._lists = None
        logger.debug("fot: trained ivf-gemm (nlist=%d) on %d keys per head (%s); %.1f%% searched exactly",
                     C, M, reason, 100.0 * float(self.outlier_BGM.float().mean()))  # fmt: skip

    def _cap_outliers(self) -> None:
        """At most ``IVF_OUTLIER_FRACTION`` of a head's indexed keys (or ``IVF_OUTLIER_MIN``) stay outliers: the
        farthest; the others go to their lists."""
        indexed = (self.near_BGM >= 0).sum(-1)
        cap_BG = torch.clamp(indexed * IVF_OUTLIER_FRACTION, min=IVF_OUTLIER_MIN).long()
        over = self.outlier_BGM.sum(-1) > cap_BG
        for b, g in over.nonzero().tolist():
            d = self.dist_BGM[b, g].masked_fill(~self.outlier_BGM[b, g], float("-inf"))
            keep = d.topk(int(cap_BG[b, g])).indices
            self.outlier_BGM[b, g] = False
            self.outlier_BGM[b, g, keep] = True

    def _grow(self, M: int) -> None:
        """Per-slot arrays cover ``M`` slots (new slots: not indexed)."""
        have = self.near_BGM.shape[2]
        if M <= have:
            return
        B, G = self.near_BGM.shape[:2]
        self.near_BGM = torch.cat([self.near_BGM, self.near_BGM.new_full((B, G, M - have), -1)], 2)
        self.dist_BGM = torch.cat([self.dist_BGM, self.dist_BGM.new_zeros(B, G, M - have)], 2)
        self.outlier_BGM = torch.cat([self.outlier_BGM, self.outlier_BGM.new_zeros(B, G, M - have)], 2)

    def update(self, store, slots, evicted):
        if store.length < self.min_train:
            return
        if self.centroids_BGCD is None:
            self._build(store, "first training")
            return
        if store.length >= self.rebuild_growth * self.trained_at:
            self._build(store, f"memory grew {self.rebuild_growth}x")
            return
        new_keys = store.keys_at(slots).float()  # [B, G, T, H]; dequantized for an int8 store
        if float(new_keys.pow(2).sum(-1).max()) > self.bound_sq:
            self._build(store, "a new key is longer than the lifting bound")
            return
        self._grow(store.length)
        dist, near = self._assign(self._lift(new_keys.to(self.centroids_BGCD.device)))
        idx = slots.to(self.near_BGM.device)
        self.near_BGM[:, :, idx], self.dist_BGM[:, :, idx] = near, dist
        self.outlier_BGM[:, :, idx] = dist > self.radius_BG[..., None]
        self._cap_outliers()
        self._lists_after_update(slots)

    def _lists_after_update(self, slots: torch.Tensor) -> None:
        """The built lists after ``slots`` were assigned: rebuilt at the next search."""
        self._lists = None

    def _build_lists(self, M: int) -> _Lists:
        """The CSR lists of the current assignment (``_Lists``), for memories of ``M`` slots."""
        B, G, _ = self.near_BGM.shape
        C = self.nlist
        near = self.near_BGM[:, :, :M].long()
        head_BG1 = torch.arange(B * G, device=near.device).view(B, G, 1)
        gid = head_BG1 * (C + 1) + torch.where(self.outlier_BGM[:, :, :M], C, near)
        gid = torch.where(near >= 0, gid, B * G * (C + 1))  # not indexed: past the last list
        order = torch.argsort(gid.flatten(), stable=True)
        length = torch.bincount(gid.flatten(), minlength=B * G * (C + 1) + 1)[:-1]
        off = torch.cumsum(length, 0) - length
        return _Lists(order[: int(length.sum())].int(), off, length, M)

    # ------------------------------------------------------------------ search
    def search(self, q_BGXH, view, k):
        if self.centroids_BGCD is None:  # not trained yet: memory is still small, search it exactly
            return ExactSearch().search(q_BGXH, view, k)
        B, G, X, H = q_BGXH.shape
        M = view.size
        if self._lists is None or self._lists.M != M:
            self._lists = self._build_lists(M)
        lists = self._lists
        C, BG = self.nlist, B * G
        q_RH, lists_RJ = self._probe(q_BGXH)
        scores_RW, start_RJ = self._score_lists(q_RH, lists_RJ, lists, view)
        self.scored += BG * X * C + int(lists.length[lists_RJ].sum())
        kk = min(k, scores_RW.shape[1])
        top_s, pos = select_topk(scores_RW, kk)
        # position in a query's row -> (its j-th list, offset in it) -> slot
        j = torch.searchsorted(start_RJ, pos, right=True) - 1
        lid = lists_RJ.gather(1, j)
        at = (lists.off[lid] + pos - start_RJ.gather(1, j)).clamp(max=max(lists.order.numel() - 1, 0))
        ids = (lists.order[at].long() % M).masked_fill(torch.isneginf(top_s), -1)
        if kk < k:
            ids = torch.nn.functional.pad(ids, (0, k - kk), value=-1)
        return ids.view(B, G, X, k).to(q_BGXH.device)

    def _probe(self, q_BGXH) -> tuple[torch.Tensor, torch.Tensor]:
        """(the queries [R, H] fp32, R = B G X head-major; the global ids [R, nprobe + 1] of the lists each
        probes: its ``nprobe`` nearest and its head's outlier list)."""
        B, G, X, H = q_BGXH.shape
        C, BG = self.nlist, B * G
        q_RH = q_BGXH.detach().float().reshape(BG * X, H)
        # probing: ascending |[q,0] - c|^2 = descending q . c[:H] - |c|^2 / 2, for all heads in one batched GEMM
        cent = self.centroids_BGCD.view(BG, C, H + 1)
        half_BC = cent.pow(2).sum(-1) / 2
        cs_BXC = torch.baddbmm(-half_BC[:, None, :], q_RH.view(BG, X, H), cent[:, :, :H].transpose(1, 2))
        P = min(self.nprobe, C)
        probe_BXP = self._top_lists(cs_BXC, P)
        outlier_list = torch.full((BG, X, 1), C, dtype=torch.long, device=probe_BXP.device)
        head_B11 = torch.arange(BG, device=probe_BXP.device).view(BG, 1, 1)
        return q_RH, (torch.cat([probe_BXP, outlier_list], -1) + head_B11 * (C + 1)).view(BG * X, P + 1)

    def _top_lists(self, cs_BXC: torch.Tensor, P: int) -> torch.Tensor:
        """The ``P`` best-scoring lists of each query, in any order."""
        return cs_BXC.topk(P, dim=-1).indices

    def _score_lists(self, q_RH, lists_RJ, lists: _Lists, view):
        """Every query's scores against the keys of its lists, one row per query.

        Each (query, list) pair gets a block of its row of the list's length rounded up to ``SCORE_CHUNK``, so
        that a bucket's [n, Qb, Lb] scores are copied into the rows in whole chunks (``index_copy_`` on the row
        buffer viewed as [-1, SCORE_CHUNK]: one index per chunk, not per score). Pairs are grouped by list and
        scored with one ``bmm`` per bucket of lists whose query count and length round up to the same powers of
        two, so padding at most doubles a bucket's GEMM.

        Returns:
            ([R, width] fp32 scores, -inf where nothing was scored; [R, J] int64 where each list starts in the row).
        """
        R, J = lists_RJ.shape
        dev = q_RH.device
        CH = SCORE_CHUNK
        chunks_L = -(-lists.length // CH)  # [lists]
        block_RJ = chunks_L[lists_RJ] * CH
        start_RJ = torch.cumsum(block_RJ, 1) - block_RJ
        width = max(int((start_RJ[:, -1] + block_RJ[:, -1]).max()), CH)
        out = _scratch(R * width + CH, dev).fill_(float("-inf"))  # the last chunk takes the padding writes
        trash = R * width // CH
        pair_list = lists_RJ.flatten()
        pair_order = torch.argsort(pair_list, stable=True)  # pairs grouped by list
        n_q = torch.bincount(pair_list, minlength=lists.length.numel())
        q_start = torch.cumsum(n_q, 0) - n_q
        used = ((n_q > 0) & (lists.length > 0)).nonzero().squeeze(1)
        reader = _KeyReader(view)
        valid_BM = None if view.valid_BM is None else view.valid_BM.to(dev)
        pair_chunk = ((torch.arange(R, device=dev) * width)[:, None] + start_RJ).flatten() // CH  # first chunk
        bucket = _ceil_log2(n_q[used]) * 64 + _ceil_log2(lists.length[used])
        for b in bucket.unique().tolist():
            ls = used[bucket == b]
            Qb, nc = int(n_q[ls].max()), int(chunks_L[ls].max())
            Lb = nc * CH
            ar_q, ar_l = torch.arange(Qb, device=dev), torch.arange(Lb, device=dev)
            pairs = pair_order[(q_start[ls, None] + ar_q).clamp(max=pair_order.numel() - 1)]  # [n, Qb]
            queries = q_RH.index_select(0, (pairs // J).flatten()).view(-1, Qb, q_RH.shape[1])
            flat = lists.order[(lists.off[ls, None] + ar_l).clamp(max=lists.order.numel() - 1)].long()  # h * M + slot
            head, slot = flat // lists.M, flat % lists.M
            keys = reader.keys(head, slot).view(-1, Lb, q_RH.shape[1])
            s = torch.bmm(queries, keys.transpose(1, 2))  # [n, Qb, Lb]
            k_ok = ar_l < lists.length[ls, None]  # [n, Lb]
            if valid_BM is not None:
                k_ok = k_ok & valid_BM[head // reader.G, slot]
            if not bool(k_ok.all()):
                s.masked_fill_(~k_ok[:, None, :], float("-inf"))
            ar_c = torch.arange(nc, device=dev)
            chunk = pair_chunk[pairs][:, :, None] + ar_c  # [n, Qb, nc]
            ok = (ar_q < n_q[ls, None])[:, :, None] & (ar_c < chunks_L[ls, None])[:, None, :]
            out.view(-1, CH).index_copy_(0, chunk.masked_fill(~ok, trash).flatten(), s.view(-1, CH))
        return out[: R * width].view(R, width), start_RJ


class IVFScanSearch(IVFGemmSearch):
    """ivf-gemm's index, searched by a compiled scan that keeps each query's best k (module docstring, "ivf-scan";
    fot/csrc/ivf_scan.cpp, built on first use by ``fot.native``). CPU only; float memories (bf16 or fp32)."""

    name = "ivf-scan"
    KEY_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
    # Slots appended after the lists were built, up to this many, are scored by every query instead of rebuilding
    # the lists (a counting sort over every slot): decoding appends a slot a token, and at 256K the rebuilds cost
    # more than the scan. A new window (512 slots) rebuilds them.
    TAIL_MAX = 256

    def _lists_after_update(self, slots):
        lists = self._lists
        if lists is None or slots.numel() == 0:
            return
        # only slots past the built ones (appended, not overwritten) can wait in the tail
        if int(slots.min()) < lists.M or int(slots.max()) + 1 - lists.M > self.TAIL_MAX:
            self._lists = None

    def _top_lists(self, cs_BXC, P):
        from .native import top_rows

        cs = cs_BXC.contiguous()
        out = torch.empty(cs.shape[:-1] + (P,), dtype=torch.long)
        top_rows()(cs.data_ptr(), cs.numel() // cs.shape[-1], cs.shape[-1], P, out.data_ptr())
        return out

    def _build_lists(self, M: int) -> _Lists:
        """``IVFGemmSearch._build_lists`` by the kernel's counting sort (the same lists, the same slot order)."""
        from .native import ivf_lists

        near, outlier = self.near_BGM.contiguous(), self.outlier_BGM.contiguous()
        B, G, stride = near.shape
        heads, n_lists = B * G, B * G * (self.nlist + 1)
        order = torch.empty(heads * M, dtype=torch.int32)
        off, length = torch.empty(n_lists, dtype=torch.long), torch.empty(n_lists, dtype=torch.long)
        n = ivf_lists()(near.data_ptr(), outlier.view(torch.uint8).data_ptr(), heads, stride, M, self.nlist,
                               order.data_ptr(), off.data_ptr(), length.data_ptr())  # fmt: skip
        return _Lists(order[:n], off, length, M)

    def search(self, q_BGXH, view, k):
        return self.search_scored(q_BGXH, view, k)[0]

    def search_scored(self, q_BGXH, view, k):
        """``search``, with the scan's fp32 scores q . k of the slots it returns (-inf where -1), which top-k
        attention then need not compute again (``scored_topk_attention``)."""
        if q_BGXH.device.type != "cpu":
            raise RuntimeError("fot: mem_index='ivf-scan' is a CPU kernel; use mem_index='ivf-gemm' on "
                               f"{q_BGXH.device.type}.")  # fmt: skip
        reader = _KeyReader(view)
        if reader.flat is None or reader.flat.dtype not in self.KEY_DTYPES:
            raise RuntimeError("fot: mem_index='ivf-scan' reads bf16 or fp32 memory in place; this memory is "
                               f"{'int8' if reader.quantized else view.k_BGMH.dtype}: use mem_dtype='bfloat16' or "
                               "mem_index='ivf-gemm'.")  # fmt: skip
        from .native import ivf_scan

        B, G, X, H = q_BGXH.shape
        M = view.size
        if self.centroids_BGCD is None:  # not trained yet, memory is still small: every query scores every slot
            none = torch.zeros(0, dtype=torch.long)
            lists = _Lists(torch.zeros(0, dtype=torch.int32), none, none, 0)  # all of memory is the tail
            q_RH = q_BGXH.detach().float().reshape(B * G * X, H).contiguous()
            lists_RJ = torch.zeros(B * G * X, 0, dtype=torch.long)
        else:
            if self._lists is None or self._lists.M > M or M - self._lists.M > self.TAIL_MAX:
                self._lists = self._build_lists(M)
            lists = self._lists
            q_RH, lists_RJ = self._probe(q_BGXH)
            q_RH, lists_RJ = q_RH.contiguous(), lists_RJ.contiguous()
        R, J = lists_RJ.shape
        valid = None if view.valid_BM is None else view.valid_BM.to(torch.uint8).contiguous()
        out_s = torch.empty(R, k)
        out_ids = torch.empty(R, k, dtype=torch.long)
        ivf_scan()(q_RH.data_ptr(), R, H, lists_RJ.data_ptr(), J, X, lists.order.data_ptr(), lists.off.data_ptr(),
                   lists.length.data_ptr(), self.nlist + 1 if J else 0, reader.flat.data_ptr(),
                   self.KEY_DTYPES[reader.flat.dtype], reader.per_head, lists.M,
                   None if valid is None else valid.data_ptr(), 0 if valid is None else valid.shape[1], G, k,
                   lists.M, M, torch.get_num_threads(), out_s.data_ptr(), out_ids.data_ptr())  # fmt: skip
        self.scored += B * G * X * (self.nlist + M - lists.M) + int(lists.length[lists_RJ].sum())
        return out_ids.view(B, G, X, k), out_s.view(B, G, X, k)


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(n: int, device) -> torch.Tensor:
    """A reused fp32 buffer of ``n`` elements (uninitialised) for ivf-gemm's score rows: one per device, shared
    by every layer, because a fresh buffer of tens of MB costs a page fault per 4 KiB on first write, which took
    as long as the scoring itself (``exact_topk``'s docstring)."""
    device = torch.device(device)
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[device] = torch.empty(n, device=device)
    return buf[:n]


class _KeyReader:
    """fp32 keys of any (head = batch row x KV head, slot) pairs of a memory view, read with one ``index_select``
    when the store's keys are one strided buffer [B, G, capacity, H] (a float store), else through
    ``gather_keys`` (an int8 store, dequantized)."""

    def __init__(self, view: MemoryKV):
        self.view = view
        self.quantized = isinstance(view, QuantizedMemoryKV)
        k = view.k_codes_BGMH if self.quantized else view.k_BGMH
        self.G = k.shape[1]
        rows = None if self.quantized else flat_rows(k)
        self.flat, self.per_head = (None, 0) if rows is None else rows  # per_head: the store's capacity

    def keys(self, head: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Keys [n, H] fp32 of the pairs (head, slot), each flattened to [n]."""
        head, slot = head.flatten(), slot.flatten()
        if self.flat is not None:
            return self.flat.index_select(0, head * self.per_head + slot).float()
        return self.view.gather_keys(head // self.G, head % self.G, slot)


SearchFactory = Callable[[LongLlamaConfig, int], KeySearch]


def default_search_factory(config: LongLlamaConfig, layer_idx: int) -> KeySearch:
    """The backend of ``config.mem_index`` for memory layer ``layer_idx``. A cache takes any callable with this
    signature (``LongLlamaCache(config, search_factory=...)``), so a caller can supply its own backends."""
    return make_search(config.mem_index, config.mem_nprobe)


def make_search(mem_index: str, nprobe: int = DEFAULT_NPROBE) -> KeySearch:
    """The backend named by ``mem_index``."""
    if mem_index == "exact":
        return ExactSearch()
    if mem_index == "faiss-flat":
        return FaissFlatSearch()
    if mem_index == "faiss-ivf":
        return FaissIVFSearch(nprobe)
    if mem_index == "faiss-ivf-sq8":
        return FaissIVFSQ8Search(nprobe)
    if mem_index == "ivf-gemm":
        return IVFGemmSearch(nprobe)
    if mem_index == "ivf-scan":
        return IVFScanSearch(nprobe)
    raise ValueError(f"mem_index={mem_index!r} is unknown; use one of {', '.join(MEM_INDEXES)}.")
