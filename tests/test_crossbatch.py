"""Crossbatch training: context assembly against explicit per-row loops, attention against a float64
"concatenate and one softmax" spec, gradients into the contexts, and the no-context loss against plain LLaMA."""

import math

import pytest
import torch
import torch.nn.functional as F

from fot.cache import LongLlamaCache
from fot.crossbatch import CrossBatchPlan, paper_layout, reference_layout
from tests.test_parity_llama import hf_twin
from tests.tiny import TOL64, max_err, tiny_model, tokens
from train.objective import Objective, empty_plan, ranges_layout
from train.config import CrossbatchConfig


# ----------------------------------------------------------------------------- context assembly
def plan_as_lists(plan: CrossBatchPlan) -> list[list[tuple[int, bool]]]:
    """Per row: the active (source row, is positive) pairs, in plan order."""
    out = []
    for b in range(plan.batch_size):
        out.append([(int(s), bool(p)) for s, a, p in zip(plan.sources_BC[b], plan.active_BC[b], plan.positive_BC[b])
                    if a])
    return out


def loop_previous_rows(batch: int, pack: int, range_of_offset) -> list[list[tuple[int, bool]]]:
    """The spec: row i looks at rows i-1, i-2, ... (range_of_offset(i mod k) of them), never below row 0 (leak
    mask, no wrap-around); a context is positive iff it holds the same document (same pack)."""
    rows = []
    for i in range(batch):
        ctx = []
        for c in range(1, range_of_offset(i % pack) + 1):
            j = i - c
            if j < 0:
                break
            ctx.append((j, j // pack == i // pack))
        rows.append(ctx)
    return rows


def counts(rows, start: int = 0):
    return [(sum(p for _, p in r), sum(not p for _, p in r)) for r in rows[start:]]


@pytest.mark.parametrize("batch, pack, R, stepping", [(8, 4, 3, True), (16, 4, 3, True), (12, 3, 4, True),
                                                      (8, 4, 6, True), (8, 2, 3, False), (6, 1, 2, True)])
def test_reference_layout_matches_per_row_loop(batch, pack, R, stepping):
    step = math.ceil((R + 1) / max(pack - 1, 1))
    if pack == 1 or not stepping:
        ranges = lambda o: R  # noqa: E731
    else:
        ranges = lambda o: min(o * step + 1, R + 1) - 1  # noqa: E731
    assert plan_as_lists(reference_layout(batch, pack, R, stepping)) == loop_previous_rows(batch, pack, ranges)


def test_reference_layout_published_mixes():
    # LongLLaMA 3B (k=4, R=3): quarters with (positives, negatives) (0,0), (1,1), (2,1), (3,0) once a previous
    # document pack exists; the first pack has no negatives (no wrap-around).
    rows = plan_as_lists(reference_layout(12, 4, 3, True))
    assert counts(rows, 4) == [(0, 0), (1, 1), (2, 1), (3, 0)] * 2
    assert counts(rows)[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # The JAX trainer's documented example: batch 8, range 6, k=4 gives ranges 0,1,2,3,0,3,6,6.
    assert [len(r) for r in plan_as_lists(reference_layout(8, 4, 6, True))] == [0, 1, 2, 3, 0, 3, 6, 6]


def test_ranges_layout_expresses_the_7b_mix():
    plan = ranges_layout(16, 4, [0, 3, 7, 7])
    rows = plan_as_lists(plan)
    assert rows == loop_previous_rows(16, 4, lambda o: [0, 3, 7, 7][o])
    assert counts(rows, 8) == [(0, 0), (1, 2), (2, 5), (3, 4)] * 2  # packs with two earlier packs
    assert ranges_layout(8, 4, [0, 2, 3, 3]).active_BC.tolist() == reference_layout(8, 4, 3, True).active_BC.tolist()
    with pytest.raises(ValueError, match="ranges"):
        ranges_layout(8, 4, [0, 1])


@pytest.mark.parametrize("batch, pack, d", [(8, 2, 4), (12, 3, 2), (8, 4, 1), (16, 4, 4)])
def test_paper_layout_matches_per_row_loop(batch, pack, d):
    n_docs = batch // pack
    expected = []
    for i in range(batch):
        doc, offset = divmod(i, pack)
        if offset == 0:  # the first window of a document has no previous context
            expected.append([])
            continue
        ctx = [((doc + m) % n_docs * pack + offset - 1, m == 0) for m in range(d)]
        expected.append(ctx)
    assert plan_as_lists(paper_layout(batch, pack, d)) == expected


def test_d_schedules():
    def objective(**kw):
        return Objective(CrossbatchConfig(layout="paper", **kw), batch_size=16, pack=2, max_steps=100, seed=3)

    assert {objective(d=2).d_at(s) for s in range(100)} == {2}
    switch = objective(d=2, schedule="switch", d_after=8)  # the last 10% of steps by default
    assert [switch.d_at(s) for s in (0, 89, 90, 99)] == [2, 2, 8, 8]
    assert objective(d=2, schedule="switch", switch_step=5, d_after=4).d_at(5) == 4
    sampled = objective(schedule="sampled", d_choices=[2, 8])
    draws = [sampled.d_at(s) for s in range(100)]
    assert set(draws) == {2, 8} and draws == [objective(schedule="sampled", d_choices=[2, 8]).d_at(s) for s in
                                               range(100)]  # deterministic per (seed, step): ranks agree
    plan = sampled.plan(draws.index(8))
    assert plan.num_contexts == 8 and int(plan.counts()[1].max()) == 7
    assert Objective(CrossbatchConfig(layout="none"), 8, 4, 10, 0).plan(0).num_contexts == 0


# ----------------------------------------------------------------------------- attention
def memory_layer_forward(model, x_BTD, plan, score_bias=0.0):
    """Run the first memory layer's attention module on normalized inputs, as the model's crossbatch step does."""
    idx = model.config.mem_layers[0]
    layer = model.model.layers[idx]
    cache = LongLlamaCache(model.config)
    inv = model.model._inv_freqs(x_BTD.device)[idx]
    from fot.rope import rope_cos_sin
    from fot.types import ForwardPlan

    rope = rope_cos_sin(torch.arange(x_BTD.shape[1]), inv, x_BTD.dtype)
    impl = model.model.impl_resolver(model.config.attn_impl, x_BTD.device)
    training = torch.is_grad_enabled()
    forward_plan = ForwardPlan(impl=impl, memory_mode="crossbatch", training=training, score_bias=score_bias)
    q, k_raw, k_rot, v = layer.self_attn.project(x_BTD, rope)
    local_kv = cache.local_for_attention(idx, training=training).extend(k_rot, v, None)
    return layer.self_attn(q, local_kv=local_kv, k_raw_BGTH=k_raw, v_BGTH=v, memory=None, idx_BNTK=None,
                           valid_BT=None, plan=forward_plan, crossbatch=plan)  # fmt: skip


def spec_attention(attn, x_BTD, plan, dtype=torch.float64, score_bias=0.0):
    """The spec, row by row (float64 unless ``dtype``): scores of the row's queries against its own rotated keys (causal) and the
    raw (position-0) keys of its active context rows (less ``score_bias``), concatenated; ONE softmax; weighted
    sum of the values."""
    x = x_BTD.to(dtype)
    B, T, _ = x.shape
    N, G, H = attn.num_heads, attn.num_kv_heads, attn.head_dim
    W = {n: getattr(attn, n).weight.to(dtype) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = (x @ W["q_proj"].T).view(B, T, N, H)
    k = (x @ W["k_proj"].T).view(B, T, G, H)
    v = (x @ W["v_proj"].T).view(B, T, G, H)
    inv = 1.0 / (10000.0 ** (torch.arange(0, H, 2, dtype=dtype) / H))
    ang = torch.arange(T, dtype=dtype)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):  # [T, H]
        t1, t2 = t[..., : H // 2], t[..., H // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    out = torch.zeros(B, T, N, H, dtype=dtype)
    for b in range(B):
        ctx_rows = [int(s) for s, a in zip(plan.sources_BC[b], plan.active_BC[b]) if a]
        for n in range(N):
            g = n // (N // G)
            qn, kl, vl = rot(q[b, :, n]), rot(k[b, :, g]), v[b, :, g]
            keys = torch.cat([kl] + [k[j, :, g] for j in ctx_rows])  # context keys: raw, position 0
            vals = torch.cat([vl] + [v[j, :, g] for j in ctx_rows])
            scores = qn @ keys.T / math.sqrt(H)
            scores[:, T:] -= score_bias
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            visible = torch.cat([causal, torch.ones(T, len(ctx_rows) * T, dtype=torch.bool)], 1)
            probs = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
            out[b, :, n] = probs @ vals
    return out.reshape(B, T, N * H) @ W["o_proj"].T


@pytest.mark.parametrize("plan_fn", [lambda: reference_layout(8, 4, 3, True), lambda: paper_layout(8, 2, 3),
                                     lambda: ranges_layout(8, 4, [0, 3, 5, 5])])
def test_crossbatch_attention_matches_float64_spec(plan_fn):
    plan = plan_fn()
    model32 = tiny_model(dtype=torch.float32, mem_layers=[1], num_key_value_heads=2)
    model64 = tiny_model(dtype=torch.float64, mem_layers=[1], num_key_value_heads=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 17, model32.config.hidden_size, generator=g, dtype=torch.float64)  # odd T
    spec = spec_attention(model64.model.layers[1].self_attn, x, plan)
    with torch.no_grad():
        fast64 = memory_layer_forward(model64, x, plan)
        fast32 = memory_layer_forward(model32, x.float(), plan)
        # the error budget: the spec itself computed in fp32
        ref32 = spec_attention(model32.model.layers[1].self_attn, x, plan, torch.float32)
    assert max_err(fast64, spec) < TOL64  # fot keeps RoPE tables and the softmax in fp32
    assert max_err(fast32, spec) <= 2 * max_err(ref32, spec)
    # the contexts matter: without them the result moves far beyond rounding
    with torch.no_grad():
        alone = memory_layer_forward(model64, x, empty_plan(8))
    assert max_err(alone, spec) > 1e-2


@pytest.mark.parametrize("score_bias", [0.0, 1.5], ids=["no-offset", "offset"])
@pytest.mark.parametrize("plan_fn", [lambda: paper_layout(8, 2, 3), lambda: reference_layout(8, 4, 3, True)])
def test_crossbatch_gradients_match_float64_spec(plan_fn, score_bias):
    """The training backward (CPU: two fused flash backwards fed the merged output and LSE) gives the input
    gradients of the explicit "concatenate and one softmax" spec, with and without a memory score offset."""
    plan = plan_fn()
    model = tiny_model(dtype=torch.float64, mem_layers=[1], num_key_value_heads=2)
    attn = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 17, model.config.hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 17, model.config.hidden_size, generator=g, dtype=torch.float64)
    out = memory_layer_forward(model, x, plan, score_bias)
    spec = spec_attention(attn, x, plan, score_bias=score_bias)
    assert max_err(out, spec) < TOL64
    (grad_fast,) = torch.autograd.grad((out * w).sum(), x)
    (grad_spec,) = torch.autograd.grad((spec * w).sum(), x)
    assert max_err(grad_fast, grad_spec) < TOL64 * 10
    assert grad_spec.abs().max() > 1e-2
    if score_bias:  # the offset moves outputs and gradients far beyond rounding, so both checks can fail
        plain = spec_attention(attn, x, plan)
        assert max_err(plain, spec) > 1e-3
        (grad_plain,) = torch.autograd.grad((plain * w).sum(), x)
        assert max_err(grad_plain, grad_spec) > 1e-3


def test_gradients_reach_exactly_the_context_rows():
    model = tiny_model(dtype=torch.float64, mem_layers=[1])
    plan = reference_layout(8, 4, 3, True)
    x = torch.randn(8, 9, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    out = memory_layer_forward(model, x, plan)
    out[5].sum().backward()  # row 5 (offset 1 of pack 1): contexts rows 4 (positive) and 3 (negative)
    touched = [b for b in range(8) if x.grad[b].abs().max() > 0]
    assert touched == [3, 4, 5]


# ----------------------------------------------------------------------------- loss
def test_loss_without_contexts_equals_plain_llama():
    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    hf = hf_twin(model)
    ids = tokens(8, 40, seed=4)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 20:] = -100
    ours = model(input_ids=ids, labels=labels, crossbatch=empty_plan(8), use_cache=False)
    theirs = hf(input_ids=ids, labels=labels)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    assert max_err(ours.logits, theirs.logits) < 1e-5
    # the explicit formula: mean next-token cross entropy over labels != -100
    manual = F.cross_entropy(theirs.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(ours.loss.item() - manual.item()) < 1e-5


def test_positive_contexts_reproduce_inference_over_the_same_windows():
    """A document's consecutive windows as crossbatch rows (each row attending to its earlier rows, the
    positives only) give the logits inference gives over the whole document when it is cut at the same
    boundaries (last_context_length = W): the additional keys are the memory inference would hold."""
    model = tiny_model(dtype=torch.float64, mem_layers=[1, 2]).eval()
    W = model.config.max_position_embeddings
    ids = tokens(1, 3 * W, seed=3)
    with torch.no_grad():
        rows = model(input_ids=ids.view(3, W), crossbatch=ranges_layout(3, 3, [0, 1, 2]), use_cache=False).logits
        whole = model(input_ids=ids, last_context_length=W, use_cache=False).logits[0].view(3, W, -1)
        alone = model(input_ids=ids.view(3, W), crossbatch=empty_plan(3), use_cache=False).logits
    assert max_err(rows, whole) < TOL64
    assert max_err(rows[1:], alone[1:]) > 1e-2  # the contexts matter: without them rows 1 and 2 differ
