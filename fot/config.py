"""LongLlamaConfig: Hugging Face LLaMA fields, the reference LongLLaMA ``mem_*`` fields, and ours.

A published LongLLaMA ``config.json`` (``model_type`` "longllama", an ``auto_map`` pointing at remote code,
``rope_scaling: null``, every ``mem_*`` key) loads unchanged: ``auto_map`` is kept as plain metadata and
ignored, because ``import fot`` registers our classes for ``model_type`` "longllama" with the Auto* factories.

Validation raises ``ValueError`` naming the field, the offending value and the fix. It runs once, when the
config is built (``from_pretrained``'s keyword overrides of the fields it checks are applied before), and again
when one of those fields is assigned afterwards; an assignment that fails is undone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.configuration_utils import PreTrainedConfig

MEM_DTYPES = ("float32", "float16", "bfloat16", "int8")  # int8: per-vector scale (fot.quant)
MEM_OFFLOADS = ("ram", "disk")
CACHE_POLICIES = ("slide", "flush")
MEM_HEADS_SCOPES = ("all", "prefill")
MEM_INDEXES = ("exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8", "ivf-gemm", "ivf-scan")
ATTN_IMPLS = ("auto", "torch", "triton", "reference")
# What ``validate_longllama`` checks: assigning one of these to a built config validates it again.
VALIDATED_FIELDS = frozenset({
    "hidden_size", "num_attention_heads", "head_dim", "num_key_value_heads", "num_hidden_layers", "mem_layers",
    "max_position_embeddings", "last_context_length", "gradient_checkpoint_every_ith", "mem_dtype",
    "mem_attention_grouping", "mem_index", "mem_top_k", "mem_max_tokens", "mem_nprobe", "cache_policy", "attn_impl",
    "rope_parameters", "mem_offload", "mem_offload_dir", "window_overlap", "mem_blocks", "mem_block_size",
    "mem_block_queries", "mem_score_bias", "mem_rope_distance", "mem_heads", "mem_heads_scope",
})  # fmt: skip


DEFAULT_NPROBE = 16  # IVF lists per query; chosen in docs/benchmarks.md, "Choosing nprobe"

# Named memory settings for a pretrained Llama, every memory field spelled out, so that applying one to a checkpoint
# that had other settings leaves nothing of them behind. "every-layer" is the long-context setting measured on
# SmolLM2-135M with no training (docs/results.md, "SmolLM2-135M, long-context setting"): memory in every layer, a
# window of 512, top-32 retrieval through ivf-scan (a CPU index; on CUDA pass mem_index="ivf-gemm"), a 32-token
# window overlap and memory scored at a RoPE distance of 512. `make smollm2` applies it; fot.recipe and
# `fot.convert --recipe` apply it to any Llama checkpoint.
RECIPES = {  # each sets every one of MEMORY_FIELDS
    "every-layer": {
        "mem_layers": "all", "max_position_embeddings": 512, "last_context_length": 256, "mem_top_k": 32,
        "mem_index": "ivf-scan", "mem_nprobe": DEFAULT_NPROBE, "mem_dtype": "bfloat16", "window_overlap": 32,
        "mem_score_bias": 0.0, "mem_rope_distance": 512, "mem_heads": None, "mem_heads_scope": "all",
    },
}
# The config fields that make a memory setting (a recipe's, and what fot ask's cache compares).
MEMORY_FIELDS = ("mem_layers", "max_position_embeddings", "last_context_length", "mem_top_k", "mem_index", "mem_nprobe",
                 "mem_dtype", "window_overlap", "mem_score_bias", "mem_rope_distance", "mem_heads", "mem_heads_scope")
MEM_LAYERS_HELP = ("'all', 'none', 'every:N' (layers 0, N, 2N, ...), 'every:N:OFFSET', a Python slice 'A:B' or "
                   "'A:B:STEP' ('15:' the layers from 15 on, '2:' all but the first two, '-8:' the last eight), "
                   "layer indices '7,15,22', or a comma-separated mix ('0,15:')")


class LongLlamaConfig(PreTrainedConfig):
    r"""Configuration of a LongLLaMA / Focused Transformer decoder.

    Standard LLaMA fields keep their Hugging Face names and meanings (``vocab_size``, ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``rms_norm_eps``, ``rope_parameters`` ...). The reference LongLLaMA fields, with its defaults:

    Args:
        max_position_embeddings: the window length W. Long inputs are cut into windows of W tokens.
        last_context_length: L, the number of trailing tokens of an input that form the last window (the
            local cache for generation). Overridable per ``forward``/``generate`` call. Default 1024, as in
            the reference, or the window length when that is shorter (so plain LLaMA checkpoints with small
            windows load).
        mem_layers: indices of the memory layers, or a compact form resolved against ``num_hidden_layers`` when the
            config is built (or the field assigned): "all", "none", "every:N" (0, N, 2N, ...), "every:N:OFFSET",
            a Python slice "A:B" / "A:B:STEP" ("15:" the upper half of 30 layers, "2:" all but the first two),
            "7,15,22", or a comma-separated mix of these. The config holds, and config.json stores, the explicit
            sorted list, so a saved checkpoint never depends on the form it was written in.
        mem_positionals: if False, memory layers use no RoPE at all (neither local nor memory keys).
        mem_dtype: storage dtype of memory keys and values ("float32", "float16" or "bfloat16"), or ours, "int8":
            each stored key and value vector as int8 with one fp32 scale (absmax / 127), dequantized to fp32 when
            read; 0.53x the bytes of bfloat16 at head_dim 64 (``fot.quant``).
        mem_attention_grouping: ``(heads, queries)`` block sizes that bound the score matrix of a memory layer,
            or None for no bound. Grouping never changes the result.
        torch_attention: the reference's switch to use ``scaled_dot_product_attention``. Kept for
            compatibility; this implementation always uses its fused CPU/GPU path unless
            ``attn_impl="reference"``.
        gradient_checkpoint_every_ith: with gradient checkpointing on, checkpoint every i-th layer.

    Our additions:

    Args:
        mem_top_k: None means dense attention over all memory (the reference behaviour); an int K makes every
            query attend to its own top-K memory slots by inner product (kNN memory), in the same softmax.
        mem_index: how top-K slots are found: "exact" (matmul + topk), "faiss-flat" (FAISS brute force),
            "faiss-ivf" (FAISS IVF-Flat, approximate), "faiss-ivf-sq8" (the same with 8-bit lists: a quarter of
            its RAM beyond the store) or "ivf-gemm" (the same IVF in torch, lists of slot ids scored with dense
            matmuls; no second copy of the keys) or "ivf-scan" (ivf-gemm's index searched by a compiled CPU scan
            keeping each query's best k as it goes, built on first use with the system's C++ compiler). See ``fot.search``.
        mem_nprobe: inverted lists visited per query by "faiss-ivf", "ivf-gemm" and "ivf-scan". The default, 16, is the knee
            measured on the demo model over text full of numbers (docs/benchmarks.md, "Choosing nprobe"): recall@32
            0.96 at 5.4x memory off at 64K tokens, against 0.90 at 4.5x for 8 and 0.99 at 8.1x for 32.
        mem_max_tokens: None means unbounded memory; an int caps the memory per layer, evicting the oldest
            tokens first (FIFO).
        cache_policy: what happens when the local cache of generation would exceed W. "slide" (default)
            evicts the oldest tokens so the most recent ``last_context_length`` tokens stay local, and moves
            the evicted ones to memory in memory layers. "flush" is the reference's policy: the whole local
            cache moves to memory (memory layers) or is dropped (other layers).
        attn_impl: "auto" (chosen once per device and logged: Triton on CUDA, torch otherwise), "torch"
            (fused PyTorch kernels merged by log-sum-exp), "triton" (the fused Triton kernels of
            ``fot.kernels``) or "reference" (the literal one-softmax implementation the others are tested
            against).
        mem_offload: where memory keys and values live: "ram" (default) or "disk", memory-mapped files in
            ``mem_offload_dir`` (the search index stays in RAM), for memories larger than the RAM.
        mem_offload_dir: the folder of the memory files when ``mem_offload="disk"``; each cache makes its own
            subfolder there.
        window_overlap: O, ours (0: the reference's windows). When a long input is cut into windows, each
            window bound for memory after the first also re-reads the last O tokens before it as local context:
            they run first, at positions 0..O-1, the window's own tokens at O..O+W-1, and only the window's own
            keys and values go to memory (those O tokens went there with the window before). In the reference
            the first tokens of every window see no local context at all: a pretrained model that was never
            trained that way (SmolLM2) reads them as the start of a text, and a pass key whose digits open a
            window cannot be retrieved (docs/results.md). Costs O / W more compute per window; the window's
            queries reach those O tokens both locally and in memory. Inference only: the trainer's windows and
            the last L tokens are not affected.
        mem_blocks: ours, block retrieval (``fot.blocks``), a second setting next to ``mem_top_k``: None (off) or
            the number of memory blocks each chunk of queries reads. Memory is grouped into blocks of
            ``mem_block_size`` consecutive slots, each with the elementwise min and max of its keys; each chunk of
            ``mem_block_queries`` consecutive queries (a decoding step is a chunk of one) chooses the blocks whose
            score bound is largest for its queries and attends to all their slots, in the one softmax with the
            local window. Its search and its attention are dense matrix products instead of a per-query top-k and
            gather. Inference only; excludes ``mem_top_k``.
        mem_score_bias: ours, b >= 0 (0: the reference). Subtracted from every memory score (after the
            1/sqrt(H) scaling) before the one softmax with the local window, so memory takes attention from the
            local context only where it matches clearly. With memory in every layer of a pretrained model, top-k
            memory's best keys score higher the longer memory grows and draw attention that language modelling
            needs locally (docs/results.md, perplexity by position). Training (crossbatch contexts, or a
            memory under autograd) subtracts it too, so an adapter learns under the offset it runs with; Triton
            has no kernel for it.
        mem_rope_distance: ours, None (the reference) or an int D >= 0. Memory keys are stored before RoPE, so
            with None a query scores them as keys at position 0: at the distance of its own offset in the local
            window, nearer than most of its local context for the window's first queries. With D every query
            scores memory as keys D positions before it (its memory query is rotated at position D), so memory
            never looks nearer than D tokens; InfLLM places its memory at the local window's distance the same
            way. D = the window keeps SmolLM2's passkeys with memory in every layer and cuts memory's damage to
            perplexity (docs/results.md). Inference with dense or top-k memory on the torch and reference paths;
            training, block retrieval and Triton refuse it.
        mem_heads: ours, None (every query head of a memory layer reads memory, the reference) or, per memory
            layer, the query heads that do: ``{layer: [heads]}``, or the compact string "18.6,18.7,21.8"
            (layer.head). A memory layer it does not list reads memory with every head; a listed layer must be a
            memory layer. The other heads of a listed layer attend to their local window only, and its memory
            stores only the key/value heads the listed heads use, so memory's RAM and search shrink with the
            head count. With memory in a pretrained model, a few heads retrieve (on SmolLM2, 16 of 270 carry
            80% of the attention a pass key gets) while most others attend to memory as to local context and
            cost perplexity (docs/results.md); ``eval/retrieval_heads.py`` finds them on validation prompts.
            The config holds, and config.json stores, ``{layer: sorted heads}``. Inference with dense or top-k
            memory on the torch and reference paths; training, block retrieval and Triton refuse it.
        mem_heads_scope: ours, where ``mem_heads`` applies. "all": in every forward, and memory stores only the
            listed heads' KV heads. "prefill": only while windows are written to memory (a prompt's windows before
            its last ``last_context_length`` tokens); the last window and generated tokens read memory with every
            head, so memory stores every KV head. On SmolLM2 a pass key whose question the model's prior answers
            otherwise ("The pass key is a small wooden box") needs every head at the question (docs/results.md).
            Under "prefill" a layer may list no head (``{layer: []}``): it reads no memory, and searches none,
            while windows go to memory, and reads it with every head in the last window and while generating.

    Before a long prefill, the cache checks that its memory fits the RAM that is available (``fot.budget``) and
    raises ``fot.budget.MemoryBudgetError`` if not; ``FOT_MEMORY_CHECK=0`` in the environment turns that off.
    """

    model_type = "longllama"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    # The reference LongLLaMA fields.
    last_context_length: int | None = None  # None: 1024, or the window if that is shorter
    mem_layers: list[int] | None = None
    mem_positionals: bool = True
    mem_dtype: str = "bfloat16"
    mem_attention_grouping: Any = None
    torch_attention: bool = False
    gradient_checkpoint_every_ith: int = 1
    # Ours.
    mem_top_k: int | None = None
    mem_index: str = "exact"
    mem_nprobe: int = DEFAULT_NPROBE
    mem_max_tokens: int | None = None
    cache_policy: str = "slide"
    attn_impl: str = "auto"
    mem_offload: str = "ram"
    mem_offload_dir: str | None = None
    window_overlap: int = 0
    mem_blocks: int | None = None
    mem_block_size: int = 32
    mem_block_queries: int = 64
    mem_score_bias: float = 0.0
    mem_rope_distance: int | None = None
    mem_heads: dict[int, list[int]] | None = None
    mem_heads_scope: str = "all"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.mem_layers, str):
            self.mem_layers = resolve_mem_layers(self.mem_layers, self.num_hidden_layers)
        if self.mem_layers is not None and not isinstance(self.mem_layers, (list, tuple)):
            raise ValueError(
                f"mem_layers must be a list of layer indices or a compact form such as 'all', got "
                f"{self.mem_layers!r}; for one memory layer write mem_layers=[{self.mem_layers!r}]."
            )
        self.mem_layers = [] if self.mem_layers is None else list(self.mem_layers)
        self.mem_heads = parse_mem_heads(self.mem_heads)
        if self.last_context_length is None:
            self.last_context_length = min(1024, self.max_position_embeddings)
        super().__post_init__(**kwargs)
        self.validate_longllama()
        # Our own flag, not transformers' ``_post_init_done`` (which older transformers 5.x do not set).
        object.__setattr__(self, "_longllama_built", True)

    def __setattr__(self, key, value):
        if key == "mem_attention_grouping" and isinstance(value, list):  # JSON and YAML give lists
            value = tuple(value)
        if key == "mem_layers" and isinstance(value, str) and getattr(self, "_longllama_built", False):
            value = resolve_mem_layers(value, self.num_hidden_layers)  # while building, ``__post_init__`` does it
        if key == "mem_heads" and getattr(self, "_longllama_built", False):
            value = parse_mem_heads(value)
        if key not in VALIDATED_FIELDS or not getattr(self, "_longllama_built", False):
            super().__setattr__(key, value)  # building: ``__post_init__`` validates the whole config once
            return
        previous = getattr(self, key)
        super().__setattr__(key, value)
        try:
            self.validate_longllama()
        except ValueError:
            super().__setattr__(key, previous)
            raise

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_longllama_built", None)  # the build flag above is state, not configuration
        return output

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "LongLlamaConfig":
        """``PreTrainedConfig.from_dict``, with ``from_pretrained``'s keyword overrides of the validated fields
        applied before the config is built (transformers would set them on the built config one by one)."""
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in VALIDATED_FIELDS}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    # ------------------------------------------------------------------ validation
    def validate_longllama(self) -> None:
        """Check every LongLLaMA-specific field; raise ``ValueError`` with the fix on the first problem."""
        self._validate_heads()
        self._validate_memory_layers()
        self._validate_lengths()
        self._validate_mem_fields()
        self._validate_rope()

    def _validate_heads(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0 and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not num_attention_heads={self.num_attention_heads} x "
                f"head_dim={self.head_dim}; set head_dim or choose a head count that divides hidden_size."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} is odd, but RoPE rotates pairs of dimensions; choose an even head_dim "
                "(hidden_size / num_attention_heads, or set head_dim)."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention); pick a divisor."
            )

    def _validate_memory_layers(self) -> None:
        n = self.num_hidden_layers
        for layer in self.mem_layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"mem_layers must hold layer indices (ints), got {layer!r} in {self.mem_layers}.")
            if not 0 <= layer < n:
                raise ValueError(
                    f"mem_layers contains {layer}, but the model has num_hidden_layers={n}; memory layers must "
                    f"be in [0, {n - 1}]."
                )
        if len(set(self.mem_layers)) != len(self.mem_layers):
            raise ValueError(f"mem_layers={self.mem_layers} lists a layer twice; list each memory layer once.")
        if self.mem_heads_scope not in MEM_HEADS_SCOPES:
            raise ValueError(f"mem_heads_scope={self.mem_heads_scope!r} is unknown; use one of "
                             f"{', '.join(MEM_HEADS_SCOPES)}.")
        for layer, heads in (self.mem_heads or {}).items():
            if layer not in self.mem_layers:
                raise ValueError(f"mem_heads lists layer {layer}, which is not a memory layer (mem_layers="
                                 f"{self.mem_layers}); add it to mem_layers or drop it from mem_heads.")
            if not heads and self.mem_heads_scope == "all":
                raise ValueError(f"mem_heads gives memory layer {layer} no head, so it would never read memory; drop "
                                 "it from mem_layers, or use mem_heads_scope='prefill' (it then reads memory in the "
                                 "last window and while generating only).")
            bad = [h for h in heads if not 0 <= h < self.num_attention_heads]
            if bad:
                raise ValueError(f"mem_heads gives layer {layer} head {bad[0]}, but the model has "
                                 f"num_attention_heads={self.num_attention_heads}; heads are in [0, "
                                 f"{self.num_attention_heads - 1}].")

    def _validate_lengths(self) -> None:
        w, lcl = self.max_position_embeddings, self.last_context_length
        if not isinstance(w, int) or w <= 0:
            raise ValueError(f"max_position_embeddings (the window length) must be a positive int, got {w!r}.")
        validate_last_context_length(lcl, w)
        o = self.window_overlap
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < w:
            raise ValueError(f"window_overlap must be an int in [0, {w}) (below the window, max_position_embeddings="
                             f"{w}), got {o!r}; 0 turns it off.")
        if not isinstance(self.gradient_checkpoint_every_ith, int) or self.gradient_checkpoint_every_ith < 1:
            raise ValueError(
                f"gradient_checkpoint_every_ith must be an int >= 1, got {self.gradient_checkpoint_every_ith!r}."
            )

    def _validate_mem_fields(self) -> None:
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype={self.mem_dtype!r} is not supported; use one of {', '.join(MEM_DTYPES)}.")
        grouping = self.mem_attention_grouping
        if grouping is not None:
            ok = (
                isinstance(grouping, tuple)
                and len(grouping) == 2
                and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grouping)
            )
            if not ok:
                raise ValueError(
                    f"mem_attention_grouping={grouping!r} must be None or a pair of positive ints "
                    "(heads, queries), e.g. (1, 2048)."
                )
        if self.mem_index not in MEM_INDEXES:
            raise ValueError(f"mem_index={self.mem_index!r} is unknown; use one of {', '.join(MEM_INDEXES)}.")
        for name in ("mem_top_k", "mem_max_tokens", "mem_nprobe"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be None or a positive int.")
        if self.mem_index != "exact" and self.mem_top_k is None:
            raise ValueError(
                f"mem_index={self.mem_index!r} searches for top-k memory slots, but mem_top_k is None (dense "
                "attention to all of memory, which searches nothing). Set mem_top_k (e.g. 32) to use the index, "
                "or drop mem_index."
            )
        for name in ("mem_blocks", "mem_block_size", "mem_block_queries"):
            value = getattr(self, name)
            if (value is not None or name != "mem_blocks") and (
                    isinstance(value, bool) or not isinstance(value, int) or value <= 0):  # fmt: skip
                raise ValueError(f"{name}={value!r} must be a positive int" + (" or None." if name == "mem_blocks"
                                                                                else "."))  # fmt: skip
        b = self.mem_score_bias
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < float("inf"):
            raise ValueError(f"mem_score_bias={b!r} must be a finite number >= 0 (0: no offset), e.g. 2.0.")
        d = self.mem_rope_distance
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ValueError(f"mem_rope_distance={d!r} must be None (the reference) or an int >= 0, e.g. "
                             f"{self.max_position_embeddings} (the window).")
        if d is not None and not self.mem_positionals:
            raise ValueError(f"mem_rope_distance={d} rotates memory queries, but mem_positionals=False turns RoPE "
                             "off in memory layers; set mem_rope_distance=None.")
        if self.mem_blocks is not None and self.mem_top_k is not None:
            raise ValueError(f"mem_blocks={self.mem_blocks} (block retrieval) and mem_top_k={self.mem_top_k} (per-query "
                             "top-k) are two ways to read memory; set one of them to None.")
        validate_cache_policy(self.cache_policy)
        if self.mem_offload not in MEM_OFFLOADS:
            raise ValueError(f"mem_offload={self.mem_offload!r} is unknown; use one of {', '.join(MEM_OFFLOADS)}.")
        if self.mem_offload == "disk" and not self.mem_offload_dir:
            raise ValueError('mem_offload="disk" needs mem_offload_dir, the folder for the memory files.')
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is unknown; use one of {', '.join(ATTN_IMPLS)}.")

    def _validate_rope(self) -> None:
        params = self.rope_parameters or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_parameters/rope_scaling of type {rope_type!r} is not supported: LongLLaMA's memory keys are "
                "stored as if at position 0 and its windows restart positions, so RoPE scaling does not apply. "
                "Remove rope_scaling (set it to null)."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def mem_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.mem_dtype)

    def memory_heads(self, layer: int) -> list[int] | None:
        """The query heads of memory layer ``layer`` that read memory (``mem_heads``), or None for all of them."""
        return None if self.mem_heads is None else self.mem_heads.get(layer)

    def memory_kv_heads(self, layer: int) -> list[int] | None:
        """The key/value head each of ``memory_heads(layer)`` reads (grouped-query attention: query head h reads
        KV head h // (num_attention_heads / num_key_value_heads)), in the same order; a KV head shared by two
        listed query heads appears twice. What memory layer ``layer`` stores, or None: every KV head (also under
        ``mem_heads_scope="prefill"``, where every head reads memory in the last window)."""
        heads = self.memory_heads(layer) if self.mem_heads_scope == "all" else None
        group = self.num_attention_heads // self.num_key_value_heads
        return None if heads is None else [h // group for h in heads]


_ANY_DEPTH = 1 << 16  # the layer count ``check_mem_layers`` resolves against


def _layer_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"mem_layers={spec!r}: {text!r} is not an integer; use {MEM_LAYERS_HELP}.") from None


def _layers_of_part(part: str, spec: str, num_hidden_layers: int) -> list[int]:
    """The layers one comma-separated part of a ``mem_layers`` string selects (in [0, num_hidden_layers))."""
    n = num_hidden_layers
    if part == "all":
        return list(range(n))
    if part == "every" or part.startswith("every:"):
        fields = part.split(":")[1:]
        if len(fields) not in (1, 2):
            raise ValueError(f"mem_layers={spec!r}: {part!r} must be 'every:N' or 'every:N:OFFSET', e.g. 'every:2'.")
        step, offset = _layer_int(fields[0], spec), _layer_int(fields[1], spec) if len(fields) == 2 else 0
        if step <= 0 or offset < 0:
            raise ValueError(f"mem_layers={spec!r}: in {part!r} N must be >= 1 and OFFSET >= 0, e.g. 'every:2:1' "
                             "(layers 1, 3, 5, ...).")
        return list(range(offset, n, step))
    if ":" in part:
        fields = part.split(":")
        if len(fields) > 3:
            raise ValueError(f"mem_layers={spec!r}: {part!r} is not a slice; write 'A:B' or 'A:B:STEP', e.g. '15:'.")
        bounds = [_layer_int(f, spec) if f.strip() else None for f in fields]
        if len(bounds) == 3 and bounds[2] is not None and bounds[2] <= 0:
            raise ValueError(f"mem_layers={spec!r}: the step of {part!r} must be >= 1 (layers are listed ascending).")
        return list(range(n))[slice(*bounds)]
    layer = _layer_int(part, spec)
    if not 0 <= layer < n:
        raise ValueError(f"mem_layers={spec!r} names layer {layer}, but the model has num_hidden_layers={n}; memory "
                         f"layers must be in [0, {n - 1}] (a slice such as '-8:' counts from the end).")
    return [layer]


def resolve_mem_layers(spec: str, num_hidden_layers: int) -> list[int]:
    """The sorted layer indices that a compact ``mem_layers`` string selects in a model of ``num_hidden_layers``.

    ``spec`` is "all", "none", "every:N", "every:N:OFFSET", a Python slice "A:B" or "A:B:STEP" (negative bounds
    count from the end, as in Python), a layer index, or a comma-separated mix of these (their union, which must
    not select a layer twice). Examples for 30 layers: "15:" -> 15 ... 29; "2:" -> 2 ... 29; "every:2" -> 0, 2,
    ..., 28; "7,15,22" -> [7, 15, 22]. "none" is the empty list; any other form that selects no layer is an
    error, as is a malformed form. Call ``check_mem_layers`` to check the syntax without a model.

    Raises:
        ValueError: naming the form, the offending part and the accepted forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"mem_layers={spec!r} is not a string; use a list of layer indices or {MEM_LAYERS_HELP}.")
    text = spec.strip().lower()
    if text == "none":
        return []
    parts = [p.strip() for p in text.split(",")]
    if not text or not all(parts):
        raise ValueError(f"mem_layers={spec!r} has an empty part; use {MEM_LAYERS_HELP}.")
    layers: list[int] = []
    for part in parts:
        layers += _layers_of_part(part, spec, num_hidden_layers)
    if len(set(layers)) != len(layers):
        twice = sorted({layer for layer in layers if layers.count(layer) > 1})
        raise ValueError(f"mem_layers={spec!r} selects layer(s) {twice} more than once; make its parts disjoint.")
    if not layers:
        model = "" if num_hidden_layers == _ANY_DEPTH else f" of a model with num_hidden_layers={num_hidden_layers}"
        raise ValueError(f"mem_layers={spec!r} selects no layer{model}; write 'none' for no memory layers, or choose "
                         "a range that holds layers.")
    return sorted(layers)


def check_mem_layers(spec: Any) -> None:
    """Raise ``ValueError`` unless ``spec`` is a list of ints or a well-formed ``mem_layers`` string. Whether its
    layers exist is checked when it is resolved against a model's layer count (``resolve_mem_layers``)."""
    if isinstance(spec, (list, tuple)):
        bad = [x for x in spec if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ValueError(f"mem_layers={list(spec)!r} holds {bad[0]!r}, not a layer index; use ints.")
        return
    resolve_mem_layers(spec, _ANY_DEPTH)  # a layer count no model reaches: only the syntax can fail


def parse_mem_heads(spec: Any) -> dict[int, list[int]] | None:
    """``mem_heads`` as the config holds it: None, or {layer: sorted heads} from a mapping (JSON's string keys
    included) or a string "18.6,18.7,21.8" of layer.head pairs ("3." for a layer with no head). Raises
    ``ValueError`` naming the form on a malformed one; whether the layers and heads exist is ``LongLlamaConfig``'s
    check."""
    if spec is None:
        return None
    form = "a mapping {layer: [heads]} or a string of layer.head pairs such as '18.6,18.7,21.8'"
    pairs: list[tuple[Any, Any]] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            layer, dot, head = part.strip().partition(".")
            if not dot:
                raise ValueError(f"mem_heads={spec!r}: {part.strip()!r} is not layer.head; use {form}.")
            pairs.append((layer, head or None))  # "3." : layer 3 lists no head
    elif isinstance(spec, dict):
        for layer, heads in spec.items():
            if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
                raise ValueError(f"mem_heads={spec!r}: layer {layer!r} maps to {heads!r}, not a list of heads; "
                                 f"use {form}.")
            heads = list(heads)
            if not heads:  # no head reads memory while windows go to memory (mem_heads_scope "prefill" only)
                pairs.append((layer, None))
            pairs.extend((layer, h) for h in heads)
    else:
        raise ValueError(f"mem_heads={spec!r} must be None, {form}.")
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        try:
            layer_i, head_i = _index(layer), None if head is None else _index(head)
        except ValueError:
            raise ValueError(f"mem_heads={spec!r}: layer {layer!r}, head {head!r} are not both indices (ints >= "
                             f"0); use {form}.") from None
        if head_i is None:
            out.setdefault(layer_i, [])
            continue
        if head_i in out.setdefault(layer_i, []):
            raise ValueError(f"mem_heads={spec!r} lists head {head_i} of layer {layer_i} twice; list it once.")
        out[layer_i].append(head_i)
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def _index(value: Any) -> int:
    """An index >= 0 from an int or its decimal string (a JSON key); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(value)
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(value)
    index = int(value)
    if index < 0:
        raise ValueError(value)
    return index


def validate_last_context_length(last_context_length: Any, window: int) -> None:
    """Raise ``ValueError`` unless ``0 < last_context_length <= window``."""
    if isinstance(last_context_length, bool) or not isinstance(last_context_length, int) or last_context_length <= 0:
        raise ValueError(f"last_context_length must be a positive int, got {last_context_length!r}.")
    if last_context_length > window:
        raise ValueError(
            f"last_context_length={last_context_length} exceeds max_position_embeddings={window} (the window); "
            f"use a value <= {window}."
        )


def validate_cache_policy(cache_policy: Any) -> None:
    """Raise ``ValueError`` unless ``cache_policy`` is one of ``CACHE_POLICIES``."""
    if cache_policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy={cache_policy!r} is unknown; use one of {CACHE_POLICIES}.")


def recipe(name: str, **overrides) -> dict[str, Any]:
    """The config fields of the named memory setting (``RECIPES``), with ``overrides`` on top: keyword arguments for
    ``LongLlamaForCausalLM.from_pretrained`` or ``LongLlamaConfig``.

        model = LongLlamaForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M", **fot.recipe("every-layer"))

    Raises:
        ValueError: an unknown name, or an override that is not a config field the recipe sets.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    fields = dict(RECIPES[name])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"recipe {name!r} sets no field {', '.join(unknown)}; it sets {', '.join(fields)} (pass "
                         "other fields to from_pretrained directly)")
    fields.update(overrides)
    return fields
