"""Triton memory-attention kernel (fot.kernels.memory_attention) against float64 references.

Runs under the Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 before any kernel is
defined), or compiled on CUDA when TRITON_INTERPRET=0. Error budget (STYLE.md): the kernel's error
against float64 may be at most 2x the error of the reference run in the same low precision, plus a tiny
epsilon. Dense memory is checked against ``fot.attention.reference_memory_attention``; retrieved memory
against ``spec_attention`` below, which gathers the K retrieved slots per query and applies the same
one-softmax semantics (and equals the dense reference when every query retrieves every slot).

Shape legend: B batch, N query heads, G KV heads, T queries, S local keys, M memory slots,
K retrieved per query, H head dim.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fot[triton]'): no kernel to test")

from fot.attention import LocalKV, MemoryKV, reference_memory_attention  # noqa: E402
from fot.kernels import load_memory_attention  # noqa: E402

ma = load_memory_attention()

DEVICE = "cpu" if ma.INTERPRET or not torch.cuda.is_available() else "cuda"
# float64 runs only under the interpreter: on CUDA the launcher refuses it (test_cuda_refuses_float64_with_the_fix)
KERNEL_FP64 = DEVICE == "cpu"
pytestmark = pytest.mark.skipif(
    ma.unavailable_reason(DEVICE) is not None, reason=str(ma.unavailable_reason(DEVICE))
)

B, N, G, H, M = 2, 4, 2, 20, 257  # GQA: 2 query heads per KV head; H=20 pads to a 32-wide tile


# ----------------------------------------------------------------------------- inputs and references
def make_inputs(T, S, M=M, K=None, *, dtype=torch.float32, mem_dtype=None, seed=0, masks=True, B=B, N=N, G=G, H=H):
    """Random fp64 master inputs (dict) and idx; ``cast`` turns them into kernel inputs."""
    g = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, N, T, H, generator=g, dtype=torch.float64),
        "k_loc": torch.randn(B, G, S, H, generator=g, dtype=torch.float64),
        "v_loc": torch.randn(B, G, S, H, generator=g, dtype=torch.float64),
        "k_mem": torch.randn(B, G, M, H, generator=g, dtype=torch.float64),
        "v_mem": torch.randn(B, G, M, H, generator=g, dtype=torch.float64),
        "local_valid": None,
        "mem_valid": None,
        "idx": None,
    }
    if masks:
        lv = torch.rand(B, S, generator=g) > 0.15
        lv[:, S - T:] = True  # every query still sees itself: no fully masked row (fp16 reference would be NaN)
        x["local_valid"] = lv
        x["mem_valid"] = torch.rand(B, M, generator=g) > 0.3
    if K is not None:
        idx = torch.randint(0, max(M, 1), (B, N, T, K), generator=g, dtype=torch.int32)
        idx[torch.rand(B, N, T, K, generator=g) < 0.2] = -1  # "no entry"
        x["idx"] = idx
    return x, dtype, (mem_dtype or dtype)


def cast(x, dtype, mem_dtype, requires_grad=False):
    """Kernel/reference inputs in the given precision, as fresh leaves."""
    out = dict(x)
    for name in ("q", "k_loc", "v_loc"):
        out[name] = x[name].to(DEVICE, dtype).requires_grad_(requires_grad)
    for name in ("k_mem", "v_mem"):
        out[name] = None if x[name] is None else x[name].to(DEVICE, mem_dtype).requires_grad_(requires_grad)
    for name in ("local_valid", "mem_valid", "idx"):
        out[name] = None if x[name] is None else x[name].to(DEVICE)
    return out


def dense_reference(x):
    """fot.attention.reference_memory_attention on the inputs of ``cast``."""
    memory = MemoryKV(x["k_mem"], x["v_mem"], x["mem_valid"]) if x["k_mem"] is not None else None
    return reference_memory_attention(x["q"], LocalKV(x["k_loc"], x["v_loc"], x["local_valid"]), memory)


def spec_attention(q, k_loc, v_loc, k_mem, v_mem, local_valid=None, mem_valid=None, idx=None, return_lse=False):
    """The kernel's semantics written out: scores in q's dtype, one softmax over [local | memory].

    Masked scores are -1e6 (clamped to the dtype's finite range: fp16 cannot hold -1e6, which only
    changes fully masked rows); a retrieved entry -1 is absent (-inf). The softmax runs in fp32 (fp64 for
    fp64 inputs) and its probabilities are cast back to q's dtype, as in reference_memory_attention.
    """
    dtype = q.dtype
    Bq, Nq, T, Hq = q.shape
    Gk, S = k_loc.shape[1], k_loc.shape[2]
    R = Nq // Gk
    scale = 1.0 / math.sqrt(Hq)
    masked = max(-1e6, torch.finfo(dtype).min)
    visible_TS = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    visible = visible_TS[None, None] if local_valid is None else visible_TS[None, None] & local_valid[:, None, None]
    scores = [(q @ k_loc.repeat_interleave(R, 1).transpose(-1, -2) * scale).masked_fill(~visible, masked)]
    values = [v_loc.repeat_interleave(R, 1)]  # [B, N, S, H]
    Mk = 0 if k_mem is None else k_mem.shape[2]
    if Mk > 0:
        k_mem_BNMH = k_mem.repeat_interleave(R, 1).to(dtype)
        v_mem_BNMH = v_mem.repeat_interleave(R, 1).to(dtype)
        if idx is None:
            mem_scores = q @ k_mem_BNMH.transpose(-1, -2) * scale
            if mem_valid is not None:
                mem_scores = mem_scores.masked_fill(~mem_valid[:, None, None, :], masked)
            scores.append(mem_scores)
            values.append(v_mem_BNMH)
        else:
            present = (idx >= 0) & (idx < Mk)
            safe = idx.clamp(0, Mk - 1).long()
            bi = torch.arange(Bq, device=q.device)[:, None, None, None]
            ni = torch.arange(Nq, device=q.device)[None, :, None, None]
            k_BNTKH, v_BNTKH = k_mem_BNMH[bi, ni, safe], v_mem_BNMH[bi, ni, safe]
            mem_scores = torch.einsum("bnth,bntkh->bntk", q, k_BNTKH) * scale
            ok = present if mem_valid is None else present & mem_valid[torch.arange(Bq)[:, None, None, None], safe]
            mem_scores = mem_scores.masked_fill(~ok, masked).masked_fill(~present, float("-inf"))
            scores.append(mem_scores)
    all_scores = torch.cat(scores, dim=-1)
    soft = torch.float64 if dtype == torch.float64 else torch.float32
    probs = torch.softmax(all_scores, dim=-1, dtype=soft).to(dtype)
    out = probs[..., :S] @ values[0]
    if Mk > 0:
        p_mem = probs[..., S:]
        out = out + (p_mem @ values[1] if idx is None else torch.einsum("bntk,bntkh->bnth", p_mem, v_BNTKH))
    if return_lse:
        return out, torch.logsumexp(all_scores.to(soft), dim=-1)
    return out


def spec(x, return_lse=False):
    return spec_attention(**x, return_lse=return_lse)


def kernel(x, return_lse=False):
    return ma.memory_attention(**x, return_lse=return_lse)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_budget(name, fast, ref_low, ref64, eps=2e-6):
    """Fast path error vs fp64 <= 2 x (same-precision reference error) + eps (relative to the fp64 scale)."""
    e_fast, e_ref = err(fast, ref64), err(ref_low, ref64)
    scale = max(1.0, ref64.abs().max().item())
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    assert e_fast <= 2 * e_ref + eps * scale, f"{name}: kernel error {e_fast:.3g} > 2 x reference error {e_ref:.3g}"


def grads_of(fn, x, weights, names):
    """Gradients of sum(out * w_out) + sum(lse * w_lse) for the tensors ``names`` of x."""
    out, lse = fn(x, return_lse=True)
    w_out, w_lse = weights
    loss = (out.double() * w_out).sum() + (lse.double() * w_lse).sum()
    return dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))


def loss_weights(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, T, H, generator=g, dtype=torch.float64).to(DEVICE),
            torch.randn(B, N, T, generator=g, dtype=torch.float64).to(DEVICE))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("T,S", [(1, 64), (17, 113), (97, 113)])
def test_forward_dense_matches_reference(T, S):
    x, dt, mdt = make_inputs(T, S)
    ref64 = dense_reference(cast(x, torch.float64, torch.float64))
    ref32 = dense_reference(cast(x, dt, mdt))
    out, lse = kernel(cast(x, dt, mdt), return_lse=True)
    assert out.dtype == dt and lse.dtype == torch.float32 and out.shape == (B, N, T, H)
    assert_budget("out", out, ref32, ref64)
    _, lse64 = spec(cast(x, torch.float64, torch.float64), return_lse=True)
    assert err(lse, lse64) < 1e-4


@pytest.mark.parametrize("T,S,K", [(1, 64, 16), (17, 113, 5), (97, 113, 1)])
def test_forward_retrieved_matches_spec(T, S, K):
    x, dt, mdt = make_inputs(T, S, K=K)
    x["idx"][0, 0, 0, 0] = 256  # last slot
    x["idx"][1, 1, -1, :] = -1  # a query that retrieved nothing
    ref64, lse64 = spec(cast(x, torch.float64, torch.float64), return_lse=True)
    out, lse = kernel(cast(x, dt, mdt), return_lse=True)
    assert_budget("out", out, spec(cast(x, dt, mdt)), ref64)
    assert err(lse, lse64) < 1e-4


def test_retrieving_every_slot_equals_dense_memory():
    """The retrieved path with idx = 0..M-1 for every query is the dense reference (ties the spec to fot)."""
    T, S, M_ = 17, 64, 37
    x, dt, mdt = make_inputs(T, S, M=M_)
    x["idx"] = torch.arange(M_, dtype=torch.int32).expand(B, N, T, M_).contiguous()
    ref64 = dense_reference(cast(dict(x, idx=None), torch.float64, torch.float64))
    assert err(spec(cast(x, torch.float64, torch.float64)), ref64) < 1e-6
    assert err(kernel(cast(x, dt, mdt)), ref64) < 1e-5


@pytest.mark.parametrize("how", ["none", "zero_slots", "zero_retrieved"])
def test_empty_memory(how):
    T, S = 17, 64
    M_ = 0 if how != "none" else M
    x, dt, mdt = make_inputs(T, S, M=M_, K=3 if how == "zero_retrieved" else None)
    if how == "none":
        x.update(k_mem=None, v_mem=None, mem_valid=None)
    ref = dense_reference(cast(dict(x, k_mem=None, v_mem=None, mem_valid=None, idx=None), torch.float64, torch.float64))
    c = cast(x, dt, mdt, requires_grad=how != "none")
    out = kernel(c)
    assert err(out, ref) < 1e-5
    if how != "none":
        out.sum().backward()
        assert c["k_mem"].grad.shape == (B, G, 0, H) and c["q"].grad is not None


def test_fully_masked_rows_follow_the_reference():
    """A row whose every score is masked averages all its keys, hidden local keys included (fp32, fp64)."""
    T, S, M_ = 17, 64, 37
    x, dt, mdt = make_inputs(T, S, M=M_)
    x["local_valid"][0, :55] = False  # queries 0..7 of batch 0 see only padding
    x["mem_valid"][0] = False
    for dtype in (torch.float32, torch.float64) if KERNEL_FP64 else (torch.float32,):
        c = cast(x, dtype, dtype, requires_grad=True)
        ref64 = cast(x, torch.float64, torch.float64, requires_grad=True)
        w = loss_weights(T)
        names = ["q", "k_loc", "v_loc", "k_mem", "v_mem"]
        g_fast = grads_of(kernel, c, w, names)
        g_ref = grads_of(spec, ref64, w, names)
        assert err(kernel(c), dense_reference(ref64)) < 1e-5
        for n in names:
            assert err(g_fast[n], g_ref[n]) < 1e-4, n


def test_mixed_dtype_memory_and_strided_inputs():
    """bf16 memory with fp32 queries; q given as a [B, T, N, H] buffer viewed as [B, N, T, H]."""
    T, S = 17, 113
    x, _, _ = make_inputs(T, S, K=5)
    c = cast(x, torch.float32, torch.bfloat16)
    c["q"] = c["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not c["q"].is_contiguous()
    ref_low = spec(c)  # memory cast to fp32 after rounding to bf16: the same inputs the kernel sees
    ref64 = spec({**cast(x, torch.float64, torch.float64),
                  "k_mem": c["k_mem"].double(), "v_mem": c["v_mem"].double()})
    assert_budget("out", kernel(c), ref_low, ref64)


@pytest.mark.parametrize("mode", ["dense", "retrieved"])
def test_fp16_forward_and_backward_within_budget(mode):
    T, S = 17, 64
    x, _, _ = make_inputs(T, S, M=65, K=5 if mode == "retrieved" else None, dtype=torch.float16)
    ref_fn = spec  # fot's reference_memory_attention cannot run in fp16: masked_fill(-1e6) overflows
    names = ["q", "k_loc", "v_loc", "k_mem", "v_mem"]
    w = loss_weights(T)
    c16 = cast(x, torch.float16, torch.float16, requires_grad=True)
    r16 = cast(x, torch.float16, torch.float16, requires_grad=True)
    r64 = cast(x, torch.float64, torch.float64, requires_grad=True)
    out = kernel(c16)
    assert out.dtype == torch.float16
    assert_budget("out", out, ref_fn(r16), ref_fn(r64), eps=1e-4)
    # lse is not part of the reference's output; the low-precision comparison uses out only
    g16 = dict(zip(names, torch.autograd.grad((ref_fn(r16).double() * w[0]).sum(), [r16[n] for n in names])))
    g64 = dict(zip(names, torch.autograd.grad((ref_fn(r64) * w[0]).sum(), [r64[n] for n in names])))
    g_fast_out = grads_of(kernel, cast(x, torch.float16, torch.float16, requires_grad=True),
                          (w[0], torch.zeros_like(w[1])), names)
    for n in names:
        assert g_fast_out[n].dtype == torch.float16
        assert_budget(f"d{n}", g_fast_out[n], g16[n], g64[n], eps=1e-4)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("T,S", [(17, 64), (97, 113)])
def test_backward_dense_matches_reference(T, S):
    x, dt, mdt = make_inputs(T, S, M=65)
    names = ["q", "k_loc", "v_loc", "k_mem", "v_mem"]
    w = loss_weights(T)
    g_fast = grads_of(kernel, cast(x, dt, mdt, requires_grad=True), w, names)
    g32 = grads_of(spec, cast(x, dt, mdt, requires_grad=True), w, names)
    g64 = grads_of(spec, cast(x, torch.float64, torch.float64, requires_grad=True), w, names)
    # the spec's dense path is fot's reference (checked by the forward tests); its autograd gives the grads
    ref64 = cast(x, torch.float64, torch.float64, requires_grad=True)
    g_fot = torch.autograd.grad((dense_reference(ref64) * w[0]).sum(), [ref64[n] for n in names])
    g_spec_out = grads_of(spec, cast(x, torch.float64, torch.float64, requires_grad=True),
                          (w[0], torch.zeros_like(w[1])), names)
    for n, g in zip(names, g_fot):
        assert err(g_spec_out[n], g) < 1e-5, n
    for n in names:
        assert_budget(f"d{n}", g_fast[n], g32[n], g64[n])


@pytest.mark.parametrize("T,S,K", [(17, 113, 16), (97, 113, 5), (1, 64, 1)])
def test_backward_retrieved_matches_spec(T, S, K):
    x, dt, mdt = make_inputs(T, S, M=M, K=K)
    x["idx"][:, :, :, 0] = 7  # the same slot retrieved by many queries and heads: atomic accumulation
    names = ["q", "k_loc", "v_loc", "k_mem", "v_mem"]
    w = loss_weights(T)
    g_fast = grads_of(kernel, cast(x, dt, mdt, requires_grad=True), w, names)
    g32 = grads_of(spec, cast(x, dt, mdt, requires_grad=True), w, names)
    g64 = grads_of(spec, cast(x, torch.float64, torch.float64, requires_grad=True), w, names)
    for n in names:
        assert_budget(f"d{n}", g_fast[n], g32[n], g64[n])


def test_memory_without_grad_gets_none():
    x, dt, mdt = make_inputs(17, 64, M=33, K=4)
    c = cast(x, dt, mdt)
    c["q"].requires_grad_(True)
    kernel(c).sum().backward()
    assert c["q"].grad is not None and c["k_mem"].grad is None


@pytest.mark.skipif(not KERNEL_FP64, reason="float64 kernels run only under the Triton interpreter")
@pytest.mark.parametrize("mode", ["dense", "retrieved"])
def test_gradcheck_float64(mode):
    x, _, _ = make_inputs(3, 5, M=6, K=3 if mode == "retrieved" else None, B=1, N=2, G=1, H=4)
    if mode == "retrieved":  # absent (-1), duplicate and masked-slot entries
        x["idx"] = torch.tensor([[[0, 5, -1], [2, 2, 3], [1, -1, 4]], [[0, 1, 2], [5, 5, 5], [-1, -1, 3]]],
                                dtype=torch.int32)[None]
    c = cast(x, torch.float64, torch.float64, requires_grad=True)
    tensors = (c["q"], c["k_loc"], c["v_loc"], c["k_mem"], c["v_mem"])

    def fn(q, k_loc, v_loc, k_mem, v_mem):
        return ma.memory_attention(q, k_loc, v_loc, k_mem, v_mem, c["local_valid"], c["mem_valid"], c["idx"],
                                   return_lse=True)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- errors
def test_launcher_rejects_bad_inputs_with_the_fix():
    x, dt, mdt = make_inputs(5, 16, M=8, K=2, B=1, N=2, G=1, H=4)
    c = cast(x, dt, mdt)
    with pytest.raises(ValueError, match="int32"):
        kernel(dict(c, idx=c["idx"].long()))
    with pytest.raises(ValueError, match="contiguous"):
        kernel(dict(c, k_loc=c["k_loc"].transpose(2, 3).contiguous().transpose(2, 3)))
    with pytest.raises(ValueError, match="multiple"):
        kernel(dict(c, k_loc=c["k_loc"].repeat(1, 3, 1, 1), v_loc=c["v_loc"].repeat(1, 3, 1, 1), k_mem=None,
                    v_mem=None, mem_valid=None, idx=None))  # N=2 query heads over G=3 KV heads
    with pytest.raises(ValueError, match="S=4 must include"):
        kernel(dict(c, k_loc=c["k_loc"][:, :, :4], v_loc=c["v_loc"][:, :, :4], local_valid=None))
    with pytest.raises(ValueError, match="dtype"):
        kernel(dict(c, k_loc=c["k_loc"].half()))
    with pytest.raises(ValueError, match="mem_valid"):
        kernel(dict(c, mem_valid=c["mem_valid"][:, :3]))


_CPU_WITHOUT_INTERPRETER = """
import torch
from fot.kernels import load_memory_attention

ma = load_memory_attention()
q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 16, 4)
print(ma.unavailable_reason("cpu"))
try:
    ma.memory_attention(q, k, k)
except RuntimeError as err:
    print(f"raised: {err}")
"""


def test_cpu_without_interpreter_raises_with_reason():
    """Without TRITON_INTERPRET the kernel refuses CPU tensors and says why. Triton reads the variable once, when
    the kernels are defined, so this runs in a fresh process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", _CPU_WITHOUT_INTERPRETER], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    reason, raised = child.stdout.splitlines()[-2:]
    assert "TRITON_INTERPRET=1" in reason
    assert raised == f"raised: {reason}"


@pytest.mark.skipif(KERNEL_FP64, reason="CUDA only: the interpreter runs float64")
def test_cuda_refuses_float64_with_the_fix():
    x, _, _ = make_inputs(3, 5, M=6, B=1, N=2, G=1, H=4)
    with pytest.raises(ValueError, match="float64.*attn_impl='torch'"):
        kernel(cast(x, torch.float64, torch.float64))
