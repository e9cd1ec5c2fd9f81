"""Checks of what a caller hands ``LongLlamaModel.forward``, and the cache's name in transformers.

Everything here runs once per call at fot's boundary, before any window is processed, so a bad input fails
with a message that names the problem and the fix instead of an ``IndexError`` deep inside a layer (or, worse,
NaN logits).

transformers 5.24 renamed the generation cache from ``past_key_values`` to ``cache``: the keyword that
``generate`` passes to ``forward``, the field of model outputs and the key of ``generate``'s model kwargs.
fot accepts both names on every supported version and speaks the installed version's own name
(``CACHE_NAME``) to transformers.
"""

from __future__ import annotations

import logging

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import LongLlamaCache

logger = logging.getLogger(__name__)

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")
_low_precision_logged: set[torch.dtype] = set()


def pick_cache(cache, past_key_values):
    """The cache passed under either name (``cache`` or the older ``past_key_values``), or None."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as cache= (or the older name past_key_values=), not both.")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, LongLlamaCache):
        raise TypeError(
            f"the cache must be a fot.LongLlamaCache, got {type(cache).__name__}; pass None to start a new one, "
            "or the cache returned by a previous call (outputs.cache)."
        )
    return cache


def validate_call(config, input_ids, inputs_embeds, output_attentions, kwargs) -> None:
    """Raise ``ValueError``/``TypeError`` for inputs fot cannot run; let other transformers kwargs through."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds.")
    if kwargs.get("position_ids") is not None:
        raise ValueError(
            "position_ids are not accepted: LongLLaMA positions are offsets inside the local window and are "
            "derived from the cache. Call the model without position_ids."
        )
    if output_attentions:
        raise ValueError("output_attentions is not supported: attention maps are never materialised.")
    if input_ids is not None:
        _validate_ids(input_ids, config.vocab_size)
    else:
        _validate_embeds(inputs_embeds, config.hidden_size)
    n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    if n == 0:
        raise ValueError(
            "the input is empty (0 tokens). To continue from a cache with generate(), pass either the full "
            "sequence (cached tokens + new ones) or only the new tokens together with an attention_mask that "
            "covers cached + new tokens (e.g. torch.ones(batch, cache.seen_tokens + new))."
        )


def _validate_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor [batch, tokens], got {type(input_ids).__name__}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dtype.is_complex:
        raise TypeError(
            f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; convert with input_ids.long()."
        )
    if input_ids.dim() != 2:
        fix = " Add the batch dimension with input_ids[None]." if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}.{fix}")
    if input_ids.numel():
        lo, hi = torch.aminmax(input_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids contain the id {bad}, outside the vocabulary [0, {vocab_size - 1}] "
                f"(config.vocab_size={vocab_size}); check that the tokenizer belongs to this model."
            )


def _validate_embeds(inputs_embeds: torch.Tensor, hidden_size: int) -> None:
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"inputs_embeds must be 3-D [batch, tokens, hidden_size={hidden_size}], got shape "
            f"{tuple(inputs_embeds.shape)}."
        )
    if not bool(torch.isfinite(inputs_embeds).all()):
        raise ValueError("inputs_embeds contain NaN or inf; the logits would be NaN. Check how they were made.")


def validate_labels(labels: torch.Tensor, batch: int, tokens: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids (-100 = ignored), got dtype {labels.dtype}.")
    if tuple(labels.shape) != (batch, tokens):
        raise ValueError(
            f"labels must have the shape of the input, [batch, tokens] = [{batch}, {tokens}], got "
            f"{tuple(labels.shape)}; they are shifted inside the model (token t predicts t + 1)."
        )


def new_token_validity(attention_mask, B: int, N: int, seen: int) -> torch.Tensor | None:
    """Bool [B, N] marking real (non-padding) new tokens, or None when all are real.

    ``attention_mask`` follows transformers: 1 = token, 0 = padding, covering the cached tokens and the new
    ones ([B, seen + N]); without a cache that is [B, N]. Only the new tokens' columns are read: the padding
    of earlier tokens is already remembered by the cache.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(
            f"attention_mask must be an integer or bool tensor of 0/1 (1 = token, 0 = padding), got dtype "
            f"{attention_mask.dtype}; convert a 0/1 float mask with attention_mask.long()."
        )
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != seen + N:
        covers = f"the {seen} cached tokens and the {N} new ones" if seen else f"the {N} tokens"
        raise ValueError(
            f"attention_mask must be 2-D [batch, cached + new tokens] = [{B}, {seen + N}] (it covers {covers}), "
            f"got {tuple(attention_mask.shape)}."
        )
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError(
            "attention_mask must hold only 0 (padding) and 1 (token); 4-D or additive masks are not supported."
        )
    valid = attention_mask[:, -N:].bool()
    return None if bool(valid.all()) else valid


def compute_dtype(embeds: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on for the device, else the embeddings'."""
    device_type = embeds.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return embeds.dtype


def log_low_precision_once(dtype: torch.dtype, device: torch.device) -> None:
    """On CPU, half-precision matmuls are far slower than fp32 on most cores (no AMX / AVX512-BF16): say once
    that fp32 compute with bf16 memory (the default ``mem_dtype``) is the fast setting."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or dtype in _low_precision_logged:
        return
    _low_precision_logged.add(dtype)
    logger.warning(
        "fot: computing in %s on CPU. Without AMX or AVX512-BF16, CPU matmuls in %s run many times slower than "
        "in float32; the fast setting is float32 weights and compute with memory stored in bfloat16 "
        "(mem_dtype='bfloat16', the default).", dtype, dtype,
    )
