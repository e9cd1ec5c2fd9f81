"""The memory store of one memory layer: pre-RoPE keys, values and a validity mask per slot.

Shape legend: B batch, G KV heads, M memory slots, T tokens appended, H head dim.

Storage is preallocated and grows geometrically (x1.25), so appending N tokens one window at a time costs
O(N) copying in total instead of the O(N^2) of concatenating on every append, while the allocated size stays
within 1.25x of what is filled. With ``max_tokens`` the store is a ring of that many slots: new tokens
overwrite the oldest ones (FIFO eviction). Dense attention is a softmax over a *set*, so slot order does not
matter; readers get views of the filled slots and cast block by block. Keys and values are stored in
``dtype`` (the config's ``mem_dtype``).
"""

from __future__ import annotations

import copy

import torch

from .types import MemoryKV

INITIAL_CAPACITY = 1024
GROWTH = 1.25


def copy_on_write(*tensors: torch.Tensor, training: bool):
    """Buffers about to be written in place. In training, earlier views of them may be saved for backward (as
    attention inputs), so the write goes to a fresh copy instead; in inference it is in place."""
    if training:
        return tuple(t.clone() for t in tensors)
    return tensors


class MemoryStore:
    """(key, value, valid) memory of one layer for a batch; append-only, or a FIFO ring with ``max_tokens``.

    Args:
        dtype: storage dtype of keys and values.
        max_tokens: capacity; None for unbounded.
        name: how errors refer to this store (e.g. "memory layer 6").
    """

    def __init__(self, dtype: torch.dtype, max_tokens: int | None = None, name: str = "memory"):
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.name = name
        self.k_BGMH: torch.Tensor | None = None
        self.v_BGMH: torch.Tensor | None = None
        self.valid_BM: torch.Tensor | None = None
        self.length = 0  # filled slots
        self.next_slot = 0  # where the next token goes (== length until a bounded store wraps)
        self.total_appended = 0
        self.all_valid = True  # lets readers skip the mask when no padding ever entered memory
        self.expected = 0  # slots the caller announced (``expect``); growing allocates them at once
        self.allocations = 0  # how many times the buffers were (re)allocated, each copying what is filled

    @property
    def capacity(self) -> int:
        return 0 if self.k_BGMH is None else self.k_BGMH.shape[2]

    def _allocate(self, capacity: int, like: torch.Tensor) -> None:
        self.allocations += 1
        B, G, _, H = like.shape
        k = like.new_empty((B, G, capacity, H), dtype=self.dtype)
        v = like.new_empty((B, G, capacity, H), dtype=self.dtype)
        valid = torch.ones((B, capacity), dtype=torch.bool, device=like.device)
        if self.length:
            k[:, :, : self.length] = self.k_BGMH[:, :, : self.length]
            v[:, :, : self.length] = self.v_BGMH[:, :, : self.length]
            valid[:, : self.length] = self.valid_BM[:, : self.length]
        self.k_BGMH, self.v_BGMH, self.valid_BM = k, v, valid

    def expect(self, tokens: int) -> None:
        """Announce that ``tokens`` more slots are about to be appended (a long prefill), so the store grows
        once to exactly that size instead of step by step (each step copies all of memory)."""
        self.expected = self.length + tokens

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        if self.expected >= needed:
            capacity = self.expected
        else:
            capacity = max(INITIAL_CAPACITY, self.capacity)
            while capacity < needed:
                capacity = int(capacity * GROWTH) + 1
        if self.max_tokens is not None:
            capacity = min(capacity, self.max_tokens)
        self._allocate(capacity, like)

    def _check(self, k_BGTH: torch.Tensor, v_BGTH: torch.Tensor) -> None:
        if self.k_BGMH is not None and (
            k_BGTH.shape[0] != self.k_BGMH.shape[0] or k_BGTH.shape[1::2] != self.k_BGMH.shape[1::2]
        ):
            raise ValueError(
                f"{self.name} holds [batch={self.k_BGMH.shape[0]}, kv heads={self.k_BGMH.shape[1]}, head dim="
                f"{self.k_BGMH.shape[3]}] but got keys of shape {tuple(k_BGTH.shape)}; start a new cache for a "
                "different batch or model."
            )
        if not (bool(torch.isfinite(k_BGTH).all()) and bool(torch.isfinite(v_BGTH).all())):
            raise ValueError(
                f"non-finite keys or values (NaN/inf) are being written to {self.name}; check the model's "
                "weights and inputs, or use a wider dtype (fp16 overflows easily)."
            )

    def append(self, k_BGTH: torch.Tensor, v_BGTH: torch.Tensor, valid_BT: torch.Tensor | None, *,
               training: bool = False) -> torch.Tensor:  # fmt: skip
        """Append T slots; ``k`` must already be pre-RoPE ("as if at position 0"). With ``training`` the buffers
        are copied before the write (``copy_on_write``).

        Returns:
            the int64 slot indices written (for search indexes to update), in append order.
        """
        T = k_BGTH.shape[2]
        if T == 0:
            return torch.empty(0, dtype=torch.long)
        self._check(k_BGTH, v_BGTH)
        if self.max_tokens is not None and T > self.max_tokens:  # only the newest max_tokens survive
            k_BGTH, v_BGTH = k_BGTH[:, :, -self.max_tokens :], v_BGTH[:, :, -self.max_tokens :]
            valid_BT = None if valid_BT is None else valid_BT[:, -self.max_tokens :]
            self.total_appended += T - self.max_tokens
            T = self.max_tokens
        bounded_full = self.max_tokens is not None and self.length + T > self.max_tokens
        self._reserve(self.max_tokens if bounded_full else self.length + T, k_BGTH)
        slots = (self.next_slot + torch.arange(T)) % self.capacity if bounded_full else None
        buffers = copy_on_write(self.k_BGMH, self.v_BGMH, self.valid_BM, training=training)
        self.k_BGMH, self.v_BGMH, self.valid_BM = buffers
        if slots is None:
            slots = torch.arange(self.next_slot, self.next_slot + T)
            sl = slice(self.next_slot, self.next_slot + T)
            self.k_BGMH[:, :, sl] = k_BGTH.detach()
            self.v_BGMH[:, :, sl] = v_BGTH.detach()
            self.valid_BM[:, sl] = True if valid_BT is None else valid_BT
        else:
            idx = slots.to(self.k_BGMH.device)
            self.k_BGMH.index_copy_(2, idx, k_BGTH.detach().to(self.dtype))
            self.v_BGMH.index_copy_(2, idx, v_BGTH.detach().to(self.dtype))
            new_valid = torch.ones_like(self.valid_BM[:, :T]) if valid_BT is None else valid_BT
            self.valid_BM.index_copy_(1, idx, new_valid)
        self.length = min(self.length + T, self.capacity) if bounded_full else self.length + T
        self.next_slot = int(slots[-1]) + 1
        if self.max_tokens is not None and self.next_slot >= self.max_tokens:
            self.next_slot = 0
        self.total_appended += T
        self._refresh_all_valid(valid_BT, overwrote=bounded_full)
        return slots

    def _refresh_all_valid(self, valid_BT, overwrote: bool) -> None:
        if overwrote:  # evicted padding may have been the only padding
            self.all_valid = bool(self.valid_BM[:, : self.length].all())
        elif valid_BT is not None and not bool(valid_BT.all()):
            self.all_valid = False

    def clear(self, rows=None) -> None:
        """Forget the memory of batch ``rows`` (all rows when None): their slots become invalid."""
        if self.valid_BM is None:
            return
        if rows is None:
            self.valid_BM[:, : self.length] = False
        else:
            rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.valid_BM.device).reshape(-1)
            B = self.valid_BM.shape[0]
            if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= B):
                raise ValueError(f"clear(rows={rows}): rows must be in [0, {B - 1}].")
            self.valid_BM[rows_t, : self.length] = False
        self.all_valid = False

    def view(self) -> MemoryKV | None:
        """The filled slots as a ``MemoryKV`` (views, no copy), or None when empty."""
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

    def copy(self) -> "MemoryStore":
        """An independent copy (buffers cloned at their capacity, so appending to either never touches the other)."""
        new = copy.copy(self)
        new.k_BGMH, new.v_BGMH, new.valid_BM = (None if t is None else t.clone() for t in (self.k_BGMH, self.v_BGMH, self.valid_BM))
        return new

    def nbytes(self) -> int:
        """Bytes of the filled keys and values (the minimum a dense memory needs)."""
        if self.k_BGMH is None:
            return 0
        per_slot = self.k_BGMH[:, :, :1].numel() * self.k_BGMH.element_size() * 2
        return per_slot * self.length

    def allocated_bytes(self) -> int:
        """Bytes actually held: key/value buffers at capacity plus the validity mask."""
        if self.k_BGMH is None:
            return 0
        kv = 2 * self.k_BGMH.numel() * self.k_BGMH.element_size()
        return kv + self.valid_BM.numel() * self.valid_BM.element_size()

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        """The filled part as tensors (slot order preserved), for saving."""
        n = self.length
        if n == 0:
            return {}
        return {"k": self.k_BGMH[:, :, :n].contiguous(), "v": self.v_BGMH[:, :, :n].contiguous(),
                "valid": self.valid_BM[:, :n].contiguous()}  # fmt: skip

    def load_state(self, tensors: dict[str, torch.Tensor], next_slot: int, total_appended: int) -> None:
        self.k_BGMH = self.v_BGMH = self.valid_BM = None
        self.length = 0
        if tensors:
            k = tensors["k"]
            if k.dtype != self.dtype:
                raise ValueError(f"{self.name}: saved memory is {k.dtype}, the model stores {self.dtype}.")
            n = k.shape[2]
            if self.max_tokens is not None and n > self.max_tokens:
                raise ValueError(f"{self.name}: saved memory has {n} slots, more than mem_max_tokens={self.max_tokens}.")
            capacity = n if self.max_tokens is None else self.max_tokens
            self._allocate(max(capacity, 1), k)
            self.k_BGMH[:, :, :n] = k
            self.v_BGMH[:, :, :n] = tensors["v"]
            self.valid_BM[:, :n] = tensors["valid"]
            self.length = n
        self.next_slot = next_slot
        self.total_appended = total_appended
        self.all_valid = self.length == 0 or bool(self.valid_BM[:, : self.length].all())
