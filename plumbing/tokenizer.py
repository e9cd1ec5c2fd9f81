"""The one tokenizer loader of the trainer, the evaluations and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(name_or_path: str | Path):
    """``AutoTokenizer.from_pretrained(name_or_path)``: a checkpoint or tokenizer directory, or a hub id.

    fot is imported first: it registers the model type "longllama", which ``AutoTokenizer`` reads from a
    checkpoint's config.json.
    """
    import fot  # noqa: F401
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
