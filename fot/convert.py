"""Turn a LLaMA-architecture GGUF file (e.g. SmolLM2-135M-Instruct Q4_1) into a plain fot checkpoint.

    python -m fot.convert --gguf assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --mem-layers 7 15 22 \\
        --window 512 --last-context-length 256 --out models/smollm2-fot

transformers reads GGUF files itself (``from_pretrained(dir, gguf_file=name)``, which needs the ``gguf`` and
``accelerate`` packages): it maps llama.cpp's tensor names to LLaMA's, undoes llama.cpp's Q/K row permutation and
unpacks the quantized blocks. But the model it returns keeps the GGUF quantizer attached, and ``save_pretrained``
refuses any model with a non-serializable quantizer. So ``from_gguf`` loads the file fully dequantized, then
builds a fresh model from the same config without ``quantization_config`` and hands it the dequantized weights:
the result is an ordinary ``LongLlamaForCausalLM`` that saves and reloads without the GGUF. The weights are the
quantized values exactly (Q4_1 rounding included), stored in ``dtype``. transformers warns that a model of type
`llama` instantiates one of type `longllama`: expected, the layouts are the same (the tensor names are checked).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .config import LongLlamaConfig
from .modeling import LongLlamaForCausalLM

# Keys of the GGUF-derived config that describe the file, not the model we build.
_FILE_KEYS = ("quantization_config", "model_type", "architectures", "_name_or_path", "_model_name_or_path",
              "transformers_version", "dtype", "torch_dtype")


def _check_gguf_path(gguf_path: str | Path) -> Path:
    path = Path(gguf_path)
    if not path.is_file():
        raise ValueError(f"gguf_path={str(path)!r} is not a file; for SmolLM2 fetch it: python -m train.assets --model")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} does not start with the GGUF magic bytes; pass a .gguf model file.")
    return path


def from_gguf(
    gguf_path: str | Path,
    mem_layers: list[int],
    max_position_embeddings: int,
    last_context_length: int,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> LongLlamaForCausalLM:
    """Load a LLaMA-architecture GGUF as a serializable ``LongLlamaForCausalLM`` with memory layers.

    Args:
        gguf_path: the .gguf file.
        mem_layers: indices of the layers that get FoT memory attention (e.g. [7, 15, 22] of SmolLM2's 30).
        max_position_embeddings: the FoT window W (not the source model's context length).
        last_context_length: L, the trailing tokens of an input kept as the local window.
        dtype: the dtype of the dequantized weights.
        **config_overrides: any other ``LongLlamaConfig`` field (``mem_dtype``, ``attn_impl``, ...).

    Returns:
        The model in eval mode, without ``quantization_config`` (``save_pretrained`` works).

    Raises:
        ValueError: the file is missing, not GGUF, or its tensors do not fit the LLaMA layout (another
            architecture).
    """
    path = _check_gguf_path(gguf_path)
    fields = dict(mem_layers=list(mem_layers), max_position_embeddings=max_position_embeddings,
                  last_context_length=last_context_length, **config_overrides)
    try:  # dequantize=True: with the `kernels` package, transformers would keep weights packed in GGUF modules
        from transformers import GgufConfig

        fields["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers without GgufConfig (5.4 ...) always unpacks GGUF weights
        pass
    loaded, info = LongLlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, output_loading_info=True, **fields
    )
    mismatched = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if mismatched:
        raise ValueError(f"{path.name} does not fit the LLaMA layout fot implements ({mismatched}); only "
                         "llama-architecture GGUF files (LLaMA, SmolLM2, ...) convert.")
    config_dict = {k: v for k, v in loaded.config.to_dict().items() if k not in _FILE_KEYS}
    config = LongLlamaConfig(**config_dict)
    model = LongLlamaForCausalLM.from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=dtype)
    model.generation_config = loaded.generation_config
    return model.eval()


def tokenizer_from_gguf(gguf_path: str | Path):
    """The tokenizer stored in the GGUF file, as a transformers tokenizer (``save_pretrained`` works)."""
    from transformers import AutoTokenizer

    path = _check_gguf_path(gguf_path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def convert(gguf_path: str | Path, out_dir: str | Path, mem_layers: list[int], max_position_embeddings: int,
            last_context_length: int, dtype: torch.dtype = torch.float32, **config_overrides) -> LongLlamaForCausalLM:
    """``from_gguf`` plus the tokenizer, saved to ``out_dir`` (loadable with ``from_pretrained(out_dir)``)."""
    model = from_gguf(gguf_path, mem_layers, max_position_embeddings, last_context_length, dtype, **config_overrides)
    model.save_pretrained(out_dir)
    tokenizer_from_gguf(gguf_path).save_pretrained(out_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file (python -m train.assets --model fetches SmolLM2)")
    parser.add_argument("--mem-layers", type=int, nargs="+", required=True, help="memory layer indices")
    parser.add_argument("--window", type=int, required=True, help="the FoT window (max_position_embeddings)")
    parser.add_argument("--last-context-length", type=int, required=True)
    parser.add_argument("--mem-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved weights")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        model = convert(args.gguf, args.out, args.mem_layers, args.window, args.last_context_length,
                        getattr(torch, args.dtype), mem_dtype=args.mem_dtype)
    except ValueError as err:  # a bad path or config field: one line naming the fix, not a traceback
        parser.error(str(err))
    c = model.config
    rows = [
        ("layers / hidden / heads / KV heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} / "
                                              f"{c.num_key_value_heads}"),
        ("memory layers", str(c.mem_layers)),
        ("window / last context", f"{c.max_position_embeddings} / {c.last_context_length}"),
        ("RoPE theta", f"{c.rope_theta:g}"),
        ("vocab / tied embeddings", f"{c.vocab_size} / {c.tie_word_embeddings}"),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M ({args.dtype})"),
        ("seconds", f"{time.perf_counter() - start:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"saved to {args.out}: load it with fot.LongLlamaForCausalLM.from_pretrained({args.out!r})")


if __name__ == "__main__":
    main()
