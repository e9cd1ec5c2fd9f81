"""8-bit memory: symmetric int8 quantization with one scale per stored vector (``mem_dtype="int8"``).

Shape legend: ... any leading dims, H head dim.

A key or value vector x (H numbers) is stored as int8 codes c = round(x / s), clamped to [-127, 127], and
one fp32 scale s = max|x| / 127, so the largest entry is exact up to fp32 rounding and every other entry is off
by at most s / 2. At head_dim 64 that is 68 bytes per vector against 128 for bfloat16. A vector of zeros gets
scale 0 and codes 0. Reading multiplies back in fp32 (``dequantize``); nothing else in fot computes on codes.
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric: -128 is never used, so negating a code never overflows


def quantize(x_xH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [..., H], fp32 scales [...]) of ``x`` (any float dtype), one scale per last-dim vector."""
    x = x_xH.float()
    scale = x.abs().amax(-1) / QMAX  # [...]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize(codes_xH: torch.Tensor, scale_x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes [..., H] times their scales [...], in ``dtype`` (computed in fp32)."""
    return (codes_xH.float() * scale_x.float()[..., None]).to(dtype)


def round_trip(x_xH: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What reading back ``x`` stored as ``dtype`` gives, in x's dtype: quantized and dequantized for int8, cast
    there and back for float dtypes (attention over keys that are not stored yet uses this to match the store)."""
    if dtype == torch.int8:
        return dequantize(*quantize(x_xH), x_xH.dtype)
    return x_xH.to(dtype).to(x_xH.dtype)
