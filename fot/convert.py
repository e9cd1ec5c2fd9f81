"""Turn a LLaMA-architecture GGUF file (e.g. SmolLM2-135M-Instruct Q4_1) into a plain fot checkpoint, or rewrite
the memory settings of a checkpoint (a fot one, or any Hugging Face Llama checkpoint directory).

    python -m fot.convert --gguf assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --recipe every-layer \\
        --out models/smollm2-fot
    python -m fot.convert --from path/to/any-hf-llama --recipe every-layer --out my-llama-fot
    python -m fot.convert --from models/smollm2-fot --mem-layers 7 15 22 --mem-top-k none --mem-index exact \\
        --out models/smollm2-fot-3layers

``--mem-layers`` takes layer indices (``7 15 22``) or a compact form of ``LongLlamaConfig.mem_layers`` (``all``,
``15:``, ``every:2``); config.json stores the explicit list. ``--from`` changes only the config: memory layers have
no weights of their own, so the same weights serve every layout. It validates the new config, copies the other
files when ``--out`` is another directory, and replaces config.json atomically (seconds, not a reconversion).

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
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .config import MEM_DTYPES, MEM_HEADS_SCOPES, MEM_INDEXES, RECIPES, LongLlamaConfig, recipe
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
    mem_layers: list[int] | str,
    max_position_embeddings: int,
    last_context_length: int,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> LongLlamaForCausalLM:
    """Load a LLaMA-architecture GGUF as a serializable ``LongLlamaForCausalLM`` with memory layers.

    Args:
        gguf_path: the .gguf file.
        mem_layers: indices of the layers that get FoT memory attention (e.g. [7, 15, 22] of SmolLM2's 30), or a
            compact form ("all", "15:", "every:2"; see ``LongLlamaConfig``).
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
    layers = mem_layers if isinstance(mem_layers, str) else list(mem_layers)
    fields = dict(mem_layers=layers, max_position_embeddings=max_position_embeddings,
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


def convert(gguf_path: str | Path, out_dir: str | Path, mem_layers: list[int] | str, max_position_embeddings: int,
            last_context_length: int, dtype: torch.dtype = torch.float32, **config_overrides) -> LongLlamaForCausalLM:
    """``from_gguf`` plus the tokenizer, saved to ``out_dir`` (loadable with ``from_pretrained(out_dir)``)."""
    model = from_gguf(gguf_path, mem_layers, max_position_embeddings, last_context_length, dtype, **config_overrides)
    model.save_pretrained(out_dir)
    tokenizer_from_gguf(gguf_path).save_pretrained(out_dir)
    add_bos = gguf_add_bos(gguf_path)
    if add_bos is not None:  # recorded where fot's readers look (declared_add_bos)
        path = Path(out_dir) / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["add_bos_token"] = add_bos
        path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return model


def declared_add_bos(tokenizer_dir: str | Path) -> bool | None:
    """Whether a checkpoint's tokenizer_config.json declares that text starts with BOS (``add_bos_token``), or None
    where it says nothing (no such file, or no such key).

    fot's readers (the evaluations, ``fot ask``) prepend BOS themselves rather than through ``tokenizer(...)``, so
    that a prompt encoded in pieces gets it once, and transformers' tokenizers do not act on the key for every
    backend: this is where they learn whether the model wants one. SmolLM2 is trained without BOS (its GGUF says
    ``add_bos_token`` false; its BOS id is the chat marker ``<|im_start|>``)."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("add_bos_token")
    return None if value is None else bool(value)


def gguf_add_bos(gguf_path: str | Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token``: whether the model reads text after a BOS token (None when the
    file does not say). transformers' GGUF tokenizer does not carry it into ``save_pretrained``'s files, and a
    model trained without BOS (SmolLM2) reads a prompt that starts with one as a chat turn."""
    from gguf import GGUFReader

    field = GGUFReader(_check_gguf_path(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def rewrite_config(source_dir: str | Path, out_dir: str | Path, **fields) -> LongLlamaConfig:
    """Save a converted checkpoint's config with ``fields`` changed (any ``LongLlamaConfig`` field; ``mem_layers``
    may be a compact form), without loading its weights.

    The new config is validated before anything is written. When ``out_dir`` is another directory, the
    checkpoint's other files (weights, tokenizer, generation config) are copied there first, each through a
    temporary name; config.json is written last and atomically, so an interrupted rewrite leaves no directory that
    loads with a half-written config.

    Raises:
        ValueError: ``source_dir`` holds no config.json, or a field is invalid (the config's own message).
    """
    source, out = Path(source_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise ValueError(f"--from {str(source)!r} holds no config.json; pass a checkpoint directory (a fot one "
                         "such as models/smollm2-fot, or a Hugging Face Llama one).")
    config = LongLlamaConfig.from_pretrained(source, **fields)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != source.resolve():
        for path in sorted(p for p in source.iterdir() if p.is_file() and p.name != "config.json"):
            tmp = out / f".{path.name}.{os.getpid()}.tmp"
            shutil.copy2(path, tmp)
            os.replace(tmp, out / path.name)
    tmp = out / f".config.json.{os.getpid()}.tmp"
    config.to_json_file(tmp)
    os.replace(tmp, out / "config.json")
    return config


def _mem_layers_arg(values: list[str]) -> str:
    """``--mem-layers 7 15 22`` or ``--mem-layers all``: one compact form for ``LongLlamaConfig`` to resolve."""
    return ",".join(values)


def _top_k_arg(text: str) -> int | str:
    if text.lower() == "none":
        return "none"  # set mem_top_k to None: a flag left out is None too, and leaves the field alone
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive int nor 'none' (dense memory attention)")
    return int(text)


def _distance_arg(text: str) -> int | str:
    if text == "none":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int >= 0 nor 'none' (memory at each query's own "
                                         "position)")
    return int(text)


def _config_fields(args) -> dict:
    """The config fields the command line sets (a flag left out leaves the field as it is, or at its default)."""
    names = {"mem_layers": "mem_layers", "window": "max_position_embeddings",
             "last_context_length": "last_context_length", "mem_top_k": "mem_top_k", "mem_index": "mem_index",
             "mem_nprobe": "mem_nprobe", "mem_dtype": "mem_dtype", "window_overlap": "window_overlap",
             "mem_score_bias": "mem_score_bias", "mem_rope_distance": "mem_rope_distance",
             "mem_heads_scope": "mem_heads_scope"}
    fields = {} if args.recipe is None else recipe(args.recipe)  # the flags below override the recipe's fields
    fields.update({field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None})
    if fields.get("mem_top_k") == "none":
        fields["mem_top_k"] = None
    if fields.get("mem_rope_distance") == "none":
        fields["mem_rope_distance"] = None
    if args.mem_layers is not None:
        fields["mem_layers"] = _mem_layers_arg(args.mem_layers)
    if args.mem_heads is not None:
        fields["mem_heads"] = _mem_heads_arg(args.mem_heads)
        if fields["mem_heads"] is not None:  # the heads decide the memory layers
            fields["mem_layers"] = list(fields["mem_heads"])
    return fields


def _mem_heads_arg(text: str) -> dict[int, list[int]] | None:
    """``--mem-heads``: ``all`` (None), a heads JSON file (eval/retrieval_heads.py's heads.json, whose "mem_heads"
    it reads, or a plain {layer: [heads]}), or layer.head pairs ("18.6,21.8")."""
    from .config import parse_mem_heads

    if text == "all":
        return None
    path = Path(text)
    spec = json.loads(path.read_text()) if path.is_file() else text
    if isinstance(spec, dict) and "mem_heads" in spec:
        spec = spec["mem_heads"]
    return parse_mem_heads(spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="the .gguf file (python -m train.assets --model fetches SmolLM2)")
    source.add_argument("--from", dest="source", metavar="DIR",
                        help="a fot checkpoint, or any Hugging Face Llama checkpoint directory, whose config alone "
                             "to rewrite (the weights are not loaded, only copied to --out)")
    parser.add_argument("--recipe", choices=list(RECIPES),
                        help="a named memory setting (fot.config.RECIPES): every memory field at once, the flags "
                             "below overriding single fields. every-layer: the long-context setting measured on "
                             "SmolLM2 (docs/results.md)")
    parser.add_argument("--mem-layers", nargs="+", metavar="LAYERS",
                        help="memory layer indices (7 15 22) or a compact form: all, 15:, every:2, ... (required "
                             "with --gguf)")
    parser.add_argument("--window", type=int, help="the FoT window, max_position_embeddings (required with --gguf)")
    parser.add_argument("--last-context-length", type=int, help="(required with --gguf)")
    parser.add_argument("--mem-top-k", type=_top_k_arg, metavar="K|none",
                        help="kNN memory: each query attends to its top K memory slots; none is dense attention")
    parser.add_argument("--mem-index", choices=list(MEM_INDEXES), help="how the top K slots are found")
    parser.add_argument("--mem-nprobe", type=int, help="IVF lists visited per query (faiss-ivf)")
    parser.add_argument("--mem-dtype", choices=list(MEM_DTYPES),
                        help="storage dtype of memory keys and values (with --gguf, default float32)")
    parser.add_argument("--window-overlap", type=int, metavar="O",
                        help="tokens before each memory-bound window that it re-reads as local context (default 0)")
    parser.add_argument("--mem-score-bias", type=float, metavar="B",
                        help="subtracted from every memory score before the one softmax (default 0)")
    parser.add_argument("--mem-rope-distance", type=_distance_arg, metavar="D|none",
                        help="memory scored as keys D positions before each query (e.g. the window); none: at the "
                             "query's own position in its window, the reference's (the default)")
    parser.add_argument("--mem-heads", metavar="FILE|PAIRS|all",
                        help="only these query heads read memory, and their layers are the memory layers (instead "
                             "of --mem-layers): a heads file of eval/retrieval_heads.py, layer.head pairs such as "
                             "18.6,21.8, or all (every head of --mem-layers, the default)")
    parser.add_argument("--mem-heads-scope", choices=list(MEM_HEADS_SCOPES),
                        help="where --mem-heads applies: all (every forward; memory stores only their KV heads) or "
                             "prefill (while the prompt's windows go to memory; every head reads it in the last "
                             "window)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved weights (--gguf only)")
    parser.add_argument("--out", required=True, help="output directory (may equal --from)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        fields = _config_fields(args)
        if args.source is not None:
            c = rewrite_config(args.source, args.out, **fields)
            weights = f"those of {args.source}" + ("" if Path(args.out).resolve() == Path(args.source).resolve()
                                                   else " (copied)")
        else:
            needed = (("--mem-layers", "mem_layers"), ("--window", "max_position_embeddings"),
                      ("--last-context-length", "last_context_length"))
            missing = [flag for flag, field in needed if field not in fields]
            if missing:
                raise ValueError(f"--gguf needs {', '.join(missing)} (or --recipe every-layer, which sets them).")
            fields.setdefault("mem_dtype", "float32")
            model = convert(args.gguf, args.out, fields.pop("mem_layers"), fields.pop("max_position_embeddings"),
                            fields.pop("last_context_length"), getattr(torch, args.dtype), **fields)
            c = model.config
            weights = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters ({args.dtype})"
    except ValueError as err:  # a bad path or config field: one line naming the fix, not a traceback
        parser.error(str(err))
    rows = [
        ("layers / hidden / heads / KV heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} / "
                                              f"{c.num_key_value_heads}"),
        ("memory layers", _layers_text(c.mem_layers, c.num_hidden_layers)),
        ("query heads that read memory", "all" if c.mem_heads is None else
         f"{sum(map(len, c.mem_heads.values()))} of {len(c.mem_layers) * c.num_attention_heads} (mem_heads, scope "
         f"{c.mem_heads_scope})"),
        ("memory top-k / index / nprobe / dtype", f"{c.mem_top_k or 'dense'} / {c.mem_index} / {c.mem_nprobe} / "
                                                 f"{c.mem_dtype}"),
        ("window / last context / overlap", f"{c.max_position_embeddings} / {c.last_context_length} / "
                                            f"{c.window_overlap}"),
        ("RoPE theta", f"{c.rope_theta:g}"),
        ("vocab / tied embeddings", f"{c.vocab_size} / {c.tie_word_embeddings}"),
        ("weights", weights),
        ("seconds", f"{time.perf_counter() - start:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"saved to {args.out}: load it with fot.LongLlamaForCausalLM.from_pretrained({args.out!r})")


def _layers_text(layers: list[int], n: int) -> str:
    if layers == list(range(n)):
        return f"all {n}"
    return str(layers)


if __name__ == "__main__":
    main()
