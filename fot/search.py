"""Key search for top-k (kNN) memory: which memory slots each query attends to.

Shape legend: B batch, G KV heads, X queries per KV head (the R query heads of a KV head times T tokens),
M memory slots, K retrieved per query, H head dim.

Every backend answers the same question: for each query, the K slots of its KV head's memory with the largest
inner product q . k among the *valid* slots (-1 where fewer than K valid slots exist). The score is the
attention logit itself (queries rotated at their local position, memory keys at position 0), so with K >= M
top-k attention equals dense attention.

Backends (``mem_index``):
  * "exact": blockwise matmul + ``torch.topk``; the reference for the others.
  * "faiss-flat": FAISS brute-force inner-product search (``faiss.knn``; ``knn_gpu`` on CUDA tensors). No
    index is kept: it searches the store's keys directly, so FIFO eviction and clearing need no bookkeeping.
  * "faiss-ivf": one FAISS IVF-Flat (inner product) index per (batch row, KV head). It is trained (k-means) on
    the memory once it holds ``IVF_MIN_TRAIN`` keys and retrained, with a larger ``nlist``, whenever memory
    has grown 4x since; until the first training it searches exactly. New keys are added after every window,
    overwritten slots (FIFO) are removed by id. ``nprobe`` lists are visited per query.
faiss is optional: asking for a faiss backend without it raises an error naming the extra to install.
"""

from __future__ import annotations

import logging
import math

import torch

from .attention import MemoryKV
from .config import MEM_INDEXES
from .memory import MemoryStore

logger = logging.getLogger(__name__)

SEARCH_BLOCK = 16384  # memory slots scored at once by the exact search
IVF_MIN_TRAIN = 4096  # keys before an IVF index is first trained
IVF_REBUILD_GROWTH = 4  # retrain when memory has grown this much since the last training


def import_faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mem_index='faiss-*' needs FAISS: pip install 'fot[faiss]' (faiss-cpu) or 'fot[faiss-gpu]'."
        ) from err
    return faiss


def exact_topk(q_BGXH: torch.Tensor, k_BGMH: torch.Tensor, valid_BM: torch.Tensor | None, k: int):
    """Exact top-k by inner product, scored block by block (fp32). Returns (scores, idx) [B, G, X, K]."""
    B, G, X, _ = q_BGXH.shape
    M = k_BGMH.shape[2]
    q = q_BGXH.float()
    best_s = best_i = None
    for m0 in range(0, M, SEARCH_BLOCK):
        m1 = min(m0 + SEARCH_BLOCK, M)
        s = torch.matmul(q, k_BGMH[:, :, m0:m1].float().transpose(-1, -2))  # [B, G, X, m]
        if valid_BM is not None:
            s = s.masked_fill(~valid_BM[:, None, None, m0:m1], float("-inf"))
        blk_s, blk_i = s.topk(min(k, m1 - m0), dim=-1)
        blk_i = blk_i + m0
        if best_s is None:
            best_s, best_i = blk_s, blk_i
        else:  # merge two sorted candidate lists of at most k each
            cand_s, cand_i = torch.cat([best_s, blk_s], dim=-1), torch.cat([best_i, blk_i], dim=-1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[-1]), dim=-1)
            best_i = cand_i.gather(-1, pos)
    best_i = best_i.masked_fill(torch.isneginf(best_s), -1)
    if best_i.shape[-1] < k:  # fewer slots than K
        pad = k - best_i.shape[-1]
        best_i = torch.nn.functional.pad(best_i, (0, pad), value=-1)
        best_s = torch.nn.functional.pad(best_s, (0, pad), value=float("-inf"))
    return best_s, best_i


class KeySearch:
    """Interface: ``update`` after the store changed, ``search`` for top-k slot indices."""

    name = "abstract"

    def update(self, store: MemoryStore, slots: torch.Tensor, evicted: bool) -> None:
        """Called after ``store.append`` wrote ``slots`` (``evicted``: they overwrote older keys)."""

    def search(self, q_BGXH: torch.Tensor, view: MemoryKV, k: int) -> torch.Tensor:
        """Top-k slot indices [B, G, X, K] (-1 = none) among the valid slots of ``view``."""
        raise NotImplementedError

    def select_batch(self, index: torch.Tensor) -> None:
        """Follow a batch reorder/selection of the store."""

    def reset(self) -> None:
        """Forget any index state (the store was cleared or reloaded)."""

    def nbytes(self) -> int:
        """Bytes held by the index itself, beyond the store's keys and values."""
        return 0


class ExactSearch(KeySearch):
    name = "exact"

    def search(self, q_BGXH, view, k):
        return exact_topk(q_BGXH, view.k_BGMH, view.valid_BM, k)[1]


def _faiss_rows(q_BGXH, view: MemoryKV):
    """Yield (b, g, queries [X, H] fp32 contiguous, keys [M, H] fp32 contiguous, valid [M] or None)."""
    B, G = q_BGXH.shape[:2]
    for b in range(B):
        valid = None if view.valid_BM is None else view.valid_BM[b]
        for g in range(G):
            yield b, g, q_BGXH[b, g].float().contiguous(), view.k_BGMH[b, g].float().contiguous(), valid


def _filter_invalid(ids: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """Keep, per row, the first k ids that are valid slots (ids are sorted best first; -1 = none)."""
    if valid is None:
        return ids[:, :k]
    ok = (ids >= 0) & valid[ids.clamp(min=0)]
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)  # valid ones first, in rank order
    kept = ids.gather(1, order)[:, :k]
    return kept.masked_fill(~ok.gather(1, order)[:, :k], -1)


class FaissFlatSearch(KeySearch):
    name = "faiss-flat"

    def __init__(self):
        self.faiss = import_faiss()
        self._gpu_res = None

    def _knn(self, xq, xb, k):
        faiss = self.faiss
        if xq.is_cuda:
            import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in, torch tensors out, no host copy)

            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("mem_index='faiss-flat' on CUDA tensors needs faiss-gpu: pip install 'fot[faiss-gpu]'.")
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            _, ids = faiss.knn_gpu(self._gpu_res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
            return ids.long()
        _, ids = faiss.knn(xq.numpy(), xb.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(ids).long()

    def search(self, q_BGXH, view, k):
        B, G, X, _ = q_BGXH.shape
        out = torch.full((B, G, X, k), -1, dtype=torch.long, device=q_BGXH.device)
        for b, g, xq, xb, valid in _faiss_rows(q_BGXH, view):
            n_invalid = 0 if valid is None else int((~valid).sum())
            want = min(k + n_invalid, xb.shape[0])
            ids = self._knn(xq, xb, want).to(out.device)
            kept = _filter_invalid(ids, valid, k)
            out[b, g, :, : kept.shape[1]] = kept
        return out


class FaissIVFSearch(KeySearch):
    """IVF-Flat per (batch row, KV head), trained on the memory itself and retrained as it grows."""

    name = "faiss-ivf"

    def __init__(self, nprobe: int = 32):
        self.faiss = import_faiss()
        self.nprobe = nprobe
        self.indexes: dict[tuple[int, int], object] = {}
        self.trained_at = 0  # memory size at the last (re)training

    def reset(self) -> None:
        self.indexes = {}
        self.trained_at = 0

    def select_batch(self, index: torch.Tensor) -> None:
        """Row b of the new batch takes the indexes of old row index[b]; repeated rows get their own copy."""
        used, new = set(), {}
        for b, src in enumerate(index.tolist()):
            for (ob, g), (idx, quantizer) in self.indexes.items():
                if ob != src:
                    continue
                if (ob, g) in used:
                    idx = self.faiss.clone_index(idx)
                    quantizer = None  # owned by the clone
                used.add((ob, g))
                new[(b, g)] = (idx, quantizer)
        self.indexes = new

    @staticmethod
    def nlist_for(n_keys: int) -> int:
        return int(min(4096, max(16, 2 ** round(math.log2(math.sqrt(n_keys) * 2)))))

    def _build(self, store: MemoryStore) -> None:
        faiss = self.faiss
        view = store.view()
        B, G, M, H = view.k_BGMH.shape
        nlist = self.nlist_for(M)
        self.indexes = {}
        for b in range(B):
            for g in range(G):
                keys = view.k_BGMH[b, g].float().contiguous().cpu().numpy()
                quantizer = faiss.IndexFlatIP(H)
                index = faiss.IndexIVFFlat(quantizer, H, nlist, faiss.METRIC_INNER_PRODUCT)
                index.cp.min_points_per_centroid = 1  # training on the memory itself; no warning spam
                index.train(keys)
                index.add_with_ids(keys, torch.arange(M).numpy())
                index.nprobe = self.nprobe
                self.indexes[(b, g)] = (index, quantizer)
        self.trained_at = M
        logger.info("fot: trained IVF indexes (nlist=%d) on %d keys per head", nlist, M)

    def update(self, store, slots, evicted):
        if store.length < IVF_MIN_TRAIN:
            return
        if not self.indexes or store.length >= IVF_REBUILD_GROWTH * self.trained_at:
            self._build(store)
            return
        faiss = self.faiss
        ids = slots.numpy().astype("int64")
        for (b, g), (index, _) in self.indexes.items():
            if evicted:
                index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
            keys = store.k_BGMH[b, g, slots.to(store.k_BGMH.device)].float().contiguous().cpu().numpy()
            index.add_with_ids(keys, ids)

    def search(self, q_BGXH, view, k):
        if torch.is_grad_enabled() and q_BGXH.requires_grad:
            raise ValueError(
                "mem_index='faiss-ivf' is for inference: its index changes as memory grows, so a recomputed "
                "(checkpointed) forward could retrieve differently. Train with mem_index='exact' or 'faiss-flat'."
            )
        if not self.indexes:  # not trained yet: memory is still small, search it exactly
            return ExactSearch().search(q_BGXH, view, k)
        B, G, X, _ = q_BGXH.shape
        out = torch.full((B, G, X, k), -1, dtype=torch.long)
        valid_BM = view.valid_BM
        for (b, g), (index, _) in self.indexes.items():
            valid = None if valid_BM is None else valid_BM[b].cpu()
            n_invalid = 0 if valid is None else int((~valid).sum())
            xq = q_BGXH[b, g].float().contiguous().cpu().numpy()
            _, ids = index.search(xq, k + n_invalid)
            kept = _filter_invalid(torch.from_numpy(ids).long(), valid, k)
            out[b, g, :, : kept.shape[1]] = kept
        return out.to(q_BGXH.device)

    def nbytes(self) -> int:
        total = 0
        for index, _ in self.indexes.values():
            lists = index.invlists
            n = sum(lists.list_size(i) for i in range(index.nlist))
            total += n * (index.d * 4 + 8) + index.nlist * index.d * 4  # vectors + ids, centroids
        return total


def make_search(mem_index: str, nprobe: int = 32) -> KeySearch:
    """The backend named by ``mem_index``."""
    if mem_index == "exact":
        return ExactSearch()
    if mem_index == "faiss-flat":
        return FaissFlatSearch()
    if mem_index == "faiss-ivf":
        return FaissIVFSearch(nprobe)
    raise ValueError(f"mem_index={mem_index!r} is unknown; use one of {', '.join(MEM_INDEXES)}.")
