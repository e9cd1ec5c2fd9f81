"""LLaMA's rotary position embedding (RoPE), shared by the decoder and the cache (which re-rotates local keys
when the window start moves).

Shape legend: B batch, X heads, T positions, H head dim.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Inverse frequencies of LLaMA's rotary embedding, fp32 [H/2]."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(positions_T: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin [T, H] for integer positions, computed in fp32 and cast to ``dtype``."""
    freqs_TH2 = positions_T.to(torch.float32)[:, None] * inv_freq.to(positions_T.device)[None, :]
    emb_TH = torch.cat((freqs_TH2, freqs_TH2), dim=-1)
    return emb_TH.cos().to(dtype), emb_TH.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BXTH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, H] by the angles of ``cos``/``sin`` [T, H] (LLaMA's half-split layout)."""
    return x_BXTH * cos_TH + rotate_half(x_BXTH) * sin_TH
