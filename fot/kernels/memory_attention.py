"""Fused memory attention: causal local attention + dense or retrieved memory, one online softmax.

Shape legend: B batch, N query heads, G KV heads, R = N // G, T queries, S local keys, M memory slots,
K retrieved entries per query, H head dim.

What it computes (the spec is ``fot.attention.reference_memory_attention``):
    for query t of head n (KV head g = n // R), the keys are
      * local keys s = 0 .. S-1 of KV head g; query t sits at local position S - T + t and sees
        s <= S - T + t where ``local_valid[b, s]`` (else the score is masked);
      * memory, either DENSE (every slot m = 0 .. M-1, masked where ``mem_valid[b, m]`` is False) or
        RETRIEVED (the K slots ``idx[b, n, t, :]``; an entry -1, or any entry outside [0, M), is absent:
        it contributes nothing; a present entry pointing at an invalid slot is masked).
    score = q . k / sqrt(H); a masked score is exactly -1e6 (MASKED_SCORE in fot.attention), so it only
    matters for a row whose every score is masked: that row averages the values of all its keys
    (including the causally hidden local keys and the masked memory slots), as the reference does.
    ONE softmax over [local | memory]; out = softmax @ [v_loc | v_mem]; lse = log-sum-exp of the scores.

Algorithm (FlashAttention-2 forward, Triton tutorial 06 layout):
    program = (block of BLOCK_T queries, one (b, n)); the Q tile stays in registers; an online softmax
    (running max m_i, running sum l_i, fp32 accumulator) walks
      1. the local key tiles that the block can see causally (tl.dot, BLOCK_S keys per step);
      2. dense memory tiles (tl.dot, BLOCK_M slots per step) or the retrieved entries
         (per-query gather of BLOCK_K rows of K/V through int32 indices; no tensor-core dot: every
         query row has its own keys, and this part is bandwidth bound anyway);
      3. only if some row of the block is still fully masked: the causally hidden local tiles.
    Backward (FlashAttention-2): delta = rowsum(dout * out) - dlse (so the lse is differentiable too);
      * dq kernel, same grid as forward: recomputes p = exp(s - m) / l from the saved row max m and row
        sum l (not from the lse, which fp32 cannot hold exactly for a fully masked row); in RETRIEVED mode it also
        scatters dk_mem / dv_mem with fp32 atomic adds (duplicates across queries are summed);
      * dk/dv kernel, program = (tile of BLOCK_L keys, one (b, g)), loops over the R query heads of
        the group and the query blocks: local keys (causal; earlier query blocks only when a row is
        fully masked) and, in DENSE mode, memory keys (all query blocks). GQA needs no atomics here.

Layouts and limits:
    q [B, N, T, H]; k_loc, v_loc [B, G, S, H] (rotated, the queries are the last T local positions);
    k_mem, v_mem [B, G, M, H] (pre-RoPE, any of fp16/bf16/fp32/fp64, may differ from q's dtype);
    local_valid [B, S] bool; mem_valid [B, M] bool; idx [B, N, T, K] int32.
    Any strides, except that the last dim of every tensor must be contiguous. N % G == 0, S >= T,
    H <= 256 (padded to the next power of two >= 16 and masked, so H = 100 runs in a 128-wide tile).
    Tiles are loaded in their storage dtype and upcast to fp32 (fp64 for fp64 inputs) right after
    loading; accumulation is fp32. fp32 inputs use exact fp32 dots ("ieee"); 16-bit inputs use TF32
    dots on the upcast tiles (16-bit values are exact in TF32; p is rounded to TF32, finer than the
    reference's cast of p to the 16-bit dtype). Outputs: out in q's dtype, lse fp32 [B, N, T]
    (fp64 for fp64 inputs). Gradients come back in each input's dtype.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set before this module is imported). On CPU
    without the interpreter the launchers raise RuntimeError; there is no fallback.

Launcher API (what fot.attention dispatches to):
    memory_attention(q, k_loc, v_loc, k_mem=None, v_mem=None, local_valid=None, mem_valid=None,
                     idx=None, *, return_lse=False, config=None) -> out  or  (out, lse)
        differentiable in q, k_loc, v_loc, k_mem, v_mem (and through lse); idx=None means dense memory,
        k_mem=None or M == 0 means no memory.
    memory_attention_fwd(...same arguments...) -> (out, lse, stats)   no autograd; stats [2, B, N, T]
                                                                      = softmax row max and row sum
    memory_attention_bwd(dout, dlse, q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx,
                         out, stats, *, mem_grad, config=None) -> (dq, dk_loc, dv_loc, dk_mem, dv_mem)
    default_config(head_dim, retrieved, device) -> KernelConfig
    unavailable_reason(device) -> str | None       why the kernel cannot run on ``device`` (None: it can)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Decided once, when the kernels below are defined: triton.jit reads the knob at decoration time.
INTERPRET = bool(triton.knobs.runtime.interpret)

_MASKED = tl.constexpr(-1.0e6)  # the score of a masked key (fot.attention.MASKED_SCORE)
_FULLY_MASKED = tl.constexpr(-5.0e5)  # a row max / lse below this means every score of the row is masked

MEM_NONE, MEM_DENSE, MEM_RETRIEVED = 0, 1, 2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over a [rows, cols] score tile; returns (p, alpha, m_new, l_new)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _load_rows(base, rows, stride, nrows, offs_h, H, ACC: tl.constexpr):
    """Rows ``rows`` ([X]) of a [nrows, H] matrix as an ACC [X, BLOCK_H] tile (zeros outside)."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_h[None, :]
    mask = (rows < nrows)[:, None] & (offs_h < H)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _key_validity(valid_base, keys, nkeys, HAS_VALID: tl.constexpr):
    """Bool [X]: key in range and (if a validity vector is given) valid."""
    ok = keys < nkeys
    if HAS_VALID:
        ok = ok & (tl.load(valid_base + keys, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _scores(qk, visible, in_range):
    """Masked scores: visible -> qk, masked -> -1e6, absent (out of range) -> -inf."""
    s = tl.where(visible, qk, _MASKED)
    return tl.where(in_range, s, float("-inf"))


@triton.jit
def _gather_rows(base, idx, stride, M, offs_h, H, ACC: tl.constexpr):
    """Rows idx ([X, Y] int32) of a [M, H] matrix as an ACC [X, Y, BLOCK_H] tile; absent -> 0."""
    present = (idx >= 0) & (idx < M)
    ptrs = base + idx.to(tl.int64)[:, :, None] * stride + offs_h[None, None, :]
    mask = present[:, :, None] & (offs_h < H)[None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _local_tile(q, start, q_pos, kl_base, vl_base, lv_base, stride_ks, stride_vs, S, offs_h, H, sm_scale,
                HAS_LVALID: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Scores [BLOCK_T, BLOCK_S], visibility, K and V tiles of local keys start .. start+BLOCK_S."""
    s_pos = start + tl.arange(0, BLOCK_S)
    k = _load_rows(kl_base, s_pos, stride_ks, S, offs_h, H, ACC)
    v = _load_rows(vl_base, s_pos, stride_vs, S, offs_h, H, ACC)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * sm_scale
    key_ok = _key_validity(lv_base, s_pos, S, HAS_LVALID)
    visible = key_ok[None, :] & (s_pos[None, :] <= q_pos[:, None])
    return _scores(qk, visible, (s_pos < S)[None, :]), visible, k, v


@triton.jit
def _dense_tile(q, start, km_base, vm_base, mv_base, stride_km, stride_vm, M, offs_h, H, sm_scale,
                HAS_MVALID: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Scores [BLOCK_T, BLOCK_M], visibility, K and V tiles of memory slots start .. start+BLOCK_M."""
    m_pos = start + tl.arange(0, BLOCK_M)
    k = _load_rows(km_base, m_pos, stride_km, M, offs_h, H, ACC)
    v = _load_rows(vm_base, m_pos, stride_vm, M, offs_h, H, ACC)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * sm_scale
    visible = _key_validity(mv_base, m_pos, M, HAS_MVALID)[None, :]
    return _scores(qk, visible, (m_pos < M)[None, :]), visible, k, v


@triton.jit
def _retrieved_tile(q, idx_base, stride_it, start, offs_t, T, K, km_base, vm_base, mv_base, stride_km, stride_vm,
                    M, offs_h, H, sm_scale, HAS_MVALID: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Scores [BLOCK_T, BLOCK_K], visibility, gathered K/V [BLOCK_T, BLOCK_K, BLOCK_H] and the indices."""
    offs_k = start + tl.arange(0, BLOCK_K)
    idx_mask = (offs_t < T)[:, None] & (offs_k < K)[None, :]
    idx = tl.load(idx_base + offs_t[:, None] * stride_it + offs_k[None, :], mask=idx_mask, other=-1)
    present = (idx >= 0) & (idx < M)
    k = _gather_rows(km_base, idx, stride_km, M, offs_h, H, ACC)
    v = _gather_rows(vm_base, idx, stride_vm, M, offs_h, H, ACC)
    qk = tl.sum(q[:, None, :] * k, 2) * sm_scale
    visible = present
    if HAS_MVALID:
        visible = visible & (tl.load(mv_base + idx, mask=present, other=0) != 0)
    return _scores(qk, visible, present), visible, k, v, idx


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(
    Q, KL, VL, LVALID, KM, VM, MVALID, IDX, OUT, LSE, MROW, LROW,
    stride_qb, stride_qn, stride_qt,
    stride_klb, stride_klg, stride_kls,
    stride_vlb, stride_vlg, stride_vls,
    stride_kmb, stride_kmg, stride_kmm,
    stride_vmb, stride_vmg, stride_vmm,
    stride_ib, stride_in, stride_it,
    stride_ob, stride_on, stride_ot,
    stride_lvb, stride_mvb,
    N, R, T, S, M, K, H, sm_scale,
    HAS_LVALID: tl.constexpr, HAS_MVALID: tl.constexpr, MEM_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bn = tl.program_id(1)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    g = n // R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    row_ok = offs_t < T
    q = _load_rows(Q + b * stride_qb + n * stride_qn, offs_t, stride_qt, T, offs_h, H, ACC)
    q_pos = S - T + offs_t  # position of each query inside the local window
    kl_base = KL + b * stride_klb + g * stride_klg
    vl_base = VL + b * stride_vlb + g * stride_vlg
    lv_base = LVALID + b * stride_lvb
    km_base = KM + b * stride_kmb + g * stride_kmg
    vm_base = VM + b * stride_vmb + g * stride_vmg
    mv_base = MVALID + b * stride_mvb

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_T], dtype=ACC)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
    # 1. local keys the block can see; key 0 is visible to every query, so m_i is finite afterwards
    hi = S - T + tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)
    for start in range(0, hi, BLOCK_S):
        s, _, _, v = _local_tile(q, start, q_pos, kl_base, vl_base, lv_base, stride_kls, stride_vls, S, offs_h, H,
                                 sm_scale, HAS_LVALID, BLOCK_S, ACC, PREC)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC, out_dtype=ACC)
    # 2. memory
    if MEM_MODE == 1:
        for start in range(0, M, BLOCK_M):
            s, _, _, v = _dense_tile(q, start, km_base, vm_base, mv_base, stride_kmm, stride_vmm, M, offs_h, H,
                                     sm_scale, HAS_MVALID, BLOCK_M, ACC, PREC)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC, out_dtype=ACC)
    if MEM_MODE == 2:
        idx_base = IDX + b * stride_ib + n * stride_in
        for start in range(0, K, BLOCK_K):
            s, _, _, v, _ = _retrieved_tile(q, idx_base, stride_it, start, offs_t, T, K, km_base, vm_base, mv_base,
                                            stride_kmm, stride_vmm, M, offs_h, H, sm_scale, HAS_MVALID, BLOCK_K, ACC)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 1)
    # 3. a fully masked row also averages the causally hidden local keys (reference semantics)
    done = tl.cdiv(hi, BLOCK_S) * BLOCK_S
    tail_hi = tl.where(tl.min(tl.where(row_ok, m_i, 0.0)) < _FULLY_MASKED, S, done)
    for start in range(done, tail_hi, BLOCK_S):
        s, _, _, v = _local_tile(q, start, q_pos, kl_base, vl_base, lv_base, stride_kls, stride_vls, S, offs_h, H,
                                 sm_scale, HAS_LVALID, BLOCK_S, ACC, PREC)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC, out_dtype=ACC)

    out = acc / l_i[:, None]
    o_ptrs = OUT + b * stride_ob + n * stride_on + offs_t[:, None] * stride_ot + offs_h[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_h < H)[None, :])
    row = pid_bn.to(tl.int64) * T + offs_t
    tl.store(LSE + row, (m_i + tl.log(l_i)).to(LSE.dtype.element_ty), mask=row_ok)
    # the backward uses (m, l), not the lse: for a fully masked row, lse = -1e6 + log(count) is not
    # representable in fp32 to better than 0.06, while s - m = 0 is exact
    tl.store(MROW + row, m_i, mask=row_ok)
    tl.store(LROW + row, l_i, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, KL, VL, LVALID, KM, VM, MVALID, IDX, DO, MROW, LROW, DELTA, DQ, DKM, DVM,
    stride_qb, stride_qn, stride_qt,
    stride_klb, stride_klg, stride_kls,
    stride_vlb, stride_vlg, stride_vls,
    stride_kmb, stride_kmg, stride_kmm,
    stride_vmb, stride_vmg, stride_vmm,
    stride_ib, stride_in, stride_it,
    stride_dob, stride_don, stride_dot,
    stride_dqb, stride_dqn, stride_dqt,
    stride_dmb, stride_dmg, stride_dmm,
    stride_lvb, stride_mvb,
    N, R, T, S, M, K, H, sm_scale,
    HAS_LVALID: tl.constexpr, HAS_MVALID: tl.constexpr, MEM_MODE: tl.constexpr, MEM_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bn = tl.program_id(1)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    g = n // R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    row_ok = offs_t < T
    h_ok = offs_h < H
    q = _load_rows(Q + b * stride_qb + n * stride_qn, offs_t, stride_qt, T, offs_h, H, ACC)
    do = _load_rows(DO + b * stride_dob + n * stride_don, offs_t, stride_dot, T, offs_h, H, ACC)
    m_row = tl.load(MROW + pid_bn.to(tl.int64) * T + offs_t, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(LROW + pid_bn.to(tl.int64) * T + offs_t, mask=row_ok, other=1.0)
    delta = tl.load(DELTA + pid_bn.to(tl.int64) * T + offs_t, mask=row_ok, other=0.0).to(ACC)
    q_pos = S - T + offs_t
    kl_base = KL + b * stride_klb + g * stride_klg
    vl_base = VL + b * stride_vlb + g * stride_vlg
    lv_base = LVALID + b * stride_lvb
    km_base = KM + b * stride_kmb + g * stride_kmg
    vm_base = VM + b * stride_vmb + g * stride_vmg
    mv_base = MVALID + b * stride_mvb

    # Masked scores are constants: they get no gradient, so the causally hidden tiles are never needed.
    dq = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
    hi = S - T + tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)
    for start in range(0, hi, BLOCK_S):
        s, visible, k, v = _local_tile(q, start, q_pos, kl_base, vl_base, lv_base, stride_kls, stride_vls, S,
                                       offs_h, H, sm_scale, HAS_LVALID, BLOCK_S, ACC, PREC)
        p = tl.exp(s - m_row[:, None]) * inv_l[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds, k, input_precision=PREC, out_dtype=ACC)
    if MEM_MODE == 1:
        for start in range(0, M, BLOCK_M):
            s, visible, k, v = _dense_tile(q, start, km_base, vm_base, mv_base, stride_kmm, stride_vmm, M, offs_h,
                                           H, sm_scale, HAS_MVALID, BLOCK_M, ACC, PREC)
            p = tl.exp(s - m_row[:, None]) * inv_l[:, None]
            dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
            ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
            dq += tl.dot(ds, k, input_precision=PREC, out_dtype=ACC)
    if MEM_MODE == 2:
        idx_base = IDX + b * stride_ib + n * stride_in
        dkm_base = DKM + b * stride_dmb + g * stride_dmg
        dvm_base = DVM + b * stride_dmb + g * stride_dmg
        for start in range(0, K, BLOCK_K):
            s, visible, k, v, idx = _retrieved_tile(q, idx_base, stride_it, start, offs_t, T, K, km_base, vm_base,
                                                    mv_base, stride_kmm, stride_vmm, M, offs_h, H, sm_scale,
                                                    HAS_MVALID, BLOCK_K, ACC)
            p = tl.exp(s - m_row[:, None]) * inv_l[:, None]  # absent entries: exp(-inf) = 0
            dp = tl.sum(do[:, None, :] * v, 2)
            ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
            dq += tl.sum(ds[:, :, None] * k, 1)
            if MEM_GRAD:
                present = (idx >= 0) & (idx < M) & row_ok[:, None]
                mask = present[:, :, None] & h_ok[None, None, :]
                offs = idx.to(tl.int64)[:, :, None] * stride_dmm + offs_h[None, None, :]
                tl.atomic_add(dkm_base + offs, ds[:, :, None] * q[:, None, :] * sm_scale, mask=mask)
                tl.atomic_add(dvm_base + offs, p[:, :, None] * do[:, None, :], mask=mask)
    dq_ptrs = DQ + b * stride_dqb + n * stride_dqn + offs_t[:, None] * stride_dqt + offs_h[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, DO, MROW, LROW, DELTA, KX, VX, VALID, DK, DV,
    stride_qb, stride_qn, stride_qt,
    stride_dob, stride_don, stride_dot,
    stride_kb, stride_kg, stride_kl,
    stride_vb, stride_vg, stride_vl,
    stride_dkb, stride_dkg, stride_dkl,
    stride_dvb, stride_dvg, stride_dvl,
    stride_validb,
    N, G, R, T, L, H, sm_scale,
    IS_LOCAL: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv of one tile of keys (local: causal over L = S keys; memory: dense, L = M slots)."""
    pid_l = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = tl.arange(0, BLOCK_H)
    l_ok = offs_l < L
    h_ok = offs_h < H
    k = _load_rows(KX + b * stride_kb + g * stride_kg, offs_l, stride_kl, L, offs_h, H, ACC)
    v = _load_rows(VX + b * stride_vb + g * stride_vg, offs_l, stride_vl, L, offs_h, H, ACC)
    key_ok = _key_validity(VALID + b * stride_validb, offs_l, L, HAS_VALID)
    dk = tl.zeros([BLOCK_L, BLOCK_H], dtype=ACC)
    dv = tl.zeros([BLOCK_L, BLOCK_H], dtype=ACC)
    if IS_LOCAL:
        # query t sees key s iff s <= L - T + t
        first_tb = tl.maximum(pid_l * BLOCK_L - (L - T), 0) // BLOCK_T
    else:
        first_tb = pid_l * 0
    for r in range(0, R):
        n = g * R + r
        bn = b * N + n
        q_base = Q + b * stride_qb + n * stride_qn
        do_base = DO + b * stride_dob + n * stride_don
        for tb in range(0, tl.cdiv(T, BLOCK_T)):
            offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = offs_t < T
            m_row = tl.load(MROW + bn * T + offs_t, mask=row_ok, other=0.0)
            needed = tb >= first_tb
            if IS_LOCAL:  # blocks before the causal start matter only to fully masked rows
                needed = needed | (tl.min(m_row) < _FULLY_MASKED)
            if needed:
                q = _load_rows(q_base, offs_t, stride_qt, T, offs_h, H, ACC)
                do = _load_rows(do_base, offs_t, stride_dot, T, offs_h, H, ACC)
                delta = tl.load(DELTA + bn * T + offs_t, mask=row_ok, other=0.0).to(ACC)
                inv_l = 1.0 / tl.load(LROW + bn * T + offs_t, mask=row_ok, other=1.0)
                qk_t = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC) * sm_scale  # [BLOCK_L, BLOCK_T]
                visible = key_ok[:, None]
                if IS_LOCAL:
                    visible = visible & (offs_l[:, None] <= (L - T + offs_t)[None, :])
                p_t = tl.exp(tl.where(visible, qk_t, _MASKED) - m_row[None, :]) * inv_l[None, :]
                p_t = tl.where(l_ok[:, None] & row_ok[None, :], p_t, 0.0)
                dv += tl.dot(p_t, do, input_precision=PREC, out_dtype=ACC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
                ds_t = tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0)
                dk += tl.dot(ds_t, q, input_precision=PREC, out_dtype=ACC)
    mask = l_ok[:, None] & h_ok[None, :]
    dk_ptrs = DK + b * stride_dkb + g * stride_dkg + offs_l.to(tl.int64)[:, None] * stride_dkl + offs_h[None, :]
    dv_ptrs = DV + b * stride_dvb + g * stride_dvg + offs_l.to(tl.int64)[:, None] * stride_dvl + offs_h[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters. One config per call; no autotuning (the interpreter can't)."""

    block_t: int = 64  # queries per program (forward, dq)
    block_s: int = 64  # local keys per step (forward, dq) and keys per program (dk/dv)
    block_m: int = 64  # dense memory slots per step
    block_k: int = 16  # retrieved entries per step
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, retrieved: bool, device: torch.device | str) -> KernelConfig:
    """Tile sizes for a head dim and memory mode (untuned on paper; see kernels/README.md)."""
    if INTERPRET or torch.device(device).type == "cpu":
        # small tiles so that the odd test shapes end in partial tiles
        return KernelConfig(block_t=16, block_s=32, block_m=64, block_k=8, num_warps=1, num_stages=1)
    block_h = _block_h(head_dim)
    if retrieved:
        # the gathered [block_t, block_k, block_h] tiles live in registers
        return KernelConfig(block_t=16, block_s=64, block_m=64, block_k=16, num_warps=4 if block_h <= 64 else 8)
    if block_h > 128:
        return KernelConfig(block_t=64, block_s=32, block_m=32, num_warps=8, num_stages=1)
    return KernelConfig(block_t=64, block_s=64, block_m=64, num_warps=4, num_stages=2)


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return (
            "the Triton kernels need a CUDA device; on CPU they run only under the Triton interpreter, "
            "and TRITON_INTERPRET=1 was not set before fot.kernels.memory_attention was imported"
        )
    return f"the Triton kernels do not support device type {device.type!r}"


def _block_h(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _acc_types(dtype: torch.dtype):
    """(tl accumulation dtype, dot input precision, torch lse dtype) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, "ieee", torch.float64
    if dtype == torch.float32:
        return tl.float32, "ieee", torch.float32
    return tl.float32, "tf32", torch.float32


def _check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; use one of {[str(d) for d in dtypes]} (e.g. {name}.to(...))")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it with {name}.to(q.device)")
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim (stride {t.stride(-1)}); pass {name}.contiguous()")


def _check_inputs(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx) -> tuple[int, int]:
    """Validate the arguments; return (memory mode, M)."""
    _check_tensor("q", q, 4, _FLOAT_DTYPES, q.device)
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    fp64 = [n for n, t in (("q", q), ("k_mem", k_mem)) if t is not None and t.dtype == torch.float64]
    if fp64 and q.device.type == "cuda":
        # Measured on an H200 (Triton 3.6): the fp64 tiles fail to compile ("fp64 don't support largeK MMA").
        raise ValueError(f"{', '.join(fp64)} is float64, which the kernels run only under the Triton interpreter "
                         "(TRITON_INTERPRET=1 on CPU); on CUDA pass float32, bfloat16 or float16, or use "
                         "attn_impl='torch' for float64.")
    B, N, T, H = q.shape
    for name, t in (("k_loc", k_loc), ("v_loc", v_loc)):
        _check_tensor(name, t, 4, (q.dtype,), q.device)
    if k_loc.shape != v_loc.shape:
        raise ValueError(f"k_loc {tuple(k_loc.shape)} and v_loc {tuple(v_loc.shape)} must have the same shape")
    Bk, G, S, Hk = k_loc.shape
    if Bk != B or Hk != H:
        raise ValueError(f"k_loc must be [B={B}, G, S, H={H}], got {tuple(k_loc.shape)}")
    if G == 0 or N % G != 0:
        raise ValueError(f"query heads N={N} must be a multiple of KV heads G={G}")
    if S < T:
        raise ValueError(f"local keys S={S} must include the T={T} queries (the queries are the last T positions)")
    if H > 256:
        raise ValueError(f"head dim {H} > 256 is not supported")
    if local_valid is not None:
        _check_tensor("local_valid", local_valid, 2, (torch.bool,), q.device)
        if tuple(local_valid.shape) != (B, S):
            raise ValueError(f"local_valid must be [B={B}, S={S}] bool, got {tuple(local_valid.shape)}")
    if (k_mem is None) != (v_mem is None):
        raise ValueError("pass both k_mem and v_mem, or neither")
    if k_mem is None:
        if mem_valid is not None or idx is not None:
            raise ValueError("mem_valid and idx need k_mem and v_mem")
        return MEM_NONE, 0
    _check_tensor("k_mem", k_mem, 4, _FLOAT_DTYPES, q.device)
    _check_tensor("v_mem", v_mem, 4, (k_mem.dtype,), q.device)
    if k_mem.shape != v_mem.shape:
        raise ValueError(f"k_mem {tuple(k_mem.shape)} and v_mem {tuple(v_mem.shape)} must have the same shape")
    M = k_mem.shape[2]
    if tuple(k_mem.shape) != (B, G, M, H):
        raise ValueError(f"k_mem must be [B={B}, G={G}, M, H={H}], got {tuple(k_mem.shape)}")
    if mem_valid is not None:
        _check_tensor("mem_valid", mem_valid, 2, (torch.bool,), q.device)
        if tuple(mem_valid.shape) != (B, M):
            raise ValueError(f"mem_valid must be [B={B}, M={M}] bool, got {tuple(mem_valid.shape)}")
    if idx is not None:
        _check_tensor("idx", idx, 4, (torch.int32,), q.device)
        if tuple(idx.shape[:3]) != (B, N, T):
            raise ValueError(f"idx must be [B={B}, N={N}, T={T}, K] int32, got {tuple(idx.shape)}")
    if M == 0 or (idx is not None and idx.shape[3] == 0):
        return MEM_NONE, M
    return (MEM_DENSE if idx is None else MEM_RETRIEVED), M


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    """The first n strides of t (zeros for an absent tensor)."""
    return [0] * n if t is None else list(t.stride()[:n])


def _as_bytes(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Bool masks are read as uint8 (same storage); absent ones are replaced by an unread dummy pointer."""
    return fallback if mask is None else mask.view(torch.uint8)


def memory_attention_fwd(q, k_loc, v_loc, k_mem=None, v_mem=None, local_valid=None, mem_valid=None, idx=None,
                         *, config: KernelConfig | None = None):
    """Forward only. Returns (out, lse, stats).

    out [B, N, T, H] in q's dtype; lse [B, N, T] fp32 (fp64 for fp64 inputs); stats [2, B, N, T] same
    dtype: the softmax row max and row sum of exponentials, which ``memory_attention_bwd`` needs.
    """
    mode, M = _check_inputs(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx)
    B, N, T, H = q.shape
    G, S = k_loc.shape[1], k_loc.shape[2]
    acc, prec, lse_dtype = _acc_types(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, N, T), dtype=lse_dtype, device=q.device)
    stats = torch.empty((2, B, N, T), dtype=lse_dtype, device=q.device)
    if T == 0 or B * N == 0:
        return out, lse, stats
    cfg = config or default_config(H, mode == MEM_RETRIEVED, q.device)
    km = k_mem if mode != MEM_NONE else q
    vm = v_mem if mode != MEM_NONE else q
    ix = idx if mode == MEM_RETRIEVED else q
    grid = (triton.cdiv(T, cfg.block_t), B * N)
    _fwd_kernel[grid](
        q, k_loc, v_loc, _as_bytes(local_valid, q), km, vm, _as_bytes(mem_valid, q), ix, out, lse, stats[0], stats[1],
        *_strides(q, 3), *_strides(k_loc, 3), *_strides(v_loc, 3),
        *_strides(k_mem if mode else None, 3), *_strides(v_mem if mode else None, 3),
        *_strides(idx if mode == MEM_RETRIEVED else None, 3), *_strides(out, 3),
        *_strides(local_valid, 1), *_strides(mem_valid if mode else None, 1),
        N, N // G, T, S, M, 0 if idx is None else idx.shape[3], H, 1.0 / math.sqrt(H),
        HAS_LVALID=local_valid is not None, HAS_MVALID=mode != MEM_NONE and mem_valid is not None, MEM_MODE=mode,
        BLOCK_T=cfg.block_t, BLOCK_S=cfg.block_s, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_H=_block_h(H),
        ACC=acc, PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse, stats


def memory_attention_bwd(dout, dlse, q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, out, stats,
                         *, mem_grad: bool, config: KernelConfig | None = None):
    """Gradients (dq, dk_loc, dv_loc, dk_mem, dv_mem); the memory ones are None unless ``mem_grad``.

    ``dlse`` may be None (the lse was not used). Gradients are returned in their input's dtype.
    """
    mode, M = _check_inputs(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx)
    B, N, T, H = q.shape
    G, S = k_loc.shape[1], k_loc.shape[2]
    R = N // G
    acc, prec, lse_dtype = _acc_types(q.dtype)
    cfg = config or default_config(H, mode == MEM_RETRIEVED, q.device)
    dout = dout.contiguous()
    # delta = rowsum(dout * out) - dlse: the lse's gradient folds into the softmax backward
    delta = (dout.to(lse_dtype) * out.to(lse_dtype)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(lse_dtype)
    delta = delta.contiguous()
    m_row, l_row = stats[0].contiguous(), stats[1].contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk_loc = torch.empty_like(k_loc, memory_format=torch.contiguous_format)
    dv_loc = torch.empty_like(v_loc, memory_format=torch.contiguous_format)
    dk_mem = dv_mem = None
    if mem_grad and k_mem is not None:
        if mode == MEM_RETRIEVED or M == 0 or mode == MEM_NONE:  # scattered with atomics: accumulate in ACC
            dk_mem = torch.zeros(k_mem.shape, dtype=lse_dtype, device=q.device)
            dv_mem = torch.zeros(v_mem.shape, dtype=lse_dtype, device=q.device)
        else:
            dk_mem = torch.empty_like(k_mem, memory_format=torch.contiguous_format)
            dv_mem = torch.empty_like(v_mem, memory_format=torch.contiguous_format)
    if T == 0 or B * N == 0:
        dk_loc.zero_(), dv_loc.zero_()
        return dq, dk_loc, dv_loc, _cast(dk_mem, k_mem), _cast(dv_mem, v_mem)
    km = k_mem if mode != MEM_NONE else q
    vm = v_mem if mode != MEM_NONE else q
    ix = idx if mode == MEM_RETRIEVED else q
    scatter = mode == MEM_RETRIEVED and dk_mem is not None
    K = 0 if idx is None else idx.shape[3]
    common = dict(BLOCK_H=_block_h(H), ACC=acc, PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _bwd_dq_kernel[(triton.cdiv(T, cfg.block_t), B * N)](
        q, k_loc, v_loc, _as_bytes(local_valid, q), km, vm, _as_bytes(mem_valid, q), ix, dout, m_row, l_row, delta, dq,
        dk_mem if scatter else q, dv_mem if scatter else q,
        *_strides(q, 3), *_strides(k_loc, 3), *_strides(v_loc, 3),
        *_strides(k_mem if mode else None, 3), *_strides(v_mem if mode else None, 3),
        *_strides(idx if mode == MEM_RETRIEVED else None, 3), *_strides(dout, 3), *_strides(dq, 3),
        *_strides(dk_mem if scatter else None, 3),
        *_strides(local_valid, 1), *_strides(mem_valid if mode else None, 1),
        N, R, T, S, M, K, H, 1.0 / math.sqrt(H),
        HAS_LVALID=local_valid is not None, HAS_MVALID=mode != MEM_NONE and mem_valid is not None, MEM_MODE=mode,
        MEM_GRAD=scatter, BLOCK_T=cfg.block_t, BLOCK_S=cfg.block_s, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        **common,
    )
    key_sets = [(k_loc, v_loc, local_valid, dk_loc, dv_loc, S, True)]
    if mode == MEM_DENSE and dk_mem is not None:
        key_sets.append((k_mem, v_mem, mem_valid, dk_mem, dv_mem, M, False))
    for kx, vx, valid, dk, dv, L, is_local in key_sets:
        _bwd_dkdv_kernel[(triton.cdiv(L, cfg.block_s), B * G)](
            q, dout, m_row, l_row, delta, kx, vx, _as_bytes(valid, q), dk, dv,
            *_strides(q, 3), *_strides(dout, 3), *_strides(kx, 3), *_strides(vx, 3),
            *_strides(dk, 3), *_strides(dv, 3), *_strides(valid, 1),
            N, G, R, T, L, H, 1.0 / math.sqrt(H),
            IS_LOCAL=is_local, HAS_VALID=valid is not None, BLOCK_T=cfg.block_t, BLOCK_L=cfg.block_s, **common,
        )
    return dq, dk_loc, dv_loc, _cast(dk_mem, k_mem), _cast(dv_mem, v_mem)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


# ----------------------------------------------------------------------------- autograd
class MemoryAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: outputs (out, lse); differentiable in q, k_loc, v_loc, k_mem, v_mem."""

    @staticmethod
    def forward(ctx, q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, config):
        out, lse, stats = memory_attention_fwd(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx,
                                               config=config)
        ctx.save_for_backward(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, out, stats)
        ctx.config = config
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, out, stats = ctx.saved_tensors
        mem_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, dk, dv, dk_mem, dv_mem = memory_attention_bwd(
            dout, dlse, q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, out, stats,
            mem_grad=mem_grad, config=ctx.config,
        )
        return dq, dk, dv, dk_mem, dv_mem, None, None, None, None


def memory_attention(q, k_loc, v_loc, k_mem=None, v_mem=None, local_valid=None, mem_valid=None, idx=None,
                     *, return_lse: bool = False, config: KernelConfig | None = None):
    """Fused local + memory attention with one softmax (see the module docstring for the semantics).

    Args:
        q: [B, N, T, H] rotated queries (fp16, bf16, fp32 or fp64).
        k_loc, v_loc: [B, G, S, H] local keys (rotated) and values, q's dtype; queries are the last T.
        k_mem, v_mem: [B, G, M, H] memory keys (pre-RoPE) and values, any float dtype, or None.
        local_valid: [B, S] bool, False marks padding keys; None: all valid.
        mem_valid: [B, M] bool, False marks invalid memory slots; None: all valid.
        idx: [B, N, T, K] int32 retrieved slots per query (-1: none); None: dense memory.
        return_lse: also return the log-sum-exp (differentiable).
        config: tile sizes; None picks ``default_config``.

    Returns:
        out [B, N, T, H] in q's dtype, and with ``return_lse`` also lse [B, N, T] (fp32; fp64 for fp64 q).
    """
    out, lse = MemoryAttentionFunction.apply(q, k_loc, v_loc, k_mem, v_mem, local_valid, mem_valid, idx, config)
    return (out, lse) if return_lse else out
