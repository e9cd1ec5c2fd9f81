"""Tiny configs and models shared by the tests (float64 by default so comparisons with the spec are tight)."""

from __future__ import annotations

import copy

import torch

import fot
from plumbing.presets import PRESETS

# The unit tests' model, preset "unit_tiny". A copy: tests pass its dicts to configs, and a preset is shared.
TINY = copy.deepcopy(PRESETS["unit_tiny"])


def tiny_config(**overrides) -> fot.LongLlamaConfig:
    return fot.LongLlamaConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Re-draw every weight so attention is far from uniform and norm weights are not all ones.

    The HF default init (std 0.02) gives near-uniform attention, which would hide position and masking bugs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> fot.LongLlamaForCausalLM:
    torch.manual_seed(seed)
    model = fot.LongLlamaForCausalLM(tiny_config(**overrides))
    randomize_(model, seed)
    return model.to(dtype).eval()


def tokens(B: int, N: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab, (B, N), generator=g)


def left_pad_mask(lengths: list[int], N: int) -> torch.Tensor:
    """[B, N] int mask with ``N - lengths[b]`` leading zeros in row b."""
    return torch.stack([torch.arange(N) >= N - n for n in lengths]).long()


# Float64 models differ from the float64 spec only by fot's fp32 softmax and fp32 RoPE tables (measured
# ~5e-6 on logits of magnitude ~5); bugs move logits by O(0.1..1).
TOL64 = 5e-5
TOL32 = 5e-4


def max_err(actual: torch.Tensor, expected: torch.Tensor, valid_BN: torch.Tensor | None = None) -> float:
    """Max |actual - expected| over [B, N, ...] positions where ``valid_BN`` is true (all when None)."""
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    if valid_BN is not None:
        diff = diff[valid_BN.bool()]
    return diff.max().item()


def mean_err(actual: torch.Tensor, expected: torch.Tensor, valid_BN: torch.Tensor | None = None) -> float:
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    if valid_BN is not None:
        diff = diff[valid_BN.bool()]
    return diff.mean().item()


# With a bf16 memory, fot's fp32 RMSNorm/RoPE/softmax noise (~1e-7) occasionally lands a key or value on the
# other side of a bf16 rounding boundary than the spec's (one ulp = 2^-8 relative), moving a few logits by up
# to ~3e-4. Such rare flips barely move the mean error, while skipping the rounding altogether moves it ~50x.
BF16_MAX = 2e-3
BF16_MEAN = 3e-5


def close_with_bf16_memory(actual, expected, valid_BN=None) -> bool:
    return max_err(actual, expected, valid_BN) < BF16_MAX and mean_err(actual, expected, valid_BN) < BF16_MEAN
