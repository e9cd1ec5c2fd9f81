"""Dictionary lookup: the evaluation's dictionary format, FoT's token-id lookup documents and the synthetic mix's
lookup in words.

The evaluation (eval/lookup.py) shows a dictionary of ``key K value V`` lines under ``LOOKUP_HEADER`` and asks for
values by repeating a line up to its value; that header and line format are held out of training
(``tasks.heldout``). ``SyntheticLookup`` is the same task as token ids, with no tokenizer; ``lookup_parts`` is
the synthetic mix's version in words, in many headers, line formats and questions, none of them the evaluation's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tasks.document import UNBOUNDED, Document, Hay, answer_end
from tasks.words import choose, fill, value

# ----------------------------------------------------------------------------- the evaluation's format (eval/lookup.py)
LOOKUP_HEADER = "Below is a dictionary. Each line gives a key and its value. Remember every value."


def lookup_line(key: int, value: int) -> str:
    return f"key {key} value {value}"


def lookup_query(key: int) -> str:
    """What follows the dictionary for one query: the definition's line up to its value."""
    return f"\nkey {key} value"


# ----------------------------------------------------------------------------- token-id documents
class SyntheticLookup:
    """The FoT dictionary-lookup format as token ids: no files, no tokenizer.

    A document is BOS followed by items. A definition is ``<k> key <v> value`` with a fresh random key; a query
    is ``<q> key <v> value`` repeating an earlier definition, chosen uniformly among all earlier ones, so its
    value can only be predicted by looking back up to the whole document (long-range dependencies across
    windows). Ids: 0 pad, 1 BOS, 2 EOS, 3 ``<k>``, 4 ``<v>``, 5 ``<q>``, 6 ... vocab_size - 1 payload.
    With ``answers_only`` only the values of queries carry loss (the paper's setup).
    """

    K, V, Q, FIRST = 3, 4, 5, 6

    def __init__(self, vocab_size: int, doc_tokens: int, key_tokens: int, value_tokens: int, query_prob: float,
                 answers_only: bool, seed: int):
        if vocab_size <= self.FIRST + 1:
            raise ValueError(f"the synthetic lookup source needs vocab_size > {self.FIRST + 1}, got {vocab_size}.")
        self.vocab_size, self.doc_tokens = vocab_size, doc_tokens
        self.key_tokens, self.value_tokens = key_tokens, value_tokens
        self.query_prob, self.answers_only, self.seed = query_prob, answers_only, seed

    def __len__(self) -> int:
        return UNBOUNDED

    def get(self, epoch: int, index: int) -> Document:
        rng = np.random.default_rng([self.seed, epoch, index, 17])
        ids, mask = [np.array([1])], [np.zeros(1, bool)]
        defined: list[tuple[np.ndarray, np.ndarray]] = []
        total = 1
        while total < self.doc_tokens:
            if len(defined) >= 4 and rng.random() < self.query_prob:
                key, value = defined[rng.integers(len(defined))]
                marker, answer = self.Q, True
            else:
                key = rng.integers(self.FIRST, self.vocab_size, self.key_tokens)
                value = rng.integers(self.FIRST, self.vocab_size, self.value_tokens)
                defined.append((key, value))
                marker, answer = self.K, False
            ids.append(np.concatenate([[marker], key, [self.V], value]))
            item_mask = np.zeros(len(ids[-1]), bool)
            if answer:
                item_mask[-self.value_tokens:] = True
            mask.append(item_mask)
            total += len(ids[-1])
        ids_N = np.concatenate(ids).astype(np.int64)[: self.doc_tokens]  # exactly doc_tokens tokens
        return Document(ids_N, np.concatenate(mask)[: self.doc_tokens] if self.answers_only else None)


# ----------------------------------------------------------------------------- in words (the synthetic mix)
LOOKUP_HEADERS = (
    "Here is a table of entries.", "The following list pairs each item with its value.", "Glossary:",
    "Inventory of codes:", "Index of items and their values:", "A list to memorise:",
    "Records follow, one per line.", "Lookup table (item on the left, value on the right):", "Directory:",
    "Reference list:", "Catalogue of items:", "",
)
LOOKUP_LINES = (
    "{k}: {v}", "{k} -> {v}", "{k} = {v}", "{k} maps to {v}", "{k} | {v}", "entry {k} has value {v}",
    "{k} is {v}", "{k} => {v}", "item {k} holds {v}", "{k} (value {v})", "{k} ... {v}", "* {k}: {v}",
)
LOOKUP_QUERY_INTROS = (
    "Queries:", "Now look up some items.", "Answer from the table above.", "Lookups:", "Use the list to fill in:",
    "Check these entries:", "", "Some questions about the table.", "Retrieve the values.", "Look back and complete:",
)
LOOKUP_QUESTIONS = (
    "What is the value of {k}? It is", "Look up {k}:", "{k}?", "Value for {k}:", "Find {k} in the table. It is",
    "The entry for {k} is", "Query {k} ->", "According to the list, {k} has", "{k} was listed with",
    "Which value goes with {k}? Answer:",
)


LOOKUP_VALUE_KINDS = ("number", "number", "word", "code")  # drawn per dictionary: numbers half the time


LOOKUP_KEY_KINDS = ("number", "word", "code", "pair", "name")


def lookup_parts(rng: np.random.Generator, budget: int, value_kinds: Sequence[str] = LOOKUP_VALUE_KINDS,
                 key_kinds: Sequence[str] = LOOKUP_KEY_KINDS, answer_ends: bool | str = False) -> list:
    """A dictionary of items in one line format, haystack, then queries about some of them. The keys of one
    dictionary are all of one kind, drawn uniformly from ``key_kinds``. ``answer_ends``: each answer's line break
    is part of the answer; with "period" each answer is followed by "." (then its line break), and the "." is part
    of it (``answer_end``)."""
    line_format = choose(rng, LOOKUP_LINES)
    key_kinds = (choose(rng, tuple(key_kinds)),)
    value_kinds = (choose(rng, tuple(value_kinds)),)
    n_items = int(rng.integers(2, max(3, budget // 22)))
    keys: list[str] = []
    for _ in range(n_items * 3):
        k = value(rng, key_kinds)
        if k not in keys:
            keys.append(k)
        if len(keys) == n_items:
            break
    vals = [value(rng, value_kinds) for _ in keys]
    parts: list = []
    header = choose(rng, LOOKUP_HEADERS)
    if header:
        parts.append(header + "\n")
    parts += ["\n".join(fill(line_format, k=k, v=v) for k, v in zip(keys, vals)), "\n"]
    parts += [Hay(), "\n"]
    intro = choose(rng, LOOKUP_QUERY_INTROS)
    if intro:
        parts.append(intro + "\n")
    repeat_line = rng.random() < 0.5
    stem = line_format.split("{v}")[0].rstrip()
    for i in rng.permutation(len(keys))[: int(rng.integers(1, min(8, len(keys)) + 1))]:
        pattern = stem if repeat_line else choose(rng, LOOKUP_QUESTIONS)
        parts += [fill(pattern, k=keys[i]), *answer_end(" " + vals[i], "\n", answer_ends)]
    return parts
