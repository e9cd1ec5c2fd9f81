"""Memory attention: the reference against an explicit naive formula, the fused path against the reference.

Error budget (STYLE.md): |fused_fp32 - truth| <= 2 * |reference_fp32 - truth| + 1e-6, where truth is the naive
float64 formula (explicit concatenation of [local | memory] scores and one float64 softmax).
"""

import math

import pytest
import torch

from fot.attention import differentiable_memory_attention, fused_memory_attention, reference_memory_attention
from fot.rope import apply_rope, rope_cos_sin, rope_inv_freq
from fot.types import LocalKV, MemoryKV
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
    fast = torch.autograd.grad((differentiable_memory_attention(q, local, memory) * w).sum(), leaves)
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


# ----------------------------------------------------------------------------- private aten adapter
def test_private_cpu_flash_ops_keep_the_schema_and_results_fot_relies_on():
    """fot.attention calls two private aten ops (its adapter explains why). A torch release that renames them,
    changes their arguments or what they return fails here, with the schema it found."""
    from fot.attention import cpu_flash_attention, cpu_flash_attention_backward

    forward = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default._schema)
    backward = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default._schema)
    assert forward == (
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
        "-> (Tensor output, Tensor logsumexp)"
    ), forward
    assert backward == (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, Tensor key, "
        "Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, Tensor? attn_mask=None, "
        "float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
    ), backward
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = 0.25
    for causal in (False, True):
        scores = (q @ k.transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
        want_lse = torch.logsumexp(scores, -1)
        want = torch.softmax(scores, -1) @ v
        out, lse = cpu_flash_attention(q.detach(), k.detach(), v.detach(), is_causal=causal, scale=scale)
        assert (out - want).abs().max() < 1e-10 and (lse - want_lse).abs().max() < 1e-10
        grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64)
        want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
        got_grads = cpu_flash_attention_backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse,
                                                 is_causal=causal, scale=scale)  # fmt: skip
        for got, expected in zip(got_grads, want_grads, strict=True):
            assert (got - expected).abs().max() < 1e-10


def test_attention_registry_covers_every_implementation_and_kind():
    from fot.attention import ATTENTION_FUNCTIONS, attention_function, reference_topk_attention

    kinds = ("dense", "top-k", "dense-training", "top-k-training")
    # block retrieval is inference only and has no Triton kernel (resolve_plan refuses it there)
    block = {("reference", "block"), ("torch", "block")}
    assert set(ATTENTION_FUNCTIONS) == {(i, k) for i in ("reference", "torch", "triton") for k in kinds} | block
    with pytest.raises(ValueError, match="no attention registered for implementation 'cuda'"):
        attention_function("cuda", "dense")
    # training with top-k memory differentiates the reference (the fused gather has no backward)
    q, k, v, _, mk, mv, _ = make_inputs(1, 4, 2, 5, 5, 40)
    q.requires_grad_()
    idx = torch.randint(0, 40, (1, 4, 5, 3), generator=torch.Generator().manual_seed(1))
    local, memory = kv(k, v, None, mk, mv, None)
    got = attention_function("torch", "top-k-training")(q, local, memory, idx_BNTK=idx)
    want = reference_topk_attention(q, local, memory, idx)
    assert torch.equal(got, want) and got.requires_grad
