"""The model and tokenizer of a run: from a preset (random init) or from a checkpoint.

* ``checkpoint: null``: ``LongLlamaConfig(**{**PRESETS[preset], **model})`` with random weights (seeded).
* ``checkpoint: DIR or HUB_ID``: ``LongLlamaForCausalLM.from_pretrained`` with the ``model:`` fields (and the
  preset's, if named) as config overrides. This loads a LLaMA / OpenLLaMA HF checkpoint (its weights are plain
  LLaMA names; ``mem_layers`` from the config turns layers into memory layers), a published LongLLaMA checkpoint
  or one of our ``final/`` directories.

Weights are kept in fp32 (the optimizer's master copy); ``train.dtype: bfloat16`` computes in bf16.
"""

from __future__ import annotations

import logging

import torch

import fot
from plumbing.presets import PRESETS
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def model_fields(spec) -> dict:
    fields = dict(PRESETS[spec.preset]) if spec.preset else {}
    fields.update(spec.model)
    fields["use_cache"] = False
    return fields


def build_config(spec) -> fot.LongLlamaConfig:
    """The config of a from-scratch model (also used to build the big presets on the meta device)."""
    return fot.LongLlamaConfig(**model_fields(spec))


def build_model(spec) -> torch.nn.Module:
    """The ``LongLlamaForCausalLM`` of the run in fp32, wrapped as a peft ``PeftModel`` with ``adapter.kind: lora``."""
    fields = model_fields(spec)
    if spec.checkpoint is None:
        torch.manual_seed(spec.train.seed)
        model = fot.LongLlamaForCausalLM(fot.LongLlamaConfig(**fields))
    else:
        model = fot.LongLlamaForCausalLM.from_pretrained(spec.checkpoint, dtype=torch.float32, **fields)
    model = model.float()
    if spec.adapter.kind == "lora":
        model = add_lora(model, spec.adapter, spec.train.seed)
    return model


def add_lora(model: fot.LongLlamaForCausalLM, adapter, seed: int) -> torch.nn.Module:
    """Freeze ``model`` and wrap it with LoRA adapters (peft); the adapters' init is seeded."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("adapter.kind=lora needs peft: pip install peft (or 'fot[dev]').") from err
    layers = list(model.config.mem_layers) if adapter.layers == "memory" else adapter.layers
    torch.manual_seed(seed)
    if adapter.init is not None:
        wrapped = peft.PeftModel.from_pretrained(model, adapter.init, is_trainable=True)
        logger.info("LoRA adapters continue from %s (its r, alpha and targets apply)", adapter.init)
        return wrapped
    lora = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                           target_modules=list(adapter.target_modules), layers_to_transform=layers)
    wrapped = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s (layers %s): %.2fM trainable parameters", adapter.r, adapter.target_modules,
                "all" if layers is None else layers, trainable / 1e6)
    return wrapped


def run_tokenizer(spec):
    """The run's tokenizer (``data.tokenizer``), with a pad token; None for the synthetic lookup source (which emits
    ids)."""
    name = spec.data.tokenizer
    if name is None:
        return None
    tokenizer = load_tokenizer(spec.checkpoint if name == "checkpoint" else name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
