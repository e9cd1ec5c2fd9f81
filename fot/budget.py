"""How much memory a run needs, how much is free, and a check that stops a prefill that would not fit.

A long prefill fills every memory layer's store. With memory in every layer of a real model that is the largest
thing in the process (SmolLM2-135M, 30 layers x 3 KV heads x 64 dims x (k + v) in bf16: 23 KB a token, 23.6 GB
at 1M tokens), and when it outgrows the RAM the OS kills the process mid-prefill, losing the work. So before a
forward moves tokens to memory, the cache asks ``check_memory_fits``; it raises ``MemoryBudgetError`` with one
line naming the bytes needed, the bytes free and the settings that make it fit. ``FOT_MEMORY_CHECK=0`` in the
environment turns the check off.

The estimate (``estimate_memory``) adds, for a batch of B rows and N tokens:
  * weights: the model's parameters in the config's ``dtype`` (fp32 when unset);
  * memory: per memory layer and token, KV heads x head_dim x (k + v) x bytes per element, plus one fp32 scale
    per vector for int8, plus one validity byte; ``mem_max_tokens`` caps the tokens. Memory-mapped to disk with
    ``mem_offload="disk"``, this counts against the disk instead (``disk``);
  * index: what ``mem_index`` keeps besides the store: nothing for "exact" and "faiss-flat"; for "faiss-ivf" the
    lifted fp32 copy of every key (head_dim + 1 floats) with its int64 id, and the centroids ("faiss-ivf-sq8":
    one byte per dimension instead of four, the lifted key padded with zeros to a multiple of 8 columns); for
    "ivf-gemm" and "ivf-scan" 13 bytes a key (its list and distance, the lists' slot order) and the centroids;
  * local: every layer's local window (raw keys, rotated keys, values) in the compute dtype;
  * activations: the input's hidden states (embeddings, output, their concatenation) and the logits kept;
  * working: the largest transient of one layer's forward (a memory block cast to fp32, an int8 memory
    dequantized, the exact search's score blocks, the gathered top-k rows, an IVF (re)build's lifted keys).
``MemoryEstimate.ram`` is their sum without ``disk``. The figures are the buffers fot allocates itself, not the
allocator's or FAISS's slack: the check keeps ``HEADROOM`` of the free memory in reserve for those.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import torch

from .attention import MEMORY_BLOCK
from .blocks import BlockIndex
from .config import LongLlamaConfig
from .memory import per_slot_bytes
from .plan import WINDOW_GROUP_MAX, WINDOW_GROUP_QUERIES
from .search import IVF_MIN_TRAIN, SEARCH_BLOCK, FaissIVFSearch, FaissIVFSQ8Search, IVFGemmSearch

logger = logging.getLogger(__name__)

CHECK_ENV = "FOT_MEMORY_CHECK"  # "0" turns the check off
IVF_CODE_BYTES = {"faiss-ivf": 4, "faiss-ivf-sq8": 1}  # bytes per dimension of a lifted key in the IVF lists
HEADROOM = 0.1  # share of the free memory kept in reserve for allocator slack, FAISS and the rest of the process
_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


class MemoryBudgetError(MemoryError):
    """A run would need more memory (RAM or disk) than is available; the message says which settings fix it."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by part (module docstring). ``ram`` is what must fit in memory, ``disk`` in the
    offload folder."""

    weights: int
    memory: int
    index: int
    local: int
    activations: int
    working: int
    disk: int

    @property
    def ram(self) -> int:
        return self.weights + self.memory + self.index + self.local + self.activations + self.working

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"ram": self.ram}


def human(n_bytes: float) -> str:
    """Bytes in decimal units, e.g. 23.6 GB."""
    for unit, size in _UNITS:
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


def weight_bytes(config: LongLlamaConfig) -> int:
    """Bytes of the model's parameters in the config's ``dtype`` (fp32 when unset)."""
    D, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    N, G, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = D * N * H * 2 + D * G * H * 2  # q, o; k, v
    if config.attention_bias:
        attention += N * H + 2 * G * H + D
    mlp = 3 * D * I + (2 * I + D if config.mlp_bias else 0)
    params = V * D + L * (attention + mlp + 2 * D) + D + (0 if config.tie_word_embeddings else V * D)
    return params * _element_size(config.dtype)


def _element_size(dtype) -> int:
    if dtype is None:
        return 4
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def memory_kv_heads(config: LongLlamaConfig, layer: int) -> int:
    """How many key/value heads memory layer ``layer`` stores: all of them, or one per ``mem_heads`` query head."""
    heads = config.memory_kv_heads(layer)
    return config.num_key_value_heads if heads is None else len(heads)


def index_bytes(config: LongLlamaConfig, slots: int, batch: int = 1, layer: int | None = None) -> int:
    """Bytes ``config.mem_index`` keeps for ``slots`` keys of one memory layer (``layer``'s stored heads; None:
    every KV head), beyond the store (``KeySearch.nbytes``)."""
    G, H = config.num_key_value_heads if layer is None else memory_kv_heads(config, layer), config.head_dim
    if config.mem_blocks is not None:
        return BlockIndex.bytes_for(slots, config.mem_block_size, G, H, batch)
    if config.mem_top_k is not None and config.mem_index in ("ivf-gemm", "ivf-scan") and slots >= IVF_MIN_TRAIN:
        return batch * G * IVFGemmSearch.bytes_for(slots, FaissIVFSearch.nlist_for(slots), H)
    if config.mem_top_k is None or config.mem_index not in IVF_CODE_BYTES or slots < IVF_MIN_TRAIN:
        return 0
    width = (FaissIVFSQ8Search if config.mem_index == "faiss-ivf-sq8" else FaissIVFSearch).lifted_width(H)
    per_key = IVF_CODE_BYTES[config.mem_index] * width + 8  # the lifted key's code + its int64 id in its list
    centroids = FaissIVFSearch.nlist_for(slots) * width * 4
    return batch * G * (slots * per_key + centroids)


def estimate_memory(config: LongLlamaConfig, n_tokens: int, *, batch: int = 1, logits_tokens: int = 1,
                    include_weights: bool = True, memory_tokens: int | None = None) -> MemoryEstimate:  # fmt: skip
    """What a forward over ``n_tokens`` tokens from an empty cache needs (module docstring).

    Args:
        config: the model config (memory layers, dtypes, index, window, offload).
        n_tokens: input length N.
        batch: batch rows B.
        logits_tokens: tokens whose logits the caller keeps (1 for ``generate``'s prefill; N for a perplexity
            run).
        include_weights: False when the weights are loaded already (and so are no longer free memory).
        memory_tokens: tokens each memory layer will hold; by default N - ``last_context_length`` (the windows
            of a prefill), capped by ``mem_max_tokens``.
    """
    n_mem_layers = len(config.mem_layers)
    G, H, W = config.num_key_value_heads, config.head_dim, config.max_position_embeddings
    act = _element_size(config.dtype)
    if memory_tokens is None:
        memory_tokens = max(n_tokens - config.last_context_length, 0)
    M = memory_tokens if config.mem_max_tokens is None else min(memory_tokens, config.mem_max_tokens)
    slot = sum(per_slot_bytes(config.mem_torch_dtype, memory_kv_heads(config, layer), H) for layer in config.mem_layers)
    store_bytes = batch * slot * M
    on_disk = config.mem_offload == "disk"
    local = config.num_hidden_layers * batch * (3 * G * W * H * act + W)
    activations = batch * n_tokens * config.hidden_size * act * 3 + batch * logits_tokens * config.vocab_size * act
    return MemoryEstimate(
        weights=weight_bytes(config) if include_weights else 0,
        memory=0 if on_disk else store_bytes,
        index=sum(index_bytes(config, M, batch, layer) for layer in config.mem_layers),
        local=local,
        activations=activations,
        working=_working_bytes(config, M, batch) if n_mem_layers else 0,
        disk=store_bytes if on_disk else 0,
    )


def _working_bytes(config: LongLlamaConfig, M: int, batch: int) -> int:
    """The largest transient buffer of one memory layer's forward with M slots in memory (fp32)."""
    G, H, N, W = config.num_key_value_heads, config.head_dim, config.num_attention_heads, config.max_position_embeddings
    T = W if W >= WINDOW_GROUP_QUERIES else min(WINDOW_GROUP_MAX, -(-WINDOW_GROUP_QUERIES // W)) * W  # queries
    quantized = config.mem_dtype == "int8"
    if config.mem_blocks is not None:  # block retrieval: scores of the chosen slots, their keys and values
        C, R, read = -(-T // config.mem_block_queries), N // G, min(M, config.mem_blocks * config.mem_block_size)
        scores = batch * G * C * R * config.mem_block_queries * read * 4 * 2  # scores and probabilities
        gathered = batch * G * C * read * H * 4 * 2
        bounds = batch * G * C * -(-M // config.mem_block_size) * 4 + (1 << 24)  # block scores, the bound block
        return scores + gathered + bounds
    if config.mem_top_k is None:  # dense: memory cast block by block (whole, dequantized, for int8)
        slots = M if quantized else min(M, MEMORY_BLOCK)
        return batch * 2 * G * slots * H * 4
    K = config.mem_top_k
    gather = batch * N * W * K * H * 4 * 2
    if config.mem_index == "exact" or M < IVF_MIN_TRAIN:
        search = batch * N * W * min(M, SEARCH_BLOCK) * 4 * 2  # scores and their masked copy
    elif config.mem_index == "faiss-flat":
        search = 2 * M * H * 4  # one head's keys as contiguous fp32, and the valid ones
    else:  # an IVF (re)build: one head's lifted keys and every key's norm
        search = M * (H + 1) * 4 + batch * G * M * 4
    dequantized = batch * G * M * H * 4 if quantized else 0  # exact/flat search and IVF builds read every key
    return max(gather, search) + dequantized


def estimate_memory_bytes(config: LongLlamaConfig, n_tokens: int, **kwargs) -> int:
    """RAM bytes a forward over ``n_tokens`` tokens needs, weights included (``estimate_memory(...).ram``)."""
    return estimate_memory(config, n_tokens, **kwargs).ram


# ---------------------------------------------------------------------------------------------- what is free
def available_ram_bytes() -> int:
    """RAM this process may still take: the smaller of MemAvailable (/proc/meminfo; psutil elsewhere) and the
    room left under a cgroup's memory limit, if one is set."""
    free = _meminfo_available()
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError as err:
        raise MemoryBudgetError(
            f"cannot tell how much RAM is free here (no /proc/meminfo, no psutil): pip install psutil, or set "
            f"{CHECK_ENV}=0 to skip the check."
        ) from err
    return int(psutil.virtual_memory().available)


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, or v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free bytes where memory is allocated: the GPU's free memory for a CUDA device, else ``available_ram_bytes``."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram_bytes()


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------- the check
def check_memory_fits(config: LongLlamaConfig, n_tokens: int, *, available: int | None = None,
                      device: torch.device | str | None = None, **kwargs) -> MemoryEstimate:  # fmt: skip
    """Raise ``MemoryBudgetError`` (one line) when a forward over ``n_tokens`` tokens would not fit.

    Args:
        config: the model config.
        n_tokens: input length.
        available: free bytes; by default measured (``available_bytes(device)``).
        device: where the memory lives (the GPU's free memory is measured for CUDA).
        **kwargs: passed to ``estimate_memory`` (``batch``, ``logits_tokens``, ``include_weights``,
            ``memory_tokens``).

    Returns:
        the estimate, when it fits. Nothing is checked (and the estimate is still returned) when
        ``FOT_MEMORY_CHECK=0``.
    """
    estimate = estimate_memory(config, n_tokens, **kwargs)
    if not check_enabled():
        return estimate
    free = available_bytes(device) if available is None else int(available)
    usable = int(free * (1 - HEADROOM))
    if estimate.ram > usable:
        raise MemoryBudgetError(
            f"{n_tokens} tokens need about {human(estimate.ram)} of memory ({_parts(estimate)}) but "
            f"{human(free)} is free (fot keeps {HEADROOM:.0%} in reserve); {_remedies(config, estimate)}, or set "
            f"{CHECK_ENV}=0 to run anyway."
        )
    if estimate.disk:
        disk_free = _disk_free(config.mem_offload_dir)
        if estimate.disk > disk_free:
            raise MemoryBudgetError(
                f"{n_tokens} tokens need {human(estimate.disk)} of disk for the offloaded memory but "
                f"{config.mem_offload_dir} has {human(disk_free)} free; choose another mem_offload_dir, set "
                f"mem_max_tokens or mem_dtype='int8', or set {CHECK_ENV}=0 to run anyway."
            )
    logger.debug("fot: %d tokens need about %s of %s free", n_tokens, human(estimate.ram), human(free))
    return estimate


def _parts(estimate: MemoryEstimate) -> str:
    parts = [(name, value) for name, value in estimate.as_dict().items() if name not in ("ram", "disk") and value]
    parts.sort(key=lambda p: -p[1])
    return ", ".join(f"{name} {human(value)}" for name, value in parts[:3])


def _remedies(config: LongLlamaConfig, estimate: MemoryEstimate) -> str:
    """The settings that shrink the largest parts, in the order they help most."""
    fixes = []
    if estimate.memory:
        if config.mem_dtype != "int8":
            fixes.append("mem_dtype='int8' (about half of bfloat16)")
        fixes.append("mem_offload='disk' with mem_offload_dir (keys and values on disk, the index in RAM)")
        fixes.append("a mem_max_tokens cap")
        fixes.append("fewer mem_layers")
    if estimate.index and config.mem_index == "faiss-ivf":
        fixes.append("mem_index='faiss-ivf-sq8' (a 4x smaller index)")
    if not fixes:
        fixes.append("a shorter input or a smaller batch")
    return "try " + ", ".join(fixes)


def _disk_free(folder: str) -> int:
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize
