"""The memory store of one memory layer: pre-RoPE keys, values and a validity mask per slot.

Shape legend: B batch, G KV heads, M memory slots, T tokens appended, H head dim.

Storage is preallocated and grows geometrically (x2), so appending N tokens one window at a time costs O(N)
copying in total instead of the O(N^2) of concatenating on every append. Keys and values are stored in
``dtype`` (the config's ``mem_dtype``); readers get views of the filled prefix and cast block by block.
"""

from __future__ import annotations

import torch

from .attention import MemoryKV

INITIAL_CAPACITY = 1024


def copy_on_write(*tensors: torch.Tensor):
    """Buffers about to be written in place. With autograd on, earlier views of them may be saved for
    backward (as attention inputs), so the write goes to a fresh copy instead; in inference it is in place."""
    if torch.is_grad_enabled():
        return tuple(t.clone() for t in tensors)
    return tensors


class MemoryStore:
    """Append-only (key, value, valid) memory of one layer for a batch.

    Args:
        dtype: storage dtype of keys and values.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.k_BGMH: torch.Tensor | None = None
        self.v_BGMH: torch.Tensor | None = None
        self.valid_BM: torch.Tensor | None = None
        self.length = 0
        self.all_valid = True  # lets readers skip the mask when no padding ever entered memory

    @property
    def capacity(self) -> int:
        return 0 if self.k_BGMH is None else self.k_BGMH.shape[2]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        B, G, _, H = like.shape
        capacity = max(INITIAL_CAPACITY, self.capacity)
        while capacity < needed:
            capacity *= 2
        k = like.new_empty((B, G, capacity, H), dtype=self.dtype)
        v = like.new_empty((B, G, capacity, H), dtype=self.dtype)
        valid = torch.ones((B, capacity), dtype=torch.bool, device=like.device)
        if self.length:
            k[:, :, : self.length] = self.k_BGMH[:, :, : self.length]
            v[:, :, : self.length] = self.v_BGMH[:, :, : self.length]
            valid[:, : self.length] = self.valid_BM[:, : self.length]
        self.k_BGMH, self.v_BGMH, self.valid_BM = k, v, valid

    def append(self, k_BGTH: torch.Tensor, v_BGTH: torch.Tensor, valid_BT: torch.Tensor | None) -> None:
        """Append T slots. ``k`` must already be pre-RoPE ("as if at position 0")."""
        T = k_BGTH.shape[2]
        if T == 0:
            return
        if self.k_BGMH is not None and k_BGTH.shape[0] != self.k_BGMH.shape[0]:
            raise ValueError(
                f"memory holds a batch of {self.k_BGMH.shape[0]} rows but {k_BGTH.shape[0]} were appended; "
                "start a new cache for a different batch size."
            )
        if self.length + T > self.capacity:
            self._grow(self.length + T, k_BGTH)
        end = self.length + T
        self.k_BGMH, self.v_BGMH, self.valid_BM = copy_on_write(self.k_BGMH, self.v_BGMH, self.valid_BM)
        self.k_BGMH[:, :, self.length : end] = k_BGTH.detach()
        self.v_BGMH[:, :, self.length : end] = v_BGTH.detach()
        if valid_BT is not None:
            self.valid_BM[:, self.length : end] = valid_BT
            self.all_valid = self.all_valid and bool(valid_BT.all())
        self.length = end

    def view(self) -> MemoryKV | None:
        """The filled prefix as a ``MemoryKV`` (views, no copy), or None when empty."""
        if self.length == 0:
            return None
        n = self.length
        return MemoryKV(
            self.k_BGMH[:, :, :n], self.v_BGMH[:, :, :n], None if self.all_valid else self.valid_BM[:, :n]
        )

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam reordering, batch selection, repeat)."""
        if self.k_BGMH is None:
            return
        index = index.to(self.k_BGMH.device)
        self.k_BGMH = self.k_BGMH.index_select(0, index)
        self.v_BGMH = self.v_BGMH.index_select(0, index)
        self.valid_BM = self.valid_BM.index_select(0, index)

    def nbytes(self) -> int:
        if self.k_BGMH is None:
            return 0
        per_slot = self.k_BGMH[:, :, :1].numel() * self.k_BGMH.element_size() * 2
        return per_slot * self.length
