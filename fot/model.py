"""The decoder blocks: RMSNorm, MLP, attention with optional memory, decoder layer.

Shape legend: B batch, T chunk tokens, N query heads, G KV heads, H head dim, D model dim.

Parameter names are Hugging Face LLaMA's (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm`` ...),
so LLaMA, OpenLLaMA and LongLLaMA state dicts load unchanged. A layer is a memory layer when its index is
in ``config.mem_layers``; the difference is only which inputs its attention receives.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import LocalKV, apply_rope, memory_attention, window_group_attention
from .config import LongLlamaConfig
from .crossbatch import CrossBatchPlan, crossbatch_attention


class LongLlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        dtype = x_BTD.dtype
        x = x_BTD.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LongLlamaMLP(nn.Module):
    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        D, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, F, bias=bias)
        self.up_proj = nn.Linear(D, F, bias=bias)
        self.down_proj = nn.Linear(F, D, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class LongLlamaAttention(nn.Module):
    """Causal self-attention over the local window, plus the memory in memory layers."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_memory_layer = layer_idx in config.mem_layers
        self.use_rope = config.mem_positionals or not self.is_memory_layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, N, G, H, bias = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(D, N * H, bias=bias)
        self.k_proj = nn.Linear(D, G * H, bias=bias)
        self.v_proj = nn.Linear(D, G * H, bias=bias)
        self.o_proj = nn.Linear(N * H, D, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        local,
        memory,
        valid_BT: torch.Tensor | None,
        impl: str,
        grouping: tuple[int, int] | None,
        crossbatch: CrossBatchPlan | None = None,
    ):
        """Attend a chunk.

        ``local`` is a ``LocalWindow`` (inference) or ``LocalSnapshot`` (training). ``memory`` is a
        ``MemoryReader`` (memory layers) or None: dense attention to its whole view, or, with ``mem_top_k``,
        to each query's retrieved slots. In training with ``crossbatch``, memory layers instead attend to the
        other rows' raw keys (position 0) and values named by the plan, in the same softmax. The caller
        commits the returned keys/values to the cache.

        Returns:
            (output [B, T, D], (raw keys before RoPE, rotated keys, values), each [B, G, T, H]).
        """
        B, T, _ = x_BTD.shape
        q_BNTH = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGTH = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTH = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            # Under autocast the projections come out in the autocast dtype while the tables are in the
            # residual stream's; rotating in the projections' dtype keeps q, k and v (and the cache) in one.
            cos_TH, sin_TH = (t.to(q_BNTH.dtype) for t in rope_cos_sin)
            q_BNTH = apply_rope(q_BNTH, cos_TH, sin_TH)
            k_rot_BGTH = apply_rope(k_BGTH, cos_TH, sin_TH)
        else:
            k_rot_BGTH = k_BGTH
        local_kv: LocalKV = local.extend(k_rot_BGTH, v_BGTH, valid_BT)
        if self.is_memory_layer and crossbatch is not None:
            out_BNTH = crossbatch_attention(q_BNTH, local_kv, k_BGTH, v_BGTH, valid_BT, crossbatch, impl, grouping)
        elif self.is_memory_layer and memory is not None and memory.windows > 1:
            out_BNTH = window_group_attention(q_BNTH, local_kv, k_BGTH, v_BGTH, memory.view(), memory.windows,
                                              memory.dtype)  # fmt: skip
        else:
            mem_kv, idx_BNTK = None, None
            if self.is_memory_layer and memory is not None:
                mem_kv = memory.view()
                if mem_kv is not None and memory.top_k is not None:
                    idx_BNTK = memory.retrieve(q_BNTH)
            scratch = None if memory is None else memory.scratch
            out_BNTH = memory_attention(q_BNTH, local_kv, mem_kv, impl, grouping, idx_BNTK, scratch)
        out_BTD = out_BNTH.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out_BTD), (k_BGTH, k_rot_BGTH, v_BGTH)


class LongLlamaDecoderLayer(GradientCheckpointingLayer):
    """One decoder block. Checkpointing (``gradient_checkpointing_enable``) recomputes it in backward, which is
    exact because a layer never writes to the cache: the model's layer loop commits what it returns."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x_BTD, rope_cos_sin=None, local=None, memory=None, valid_BT=None, impl="torch", grouping=None,
                crossbatch=None):  # fmt: skip
        attn_BTD, kv = self.self_attn(
            self.input_layernorm(x_BTD), rope_cos_sin, local, memory, valid_BT, impl, grouping, crossbatch
        )
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD, kv
