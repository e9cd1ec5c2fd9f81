"""Synthetic long-range tasks in varied surface forms, over natural book text as the haystack.

A document of the ``synthetic_mix`` source is one of these families, drawn per document with the mixture weights
(each family's phrasings live in its own module: tasks/recall.py, tasks/lookup.py, tasks/copying.py; haystacks in
tasks/books.py and tasks/records.py):

* ``recall``: key-value recall. A named value ("the harbour gate code is 6013", "Locker of Amos: K7-QX") sits
  somewhere in a haystack among distractor lines that name other values; at the end, questions ask for some of
  them. Keys are numbers of 1 to 9 digits, words, codes, names and word pairs; key lines, questions and intros each
  come in many phrasings. Some haystacks are one short passage repeated, like a repeated filler, or generated
  records dense with numbers (``data.mix_haystacks``).
* ``lookup``: dictionary lookup, FoT's task in words. A header, many ``key : value`` lines in one of many line
  formats, haystack, then queries that either repeat the line up to the value or ask in words.
* ``copy``: a span (a book sentence, a digit or code sequence, a list of words) between one of many marker pairs,
  haystack, then an instruction and the opening marker: the span and the closing marker are the answer.
* ``repeat``: a span (words, digits, codes or a book sentence) that recurs two to four times in a haystack; every
  recurrence carries the loss. It is the densest signal for the copy-what-followed-before (induction) mechanism
  that the other families' answers rely on: a question's answer stem repeats its key line up to the value.
* ``books``: a plain book excerpt with the loss on every token (natural text only).

The loss of a task document falls only on its answers (their tokens carry ``loss_mask``): the haystack, keys and
questions never do, unless ``data.mix_loss`` is "all" (every token). Answers come after the haystack, so the key
is usually in an earlier window than the answer and only the memory layers can reach it.

Held out. The haystack is text of the training books only (``assets/books/train.parquet``); lines of the books that
hold an evaluation string are removed when they are loaded. No template here uses the passkey evaluation's key
line, filler, question or answer stem ("The pass key is", "The secret code is", ...), nor the lookup evaluation's
header or line format: ``tasks.heldout`` lists them from the registered templates (so a new evaluation template is
covered without an edit here), and every generated document is checked against it before it is returned.

Lengths. A document is planned in tokens: its fixed text (lines, questions, answers) is tokenized, and the rest of
the drawn length is haystack, converted to characters with the books' measured characters per token; a document
that comes out longer than ``doc_tokens`` gets a shorter haystack.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tasks.books import BookHaystack
from tasks.copying import copy_parts, repeat_parts
from tasks.document import Document, Hay, Target
from tasks.heldout import Scanner
from tasks.lookup import LOOKUP_KEY_KINDS, LOOKUP_VALUE_KINDS, lookup_parts
from tasks.recall import recall_parts
from tasks.records import records
from tasks.words import VALUE_KINDS

FAMILIES = ("recall", "lookup", "copy", "repeat", "books")


# ----------------------------------------------------------------------------- haystack styles
# The haystack of one document: a book passage, one short passage repeated (like a repeated filler), generated
# records dense with numbers (other numbers to look past when the key is one) or tallies (records of which half
# the lines give a named quantity a number, the way a key line does: other "the <name> is <number>" to look past).
# One uniform draw against the cumulative weights in this order, so the default weights draw exactly as documents
# always have, and adding a style at the end changes no earlier config's draws.
HAYSTACK_STYLES = ("repeated", "books", "records", "tallies")
# The generated styles, with the share of tally lines among their record lines (tasks.records.records).
GENERATED_STYLES = {"records": 0.0, "tallies": 0.5}
DEFAULT_HAYSTACKS = {"repeated": 0.25, "books": 0.75}


def haystack_style(rng: np.random.Generator, weights: dict[str, float] = DEFAULT_HAYSTACKS) -> str:
    u, total, acc = rng.random(), sum(weights.values()), 0.0
    styles = [s for s in HAYSTACK_STYLES if weights.get(s, 0) > 0]
    for style in styles:
        acc += weights[style] / total
        if u < acc:
            return style
    return styles[-1]  # u within rounding of 1


def books_parts(rng: np.random.Generator, budget: int) -> list:
    """A plain book excerpt; the whole document carries the loss."""
    return [Hay()]


# ----------------------------------------------------------------------------- documents
class SyntheticMix:
    """Documents of the synthetic task families over the book haystack, as token ids with a loss mask.

    Document ``index`` of ``epoch`` draws its family from ``weights`` and its length uniformly from
    ``[min_tokens, doc_tokens]`` (BOS and EOS included; ``min_tokens`` defaults to 3/4 of ``doc_tokens``, so a
    pack of k windows is mostly text, not padding); everything about it is a function of
    ``(seed, epoch, index)``. Task documents carry the loss on their answers only; ``books`` documents on every
    token.
    """

    def __init__(self, tokenizer, haystack: BookHaystack, doc_tokens: int, weights: dict[str, float], seed: int,
                 min_tokens: int | None = None, add_bos: bool = True, add_eos: bool = True,
                 scanner: Scanner | None = None, loss_on: str = "answers", value_kinds: Sequence[str] | None = None,
                 max_keys: int = 4, lookup_keys: Sequence[str] | None = None,
                 haystacks: dict[str, float] | None = None, mentions: float = 0.0, named_intros: float = 0.0,
                 short_recall: float = 0.0, short_recall_tokens: Sequence[int] = (96, 256),
                 answer_ends: bool | str = False, answer_end_weight: float = 1.0):
        if not 0.0 <= short_recall <= 1.0:
            raise ValueError(f"data.mix_short_recall={short_recall}: a probability per recall document, in [0, 1].")
        span = tuple(int(t) for t in short_recall_tokens)
        if short_recall > 0 and not (len(span) == 2 and 32 <= span[0] <= span[1] <= doc_tokens):
            raise ValueError(f"data.mix_short_recall_tokens={list(span)}: give [lo, hi] with "
                             f"32 <= lo <= hi <= data.synthetic_doc_tokens ({doc_tokens}).")
        self.short_recall, self.short_recall_tokens = short_recall, span
        if not 0.0 <= mentions <= 1.0:
            raise ValueError(f"data.mix_mentions={mentions}: a probability per recall key, in [0, 1].")
        if not 0.0 <= named_intros <= 1.0:
            raise ValueError(f"data.mix_named_intros={named_intros}: a probability per recall document, in [0, 1].")
        self.mentions, self.named_intros = mentions, named_intros
        self.answer_ends = answer_ends
        if not 0.0 <= answer_end_weight <= 1.0:
            raise ValueError(f"data.mix_answer_end_weight={answer_end_weight}: the end token's loss weight, in [0, 1].")
        self.answer_end_weight = float(answer_end_weight)
        haystacks = DEFAULT_HAYSTACKS if haystacks is None else dict(haystacks)
        unknown = sorted(set(haystacks) - set(HAYSTACK_STYLES))
        if unknown or not haystacks or min(haystacks.values()) < 0 or sum(haystacks.values()) <= 0:
            raise ValueError(f"data.mix_haystacks={haystacks}: give non-negative weights, not all zero, for styles "
                             f"among {', '.join(HAYSTACK_STYLES)}" + (f" ({unknown} unknown)." if unknown else "."))
        self.haystacks = haystacks
        if loss_on not in ("answers", "all"):
            raise ValueError(f"data.mix_loss={loss_on!r}: use 'answers' or 'all'.")
        self.loss_on = loss_on
        bad = sorted(set(value_kinds or ()) - set(VALUE_KINDS))
        if bad or (value_kinds is not None and not value_kinds):
            raise ValueError(f"data.mix_values={value_kinds}: list one or more of {', '.join(VALUE_KINDS)}.")
        self.value_kinds = tuple(value_kinds) if value_kinds else None
        bad = sorted(set(lookup_keys or ()) - set(LOOKUP_KEY_KINDS))
        if bad or (lookup_keys is not None and not lookup_keys):
            raise ValueError(f"data.mix_lookup_keys={lookup_keys}: list one or more of {', '.join(LOOKUP_KEY_KINDS)} "
                             "(repeat a kind to weight it).")
        self.lookup_keys = tuple(lookup_keys) if lookup_keys else LOOKUP_KEY_KINDS
        if max_keys < 1:
            raise ValueError(f"data.mix_max_keys={max_keys}: a recall document holds at least one key.")
        self.max_keys = max_keys
        unknown = sorted(set(weights) - set(FAMILIES))
        if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"data.mix={weights}: give non-negative weights, not all zero, for families among "
                             f"{', '.join(FAMILIES)}" + (f" ({unknown} unknown)." if unknown else "."))
        if doc_tokens < 32:
            raise ValueError(f"synthetic_mix documents need at least 32 tokens, got data.synthetic_doc_tokens="
                             f"{doc_tokens}.")
        digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
        if any(i is None or i == getattr(tokenizer, "unk_token_id", None) for i in digits):
            raise ValueError("synthetic_mix needs a tokenizer with one piece per digit (sentencepiece "
                             "split_digits=True: python -m train.synthetic tokenizer).")
        self.tokenizer, self.haystack, self.seed = tokenizer, haystack, seed
        self.doc_tokens = doc_tokens
        self.min_tokens = max(16, min(min_tokens or doc_tokens * 3 // 4, doc_tokens))
        self.families = [f for f in FAMILIES if weights.get(f, 0) > 0]
        probs = np.array([weights[f] for f in self.families], np.float64)
        self.probs = probs / probs.sum()
        self.add_bos, self.add_eos = add_bos, add_eos
        self.scanner = scanner or Scanner()
        sample = " ".join(haystack.passage(4000, np.random.default_rng([seed, i])) for i in range(8))
        self.chars_per_token = len(sample) / max(1, len(self._ids(sample)))

    def __len__(self) -> int:
        return 1 << 40  # unbounded

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def parts(self, family: str, rng: np.random.Generator, budget: int) -> list:
        if family == "recall":
            return recall_parts(rng, budget, self.value_kinds or tuple(VALUE_KINDS), self.max_keys, self.mentions,
                                self.named_intros, self.answer_ends)
        if family == "lookup":
            return lookup_parts(rng, budget, self.value_kinds or LOOKUP_VALUE_KINDS, self.lookup_keys,
                                self.answer_ends)
        if family == "copy":
            return copy_parts(rng, budget, self.haystack)
        if family == "repeat":
            return repeat_parts(rng, budget, self.haystack)
        return books_parts(rng, budget)

    def render(self, parts: list, hay_chars: int, rng: np.random.Generator,
               family: str = "recall") -> tuple[str, list[tuple[int, int]]]:
        """The document's text and the character ranges of its answers. A ``books`` document stays book text
        when the style drawn is ``records`` or ``tallies``."""
        total = sum(p.weight for p in parts if isinstance(p, Hay)) or 1.0
        style = haystack_style(rng, self.haystacks)
        if family == "books" and style in GENERATED_STYLES:
            style = "books"
        pieces, targets, at = [], [], 0
        for p in parts:
            if isinstance(p, Hay):
                n = int(hay_chars * p.weight / total)
                if n > 0 and style == "repeated":
                    text = self.haystack.repeated(n, rng)
                elif n > 0 and style in GENERATED_STYLES:
                    text = records(n, rng, tallies=GENERATED_STYLES[style])
                else:
                    text = self.haystack.passage(n, rng)
            elif isinstance(p, Target):
                text = p.text
                targets.append((at, at + len(text), p.end))
            else:
                text = p
            pieces.append(text)
            at += len(text)
        text = "".join(pieces)
        lead = len(text) - len(text.lstrip())  # an empty first haystack leaves a separator in front: drop it
        return text[lead:], [(a - lead, b - lead, end) for a, b, end in targets]

    def encode(self, text: str, targets: list[tuple[int, int, bool]], everything: bool):
        """(ids, loss mask, loss weights or None): a token carries the loss when it overlaps an answer; with
        ``answer_end_weight`` < 1, a token that overlaps only answer ends weighs that much."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        hit = [[end for a, b, end in targets if s < b and a < e] for s, e in offsets]
        mask = [everything or bool(h) for h in hit]
        ends_only = [bool(h) and all(h) for h in hit]
        if self.add_bos and self.tokenizer.bos_token_id is not None:
            ids, mask, ends_only = [self.tokenizer.bos_token_id] + ids, [False] + mask, [False] + ends_only
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            ids, mask, ends_only = ids + [self.tokenizer.eos_token_id], mask + [everything], ends_only + [False]
        weight = None
        if self.answer_end_weight != 1.0 and any(ends_only):
            weight = np.where(ends_only, self.answer_end_weight, 1.0).astype(np.float32)
        return np.asarray(ids, np.int64), np.asarray(mask, bool), weight

    def sample(self, epoch: int, index: int):
        """(family, text, ids int64 [N], loss mask bool [N]) of one document."""
        return self._draw(epoch, index)[:4]

    def _draw(self, epoch: int, index: int):
        """``sample``'s document and its loss weights (float32 [N], or None when every token weighs 1)."""
        rng = np.random.default_rng([self.seed, epoch, index, 41])
        family = self.families[int(rng.choice(len(self.families), p=self.probs))]
        tokens = int(rng.integers(self.min_tokens, self.doc_tokens + 1))
        # A short recall document: its opening line, key line and question share one or two windows (drawn only
        # when the option is on, so the documents of configs without it are unchanged).
        if family == "recall" and self.short_recall > 0 and rng.random() < self.short_recall:
            tokens = int(rng.integers(self.short_recall_tokens[0], self.short_recall_tokens[1] + 1))
        for _ in range(12):  # draws: a document too long even without haystack, or holding an evaluation string
            parts = self.parts(family, rng, tokens)
            fixed = "".join(p.text if isinstance(p, Target) else p for p in parts if not isinstance(p, Hay))
            n_fixed = len(self._ids(fixed)) + 2 if fixed else 2
            if n_fixed > self.doc_tokens:
                continue  # too many items for the longest document: draw again
            tokens = max(tokens, n_fixed)  # a short document with many keys grows to fit them
            hay_chars = int((tokens - n_fixed) * self.chars_per_token)
            for _ in range(4):  # the haystack's tokens per character vary: rescale it to the drawn length
                text, targets = self.render(parts, hay_chars, rng, family)
                ids, mask, weight = self.encode(text, targets, family == "books" or self.loss_on == "all")
                if hay_chars == 0 or 0.92 * tokens <= len(ids) <= self.doc_tokens:
                    break
                hay_chars = int(hay_chars * (tokens - n_fixed) / max(len(ids) - n_fixed, 1) * 0.98)
            if len(ids) <= self.doc_tokens and self.scanner.find(text) is None:
                return family, text, ids, mask, weight
        raise ValueError(f"no {family} document of at most {self.doc_tokens} tokens without an evaluation string in "
                         f"12 draws (epoch {epoch}, index {index}); raise data.synthetic_doc_tokens.")

    def get(self, epoch: int, index: int):
        _, _, ids, mask, weight = self._draw(epoch, index)
        return Document(ids, mask, weight)


def training_texts(haystack: BookHaystack, documents: int, seed: int) -> list[str]:
    """Texts to train a tokenizer on: book passages and the templates' text (keys, questions, markers)."""
    out = []
    for i in range(documents):
        rng = np.random.default_rng([seed, i, 43])
        out.append(haystack.passage(int(rng.integers(500, 4000)), rng))
        for family in ("recall", "lookup", "copy"):
            parts = {"recall": recall_parts, "lookup": lookup_parts}.get(family)
            parts = parts(rng, 128) if parts else copy_parts(rng, 128, haystack)
            out.append("".join(p.text if isinstance(p, Target) else p for p in parts if not isinstance(p, Hay)))
    return out


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The (start, end) of every run of True in ``mask``: a document's answers, as token ranges."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))
