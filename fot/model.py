"""The decoder: RMSNorm, MLP, attention with optional memory, decoder layer, and the windowing of long inputs
through the layers (``run_windows``).

Shape legend: B batch, T chunk tokens, N query heads, G KV heads, H head dim, D model dim; window groups:
P windows of W tokens, X = P*B rows.

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
run several at a time as batch rows (``run_window_group``), with the results of running them one by one.
Which windows form a group is computed up front (``plan_window_groups``) from the forward plan (``fot.plan``).

Parameter names are Hugging Face LLaMA's (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm`` ...),
so LLaMA, OpenLLaMA and LongLLaMA state dicts load unchanged. A layer is a memory layer when its index is
in ``config.mem_layers``; the difference is only which inputs its attention receives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention_function, window_group_attention
from .cache import LocalSnapshot, LongLlamaCache
from .config import LongLlamaConfig
from .crossbatch import CrossBatchPlan, crossbatch_attention
from .rope import apply_rope, rope_cos_sin, rope_inv_freq
from .types import BlockChoice, ForwardPlan, LocalKV


class LongLlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        dtype = x_BTD.dtype
        x = x_BTD.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LongLlamaMLP(nn.Module):
    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        D, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, F, bias=bias)
        self.up_proj = nn.Linear(D, F, bias=bias)
        self.down_proj = nn.Linear(F, D, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class LongLlamaAttention(nn.Module):
    """Causal self-attention over the local window, plus the memory in memory layers.

    ``project`` makes a chunk's queries, keys and values; ``forward`` attends the queries to what the decoder layer
    gathered for them (``LongLlamaDecoderLayer.forward``). Attention reads state and never writes it.
    """

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_memory_layer = layer_idx in config.mem_layers
        self.use_rope = config.mem_positionals or not self.is_memory_layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, N, G, H, bias = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(D, N * H, bias=bias)
        self.k_proj = nn.Linear(D, G * H, bias=bias)
        self.v_proj = nn.Linear(D, G * H, bias=bias)
        self.o_proj = nn.Linear(N * H, D, bias=bias)
        # config.mem_heads: the query heads that read memory (None: all). Memory then stores, per listed head, the
        # KV head it reads (config.memory_kv_heads), so it is read as N' heads with one query head each.
        # Under mem_heads_scope="prefill" memory keeps every KV head: the listed heads alone read it only in
        # windows bound for memory (the others' memory attention is replaced by their local attention there).
        heads = config.memory_heads(layer_idx) if self.is_memory_layer else None
        self.mem_heads = None if heads is None else tuple(heads)
        self.mem_heads_scope = config.mem_heads_scope
        kv_heads = config.memory_kv_heads(layer_idx) if self.is_memory_layer else None
        self.mem_kv_heads = None if kv_heads is None else tuple(kv_heads)

    def memory_queries(self, q_BNTH: torch.Tensor) -> torch.Tensor:
        """The queries that search memory: all heads, or the ``mem_heads`` ones [B, N', T, H] where memory stores
        only theirs (``mem_heads_scope="all"``)."""
        return q_BNTH if self.mem_kv_heads is None else q_BNTH[:, list(self.mem_heads)]

    def project(self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None):
        """Queries, keys and values of a chunk, rotated at the positions of ``rope_cos_sin`` unless the layer uses
        no RoPE.

        Returns:
            (q [B, N, T, H] rotated, raw keys before RoPE, rotated keys, values, each [B, G, T, H]).
        """
        B, T, _ = x_BTD.shape
        q_BNTH = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGTH = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTH = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if not self.use_rope:
            return q_BNTH, k_BGTH, k_BGTH, v_BGTH
        # Under autocast the projections come out in the autocast dtype while the tables are in the residual
        # stream's; rotating in the projections' dtype keeps q, k and v (and the cache) in one.
        cos_TH, sin_TH = (t.to(q_BNTH.dtype) for t in rope_cos_sin)
        return apply_rope(q_BNTH, cos_TH, sin_TH), k_BGTH, apply_rope(k_BGTH, cos_TH, sin_TH), v_BGTH

    def forward(
        self,
        q_BNTH: torch.Tensor,
        *,
        local_kv: LocalKV,
        k_raw_BGTH: torch.Tensor,
        v_BGTH: torch.Tensor,
        memory,
        idx_BNTK: torch.Tensor | None,
        valid_BT: torch.Tensor | None,
        plan: ForwardPlan,
        crossbatch: CrossBatchPlan | None = None,
        windows: int = 1,
        blocks: BlockChoice | None = None,
        q_mem_BNTH: torch.Tensor | None = None,
        s_mem_BNTK: torch.Tensor | None = None,
        memory_bound: bool = False,
    ) -> torch.Tensor:
        """Attend a chunk's queries.

        ``local_kv`` is the local window with the chunk's keys at its end. ``memory`` is a ``MemoryReader`` (memory
        layers) or None: dense attention to its whole view, or, in the plan's top-k mode, to each query's slots
        ``idx_BNTK``. With ``crossbatch`` (training), memory layers instead attend to the other rows' raw keys
        (position 0) and values named by it, in the same softmax. ``windows`` > 1: the chunk is that many
        consecutive windows stacked as batch rows (window-major, ``window_group_attention``). In the plan's block
        mode, ``blocks`` are the memory blocks each chunk of queries reads (``fot.blocks``). ``q_mem_BNTH``, when
        given (``config.mem_rope_distance``), are the queries that score memory; the local window is scored by
        ``q_BNTH``. ``s_mem_BNTK``, when given, are the search's own fp32 scores of ``idx_BNTK`` by the memory
        queries (``MemoryReader.retrieve_scored``). ``memory_bound``: the chunk is a window bound for memory
        (``config.mem_heads_scope="prefill"`` restricts memory to ``mem_heads`` there only).

        Returns:
            the output [B, T, D].
        """
        B, _, T, _ = q_BNTH.shape
        attend = attention_function(plan.impl, plan.attention_kind)
        if self.is_memory_layer and crossbatch is not None:
            out_BNTH = crossbatch_attention(q_BNTH, local_kv, k_raw_BGTH, v_BGTH, valid_BT, crossbatch, attend,
                                            plan.grouping, plan.score_bias)  # fmt: skip
        elif self.is_memory_layer and windows > 1:
            out_BNTH = window_group_attention(q_BNTH, local_kv, k_raw_BGTH, v_BGTH, memory.view(), windows,
                                              memory.dtype, score_bias=memory.score_bias)  # fmt: skip
        elif self.is_memory_layer and plan.memory_mode == "block":
            out_BNTH = attend(q_BNTH, local_kv, memory.view(), blocks=blocks, scratch=memory.scratch)
        else:
            mem_kv = memory.view() if self.is_memory_layer and memory is not None else None
            scratch = None if memory is None else memory.scratch
            extra = {} if q_mem_BNTH is None else {"q_mem_BNTH": q_mem_BNTH}  # only the paths that take it
            if s_mem_BNTK is not None and plan.impl == "torch":  # the search scored the slots (ivf-scan)
                extra["s_mem_BNTK"] = s_mem_BNTK
            if self.mem_kv_heads is not None and mem_kv is not None:
                out_BNTH = self._attend_memory_heads(attend, q_BNTH, local_kv, mem_kv, idx_BNTK, plan, scratch, extra)
            else:
                out_BNTH = attend(q_BNTH, local_kv, mem_kv, idx_BNTK=idx_BNTK, grouping=plan.grouping,
                                  scratch=scratch, **extra)  # fmt: skip
                if self.mem_heads is not None and mem_kv is not None and memory_bound:  # scope "prefill"
                    others = [h for h in range(self.num_heads) if h not in self.mem_heads]
                    local_only = attend(q_BNTH, local_kv, None, grouping=plan.grouping, scratch=scratch)
                    out_BNTH = out_BNTH.clone()
                    out_BNTH[:, others] = local_only[:, others].to(out_BNTH.dtype)
        out_BTD = out_BNTH.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out_BTD)

    def _attend_memory_heads(self, attend, q_BNTH, local_kv: LocalKV, mem_kv, idx_BNTK, plan: ForwardPlan, scratch,
                             extra: dict) -> torch.Tensor:  # fmt: skip
        """``config.mem_heads``: every head attends to its local window alone, then the listed heads again to the
        local window and memory in one softmax, as N' heads of one query each (memory stores one KV head per
        listed head). ``idx_BNTK`` and ``extra``'s memory queries and scores are the listed heads' already."""
        out_BNTH = attend(q_BNTH, local_kv, None, grouping=plan.grouping, scratch=scratch)
        kv = torch.tensor(self.mem_kv_heads, device=q_BNTH.device)
        local_sub = LocalKV(local_kv.k_BGSH.index_select(1, kv), local_kv.v_BGSH.index_select(1, kv),
                            local_kv.valid_BS)  # fmt: skip
        heads = list(self.mem_heads)
        out_sub = attend(q_BNTH[:, heads], local_sub, mem_kv, idx_BNTK=idx_BNTK, grouping=plan.grouping,
                         scratch=scratch, **extra)  # fmt: skip
        out_BNTH = out_BNTH.clone()
        out_BNTH[:, heads] = out_sub.to(out_BNTH.dtype)
        return out_BNTH


class LongLlamaDecoderLayer(GradientCheckpointingLayer):
    """One decoder block. Checkpointing (``gradient_checkpointing_enable``) recomputes it in backward, which is
    exact because in training a layer never writes to the cache: the model's layer loop commits what it returns."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x_BTD, *, rope_cos_sin, local, memory, valid_BT, plan: ForwardPlan, crossbatch=None,
                windows: int = 1, mem_rope_cos_sin=None, memory_bound: bool = False):  # fmt: skip
        """Run the block on a chunk.

        ``x_BTD`` is positional (a checkpointed layer passes only positional arguments through the checkpoint
        function); everything else is a keyword. ``local`` is a ``LocalWindow`` (inference) or a ``LocalSnapshot``
        (training), ``memory`` a ``MemoryReader`` or None; ``mem_rope_cos_sin`` (``config.mem_rope_distance``)
        rotates the chunk's queries from their positions to position D for memory; the rest is as in
        ``LongLlamaAttention.forward``.

        Returns:
            (output [B, T, D], (raw keys before RoPE, rotated keys, values), each [B, G, T, H]), for the caller to
            commit to the cache.
        """
        q_BNTH, k_raw_BGTH, k_rot_BGTH, v_BGTH = self.self_attn.project(self.input_layernorm(x_BTD), rope_cos_sin)
        # What attention reads is gathered here, outside it: the chunk joins the local window (the cache's window
        # stages it in its free slots, a training snapshot concatenates it) and top-k memory is searched.
        local_kv = local.extend(k_rot_BGTH, v_BGTH, valid_BT)
        if memory is not None and memory_bound and self.self_attn.mem_heads == ():
            memory = None  # mem_heads {layer: []} under scope "prefill": no memory read, nor searched, in this window
        idx_BNTK = blocks = q_mem_BNTH = s_mem_BNTK = None
        if memory is not None and mem_rope_cos_sin is not None and self.self_attn.use_rope:
            q_mem_BNTH = apply_rope(q_BNTH, *(t.to(q_BNTH.dtype) for t in mem_rope_cos_sin))
        if memory is not None and q_mem_BNTH is not None:
            q_mem_BNTH = self.self_attn.memory_queries(q_mem_BNTH)  # mem_heads: only the listed heads read memory
        if memory is not None and plan.memory_mode == "top-k" and memory.view() is not None:
            q_search = self.self_attn.memory_queries(q_BNTH) if q_mem_BNTH is None else q_mem_BNTH
            idx_BNTK, s_mem_BNTK = memory.retrieve_scored(q_search)
        if memory is not None and plan.memory_mode == "block" and memory.view() is not None:
            blocks = memory.choose_blocks(q_BNTH)
        attn_BTD = self.self_attn(
            q_BNTH, local_kv=local_kv, k_raw_BGTH=k_raw_BGTH, v_BGTH=v_BGTH, memory=memory, idx_BNTK=idx_BNTK,
            valid_BT=valid_BT, plan=plan, crossbatch=crossbatch, windows=windows, blocks=blocks, q_mem_BNTH=q_mem_BNTH,
            s_mem_BNTK=s_mem_BNTK, memory_bound=memory_bound,
        )  # fmt: skip
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD, (k_raw_BGTH, k_rot_BGTH, v_BGTH)


# ----------------------------------------------------------------------------- windowing of long inputs
def plan_chunks(n_tokens: int, window: int, last_context_length: int) -> list[tuple[int, int]]:
    """Split N tokens into windows of W over the first max(N - L, 0) tokens, then the last L tokens."""
    mem_len = max(n_tokens - last_context_length, 0)
    chunks = [(s, min(s + window, mem_len)) for s in range(0, mem_len, window)]
    chunks.append((mem_len, n_tokens))
    return chunks


@dataclass(frozen=True)
class WindowGroup:
    """Tokens [start, end) of the input, run as ``windows`` consecutive full windows stacked as batch rows
    (``windows`` > 1) or as one chunk, and either moved to memory afterwards or kept in the local window."""

    start: int
    end: int
    windows: int
    to_memory: bool


def plan_window_groups(n_tokens: int, window: int, last_context_length: int, *, fresh: bool,
                       group_size: int) -> list[WindowGroup]:  # fmt: skip
    """The chunks of ``plan_chunks`` in the order they run. With an empty local window (``fresh``) every chunk
    but the last goes to memory, and up to ``group_size`` consecutive full windows of those form one group."""
    chunks = plan_chunks(n_tokens, window, last_context_length)
    groups: list[WindowGroup] = []
    for i, (start, end) in enumerate(chunks):
        if end == start:
            continue
        to_memory = fresh and i < len(chunks) - 1
        last = groups[-1] if groups else None
        joins = (
            last is not None and to_memory and last.to_memory and end - start == window
            and last.end - last.start == last.windows * window and last.windows < group_size
        )  # fmt: skip
        if joins:
            groups[-1] = replace(last, end=end, windows=last.windows + 1)
        else:
            groups.append(WindowGroup(start, end, 1, to_memory))
    return groups


def layer_inv_freqs(config: LongLlamaConfig, layers: nn.ModuleList, device) -> list[torch.Tensor | None]:
    """Each layer's RoPE inverse frequencies, or None for a memory layer without positional encoding."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, device=device)
    return [inv_freq if layer.self_attn.use_rope else None for layer in layers]


def run_chunk(layers: nn.ModuleList, x_BTD, cache: LongLlamaCache, valid_BT, *, to_memory: bool,
              plan: ForwardPlan, inv_freqs, keep_hidden: bool, crossbatch: CrossBatchPlan | None = None,
              context: int = 0):  # fmt: skip
    """One chunk of T tokens through every layer, positioned after the cache's local window; each layer's keys
    and values are committed to the cache after it ran (kept locally, or moved to memory with ``to_memory``).
    The first ``context`` tokens are context only (``config.window_overlap``): they are attended to, but their
    keys and values are not committed. Returns the pre-norm output [B, T, D] and, with ``keep_hidden``, the hidden
    states before each layer and after the last."""
    offset = cache.local_length
    T = x_BTD.shape[1]
    inv_freq = next((f for f in inv_freqs if f is not None), None)
    rope = mem_rope = None
    if inv_freq is not None:
        positions_T = torch.arange(offset, offset + T, device=x_BTD.device)
        rope = rope_cos_sin(positions_T, inv_freq, x_BTD.dtype)
        if plan.mem_rope_distance is not None:  # turns a query at position p to position D: by D - p
            mem_rope = rope_cos_sin(plan.mem_rope_distance - positions_T, inv_freq, x_BTD.dtype)
    hidden = [x_BTD] if keep_hidden else None
    for idx, layer in enumerate(layers):
        x_BTD, kv = layer(
            x_BTD, rope_cos_sin=rope, local=cache.local_for_attention(idx, training=plan.training),
            memory=cache.memory_reader(idx), valid_BT=valid_BT, plan=plan, crossbatch=crossbatch,
            mem_rope_cos_sin=mem_rope, memory_bound=to_memory,
        )  # fmt: skip
        if crossbatch is None:  # a crossbatch step keeps no state
            if context:
                kv = tuple(t[:, :, context:] for t in kv)
            valid = valid_BT if not context or valid_BT is None else valid_BT[:, context:]
            cache.commit(idx, *kv, valid, to_memory=to_memory, training=plan.training)
        if keep_hidden:
            hidden.append(x_BTD)
    return x_BTD, hidden


def run_windows(layers: nn.ModuleList, x_BND, cache: LongLlamaCache, valid_BN, *, plan: ForwardPlan, inv_freqs,
                keep_hidden: bool):  # fmt: skip
    """Windowing (module docstring): the window groups of ``plan_window_groups``, one after another.
    Returns the pre-norm output [B, N, D] and per-group hidden states."""
    groups = plan_window_groups(x_BND.shape[1], cache.window, plan.last_context_length,
                                fresh=cache.local_length == 0, group_size=plan.window_group)  # fmt: skip
    # everything bound for memory is allocated once
    cache.expect_memory(sum(g.end - g.start for g in groups if g.to_memory), n_tokens=x_BND.shape[1],
                        batch_size=x_BND.shape[0], device=x_BND.device)  # checks the memory fits (fot.budget)
    outputs, chunk_hidden = [], []
    for group in groups:
        x_BTD = x_BND[:, group.start : group.end]
        if group.windows > 1:
            x, hidden = run_window_group(layers, x_BTD, cache, windows=group.windows, plan=plan,
                                         inv_freqs=inv_freqs, keep_hidden=keep_hidden)  # fmt: skip
        else:
            if not group.to_memory:
                cache.make_room(group.end - group.start, inv_freqs, plan=plan)
            # config.window_overlap: a memory-bound window re-reads the tokens before it as local context
            o = min(plan.window_overlap, group.start) if group.to_memory else 0
            x_in = x_BND[:, group.start - o : group.end]
            valid = None if valid_BN is None else valid_BN[:, group.start - o : group.end]
            if group.to_memory and plan.window_overlap:
                if group.start == 0 and cache.overlap_context is not None:  # the tokens before it came in a call before
                    x_in, valid, o = _with_overlap_context(x_in, valid, cache.overlap_context, plan.window_overlap)
                lo = max(group.end - plan.window_overlap, 0)
                tail = (x_BND[:, lo : group.end], None if valid_BN is None else valid_BN[:, lo : group.end])
                if lo == 0 and cache.overlap_context is not None:  # fewer tokens than the overlap so far this call
                    tail = _with_overlap_context(tail[0], tail[1], cache.overlap_context, plan.window_overlap)[:2]
                cache.keep_overlap_context(tail[0][:, -plan.window_overlap:],
                                           None if tail[1] is None else tail[1][:, -plan.window_overlap:],
                                           end=cache.seen_tokens + group.end - group.start)  # fmt: skip
            x, hidden = run_chunk(layers, x_in, cache, valid, to_memory=group.to_memory, plan=plan,
                                  inv_freqs=inv_freqs, keep_hidden=keep_hidden, context=o)  # fmt: skip
            if o:
                x = x[:, o:]
                hidden = None if hidden is None else [h[:, o:] for h in hidden]
        cache.seen_tokens += group.end - group.start
        outputs.append(x)
        chunk_hidden.append(hidden)
    return (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]), chunk_hidden


def _with_overlap_context(x_BTD, valid_BT, context, overlap: int):
    """A call's first memory-bound window with the last ``overlap`` tokens of the previous call's in front (their
    inputs, ``LongLlamaCache.overlap_context``): (inputs, validity, number of context tokens)."""
    ctx_BOD, ctx_valid_BO = context
    ctx_BOD = ctx_BOD[:, -overlap:].to(device=x_BTD.device, dtype=x_BTD.dtype)
    O = ctx_BOD.shape[1]
    if valid_BT is not None or ctx_valid_BO is not None:
        ones = torch.ones
        ctx_valid = ones(ctx_BOD.shape[:2], dtype=torch.bool, device=x_BTD.device) if ctx_valid_BO is None else \
            ctx_valid_BO[:, -O:].to(x_BTD.device)
        new_valid = ones(x_BTD.shape[:2], dtype=torch.bool, device=x_BTD.device) if valid_BT is None else valid_BT
        valid_BT = torch.cat([ctx_valid, new_valid.bool()], dim=1)
    return torch.cat([ctx_BOD, x_BTD], dim=1), valid_BT, O


def run_window_group(layers: nn.ModuleList, x_BTD, cache: LongLlamaCache, *, windows: int, plan: ForwardPlan,
                     inv_freqs, keep_hidden: bool):  # fmt: skip
    """P = ``windows`` full windows that go straight to memory, run as P*B batch rows (window-major), with
    the results of running them one by one: each row attends causally inside its window, a memory layer's
    window p also to the memory and to windows 0..p-1 (``window_group_attention``), and the keys go to
    memory in window order after each layer. Returns the pre-norm output [B, P*W, D] and hidden states."""
    B, PW, D = x_BTD.shape
    P = windows
    W = PW // P
    inv_freq = next((f for f in inv_freqs if f is not None), None)
    rope = None if inv_freq is None else rope_cos_sin(torch.arange(W, device=x_BTD.device), inv_freq, x_BTD.dtype)
    x_XWD = x_BTD.reshape(B, P, W, D).transpose(0, 1).reshape(P * B, W, D)  # X = P*B rows, window-major
    hidden = [x_BTD] if keep_hidden else None
    for idx, layer in enumerate(layers):
        x_XWD, (k_raw_XGWH, _, v_XGWH) = layer(
            x_XWD, rope_cos_sin=rope, local=LocalSnapshot(None, None, None), memory=cache.memory_reader(idx),
            valid_BT=None, plan=plan, windows=P,
        )  # fmt: skip
        G, H = k_raw_XGWH.shape[1], k_raw_XGWH.shape[3]
        # [P*B, G, W, H] -> [B, G, P*W, H]: each row's windows in order, as running them one by one stores them
        k_raw_BGTH = k_raw_XGWH.reshape(P, B, G, W, H).permute(1, 2, 0, 3, 4).reshape(B, G, PW, H)
        v_BGTH = v_XGWH.reshape(P, B, G, W, H).permute(1, 2, 0, 3, 4).reshape(B, G, PW, H)
        cache.commit(idx, k_raw_BGTH, None, v_BGTH, None, to_memory=True, training=plan.training)
        if keep_hidden:
            hidden.append(x_XWD.reshape(P, B, W, D).transpose(0, 1).reshape(B, PW, D))
    return x_XWD.reshape(P, B, W, D).transpose(0, 1).reshape(B, PW, D), hidden
