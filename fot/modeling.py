"""LongLlamaModel and LongLlamaForCausalLM: windowing of long inputs, loss, generation, Auto* registration.

Windowing of an input of N new tokens (W = ``max_position_embeddings``, L = ``last_context_length``):
  1. The first max(N - L, 0) tokens are cut into windows of W tokens counted from the start of the input;
     the last of these may be short.
  2. When the local cache is empty, each such window attends causally to itself and (memory layers) to the
     whole memory, then its keys/values are appended to memory, so a window sees itself only locally.
  3. The final L tokens form the last window, which becomes the local cache (e.g. N=1500, W=2048, L=1024
     gives 476 + 1024).
  4. With a non-empty local cache (generation, or a call continuing a cache), every chunk first makes room
     according to the cache policy (see ``fot.cache``) and is then appended to the local window.
Logits cover all N tokens (or the last ``logits_to_keep``).

Window groups: in inference with dense, unbounded memory and no padding, consecutive full windows of step 2
run several at a time as batch rows (``_run_window_group``), with the results of running them one by one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import rope_cos_sin, rope_inv_freq
from .cache import LocalSnapshot, LongLlamaCache
from .config import CACHE_POLICIES, LongLlamaConfig, validate_last_context_length
from .crossbatch import CrossBatchPlan
from .inputs import CACHE_NAME, CACHE_NAMES, compute_dtype, log_low_precision_once, new_token_validity, pick_cache
from .inputs import validate_call, validate_labels
from .model import LongLlamaDecoderLayer, LongLlamaRMSNorm

logger = logging.getLogger(__name__)

WINDOW_GROUP_QUERIES = 1024  # short windows bound for memory run in groups of at least this many tokens
WINDOW_GROUP_MAX = 8  # windows per group at most


def _with_cache_alias(cls, name: str):
    """On transformers < 5.24 outputs name the cache ``past_key_values`` only; also read it as ``.cache``, the
    name of 5.24 and later (which read the older name themselves)."""
    if CACHE_NAME == "cache":
        return cls
    return type(name, (cls,), {"cache": property(lambda self: self.past_key_values), "__module__": __name__})


# HF's own output classes, so the cache field has the installed transformers' name.
LongLlamaModelOutput = _with_cache_alias(BaseModelOutputWithPast, "LongLlamaModelOutput")
LongLlamaCausalLMOutput = _with_cache_alias(CausalLMOutputWithPast, "LongLlamaCausalLMOutput")


def plan_chunks(n_tokens: int, window: int, last_context_length: int) -> list[tuple[int, int]]:
    """Split N tokens into windows of W over the first max(N - L, 0) tokens, then the last L tokens."""
    mem_len = max(n_tokens - last_context_length, 0)
    chunks = [(s, min(s + window, mem_len)) for s in range(0, mem_len, window)]
    chunks.append((mem_len, n_tokens))
    return chunks


def _full_windows_ahead(chunks: list[tuple[int, int]], window: int, limit: int) -> int:
    """How many of ``chunks``, from the first on, are full windows in a row (at most ``limit``)."""
    n = 0
    while n < min(limit, len(chunks)) and chunks[n][1] - chunks[n][0] == window:
        n += 1
    return n


def resolve_attn_impl(config: LongLlamaConfig, device: torch.device) -> str:
    """The concrete implementation for ``device``: "auto" picks Triton on CUDA when it can run there and the
    fused torch path otherwise (the caller logs the choice); an explicit "triton" that cannot run raises."""
    from .kernels import unavailable_reason

    impl = config.attn_impl
    if impl == "auto":
        return "triton" if device.type == "cuda" and unavailable_reason(device) is None else "torch"
    if impl == "triton":
        reason = unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"attn_impl='triton' cannot run on {device}: {reason}. Use attn_impl='torch' or 'auto'.")
    return impl


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongLlamaDecoderLayer"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """transformers' switch, then the reference's ``gradient_checkpoint_every_ith``: only layers whose index
        is a multiple of it are checkpointed."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        every = self.config.gradient_checkpoint_every_ith
        for module in self.modules():
            if isinstance(module, LongLlamaDecoderLayer):
                module.gradient_checkpointing = module.gradient_checkpointing and module.layer_idx % every == 0


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The decoder stack: embeddings, ``num_hidden_layers`` layers (some with memory), final norm."""

    def __init__(self, config: LongLlamaConfig):
        config.validate_longllama()
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._impl_logged = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ------------------------------------------------------------------ helpers
    def _attn_impl(self, device) -> str:
        impl = resolve_attn_impl(self.config, device)
        if self.config.attn_impl == "auto" and self._impl_logged != impl:
            logger.info("fot: attn_impl='auto' chose %r on %s", impl, device.type)
            self._impl_logged = impl
        return impl

    def _inv_freqs(self, device) -> list[torch.Tensor | None]:
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device=device)
        return [inv_freq if layer.self_attn.use_rope else None for layer in self.layers]

    # ------------------------------------------------------------------ one chunk through all layers
    def _run_chunk(
        self, x_BTD, cache: LongLlamaCache, valid_BT, to_memory: bool, impl: str, inv_freqs, keep_hidden: bool,
        crossbatch: CrossBatchPlan | None = None,
    ):
        offset = cache.local_length
        T = x_BTD.shape[1]
        inv_freq = next((f for f in inv_freqs if f is not None), None)
        rope = None
        if inv_freq is not None:
            rope = rope_cos_sin(torch.arange(offset, offset + T, device=x_BTD.device), inv_freq, x_BTD.dtype)
        grouping = self.config.mem_attention_grouping
        hidden = [x_BTD] if keep_hidden else None
        for idx, layer in enumerate(self.layers):
            # Hidden states go positionally: a checkpointed layer (GradientCheckpointingLayer) passes only
            # positional arguments through the checkpoint function.
            x_BTD, kv = layer(
                x_BTD, rope_cos_sin=rope, local=cache.local_for_attention(idx), memory=cache.memory_reader(idx),
                valid_BT=valid_BT, impl=impl, grouping=grouping, crossbatch=crossbatch,
            )  # fmt: skip
            if crossbatch is None:  # a crossbatch step keeps no state
                cache.commit(idx, *kv, valid_BT, to_memory)
            if keep_hidden:
                hidden.append(x_BTD)
        return x_BTD, hidden

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
            last_context_length: overrides ``config.last_context_length`` for this call.
            cache_policy: overrides the cache's policy ("slide" or "flush").
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
        L = cfg.last_context_length if last_context_length is None else last_context_length
        validate_last_context_length(L, cfg.max_position_embeddings)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, N, _ = inputs_embeds.shape
        cache = past if past is not None else LongLlamaCache(cfg)
        if cache_policy is not None:
            if cache_policy not in CACHE_POLICIES:
                raise ValueError(f"cache_policy={cache_policy!r} is unknown; use one of {CACHE_POLICIES}.")
            cache.policy = cache_policy
        valid_BN = new_token_validity(attention_mask, B, N, cache.seen_tokens)
        log_low_precision_once(compute_dtype(inputs_embeds), inputs_embeds.device)
        impl = self._attn_impl(inputs_embeds.device)
        inv_freqs = self._inv_freqs(inputs_embeds.device)
        if crossbatch is not None:
            crossbatch = crossbatch.to(inputs_embeds.device)
            x, hidden = self._run_chunk(
                inputs_embeds, cache, valid_BN, False, impl, inv_freqs, bool(output_hidden_states), crossbatch
            )
            chunk_hidden = [hidden]
        else:
            x, chunk_hidden = self._run_windows(
                inputs_embeds, cache, valid_BN, L, impl, inv_freqs, bool(output_hidden_states)
            )
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

    def _run_windows(self, x_BND, cache: LongLlamaCache, valid_BN, L: int, impl: str, inv_freqs, keep_hidden: bool):
        """Windowing (module docstring): returns the pre-norm output [B, N, D] and per-chunk hidden states."""
        fresh = cache.local_length == 0
        W = self.config.max_position_embeddings
        chunks = plan_chunks(x_BND.shape[1], W, L)
        P = self._window_group_size(cache, valid_BN, impl) if fresh else 1
        if fresh:  # every chunk but the last goes to memory: allocate for all of it once
            cache.expect_memory(chunks[-1][0])
        outputs, chunk_hidden = [], []
        i = 0
        while i < len(chunks):
            s, e = chunks[i]
            i += 1
            if e == s:
                continue
            to_memory = fresh and i < len(chunks)
            n = _full_windows_ahead(chunks[i - 1 : -1], W, P) if to_memory and P > 1 else 0
            if n > 1:
                x, hidden = self._run_window_group(x_BND[:, s : s + n * W], cache, n, impl, inv_freqs, keep_hidden)
                cache.seen_tokens += n * W
                outputs.append(x)
                chunk_hidden.append(hidden)
                i += n - 1
                continue
            if not to_memory:
                cache.make_room(e - s, L, inv_freqs)
            valid = None if valid_BN is None else valid_BN[:, s:e]
            x, hidden = self._run_chunk(x_BND[:, s:e], cache, valid, to_memory, impl, inv_freqs, keep_hidden)
            cache.seen_tokens += e - s
            outputs.append(x)
            chunk_hidden.append(hidden)
        return (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]), chunk_hidden

    def _window_group_size(self, cache: LongLlamaCache, valid_BN, impl: str) -> int:
        """How many full windows bound for memory run together (``_run_window_group``); 1 = one at a time.

        Grouping serves inference with dense, unbounded memory and no padding on the fused torch path: there
        it is exact and feeds the CPU attention kernel at least ``WINDOW_GROUP_QUERIES`` queries per call.
        """
        W = self.config.max_position_embeddings
        if (torch.is_grad_enabled() or impl != "torch" or cache.top_k is not None or valid_BN is not None
                or self.config.mem_attention_grouping is not None or W >= WINDOW_GROUP_QUERIES
                or any(store.max_tokens is not None for store in cache.memories.values())):  # fmt: skip
            return 1
        return min(WINDOW_GROUP_MAX, -(-WINDOW_GROUP_QUERIES // W))

    def _run_window_group(self, x_BTD, cache: LongLlamaCache, P: int, impl: str, inv_freqs, keep_hidden: bool):
        """P full windows that go straight to memory, run as P*B batch rows (window-major), with the results
        of running them one by one: each row attends causally inside its window, a memory layer's window p
        also to the memory and to windows 0..p-1 (``window_group_attention``), and the keys go to memory in
        window order after each layer. Returns the pre-norm output [B, P*W, D] and hidden states."""
        B, PW, D = x_BTD.shape
        W = PW // P

        def rows(t):  # [B, P*W, D] -> [P*B, W, D]
            return t.reshape(B, P, W, D).transpose(0, 1).reshape(P * B, W, D)

        def tokens(t):  # [P*B, W, D] -> [B, P*W, D]
            return t.reshape(P, B, W, D).transpose(0, 1).reshape(B, PW, D)

        def window_order(t):  # [P*B, G, W, H] -> [B, G, P*W, H]
            return t.reshape(P, B, *t.shape[1:]).permute(1, 2, 0, 3, 4).reshape(B, t.shape[1], PW, t.shape[3])

        inv_freq = next((f for f in inv_freqs if f is not None), None)
        rope = None if inv_freq is None else rope_cos_sin(torch.arange(W, device=x_BTD.device), inv_freq, x_BTD.dtype)
        x = rows(x_BTD)
        hidden = [x_BTD] if keep_hidden else None
        for idx, layer in enumerate(self.layers):
            memory = cache.memory_reader(idx, windows=P)
            x, (k_raw, _, v) = layer(
                x, rope_cos_sin=rope, local=LocalSnapshot(None, None, None), memory=memory, valid_BT=None,
                impl=impl, grouping=None,
            )  # fmt: skip
            cache.commit(idx, window_order(k_raw), None, window_order(v), None, to_memory=True)
            if keep_hidden:
                hidden.append(tokens(x))
        return tokens(x), hidden

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
