"""An independent, deliberately naive float64 statement of LongLLaMA's semantics.

Nothing here calls fot: the tests copy weights out of a model's ``state_dict`` and compare fot's outputs with
what this module computes with plain float64 torch ops, one head at a time. It is written from the
description of the reference model (``/work/shared/FACTS.md``, "The reference model's semantics"):

* Prefill of N tokens with window W and last context L: the first max(N - L, 0) tokens are cut into windows of
  W from the start; each is run through every layer on its own (no local context from earlier windows),
  RoPE positions 0..len-1, causal local attention, and in memory layers also attention to every memory slot
  of that layer, all in one softmax. After each such window its raw (pre-RoPE) keys, values and padding
  validity are appended to the memory of every memory layer. The last min(L, N) tokens form the last window,
  which becomes the local context.
* Decoding continues from the local context. Before a chunk of T tokens attends, if local + T > W:
  "flush" moves the whole local context to memory (memory layers) or drops it (other layers); "slide" keeps the
  most recent min(local, L, W - T) tokens and moves the rest. Local positions are always 0..S-1 from the start
  of the current local window, so kept tokens are re-rotated from position 0.
* mem_positionals=False: memory layers use no RoPE at all. Memory keys never get RoPE.
* Masked scores are -1e6. Memory K/V are rounded to the memory dtype when they enter memory.
"""

from __future__ import annotations

import copy
import math

import torch

MASKED = -1e6
F64 = torch.float64


class Spec:
    """Model hyper-parameters the naive implementation needs (read from a config object's attributes)."""

    def __init__(self, config, **overrides):
        get = lambda name: overrides.get(name, getattr(config, name))  # noqa: E731
        self.num_layers = get("num_hidden_layers")
        self.num_heads = get("num_attention_heads")
        self.num_kv_heads = get("num_key_value_heads") or self.num_heads
        self.hidden = get("hidden_size")
        self.head_dim = overrides.get("head_dim") or getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.eps = get("rms_norm_eps")
        self.theta = overrides.get("theta", (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.window = get("max_position_embeddings")
        self.last_context_length = get("last_context_length")
        self.mem_layers = set(get("mem_layers"))
        self.mem_positionals = get("mem_positionals")
        self.mem_dtype = getattr(torch, get("mem_dtype"))
        self.tied = get("tie_word_embeddings")
        self.overlap = overrides.get("window_overlap", getattr(config, "window_overlap", 0))
        self.mem_score_bias = overrides.get("mem_score_bias", getattr(config, "mem_score_bias", 0.0))
        # memory scored by queries at this RoPE position instead of their own (None: their own)
        self.mem_rope_distance = overrides.get("mem_rope_distance", getattr(config, "mem_rope_distance", None))
        # per memory layer, the query heads that read memory (None: all of them)
        self.mem_heads = overrides.get("mem_heads", getattr(config, "mem_heads", None))
        # "all": those heads alone read memory everywhere; "prefill": only in chunks bound for memory
        self.mem_heads_scope = overrides.get("mem_heads_scope", getattr(config, "mem_heads_scope", "all"))
        # top-k memory by exact search, only when asked for (a model's own mem_top_k is not read)
        self.top_k = overrides.get("top_k")
        # block retrieval: (blocks read per chunk, slots per block, queries per chunk), or None
        n_blocks = overrides.get("mem_blocks", getattr(config, "mem_blocks", None))
        self.blocks = None if n_blocks is None else (
            n_blocks, get("mem_block_size"), get("mem_block_queries"))  # fmt: skip


def weights_f64(model, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(F64).clone().requires_grad_(requires_grad) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x, weight, eps):
    var = (x * x).mean(-1, keepdim=True)
    return weight * (x / torch.sqrt(var + eps))


def rotate(x_TH, positions, theta):
    """LLaMA rotary embedding (half split) of x [..., T, H] at integer positions [T], in float64."""
    H = x_TH.shape[-1]
    half = H // 2
    out = torch.empty_like(x_TH)
    for i in range(half):
        freq = 1.0 / (theta ** (2 * i / H))
        ang = torch.tensor([p * freq for p in positions], dtype=F64)
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = x_TH[..., i], x_TH[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


class Layer:
    """Per-layer naive state: local raw keys/values/validity and memory keys/values/validity (one batch)."""

    def __init__(self, B, G, H):
        empty = lambda: torch.zeros(B, G, 0, H, dtype=F64)  # noqa: E731
        self.k, self.v, self.valid = empty(), empty(), torch.zeros(B, 0, dtype=torch.bool)
        self.mk, self.mv, self.mvalid = empty(), empty(), torch.zeros(B, 0, dtype=torch.bool)


class NaiveLongLlama:
    """The naive LongLLaMA: ``prefill`` then any number of ``step`` calls; both return float64 logits."""

    def __init__(self, weights: dict[str, torch.Tensor], spec: Spec, policy: str = "flush", last_context_length=None):
        self.w = weights
        self.s = spec
        self.policy = policy
        self.L = spec.last_context_length if last_context_length is None else last_context_length
        self.layers: list[Layer] | None = None

    def clone(self) -> "NaiveLongLlama":
        twin = copy.copy(self)
        twin.layers = copy.deepcopy(self.layers)
        return twin

    # ------------------------------------------------------------------ one layer's attention
    def _attention(self, idx, x_BTD, valid_BT, memory_bound: bool = False):
        s, w, st = self.s, self.w, self.layers[idx]
        p = f"model.layers.{idx}.self_attn."
        B, T, _ = x_BTD.shape
        N, G, H = s.num_heads, s.num_kv_heads, s.head_dim
        R = N // G
        q = linear(x_BTD, w[p + "q_proj.weight"], w.get(p + "q_proj.bias")).view(B, T, N, H).transpose(1, 2)
        k = linear(x_BTD, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).view(B, T, G, H).transpose(1, 2)
        v = linear(x_BTD, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).view(B, T, G, H).transpose(1, 2)
        keys_raw = torch.cat([st.k, k], dim=2)
        values = torch.cat([st.v, v], dim=2)
        key_valid = torch.cat([st.valid, valid_BT], dim=1)
        S = keys_raw.shape[2]
        is_mem = idx in s.mem_layers
        use_rope = s.mem_positionals or not is_mem
        q_pos = list(range(S - T, S))
        q_mem = q  # the queries that score memory
        if use_rope:
            q_mem = rotate(q, [s.mem_rope_distance] * T if s.mem_rope_distance is not None else q_pos, s.theta)
            q = rotate(q, q_pos, s.theta)
            keys = rotate(keys_raw, list(range(S)), s.theta)
        else:
            keys = keys_raw
        # query t (at local position S - T + t) sees local key j iff j <= S - T + t and j is not padding
        causal_TS = torch.tensor([[j <= qp for j in range(S)] for qp in q_pos], dtype=torch.bool)
        out = torch.zeros(B, N, T, H, dtype=F64)
        for b in range(B):
            visible_TS = causal_TS & key_valid[b][None, :]
            for n in range(N):
                g = n // R  # KV head g serves query heads g*R .. (g+1)*R - 1
                scores = (q[b, n] @ keys[b, g].T) / math.sqrt(H)
                scores = torch.where(visible_TS, scores, torch.full_like(scores, MASKED))
                vals = values[b, g]
                restricted = s.mem_heads is not None and idx in s.mem_heads and (
                    s.mem_heads_scope == "all" or memory_bound)
                reads_memory = not restricted or n in s.mem_heads[idx]
                if is_mem and st.mk.shape[2] and reads_memory:
                    mscores = (q_mem[b, n] @ st.mk[b, g].T) / math.sqrt(H) - s.mem_score_bias
                    mscores = torch.where(st.mvalid[b][None, :], mscores, torch.full_like(mscores, MASKED))
                    if s.top_k is not None and mscores.shape[1] > s.top_k:  # each query's k best memory scores
                        kth = mscores.topk(s.top_k, dim=1).values[:, -1:]
                        mscores = torch.where(mscores >= kth, mscores, torch.full_like(mscores, -math.inf))
                    if s.blocks is not None:  # only the slots of the blocks each query's chunk chose
                        n_blocks, size, chunk = s.blocks
                        chosen = naive_block_choice(q[b, g * R:(g + 1) * R], st.mk[b, g], st.mvalid[b], size,
                                                    n_blocks, chunk)  # fmt: skip
                        mscores = torch.where(naive_block_mask(chosen, T, st.mk.shape[2], size, chunk), mscores,
                                              torch.full_like(mscores, -math.inf))  # fmt: skip
                    scores = torch.cat([scores, mscores], dim=1)
                    vals = torch.cat([vals, st.mv[b, g]], dim=0)
                prob = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
                out[b, n] = (prob / prob.sum(dim=1, keepdim=True)) @ vals
        o = out.transpose(1, 2).reshape(B, T, N * H)
        return linear(o, w[p + "o_proj.weight"], w.get(p + "o_proj.bias")), k, v

    def _chunk(self, ids_BT, valid_BT, keep_local: bool, context: int = 0):
        """Run a chunk through all layers on top of the current local state; keep or memorise its K/V (all but
        the first ``context`` tokens', which are there to be attended to)."""
        s, w = self.s, self.w
        x = w["model.embed_tokens.weight"][ids_BT]
        for idx in range(s.num_layers):
            p = f"model.layers.{idx}."
            attn, k, v = self._attention(idx, rms_norm(x, w[p + "input_layernorm.weight"], s.eps), valid_BT,
                                         memory_bound=not keep_local)
            x = x + attn
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], s.eps)
            gate = linear(h, w[p + "mlp.gate_proj.weight"])
            up = linear(h, w[p + "mlp.up_proj.weight"])
            x = x + linear(gate * torch.sigmoid(gate) * up, w[p + "mlp.down_proj.weight"])
            st = self.layers[idx]
            if keep_local:
                st.k, st.v = torch.cat([st.k, k], 2), torch.cat([st.v, v], 2)
                st.valid = torch.cat([st.valid, valid_BT], 1)
            elif idx in s.mem_layers:
                self._to_memory(st, k[:, :, context:], v[:, :, context:], valid_BT[:, context:])
        x = rms_norm(x, w["model.norm.weight"], s.eps)
        head = w["model.embed_tokens.weight"] if s.tied else w["lm_head.weight"]
        return x @ head.T

    def _to_memory(self, st: Layer, k, v, valid):
        # memory is stored in mem_dtype and is not differentiable (only the current chunk carries gradients)
        rnd = lambda t: t.detach().to(self.s.mem_dtype).to(F64)  # noqa: E731
        st.mk, st.mv = torch.cat([st.mk, rnd(k)], 2), torch.cat([st.mv, rnd(v)], 2)
        st.mvalid = torch.cat([st.mvalid, valid], 1)

    def _make_room(self, T):
        S = self.layers[0].k.shape[2]
        if S == 0 or S + T <= self.s.window:
            return
        keep = 0 if self.policy == "flush" else min(S, self.L, self.s.window - T)
        for idx, st in enumerate(self.layers):
            n_out = S - keep
            if idx in self.s.mem_layers:
                self._to_memory(st, st.k[:, :, :n_out], st.v[:, :, :n_out], st.valid[:, :n_out])
            st.k, st.v, st.valid = st.k[:, :, n_out:], st.v[:, :, n_out:], st.valid[:, n_out:]

    # ------------------------------------------------------------------ public
    def prefill(self, ids_BN: torch.Tensor, valid_BN: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, V] of a fresh long input (windows of W, then the last L tokens kept locally)."""
        B, N = ids_BN.shape
        if valid_BN is None:
            valid_BN = torch.ones(B, N, dtype=torch.bool)
        self.layers = [Layer(B, self.s.num_kv_heads, self.s.head_dim) for _ in range(self.s.num_layers)]
        W, L = self.s.window, self.L
        n_mem = max(N - L, 0)
        logits = []
        for start in range(0, n_mem, W):
            end = min(start + W, n_mem)
            o = min(self.s.overlap, start)  # window_overlap: the O tokens before the window, read again first
            out = self._chunk(ids_BN[:, start - o:end], valid_BN[:, start - o:end], keep_local=False, context=o)
            logits.append(out[:, o:])
        logits.append(self._chunk(ids_BN[:, n_mem:], valid_BN[:, n_mem:], keep_local=True))
        return torch.cat(logits, dim=1)

    def step(self, ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of a chunk continuing the state (T <= W)."""
        B, T = ids_BT.shape
        if valid_BT is None:
            valid_BT = torch.ones(B, T, dtype=torch.bool)
        self._make_room(T)
        return self._chunk(ids_BT, valid_BT, keep_local=True)

    @property
    def local_length(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def memory_length(self) -> int:
        for idx in sorted(self.s.mem_layers):
            return self.layers[idx].mk.shape[2]
        return 0


def decoding_error(model, ids, steps, policy: str = "slide") -> float:
    """The largest logit error of ``model`` against the spec while it prefills ``ids`` [1, N], then decodes
    ``steps`` [1, S] one token at a time through its cache."""
    from tests.tiny import max_err

    naive = NaiveLongLlama(weights_f64(model), Spec(model.config), policy=policy)
    naive.prefill(ids)
    worst = 0.0
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        for t in range(steps.shape[1]):
            got = model(steps[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            worst = max(worst, max_err(got, naive.step(steps[:, t:t + 1])))
    return worst


def naive_logits(model_or_weights, config, ids, valid=None, **overrides) -> torch.Tensor:
    """Convenience: float64 logits of a fresh prefill with the naive spec."""
    weights = model_or_weights if isinstance(model_or_weights, dict) else weights_f64(model_or_weights)
    L = overrides.pop("last_context_length", None)
    return NaiveLongLlama(weights, Spec(config, **overrides), last_context_length=L).prefill(ids, valid)


# ----------------------------------------------------------------------------- attention only
def naive_attention(q_BNTH, k_BGSH, v_BGSH, valid_BS=None, mk_BGMH=None, mv_BGMH=None, mvalid_BM=None):
    """One softmax over [causal local | memory] scores, float64, explicit loops over batch, heads, queries."""
    q, k, v = q_BNTH.to(F64), k_BGSH.to(F64), v_BGSH.to(F64)
    B, N, T, H = q.shape
    G, S = k.shape[1], k.shape[2]
    R = N // G
    out = torch.zeros(B, N, T, H, dtype=F64)
    for b in range(B):
        for n in range(N):
            g = n // R
            for t in range(T):
                pos = S - T + t
                sc = (k[b, g] @ q[b, n, t]) / math.sqrt(H)
                ok = torch.arange(S) <= pos
                if valid_BS is not None:
                    ok = ok & valid_BS[b]
                sc = torch.where(ok, sc, torch.full_like(sc, MASKED))
                vals = v[b, g]
                if mk_BGMH is not None:
                    msc = (mk_BGMH[b, g].to(F64) @ q[b, n, t]) / math.sqrt(H)
                    if mvalid_BM is not None:
                        msc = torch.where(mvalid_BM[b], msc, torch.full_like(msc, MASKED))
                    sc = torch.cat([sc, msc])
                    vals = torch.cat([vals, mv_BGMH[b, g].to(F64)])
                out[b, n, t] = torch.softmax(sc, dim=0) @ vals
    return out


# ----------------------------------------------------------------------------- block retrieval (mem_blocks)
def naive_block_choice(q_RTH, mk_MH, mvalid_M, block_size, n_blocks, chunk) -> list[set[int]]:
    """The blocks each chunk of queries chooses, for one KV head: block j holds slots [j*S, (j+1)*S); its bound
    for query q is sum_d max(q_d * min_d, q_d * max_d) over the block's valid keys; a chunk's score is the
    largest bound over its queries and the R query heads; the n best blocks with a valid key are chosen."""
    q, mk = q_RTH.to(F64), mk_MH.to(F64)
    R, T, H = q.shape
    M = mk.shape[0]
    n_all = -(-M // block_size)
    choices = []
    for c0 in range(0, T, chunk):
        scores = {}
        for j in range(n_all):
            keys = [mk[m] for m in range(j * block_size, min((j + 1) * block_size, M)) if mvalid_M[m]]
            if not keys:
                continue
            lo, hi = torch.stack(keys).min(0).values, torch.stack(keys).max(0).values
            scores[j] = max(float(torch.maximum(q[r, t] * lo, q[r, t] * hi).sum())
                            for r in range(R) for t in range(c0, min(c0 + chunk, T)))  # fmt: skip
        best = sorted(scores, key=lambda j: -scores[j])[:n_blocks]
        choices.append(set(best))
    return choices


def naive_block_mask(choices: list[set[int]], T, M, block_size, chunk) -> torch.Tensor:
    """[T, M] bool: query t may read memory slot m iff m's block is among its chunk's choices."""
    return torch.tensor([[m // block_size in choices[t // chunk] for m in range(M)] for t in range(T)])
