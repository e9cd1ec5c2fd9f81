"""The full-attention baseline a user would run instead of fot: Hugging Face ``LlamaForCausalLM`` with SDPA on the
same weights.

A fot checkpoint stores plain LLaMA weight names, so ``LlamaForCausalLM.from_pretrained`` reads its weights once it
is given a ``LlamaConfig``: the LLaMA fields of the checkpoint's config, with ``max_position_embeddings`` set to the
baseline's window W. The memory fields (``mem_*``, ``last_context_length``, ...) are dropped: this model has no
memory and no windows, every token attends to every earlier one.

Evaluation settings ``hf:W`` (``eval.common.parse_setting``) load it. It runs prompts of at most W tokens: a longer
prompt raises ``PromptTooLongError`` (a ``ValueError`` the CLIs print as one line), since past its window the
baseline is no longer the model a user would deploy at that length. The answer's tokens, generated after the
prompt, attend to the whole prompt even where prompt and answer together pass W (a passkey prompt of 4096 tokens
is still answered by ``hf:4096``). The greedy protocol is the fot models': the same ``generate`` call and the
checkpoint's own generation_config.json. fot's windowing options (``last_context_length``, ``cache_policy``), which
the CLIs pass to every setting, mean nothing without windows and are dropped, with one log line.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)

# fot's generate options that a model without windows or memory has no use for.
FOT_GENERATE_OPTIONS = ("last_context_length", "cache_policy")
# Keys of a saved config that describe the file or fot's class, not the LLaMA architecture.
_FILE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
              "torch_dtype")


class PromptTooLongError(ValueError):
    """A prompt is longer than the window of an ``hf:W`` baseline."""


def llama_config(fot_config, window: int) -> LlamaConfig:
    """The ``LlamaConfig`` of a ``LongLlamaConfig``'s architecture, with ``max_position_embeddings=window``.

    The memory description (``mem_layers`` [], ``mem_top_k`` and ``mem_blocks`` None, ``mem_index`` "none",
    ``window_overlap`` and ``mem_score_bias`` 0, ``mem_rope_distance`` None, ``last_context_length`` W,
    ``cache_policy`` "none") is set on it too, as plain attributes, so that the CLIs' setting descriptions
    (``eval.passkey.describe_setting``) record what this model does without knowing its class.
    """
    import fot

    llama_names = {f.name for f in dataclasses.fields(LlamaConfig)}
    only_fot = {f.name for f in dataclasses.fields(fot.LongLlamaConfig)} - llama_names
    fields = {k: v for k, v in fot_config.to_dict().items() if k not in only_fot and k not in _FILE_KEYS}
    config = LlamaConfig(**{**fields, "max_position_embeddings": window})
    config.mem_layers, config.mem_top_k, config.mem_index = [], None, "none"
    config.mem_blocks, config.window_overlap, config.mem_score_bias = None, 0, 0.0
    config.mem_rope_distance = None
    config.last_context_length, config.cache_policy = window, "none"
    return config


class FullAttentionLlama(LlamaForCausalLM):
    """``LlamaForCausalLM`` that refuses prompts longer than its window and drops fot's generate options.

    Everything else is transformers' own: the same attention (SDPA), cache and ``generate``.
    """

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        ignored = {k: kwargs.pop(k) for k in FOT_GENERATE_OPTIONS if k in kwargs}
        ignored = {k: v for k, v in ignored.items() if v is not None}
        if ignored and not getattr(self, "_told_ignored", False):
            logger.info("hf:%d has one full-attention window and no memory: it ignores %s", self.window, ignored)
            self._told_ignored = True
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] > self.window:
            raise PromptTooLongError(
                f"hf:{self.window}: a prompt of {ids.shape[-1]} tokens is longer than its window of {self.window} "
                f"tokens; use hf:W with W >= {ids.shape[-1]}, or run the setting only at shorter lengths "
                f"(--lengths-for hf:{self.window}=:{self.window})."
            )
        return super().generate(inputs, **kwargs)

    @property
    def window(self) -> int:
        return self.config.max_position_embeddings


def load_full_attention(model_dir: str | Path, window: int, dtype: torch.dtype = torch.float32) -> FullAttentionLlama:
    """A fot checkpoint's weights in ``FullAttentionLlama`` (SDPA) with window ``window``, in eval mode.

    Raises:
        ValueError: ``model_dir`` is a LoRA adapter (merge it first), or its weights do not fit the LLaMA layout.
    """
    import fot

    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        raise ValueError(f"hf:{window} loads full checkpoints, and {model_dir} is a LoRA adapter; merge it into its "
                         "base (peft's merge_and_unload, then save_pretrained) and pass that directory.")
    config = llama_config(fot.LongLlamaConfig.from_pretrained(model_dir), window)
    model, info = FullAttentionLlama.from_pretrained(model_dir, config=config, dtype=dtype, attn_implementation="sdpa",
                                                     output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{model_dir}: its weights do not fit transformers' LlamaForCausalLM ({problems}).")
    return model.eval()
