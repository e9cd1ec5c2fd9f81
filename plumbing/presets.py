"""Named model architectures: the one place the project's model shapes are written down.

Each preset is a set of ``LongLlamaConfig`` fields. A run config names one (``preset: NAME``) and its ``model:``
mapping is applied on top. The OpenLLaMA entries are the architectures of ``openlm-research/open_llama_{3b,7b}_v2``
with LongLLaMA's memory layers; use them with ``checkpoint:`` to fine-tune the real weights. ``tiny_cpu`` is also
the benchmarks' model (``benchmarks/bench_config.py``) and ``unit_tiny`` the unit tests' (``tests/tiny.py``).
This module imports nothing, so benchmarks and tests read it without the trainer's dependencies.
"""

from __future__ import annotations

_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_LLAMA_TOKENS = dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

PRESETS: dict[str, dict] = {
    # The benchmark model and the CPU demo model's architecture.
    "tiny_cpu": dict(
        vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, last_context_length=256, mem_layers=[2, 3],
        mem_dtype="float32", rms_norm_eps=1e-6, rope_parameters=_ROPE, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # A model that trains in seconds, for CI.
    "ci_tiny": dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, last_context_length=16, mem_layers=[1],
        mem_dtype="float32", rms_norm_eps=1e-6, rope_parameters=_ROPE, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # The unit tests' model: every feature on a few thousand weights. No EOS, so generation always runs
    # max_new_tokens.
    "unit_tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, last_context_length=32, mem_layers=[1],
        mem_dtype="float32", rms_norm_eps=1e-5, rope_parameters=_ROPE, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    ),
    "openllama_3b": dict(
        **_LLAMA_TOKENS, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, last_context_length=1024, mem_layers=[6, 12, 18],
        mem_dtype="bfloat16", rms_norm_eps=1e-6, rope_parameters=_ROPE,
    ),
    "openllama_7b": dict(
        **_LLAMA_TOKENS, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, last_context_length=1024, mem_layers=[8, 16, 24],
        mem_dtype="bfloat16", rms_norm_eps=1e-6, rope_parameters=_ROPE,
    ),
}

# LongLlamaConfig fields that plain LlamaConfig lacks.
LONGLLAMA_ONLY = ("last_context_length", "mem_layers", "mem_dtype")


def llama_fields(name: str) -> dict:
    """Preset ``name`` without the LongLLaMA fields: the same architecture as a plain ``LlamaConfig``."""
    return {k: v for k, v in PRESETS[name].items() if k not in LONGLLAMA_ONLY}
