"""Block retrieval: memory read as blocks of consecutive slots, chosen per chunk of queries (``mem_blocks``).

FoT's top-k memory (``mem_top_k``) searches, for every query, the K memory keys with the largest scores and
gathers those K keys and values for that query alone. With memory in every layer of a model, that search and
that gather are most of a long prefill's cost (docs/benchmarks.md). Block retrieval is a second, named setting
that trades the per-query choice for dense matrix products:

* Memory slots are grouped into blocks of ``mem_block_size`` consecutive slots. For each block and KV head the
  index keeps the elementwise minimum m and maximum M of the block's valid raw keys. For any query q, the score
  of every key k in the block is at most ``sum_d max(q_d * m_d, q_d * M_d) = relu(q) . M - relu(-q) . m``: an
  upper bound computed with two GEMMs against the blocks, not against every key.
* The queries of a forward are cut into chunks of ``mem_block_queries`` consecutive queries (a decoding step is
  a chunk of one). For each chunk and KV head, a block's score is the largest bound over the chunk's queries
  and the query heads that read that KV head, and the ``mem_blocks`` blocks with the largest scores are chosen
  (all of them when memory holds fewer). A block with no valid key is never chosen.
* Each query attends, in one softmax with its local window, to every valid slot of its chunk's chosen blocks.
  The chunk's queries share those keys, so attention is one dense product per chunk and KV head.

``fot.attention.reference_block_attention`` is this literally; tests/naive.py restates the choice in float64.
With ``mem_blocks * mem_block_size`` at least the memory's size every block is chosen and the result is dense
attention. The bound idea is the page selection of Quest (Tang et al., 2024); the chunk-shared dense read
follows InfLLM (Xiao et al., 2024). Neither paper's code is used here.
"""

from __future__ import annotations

import torch

from .memory import MemoryStore
from .search import TensorIndex
from .types import MemoryKV

MASKED_BLOCK = float("-inf")


def block_bounds(keys_XSH: torch.Tensor, ok_XS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise (min, max) fp32 [X, H] over the ``ok`` keys of each of X blocks of S keys, and whether a block
    has any (``[X]`` bool). A block without valid keys gets +inf / -inf, which ``choose_blocks`` never picks."""
    k = keys_XSH.float()
    ok = ok_XS[..., None]
    kmin = k.masked_fill(~ok, float("inf")).amin(-2)
    kmax = k.masked_fill(~ok, float("-inf")).amax(-2)
    return kmin, kmax, ok_XS.any(-1)


def chunk_queries(q_BGRTH: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, G, R, T, H] -> [B, G, C, R * chunk, H] with C = ceil(T / chunk) chunks of consecutive queries (the last
    padded with zeros; callers drop the padding's rows). Rows are ordered (query head, query) within a chunk."""
    B, G, R, T, H = q_BGRTH.shape
    C = -(-T // chunk)
    if C * chunk != T:
        q_BGRTH = torch.nn.functional.pad(q_BGRTH, (0, 0, 0, C * chunk - T))
    return q_BGRTH.reshape(B, G, R, C, chunk, H).transpose(2, 3).reshape(B, G, C, R * chunk, H)


def unchunk_queries(x_BGCYH: torch.Tensor, R: int, T: int) -> torch.Tensor:
    """The inverse of ``chunk_queries`` for [B, G, C, R * chunk, H] -> [B, G * R, T, H]."""
    B, G, C, Y, H = x_BGCYH.shape
    chunk = Y // R
    x = x_BGCYH.reshape(B, G, C, R, chunk, H).transpose(2, 3).reshape(B, G, R, C * chunk, H)
    return x[:, :, :, :T].reshape(B, G * R, T, H)


class BlockIndex(TensorIndex):
    """Per memory layer: each block's key bounds (module docstring), kept current as the store is written.

    A ``KeySearch`` (``TensorIndex``) so that the cache updates, copies, reorders and reloads it like the top-k indexes. It saves
    nothing: the bounds are a function of the stored keys, so a loaded cache recomputes them. After
    ``clear_memory`` a cleared row's blocks keep their bounds until their slots are written again; their slots
    are invalid, so attention reads none of them, but they can still take a place among the chosen blocks.
    """

    name = "blocks"
    TENSORS = ("kmin_BGXH", "kmax_BGXH", "filled_BGX")

    def __init__(self, block_size: int, n_blocks: int, chunk: int):
        self.block_size, self.n_blocks, self.chunk = block_size, n_blocks, chunk
        self.kmin_BGXH: torch.Tensor | None = None
        self.kmax_BGXH: torch.Tensor | None = None
        self.filled_BGX: torch.Tensor | None = None
        self.blocks = 0  # blocks holding at least one written slot

    def search(self, q_BGXH, view, k):
        raise TypeError("BlockIndex chooses blocks (choose), not top-k slots; it serves mem_blocks, not mem_top_k.")

    def reset(self) -> None:
        self.kmin_BGXH = self.kmax_BGXH = self.filled_BGX = None
        self.blocks = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @staticmethod
    def bytes_for(slots: int, block_size: int, num_kv_heads: int, head_dim: int, batch: int = 1) -> int:
        """``nbytes`` once ``slots`` slots are written: two fp32 bound vectors and a flag per block and KV head."""
        blocks = -(-slots // block_size)
        return batch * num_kv_heads * blocks * (2 * head_dim * 4 + 1)

    def load_state(self, store, tensors, info):
        self.reset()
        if store.length:
            self.update(store, torch.arange(store.length), evicted=False)

    def _grow(self, blocks: int, like: torch.Tensor, capacity_blocks: int) -> None:
        B, G, _, H = like.shape
        have = 0 if self.kmin_BGXH is None else self.kmin_BGXH.shape[2]
        if blocks <= have:
            return
        size = max(blocks, min(capacity_blocks, max(2 * have, 64)))  # at most the store's capacity in blocks
        kmin = like.new_full((B, G, size, H), float("inf"), dtype=torch.float32)
        kmax = like.new_full((B, G, size, H), float("-inf"), dtype=torch.float32)
        filled = torch.zeros((B, G, size), dtype=torch.bool, device=like.device)
        if have:
            kmin[:, :, :have], kmax[:, :, :have] = self.kmin_BGXH, self.kmax_BGXH
            filled[:, :, :have] = self.filled_BGX
        self.kmin_BGXH, self.kmax_BGXH, self.filled_BGX = kmin, kmax, filled

    def update(self, store: MemoryStore, slots: torch.Tensor, evicted: bool) -> None:
        """Recompute the bounds of every block that holds one of ``slots``, from the store's keys."""
        S = self.block_size
        blocks = torch.unique(slots.to("cpu") // S)
        idx = (blocks[:, None] * S + torch.arange(S)).reshape(-1)  # every slot of those blocks
        in_store = idx < store.length
        keys = store.keys_at(idx.clamp(max=store.length - 1))  # [B, G, n * S, H]
        B, G, _, H = keys.shape
        ok = in_store.to(keys.device).expand(B, -1)
        if not store.all_valid:
            ok = ok & store.valid_BM[:, idx.clamp(max=store.length - 1).to(keys.device)]
        n = blocks.numel()
        kmin, kmax, filled = block_bounds(keys.reshape(B, G, n, S, H), ok.reshape(B, 1, n, S).expand(B, G, n, S))
        capacity_blocks = -(-max(store.capacity, store.length) // S)
        self._grow(int(blocks.max()) + 1, keys, capacity_blocks)
        at = blocks.to(keys.device)
        self.kmin_BGXH[:, :, at], self.kmax_BGXH[:, :, at], self.filled_BGX[:, :, at] = kmin, kmax, filled
        self.blocks = max(self.blocks, int(blocks.max()) + 1)

    def choose(self, q_BNTH: torch.Tensor, n_blocks: int, chunk: int) -> torch.Tensor:
        """The chosen blocks [B, G, C, n] (-1 = none) of each chunk of ``chunk`` queries (module docstring), for
        rotated queries [B, N, T, H]. C = ceil(T / chunk); n = min(``n_blocks``, blocks in memory)."""
        B, N, T, H = q_BNTH.shape
        G = self.kmin_BGXH.shape[1]
        X = self.blocks
        kmin, kmax = self.kmin_BGXH[:, :, :X], self.kmax_BGXH[:, :, :X]
        q = chunk_queries(q_BNTH.float().reshape(B, G, N // G, T, H), chunk)  # [B, G, C, Y, H]
        C, Y = q.shape[2], q.shape[3]
        rows = min(Y, max(1, (1 << 22) // max(B * G * C * X, 1)))  # bound the [B, G, C, rows, X] scores to ~16 MB
        score = torch.full((B, G, C, X), MASKED_BLOCK, device=q.device)
        real = (torch.arange(C * (Y // (N // G)), device=q.device) < T).reshape(C, Y // (N // G))
        real_CY = real[:, None, :].expand(C, N // G, Y // (N // G)).reshape(C, Y)  # padding rows score nothing
        for y0 in range(0, Y, rows):
            ys = slice(y0, min(y0 + rows, Y))
            qy = q[:, :, :, ys]
            bound = torch.matmul(qy.clamp(min=0), kmax[:, :, None].transpose(-1, -2)) + torch.matmul(
                qy.clamp(max=0), kmin[:, :, None].transpose(-1, -2))  # [B, G, C, rows, X]
            bound = bound.masked_fill(~real_CY[None, None, :, ys, None], MASKED_BLOCK)
            score = torch.maximum(score, bound.amax(-2))
        score = score.masked_fill(~self.filled_BGX[:, :, None, :X], MASKED_BLOCK)
        n = min(n_blocks, X)
        top, ids = score.topk(n, dim=-1)
        return ids.masked_fill(top == MASKED_BLOCK, -1)


def block_slots(blocks_BGCn: torch.Tensor, block_size: int, memory: MemoryKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of chosen blocks, [B, G, C, n * S] (0 where none), and whether each is a valid memory slot."""
    S = block_size
    slots = (blocks_BGCn.clamp(min=0)[..., None] * S + torch.arange(S, device=blocks_BGCn.device)).flatten(-2)
    ok = (blocks_BGCn >= 0).repeat_interleave(S, dim=-1) & (slots < memory.size)
    slots = slots.clamp(max=memory.size - 1)
    if memory.valid_BM is not None:
        B = slots.shape[0]
        ok = ok & memory.valid_BM.gather(1, slots.reshape(B, -1)).view_as(slots)
    return slots, ok
