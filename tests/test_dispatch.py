"""attn_impl dispatch: the Triton kernel inside the model equals the torch path; explicit choices that cannot
run raise; "auto" picks torch on the CPU."""

import pytest
import torch

from fot.plan import AttnImplResolver
from tests.tiny import tiny_model, tokens

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'fot[triton]')")


@pytest.mark.parametrize("top_k", [None, 5])
def test_triton_impl_in_the_model_equals_torch(top_k):
    model = tiny_model(dtype=torch.float32, mem_layers=[1, 2], mem_dtype="float32", num_key_value_heads=2)
    model.config.mem_top_k = top_k
    ids = tokens(2, 100, seed=3)
    with torch.no_grad():
        model.config.attn_impl = "torch"
        expected = model(ids).logits
        model.config.attn_impl = "triton"
        got = model(ids).logits
    assert (got - expected).abs().max() < 1e-4


def test_explicit_triton_that_cannot_run_raises():
    model = tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32")
    model.config.attn_impl = "triton"
    model.model.impl_resolver = AttnImplResolver(unavailable_reason=lambda device: "no CUDA device here")
    with pytest.raises(ValueError, match="attn_impl='triton' cannot run on cpu: no CUDA device here"):
        model(tokens(1, 10, seed=0))


def test_auto_picks_torch_on_cpu_and_logs_it(caplog):
    model = tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32")
    with caplog.at_level("INFO", logger="fot.plan"):
        model(tokens(1, 10, seed=0))
    assert "chose 'torch'" in caplog.text


def test_auto_is_resolved_once_per_device_and_logged_once(caplog):
    model = tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32")
    with caplog.at_level("INFO", logger="fot.plan"), torch.no_grad():
        for _ in range(3):
            model(tokens(1, 10, seed=0))
    assert caplog.text.count("chose 'torch'") == 1


def test_the_forward_plan_is_frozen():
    import dataclasses

    from fot.types import ForwardPlan

    plan = ForwardPlan(impl="torch", memory_mode="dense", training=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.training = True
    assert plan.attention_kind == "dense"
    assert ForwardPlan(impl="torch", memory_mode="top-k", training=True).attention_kind == "top-k-training"


def test_auto_on_cuda_picks_triton_but_torch_for_float64():
    """The decision alone (no CUDA tensor is made): compiled Triton has no float64 matmul at the kernels' tile
    sizes, so "auto" keeps float64 models on the torch path; and a Triton that cannot run means torch."""
    from fot.plan import resolve_attn_impl

    cuda, runs, cannot = torch.device("cuda", 0), (lambda device: None), (lambda device: "too old a GPU")
    assert resolve_attn_impl("auto", cuda, runs, torch.bfloat16) == "triton"
    assert resolve_attn_impl("auto", cuda, runs, torch.float32) == "triton"
    assert resolve_attn_impl("auto", cuda, runs, torch.float64) == "torch"
    assert resolve_attn_impl("auto", cuda, cannot, torch.bfloat16) == "torch"
    assert resolve_attn_impl("auto", torch.device("cpu"), runs, torch.float32) == "torch"
    assert resolve_attn_impl("torch", cuda, runs, torch.bfloat16) == "torch"


def test_the_resolver_decides_per_dtype(caplog):
    resolver = AttnImplResolver(unavailable_reason=lambda device: None)
    cuda = torch.device("cuda", 0)
    with caplog.at_level("INFO", logger="fot.plan"):
        assert resolver("auto", cuda, torch.bfloat16) == "triton"
        assert resolver("auto", cuda, torch.float64) == "torch"
        assert resolver("auto", cuda, torch.bfloat16) == "triton"
    assert caplog.text.count("chose") == 2 and "chose 'torch' on cuda for torch.float64" in caplog.text
