"""Memory attention: the reference against an explicit naive formula, the fused path against the reference.

Error budget (STYLE.md): |fused_fp32 - truth| <= 2 * |reference_fp32 - truth| + 1e-6, where truth is the naive
float64 formula (explicit concatenation of [local | memory] scores and one float64 softmax).
"""

import math

import pytest
import torch

from fot.attention import (
    LocalKV,
    MemoryKV,
    apply_rope,
    fused_memory_attention,
    reference_memory_attention,
    rope_cos_sin,
    rope_inv_freq,
)
from tests.naive import naive_attention, rotate

SHAPES = [  # B, N, G, T, S, M
    (2, 4, 4, 17, 97, 113),
    (1, 6, 2, 17, 17, 257),
    (2, 6, 1, 1, 97, 113),
    (1, 4, 2, 33, 257, 0),
    (1, 2, 2, 97, 113, 17),
]


def make_inputs(B, N, G, T, S, M, H=16, padding=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (1.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    q, k, v = rnd(B, N, T, H), rnd(B, G, S, H), rnd(B, G, S, H)
    mk, mv = rnd(B, G, M, H), rnd(B, G, M, H)
    valid_s = valid_m = None
    if padding:
        valid_s = torch.ones(B, S, dtype=torch.bool)
        valid_s[0, : S // 3] = False  # left padding of row 0
        valid_m = torch.rand(B, M, generator=g) > 0.3
        valid_m[-1, :] = True
        if S - T < S // 3:  # keep every query row with at least one visible key in every row
            valid_s[0, : S - T] = False
            valid_s[0, S - T :] = True
    return q, k, v, valid_s, mk, mv, valid_m


def kv(k, v, valid_s, mk, mv, valid_m):
    memory = MemoryKV(mk, mv, valid_m) if mk.shape[2] else None
    return LocalKV(k, v, valid_s), memory


def truth(q, k, v, valid_s, mk, mv, valid_m):
    if mk.shape[2] == 0:
        mk = mv = valid_m = None
    return naive_attention(q, k, v, valid_s, mk, mv, valid_m)


def cast(tensors, dtype):
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", [False, True])
def test_reference_equals_naive_formula(shape, padding):
    inputs = make_inputs(*shape, padding=padding)
    q, *rest = inputs
    local, memory = kv(*rest)
    out = reference_memory_attention(q, local, memory)
    assert out.dtype == torch.float64
    # the reference's softmax runs in fp32 (as the original LongLLaMA does): fp32-level agreement
    assert (out - truth(*inputs)).abs().max() < 2e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", [False, True])
def test_fused_fp32_within_budget(shape, padding):
    inputs = make_inputs(*shape, padding=padding)
    expected = truth(*inputs)
    q32, *rest32 = cast(inputs, torch.float32)
    local, memory = kv(*rest32)
    ref_err = (reference_memory_attention(q32, local, memory).double() - expected).abs().max().item()
    fused = fused_memory_attention(q32, local, memory)
    assert fused.dtype == torch.float32
    fused_err = (fused.double() - expected).abs().max().item()
    assert fused_err <= 2 * ref_err + 1e-6, (fused_err, ref_err)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_fused_float64_matches_naive(shape):
    inputs = make_inputs(*shape, padding=True)
    q, *rest = inputs
    local, memory = kv(*rest)
    assert (fused_memory_attention(q, local, memory) - truth(*inputs)).abs().max() < 2e-6


TRAIN_SHAPES = [(2, 4, 4, 17, 17, 113), (1, 6, 2, 33, 33, 97), (2, 4, 2, 17, 97, 57)]  # S == T: causal window


@pytest.mark.parametrize("shape", TRAIN_SHAPES)
@pytest.mark.parametrize("padding", [False, True])
def test_training_attention_gradients_match_naive(shape, padding):
    """The differentiable path (unpadded causal windows: split flash forward/backward merged by LSE; otherwise
    one masked SDPA) has the float64 naive formula's gradients for q, local and memory keys and values."""
    inputs = make_inputs(*shape, padding=padding)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    q, k, v, valid_s, mk, mv, valid_m = [grad(t) if t is not None and t.is_floating_point() else t for t in inputs]
    leaves = (q, k, v, mk, mv)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    local, memory = kv(k, v, valid_s, mk, mv, valid_m)
    fast = torch.autograd.grad((fused_memory_attention(q, local, memory) * w).sum(), leaves)
    slow = torch.autograd.grad((truth(q, k, v, valid_s, mk, mv, valid_m) * w).sum(), leaves)
    for got, want in zip(fast, slow):
        assert (got - want).abs().max() < 1e-9
    assert all(g.abs().max() > 1e-3 for g in slow)


@pytest.mark.parametrize("padding", [False, True])
def test_fused_blocks_over_bf16_memory(padding):
    """Memory stored in bf16 and visited in blocks of 32 slots (fewer than M=113)."""
    B, N, G, T, S, M = 2, 6, 2, 17, 97, 113
    q, k, v, valid_s, mk, mv, valid_m = make_inputs(B, N, G, T, S, M, padding=padding, seed=3)
    mk16, mv16 = mk.to(torch.bfloat16), mv.to(torch.bfloat16)
    expected = truth(q, k, v, valid_s, mk16.double(), mv16.double(), valid_m)  # bf16 values are exact in f64
    q32, k32, v32 = cast([q, k, v], torch.float32)
    local = LocalKV(k32, v32, valid_s)
    memory = MemoryKV(mk16, mv16, valid_m)
    ref_err = (reference_memory_attention(q32, local, memory).double() - expected).abs().max().item()
    fused = fused_memory_attention(q32, local, memory, block=32)
    fused_err = (fused.double() - expected).abs().max().item()
    assert fused_err <= 2 * ref_err + 1e-6, (fused_err, ref_err)
    # blocking must not be a no-op approximation: dropping the last memory block changes the result
    short = fused_memory_attention(q32, local, MemoryKV(mk16[:, :, :96], mv16[:, :, :96], None if valid_m is None else valid_m[:, :96]), block=32)
    assert (short - fused).abs().max() > 1e-3


@pytest.mark.parametrize("grouping", [(1, 5), (2, 3), (4, 17)])
@pytest.mark.parametrize("padding", [False, True])
def test_grouping_does_not_change_results(grouping, padding):
    B, N, G, T, S, M = 2, 6, 2, 17, 97, 113
    inputs = make_inputs(B, N, G, T, S, M, padding=padding, seed=4)
    q, *rest = inputs
    local, memory = kv(*rest)
    plain_ref = reference_memory_attention(q, local, memory)
    assert (reference_memory_attention(q, local, memory, grouping) - plain_ref).abs().max() <= 1e-12
    plain_fused = fused_memory_attention(q, local, memory)
    assert (fused_memory_attention(q, local, memory, grouping) - plain_fused).abs().max() <= 1e-6
    q32, *rest32 = cast(inputs, torch.float32)
    local32, memory32 = kv(*rest32)
    grouped32 = fused_memory_attention(q32, local32, memory32, grouping)
    expected = truth(*inputs)
    ref_err = (reference_memory_attention(q32, local32, memory32).double() - expected).abs().max().item()
    assert (grouped32.double() - expected).abs().max().item() <= 2 * ref_err + 1e-6  # fp32: the usual budget


def test_rope_matches_naive_rotation():
    H, theta = 16, 10000.0
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, H, generator=g, dtype=torch.float64)
    positions = torch.arange(7, 47)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(H, theta), torch.float64)
    expected = rotate(x, positions.tolist(), theta)
    assert (apply_rope(x, cos, sin) - expected).abs().max() < 1e-5  # cos/sin tables are built in fp32
    # rotation at position 0 is the identity: memory keys "as if at position 0" are the raw keys
    cos0, sin0 = rope_cos_sin(torch.zeros(1, dtype=torch.long), rope_inv_freq(H, theta), torch.float64)
    assert torch.equal(apply_rope(x[:, :, :1], cos0, sin0), x[:, :, :1])
    # relative: <R(p) q, R(p') k> depends only on p - p'
    q, k = x[:, :, :1], x[:, :, 1:2]
    s1 = (rotate(q, [9], theta) * rotate(k, [4], theta)).sum()
    s2 = (rotate(q, [25], theta) * rotate(k, [20], theta)).sum()
    assert math.isclose(s1.item(), s2.item(), rel_tol=1e-9, abs_tol=1e-9)
