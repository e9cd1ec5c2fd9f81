"""RULER's common-words extraction (``scripts/data/synthetic/common_words_extraction.py``, task ``cwe``), rewritten
for fot.

A numbered list "1. word 2. word ..." holds ten common words many times each (30 from a length of 4096 tokens on,
6 below it) and the other words a few times each (3, or 1 below 4096), shuffled; the answer is the ten common
words. As RULER does, one worked example comes first: a list of 40 words (20 below 4096) with its answer. A unit is
a distinct word. Words come from tasks/ruler_words.py; when a list needs more distinct words than it holds, the
adjective-noun pairs join the pool, as RULER then switches to a larger English word list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tasks.ruler_prompt import CWE, Built
from tasks.ruler_words import KEY_WORDS, SINGLE_WORDS

LARGE_POOL = SINGLE_WORDS + KEY_WORDS


@dataclass(frozen=True)
class CommonWords:
    num_cw: int = 10  # the template asks for the 10 most common words
    freq_cw: int = 30  # repeats of a common word (6 below 4096 tokens)
    freq_ucw: int = 3  # repeats of an uncommon word (1 below 4096 tokens)
    kind: str = "word"  # the read score's item kind: words of the list

    def repeats(self, length: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
        """((example words, example common repeats, example uncommon repeats), (common, uncommon repeats)) at a
        requested length, as RULER switches them at 4096."""
        if length < 4096:
            return (20, 3, 1), (6, 1)
        return (40, 10, 3), (self.freq_cw, self.freq_ucw)

    def word_list(self, n_words: int, common: int, uncommon: int, rng: np.random.Generator,
                  pool: Sequence[str] = SINGLE_WORDS) -> tuple[str, list[str]]:
        """A numbered list of ``n_words`` distinct words, the first ``num_cw`` repeated ``common`` times and the rest
        ``uncommon`` times, shuffled; returns it and the common words."""
        pool = pool if n_words <= len(pool) else LARGE_POOL
        words = [pool[int(i)] for i in rng.choice(len(pool), size=n_words, replace=False)]
        frequent = words[: self.num_cw]
        entries = frequent * common + words[self.num_cw:] * uncommon
        entries = [entries[int(i)] for i in rng.permutation(len(entries))]
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), frequent

    def build(self, units: int, seed: Sequence[int], books=None, length: int = 4096) -> Built:
        (ex_words, ex_common, ex_uncommon), (common, uncommon) = self.repeats(length)
        template, prefix = CWE
        listed, answer = self.word_list(ex_words, ex_common, ex_uncommon, np.random.default_rng([*seed, 2]))
        example = template.format(context=listed) + prefix + " " + " ".join(f"{i + 1}. {w}"
                                                                             for i, w in enumerate(answer))
        # the list's draws depend on the unit count (RULER draws the sample anew), and on nothing else
        listed, answer = self.word_list(units, common, uncommon, np.random.default_rng([*seed, units]))
        return Built(example + "\n" + template.format(context=listed), prefix, answer)
