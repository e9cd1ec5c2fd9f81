"""The book haystack: passages of the training books, which the synthetic mix's documents hide their keys in.

Lines of the books that hold an evaluation string are removed when the books are loaded (``tasks.heldout``); held-out
books (``assets/books/heldout.parquet``) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from plumbing.files import resolve_files
from tasks.heldout import Scanner, drop_lines


class BookHaystack:
    """Passages of training books. Lines that hold a forbidden string are removed at load time."""

    def __init__(self, texts: Sequence[str], scanner: Scanner):
        self.texts = [drop_lines(t, scanner) for t in texts if t and len(t) > 2000]
        if not self.texts:
            raise ValueError("the book haystack has no text of at least 2000 characters; check data.paths.")
        sizes = np.array([len(t) for t in self.texts], np.float64)
        self.weights = sizes / sizes.sum()

    @classmethod
    def from_files(cls, paths: Sequence[str], text_field: str, scanner: Scanner) -> "BookHaystack":
        import pyarrow.parquet as pq

        files, fmt = resolve_files(list(paths), "auto")
        if fmt != "parquet":
            raise ValueError(f"data.source=synthetic_mix reads books from parquet files (assets/books/train.parquet, "
                             f"built by make assets); got {fmt} files {files}.")
        texts: list[str] = []
        for f in files:
            if "heldout" in Path(f).name:
                raise ValueError(f"data.paths names {f}: held-out books are for evaluation only.")
            table = pq.read_table(f, columns=[text_field])
            texts += [t for t in table.column(text_field).to_pylist() if t]
        return cls(texts, scanner)

    def passage(self, n_chars: int, rng: np.random.Generator) -> str:
        """About ``n_chars`` characters from a random book, starting at a word and ending at one."""
        if n_chars <= 0:
            return ""
        text = self.texts[int(rng.choice(len(self.texts), p=self.weights))]
        start = int(rng.integers(0, max(1, len(text) - n_chars - 200)))
        space = text.find(" ", start)
        start = start if space < 0 else space + 1
        piece = text[start : start + n_chars]
        cut = piece.rfind(" ")
        return (piece[:cut] if cut > n_chars // 2 else piece).strip()

    def repeated(self, n_chars: int, rng: np.random.Generator) -> str:
        """One short passage (one to three sentences) repeated to ``n_chars`` characters, like a repeated filler."""
        unit = self.passage(int(rng.integers(40, 200)), rng)
        sentences = re.findall(r"[^.!?]+[.!?]", unit)
        unit = " ".join(s.strip() for s in sentences[:3]) if sentences else unit
        unit = unit or "And so it went on."
        return " ".join([unit] * (n_chars // (len(unit) + 1) + 1))[:n_chars]
