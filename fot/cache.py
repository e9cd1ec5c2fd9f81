"""Long-input and generation state: the local window of every layer plus the memory of memory layers.

Shape legend: B batch, G KV heads, S local tokens, T new tokens, H head dim.

``LongLlamaCache`` is a transformers ``Cache`` so ``generate`` can carry it, reorder it for beam search and
repeat it for multiple return sequences. All writes to state go through it, from the model's decoder layers and
layer loop, never from inside an attention forward. In inference, a decoder layer stages its chunk's keys in the
free slots after the committed prefix before it attends (so decoding reads views and never re-copies the
window); in training (the forward plan's ``training``, passed to every write) it extends a frozen snapshot by
concatenation, so activation checkpointing recomputes exactly. Either way the model's layer loop commits the
chunk afterwards. Buffers written in training are copied first (copy-on-write), so views saved for backward stay
valid. The cache's ``policy`` is its default; a forward's plan may override it for one call without changing it.

Local windows keep both the raw (pre-RoPE) keys, which memory needs, and the keys rotated at positions
relative to the start of the local window, which local attention needs. Positions restart at 0 whenever the
window start moves (eviction), so rotated keys are recomputed from the raw ones then, once per eviction.

Cache policy when a chunk of T tokens would overflow the window (S + T > W):
  * "flush" (the reference): the whole local window moves to memory in memory layers and is dropped in the
    others; the local context restarts with the new chunk.
  * "slide" (default): the oldest tokens are evicted so that the local window keeps its most recent
    min(L, W - T) tokens (L = last_context_length). Evicted tokens move to memory in memory layers and are
    dropped in the others, which therefore always keep at least L tokens of context instead of restarting
    from one. Evictions happen once every W - L tokens, not every token.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.cache_utils import Cache

# Both: budget.<name> is read at call time (tests replace budget.available_bytes), and transformers copies a
# checkpoint's code (save_pretrained(save_code=True)) by following `from .x import` lines only, not `from . import x`.
from . import budget
from .budget import check_enabled
from .config import LongLlamaConfig
from .memory import MemoryStore, copy_on_write
from .rope import apply_rope, rope_cos_sin
from .blocks import BlockIndex
from .search import KeySearch, SearchFactory, default_search_factory
from .types import BlockChoice, ForwardPlan, LocalKV

INITIAL_LOCAL_CAPACITY = 256


class GatherScratch:
    """Reusable output buffers for the retrieved keys and values of top-k attention (inference only).

    A block's gather is megabytes; allocated fresh each time, the allocator hands back unmapped pages and
    every 4 KiB page costs a fault on first write, which on CPU took longer than the gather itself (the
    retrieval step of a 64K-token prefill spent most of its time there). The cache owns one scratch for its
    lifetime, so a prefill maps these pages once. Callers must be done with the previous block's tensors
    before asking for the next (``fot.attention.fused_topk_attention`` is: nothing it returns aliases them).
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """Two uninitialised tensors of ``shape`` (for keys and values), views of a buffer kept for reuse."""
        n = math.prod(shape)
        key = (dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < 2 * n:
            buf = self._buffers[key] = torch.empty(2 * n, dtype=dtype, device=device)
        return buf[:n].view(shape), buf[n : 2 * n].view(shape)


class LocalWindow:
    """The local keys/values of one layer, in buffers that grow geometrically up to the window length."""

    def __init__(self, window: int):
        self.window = window
        self.raw_k = self.rot_k = self.v = None  # [B, G, capacity, H]
        self.valid = None  # [B, capacity] bool
        self.length = 0
        self.all_valid = True

    @property
    def capacity(self) -> int:
        return 0 if self.raw_k is None else self.raw_k.shape[2]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        B, G, _, H = like.shape
        capacity = max(INITIAL_LOCAL_CAPACITY, self.capacity)
        while capacity < needed:
            capacity *= 2
        capacity = max(min(capacity, self.window), needed)
        buffers = [like.new_empty((B, G, capacity, H)) for _ in range(3)]
        valid = torch.ones((B, capacity), dtype=torch.bool, device=like.device)
        if self.length:
            for new, old in zip(buffers, (self.raw_k, self.rot_k, self.v)):
                new[:, :, : self.length] = old[:, :, : self.length]
            valid[:, : self.length] = self.valid[:, : self.length]
        self.raw_k, self.rot_k, self.v = buffers
        self.valid = valid

    def _check_input(self, k_BGTH: torch.Tensor) -> None:
        if self.raw_k is not None and (self.raw_k.dtype != k_BGTH.dtype or self.raw_k.shape[0] != k_BGTH.shape[0]):
            raise ValueError(
                "the cache was filled with a different batch size or dtype than this input; start a new cache."
            )

    def _any_padding(self, valid_BT) -> bool:
        return not self.all_valid or (valid_BT is not None and not bool(valid_BT.all()))

    def extend(self, k_rot_BGTH, v_BGTH, valid_BT) -> LocalKV:
        """Inference: stage a chunk in the free slots after the committed prefix and return views of
        prefix + chunk, so decoding never re-copies the window. Rewriting the same slots is harmless."""
        self._check_input(k_rot_BGTH)
        end = self.length + k_rot_BGTH.shape[2]
        if end > self.capacity:
            self._grow(end, k_rot_BGTH)
        self.rot_k[:, :, self.length : end] = k_rot_BGTH
        self.v[:, :, self.length : end] = v_BGTH
        self.valid[:, self.length : end] = True if valid_BT is None else valid_BT
        valid = self.valid[:, :end] if self._any_padding(valid_BT) else None
        return LocalKV(self.rot_k[:, :, :end], self.v[:, :, :end], valid)

    def snapshot(self) -> "LocalSnapshot":
        """Training: a frozen view of the committed prefix; extending it never writes to the cache, so a
        checkpointed layer recomputes exactly what it computed in its forward."""
        n = self.length
        if n == 0:
            return LocalSnapshot(None, None, None)
        return LocalSnapshot(self.rot_k[:, :, :n], self.v[:, :, :n], None if self.all_valid else self.valid[:, :n])

    def commit(self, k_raw_BGTH, k_rot_BGTH, v_BGTH, valid_BT, *, training: bool) -> None:
        """Append a chunk that was attended to the window (``training``: copy the buffers first)."""
        self._check_input(k_raw_BGTH)
        end = self.length + k_raw_BGTH.shape[2]
        if end > self.capacity:
            self._grow(end, k_raw_BGTH)
        buffers = copy_on_write(self.raw_k, self.rot_k, self.v, self.valid, training=training)
        self.raw_k, self.rot_k, self.v, self.valid = buffers
        self.raw_k[:, :, self.length : end] = k_raw_BGTH.detach()
        self.rot_k[:, :, self.length : end] = k_rot_BGTH.detach()
        self.v[:, :, self.length : end] = v_BGTH.detach()
        self.valid[:, self.length : end] = True if valid_BT is None else valid_BT
        self.all_valid = not self._any_padding(valid_BT)
        self.length = end

    def evict(self, keep: int, inv_freq: torch.Tensor | None, *, training: bool):
        """Drop all but the last ``keep`` tokens; return the evicted (raw_k, v, valid) for memory."""
        n_out = self.length - keep
        evicted = (
            self.raw_k[:, :, :n_out].clone(),
            self.v[:, :, :n_out].clone(),
            self.valid[:, :n_out].clone(),
        )
        if keep:
            buffers = copy_on_write(self.raw_k, self.rot_k, self.v, self.valid, training=training)
            self.raw_k, self.rot_k, self.v, self.valid = buffers
            for buf in (self.raw_k, self.v):
                buf[:, :, :keep] = buf[:, :, n_out : self.length].clone()
            self.valid[:, :keep] = self.valid[:, n_out : self.length].clone()
            raw = self.raw_k[:, :, :keep]
            if inv_freq is None:
                self.rot_k[:, :, :keep] = raw
            else:
                cos, sin = rope_cos_sin(torch.arange(keep, device=raw.device), inv_freq, raw.dtype)
                self.rot_k[:, :, :keep] = apply_rope(raw, cos, sin)
        self.length = keep
        self.all_valid = bool(self.valid[:, :keep].all()) if keep else True
        return evicted

    def copy(self) -> "LocalWindow":
        new = copy.copy(self)
        new.raw_k, new.rot_k, new.v, new.valid = (
            None if t is None else t.clone() for t in (self.raw_k, self.rot_k, self.v, self.valid)
        )
        return new

    def select_batch(self, index: torch.Tensor) -> None:
        if self.raw_k is None:
            return
        index = index.to(self.raw_k.device)
        self.raw_k, self.rot_k, self.v = (t.index_select(0, index) for t in (self.raw_k, self.rot_k, self.v))
        self.valid = self.valid.index_select(0, index)


class LocalSnapshot:
    """The committed prefix of a local window (or nothing), extended by concatenation (autograd-safe)."""

    def __init__(self, k_rot_BGSH, v_BGSH, valid_BS):
        self.k_rot_BGSH, self.v_BGSH, self.valid_BS = k_rot_BGSH, v_BGSH, valid_BS

    def extend(self, k_rot_BGTH, v_BGTH, valid_BT) -> LocalKV:
        if self.k_rot_BGSH is None:
            return LocalKV(k_rot_BGTH, v_BGTH, valid_BT)
        k = torch.cat([self.k_rot_BGSH, k_rot_BGTH], dim=2)
        v = torch.cat([self.v_BGSH, v_BGTH], dim=2)
        valid = None
        if self.valid_BS is not None or valid_BT is not None:
            B, S, T = k.shape[0], self.k_rot_BGSH.shape[2], k_rot_BGTH.shape[2]
            prefix = self.valid_BS if self.valid_BS is not None else k.new_ones((B, S), dtype=torch.bool)
            new = valid_BT if valid_BT is not None else k.new_ones((B, T), dtype=torch.bool)
            valid = torch.cat([prefix, new], dim=1)
        return LocalKV(k, v, valid)


class MemoryReader:
    """Read-only access to one memory layer for attention: the dense view, or top-k retrieval.

    The view is captured when the reader is made (before the layer runs), so a checkpointed layer that is
    recomputed during backward sees exactly the memory its forward saw, whatever was appended since.
    """

    def __init__(self, store: MemoryStore, search: KeySearch | None, top_k: int | None,
                 scratch: GatherScratch | None = None, score_bias: float = 0.0):  # fmt: skip
        self.search, self.top_k = search, top_k
        self.scratch = scratch  # the cache's buffers for top-k gathers (``GatherScratch``)
        self.dtype = store.dtype
        self.score_bias = score_bias  # ``mem_score_bias``, carried by the view to every attention path
        self._view = store.view()
        if self._view is not None:
            self._view.score_bias = score_bias
        self.num_kv_heads = None if store.k_BGMH is None else store.k_BGMH.shape[1]

    def view(self) -> MemoryKV | None:
        return self._view

    def retrieve(self, q_BNTH: torch.Tensor) -> torch.Tensor:
        """Top-k slot indices [B, N, T, K] (-1 = none) for rotated queries, searched per KV head."""
        return self.retrieve_scored(q_BNTH)[0]

    def retrieve_scored(self, q_BNTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``retrieve``'s indices, the search's fp32 scores q . k of those slots [B, N, T, K] or None: the
        backend's ``search_scored``)."""
        B, N, T, H = q_BNTH.shape
        G = self.num_kv_heads
        q_BGXH = q_BNTH.reshape(B, G, (N // G) * T, H)  # query heads of one KV head are adjacent
        idx_BGXK, s_BGXK = self.search.search_scored(q_BGXH, self._view, self.top_k)
        shape = (B, N, T, self.top_k)
        return idx_BGXK.reshape(shape), None if s_BGXK is None else s_BGXK.reshape(shape)

    def choose_blocks(self, q_BNTH: torch.Tensor) -> BlockChoice:
        """The blocks each chunk of rotated queries reads (``mem_blocks``, ``fot.blocks``)."""
        index = self.search
        return BlockChoice(index.choose(q_BNTH, index.n_blocks, index.chunk), index.block_size, index.chunk)


class LongLlamaCache(Cache):
    """State of a LongLLaMA model across windows and generation steps.

    Args:
        config: the model config (window length, memory layers, memory dtype, cache policy).
        cache_policy: overrides ``config.cache_policy`` ("slide" or "flush") as this cache's default; a
            forward's ``cache_policy`` argument overrides it for that call only.
        search_factory: builds the search backend of each memory layer with ``mem_top_k``, called as
            ``search_factory(config, layer_idx)``; by default the backend of ``config.mem_index``.
        gather_scratch: builds the buffers top-k gathers reuse (``GatherScratch``); a factory returning None
            makes every gather allocate fresh tensors.
        preallocate_memory: a forward announces how many tokens it moves to memory (``expect_memory``), so each
            store is allocated once, at its final size. False grows the stores step by step instead (x1.25, each
            step copying all of memory), with the same results.
    """

    def __init__(self, config: LongLlamaConfig, cache_policy: str | None = None,
                 search_factory: SearchFactory = default_search_factory,
                 gather_scratch: Callable[[], GatherScratch | None] = GatherScratch,
                 preallocate_memory: bool = True, offload: bool = True):  # fmt: skip
        super().__init__(layers=[])
        self._offload = offload  # False: open_offloaded fills the stores from existing files
        self.policy = cache_policy or config.cache_policy  # validated by the plan of each forward
        self.window = config.max_position_embeddings
        self.mem_layers = tuple(config.mem_layers)
        self.locals = [LocalWindow(self.window) for _ in range(config.num_hidden_layers)]
        self.config = config
        self.top_k = config.mem_top_k
        self.blocks = config.mem_blocks
        self.memories: dict[int, MemoryStore] = {}
        self.searches: dict[int, KeySearch] = {}
        self.search_factory = search_factory
        self.memories, self.searches = {}, {}  # a fork's shared stores are left as they are
        self._new_memories()
        self.seen_tokens = 0
        self.overlap_context = None  # see keep_overlap_context
        self.shares_memory = False
        self.gather_scratch = gather_scratch
        self.scratch = gather_scratch()  # reused by every top-k gather while this cache lives
        self.preallocate_memory = preallocate_memory
        self.shares_memory = False  # a fork(): memory is read-only

    def _new_memories(self) -> None:
        cfg = self.config
        self.offload_path = None  # the folder of this cache's memory files (mem_offload="disk")
        if cfg.mem_offload == "disk" and cfg.mem_layers and self._offload:
            os.makedirs(cfg.mem_offload_dir, exist_ok=True)
            self.offload_path = tempfile.mkdtemp(prefix="cache-", dir=cfg.mem_offload_dir)
            with open(os.path.join(self.offload_path, OFFLOAD_HEADER), "w") as f:
                json.dump({"format": CACHE_FORMAT, "fingerprint": _fingerprint(cfg)}, f)
        for i in cfg.mem_layers:
            folder = None if self.offload_path is None else os.path.join(self.offload_path, f"layer-{i}")
            self.memories[i] = MemoryStore(cfg.mem_torch_dtype, cfg.mem_max_tokens, name=f"memory layer {i}",
                                           offload_dir=folder)  # fmt: skip
            if cfg.mem_top_k is not None:
                self.searches[i] = self.search_factory(cfg, i)
            elif cfg.mem_blocks is not None:  # block retrieval's index: block bounds, not a top-k search
                self.searches[i] = BlockIndex(cfg.mem_block_size, cfg.mem_blocks, cfg.mem_block_queries)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.locals)

    def __repr__(self) -> str:
        return (
            f"LongLlamaCache(policy={self.policy!r}, seen_tokens={self.seen_tokens}, local={self.local_length}, "
            f"memory={self.memory_length})"
        )

    @property
    def local_length(self) -> int:
        return self.locals[0].length

    @property
    def free_tokens(self) -> int:
        """The window's free room: how many more tokens the local windows take before any moves to memory (a
        ``fork()`` may continue this far)."""
        return self.window - self.local_length

    @property
    def memory_length(self) -> int:
        return next(iter(self.memories.values())).length if self.memories else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (memory + local), which is what ``generate`` needs to slice new input ids."""
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    # transformers' Cache derives these from its per-layer objects; fot keeps its own per-layer state instead.
    @property
    def is_linear(self) -> list[bool]:
        """Every layer attends (none is a recurrent state): transformers 5.24+ then slices a prompt that
        repeats the cached tokens down to the new ones."""
        return [False] * len(self.locals)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.locals)

    @property
    def batch_size(self) -> int:
        """The batch size the cache was filled with, or -1 while it is empty (transformers' convention)."""
        size = self._batch_size()
        return -1 if size is None else size

    def crop(self, max_length: int) -> None:
        raise ValueError("LongLlamaCache cannot be cropped: tokens already moved to memory cannot be taken back.")

    # ------------------------------------------------------------------ writes (model loop only)
    def make_room(self, T: int, inv_freqs: list[torch.Tensor | None], *, plan: ForwardPlan) -> None:
        """Evict local tokens (by ``plan.cache_policy``) so that a chunk of T tokens fits in the window."""
        S = self.local_length
        if S == 0 or S + T <= self.window:
            return
        keep = 0 if plan.cache_policy == "flush" else min(S, plan.last_context_length, self.window - T)
        for idx, local in enumerate(self.locals):
            k_raw, v, valid = local.evict(keep, inv_freqs[idx], training=plan.training)
            if idx in self.memories:
                self.append_memory(idx, k_raw, v, valid, training=plan.training)

    def expect_memory(self, tokens: int, *, n_tokens: int | None = None, batch_size: int = 1, device=None) -> None:
        """``tokens`` more tokens of an input of ``n_tokens`` are about to go to every memory layer: first check
        that they fit the memory that is free (``fot.budget``; raises ``MemoryBudgetError`` before anything is
        computed), then each store allocates them at once (unless the cache was made with
        ``preallocate_memory=False``)."""
        if self.shares_memory and tokens:
            self._check_writable(f"move {tokens} tokens to memory")
        if tokens and self.memories and check_enabled():
            self._check_budget(tokens, tokens if n_tokens is None else n_tokens, batch_size, device)
        if not self.preallocate_memory or self.shares_memory:
            return
        for store in self.memories.values():
            store.expect(tokens)

    def _check_budget(self, tokens: int, n_tokens: int, batch_size: int, device) -> None:
        """``budget.check_memory_fits`` for growing memory by ``tokens``: what this cache holds already and will
        free as it grows (every store's old buffers but the one being copied, the index, the local windows)
        counts as free, and the weights are loaded already."""
        held = [s.ram_bytes() for s in self.memories.values()]
        batch = self._batch_size() or batch_size
        index = sum(budget.index_bytes(self.config, self.memory_length, batch, layer)
                    for layer in self.searches)  # O(1) a layer, unlike nbytes
        freed = sum(held) - max(held) + index + self.local_bytes()
        budget.check_memory_fits(
            self.config, n_tokens, available=budget.available_bytes(device) + freed, batch=batch_size,
            include_weights=False, memory_tokens=self.memory_length + tokens,
        )  # fmt: skip

    def local_bytes(self) -> int:
        """Bytes of the local windows' buffers."""
        return sum(sum(t.numel() * t.element_size() for t in (w.raw_k, w.rot_k, w.v, w.valid) if t is not None)
                   for w in self.locals)  # fmt: skip

    def append_memory(self, layer_idx: int, k_raw_BGTH, v_BGTH, valid_BT, *, training: bool = False) -> None:
        """Write to a memory layer's store and keep its search index current (``training``: copy-on-write)."""
        self._check_writable(f"move {k_raw_BGTH.shape[2]} tokens to memory")
        kv_heads = self.config.memory_kv_heads(layer_idx)
        if kv_heads is not None:  # mem_heads: only the KV heads its query heads read, one per query head
            index = torch.tensor(kv_heads, device=k_raw_BGTH.device)
            k_raw_BGTH, v_BGTH = k_raw_BGTH.index_select(1, index), v_BGTH.index_select(1, index)
        store = self.memories[layer_idx]
        filled_before = store.length
        slots = store.append(k_raw_BGTH, v_BGTH, valid_BT, training=training)
        search = self.searches.get(layer_idx)
        if search is not None and slots.numel():
            evicted = filled_before + slots.numel() > store.length
            search.update(store, slots, evicted)

    def memory_reader(self, layer_idx: int) -> MemoryReader | None:
        if layer_idx not in self.memories:
            return None
        return MemoryReader(self.memories[layer_idx], self.searches.get(layer_idx), self.top_k, self.scratch,
                            self.config.mem_score_bias)  # fmt: skip

    def clear_memory(self, rows=None) -> None:
        """Forget what batch ``rows`` (all when None) have in memory; the local windows are kept."""
        self._check_writable("clear memory")
        for store in self.memories.values():
            store.clear(rows)
        # Search indexes keep the cleared slots; every backend filters retrieved slots by validity.

    def memory_bytes(self) -> dict[str, int]:
        """RAM of the memory: the minimum (filled keys + values), what is allocated, and the index's own."""
        return {
            "keys_values": sum(s.nbytes() for s in self.memories.values()),
            "allocated": sum(s.allocated_bytes() for s in self.memories.values()),
            "index": sum(s.nbytes() for s in self.searches.values()),
        }

    def copy(self) -> "LongLlamaCache":
        """An independent copy: local windows, memories and search indexes are cloned.

        ``generate`` and ``forward`` extend the cache they are given. To ask several questions about one long
        prefilled document, give each call ``cache.copy()``, so no question sees another's tokens or answer
        (or ``fork()``, which shares the memory read-only, for continuations that fit in the window).
        """
        new = copy.copy(self)
        new.layers = list(self.layers)
        new.locals = [local.copy() for local in self.locals]
        new.memories = {i: store.copy() for i, store in self.memories.items()}
        new.searches = {i: search.copy() for i, search in self.searches.items()}
        new.scratch = self.gather_scratch()
        new.shares_memory = False  # a copy of a fork owns its memory
        return new

    def fork(self) -> "LongLlamaCache":
        """A copy that shares this cache's memories and search indexes instead of cloning them: only the local
        windows are copied, so a fork of a 1M-token cache costs kilobytes where ``copy()`` costs gigabytes.

        A fork may read memory but never write it: a continuation that would move tokens to memory (one longer
        than the window's free room, ``free_tokens``) raises instead of changing the memory that
        this cache and its other forks share. Use ``copy()`` for those.
        """
        new = copy.copy(self)
        new.layers = list(self.layers)
        new.locals = [local.copy() for local in self.locals]
        new.memories, new.searches = dict(self.memories), dict(self.searches)  # the same stores and indexes
        new.scratch = self.gather_scratch()
        new.shares_memory = True
        return new

    def _check_writable(self, what: str) -> None:
        if self.shares_memory:
            raise ValueError(f"this cache is a fork() and shares its memory with the cache it came from, so it "
                             f"cannot {what}; continue a copy() instead, or keep the continuation within the "
                             f"window's free room (free_tokens, {self.free_tokens} here).")

    def save(self, path) -> None:
        """Write this cache to ``path`` (one safetensors file); see ``save_cache``."""
        save_cache(self, path)

    @classmethod
    def load(cls, path, config: LongLlamaConfig, device=None,
             search_factory: SearchFactory = default_search_factory) -> "LongLlamaCache":  # fmt: skip
        """Read a cache saved by ``save`` for a model with ``config``; see ``load_cache``."""
        return load_cache(path, config, device, search_factory)

    @classmethod
    def open_offloaded(cls, path, config: LongLlamaConfig,
                       search_factory: SearchFactory = default_search_factory) -> "LongLlamaCache":  # fmt: skip
        """Reopen the memory files of a disk-offloaded cache (``offload_path``) after its process ended or was
        killed, to continue a prefill: ``model(input_ids[:, cache.seen_tokens:], cache=cache)`` then computes
        what the uninterrupted prefill would have.

        Every memory layer is cut back to the tokens all of them hold (a kill can fall between two layers'
        appends), ``seen_tokens`` is that count, the local windows are empty and the search indexes are rebuilt
        from the stored keys. Its files stay in ``path`` and grow there.

        Raises:
            ValueError: ``path`` holds no such cache, one of another model configuration, or damaged files.
        """
        path = os.fspath(path)
        try:
            with open(os.path.join(path, OFFLOAD_HEADER)) as f:
                header = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not the folder of a disk-offloaded fot cache ({type(err).__name__}).") from err
        saved, expected = header.get("fingerprint", {}), _fingerprint(config)
        diff = [k for k in expected if saved.get(k) != expected[k]]
        if header.get("format") != CACHE_FORMAT or diff:
            raise ValueError(f"{path} was written for another model configuration or version (differs in: "
                             f"{', '.join(diff) or 'format'}); start a new cache.")  # fmt: skip
        cache = cls(config, search_factory=search_factory, offload=False)
        cache.offload_path, cache._offload = path, True
        for i in cache.memories:
            cache.memories[i] = MemoryStore.open(os.path.join(path, f"layer-{i}"), config.mem_torch_dtype,
                                                 config.mem_max_tokens, name=f"memory layer {i}")  # fmt: skip
        common = min(store.total_appended for store in cache.memories.values())
        for i, store in cache.memories.items():
            store.truncate(common)
            search = cache.searches.get(i)
            if search is not None:
                search.load_state(store, {}, None)
        cache.seen_tokens = common
        if common and config.window_overlap:
            context = os.path.join(path, OVERLAP_FILE.format(end=common))
            if not os.path.isfile(context):
                raise ValueError(f"{path} has memory up to token {common} but not the window_overlap context of that "
                                 "window bound (written by an older fot?); start a new cache.")
            payload = torch.load(context, weights_only=True)
            cache.overlap_context = (payload["embeds"], payload["valid"])
        return cache

    def local_for_attention(self, layer_idx: int, *, training: bool):
        """What a decoder layer extends with its chunk before attending: the window itself (inference) or, in
        training, a frozen snapshot (a checkpointed layer then recomputes exactly)."""
        local = self.locals[layer_idx]
        return local.snapshot() if training else local

    def commit(self, layer_idx: int, k_raw_BGTH, k_rot_BGTH, v_BGTH, valid_BT, *, to_memory: bool,
               training: bool) -> None:  # fmt: skip
        """After layer ``layer_idx`` attended a chunk: keep it locally, or move it straight to memory."""
        if to_memory:
            if layer_idx in self.memories:
                self.append_memory(layer_idx, k_raw_BGTH, v_BGTH, valid_BT, training=training)
        else:
            self.overlap_context = None  # tokens now follow the last memory-bound window: it is no longer the last
            self.locals[layer_idx].commit(k_raw_BGTH, k_rot_BGTH, v_BGTH, valid_BT, training=training)

    def keep_overlap_context(self, x_BOD: torch.Tensor, valid_BO: torch.Tensor | None, end: int) -> None:
        """Keep the inputs (embeddings) of the last ``config.window_overlap`` tokens bound for memory, which end at
        token ``end``. One forward re-reads them before the next memory-bound window; a later call that starts
        with an empty local window (after a prefill into memory, ``fot.prefill``, or ``open_offloaded``)
        re-reads them from here, so a prefill split into calls at window bounds computes what one call would. A
        disk-offloaded cache also writes them next to its memory files, before the window runs (the last three
        kept), so that ``open_offloaded`` finds the context of whichever window bound a kill leaves it at."""
        # copies: a slice is a view that would keep the call's whole input embeddings alive with the cache
        self.overlap_context = (x_BOD.detach().clone(), None if valid_BO is None else valid_BO.detach().clone())
        if self.offload_path is None:
            return
        payload = {"embeds": x_BOD.detach().cpu(), "valid": None if valid_BO is None else valid_BO.detach().cpu()}
        path = os.path.join(self.offload_path, OVERLAP_FILE.format(end=end))
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)
        for old in sorted(_overlap_files(self.offload_path))[:-3]:
            os.remove(os.path.join(self.offload_path, OVERLAP_FILE.format(end=old)))

    # ------------------------------------------------------------------ batch surgery
    def _select(self, index: torch.Tensor) -> None:
        self._check_writable("reorder or select batch rows")
        for local in self.locals:
            local.select_batch(index)
        for store in self.memories.values():
            store.select_batch(index)
        for search in self.searches.values():
            search.select_batch(index)
        if self.overlap_context is not None:
            x, valid = self.overlap_context
            self.overlap_context = (x[index.to(x.device)], None if valid is None else valid[index.to(valid.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self._batch_size()
        if batch is not None:
            self._select(torch.arange(batch).repeat_interleave(repeats))

    def _batch_size(self) -> int | None:
        for local in self.locals:
            if local.raw_k is not None:
                return local.raw_k.shape[0]
        for store in self.memories.values():
            if store.k_BGMH is not None:
                return store.k_BGMH.shape[0]
        return None

    def reset(self) -> None:
        for i in range(len(self.locals)):
            self.locals[i] = LocalWindow(self.window)
        self._new_memories()
        self.seen_tokens = 0
        self.overlap_context = None


# ---------------------------------------------------------------------------------------------- persistence
CACHE_FORMAT = "fot-longllama-cache/1"
OVERLAP_FILE = "overlap-{end}.pt"  # in a disk-offloaded cache's folder: keep_overlap_context's inputs at a window bound


def _overlap_files(folder: str) -> list[int]:
    """The window bounds whose overlap context a disk-offloaded cache's folder holds."""
    ends = []
    for name in os.listdir(folder):
        head, _, tail = name.partition("overlap-")
        if not head and tail.endswith(".pt") and tail[:-3].isdigit():
            ends.append(int(tail[:-3]))
    return ends
OFFLOAD_HEADER = "cache.json"  # in a disk-offloaded cache's folder: the format and the model fingerprint
_FINGERPRINT_FIELDS = (
    "num_hidden_layers", "mem_layers", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size",
    "max_position_embeddings", "mem_dtype", "mem_positionals", "mem_max_tokens", "mem_heads",
    "rope_theta",  # local keys are stored rotated: another theta would read them at wrong angles
)  # fmt: skip


def _fingerprint(config: LongLlamaConfig) -> dict:
    """The fields a saved memory depends on, as JSON gives them back (so mem_heads' layers are strings)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in _FINGERPRINT_FIELDS}))


def _checksum(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """SHA-256 over the header (every field but the hash itself) and every tensor."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_cache(cache: LongLlamaCache, path: str | os.PathLike, writer: Callable = save_file) -> None:
    """Write the cache (local windows, memories, search indexes, counters) to one safetensors file, atomically.

    The header records the format, the model fingerprint (layers, heads, dims, memory dtype ...) and a
    SHA-256 of the tensors, so ``load_cache`` can refuse a corrupt or mismatched file. The file is written
    inside a temporary folder next to ``path`` (``<path>.tmp-<pid>``) and renamed into place: safetensors
    writes through a hidden temporary file of its own, which a killed save would otherwise leave behind at
    full size. A later save or load of the same path removes the folders of processes that no longer run.

    ``writer(tensors, filename, metadata=...)`` writes the file, as ``safetensors.torch.save_file`` (the default)
    does; tests pass one that fails halfway, as a full disk would.
    """
    tensors: dict[str, torch.Tensor] = {}
    for i, local in enumerate(cache.locals):
        if local.length:
            n = local.length
            for name, buf in (("raw_k", local.raw_k), ("rot_k", local.rot_k), ("v", local.v)):
                tensors[f"local.{i}.{name}"] = buf[:, :, :n].contiguous().cpu()
            tensors[f"local.{i}.valid"] = local.valid[:, :n].contiguous().cpu()
    if cache.overlap_context is not None:  # the inputs a later call's first window re-reads (window_overlap)
        x, valid = cache.overlap_context
        tensors["overlap.embeds"] = x.contiguous().cpu()
        if valid is not None:
            tensors["overlap.valid"] = valid.contiguous().cpu()
    stores, searches = {}, {}
    for i, store in cache.memories.items():
        for name, t in store.state().items():
            tensors[f"memory.{i}.{name}"] = t.cpu()
        stores[str(i)] = {"next_slot": store.next_slot, "total_appended": store.total_appended}
    for i, search in cache.searches.items():
        part, info = search.state()
        for name, t in part.items():
            tensors[f"search.{i}.{name}"] = t.contiguous().cpu()
        searches[str(i)] = {"name": search.name, "state": info}
    header = {
        "format": CACHE_FORMAT,
        "fingerprint": _fingerprint(cache.config),
        "policy": cache.policy,
        "seen_tokens": cache.seen_tokens,
        "local_length": cache.local_length,
        "stores": stores,
        "searches": searches,
    }
    header["sha256"] = _checksum(tensors, header)
    path = os.fspath(path)
    _remove_stale_temps(path)
    tmp_dir = f"{path}{TEMP_SUFFIX}{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # an earlier process with this pid was killed mid-save
    try:
        os.mkdir(tmp_dir)
        tmp = os.path.join(tmp_dir, "cache.safetensors")
        writer(tensors, tmp, metadata={"fot": json.dumps(header)})
        os.replace(tmp, path)
    except Exception as err:
        raise OSError(f"cannot write the cache to {path}: {_reason(err)}") from err
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


TEMP_SUFFIX = ".tmp-"  # <path>.tmp-<pid>: the folder a save of <path> writes in


def _reason(err: Exception) -> str:
    """An error's cause without the temporary path it names (the user gave another)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return re.sub(r' at path ".*?"', "", str(err))


def _remove_stale_temps(path: str) -> None:
    """Remove the temporary folders that killed saves of ``path`` left (their process no longer runs)."""
    for tmp in glob.glob(glob.escape(path) + TEMP_SUFFIX + "*"):
        pid = tmp[len(path) + len(TEMP_SUFFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_cache(path: str | os.PathLike, config: LongLlamaConfig, device=None,
               search_factory: SearchFactory = default_search_factory) -> LongLlamaCache:  # fmt: skip
    """Read a cache written by ``save_cache`` for a model with ``config``; raise ValueError on any mismatch.
    A saved search index is restored when ``search_factory`` builds the same backend it was saved from."""
    path = os.fspath(path)
    _remove_stale_temps(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is not a readable fot cache file ({type(err).__name__}: {err}).") from err
    if "fot" not in meta:
        raise ValueError(f"{path} is a safetensors file but not a fot cache (no 'fot' header).")
    header = json.loads(meta["fot"])
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has cache format {header.get('format')!r}; this version reads {CACHE_FORMAT!r}.")
    expected = _fingerprint(config)
    saved = header["fingerprint"]
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was saved for a different model configuration ({detail}).")
    if _checksum(tensors, header) != header.get("sha256"):
        raise ValueError(f"{path} is corrupt: its header or tensors do not match the checksum it was saved with.")
    cache = LongLlamaCache(config, cache_policy=header["policy"], search_factory=search_factory)
    cache.seen_tokens = header["seen_tokens"]
    if "overlap.embeds" in tensors:
        valid = tensors.get("overlap.valid")
        cache.overlap_context = (tensors["overlap.embeds"].to(device), None if valid is None else valid.to(device))
    for i, local in enumerate(cache.locals):
        if f"local.{i}.raw_k" in tensors:
            k = tensors[f"local.{i}.raw_k"].to(device)
            local._grow(k.shape[2], k)
            n = k.shape[2]
            local.raw_k[:, :, :n] = k
            local.rot_k[:, :, :n] = tensors[f"local.{i}.rot_k"].to(device)
            local.v[:, :, :n] = tensors[f"local.{i}.v"].to(device)
            local.valid[:, :n] = tensors[f"local.{i}.valid"].to(device)
            local.length = n
            local.all_valid = bool(local.valid[:, :n].all())
    for i, store in cache.memories.items():
        prefix = f"memory.{i}."
        part = {name[len(prefix):]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        info = header["stores"][str(i)]
        store.load_state(part, info["next_slot"], info["total_appended"])
    saved_searches = header.get("searches", {})
    for i, search in cache.searches.items():
        saved = saved_searches.get(str(i))
        prefix = f"search.{i}."
        part = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        same = saved is not None and saved["name"] == search.name
        search.load_state(cache.memories[i], part, saved["state"] if same else None)
    return cache
