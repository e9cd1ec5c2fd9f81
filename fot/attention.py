"""All attention math of fot, as pure functions.

Shape legend: B batch, T query tokens, S local keys, M memory slots, N query heads, G KV heads,
R = N // G query heads per KV head, H head dim, D model dim.

Semantics (LongLLaMA memory attention). A memory layer's queries attend to their local keys (causal and
padding mask) and to every memory key (memory padding mask only). The scores of both are concatenated,
scaled by 1/sqrt(H) and go through ONE fp32 softmax over [local | memory]; there is no gate. A masked score
is -1e6 (not -inf), as in the reference, so a row whose every key is masked attends uniformly instead of
producing NaN. Memory keys are stored before RoPE, i.e. "as if at position 0".

``reference_memory_attention`` states these semantics literally (it materialises the score matrix, with the
reference's (heads, queries) grouping). ``fused_memory_attention`` is the fast path: the local part and
each block of memory are attended separately with a fused kernel that also returns the log-sum-exp (LSE),
and the partial results are merged exactly by their LSEs. Memory is visited block by block in the compute
dtype, so a bf16 memory is never cast to fp32 as a whole.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .quant import round_trip
from .blocks import block_slots, chunk_queries, unchunk_queries
from .types import IMPLEMENTATIONS, BlockChoice, LocalKV, MemoryKV, QuantizedMemoryKV, flat_rows

MASKED_SCORE = -1e6  # the reference clamps masked scores to max(score + mask, -1e6)


def masked_score(dtype: torch.dtype) -> float:
    """-1e6, or the most negative finite value of ``dtype`` when -1e6 does not fit (fp16), as the reference."""
    return max(MASKED_SCORE, torch.finfo(dtype).min)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in fp32 (the reference), or in the input dtype when that is wider (float64 specs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


MEMORY_BLOCK = 8192  # memory slots per fused call when the memory dtype differs from the compute dtype
SMALL_GATHER = 1024  # retrieved rows per KV head up to which one advanced-indexing gather beats index_select


# ----------------------------------------------------------------------------- inputs
def local_visibility(T: int, local: LocalKV) -> torch.Tensor:
    """Bool [B or 1, 1, T, S]: True where query t may attend local key s (causal with offset, and padding)."""
    S = local.k_BGSH.shape[-2]
    device = local.k_BGSH.device
    q_pos_T1 = torch.arange(S - T, S, device=device)[:, None]
    causal_TS = torch.arange(S, device=device)[None, :] <= q_pos_T1
    visible_B1TS = causal_TS[None, None]
    if local.valid_BS is not None:
        visible_B1TS = visible_B1TS & local.valid_BS[:, None, None, :]
    return visible_B1TS


# ----------------------------------------------------------------------------- reference
def reference_memory_attention(
    q_BNTH: torch.Tensor,
    local: LocalKV,
    memory: MemoryKV | None,
    grouping: tuple[int, int] | None = None,
    q_mem_BNTH: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec: one fp32 softmax over [local | memory] scores, computed literally.

    Scores are computed in the query dtype (memory is cast to it), masked scores are set to -1e6, the softmax
    runs in fp32 and its probabilities are cast back to the query dtype before multiplying the values. With
    ``grouping=(h, q)`` at most h heads and q queries are processed at once, which bounds the score matrix
    and does not change the result.

    Args:
        q_BNTH: rotated queries.
        local: local keys/values; the T queries are the last T local positions.
        memory: memory keys/values, or None.
        grouping: optional (heads, queries) block sizes.
        q_mem_BNTH: the queries that score memory (``config.mem_rope_distance``), or None: ``q_BNTH``.

    Returns:
        [B, N, T, H] in the query dtype.
    """
    B, N, T, H = q_BNTH.shape
    G = local.k_BGSH.shape[1]
    R = N // G
    dtype = q_BNTH.dtype
    k_BNSH = local.k_BGSH.repeat_interleave(R, dim=1)
    v_BNSH = local.v_BGSH.repeat_interleave(R, dim=1)
    visible_B1TS = local_visibility(T, local)
    if memory is not None and memory.size > 0:
        k_mem_BNMH = memory.k_BGMH.repeat_interleave(R, dim=1).to(dtype)
        v_mem_BNMH = memory.v_BGMH.repeat_interleave(R, dim=1).to(dtype)
    else:
        memory = None
    step_h, step_q = grouping if grouping is not None else (N, T)
    q_mem_BNTH = q_BNTH if q_mem_BNTH is None else q_mem_BNTH
    out_BNTH = torch.empty_like(q_BNTH)
    for h0 in range(0, N, step_h):
        hs = slice(h0, min(h0 + step_h, N))
        for t0 in range(0, T, step_q):
            ts = slice(t0, min(t0 + step_q, T))
            q = q_BNTH[:, hs, ts]
            scores = torch.matmul(q, k_BNSH[:, hs].transpose(2, 3)) / math.sqrt(H)
            scores = scores.masked_fill(~visible_B1TS[:, :, ts], masked_score(dtype))
            values = v_BNSH[:, hs]
            if memory is not None:
                q_mem = q_mem_BNTH[:, hs, ts]
                mem_scores = torch.matmul(q_mem, k_mem_BNMH[:, hs].transpose(2, 3)) / math.sqrt(H) - memory.score_bias
                if memory.valid_BM is not None:
                    mem_scores = mem_scores.masked_fill(~memory.valid_BM[:, None, None, :], masked_score(dtype))
                scores = torch.cat([scores, mem_scores], dim=-1)
                values = torch.cat([values, v_mem_BNMH[:, hs]], dim=-2)
            probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype(dtype)).to(dtype)
            out_BNTH[:, hs, ts] = torch.matmul(probs, values)
    return out_BNTH


# ----------------------------------------------------------------------------- private aten adapter
# The fused paths merge partial attentions (local window, memory blocks) by their log-sum-exps, and the split
# backward runs the kernel's own backward with the *merged* output and LSE. The public
# ``scaled_dot_product_attention`` returns neither the LSE nor accepts one, so on CPU these two private aten
# ops of PyTorch's flash-attention kernel are used, here and nowhere else. Private ops may change in any torch
# release: tests/test_attention.py checks their schemas and results against a matmul softmax.
def cpu_flash_attention(q, k, v, *, is_causal: bool, scale: float, attn_mask=None):
    """(out [B, X, T, H], lse fp32 [B, X, T]) of softmax attention on CPU; ``attn_mask`` additive."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out, lse


def cpu_flash_attention_backward(grad_out, q, k, v, out, lse, *, is_causal: bool, scale: float):
    """(dq, dk, dv) of ``cpu_flash_attention`` given its (or a merged) output and log-sum-exp."""
    back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return back(grad_out, q, k, v, out, lse, 0.0, is_causal, scale=scale)


# ----------------------------------------------------------------------------- fused path
def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, masked_score(dtype))


def attention_with_lse(q, k, v, bias=None, is_causal=False):
    """Softmax attention returning (out [B, X, T, H], lse fp32 [B, X, T]).

    ``bias`` is an additive float mask broadcastable to [B, X, T, S]. On CPU this is PyTorch's fused
    flash-attention kernel; elsewhere a matmul implementation with an fp32 softmax (the Triton kernels
    replace it on CUDA).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.device.type == "cpu":
        return cpu_flash_attention(q, k, v, is_causal=is_causal, scale=scale, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if is_causal:
        T, S = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), MASKED_SCORE)
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(v.dtype)
    return torch.matmul(probs, v), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Merge two partial softmax attentions over disjoint key sets by their log-sum-exps (in fp32, or in fp64
    for fp64 inputs)."""
    dtype = softmax_dtype(out_a.dtype)
    lse = torch.logaddexp(lse_a.to(dtype), lse_b.to(dtype))
    w_a = torch.exp(lse_a - lse)[..., None]
    w_b = torch.exp(lse_b - lse)[..., None]
    return out_a.to(dtype) * w_a + out_b.to(dtype) * w_b, lse


def _local_part(q_BNTH: torch.Tensor, local: LocalKV):
    B, N, T, H = q_BNTH.shape
    G = local.k_BGSH.shape[1]
    S = local.k_BGSH.shape[-2]
    k_BNSH = local.k_BGSH if G == N else local.k_BGSH.repeat_interleave(N // G, dim=1)
    v_BNSH = local.v_BGSH if G == N else local.v_BGSH.repeat_interleave(N // G, dim=1)
    if S == T and local.valid_BS is None:
        return attention_with_lse(q_BNTH, k_BNSH, v_BNSH, is_causal=True)
    bias = _additive(local_visibility(T, local), q_BNTH.dtype)
    return attention_with_lse(q_BNTH, k_BNSH, v_BNSH, bias=bias)


def _memory_part(q_BGXH: torch.Tensor, memory: MemoryKV, block: int):
    """Attend [B, G, X, H] queries (X = R*T, grouped by KV head) to all memory, block by block."""
    dtype = q_BGXH.dtype
    M = memory.size
    same_dtype = memory.k_BGMH.dtype == dtype
    step = M if same_dtype and memory.valid_BM is None else block
    out = lse = None
    for m0 in range(0, M, step):
        ms = slice(m0, min(m0 + step, M))
        k = memory.k_BGMH[:, :, ms].to(dtype)
        v = memory.v_BGMH[:, :, ms].to(dtype)
        bias = None
        if memory.valid_BM is not None:
            bias = _additive(memory.valid_BM[:, None, None, ms], dtype)
        o_blk, lse_blk = attention_with_lse(q_BGXH, k, v, bias=bias)
        if out is None:
            out, lse = o_blk, lse_blk
        else:
            out, lse = merge_lse(out, lse, o_blk, lse_blk)
    return out, lse


class _SplitSoftmaxAttention(torch.autograd.Function):
    """One softmax over [causal local | memory] on CPU, as two fused flash calls merged by LSE, with backward.

    Forward: the causal local part (no mask tensor: the kernel skips the blocks above the diagonal) and the
    memory part are attended separately and merged by their log-sum-exps. Backward: a softmax over a union of
    key sets has the gradient of each part given by the *merged* output and log-sum-exp (P = exp(S - LSE),
    dS = P (dP - rowsum(dO * O))), so the fused kernel's own backward is run once per part with the merged
    (out, lse) and the query gradients are summed. This is exact, builds no [T, S + M] mask and never
    concatenates local and memory keys.
    """

    @staticmethod
    def forward(ctx, q_BNTH, k_BNTH, v_BNTH, k_mem_BGMH, v_mem_BGMH, score_bias: float = 0.0):
        B, N, T, H = q_BNTH.shape
        G = k_mem_BGMH.shape[1]
        scale = 1.0 / math.sqrt(H)
        out_l, lse_l = cpu_flash_attention(q_BNTH, k_BNTH, v_BNTH, is_causal=True, scale=scale)
        q_BGXH = q_BNTH.reshape(B, G, (N // G) * T, H)
        out_m, lse_m = cpu_flash_attention(q_BGXH, k_mem_BGMH, v_mem_BGMH, is_causal=False, scale=scale)
        # a memory score offset b lowers every memory score, so the memory part's log-sum-exp by exactly b
        merged, lse = merge_lse(out_l, lse_l, out_m.reshape(B, N, T, H), lse_m.reshape(B, N, T) - score_bias)
        out = merged.to(q_BNTH.dtype)
        ctx.save_for_backward(q_BNTH, k_BNTH, v_BNTH, k_mem_BGMH, v_mem_BGMH, out, lse)
        ctx.scale, ctx.score_bias = scale, score_bias
        return out

    @staticmethod
    def backward(ctx, grad_BNTH):
        q, k, v, k_mem, v_mem, out, lse = ctx.saved_tensors
        B, N, T, H = q.shape
        G = k_mem.shape[1]
        X = (N // G) * T
        grad_BNTH = grad_BNTH.contiguous()
        dq_l, dk, dv = cpu_flash_attention_backward(grad_BNTH, q, k, v, out, lse, is_causal=True, scale=ctx.scale)
        # the kernel forms P = exp(scale * S - lse); with the offset the memory part's P is exp(scale * S - b - lse)
        dq_m, dk_mem, dv_mem = cpu_flash_attention_backward(
            grad_BNTH.reshape(B, G, X, H), q.reshape(B, G, X, H), k_mem, v_mem,
            out.reshape(B, G, X, H), (lse + ctx.score_bias).reshape(B, G, X), is_causal=False, scale=ctx.scale,
        )  # fmt: skip
        return dq_l + dq_m.reshape(B, N, T, H), dk, dv, dk_mem, dv_mem, None


def _split_softmax_applies(q_BNTH: torch.Tensor, local: LocalKV, memory: MemoryKV | None) -> bool:
    """The split path needs the CPU kernel, a causal local window without padding and an unpadded memory of
    the compute dtype."""
    return (
        q_BNTH.device.type == "cpu"
        and memory is not None
        and memory.size > 0
        and memory.valid_BM is None
        and local.valid_BS is None
        and local.k_BGSH.shape[-2] == q_BNTH.shape[-2]
        and memory.k_BGMH.dtype == q_BNTH.dtype
        and memory.k_BGMH.shape[0] == q_BNTH.shape[0]
    )


def differentiable_memory_attention(q_BNTH: torch.Tensor, local: LocalKV, memory: MemoryKV | None) -> torch.Tensor:
    """``reference_memory_attention`` with a backward, for training.

    On CPU with a causal, unpadded window (the crossbatch objective's case) this is ``_SplitSoftmaxAttention``.
    Otherwise the keys are concatenated and one ``scaled_dot_product_attention`` (with its own backward)
    computes the single softmax. Gradients reach q, the local keys/values and memory keys/values that
    require grad (the crossbatch objective's additional contexts).
    """
    if _split_softmax_applies(q_BNTH, local, memory):
        N, G = q_BNTH.shape[1], local.k_BGSH.shape[1]
        k_BNTH = local.k_BGSH if G == N else local.k_BGSH.repeat_interleave(N // G, dim=1)
        v_BNTH = local.v_BGSH if G == N else local.v_BGSH.repeat_interleave(N // G, dim=1)
        return _SplitSoftmaxAttention.apply(q_BNTH, k_BNTH, v_BNTH, memory.k_BGMH, memory.v_BGMH, memory.score_bias)
    T = q_BNTH.shape[-2]
    dtype = q_BNTH.dtype
    bias = _additive(local_visibility(T, local), dtype)  # [B or 1, 1, T, S]
    k, v = local.k_BGSH, local.v_BGSH
    if memory is not None and memory.size > 0:
        k = torch.cat([k.expand(memory.k_BGMH.shape[0], -1, -1, -1), memory.k_BGMH.to(dtype)], dim=2)
        v = torch.cat([v.expand(memory.v_BGMH.shape[0], -1, -1, -1), memory.v_BGMH.to(dtype)], dim=2)
        B, M = k.shape[0], memory.size
        if memory.valid_BM is not None:
            mem_bias = _additive(memory.valid_BM[:, None, None, :].expand(B, 1, T, M), dtype) - memory.score_bias
            bias = torch.cat([bias.expand(B, 1, T, -1), mem_bias], dim=-1)
        else:  # keep a batch-broadcast mask when nothing is padded: no [B, 1, T, S+M] tensor to build and read
            mem_bias = bias.new_full((bias.shape[0], 1, T, M), -memory.score_bias)
            bias = torch.cat([bias, mem_bias], dim=-1)
    G, N = k.shape[1], q_BNTH.shape[1]
    return F.scaled_dot_product_attention(q_BNTH, k, v, attn_mask=bias, enable_gqa=G != N)


def fused_memory_attention(
    q_BNTH: torch.Tensor,
    local: LocalKV,
    memory: MemoryKV | None,
    grouping: tuple[int, int] | None = None,
    block: int = MEMORY_BLOCK,
    q_mem_BNTH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast path of ``reference_memory_attention`` (same arguments and result, up to rounding).

    Local attention and memory attention are computed by a fused kernel with LSE and merged exactly. Memory
    queries are regrouped per KV head ([B, G, R*T, H]) so GQA memory is never repeated. ``grouping`` splits
    the work into (heads, queries) blocks, bounding peak memory the way the reference's grouping does.
    It has no backward of its own (training uses ``differentiable_memory_attention``).
    """
    B, N, T, H = q_BNTH.shape
    if grouping is not None and (grouping[0] < N or grouping[1] < T):
        step_h, step_q = grouping
        G = local.k_BGSH.shape[1]
        R = N // G
        step_h = max(R, step_h - step_h % R)  # keep whole KV groups together
        out = torch.empty_like(q_BNTH)
        for h0 in range(0, N, step_h):
            hs = slice(h0, min(h0 + step_h, N))
            gs = slice(h0 // R, hs.stop // R)
            sub_local = LocalKV(local.k_BGSH[:, gs], local.v_BGSH[:, gs], local.valid_BS)
            sub_mem = None if memory is None else MemoryKV(memory.k_BGMH[:, gs], memory.v_BGMH[:, gs], memory.valid_BM,
                                                           memory.score_bias)  # fmt: skip
            for t0 in range(0, T, step_q):
                ts = slice(t0, min(t0 + step_q, T))
                S = local.k_BGSH.shape[-2]
                # queries t0.. of the chunk see local keys up to offset S - T + t
                trimmed = S - T + ts.stop
                part_local = LocalKV(
                    sub_local.k_BGSH[:, :, :trimmed],
                    sub_local.v_BGSH[:, :, :trimmed],
                    None if local.valid_BS is None else local.valid_BS[:, :trimmed],
                )
                q_mem = None if q_mem_BNTH is None else q_mem_BNTH[:, hs, ts]
                out[:, hs, ts] = fused_memory_attention(q_BNTH[:, hs, ts], part_local, sub_mem, None, block, q_mem)
        return out
    out_BNTH, lse_BNT = _local_part(q_BNTH, local)
    if memory is None or memory.size == 0:
        return out_BNTH
    G = memory.k_BGMH.shape[1]
    R = N // G
    q_BGXH = (q_BNTH if q_mem_BNTH is None else q_mem_BNTH).reshape(B, G, R * T, H)  # a KV group's heads adjacent
    mem_out, mem_lse = _memory_part(q_BGXH, memory, block)
    # an offset of every memory score is an offset of the memory part's log-sum-exp
    mem_lse = mem_lse.reshape(B, N, T) - memory.score_bias
    merged, _ = merge_lse(out_BNTH, lse_BNT, mem_out.reshape(B, N, T, H), mem_lse)
    return merged.to(q_BNTH.dtype)


def window_group_attention(
    q_BNTH: torch.Tensor, local: LocalKV, k_raw_BGTH: torch.Tensor, v_BGTH: torch.Tensor,
    memory: MemoryKV | None, windows: int, memory_dtype: torch.dtype, block: int = MEMORY_BLOCK,
    score_bias: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Dense memory attention of P = ``windows`` consecutive windows in one pass, equal to running them one
    after another.

    Rows are window-major: row p * B + b is window p of batch row b. Window p attends, in one softmax, to its
    causal local keys (``local``), to ``memory`` and to the raw (pre-RoPE) keys and values of windows 0..p-1
    of its batch row, which running them in order would have put in memory by then (so they are rounded to
    ``memory_dtype`` as storing would). All P windows' queries meet the memory in one fused call per KV
    head: P times more queries per call, where PyTorch's CPU flash kernel picks larger, faster blocks. The
    three parts are merged by their log-sum-exps; ``score_bias`` (``mem_score_bias``) lowers the scores of
    memory and of the earlier windows, which are memory to window p.
    """
    PB, N, T, H = q_BNTH.shape
    P, G = windows, k_raw_BGTH.shape[1]
    B, R = PB // P, N // G
    out, lse = _local_part(q_BNTH, local)  # [PB, N, T, H], [PB, N, T]
    out, lse = out.reshape(P, B, N, T, H), lse.reshape(P, B, N, T)
    if memory is not None and memory.size > 0:
        q_BGXH = q_BNTH.reshape(P, B, N, T, H).permute(1, 2, 0, 3, 4).reshape(B, G, R * P * T, H)
        m_out, m_lse = _memory_part(q_BGXH, memory, block)
        m_out = m_out.reshape(B, N, P, T, H).permute(2, 0, 1, 3, 4)
        m_lse = m_lse.reshape(B, N, P, T).permute(2, 0, 1, 3) - score_bias
        out, lse = merge_lse(out, lse, m_out, m_lse)
    stored = [round_trip(t, memory_dtype).reshape(P, B, G, T, H) for t in (k_raw_BGTH, v_BGTH)]
    k_PBGTH, v_PBGTH = stored
    dtype = q_BNTH.dtype
    windows_out = [out[0].to(dtype)]
    for p in range(1, P):  # window p also sees windows 0..p-1 of its row
        k = k_PBGTH[:p].permute(1, 2, 0, 3, 4).reshape(B, G, p * T, H)
        v = v_PBGTH[:p].permute(1, 2, 0, 3, 4).reshape(B, G, p * T, H)
        g_out, g_lse = attention_with_lse(q_BNTH.reshape(P, B, N, T, H)[p].reshape(B, G, R * T, H), k, v)
        o, _ = merge_lse(out[p], lse[p], g_out.reshape(B, N, T, H), g_lse.reshape(B, N, T) - score_bias)
        windows_out.append(o.to(dtype))
    return torch.stack(windows_out).reshape(PB, N, T, H)


# ----------------------------------------------------------------------------- top-k memory
def gather_memory(memory: MemoryKV, idx_BNTK: torch.Tensor, dtype: torch.dtype, scratch=None):
    """Keys and values of the retrieved slots, [B, N, T, K, H] in ``dtype`` (slot -1 gives slot 0, masked later).

    Query head n reads KV head n // R, so GQA memory is gathered, never repeated whole. Rows are copied with
    ``index_select`` per (batch row, KV head), which moves whole H-vectors (much faster than ``gather`` with
    an index expanded over H), straight into the output when the dtypes agree. Small gathers (decoding) use
    one advanced-indexing call instead: fewer calls, and at 32 rows per head it is 1.6x faster, while at 16K
    rows per head the per-head ``index_select`` is. With ``scratch`` (an object whose ``take(shape, dtype,
    device)`` returns two reusable tensors, e.g. the cache's ``GatherScratch``), the large gathers write into
    its buffers.
    """
    B, N, T, K = idx_BNTK.shape
    if isinstance(memory, QuantizedMemoryKV):  # int8 memory: dequantize only the gathered rows
        G, H = memory.k_codes_BGMH.shape[1], memory.k_codes_BGMH.shape[3]
        flat = idx_BNTK.clamp(min=0).reshape(B, G, -1)
        b_idx = torch.arange(B, device=flat.device)[:, None, None]
        g_idx = torch.arange(G, device=flat.device)[None, :, None]
        k, v = memory.gather(b_idx, g_idx, flat, dtype)
        return k.view(B, N, T, K, H), v.view(B, N, T, K, H)
    G, M, H = memory.k_BGMH.shape[1:]
    R = N // G
    flat = idx_BNTK.clamp(min=0).reshape(B, G, R * T * K)  # query heads of one KV head are adjacent
    if R * T * K <= SMALL_GATHER:
        b_idx = torch.arange(B, device=flat.device)[:, None, None]
        g_idx = torch.arange(G, device=flat.device)[None, :, None]
        k = memory.k_BGMH[b_idx, g_idx, flat].to(dtype)
        v = memory.v_BGMH[b_idx, g_idx, flat].to(dtype)
        return k.view(B, N, T, K, H), v.view(B, N, T, K, H)
    if scratch is not None:
        k, v = scratch.take((B, G, R * T * K, H), dtype, idx_BNTK.device)
    else:
        k = torch.empty((B, G, R * T * K, H), dtype=dtype, device=idx_BNTK.device)
        v = torch.empty_like(k)
    same_dtype = memory.k_BGMH.dtype == dtype  # then rows land in place; else one converting copy
    for b in range(B):
        for g in range(G):
            for src, dst in ((memory.k_BGMH[b, g], k[b, g]), (memory.v_BGMH[b, g], v[b, g])):
                if same_dtype:
                    torch.index_select(src, 0, flat[b, g], out=dst)
                else:
                    dst.copy_(src.index_select(0, flat[b, g]))
    return k.view(B, N, T, K, H), v.view(B, N, T, K, H)


def reference_topk_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, idx_BNTK: torch.Tensor | None,
                             q_mem_BNTH: torch.Tensor | None = None):  # fmt: skip
    """The kNN-memory spec: each query attends to its local keys and to its own retrieved memory slots
    (``idx`` [B, N, T, K], -1 = none), all in one fp32 softmax; scores scaled by 1/sqrt(H), a masked local
    key scores -1e6, a missing (-1) or invalid retrieved slot is excluded. Without memory (None: nothing
    stored yet) it is local attention. ``q_mem_BNTH`` (``config.mem_rope_distance``) scores the retrieved slots
    instead of ``q_BNTH``. Differentiable: training with top-k memory uses it."""
    if memory is None:
        return reference_memory_attention(q_BNTH, local, None)
    B, N, T, H = q_BNTH.shape
    G = local.k_BGSH.shape[1]
    dtype = q_BNTH.dtype
    k_loc = local.k_BGSH.repeat_interleave(N // G, dim=1)
    v_loc = local.v_BGSH.repeat_interleave(N // G, dim=1)
    s_loc = torch.matmul(q_BNTH, k_loc.transpose(2, 3)) / math.sqrt(H)
    s_loc = s_loc.masked_fill(~local_visibility(T, local), masked_score(dtype))
    k_sel, v_sel = gather_memory(memory, idx_BNTK, dtype)
    q_mem_BNTH = q_BNTH if q_mem_BNTH is None else q_mem_BNTH
    s_sel = torch.einsum("bnth,bntkh->bntk", q_mem_BNTH, k_sel) / math.sqrt(H) - memory.score_bias
    s_sel = s_sel.masked_fill(~_retrieved_ok(memory, idx_BNTK), float("-inf"))
    probs = torch.softmax(torch.cat([s_loc, s_sel], dim=-1), dim=-1, dtype=softmax_dtype(dtype)).to(dtype)
    S = s_loc.shape[-1]
    return torch.matmul(probs[..., :S], v_loc) + torch.einsum("bntk,bntkh->bnth", probs[..., S:], v_sel)


def _retrieved_ok(memory: MemoryKV, idx_BNTK: torch.Tensor) -> torch.Tensor:
    ok = idx_BNTK >= 0
    if memory.valid_BM is not None:
        B = idx_BNTK.shape[0]
        valid = memory.valid_BM.gather(1, idx_BNTK.clamp(min=0).reshape(B, -1)).view_as(idx_BNTK)
        ok = ok & valid
    return ok


def fused_topk_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, idx_BNTK, query_block: int = 128,
                         scratch=None, q_mem_BNTH: torch.Tensor | None = None):  # fmt: skip
    """Fast path of ``reference_topk_attention``: fused local attention with LSE, retrieved slots gathered
    ``query_block`` queries at a time (bounding the [B, N, T, K, H] gather, into ``scratch`` when given),
    merged by LSE. Inference only: the gathers write into preallocated buffers, which autograd rejects."""
    B, N, T, H = q_BNTH.shape
    out_loc, lse_loc = _local_part(q_BNTH, local)
    if memory is None:
        return out_loc
    q_mem_BNTH = q_BNTH if q_mem_BNTH is None else q_mem_BNTH  # scores memory; _topk_block returns its dtype
    if T <= query_block:  # one block (decoding, short chunks): no output buffer
        return _topk_block(q_mem_BNTH, memory, idx_BNTK, out_loc, lse_loc, scratch)
    out = torch.empty_like(q_BNTH)
    for t0 in range(0, T, query_block):
        ts = slice(t0, min(t0 + query_block, T))
        out[:, :, ts] = _topk_block(q_mem_BNTH[:, :, ts], memory, idx_BNTK[:, :, ts], out_loc[:, :, ts],
                                    lse_loc[:, :, ts], scratch)  # fmt: skip
    return out


def scored_topk_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, idx_BNTK, s_mem_BNTK) -> torch.Tensor:
    """``fused_topk_attention`` when the search has already scored the retrieved slots (``s_mem_BNTK``: the fp32
    products q_mem . k of ``idx_BNTK``'s keys, the scores ``reference_topk_attention`` computes before scaling;
    mem_index="ivf-scan" returns them). The memory part is fot/csrc's ``fot_topk_attend``: the softmax of the
    scaled scores applied to the value rows read in place from the store, with nothing of shape [B, N, T, K, H]
    gathered; it is merged with the local part by LSE. A CPU float memory laid out as the store keeps it
    (``flat_rows``); inference only."""
    out_loc, lse_loc = _local_part(q_BNTH, local)
    if memory is None:
        return out_loc
    rows = None if isinstance(memory, QuantizedMemoryKV) else flat_rows(memory.v_BGMH)
    if rows is None or q_BNTH.device.type != "cpu" or rows[0].dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("fot: attention from the search's scores reads a CPU bf16 or fp32 memory in place; this "
                         f"memory is {memory.v_BGMH.dtype} on {q_BNTH.device.type} in another layout.")  # fmt: skip
    from .native import topk_attend

    values, per_head = rows
    B, N, T, H = q_BNTH.shape
    K = idx_BNTK.shape[-1]
    G = memory.v_BGMH.shape[1]
    s = s_mem_BNTK.float().contiguous()
    ids = idx_BNTK.contiguous()
    out = torch.empty(B, N, T, H)
    lse = torch.empty(B, N, T)
    topk_attend()(s.data_ptr(), ids.data_ptr(), B * N * T, K, (N // G) * T, values.data_ptr(),
                  int(values.dtype == torch.bfloat16), per_head, H, 1.0 / math.sqrt(H), torch.get_num_threads(),
                  out.data_ptr(), lse.data_ptr())  # fmt: skip
    merged, _ = merge_lse(out_loc, lse_loc, out, lse - memory.score_bias)
    return merged.to(q_BNTH.dtype)


def _topk_block(q_BNTH, memory: MemoryKV, idx_BNTK, out_loc, lse_loc, scratch=None) -> torch.Tensor:
    """Attention of a block of memory queries to their retrieved slots, merged with their local part by LSE."""
    k_sel, v_sel = gather_memory(memory, idx_BNTK, q_BNTH.dtype, scratch)  # [B, N, T, K, H]
    scale = 1.0 / math.sqrt(q_BNTH.shape[-1])
    s = torch.matmul(q_BNTH.unsqueeze(-2), k_sel.transpose(-1, -2)).squeeze(-2).float() * scale  # [B, N, T, K]
    missing = idx_BNTK < 0 if memory.valid_BM is None else ~_retrieved_ok(memory, idx_BNTK)
    s = s.masked_fill(missing, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp(min=-1e30)).to(q_BNTH.dtype)
    o_sel = torch.matmul(p.unsqueeze(-2), v_sel).squeeze(-2)
    merged, _ = merge_lse(out_loc, lse_loc, o_sel, lse - memory.score_bias)
    return merged.to(q_BNTH.dtype)


def reference_block_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, blocks: BlockChoice | None):
    """The block-retrieval spec (``fot.blocks``): each query attends, in one fp32 softmax with its local keys, to
    every valid slot of the blocks its chunk chose (``blocks``), computed literally over a [B, N, T, M] mask of
    the memory. A masked local key scores -1e6 as in ``reference_memory_attention``; memory outside the chosen
    blocks is excluded."""
    if memory is None or memory.size == 0 or blocks is None:
        return reference_memory_attention(q_BNTH, local, None)
    B, N, T, H = q_BNTH.shape
    G = local.k_BGSH.shape[1]
    R, M, dtype = N // G, memory.size, q_BNTH.dtype
    slots, ok = block_slots(blocks.ids_BGCn, blocks.block_size, memory)  # [B, G, C, n * S]
    chosen_BGCM = torch.zeros(slots.shape[:3] + (M,), dtype=torch.bool, device=q_BNTH.device)
    for b in range(B):
        for g in range(G):
            for c in range(slots.shape[2]):
                chosen_BGCM[b, g, c, slots[b, g, c][ok[b, g, c]]] = True
    chunk_of_t = torch.arange(T, device=q_BNTH.device) // blocks.chunk
    chosen_BNTM = chosen_BGCM.repeat_interleave(R, dim=1)[:, :, chunk_of_t]
    k_loc = local.k_BGSH.repeat_interleave(R, dim=1)
    v_loc = local.v_BGSH.repeat_interleave(R, dim=1)
    s_loc = torch.matmul(q_BNTH, k_loc.transpose(2, 3)) / math.sqrt(H)
    s_loc = s_loc.masked_fill(~local_visibility(T, local), masked_score(dtype))
    k_mem = memory.k_BGMH.repeat_interleave(R, dim=1).to(dtype)
    v_mem = memory.v_BGMH.repeat_interleave(R, dim=1).to(dtype)
    s_mem = torch.matmul(q_BNTH, k_mem.transpose(2, 3)) / math.sqrt(H) - memory.score_bias
    s_mem = s_mem.masked_fill(~chosen_BNTM, float("-inf"))
    probs = torch.softmax(torch.cat([s_loc, s_mem], dim=-1), dim=-1, dtype=softmax_dtype(dtype)).to(dtype)
    S = s_loc.shape[-1]
    return torch.matmul(probs[..., :S], v_loc) + torch.matmul(probs[..., S:], v_mem)


def fused_block_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, blocks: BlockChoice | None,
                          scratch=None) -> torch.Tensor:  # fmt: skip
    """Fast path of ``reference_block_attention``: fused local attention with LSE; per chunk and KV head, the
    chosen blocks' keys and values gathered once and attended by all the chunk's queries with two batched
    matmuls; the two parts merged by LSE. Inference only."""
    out_loc, lse_loc = _local_part(q_BNTH, local)
    if memory is None or memory.size == 0 or blocks is None:
        return out_loc
    B, N, T, H = q_BNTH.shape
    G = blocks.ids_BGCn.shape[1]
    R, dtype = N // G, q_BNTH.dtype
    slots, ok = block_slots(blocks.ids_BGCn, blocks.block_size, memory)  # [B, G, C, n * S]
    k_sel, v_sel = gather_memory(memory, slots, dtype, scratch)  # as [B, N=G, T=C, K=n*S, H]: one row per KV head
    q = chunk_queries(q_BNTH.reshape(B, G, R, T, H), blocks.chunk)  # [B, G, C, R * chunk, H]
    s = torch.matmul(q, k_sel.transpose(-1, -2)).float() * (1.0 / math.sqrt(H))  # [B, G, C, Y, n * S]
    s = s.masked_fill(~ok[:, :, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp(min=-1e30)).to(dtype)
    o = torch.matmul(p, v_sel)  # [B, G, C, Y, H]
    o_mem = unchunk_queries(o, R, T)
    lse_mem = unchunk_queries(lse[..., None], R, T)[..., 0] - memory.score_bias
    merged, _ = merge_lse(out_loc, lse_loc, o_mem, lse_mem)
    return merged.to(dtype)


# ----------------------------------------------------------------------------- registry
# Every entry takes (q_BNTH, local, memory, *, idx_BNTK, grouping, scratch) and returns [B, N, T, H] in the
# query dtype; ``memory`` None means nothing to attend besides the local window. The kind is the forward
# plan's ``attention_kind``: inference entries need no backward, training entries have one.
AttentionFunction = Callable[..., torch.Tensor]


# The four inference entries below take ``q_mem_BNTH`` (``config.mem_rope_distance``); the others do not, and
# resolve_plan refuses the setting where they would run.
def _reference_dense(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None, q_mem_BNTH=None):
    return reference_memory_attention(q_BNTH, local, memory, grouping, q_mem_BNTH)


def _reference_topk(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None, q_mem_BNTH=None,
                    s_mem_BNTK=None):  # fmt: skip
    # the reference scores the retrieved slots itself, whatever the search computed
    return reference_topk_attention(q_BNTH, local, memory, idx_BNTK, q_mem_BNTH)


def _torch_dense(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None, q_mem_BNTH=None):
    return fused_memory_attention(q_BNTH, local, memory, grouping, q_mem_BNTH=q_mem_BNTH)


def _torch_topk(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None, q_mem_BNTH=None,
                s_mem_BNTK=None):  # fmt: skip
    if s_mem_BNTK is not None and memory is not None:  # the search's own scores (ivf-scan): read only the values
        return scored_topk_attention(q_BNTH, local, memory, idx_BNTK, s_mem_BNTK)
    return fused_topk_attention(q_BNTH, local, memory, idx_BNTK, scratch=scratch, q_mem_BNTH=q_mem_BNTH)


def _torch_dense_training(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None):
    return differentiable_memory_attention(q_BNTH, local, memory)


def _triton(q_BNTH, local, memory, *, idx_BNTK=None, grouping=None, scratch=None):
    return triton_memory_attention(q_BNTH, local, memory, idx_BNTK)


def _reference_block(q_BNTH, local, memory, *, blocks=None, scratch=None, **_):
    return reference_block_attention(q_BNTH, local, memory, blocks)


def _torch_block(q_BNTH, local, memory, *, blocks=None, scratch=None, **_):
    return fused_block_attention(q_BNTH, local, memory, blocks, scratch)


ATTENTION_FUNCTIONS: dict[tuple[str, str], AttentionFunction] = {
    ("reference", "dense"): _reference_dense,
    ("reference", "top-k"): _reference_topk,
    ("reference", "dense-training"): _reference_dense,
    ("reference", "top-k-training"): _reference_topk,
    ("torch", "dense"): _torch_dense,
    ("torch", "top-k"): _torch_topk,
    ("torch", "dense-training"): _torch_dense_training,
    # the gathered top-k path has no fused backward; the reference is the differentiable implementation
    ("torch", "top-k-training"): _reference_topk,
    # block retrieval (``mem_blocks``) is inference only and has no Triton kernel: resolve_plan refuses it there
    ("reference", "block"): _reference_block,
    ("torch", "block"): _torch_block,
    ("triton", "dense"): _triton,
    ("triton", "top-k"): _triton,
    ("triton", "dense-training"): _triton,
    ("triton", "top-k-training"): _triton,
}


def attention_function(impl: str, kind: str) -> AttentionFunction:
    """The registered attention of implementation ``impl`` for ``kind`` (``ForwardPlan.attention_kind``)."""
    try:
        return ATTENTION_FUNCTIONS[(impl, kind)]
    except KeyError:
        kinds = sorted({k for _, k in ATTENTION_FUNCTIONS})
        raise ValueError(
            f"no attention registered for implementation {impl!r} and kind {kind!r}; implementations are "
            f"{IMPLEMENTATIONS}, kinds {kinds}."
        ) from None


def memory_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, impl: str, grouping=None, idx_BNTK=None,
                     scratch=None, training: bool = False) -> torch.Tensor:  # fmt: skip
    """The registered attention of ``impl`` for these inputs: top-k when ``idx_BNTK`` is given, dense otherwise,
    its training entry when ``training``. A convenience for callers outside a forward plan (tests, benchmarks)."""
    kind = "top-k" if idx_BNTK is not None else "dense"
    fn = attention_function(impl, f"{kind}-training" if training else kind)
    return fn(q_BNTH, local, memory, idx_BNTK=idx_BNTK, grouping=grouping, scratch=scratch)


NO_KERNELS_IN_CHECKPOINT_CODE = (
    "this model runs from checkpoint code (trust_remote_code), which ships without fot's Triton kernels; install "
    "fot (pip install 'fot[triton]') and load the checkpoint after import fot"
)


def kernels_package():
    """``fot.kernels``, imported on first use (Triton is optional), or None where this code runs without it.

    Imported through ``importlib`` and not with a ``from .kernels import`` statement: transformers copies a
    checkpoint's code (``save_pretrained(save_code=True)``) by following such statements file by file, and the
    kernels are a package, not a file. They stay with the installed fot; checkpoint code runs the torch paths.
    """
    name = f"{__package__}.kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return None


def triton_memory_attention(q_BNTH, local: LocalKV, memory: MemoryKV | None, idx_BNTK=None) -> torch.Tensor:
    """The fused Triton kernel of ``fot.kernels`` (imported lazily: Triton is optional)."""
    package = kernels_package()
    if package is None:
        raise RuntimeError(f"attn_impl='triton': {NO_KERNELS_IN_CHECKPOINT_CODE}.")
    kernels = package.load_memory_attention()
    k_mem = v_mem = mem_valid = None
    if memory is not None and memory.size > 0:
        k_mem, v_mem, mem_valid = memory.k_BGMH, memory.v_BGMH, memory.valid_BM
    return kernels.memory_attention(
        q_BNTH, local.k_BGSH, local.v_BGSH, k_mem, v_mem,
        local_valid=local.valid_BS, mem_valid=mem_valid, idx=None if idx_BNTK is None else idx_BNTK.int(),
    )  # fmt: skip
