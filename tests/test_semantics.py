import functools
"""The whole model against the naive float64 spec (tests/naive.py) on inputs spanning several windows."""

import pytest
import torch

from fot.model import plan_chunks
from tests.naive import NaiveLongLlama, Spec, naive_logits, weights_f64
from tests.tiny import (
    BF16_MEAN,
    TOL32,
    TOL64,
    close_with_bf16_memory,
    left_pad_mask,
    max_err,
    mean_err,
    tiny_model,
    tokens,
)


def store_dtype(model, ids):
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return cache.memories[model.config.mem_layers[0]].view().k_BGMH.dtype


def test_plan_chunks_matches_the_windowing_rule():
    # The FACTS example: N=1500, W=2048, L=1024 gives 476 + 1024.
    assert plan_chunks(1500, 2048, 1024) == [(0, 476), (476, 1500)]
    # 300 tokens, W=64, L=32: 268 memory tokens in windows of 64 from the start (last one short), then 32.
    assert plan_chunks(300, 64, 32) == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 268), (268, 300)]
    assert plan_chunks(96, 64, 32) == [(0, 64), (64, 96)]  # N = W + L: one full window, then L
    assert plan_chunks(33, 64, 32) == [(0, 1), (1, 33)]
    assert plan_chunks(32, 64, 32) == [(0, 32)]
    assert plan_chunks(20, 64, 32) == [(0, 20)]
    assert plan_chunks(10, 4, 4) == [(0, 4), (4, 6), (6, 10)]


@pytest.mark.parametrize(
    "n, impl",
    [(300, "torch"), (300, "reference"), (96, "torch"), (33, "torch"), (40, "reference"), (20, "torch")],
)
def test_model_equals_spec_over_windows(n, impl):
    model = tiny_model(attn_impl=impl)
    ids = tokens(1, n, seed=n)
    with torch.no_grad():
        logits = model(ids).logits
    expected = naive_logits(model, model.config, ids)
    assert max_err(logits, expected) < TOL64
    if n > model.config.last_context_length:
        # the memory really matters for this input, so the comparison above can fail
        assert max_err(naive_logits(model, model.config, ids, mem_layers=[]), expected) > 1e-2


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_float32_model_equals_spec(impl):
    model = tiny_model(dtype=torch.float32, mem_layers=[0, 2], attn_impl=impl)
    ids = tokens(2, 150, seed=1)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL32


def test_mem_positionals_false_uses_no_rope_in_memory_layers():
    model = tiny_model(mem_layers=[0, 1], mem_positionals=False)
    ids = tokens(1, 200, seed=2)
    with torch.no_grad():
        logits = model(ids).logits
    expected = naive_logits(model, model.config, ids)
    assert max_err(logits, expected) < TOL64
    assert max_err(naive_logits(model, model.config, ids, mem_positionals=True), expected) > 1e-2


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_grouped_query_attention(impl):
    model = tiny_model(num_key_value_heads=2, mem_layers=[1, 2], attn_impl=impl)
    ids = tokens(2, 170, seed=3)
    with torch.no_grad():
        logits = model(ids).logits
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL64


def test_bfloat16_memory_is_rounded_on_storage():
    model = tiny_model(mem_dtype="bfloat16", mem_layers=[1])
    ids = tokens(1, 200, seed=4)
    with torch.no_grad():
        logits = model(ids).logits
    expected = naive_logits(model, model.config, ids)  # the spec rounds memory K/V to bf16
    unrounded = naive_logits(model, model.config, ids, mem_dtype="float64")
    assert close_with_bf16_memory(logits, expected)
    # the rounding is visible, so the test can tell whether memory is stored in bf16
    assert not close_with_bf16_memory(logits, unrounded)
    assert mean_err(logits, unrounded) > 5 * BF16_MEAN
    assert store_dtype(model, ids) == torch.bfloat16


@pytest.mark.parametrize("overlap", [0, 8])  # window_overlap slices the padding mask with the windows
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_left_padding_in_a_batch(impl, overlap):
    # Row 1 has 70 pad tokens: its whole first window is padding, so its memory starts with masked slots.
    model = tiny_model(mem_layers=[0, 1], attn_impl=impl, window_overlap=overlap)
    n = 200
    ids = tokens(3, n, seed=5)
    mask = left_pad_mask([n, n - 70, n - 5], n)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    expected = naive_logits(model, model.config, ids, valid)
    assert max_err(logits, expected, valid) < TOL64
    # padding changes the valid positions' logits (vs. treating pads as tokens), so masking is exercised
    assert max_err(naive_logits(model, model.config, ids), expected, valid) > 1e-2


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_mem_attention_grouping_does_not_change_logits(impl):
    ids = tokens(1, 180, seed=6)
    plain = tiny_model(attn_impl=impl, num_key_value_heads=2)
    grouped = tiny_model(attn_impl=impl, num_key_value_heads=2, mem_attention_grouping=(1, 7))
    with torch.no_grad():
        a, b = plain(ids).logits, grouped(ids).logits
    assert max_err(b, a) < (1e-12 if impl == "reference" else 1e-6)
    assert max_err(b, naive_logits(plain, plain.config, ids)) < TOL64


def test_memory_in_every_layer_and_no_memory_layers():
    ids = tokens(1, 140, seed=7)
    for mem_layers in ([0, 1, 2], []):
        model = tiny_model(mem_layers=mem_layers, seed=1)
        with torch.no_grad():
            logits = model(ids).logits
        assert max_err(logits, naive_logits(model, model.config, ids)) < TOL64


def test_last_context_length_override_on_forward():
    model = tiny_model()
    ids = tokens(1, 150, seed=8)
    with torch.no_grad():
        out = model(ids, last_context_length=10, use_cache=True)
        default = model(ids).logits
    assert out.past_key_values.local_length == 10
    assert out.past_key_values.memory_length == 140
    expected = naive_logits(model, model.config, ids, last_context_length=10)
    assert max_err(out.logits, expected) < TOL64
    assert max_err(default, expected) > 1e-2


def test_loss_logits_to_keep_and_inputs_embeds():
    model = tiny_model()
    ids = tokens(2, 120, seed=9)
    labels = ids.clone()
    labels[0, :30] = -100
    expected = naive_logits(model, model.config, ids)
    with torch.no_grad():
        out = model(ids, labels=labels)
        tail = model(ids, logits_to_keep=5).logits
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    # cross-entropy of token t predicting t + 1, ignoring -100, from the spec's logits
    logp = torch.log_softmax(expected[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp[keep].gather(-1, target[keep][:, None]).mean()
    assert abs(out.loss.item() - nll.item()) < TOL64
    assert max_err(tail, expected[:, -5:]) < TOL64
    assert max_err(embeds, expected) < TOL64


def test_spec_state_matches_cache_sizes_after_prefill():
    model = tiny_model(mem_layers=[0, 2])
    ids = tokens(1, 150, seed=10)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    naive = NaiveLongLlama(weights_f64(model), Spec(model.config))
    naive.prefill(ids)
    assert cache.seen_tokens == 150
    assert cache.local_length == naive.local_length == 32
    assert cache.memory_length == naive.memory_length == 118
    for layer in (0, 2):
        store = cache.memories[layer]
        mem = store.view()
        # raw (pre-RoPE) keys; the spec's rounding to the fp32 memory dtype may differ by one ulp
        assert max_err(mem.k_BGMH, naive.layers[layer].mk) < TOL64
        assert max_err(mem.v_BGMH, naive.layers[layer].mv) < TOL64
    assert 1 not in cache.memories


def test_bfloat16_model_fast_path_within_budget_of_reference():
    # STYLE's budget at model level: in bf16, the torch path's error against the float64 spec is at most twice the
    # reference implementation's error in bf16 (plus a small floor).
    ids = tokens(1, 200, seed=11)
    errors = {}
    for impl in ("torch", "reference"):
        model = tiny_model(dtype=torch.bfloat16, mem_dtype="bfloat16", mem_layers=[0, 1], attn_impl=impl)
        with torch.no_grad():
            errors[impl] = max_err(model(ids).logits, naive_logits(model, model.config, ids))
    assert errors["torch"] <= 2 * errors["reference"] + 1e-2, errors
    assert errors["reference"] < 1.0  # bf16 is coarse, but still the same function


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_spec_gradients(checkpointing):
    """Training through windows: memory is not differentiable, the current window is."""
    model = tiny_model(mem_layers=[0, 2], gradient_checkpoint_every_ith=2)
    model.train()
    calls = []
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        for layer in model.model.layers:  # counts the layers that really recompute
            layer._gradient_checkpointing_func = functools.partial(
                lambda inner, *a, **k: calls.append(1) or inner(*a, **k), layer._gradient_checkpointing_func
            )
    ids = tokens(2, 150, seed=12)
    model(ids, labels=ids).loss.backward()
    # 3 windows (64, 54, 32 tokens) x layers 0 and 2 (every 2nd layer) are checkpointed
    assert len(calls) == (6 if checkpointing else 0)
    weights = weights_f64(model, requires_grad=True)
    logits = NaiveLongLlama(weights, Spec(model.config)).prefill(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = dict(model.named_parameters())
    checked = 0
    for name, w in weights.items():
        expected = w.grad
        got = grads[name].grad
        assert got is not None, name
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-4 * max(scale, 1.0), name
        checked += 1
    assert checked == len(grads)


# ----------------------------------------------------------------------------- window_overlap
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_window_overlap_equals_spec(impl):
    # W 64, L 32, 300 tokens: windows at 0, 64, ..., 256; each after the first re-reads the 16 tokens before it.
    model = tiny_model(attn_impl=impl, window_overlap=16)
    ids = tokens(1, 300, seed=11)
    with torch.no_grad():
        logits = model(ids).logits
        cache = model(ids, use_cache=True).past_key_values
    expected = naive_logits(model, model.config, ids)
    assert max_err(logits, expected) < TOL64
    # the overlap changes the windows' outputs, so the comparison above can fail
    assert max_err(naive_logits(model, model.config, ids, window_overlap=0), expected) > 1e-2
    # each token bound for memory is stored once (the re-read ones are not stored again); the last L stay local
    assert cache.memories[model.config.mem_layers[0]].view().k_BGMH.shape[2] == 300 - 32
    assert cache.local_length == 32


def test_window_overlap_with_top_k_covering_memory_equals_dense():
    # With K >= the memory's slots, top-k attention is dense attention (fot.search): the overlap path of the
    # top-k model must then give the dense spec's logits.
    model = tiny_model(attn_impl="torch", window_overlap=16, mem_top_k=512, mem_index="exact")
    ids = tokens(1, 300, seed=12)
    with torch.no_grad():
        logits = model(ids).logits
    assert max_err(logits, naive_logits(model, model.config, ids)) < TOL64


@pytest.mark.parametrize("bad", [-1, 64, 100, True, 2.0])
def test_window_overlap_must_be_below_the_window(bad):
    with pytest.raises(ValueError, match="window_overlap must be an int in \\[0, 64\\)"):
        tiny_model(window_overlap=bad)


def test_window_overlap_is_for_inference_only():
    # A training forward (autograd recording) runs the reference's windows whatever the config says, so the
    # trainer's semantics do not change with an inference setting.
    ids = tokens(1, 200, seed=14)
    overlap, plain = tiny_model(window_overlap=16).train(), tiny_model().train()
    assert torch.equal(overlap(ids).logits, plain(ids).logits)
    with torch.no_grad():
        assert max_err(overlap(ids).logits, plain(ids).logits) > 1e-2
