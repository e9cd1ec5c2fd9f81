"""Dictionary lookup: the evaluation's dictionary format and FoT's token-id lookup documents for training.

The evaluation (eval/lookup.py) shows a dictionary of ``key K value V`` lines under ``LOOKUP_HEADER`` and asks for
values by repeating a line up to its value; that header and line format are held out of training
(``tasks.heldout``). ``SyntheticLookup`` is the same task as token ids, with no tokenizer.
"""

from __future__ import annotations

import numpy as np

from tasks.document import UNBOUNDED, Document

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
