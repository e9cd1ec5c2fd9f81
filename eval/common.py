# Over 500 lines: what every evaluation CLI shares (settings, checkpoint checks, reports, plots, the --resume log).
"""Helpers shared by the evaluation CLIs: checkpoint loading and tokenizer checks (``plumbing.tokenizer.load_tokenizer``
loads it, for the trainer too), inference settings, output files.

An evaluation compares *settings* of one checkpoint. A setting is a set of ``from_pretrained`` overrides of
the saved config, written as a base and optional ``+KEY=VALUE`` modifiers:

=================  ===========================================================================================
``memory``         the model as configured
``dense``          dense attention over all of memory (``mem_top_k=None``, ``mem_index="exact"``)
``no-memory``      the same weights with ``mem_layers=[]``: memory layers attend only to their local window,
                   the baseline a long-context method has to beat
``topk:K``         ``mem_top_k=K`` with ``mem_index="exact"`` (kNN memory, exact search)
``topk-flat:K``    ``mem_top_k=K`` with ``mem_index="faiss-flat"``
``topk-ivf:K``     ``mem_top_k=K`` with ``mem_index="faiss-ivf"`` (approximate)
``blocks:N``       ``mem_blocks=N`` (block retrieval, ``fot.blocks``): each chunk of queries reads N memory blocks
``full:W``         no memory layers and a window of W tokens (``max_position_embeddings`` and
                   ``last_context_length`` W): plain causal attention over the whole prompt when it fits in W,
                   the base model's own long-context ability (e.g. ``full:8192`` for SmolLM2's native context)
``hf:W``           not fot at all: transformers' ``LlamaForCausalLM`` (SDPA, fp32 unless ``--dtype``) on the same
                   weights, for prompts of at most W tokens (``eval.baseline``; a longer prompt stops the run
                   with a one-line error). What a user would run instead of fot.
=================  ===========================================================================================

Modifiers, after ``memory``, ``dense``, ``topk*`` or ``blocks:N`` (``no-memory`` takes only ``window`` and ``lcl``):

=================  ===========================================================================================
``layers=L``       ``mem_layers=L``: any ``LongLlamaConfig.mem_layers`` form (``all``, ``15:``, ``2:``,
                   ``every:2``, ``7,15,22``), resolved against the checkpoint's layer count
``window=W``       ``max_position_embeddings=W``, and ``last_context_length`` min(the saved one, W)
``lcl=N``          ``last_context_length=N``
``k=K``            ``mem_top_k=K`` (top-k memory with the configured index)
``index=NAME``     ``mem_index=NAME`` (exact, faiss-flat or faiss-ivf)
``nprobe=N``       ``mem_nprobe=N`` (faiss-ivf)
``overlap=O``      ``window_overlap=O``: each memory-bound window re-reads the O tokens before it as local context
                   (0: none)
``block=S``        ``mem_block_size=S``, slots per memory block (``blocks:N`` only)
``chunk=C``        ``mem_block_queries=C``, queries that share one choice of blocks (``blocks:N`` only)
``bias=B``         ``mem_score_bias=B``: B is subtracted from every memory score before the one softmax
``dist=D``         ``mem_rope_distance=D``: memory scored as keys D positions before each query (``dist=none``: at
                   the query's own position in its window, the reference's)
``heads=H``        ``mem_heads=H``: only these query heads read memory, and only their layers are memory layers
                   (unless ``layers=`` says otherwise); H is a heads JSON file (eval/retrieval_heads.py),
                   layer.head pairs ``18.6,21.8``, or ``all`` (every head)
``hscope=S``       ``mem_heads_scope=S``: ``all`` (the heads alone everywhere) or ``prefill`` (only while the
                   prompt's windows go to memory; every head reads it in the last window and while generating)
=================  ===========================================================================================

For example ``topk-ivf:32+layers=all+window=1024+nprobe=32`` or ``memory+layers=15:``. A setting's name is what
it was written as: the key of results.json and the label of the plots.

Every CLI checks before it loads a model that ``--out`` can be written (``open_trials``), appends each finished
trial to ``OUT/trials.jsonl`` as it arrives (``TrialLog``), continues a killed run with ``--resume``, and writes
results.json (``run_report``) and its plots atomically at the end (``print_and_write``, ``atomic_path``).

The evaluation scripts run from a checkout; ``fot`` never imports them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import importlib.util
import json
import logging
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fot.convert import declared_add_bos
from plumbing.files import atomic_path, check_out_dir

logger = logging.getLogger(__name__)


def release_memory() -> None:
    """Return the memory of a finished trial to the operating system before the next one starts.

    glibc keeps freed heap pages for reuse instead of returning them. After a passkey trial of 1,048,576 tokens
    (faiss-ivf, fot-tiny) the process still held 12 GB of them; the next trial's peak then passed 23 GB and the
    24 GB machine killed it. ``gc.collect()`` then glibc's ``malloc_trim(0)`` brought a 128K trial's 1.3 GB back
    to the 0.5 GB held before it (docs/results.md, "1M tokens"). Where the C library has no ``malloc_trim``
    (macOS, musl) only the garbage collection runs.
    """
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc():
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)

SETTING_HELP = ("memory, dense, no-memory, topk:K, topk-flat:K, topk-ivf:K, blocks:N, full:W or hf:W, then optional "
                "+layers=L, +window=W, +lcl=N, +k=K, +index=NAME, +nprobe=N, +overlap=O, +block=S, +chunk=C, +bias=B, "
                "+dist=D, +heads=H, +hscope=S (e.g. topk-ivf:32+layers=all+window=1024)")
_TOPK_INDEX = {"topk": "exact", "topk-flat": "faiss-flat", "topk-ivf": "faiss-ivf"}
_MODIFIERS = {"layers": "mem_layers", "window": "max_position_embeddings", "lcl": "last_context_length",
              "k": "mem_top_k", "index": "mem_index", "nprobe": "mem_nprobe", "overlap": "window_overlap",
              "block": "mem_block_size", "chunk": "mem_block_queries", "bias": "mem_score_bias",
              "dist": "mem_rope_distance", "heads": "mem_heads", "hscope": "mem_heads_scope"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Setting:
    """A named inference setting: ``overrides`` are passed to ``from_pretrained``; ``backend`` "hf" loads
    transformers' ``LlamaForCausalLM`` on the same weights instead (``eval.baseline``)."""

    name: str
    overrides: dict = field(default_factory=dict)
    backend: str = "fot"


def _positive(text: str, what: str, example: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{what} must be a positive integer, e.g. {example}.")
    return int(text)


def _base_setting(text: str, base: str) -> tuple[dict, str]:
    """The overrides of a setting's base (before any ``+``) and its kind."""
    if base in ("memory", "no-memory", "dense"):
        return {"no-memory": {"mem_layers": []}, "dense": {"mem_top_k": None, "mem_index": "exact"}}.get(base, {}), base
    kind, sep, value = base.partition(":")
    if kind in ("full", "hf"):
        w = _positive(value, f"setting {text!r}: W (the window in tokens)", f"{kind}:8192")
        if kind == "hf":
            return {"max_position_embeddings": w}, kind
        return {"mem_layers": [], "max_position_embeddings": w, "last_context_length": w}, kind
    if kind in _TOPK_INDEX:
        k = _positive(value, f"setting {text!r}: K", f"{kind}:32")
        return {"mem_top_k": k, "mem_index": _TOPK_INDEX[kind]}, "topk"
    if kind == "blocks":  # block retrieval (fot.blocks): no per-query top-k, so no index either
        n = _positive(value, f"setting {text!r}: N (blocks each chunk of queries reads)", "blocks:16")
        return {"mem_blocks": n, "mem_top_k": None, "mem_index": "exact"}, "blocks"
    raise ValueError(f"unknown setting {text!r}; use {SETTING_HELP}.")


def _modifier(text: str, kind: str, part: str, overrides: dict) -> tuple[str, object]:
    """One ``KEY=VALUE`` modifier of setting ``text`` as (config field, value), checked against its base."""
    from fot.config import MEM_INDEXES, check_mem_layers

    key, sep, value = part.partition("=")
    if not sep or key not in _MODIFIERS or not value:
        raise ValueError(f"setting {text!r}: {part!r} is not a modifier; use +KEY=VALUE with KEY one of "
                         f"{', '.join(_MODIFIERS)} (e.g. memory+layers=all+window=1024).")
    allowed = {"full": (), "hf": (), "no-memory": ("window", "lcl"),
               "dense": ("layers", "window", "lcl", "overlap", "bias", "dist", "heads", "hscope"),
               "blocks": ("layers", "window", "lcl", "overlap", "block", "chunk", "bias")}
    if key in ("block", "chunk") and kind != "blocks":
        raise ValueError(f"setting {text!r}: {key}= sets block retrieval's {_MODIFIERS[key]}; start from blocks:N.")
    if key not in allowed.get(kind, _MODIFIERS):
        fits = ", ".join(allowed.get(kind, ())) or "none"
        hint = ("use topk:K or memory+k=K for top-k memory" if kind == "dense" else
                "start from memory, dense or topk:K to change the memory")
        raise ValueError(f"setting {text!r}: {kind} takes no {key}= (modifiers it takes: {fits}); {hint}.")
    field_name = _MODIFIERS[key]
    if field_name in overrides:
        raise ValueError(f"setting {text!r} sets {key} twice, or its base already sets it; write it once.")
    if key == "layers":
        try:
            check_mem_layers(value)
        except ValueError as err:
            raise ValueError(f"setting {text!r}: {err}") from None
        return field_name, value
    if key == "bias":
        try:
            bias = float(value)
        except ValueError:
            bias = -1.0
        if not 0 <= bias < float("inf"):
            raise ValueError(f"setting {text!r}: bias must be a number >= 0 (the offset of memory scores), e.g. bias=2.")
        return field_name, bias
    if key == "dist":
        if value == "none":
            return field_name, None
        if not value.isdigit():
            raise ValueError(f"setting {text!r}: dist must be an integer >= 0 (memory's RoPE distance from each "
                             "query) or none, e.g. dist=512.")
        return field_name, int(value)
    if key == "heads":
        return field_name, _heads_modifier(text, value)
    if key == "hscope":
        from fot.config import MEM_HEADS_SCOPES

        if value not in MEM_HEADS_SCOPES:
            raise ValueError(f"setting {text!r}: hscope={value!r} is unknown; use one of {', '.join(MEM_HEADS_SCOPES)} "
                             "(prefill: the heads alone only while the prompt's windows go to memory).")
        return field_name, value
    if key == "overlap":  # 0 is a value here: it turns off a checkpoint's saved window_overlap
        if not value.isdigit():
            raise ValueError(f"setting {text!r}: overlap must be an integer >= 0 (tokens each memory-bound window "
                             "re-reads), e.g. overlap=32, or overlap=0 for none.")
        return field_name, int(value)
    if key == "index":
        if value not in MEM_INDEXES:
            raise ValueError(f"setting {text!r}: index={value!r} is unknown; use one of {', '.join(MEM_INDEXES)}.")
        return field_name, value
    return field_name, _positive(value, f"setting {text!r}: {key}", f"{key}=32" if key != "window" else "window=1024")


def _heads_modifier(text: str, value: str) -> str | None:
    """``heads=``'s value as the override records it: None for ``all``, else the compact "layer.head,..." string
    (JSON-stable, so a logged setting compares equal on ``--resume``) of a heads file (eval/retrieval_heads.py's
    heads.json, or any JSON {layer: [heads]}) or of the value itself."""
    from fot.config import parse_mem_heads

    if value == "all":
        return None
    try:
        spec = json.loads(Path(value).read_text()) if Path(value).is_file() else value
        if isinstance(spec, dict) and "mem_heads" in spec:  # eval/retrieval_heads.py's file: the chosen heads in it
            spec = spec["mem_heads"]
        heads = parse_mem_heads(spec)
    except (ValueError, OSError) as err:
        raise ValueError(f"setting {text!r}: heads={value!r} is neither 'all', a heads JSON file nor layer.head "
                         f"pairs such as 18.6,21.8 ({err}).") from None
    return ",".join(f"{layer}.{h}" for layer, hs in heads.items() for h in (hs or [""]))  # "3.": no head


def parse_setting(text: str) -> Setting:
    """A setting's text -> a ``Setting``: a base (``memory``, ``dense``, ``no-memory``, ``topk:K``, ``topk-flat:K``,
    ``topk-ivf:K``, ``full:W``, ``hf:W``) and optional ``+KEY=VALUE`` modifiers (module docstring). Raises
    ``ValueError`` naming the fix; the layers of ``layers=`` are checked against the model when it loads."""
    base, *parts = text.split("+")
    overrides, kind = _base_setting(text, base)
    overrides = dict(overrides)
    for part in parts:
        name, value = _modifier(text, kind, part, overrides)
        overrides[name] = value
    if overrides.get("mem_heads") is not None and "mem_layers" not in overrides:  # the heads' layers, and no others
        overrides["mem_layers"] = ",".join(dict.fromkeys(p.split(".")[0] for p in overrides["mem_heads"].split(",")))
    index = overrides.get("mem_index")
    if index is not None and index.startswith("faiss") and importlib.util.find_spec("faiss") is None:
        raise ValueError(f"setting {text!r} needs FAISS: pip install -e '.[faiss]' (or use exact search, topk:K).")
    if "mem_nprobe" in overrides and index in ("exact", "faiss-flat"):
        raise ValueError(f"setting {text!r}: nprobe only matters to faiss-ivf, and this setting searches with "
                         f"{index}; drop nprobe= or use topk-ivf:K.")
    return Setting(text, overrides, "hf" if kind == "hf" else "fot")


def check_full_attention_lengths(settings: list[Setting], lengths: dict[str, list[int]]) -> None:
    """Before anything loads: a ``ValueError`` when an ``hf:W`` setting is to run at a length above W (``lengths``:
    setting name -> the prompt lengths it runs at), naming the two fixes."""
    for s in settings:
        window = s.overrides.get("max_position_embeddings") if s.backend == "hf" else None
        over = [n for n in lengths.get(s.name, []) if window is not None and n > window]
        if over:
            raise ValueError(f"setting {s.name} runs prompts of at most {window} tokens, not {over}; leave those "
                             f"lengths out of it (eval/passkey.py: --lengths-for {s.name}=:{window}) or use "
                             f"hf:{max(over)}.")


def setting_overrides(setting: Setting, saved: dict) -> dict:
    """The ``from_pretrained`` overrides of ``setting`` on a checkpoint whose saved config is ``saved``: a
    ``window=W`` without ``lcl=`` also sets ``last_context_length`` to min(the saved one, W), so the window can
    shrink below it; a setting that sets the memory layers (``no-memory``, ``full:W``, ``layers=``) on a checkpoint
    with ``mem_heads`` reads them with every head unless it says ``heads=``."""
    overrides = dict(setting.overrides)
    sets_layers = "mem_layers" in overrides and "mem_heads" not in overrides
    if setting.backend == "fot" and sets_layers and saved.get("mem_heads"):
        overrides["mem_heads"] = None  # other memory layers than the saved ones: read with every head (or heads=)
    if setting.backend == "fot" and "max_position_embeddings" in overrides and "last_context_length" not in overrides:
        w_saved = saved.get("max_position_embeddings", 2048)
        lcl = saved.get("last_context_length") or min(1024, w_saved)  # LongLlamaConfig's default when unsaved
        overrides["last_context_length"] = min(lcl, overrides["max_position_embeddings"])
    return overrides


def parse_settings(texts: list[str]) -> list[Setting]:
    settings = [parse_setting(t) for t in texts]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"--settings lists a setting twice: {names}.")
    return settings


# ----------------------------------------------------------------------------- checkpoints
def check_model_dir(path: str | os.PathLike) -> Path:
    """A local checkpoint directory holding ``config.json``, or a ``ValueError`` saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"model directory {str(path)!r} does not exist; pass a local checkpoint directory (save_pretrained "
            "output, e.g. models/fot-tiny or runs/<run>/final)."
        )
    if (path / "adapter_config.json").is_file():  # a LoRA adapter: from_pretrained loads its base with it
        return path
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint directory. Trainer "
            "checkpoints step_*/ are torch.distributed.checkpoint shards: use the run's final/ directory."
        )
    return path


def model_config(model_dir: Path) -> dict:
    """The saved config of a checkpoint directory, or of an adapter directory's base (its
    ``adapter_config.json`` names the base, as transformers' PEFT integration reads it)."""
    if (model_dir / "adapter_config.json").is_file():
        base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ValueError(f"{model_dir} is an adapter whose base {base!r} has no config.json here; run from the "
                             "directory the base path is relative to, or make the base first (e.g. make smollm2).")
        model_dir = Path(base)
    return json.loads((model_dir / "config.json").read_text())


def check_tokenizer_dir(path: str | os.PathLike, model_dir: Path | None = None) -> Path:
    """A directory ``AutoTokenizer`` can load, or a ``ValueError`` naming the fix."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {str(path)!r} does not exist.")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        hint = " or pass --tokenizer DIR" if model_dir is not None and path == model_dir else ""
        raise ValueError(
            f"no tokenizer in {str(path)!r} (none of {', '.join(_TOKENIZER_FILES)}); save one there with "
            f"tokenizer.save_pretrained(...){hint}."
        )
    return path


def load_model(path: Path, setting: Setting, device: str, dtype: str):
    """``LongLlamaForCausalLM.from_pretrained(path, **setting_overrides(...))`` in eval mode on ``device``; for an
    ``hf:W`` setting, transformers' ``LlamaForCausalLM`` on the same weights (``eval.baseline``)."""
    import fot

    if setting.backend == "hf":
        from eval.baseline import load_full_attention

        dtype_hf = torch.float32 if dtype == "auto" else getattr(torch, dtype)  # "auto": fp32, the fot paths' compute
        logger.info("%s: transformers LlamaForCausalLM (sdpa, %s) on the weights of %s", setting.name, dtype_hf, path)
        window = setting.overrides["max_position_embeddings"]
        return load_full_attention(path, window, dtype_hf).to(device).eval()
    kwargs = setting_overrides(setting, model_config(Path(path)))
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = "auto"
    model = fot.LongLlamaForCausalLM.from_pretrained(path, **kwargs)
    cfg = model.config
    if setting.name == "no-memory" and not cfg.mem_positionals:
        logger.warning("no-memory: the checkpoint has mem_positionals=false; its former memory layers now use RoPE")
    reads = (f"mem_blocks {cfg.mem_blocks} of {cfg.mem_block_size} slots per {cfg.mem_block_queries} queries"
             if cfg.mem_blocks is not None else f"mem_top_k {cfg.mem_top_k}, mem_index {cfg.mem_index}")
    if cfg.mem_score_bias:
        reads += f", mem_score_bias {cfg.mem_score_bias:g}"
    if cfg.mem_rope_distance is not None:
        reads += f", mem_rope_distance {cfg.mem_rope_distance}"
    logger.info("%s: window %d, last_context_length %d, window_overlap %d, mem_layers %s, %s", setting.name,
                cfg.max_position_embeddings, cfg.last_context_length, cfg.window_overlap, cfg.mem_layers, reads)
    return model.to(device).eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- arguments every CLI takes
def add_model_arguments(p, model_help: str = "local checkpoint directory (config.json + weights)") -> None:
    """``--model`` and ``--tokenizer``."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")


def add_settings_argument(p) -> None:
    p.add_argument("--settings", nargs="+", default=["memory", "no-memory"], help=f"any of: {SETTING_HELP}")


def add_run_arguments(p, out_help: str, resume: bool = True) -> None:
    """``--device``, ``--dtype``, ``--threads``, ``--out`` (described by ``out_help``) and, with ``resume``,
    ``--resume``."""
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help=out_help)
    if resume:
        p.add_argument("--resume", action="store_true", help=RESUME_HELP)


def add_prefill_arguments(p) -> None:
    """``--prefill-segment`` and ``--offload-dir``: how a long prompt's memory is filled (``PromptPrefill``)."""
    p.add_argument("--prefill-segment", type=int, metavar="TOKENS",
                   help="prefill each prompt's memory in calls of TOKENS (a multiple of the window) before generate: "
                        "bounded activations and a progress bar; the result is that of one call (fot.prefill)")
    p.add_argument("--offload-dir", metavar="DIR",
                   help="keep each prompt's memory in memory-mapped files under DIR (mem_offload='disk'), prefilled "
                        "in segments (--prefill-segment, default 65536); with --resume an interrupted prompt "
                        "continues from its last window bound on disk instead of starting again")


class PromptPrefill:
    """A prompt's memory filled in segments before ``generate`` (``--prefill-segment``), optionally on disk and
    resumable across processes (``--offload-dir``, ``fot.prefill.ResumablePrefill``). A prompt's job name is its
    trial key, so a resumed run finds the memory its interrupted prompt left."""

    def __init__(self, segment: int | None, offload_dir: str | None, last_context_length: int | None = None):
        from fot.prefill import DEFAULT_SEGMENT, ResumablePrefill

        self.segment = segment or DEFAULT_SEGMENT
        self.offload_dir = offload_dir
        self.last_context_length = last_context_length
        self.resumable = None if offload_dir is None else ResumablePrefill(offload_dir, self.segment)

    @staticmethod
    def check_args(args, settings: list[Setting], window: int | None) -> None:
        """The checks of ``--prefill-segment`` and ``--offload-dir`` that need no model, made before one is loaded:
        a segment is a positive multiple of the model's ``window``, and transformers' full attention (``hf:W``)
        has no fot memory to prefill."""
        if args.prefill_segment is None and args.offload_dir is None:
            return
        if args.prefill_segment is not None and (args.prefill_segment < 1 or (
                window is not None and args.prefill_segment % window)):
            example = f", e.g. {16 * window}" if window else ""
            raise ValueError(f"--prefill-segment {args.prefill_segment}: a segment is a positive multiple of the "
                             f"model's window ({window} tokens){example}.")
        hf = [s.name for s in settings if s.backend == "hf"]
        if hf:
            raise ValueError(f"setting {hf[0]} (transformers' full attention) has no fot memory to prefill; run it "
                             "in another call without --prefill-segment and --offload-dir.")

    @classmethod
    def from_args(cls, args) -> "PromptPrefill | None":
        """The prefill ``args`` ask for (``check_args`` has passed), or None for a prompt in one call."""
        if args.prefill_segment is None and args.offload_dir is None:
            return None
        return cls(args.prefill_segment, args.offload_dir, args.last_context_length)

    def configure(self, model) -> None:
        """Point a loaded fot model's memory at the offload folder (no-op without ``--offload-dir``; ``hf:W``
        settings were refused by ``check_args``)."""
        if self.offload_dir is not None:
            model.config.mem_offload_dir = os.path.join(self.offload_dir, "memory")  # first: "disk" needs it
            model.config.mem_offload = "disk"

    def cache(self, name: str, model, ids: torch.Tensor):
        """The prompt's cache with its memory-bound windows prefilled (reopened and continued when on disk)."""
        from fot.prefill import prefill

        if self.resumable is not None:
            return self.resumable.cache(name, model, ids, self.last_context_length)
        return prefill(model, ids, segment=self.segment, last_context_length=self.last_context_length, progress=True)

    def earlier_seconds(self, name: str) -> float:
        """Seconds earlier processes spent prefilling this prompt (0 unless it was resumed from disk)."""
        return 0.0 if self.resumable is None else self.resumable.seconds(name)

    def finish(self, name: str) -> None:
        """The prompt is scored: delete its memory files."""
        if self.resumable is not None:
            self.resumable.finish(name)


def check_model_args(args, full_attention_baseline: bool = False) -> tuple[list[Setting], Path, Path, dict]:
    """The checks of ``--threads``, ``--settings``, ``--model`` and ``--tokenizer``, made before anything is loaded.
    Returns the settings, the model and tokenizer directories and the model's saved config. ``hf:W`` settings are
    refused unless ``full_attention_baseline`` (the tool scores through ``generate`` alone, as passkey and ruler do:
    the baseline has no fot cache to fork and no windows to read a long document through)."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}.")
    settings = parse_settings(args.settings)
    hf = [s.name for s in settings if s.backend == "hf"]
    if hf and not full_attention_baseline:
        raise ValueError(f"setting {hf[0]} (transformers' LlamaForCausalLM) runs in eval/passkey.py and eval/ruler.py; "
                         "here use full:W, fot's own full attention over W tokens.")
    model_dir = check_model_dir(args.model)
    tokenizer_dir = check_tokenizer_dir(args.tokenizer or model_dir, model_dir)
    args.bos = resolve_bos(args, tokenizer_dir)
    return settings, model_dir, tokenizer_dir, model_config(model_dir)


def add_probe_arguments(p, out_help: str) -> None:
    """The arguments the probes (eval/lookup_probe.py, eval/retrieval_heads.py) share besides their own: ``--model``,
    ``--tokenizer``, ``--device``, ``--threads``, ``--out``."""
    p.add_argument("--model", type=Path, required=True, help="local checkpoint directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model directory)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help=out_help)


def check_probe_args(args) -> tuple[Path, Path]:
    """``add_probe_arguments``' checks before a model loads: (model directory, tokenizer directory); raises
    ``ValueError`` naming the fix."""
    model_dir = check_model_dir(args.model)
    tokenizer_dir = check_tokenizer_dir(args.tokenizer or model_dir, model_dir)
    if args.out is not None:
        check_out_dir(args.out)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}.")
    return model_dir, tokenizer_dir


def resolve_bos(args, tokenizer_dir: Path) -> bool:
    """Whether prompts start with BOS: not with ``--no-bos``; otherwise as the checkpoint's tokenizer_config.json
    declares (``add_bos_token``, e.g. false for SmolLM2); where it declares nothing, yes (fot's own checkpoints
    and LongLLaMA are trained with BOS). The choice is logged."""
    if getattr(args, "no_bos", False):
        logger.info("BOS: off (--no-bos)")
        return False
    declared = declared_add_bos(tokenizer_dir)
    if declared is None:
        logger.info("BOS: on (%s/tokenizer_config.json declares no add_bos_token; --no-bos turns it off)",
                    tokenizer_dir)
        return True
    logger.info("BOS: %s (add_bos_token in %s/tokenizer_config.json)", "on" if declared else "off", tokenizer_dir)
    return declared


def check_vocab(tokenizer, tokenizer_dir: Path, config: dict) -> None:
    """A ``ValueError`` when ``tokenizer`` has more tokens than the model's saved ``vocab_size``."""
    vocab = config.get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"mismatched tokenizer: {str(tokenizer_dir)!r} has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab}; pass --tokenizer DIR with the tokenizer the model was trained with.")


# ----------------------------------------------------------------------------- outputs
def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


_EARLIER_PEAK = 0  # the run's peak RSS before the kernel's high-water mark was last reset (reset_peak_rss)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far, in bytes (``getrusage``: kilobytes on Linux, bytes on macOS), the
    peaks before any ``reset_peak_rss`` included."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(_EARLIER_PEAK, int(peak if sys.platform == "darwin" else peak * 1024))


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's resident set, so that ``trial_peak_rss_bytes`` reads the peak
    of what runs next (one prompt) rather than of the whole run, which may hold several settings. Linux only: it
    writes 5 to ``/proc/self/clear_refs``; returns False where that cannot be done (and the trial records no peak).
    ``peak_rss_bytes`` keeps the run's peak across resets."""
    global _EARLIER_PEAK
    _EARLIER_PEAK = peak_rss_bytes()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def with_peak_rss(score, *args, **kwargs) -> dict:
    """``score(*args, **kwargs)``, which scores one prompt and returns its record, with the prompt's own peak
    resident set added as ``peak_rss_bytes`` (None where it cannot be measured): with several settings in one
    process, the run's peak says nothing of each."""
    reset = reset_peak_rss()
    record = score(*args, **kwargs)
    record["peak_rss_bytes"] = trial_peak_rss_bytes(reset)
    return record


def cell_peak_rss(records: list[dict]) -> int | None:
    """The largest ``peak_rss_bytes`` of a cell's trials; None when a trial has none (logged before trials recorded
    it, or where ``reset_peak_rss`` is not available), since then the largest of the rest could understate it."""
    peaks = [r.get("peak_rss_bytes") for r in records]
    return None if not peaks or None in peaks else max(peaks)


def trial_peak_rss_bytes(reset: bool) -> int | None:
    """The peak resident set (bytes) since ``reset_peak_rss`` returned ``reset``; None when it could not reset."""
    if not reset:
        return None
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if hwm is None else int(hwm) * 1024


def run_report(task: str, args, model_dir: Path, tokenizer_dir: Path, window: int, fields: dict, configs: dict,
               results: dict, answer_methods: list[str] | None = None) -> dict:
    """What results.json holds: the task, checkpoint, tokenizer and window, the tool's own ``fields``, where it
    ran, the process's peak RSS (``peak_rss_bytes``: of this invocation, every setting it ran; one setting per run
    gives that setting's), with ``answer_methods`` how many answers were tokenized each way, then each setting's
    configuration and results."""
    report = {"task": task, "model": str(model_dir), "tokenizer": str(tokenizer_dir), "window": window, **fields,
              "device": str(args.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "peak_rss_bytes": peak_rss_bytes()}
    if answer_methods is not None:
        report["answer_tokenization"] = {m: answer_methods.count(m) for m in sorted(set(answer_methods))}
    return {**report, "settings": configs, "results": results}


def print_and_write(args, report: dict, table: str, plots: dict) -> dict:
    """Print ``table``; with ``--out``, write ``report`` to results.json and each plot there (``plots[name](path)``
    draws file ``name``), and say what was written. Returns ``report``."""
    print(table)
    if args.out:
        out = Path(args.out)
        write_json(out / "results.json", report)
        for name, plot in plots.items():
            plot(out / name)
        written = [str(out / name) for name in ("results.json", *plots)]
        print(f"wrote {', '.join(written[:-1])} and {written[-1]}")
    return report


LINE_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]  # keep overlapping curves visible


def new_figure():
    """(figure, axes) for an eval plot, on the file-only Agg backend and with matplotlib's chatter off."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def plot_accuracy(path: Path, lengths: list[int], curves: dict[str, list[float]], window: int, title: str,
                  xlabel: str = "prompt length (tokens)") -> None:
    """One line per setting of accuracy (%) against length on a log2 axis, with the window marked."""
    fig, ax = new_figure()
    for i, (name, acc) in enumerate(curves.items()):
        marker, line = LINE_STYLES[i % len(LINE_STYLES)]
        ax.plot(lengths, acc, marker=marker, linestyle=line, label=name, alpha=0.85)
    ax.axvline(window, color="grey", linestyle="--", linewidth=1)
    ax.text(window, 103, f" window {window}", color="grey", fontsize=8, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45 if len(lengths) > 8 else 0)
    ax.set_ylim(-3, 110)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    finish_plot(fig, ax, path, title)


def finish_plot(fig, ax, path: Path, title: str) -> None:
    """Title, grid and legend, then save ``fig`` to ``path`` (parents created) and close it."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` to ``path`` atomically (``atomic_path``), then close the figure."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, **kwargs)  # tmp's suffix names no format
    plt.close(fig)


# ----------------------------------------------------------------------------- the output folder and the trials log
TRIALS_FILE = "trials.jsonl"
RESUME_HELP = (f"continue the run whose finished trials are in OUT/{TRIALS_FILE} (the same arguments are required); "
               "without it an --out holding finished trials is refused")
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt")
_TOKENIZER_FINGERPRINT = (*_TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "vocab.json",
                          "merges.txt")
_MIB = 1 << 20


def fingerprint(directory: Path, names: tuple[str, ...] | None = None) -> str:
    """A cheap identity of a checkpoint directory (or of the files ``names`` in it, e.g. a tokenizer's), so a
    resumed run notices a retrained or replaced checkpoint at the same path: sha256 over each weight, JSON,
    tokenizer and text file's name, size and first and last MiB (a LoRA adapter's base directory included)."""
    digest, dirs = hashlib.sha256(), [directory]
    if names is None and (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            dirs.append(Path(base))
    for d in dirs:
        for path in sorted(p for p in d.iterdir()
                           if p.is_file() and (p.name in names if names else p.suffix in _FINGERPRINT_SUFFIXES)):
            size = path.stat().st_size
            digest.update(f"{path.name}\0{size}\0".encode())
            with path.open("rb") as f:
                digest.update(f.read(_MIB))
                if size > 2 * _MIB:
                    f.seek(-_MIB, os.SEEK_END)
                    digest.update(f.read(_MIB))
    return digest.hexdigest()[:16]


def run_identity(task: str, args, model_dir: Path, tokenizer_dir: Path, settings: list[Setting]) -> dict:
    """The part of a run's configuration every tool shares (see ``TrialLog``); each tool adds its own fields."""
    return {"task": task, "model": str(model_dir.resolve()), "model_fingerprint": fingerprint(model_dir),
            "tokenizer": str(tokenizer_dir.resolve()),
            "tokenizer_fingerprint": fingerprint(tokenizer_dir, _TOKENIZER_FINGERPRINT),
            "settings": [s.name for s in settings], "seed": args.seed, "bos": args.bos,
            "dtype": args.dtype, "device": str(args.device)}


class TrialLog:
    """``OUT/trials.jsonl``: every finished trial, written as it arrives, so a killed evaluation can resume.

    The first line is ``{"run": CONFIG}``: what determines the results (model and tokenizer with their
    fingerprints, settings, lengths or sizes, trials, seed, ...). Each later line is ``{"key": [...], "value":
    {...}}``: one finished trial under a key that names it (its setting first), or a setting's effective
    configuration under ``["setting", NAME]``. A line is appended with flush and fsync, so a kill loses at most
    the trial in flight and at worst leaves a truncated last line, which reading skips with a warning.
    """

    def __init__(self, path: Path, done: dict[tuple, dict]):
        self.path, self.done = path, done

    @classmethod
    def open(cls, out: str | os.PathLike, config: dict, resume: bool) -> "TrialLog":
        """Check that ``out`` can be written, then start a new log, or with ``resume`` continue the one there.

        Raises ``ValueError`` when ``out`` cannot be written, when it holds finished trials and ``resume`` is
        false, or when they were run with another configuration (naming each differing field).
        """
        path = check_out_dir(out) / TRIALS_FILE
        config = json.loads(json.dumps(config))  # compared as it reads back
        saved, done, good_bytes = read_trials(path) if path.exists() else (None, {}, 0)
        if done and not resume:
            raise ValueError(f"{path} holds {len(done)} finished entries of an earlier run; pass --resume to continue "
                             "it, or choose another --out (finished results are never overwritten).")
        if done:
            differ = [f"{k} {json.dumps(saved.get(k))} (now {json.dumps(config.get(k))})"
                      for k in dict.fromkeys([*saved, *config]) if saved.get(k) != config.get(k)]
            if differ:
                raise ValueError(f"--resume: {path} was written with other arguments: {'; '.join(differ)}. Pass the "
                                 "same arguments, or choose another --out.")
            os.truncate(path, good_bytes)  # drop a truncated last line before appending after it
            logger.info("resuming from %s: %d finished entries", path, len(done))
            return cls(path, done)
        if resume:
            logger.info("--resume: %s holds no finished trials; starting afresh", path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"run": config}) + "\n")
        return cls(path, {})

    def get(self, key, /, **expected) -> dict | None:
        """The value logged under ``key``, or None. ``expected`` fields of the trial (its passkey, token count...)
        must equal the logged ones: a difference means its inputs changed since, and raises ``ValueError``."""
        value = self.done.get(tuple(key))
        if value is not None:
            differ = {k: (value.get(k), v) for k, v in json.loads(json.dumps(expected)).items() if value.get(k) != v}
            if differ:
                raise ValueError(f"{self.path}: the finished trial {list(key)} has {differ} (logged, now): its inputs "
                                 "changed since it ran (tokenizer, data or code); choose another --out.")
        return value

    def put(self, key, value: dict) -> None:
        """Append one line and sync it to disk before returning."""
        line = json.dumps({"key": list(key), "value": value}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[tuple(key)] = json.loads(json.dumps(value))


def read_trials(path: Path) -> tuple[dict | None, dict[tuple, dict], int]:
    """A trials log's configuration, its entries by key, and the length in bytes of its intact lines.

    A last line that is cut short or not JSON (the run was killed while writing it) is skipped with a warning;
    a damaged line before it is a ``ValueError``.
    """
    lines = path.read_bytes().splitlines(keepends=True)
    config, done, good_bytes = None, {}, 0
    for n, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw) if raw.endswith(b"\n") else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not (("run" in entry) if n == 1 else {"key", "value"} <= set(entry)):
            if n == len(lines):
                logger.warning("%s: skipping its last line, which is cut short (the run was killed while writing "
                               "it)", path)
                break
            raise ValueError(f"{path}, line {n}, is not a trials log line; the file is damaged: choose another --out.")
        if n == 1:
            config = entry["run"]
        else:
            done[tuple(entry["key"])] = entry["value"]
        good_bytes += len(raw)
    return config, done, good_bytes


def open_trials(args, config: dict) -> TrialLog | None:
    """The run's ``TrialLog`` under ``--out`` (None without ``--out``); every check is made before any model is
    loaded."""
    if args.out is None:
        if args.resume:
            raise ValueError(f"--resume needs --out: the directory whose {TRIALS_FILE} to continue.")
        return None
    return TrialLog.open(args.out, config, args.resume)


def setting_model(log: TrialLog | None, setting: Setting, pending: bool, load, describe) -> tuple[object, dict]:
    """``(model, description)`` of a setting: the model ``load()`` returns and ``describe(model.config)``, logged
    as ``["setting", NAME]``; or ``(None, the logged description)`` when nothing of it is ``pending``."""
    key = ("setting", setting.name)
    saved = log.get(key) if log is not None else None
    if saved is not None and not pending:
        return None, saved
    model = load()
    description = json.loads(json.dumps(describe(model.config)))  # as a resumed run reads it back
    if log is not None and saved != description:
        log.put(key, description)
    return model, description


def cli_main(build_parser, prepare, run, argv: list[str] | None = None):
    """Parse ``argv``, ``prepare(args)`` (a ``ValueError`` exits with status 2 and its message in one line), then
    ``run(args, prepared)`` with logging routed around the progress bars."""
    from plumbing.cli import fail

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, six lines per run
    try:
        prepared = prepare(args)
    except ValueError as err:
        fail(parser.prog, str(err))  # one line on stderr, exit status 2
    from tqdm.contrib.logging import logging_redirect_tqdm

    from eval.baseline import PromptTooLongError

    with logging_redirect_tqdm():
        try:
            return run(args, prepared)
        except PromptTooLongError as err:  # found mid-run: the finished trials are logged, so --resume continues
            fail(parser.prog, str(err))
