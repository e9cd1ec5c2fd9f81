"""``mem_score_bias``: an offset subtracted from every memory score, on every inference path, against the float64
spec of tests/naive.py."""

import pytest
import torch

import fot

from tests.naive import decoding_error, naive_logits
from tests.tiny import TOL32, TOL64, max_err, tiny_model, tokens

BIAS = 1.5


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("extra", [
    {},  # dense memory (on the torch path, windows of 64 run in groups: window_group_attention)
    {"window_overlap": 16},  # dense, one window at a time
    {"mem_top_k": 512, "mem_index": "exact"},  # top-k covering all of memory
    {"mem_top_k": 4, "mem_index": "exact"},  # top-k reading a few slots
    {"mem_blocks": 64, "mem_block_size": 8},  # block retrieval reading every block
    {"mem_attention_grouping": (2, 16)},  # dense in (heads, queries) blocks
], ids=["dense", "overlap", "topk-all", "topk-4", "blocks-all", "grouping"])
def test_memory_score_bias_equals_spec(impl, extra):
    model = tiny_model(attn_impl=impl, mem_score_bias=BIAS, **extra)
    ids = tokens(1, 300, seed=31)
    with torch.no_grad():
        logits = model(ids).logits
    spec_extra = {} if "mem_top_k" not in extra or extra["mem_top_k"] >= 300 else None
    if spec_extra is None:  # top-4: the spec has no top-k; compare with the model's own reference path instead
        with torch.no_grad():
            want = tiny_model(attn_impl="reference", mem_score_bias=BIAS, **extra)(ids).logits
        assert max_err(logits, want) < TOL64
        return
    expected = naive_logits(model, model.config, ids)
    assert max_err(logits, expected) < TOL64
    # the offset changes the result, so the comparison above can fail
    assert max_err(naive_logits(model, model.config, ids, mem_score_bias=0.0), expected) > 1e-3


def test_memory_score_bias_in_decoding_equals_spec():
    model = tiny_model(attn_impl="torch", mem_score_bias=BIAS, mem_top_k=512, mem_index="exact")
    assert decoding_error(model, tokens(1, 200, seed=32), tokens(1, 10, seed=33)) < TOL64


def test_memory_score_bias_is_checked_and_has_no_triton_kernel():
    with pytest.raises(ValueError, match="mem_score_bias=-1.0 must be a finite number >= 0"):
        tiny_model(mem_score_bias=-1.0)
    from fot.plan import resolve_plan

    model = tiny_model(mem_score_bias=BIAS)
    with pytest.raises(ValueError, match="mem_score_bias=1.5 has no Triton kernel"):
        resolve_plan(model.config, fot.LongLlamaCache(model.config), impl="triton", training=False, crossbatch=False,
                     padded=False, last_context_length=None, cache_policy=None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)], ids=["fp32", "fp64"])
def test_memory_score_bias_trains_like_the_reference(dtype, tol):
    """Training under the offset: the differentiable torch path (in fp32, the split flash softmax where a window
    starts a chunk and one concatenated SDPA elsewhere; in fp64 with fp32 memory, SDPA) gives the loss and
    gradients of the reference path, which is the float64 spec (test above) under autograd."""
    ids = tokens(1, 200, seed=35)
    losses, grads = {}, {}
    mem_dtype = "float32"
    for impl in ("torch", "reference"):
        model = tiny_model(dtype=dtype, attn_impl=impl, mem_score_bias=BIAS, mem_dtype=mem_dtype).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert abs(losses["torch"] - losses["reference"]) < tol
    assert max_err(grads["torch"], grads["reference"]) < tol
    plain = tiny_model(dtype=dtype, attn_impl="reference", mem_dtype=mem_dtype).train()
    plain(ids, labels=ids).loss.backward()  # without the offset the gradients differ, so the check can fail
    plain_grads = torch.cat([p.grad.flatten() for p in plain.parameters() if p.grad is not None])
    assert max_err(plain_grads, grads["reference"]) > 1e-4
