"""The small value types every layer shares: the keys and values attention reads, and the forward plan.

Shape legend: B batch, G KV heads, S local keys, M memory slots, H head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATIONS = ("reference", "torch", "triton")
MEMORY_MODES = ("dense", "top-k", "crossbatch")


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
    """Memory keys (pre-RoPE), values and validity. ``valid_BM`` None means every slot is valid."""

    k_BGMH: torch.Tensor
    v_BGMH: torch.Tensor
    valid_BM: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.k_BGMH.shape[-2]


@dataclass(frozen=True)
class ForwardPlan:
    """Every decision of one forward, made once at its start (``fot.plan.resolve_plan``).

    Attributes:
        impl: the attention implementation, "reference", "torch" or "triton" (never "auto").
        memory_mode: what memory layers attend to besides their local window: "dense" (all of memory),
            "top-k" (each query's retrieved slots) or "crossbatch" (other batch rows, training).
        training: autograd records this forward and something requires a gradient. Then local windows are
            extended by concatenation (a checkpointed layer recomputes exactly), buffers are copied before
            they are written, and attention uses its differentiable implementation.
        window_group: how many full windows bound for memory run at once as batch rows (1: one at a time).
        grouping: ``config.mem_attention_grouping``, (heads, queries) per attention block, or None.
        cache_policy: "slide" or "flush", for this call only (the cache's own policy is its default).
        last_context_length: tokens kept as the last window (L).
    """

    impl: str
    memory_mode: str
    training: bool
    window_group: int = 1
    grouping: tuple[int, int] | None = None
    cache_policy: str = "slide"
    last_context_length: int = 0

    def __post_init__(self):
        assert self.impl in IMPLEMENTATIONS, self.impl
        assert self.memory_mode in MEMORY_MODES, self.memory_mode
        assert self.window_group >= 1

    @property
    def attention_kind(self) -> str:
        """The attention registry's column: "dense", "top-k", "dense-training" or "top-k-training"
        (crossbatch attends densely to the other rows)."""
        kind = "top-k" if self.memory_mode == "top-k" else "dense"
        return f"{kind}-training" if self.training else kind
