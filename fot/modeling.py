"""LongLlamaModel and LongLlamaForCausalLM: the Hugging Face classes around ``fot.model``.

The windowing of long inputs (which tokens go to memory, window groups) is ``fot.model``'s; every forward
first resolves its plan (``fot.plan``). This module is the Hugging Face wrapper: config class, outputs, loss,
generation hooks and Auto* registration.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import LongLlamaCache
from .config import LongLlamaConfig
from .crossbatch import CrossBatchPlan
from .inputs import CACHE_NAME, CACHE_NAMES, compute_dtype, log_low_precision_once, new_token_validity, pick_cache
from .inputs import validate_call, validate_labels
from .model import LongLlamaDecoderLayer, LongLlamaRMSNorm, layer_inv_freqs, run_chunk, run_windows
from .plan import WINDOW_GROUP_QUERIES, AttnImplResolver, records_gradients, resolve_plan

logger = logging.getLogger(__name__)


def _with_cache_alias(cls, name: str):
    """On transformers < 5.24 outputs name the cache ``past_key_values`` only; also read it as ``.cache``, the
    name of 5.24 and later (which read the older name themselves)."""
    if CACHE_NAME == "cache":
        return cls
    return type(name, (cls,), {"cache": property(lambda self: self.past_key_values), "__module__": __name__})


# HF's own output classes, so the cache field has the installed transformers' name.
LongLlamaModelOutput = _with_cache_alias(BaseModelOutputWithPast, "LongLlamaModelOutput")
LongLlamaCausalLMOutput = _with_cache_alias(CausalLMOutputWithPast, "LongLlamaCausalLMOutput")


# save_pretrained(save_code=True) writes fot's modeling code into the checkpoint through transformers' own
# mechanism (register_for_auto_class, then custom_object_save): the module of each class and, recursively, every
# module it imports with a `from .x import` statement, copied side by side. fot's modules are flat files for that
# reason; the Triton kernels, a package, are imported with importlib instead and stay with the installed fot.
CODE_CONFIG_FILE, CODE_MODEL_FILE = "config", "modeling"  # the names the auto_map gives: <file>.<class>


def _own_auto_map_entry(value) -> bool:
    """An auto_map value that names one of the files save_code writes (as opposed to LongLLaMA's published
    ``modeling_longllama.*``, which stays as it is)."""
    return isinstance(value, str) and value.split(".")[0] in (CODE_CONFIG_FILE, CODE_MODEL_FILE)


@contextmanager
def _registered_for_auto_class(*pairs):
    """Set ``_auto_class`` on the classes of ``(cls, auto_class)`` pairs for the duration, as
    ``register_for_auto_class`` does for good; restore what they had after."""
    saved = [(cls, cls.__dict__.get("_auto_class", _UNSET)) for cls, _ in pairs]
    try:
        for cls, auto_class in pairs:
            cls.register_for_auto_class(auto_class)
        yield
    finally:
        for cls, old in saved:
            if old is _UNSET:
                del cls._auto_class
            else:
                cls._auto_class = old


_UNSET = object()


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongLlamaDecoderLayer"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    _code_auto_class = "AutoModel"  # the auto class save_code registers this class with

    def save_pretrained(self, save_directory, *args, save_code: bool = False, **kwargs):
        """transformers' ``save_pretrained``; with ``save_code=True`` the checkpoint also holds fot's modeling code.

        ``save_code=True`` copies the model's and config's modules (and the fot modules they import) into
        ``save_directory`` and writes ``auto_map`` = {"AutoConfig": "config.LongLlamaConfig", <auto class>:
        "modeling.<class>"} into config.json, through transformers' ``register_for_auto_class``. Then
        ``AutoModelForCausalLM.from_pretrained(save_directory, trust_remote_code=True)`` loads the model where only
        transformers and torch are installed (no fot; Triton kernels and FAISS indexes need fot's extras). It
        replaces any earlier ``auto_map`` (e.g. LongLLaMA's ``modeling_longllama.*``). Without it (the default,
        as for checkpoints fot itself reads back) the config keeps a published auto_map and drops entries that
        name code files this save does not write.
        """
        config = self.config
        original = config.__dict__.get("auto_map", _UNSET)
        foreign = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items() if not _own_auto_map_entry(v)}
        try:
            # custom_object_save fills in exactly the entries of the files it writes; a config without an
            # auto_map attribute writes none to config.json (None would be written as null)
            config.__dict__.pop("auto_map", None)
            if not save_code:
                if foreign:
                    config.auto_map = foreign
                return super().save_pretrained(save_directory, *args, **kwargs)
            with _registered_for_auto_class((type(self), self._code_auto_class), (type(config), "AutoConfig")):
                return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            config.__dict__.pop("auto_map", None)
            if original is not _UNSET:
                config.auto_map = original

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """transformers' switch, then the reference's ``gradient_checkpoint_every_ith``: only layers whose index
        is a multiple of it are checkpointed."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        every = self.config.gradient_checkpoint_every_ith
        for module in self.modules():
            if isinstance(module, LongLlamaDecoderLayer):
                module.gradient_checkpointing = module.gradient_checkpointing and module.layer_idx % every == 0


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The decoder stack: embeddings, ``num_hidden_layers`` layers (some with memory), final norm.

    Attributes:
        impl_resolver: the ``AttnImplResolver`` that turns ``config.attn_impl`` into an implementation, once per
            device; replace it to decide differently whether Triton can run (e.g.
            ``AttnImplResolver(unavailable_reason=...)``).
        window_group_queries: full windows bound for memory run in groups of about this many queries in
            inference (0: one at a time).
    """

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.impl_resolver = AttnImplResolver()
        self.window_group_queries = WINDOW_GROUP_QUERIES
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _inv_freqs(self, device) -> list[torch.Tensor | None]:
        return layer_inv_freqs(self.config, self.layers, device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LongLlamaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        last_context_length: int | None = None,
        cache_policy: str | None = None,
        crossbatch: CrossBatchPlan | None = None,
        past_key_values: LongLlamaCache | None = None,
        **kwargs,
    ) -> LongLlamaModelOutput:
        """Run an input of any length through windows; see the module docstring for the semantics.

        Args:
            input_ids: [B, N] token ids (or ``inputs_embeds`` [B, N, D]).
            attention_mask: [B, seen + N] 0/1 (1 = token, 0 = padding), covering cached and new tokens as in
                transformers. Only its last N columns are read: the cache remembers earlier padding.
            cache: a ``LongLlamaCache`` to continue from; a fresh one is made when None. ``past_key_values`` is
                the same argument under its name before transformers 5.24; pass one of them.
            use_cache: return the cache (default ``config.use_cache``).
            last_context_length: overrides ``config.last_context_length`` for this call; 0 (ours, per call only)
                moves every window of the input to memory and keeps nothing local, a prefill step (``fot.prefill``).
            cache_policy: overrides the cache's policy ("slide" or "flush") for this call; the cache keeps its own.
            crossbatch: training only. Every row is one window (N <= W); memory layers attend to the other
                rows named by the plan (see ``fot.crossbatch``) instead of a memory. No cache is used.
            kwargs: other keyword arguments transformers and ``Trainer`` pass (``cache_position``,
                ``num_items_in_batch``, ...) are accepted and carry nothing for this model.
        """
        past = pick_cache(cache, past_key_values)
        validate_call(self.config, input_ids, inputs_embeds, output_attentions, kwargs)
        cfg = self.config
        if crossbatch is not None:
            self._validate_crossbatch(crossbatch, past, use_cache, inputs_embeds, input_ids)
            use_cache = False
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, N, _ = inputs_embeds.shape
        cache = past if past is not None else LongLlamaCache(cfg)
        valid_BN = new_token_validity(attention_mask, B, N, cache.seen_tokens)
        log_low_precision_once(compute_dtype(inputs_embeds), inputs_embeds.device)
        plan = resolve_plan(
            cfg, cache, impl=self.impl_resolver(cfg.attn_impl, inputs_embeds.device, compute_dtype(inputs_embeds)),
            training=records_gradients(self, inputs_embeds), crossbatch=crossbatch is not None,
            padded=valid_BN is not None, last_context_length=last_context_length, cache_policy=cache_policy,
            group_queries=self.window_group_queries,
        )  # fmt: skip
        inv_freqs = self._inv_freqs(inputs_embeds.device)
        keep_hidden = bool(output_hidden_states)
        if crossbatch is not None:
            x, hidden = run_chunk(self.layers, inputs_embeds, cache, valid_BN, to_memory=False, plan=plan,
                                  inv_freqs=inv_freqs, keep_hidden=keep_hidden,
                                  crossbatch=crossbatch.to(inputs_embeds.device))  # fmt: skip
            chunk_hidden = [hidden]
        else:
            x, chunk_hidden = run_windows(self.layers, inputs_embeds, cache, valid_BN, plan=plan,
                                          inv_freqs=inv_freqs, keep_hidden=keep_hidden)  # fmt: skip
        last = self.norm(x)
        hidden_states = None
        if output_hidden_states:
            per_layer = [torch.cat(h, dim=1) for h in zip(*chunk_hidden)]
            hidden_states = tuple(per_layer[:-1]) + (last,)
        out = LongLlamaModelOutput(
            last_hidden_state=last, hidden_states=hidden_states, **{CACHE_NAME: cache if use_cache else None}
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    def _validate_crossbatch(self, plan: CrossBatchPlan, cache, use_cache, inputs_embeds, input_ids) -> None:
        B, N = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if cache is not None or use_cache:
            raise ValueError("crossbatch training keeps no cache: pass past_key_values=None and use_cache=False.")
        if N > self.config.max_position_embeddings:
            raise ValueError(
                f"with crossbatch every row is one window, but rows have {N} tokens > max_position_embeddings="
                f"{self.config.max_position_embeddings}; cut documents into windows of at most that length."
            )
        plan.validate(B)


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with a language-modelling head; ``generate`` works across memory."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _code_auto_class = "AutoModelForCausalLM"

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LongLlamaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        last_context_length: int | None = None,
        cache_policy: str | None = None,
        crossbatch: CrossBatchPlan | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LongLlamaCache | None = None,
        **kwargs,
    ) -> LongLlamaCausalLMOutput:
        """Logits (and loss with ``labels``) for an input of any length; see ``LongLlamaModel.forward``.

        ``labels`` [B, N] use -100 for ignored positions and are shifted inside (token t predicts t + 1); the
        loss is transformers' ``loss_function``, so ``num_items_in_batch`` (``Trainer``'s gradient
        accumulation) normalises it as it does for ``LlamaForCausalLM``. ``logits_to_keep``: an int k > 0
        computes logits for the last k tokens only (generation uses 1), a 1-D tensor for those positions.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            last_context_length=last_context_length,
            cache_policy=cache_policy,
            crossbatch=crossbatch,
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            if logits.shape[1] != hidden.shape[1]:
                raise ValueError("labels need logits for every token; do not combine them with logits_to_keep.")
            validate_labels(labels, *hidden.shape[:2])
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = LongLlamaCausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_NAME: getattr(out, CACHE_NAME)}
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    # ------------------------------------------------------------------ generation
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give ``generate`` a ``LongLlamaCache`` (transformers would otherwise build a DynamicCache), under the
        installed transformers' name for it, whichever name the caller used."""
        given = [model_kwargs.pop(name, None) for name in CACHE_NAMES]
        cache = pick_cache(*given)
        if cache is None and generation_config.use_cache is False:
            return
        if cache is None:
            cache = LongLlamaCache(self.config, cache_policy=model_kwargs.get("cache_policy"))
        model_kwargs[CACHE_NAME] = cache

    # transformers treats max_position_embeddings as a hard context limit; for LongLLaMA it is only the window
    # length, so generation must neither cap its default length at it nor warn when a sequence passes it.
    def _prepare_generated_length(self, generation_config, has_default_max_length, *args, **kwargs):
        if has_default_max_length and generation_config.max_new_tokens is None:
            generation_config.max_new_tokens = generation_config.max_length
        return super()._prepare_generated_length(generation_config, has_default_max_length, *args, **kwargs)

    def _get_stopping_criteria(self, *args, **kwargs):
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        return StoppingCriteriaList(
            MaxLengthCriteria(c.max_length) if isinstance(c, MaxLengthCriteria) else c for c in criteria
        )


def register_auto_classes() -> None:
    """Register ``model_type="longllama"`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    for register in (
        lambda: AutoConfig.register("longllama", LongLlamaConfig),
        lambda: AutoModel.register(LongLlamaConfig, LongLlamaModel),
        lambda: AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM),
    ):
        try:
            register()
        except ValueError as err:  # already registered by an earlier import of the same classes
            if "already" not in str(err):
                raise
