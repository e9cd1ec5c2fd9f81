"""The held-out book haystack of the RULER-style needle tasks: RULER's essay haystack with fot's held-out books in
place of Paul Graham's essays (which would need a download).

The books are ``assets/books/heldout.parquet`` (``make assets``; train/corpus.py): whole documents that training
never reads (its ``HELDOUT_TITLES``; the trainer refuses a file named heldout). A file with a ``split`` column must
hold only ``heldout`` rows, so a training split cannot be passed by mistake.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_BOOKS = Path("assets/books/heldout.parquet")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class BookHaystack:
    """The held-out books as one stream of words (whitespace collapsed, as RULER does with its essays), read
    cyclically: a haystack longer than all books wraps around, as RULER repeats its essay."""

    def __init__(self, texts: Sequence[str], source: str = "books"):
        self.words = [w for t in texts for w in t.split()]
        self.source = source
        if len(self.words) < 1000:
            raise ValueError(f"{source}: the books hold {len(self.words)} words; a book haystack needs at least 1000.")

    @classmethod
    def from_parquet(cls, path: str | Path, text_field: str = "text") -> "BookHaystack":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--books {str(path)!r} does not exist: build the held-out books with make assets, or "
                             "pass --haystack noise (the book tasks then use RULER's noise haystack).")
        import pyarrow.parquet as pq  # installed with datasets

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"--books {str(path)!r} has no column {text_field!r} (columns: {table.column_names}).")
        if "split" in table.column_names:
            splits = set(table.column("split").to_pylist())
            if splits != {"heldout"}:
                raise ValueError(f"--books {str(path)!r} holds rows of split {sorted(map(str, splits))}; evaluation "
                                 "haystacks must be held out from training: use assets/books/heldout.parquet.")
        return cls([t for t in table.column(text_field).to_pylist() if t], str(path))

    def start(self, rng: np.random.Generator) -> int:
        """A random word that opens a sentence (the first after a word ending in ., ! or ? within 200 words of a
        random one), to start a haystack at."""
        start = int(rng.integers(len(self.words)))
        for i in range(200):
            if self.words[(start + i) % len(self.words)][-1] in ".!?":
                return (start + i + 1) % len(self.words)
        return start

    def sentences(self, start: int, n_words: int) -> list[str]:
        """``n_words`` words from word ``start`` on (wrapping), split into sentences after ., ! or ?."""
        words = [self.words[(start + i) % len(self.words)] for i in range(n_words)]
        return [s for s in _SENTENCE_END.split(" ".join(words)) if s]
