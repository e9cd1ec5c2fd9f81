"""The forward plan: every decision of a forward pass, made once at its start.

``resolve_plan`` turns the config, the call's arguments, the cache and autograd's state into a frozen
``ForwardPlan`` (``fot.types``) that the decoder passes, by keyword, to everything below it. Nothing below
re-decides the implementation, the memory mode, training or inference, the window grouping or the cache
policy. ``AttnImplResolver`` resolves ``attn_impl`` once per model and device.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .attention import NO_KERNELS_IN_CHECKPOINT_CODE, kernels_package
from .config import LongLlamaConfig, validate_cache_policy, validate_last_context_length
from .types import ForwardPlan

logger = logging.getLogger(__name__)

WINDOW_GROUP_QUERIES = 1024  # short windows bound for memory run in groups of at least this many tokens
WINDOW_GROUP_MAX = 8  # windows per group at most

UnavailableReason = Callable[[torch.device], str | None]


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None (``fot.kernels.unavailable_reason``, imported
    only when asked)."""
    kernels = kernels_package()
    return NO_KERNELS_IN_CHECKPOINT_CODE if kernels is None else kernels.unavailable_reason(device)


def resolve_attn_impl(attn_impl: str, device: torch.device,
                      unavailable_reason: UnavailableReason = triton_unavailable_reason,
                      dtype: torch.dtype | None = None) -> str:  # fmt: skip
    """The concrete implementation for ``device`` and compute ``dtype``: "auto" picks Triton on CUDA when it can
    run there and the fused torch path otherwise (float64 included: compiled Triton has no float64 matmul for the
    kernels' tile sizes); an explicit "triton" that cannot run raises, with the reason that
    ``unavailable_reason(device)`` gives."""
    if attn_impl == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"
        return "triton" if unavailable_reason(device) is None else "torch"
    if attn_impl == "triton":
        reason = unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"attn_impl='triton' cannot run on {device}: {reason}. Use attn_impl='torch' or 'auto'.")
    return attn_impl


class AttnImplResolver:
    """``resolve_attn_impl`` once per (``attn_impl``, device, dtype); an "auto" choice is logged when it is made.

    Args:
        unavailable_reason: ``(device) -> str | None``, why the Triton kernels cannot run on a device (None: they
            can). Tests pass their own to reach the error of a Triton that cannot run on any machine.
    """

    def __init__(self, unavailable_reason: UnavailableReason = triton_unavailable_reason):
        self.unavailable_reason = unavailable_reason
        self._resolved: dict[tuple[str, torch.device, torch.dtype | None], str] = {}

    def __call__(self, attn_impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
        key = (attn_impl, torch.device(device), dtype)
        if key not in self._resolved:
            impl = resolve_attn_impl(attn_impl, key[1], self.unavailable_reason, dtype)
            if attn_impl == "auto":
                logger.info("fot: attn_impl='auto' chose %r on %s%s", impl, key[1].type,
                            f" for {dtype}" if dtype == torch.float64 else "")
            self._resolved[key] = impl
        return self._resolved[key]


def records_gradients(model: torch.nn.Module, inputs_embeds: torch.Tensor) -> bool:
    """Whether a forward trains: autograd records it and a parameter or the input requires a gradient. This is
    the one place fot reads autograd's global state; everything below follows the plan."""
    if not torch.is_grad_enabled():  # the plan's one read of autograd's mode: layers below follow plan.training
        return False
    return inputs_embeds.requires_grad or any(p.requires_grad for p in model.parameters())


def window_group_size(config: LongLlamaConfig, cache, *, impl: str, memory_mode: str, training: bool,
                      padded: bool, group_queries: int = WINDOW_GROUP_QUERIES) -> int:  # fmt: skip
    """How many full windows bound for memory run together; 1 = one at a time.

    Grouping serves inference with dense, unbounded memory and no padding on the fused torch path, starting
    from an empty local window, without ``window_overlap`` (a group's windows would need each other's tokens as
    context): there it is exact and feeds the CPU attention kernel at least
    ``group_queries`` queries per call (0: no grouping).
    """
    W = config.max_position_embeddings
    if (training or impl != "torch" or memory_mode != "dense" or padded or cache.local_length
            or config.mem_attention_grouping is not None or config.window_overlap or W >= group_queries
            or config.mem_rope_distance is not None  # groups attend to each other's keys at their own positions
            or config.mem_heads is not None  # the listed heads' memory attention runs apart from the others'
            or any(store.max_tokens is not None for store in cache.memories.values())):  # fmt: skip
        return 1
    return min(WINDOW_GROUP_MAX, -(-group_queries // W))


def resolve_plan(config: LongLlamaConfig, cache, *, impl: str, training: bool, crossbatch: bool, padded: bool,
                 last_context_length: int | None, cache_policy: str | None,
                 group_queries: int = WINDOW_GROUP_QUERIES) -> ForwardPlan:  # fmt: skip
    """The plan of one forward.

    Args:
        config: the model config.
        cache: the ``LongLlamaCache`` the forward continues (its policy is the default; its search backends
            decide whether memory is top-k).
        impl: the resolved attention implementation (``AttnImplResolver``).
        training: autograd records the forward and a parameter or the input requires a gradient.
        crossbatch: memory layers attend to other batch rows (training contexts) instead of memory.
        padded: the new tokens include padding.
        last_context_length, cache_policy: the call's overrides, or None for the config's and cache's.
        group_queries: queries per call that window groups aim for (``window_group_size``).
    """
    L = config.last_context_length if last_context_length is None else last_context_length
    if last_context_length == 0 and not isinstance(last_context_length, bool):
        # ours, per call only: a prefill step (fot.prefill) that moves every window of the input to memory
        if cache.local_length or crossbatch:
            raise ValueError("last_context_length=0 moves a whole call to memory, so it needs a cache with an empty "
                             "local window (fresh, or only prefilled); pass a positive last_context_length.")
    else:
        validate_last_context_length(L, config.max_position_embeddings)
    policy = cache.policy if cache_policy is None else cache_policy
    validate_cache_policy(policy)  # a cache takes any policy: the one a forward runs with is checked here
    if crossbatch:
        mode = "crossbatch"
    else:
        mode = "top-k" if cache.top_k is not None else "block" if cache.blocks is not None else "dense"
    if config.mem_score_bias and impl == "triton":
        raise ValueError(f"mem_score_bias={config.mem_score_bias} has no Triton kernel; set attn_impl='torch' or "
                         "mem_score_bias=0.")
    # settings built for inference with dense or top-k memory on the torch and reference paths only
    unsupported = ("training" if training or crossbatch else "block retrieval (mem_blocks)" if mode == "block"
                   else "Triton" if impl == "triton" else None)  # fmt: skip
    for name, value, what in (("mem_rope_distance", config.mem_rope_distance, "mem_rope_distance"),
                              ("mem_heads", config.mem_heads, "mem_heads (memory read by some heads only)")):
        if value is not None and unsupported is not None:
            shown = what if name == "mem_heads" else f"{name}={value}"
            raise ValueError(f"{shown} is built for inference with dense or top-k memory on the torch and reference "
                             f"paths, not for {unsupported}; set {name}=None"
                             + (" or attn_impl='torch'." if unsupported == "Triton" else "."))
    if mode == "block" and training:
        raise ValueError("mem_blocks (block retrieval) is for inference: run this forward under torch.no_grad(), or "
                         "train with mem_blocks=None.")
    if mode == "block" and impl == "triton":
        raise ValueError("mem_blocks (block retrieval) has no Triton kernel; set attn_impl='torch' (it runs on CUDA "
                         "too) or mem_blocks=None.")
    if training and mode == "top-k":
        for search in cache.searches.values():
            if not search.trainable:
                raise ValueError(
                    f"mem_index={search.name!r} is for inference: its index changes as memory grows, so a "
                    "recomputed (checkpointed) forward could retrieve differently. Train with mem_index='exact' or "
                    "'faiss-flat', or run this forward under torch.no_grad()."
                )
    group = window_group_size(config, cache, impl=impl, memory_mode=mode, training=training, padded=padded,
                              group_queries=group_queries)  # fmt: skip
    grouping = None if config.mem_attention_grouping is None else tuple(config.mem_attention_grouping)
    overlap = 0 if training or crossbatch else config.window_overlap
    return ForwardPlan(
        impl=impl, memory_mode=mode, training=training, window_group=group, grouping=grouping,
        cache_policy=policy, last_context_length=L, window_overlap=overlap, score_bias=config.mem_score_bias,
        mem_rope_distance=config.mem_rope_distance,
    )  # fmt: skip
