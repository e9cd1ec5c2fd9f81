"""Helpers shared by the evaluation CLIs: checkpoint and tokenizer loading, inference settings, output files.

An evaluation compares *settings* of one checkpoint. A setting is a set of ``from_pretrained`` overrides of
the saved config:

=================  ===========================================================================================
``memory``         the model as configured
``no-memory``      the same weights with ``mem_layers=[]``: memory layers attend only to their local window,
                   the baseline a long-context method has to beat
``topk:K``         ``mem_top_k=K`` with ``mem_index="exact"`` (kNN memory, exact search)
``topk-flat:K``    ``mem_top_k=K`` with ``mem_index="faiss-flat"``
``topk-ivf:K``     ``mem_top_k=K`` with ``mem_index="faiss-ivf"`` (approximate)
``full:W``         no memory layers and a window of W tokens (``max_position_embeddings`` and
                   ``last_context_length`` W): plain causal attention over the whole prompt when it fits in W,
                   the base model's own long-context ability (e.g. ``full:8192`` for SmolLM2's native context)
=================  ===========================================================================================

The evaluation scripts run from a checkout; ``fot`` never imports them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SETTING_HELP = "memory, no-memory, topk:K, topk-flat:K, topk-ivf:K, full:W"
_TOPK_INDEX = {"topk": "exact", "topk-flat": "faiss-flat", "topk-ivf": "faiss-ivf"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Setting:
    """A named inference setting: ``overrides`` are passed to ``from_pretrained``."""

    name: str
    overrides: dict = field(default_factory=dict)


def parse_setting(text: str) -> Setting:
    """``"memory"``, ``"no-memory"``, ``"topk:K"``, ``"topk-flat:K"``, ``"topk-ivf:K"`` or ``"full:W"`` -> a
    ``Setting`` (module docstring)."""
    if text == "memory":
        return Setting(text, {})
    if text == "no-memory":
        return Setting(text, {"mem_layers": []})
    kind, sep, k = text.partition(":")
    if kind == "full":
        if not sep or not k.isdigit() or int(k) <= 0:
            raise ValueError(f"setting {text!r}: W must be a positive integer (the window in tokens), e.g. full:8192.")
        return Setting(text, {"mem_layers": [], "max_position_embeddings": int(k), "last_context_length": int(k)})
    if kind in _TOPK_INDEX:
        if not sep or not k.isdigit() or int(k) <= 0:
            raise ValueError(f"setting {text!r}: K must be a positive integer, e.g. {kind}:32.")
        index = _TOPK_INDEX[kind]
        if index.startswith("faiss") and importlib.util.find_spec("faiss") is None:
            raise ValueError(f"setting {text!r} needs FAISS: pip install -e '.[faiss]' (or use topk:{k}).")
        return Setting(text, {"mem_top_k": int(k), "mem_index": index})
    raise ValueError(f"unknown setting {text!r}; use one of: {SETTING_HELP}.")


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


def load_tokenizer(path: Path):
    import fot  # noqa: F401  registers model_type "longllama", which AutoTokenizer reads from config.json
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: Path, setting: Setting, device: str, dtype: str):
    """``LongLlamaForCausalLM.from_pretrained(path, **setting.overrides)`` in eval mode on ``device``."""
    import fot

    kwargs = dict(setting.overrides)
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = "auto"
    model = fot.LongLlamaForCausalLM.from_pretrained(path, **kwargs)
    cfg = model.config
    if setting.name == "no-memory" and not cfg.mem_positionals:
        logger.warning("no-memory: the checkpoint has mem_positionals=false; its former memory layers now use RoPE")
    logger.info("%s: window %d, last_context_length %d, mem_layers %s, mem_top_k %s, mem_index %s",
                setting.name, cfg.max_position_embeddings, cfg.last_context_length, cfg.mem_layers, cfg.mem_top_k,
                cfg.mem_index)
    return model.to(device).eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- outputs
def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plot_accuracy(path: Path, lengths: list[int], curves: dict[str, list[float]], window: int, title: str,
                  xlabel: str = "prompt length (tokens)") -> None:
    """One line per setting of accuracy (%) against length on a log2 axis, with the window marked."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    for i, (name, acc) in enumerate(curves.items()):
        marker, line = styles[i % len(styles)]  # distinct styles keep overlapping curves visible
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
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli_main(build_parser, prepare, run, argv: list[str] | None = None):
    """Parse ``argv``, ``prepare(args)`` (a ``ValueError`` exits with status 2 and its message), then
    ``run(args, prepared)`` with logging routed around the progress bars."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepared = prepare(args)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2 and the message on stderr
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        return run(args, prepared)
