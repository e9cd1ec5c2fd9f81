"""RULER's needle-in-a-haystack family (``scripts/data/synthetic/niah.py``), rewritten for fot.

A needle reads "One of the special magic {numbers|uuids|words} for {key} is: {value}."; keys are adjective-noun
pairs (tasks/ruler_words.py stands in for RULER's wonderwords lists), number values have 7 digits. The
needles are shuffled, then placed at distinct depths drawn from RULER's 40 (tasks/ruler_prompt.py). Haystacks:

- ``noise``: RULER's noise paragraph (the Landmark filler) repeated, one paragraph a line; a unit is a paragraph.
- ``needle``: distractor needles with other random keys and values, one a line; a unit is a needle.
- ``essay``: the held-out books (tasks/ruler_books.py) in place of RULER's Paul Graham essays, cut into
  sentences, the needles set between sentences; a unit is a word.

With several keys (multi-key) one key or more is asked (``num_q``); with several values (multi-value) all the
key's values are the answer. The answers are the asked keys' values in the order asked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tasks.ruler_books import BookHaystack
from tasks.ruler_prompt import NEEDLE, NIAH_MANY, NIAH_ONE, NOISE, Built, insert_at_depths, pick_depths
from tasks.ruler_words import KEY_WORDS

HAYSTACKS = ("noise", "needle", "essay")
KINDS = {"numbers": "number", "uuids": "uuid", "words": "key"}  # value type -> the read score's item kind


@dataclass(frozen=True)
class Niah:
    """One needle task's configuration, RULER's ``synthetic.yaml`` arguments."""

    haystack: str = "noise"  # noise, needle or essay
    key_type: str = "words"  # words or uuids
    value_type: str = "numbers"  # numbers, uuids or words
    num_k: int = 1  # needles with distinct keys
    num_v: int = 1  # values per key
    num_q: int = 1  # keys asked

    def __post_init__(self):
        assert self.haystack in HAYSTACKS and {self.key_type, self.value_type} <= set(KINDS), self
        assert 1 <= self.num_q <= self.num_k and self.num_v >= 1, self

    @property
    def kind(self) -> str:
        return KINDS[self.value_type]

    def build(self, units: int, seed: Sequence[int], books: BookHaystack | None = None) -> Built:
        """The prompt with ``units`` haystack units; the same ``seed`` gives the same needles, keys, depths and
        haystack start for every unit count."""
        rng = np.random.default_rng(list(seed))
        keys: list[str] = []
        while len(keys) < self.num_k:
            key = random_value(self.key_type, rng)
            if key not in keys:
                keys.append(key)
        values = [[random_value(self.value_type, rng) for _ in range(self.num_v)] for _ in keys]
        needles = [NEEDLE.format(kind=self.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        needles = [needles[i] for i in rng.permutation(len(needles))]
        asked = [int(i) for i in rng.choice(self.num_k, size=self.num_q, replace=False)]
        depths = pick_depths(rng, len(needles))
        context = self._context(units, needles, depths, keys, np.random.default_rng([*seed, 1]), books)

        query = keys[asked[0]] if len(asked) == 1 else ", ".join(keys[i] for i in asked[:-1]) + \
            ", and " + keys[asked[-1]]
        many = self.num_q * self.num_v > 1
        template, prefix = NIAH_MANY if many else NIAH_ONE
        kind = self.value_type if many else self.value_type[:-1]  # RULER drops the plural's "s"
        return Built(template.format(kind=kind, context=context, query=query), prefix.format(kind=kind, query=query),
                     [v for i in asked for v in values[i]], depths, needles)

    def _context(self, units: int, needles: list[str], depths: list[float], keys: list[str],
                 rng: np.random.Generator, books: BookHaystack | None) -> str:
        if self.haystack == "noise":
            return "\n".join(insert_at_depths([NOISE] * units, needles, depths))
        if self.haystack == "needle":
            distractors = []
            while len(distractors) < units:
                key = random_value(self.key_type, rng)
                value = random_value(self.value_type, rng)  # drawn even when the key is redrawn: stable prefixes
                if key not in keys:
                    distractors.append(NEEDLE.format(kind=self.value_type, key=key, value=value))
            return "\n".join(insert_at_depths(distractors, needles, depths))
        if books is None:
            raise ValueError("the essay haystack needs the held-out books (--books), or --haystack noise.")
        sentences = books.sentences(books.start(rng), units)
        return " ".join(insert_at_depths(sentences, needles, depths))


def random_value(kind: str, rng: np.random.Generator) -> str:
    """A random key or value: a 7-digit number, an adjective-noun word pair, or a version-4 UUID."""
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))
    if kind == "words":
        return KEY_WORDS[int(rng.integers(len(KEY_WORDS)))]
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
