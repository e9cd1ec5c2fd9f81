"""The memory store of one memory layer: pre-RoPE keys, values and a validity mask per slot.

Shape legend: B batch, G KV heads, M memory slots, T tokens appended, H head dim.

Storage is preallocated and grows geometrically (x1.25), so appending N tokens one window at a time costs
O(N) copying in total instead of the O(N^2) of concatenating on every append, while the allocated size stays
within 1.25x of what is filled. With ``max_tokens`` the store is a ring of that many slots: new tokens
overwrite the oldest ones (FIFO eviction). Dense attention is a softmax over a *set*, so slot order does not
matter; readers get views of the filled slots and cast block by block. Keys and values are stored in
``dtype`` (the config's ``mem_dtype``).

With ``dtype`` int8 (``mem_dtype="int8"``) each key and value vector is stored as int8 codes plus one fp32
scale (``fot.quant``): ``k_BGMH``/``v_BGMH`` then hold codes and ``k_scale_BGM``/``v_scale_BGM`` the scales, and
``view()`` returns a ``QuantizedMemoryKV`` that dequantizes what its reader touches. Read stored keys through
``view()`` or ``keys_at``, never through ``k_BGMH`` directly, so int8 stores read right.

With ``offload_dir`` (``mem_offload="disk"``) the buffers are memory-mapped files in that folder instead of RAM:
the OS pages them in and out, so a memory larger than the RAM fits. After every append a small ``state.json``
(written atomically, after the data) records how many slots are filled and which files hold them, so a process
killed at any point leaves a folder that ``MemoryStore.open`` reloads with everything appended up to the last
completed append, or rejects with a one-line error; it is never read silently wrong.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import torch

from .quant import quantize
from .types import MemoryKV, QuantizedMemoryKV

INITIAL_CAPACITY = 1024
GROWTH = 1.25
OFFLOAD_FORMAT = "fot-memory-store/1"
STATE_FILE = "state.json"


def copy_on_write(*tensors: torch.Tensor, training: bool):
    """Buffers about to be written in place. In training, earlier views of them may be saved for backward (as
    attention inputs), so the write goes to a fresh copy instead; in inference it is in place."""
    if training:
        return tuple(t.clone() for t in tensors)
    return tensors


def per_slot_bytes(dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one memory slot takes in one batch row: keys + values (+ their fp32 scales for int8) + validity."""
    element = torch.empty((), dtype=dtype).element_size()
    scales = 2 * num_kv_heads * 4 if dtype == torch.int8 else 0
    return 2 * num_kv_heads * head_dim * element + scales + 1


class MemoryStore:
    """(key, value, valid) memory of one layer for a batch; append-only, or a FIFO ring with ``max_tokens``.

    Args:
        dtype: storage dtype of keys and values (a float dtype, or torch.int8 for 8-bit memory).
        max_tokens: capacity; None for unbounded.
        name: how errors refer to this store (e.g. "memory layer 6").
        offload_dir: a folder for memory-mapped buffer files (module docstring); None keeps them in RAM.
    """

    def __init__(self, dtype: torch.dtype, max_tokens: int | None = None, name: str = "memory",
                 offload_dir: str | os.PathLike | None = None):  # fmt: skip
        self.dtype = dtype
        self.quantized = dtype == torch.int8
        self.max_tokens = max_tokens
        self.name = name
        self.offload_dir = None if offload_dir is None else os.fspath(offload_dir)
        self.k_BGMH: torch.Tensor | None = None
        self.v_BGMH: torch.Tensor | None = None
        self.k_scale_BGM: torch.Tensor | None = None  # int8 stores only
        self.v_scale_BGM: torch.Tensor | None = None
        self.valid_BM: torch.Tensor | None = None
        self.length = 0  # filled slots
        self.next_slot = 0  # where the next token goes (== length until a bounded store wraps)
        self.total_appended = 0
        self.all_valid = True  # lets readers skip the mask when no padding ever entered memory
        self.expected = 0  # slots the caller announced (``expect``); growing allocates them at once
        self.allocations = 0  # how many times the buffers were (re)allocated, each copying what is filled
        if self.offload_dir is not None:
            os.makedirs(self.offload_dir, exist_ok=True)

    @property
    def capacity(self) -> int:
        return 0 if self.k_BGMH is None else self.k_BGMH.shape[2]

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Every allocated buffer by name (slots along dim 2 for k/v, dim 2 for scales, dim 1 for valid)."""
        names = ("k", "v", "k_scale", "v_scale", "valid") if self.quantized else ("k", "v", "valid")
        return {n: getattr(self, _ATTR[n]) for n in names}

    def _new_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        if self.offload_dir is None:
            return torch.empty(shape, dtype=dtype, device=device)
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.name}: mem_offload='disk' keeps memory on the CPU; run the model on the CPU "
                             "or use mem_offload='ram'.")  # fmt: skip
        path = os.path.join(self.offload_dir, f"{name}.{self.allocations}.bin")
        numel = 1
        for n in shape:
            numel *= n
        with open(path, "wb") as f:  # sparse: blocks are only written as slots fill
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)

    def _allocate(self, capacity: int, like: torch.Tensor) -> None:
        self.allocations += 1
        B, G, _, H = like.shape
        data_dtype = self.dtype
        new = {
            "k": self._new_buffer("k", (B, G, capacity, H), data_dtype, like.device),
            "v": self._new_buffer("v", (B, G, capacity, H), data_dtype, like.device),
            "valid": self._new_buffer("valid", (B, capacity), torch.bool, like.device),
        }
        if self.quantized:
            for name in ("k_scale", "v_scale"):
                new[name] = self._new_buffer(name, (B, G, capacity), torch.float32, like.device)
        new["valid"].fill_(True)
        n = self.length
        if n:
            old = self._buffers()
            for name, buf in new.items():
                if name == "valid":
                    buf[:, :n] = old[name][:, :n]
                else:
                    buf[:, :, :n] = old[name][:, :, :n]
        for name, buf in new.items():
            setattr(self, _ATTR[name], buf)
        if self.offload_dir is not None:
            self._write_state()  # names the new files; the old ones are no longer referenced
            for path in glob.glob(os.path.join(self.offload_dir, "*.bin")):
                if not path.endswith(f".{self.allocations}.bin"):
                    os.remove(path)

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

    def _check(self, k_BGTH: torch.Tensor, v_BGTH: torch.Tensor, training: bool) -> None:
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
        if training and (self.offload_dir is not None or self.quantized):
            raise ValueError(f"{self.name}: mem_offload='disk' and mem_dtype='int8' are for inference; train with "
                             "mem_offload='ram' and a float mem_dtype.")  # fmt: skip

    def _encode(self, x_BGTH: torch.Tensor):
        """What is written for new keys or values: (data, scales or None) in storage form."""
        x = x_BGTH.detach()
        if self.quantized:
            return quantize(x)
        return x.to(self.dtype), None

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
        self._check(k_BGTH, v_BGTH, training)
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
        (k_data, k_scale), (v_data, v_scale) = self._encode(k_BGTH), self._encode(v_BGTH)
        if slots is None:
            slots = torch.arange(self.next_slot, self.next_slot + T)
            sl = slice(self.next_slot, self.next_slot + T)
            self.k_BGMH[:, :, sl] = k_data
            self.v_BGMH[:, :, sl] = v_data
            if self.quantized:
                self.k_scale_BGM[:, :, sl] = k_scale
                self.v_scale_BGM[:, :, sl] = v_scale
            self.valid_BM[:, sl] = True if valid_BT is None else valid_BT
        else:
            idx = slots.to(self.k_BGMH.device)
            self.k_BGMH.index_copy_(2, idx, k_data)
            self.v_BGMH.index_copy_(2, idx, v_data)
            if self.quantized:
                self.k_scale_BGM.index_copy_(2, idx, k_scale)
                self.v_scale_BGM.index_copy_(2, idx, v_scale)
            new_valid = torch.ones_like(self.valid_BM[:, :T]) if valid_BT is None else valid_BT
            self.valid_BM.index_copy_(1, idx, new_valid)
        self.length = min(self.length + T, self.capacity) if bounded_full else self.length + T
        self.next_slot = int(slots[-1]) + 1
        if self.max_tokens is not None and self.next_slot >= self.max_tokens:
            self.next_slot = 0
        self.total_appended += T
        self._refresh_all_valid(valid_BT, overwrote=bounded_full)
        if self.offload_dir is not None:
            self._write_state()
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
        if self.offload_dir is not None:
            self._write_state()

    def view(self) -> MemoryKV | None:
        """The filled slots as a ``MemoryKV`` (views, no copy; for int8 a ``QuantizedMemoryKV`` that dequantizes
        on read), or None when empty."""
        if self.length == 0:
            return None
        n = self.length
        valid = None if self.all_valid else self.valid_BM[:, :n]
        if self.quantized:
            return QuantizedMemoryKV(self.k_BGMH[:, :, :n], self.k_scale_BGM[:, :, :n], self.v_BGMH[:, :, :n],
                                     self.v_scale_BGM[:, :, :n], valid)  # fmt: skip
        return MemoryKV(self.k_BGMH[:, :, :n], self.v_BGMH[:, :, :n], valid)

    def keys_at(self, slots: torch.Tensor) -> torch.Tensor:
        """The stored keys of ``slots`` (int64 [n]) for every batch row and KV head, [B, G, n, H]: in the storage
        dtype for float stores, dequantized to fp32 for int8 ones."""
        idx = slots.to(self.k_BGMH.device)
        if self.quantized:
            return QuantizedMemoryKV.decode(self.k_BGMH[:, :, idx], self.k_scale_BGM[:, :, idx])
        return self.k_BGMH[:, :, idx]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam reordering, batch selection, repeat)."""
        if self.k_BGMH is None:
            return
        if self.offload_dir is not None:
            raise ValueError(f"{self.name}: a disk-offloaded memory cannot reorder or repeat batch rows (beam search, "
                             "num_return_sequences > 1); use mem_offload='ram' for those.")  # fmt: skip
        index = index.to(self.k_BGMH.device)
        for name, buf in self._buffers().items():
            setattr(self, _ATTR[name], buf.index_select(0, index))

    def copy(self) -> "MemoryStore":
        """An independent copy (buffers cloned at their capacity, so appending to either never touches the other)."""
        if self.offload_dir is not None:
            raise ValueError(f"{self.name}: a disk-offloaded memory is not copied (it may not fit in RAM); share it "
                             "read-only with cache.fork() instead.")  # fmt: skip
        new = copy.copy(self)
        for name, buf in self._buffers().items():
            setattr(new, _ATTR[name], None if buf is None else buf.clone())
        return new

    def nbytes(self) -> int:
        """Bytes of the filled keys and values (+ scales for int8): the minimum a dense memory needs."""
        if self.k_BGMH is None:
            return 0
        B, G, _, H = self.k_BGMH.shape
        return B * (per_slot_bytes(self.dtype, G, H) - 1) * self.length

    def allocated_bytes(self) -> int:
        """Bytes actually held (in RAM, or in the files of a disk-offloaded store): buffers at capacity, validity
        mask included."""
        if self.k_BGMH is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._buffers().values())

    def ram_bytes(self) -> int:
        """Bytes held in process memory: ``allocated_bytes`` for a RAM store, 0 for a disk-offloaded one (its pages
        belong to the OS's file cache, which gives them back under pressure)."""
        return 0 if self.offload_dir is not None else self.allocated_bytes()

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        """The filled part as tensors (slot order preserved), for saving."""
        n = self.length
        if n == 0:
            return {}
        out = {}
        for name, buf in self._buffers().items():
            out[name] = (buf[:, :n] if name == "valid" else buf[:, :, :n]).contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], next_slot: int, total_appended: int) -> None:
        for name in _ATTR.values():
            setattr(self, name, None)
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
            for name, buf in self._buffers().items():
                if name == "valid":
                    buf[:, :n] = tensors[name]
                else:
                    buf[:, :, :n] = tensors[name]
            self.length = n
        self.next_slot = next_slot
        self.total_appended = total_appended
        self.all_valid = self.length == 0 or bool(self.valid_BM[:, : self.length].all())
        if self.offload_dir is not None:
            self._write_state()

    # ------------------------------------------------------------------ disk offload
    def _write_state(self) -> None:
        """Record the filled slots and the files that hold them, atomically (a killed write leaves the last one)."""
        B, G, C, H = self.k_BGMH.shape
        state = {
            "format": OFFLOAD_FORMAT, "dtype": str(self.dtype).removeprefix("torch."), "shape": [B, G, C, H],
            "generation": self.allocations, "length": self.length, "next_slot": self.next_slot,
            "total_appended": self.total_appended, "all_valid": self.all_valid, "max_tokens": self.max_tokens,
        }  # fmt: skip
        path = os.path.join(self.offload_dir, STATE_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)

    @classmethod
    def open(cls, offload_dir: str | os.PathLike, dtype: torch.dtype, max_tokens: int | None = None,
             name: str = "memory") -> "MemoryStore":  # fmt: skip
        """Reopen a disk-offloaded store from its folder (after the process that filled it ended or was killed).

        Raises:
            ValueError: the folder holds no store, one of another dtype or capacity bound, or files that do not
                hold what its ``state.json`` says (one line, naming the folder).
        """
        offload_dir = os.fspath(offload_dir)
        path = os.path.join(offload_dir, STATE_FILE)
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{offload_dir} holds no readable fot memory ({type(err).__name__}: {err}); start a new "
                             "cache.") from err  # fmt: skip
        if state.get("format") != OFFLOAD_FORMAT:
            raise ValueError(f"{offload_dir} has memory format {state.get('format')!r}; this version reads "
                             f"{OFFLOAD_FORMAT!r}.")  # fmt: skip
        saved_dtype = getattr(torch, state["dtype"])
        if saved_dtype != dtype or state["max_tokens"] != max_tokens:
            raise ValueError(f"{offload_dir} holds {state['dtype']} memory with mem_max_tokens={state['max_tokens']}, "
                             f"the model asks for {dtype} with {max_tokens}; start a new cache.")  # fmt: skip
        store = cls(dtype, max_tokens, name, offload_dir)
        store.allocations = state["generation"]
        B, G, C, H = state["shape"]
        shapes = {"k": (B, G, C, H), "v": (B, G, C, H), "valid": (B, C), "k_scale": (B, G, C), "v_scale": (B, G, C)}
        dtypes = {"k": dtype, "v": dtype, "valid": torch.bool, "k_scale": torch.float32, "v_scale": torch.float32}
        names = ("k", "v", "k_scale", "v_scale", "valid") if store.quantized else ("k", "v", "valid")
        for n in names:
            file = os.path.join(offload_dir, f"{n}.{store.allocations}.bin")
            numel = 1
            for d in shapes[n]:
                numel *= d
            expected = numel * torch.empty((), dtype=dtypes[n]).element_size()
            size = os.path.getsize(file) if os.path.exists(file) else None
            if size != expected:
                raise ValueError(f"{offload_dir} is incomplete: {os.path.basename(file)} has {size} bytes where "
                                 f"{STATE_FILE} needs {expected}; start a new cache.")  # fmt: skip
            setattr(store, _ATTR[n], torch.from_file(file, shared=True, size=numel, dtype=dtypes[n]).view(shapes[n]))
        store.length, store.next_slot = state["length"], state["next_slot"]
        store.total_appended, store.all_valid = state["total_appended"], state["all_valid"]
        return store

    def truncate(self, total_appended: int) -> None:
        """Forget every slot appended after the first ``total_appended`` (to line up stores whose process was
        killed between two layers' appends). Only an append-only store that never wrapped can go back."""
        if total_appended == self.total_appended:
            return
        if total_appended > self.total_appended or self.total_appended != self.length:
            raise ValueError(f"{self.name}: cannot go back from {self.total_appended} to {total_appended} appended "
                             "tokens (a bounded memory overwrote them); start a new cache.")  # fmt: skip
        self.length = self.next_slot = self.total_appended = total_appended
        self.all_valid = self.length == 0 or bool(self.valid_BM[:, : self.length].all())
        if self.offload_dir is not None:
            self._write_state()


_ATTR = {"k": "k_BGMH", "v": "v_BGMH", "k_scale": "k_scale_BGM", "v_scale": "v_scale_BGM", "valid": "valid_BM"}
