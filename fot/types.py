"""The small value types every layer shares: the keys and values attention reads, and the forward plan.

Shape legend: B batch, G KV heads, S local keys, M memory slots, H head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import dequantize

IMPLEMENTATIONS = ("reference", "torch", "triton")
MEMORY_MODES = ("dense", "top-k", "block", "crossbatch")


@dataclass
class LocalKV:
    """The local keys a chunk of queries attends to.

    ``k_BGSH`` are rotated keys (positions 0..S-1 of the local window), ``v_BGSH`` values. The T queries sit
    at the last T positions (offset S - T): query t sees local keys 0 .. S - T + t. ``valid_BS`` marks
    non-padding keys (None: all valid).
    """

    k_BGSH: torch.Tensor
    v_BGSH: torch.Tensor
    valid_BS: torch.Tensor | None


@dataclass
class MemoryKV:
    """Memory keys (pre-RoPE), values and validity. ``valid_BM`` None means every slot is valid. ``score_bias`` is
    subtracted from every memory score before the one softmax (``LongLlamaConfig.mem_score_bias``; 0: none)."""

    k_BGMH: torch.Tensor
    v_BGMH: torch.Tensor
    valid_BM: torch.Tensor | None
    score_bias: float = 0.0

    @property
    def size(self) -> int:
        return self.k_BGMH.shape[-2]

    def gather_keys(self, b_idx: torch.Tensor, g_idx: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The keys at ``[b_idx, g_idx, slots]`` (broadcasting advanced indices) in fp32, read where they live."""
        dev = self.k_BGMH.device
        return self.k_BGMH[b_idx.to(dev), g_idx.to(dev), slots.to(dev)].float()


def flat_rows(t_BGMH: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A memory tensor [B, G, M, H] viewed as one [B G C, H] row buffer, with C = its capacity per head (a store's
    tensors are views of the first M slots of [B, G, C, H] buffers), so that (head = b G + g, slot) is row
    head C + slot: (the rows, C), or None when the tensor is not laid out that way. Compiled kernels read
    memory rows in place through it."""
    B, G, _, H = t_BGMH.shape
    st = t_BGMH.stride()
    if st[3] != 1 or st[2] != H or st[1] % H != 0 or st[0] != G * st[1]:
        return None
    per_head = st[1] // H
    return t_BGMH.as_strided((B * G * per_head, H), (H, 1)), per_head


class QuantizedMemoryKV(MemoryKV):
    """An int8 memory (``mem_dtype="int8"``, ``fot.quant``): codes and one fp32 scale per key and value vector.

    ``k_BGMH`` and ``v_BGMH`` dequantize the whole memory to fp32 when first read (dense attention and exact
    search read every slot anyway) and keep it while this view lives, which is one layer's forward. Readers that
    need a few slots (the gather of top-k attention, an index's new keys) call ``gather`` or ``keys_at`` and
    dequantize only those.
    """

    def __init__(self, k_codes_BGMH: torch.Tensor, k_scale_BGM: torch.Tensor, v_codes_BGMH: torch.Tensor,
                 v_scale_BGM: torch.Tensor, valid_BM: torch.Tensor | None):  # fmt: skip
        self.k_codes_BGMH, self.k_scale_BGM = k_codes_BGMH, k_scale_BGM
        self.v_codes_BGMH, self.v_scale_BGM = v_codes_BGMH, v_scale_BGM
        self.valid_BM = valid_BM
        self._k = self._v = None

    @staticmethod
    def decode(codes_xH: torch.Tensor, scale_x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes [..., H] times their scales [...], in ``dtype`` (``fot.quant.dequantize``)."""
        return dequantize(codes_xH, scale_x, dtype)

    @property
    def k_BGMH(self) -> torch.Tensor:
        if self._k is None:
            self._k = self.decode(self.k_codes_BGMH, self.k_scale_BGM)
        return self._k

    @property
    def v_BGMH(self) -> torch.Tensor:
        if self._v is None:
            self._v = self.decode(self.v_codes_BGMH, self.v_scale_BGM)
        return self._v

    @property
    def size(self) -> int:
        return self.k_codes_BGMH.shape[-2]

    def gather_keys(self, b_idx: torch.Tensor, g_idx: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        dev = self.k_codes_BGMH.device
        b_idx, g_idx, slots = b_idx.to(dev), g_idx.to(dev), slots.to(dev)
        return self.decode(self.k_codes_BGMH[b_idx, g_idx, slots], self.k_scale_BGM[b_idx, g_idx, slots])

    def gather(self, b_idx: torch.Tensor, g_idx: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype):
        """Keys and values of ``[b_idx, g_idx, slots]`` (broadcasting advanced indices), dequantized to ``dtype``."""
        k = self.decode(self.k_codes_BGMH[b_idx, g_idx, slots], self.k_scale_BGM[b_idx, g_idx, slots], dtype)
        v = self.decode(self.v_codes_BGMH[b_idx, g_idx, slots], self.v_scale_BGM[b_idx, g_idx, slots], dtype)
        return k, v


@dataclass(frozen=True)
class BlockChoice:
    """The memory blocks each chunk of queries reads (``fot.blocks``): ``ids_BGCn`` [B, G, C, n] (-1 = none) for
    chunks of ``chunk`` consecutive queries, blocks of ``block_size`` consecutive slots."""

    ids_BGCn: torch.Tensor
    block_size: int
    chunk: int


@dataclass(frozen=True)
class ForwardPlan:
    """Every decision of one forward, made once at its start (``fot.plan.resolve_plan``).

    Attributes:
        impl: the attention implementation, "reference", "torch" or "triton" (never "auto").
        memory_mode: what memory layers attend to besides their local window: "dense" (all of memory),
            "top-k" (each query's retrieved slots), "block" (the blocks each chunk of queries chose,
            ``fot.blocks``) or "crossbatch" (other batch rows, training).
        training: autograd records this forward and something requires a gradient. Then local windows are
            extended by concatenation (a checkpointed layer recomputes exactly), buffers are copied before
            they are written, and attention uses its differentiable implementation.
        window_group: how many full windows bound for memory run at once as batch rows (1: one at a time).
        grouping: ``config.mem_attention_grouping``, (heads, queries) per attention block, or None.
        cache_policy: "slide" or "flush", for this call only (the cache's own policy is its default).
        last_context_length: tokens kept as the last window (L).
        window_overlap: tokens before each memory-bound window (after the first) that it re-reads as local
            context (``config.window_overlap``; 0 in training).
        score_bias: ``config.mem_score_bias``, for crossbatch attention (its contexts are no memory view; memory
            views carry the offset themselves, ``MemoryKV.score_bias``).
        mem_rope_distance: ``config.mem_rope_distance``: memory queries rotated at this position, or None (the
            queries' own).
    """

    impl: str
    memory_mode: str
    training: bool
    window_group: int = 1
    grouping: tuple[int, int] | None = None
    cache_policy: str = "slide"
    last_context_length: int = 0
    window_overlap: int = 0
    score_bias: float = 0.0
    mem_rope_distance: int | None = None

    def __post_init__(self):
        assert self.impl in IMPLEMENTATIONS, self.impl
        assert self.memory_mode in MEMORY_MODES, self.memory_mode
        assert self.window_group >= 1

    @property
    def attention_kind(self) -> str:
        """The attention registry's column: "dense", "top-k", "block" (inference only), "dense-training" or
        "top-k-training" (crossbatch attends densely to the other rows)."""
        if self.memory_mode == "block":
            return "block"
        kind = "top-k" if self.memory_mode == "top-k" else "dense"
        return f"{kind}-training" if self.training else kind
