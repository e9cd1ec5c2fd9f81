"""Copying: a span that recurs, the task that forms the copy-what-followed-before (induction) mechanism.

``SyntheticRepeat`` is the task as random token ids, with no tokenizer: one span recurs once at a drawn offset.
The synthetic mix's ``copy`` family marks a span to be copied at the end, and its ``repeat`` family repeats one two
to four times in a haystack.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.books import BookHaystack
from tasks.document import UNBOUNDED, Document, Hay, Target
from tasks.lookup import SyntheticLookup
from tasks.words import choose, code_value, fill, number_value, value

logger = logging.getLogger(__name__)


class SyntheticRepeat:
    """Random token ids in which one span recurs once: the task that forms a copying circuit (an induction head).

    A document is BOS and ``doc_tokens - 1`` random ids; a span of ``span_tokens`` ids (drawn from that range)
    is written at a random start and again ``offset`` tokens later, with ``offset = min_offset + U[0, J]`` and
    the jitter J drawn per document from ``jitters``. With J = 0 the copy is always the same distance back, which
    a model learns by position alone; the larger J, the more only the content (the token before) can say where
    the copy comes from. Drawing J per document from a list mixes easy and hard documents in every batch. With
    ``answers_only`` only the recurrence after its first token carries loss (the only predictable tokens).
    Ids: 0 pad, 1 BOS, 2 EOS, 3-5 unused (the lookup kind's markers), 6 ... vocab_size - 1 payload.

    With ``gate`` the jitters are levels instead, taken in order: every document uses the current level, and
    ``after_step(loss)`` moves to the next once the mean training loss of the last ``gate_steps`` steps is below
    ``gate``. Measured on the demo architecture (train/README.md, "The demo model"), this curriculum forms the
    content-based copy in about 1,250 steps where drawing J per document had not started to in 850. A level
    holds from the first document index requested after it was reached, and those starts are the source's
    ``state_dict()``, so a resumed run regenerates exactly the documents it would have seen.
    """

    FIRST = SyntheticLookup.FIRST

    def __init__(self, vocab_size: int, doc_tokens: int, span_tokens: tuple[int, int], min_offset: int,
                 jitters: list[int], answers_only: bool, seed: int, gate: float | None = None, gate_steps: int = 25):
        lo, hi = span_tokens
        if vocab_size <= self.FIRST + 1:
            raise ValueError(f"the synthetic repeat source needs vocab_size > {self.FIRST + 1}, got {vocab_size}.")
        if not 1 <= lo <= hi or min_offset < hi or not jitters or min(jitters) < 0:
            raise ValueError(f"synthetic repeat: need 1 <= span {lo} <= {hi} <= min offset {min_offset} and "
                             f"jitters >= 0, got jitters {jitters}.")
        if 1 + min_offset + max(jitters) + hi > doc_tokens:
            raise ValueError(f"synthetic repeat: a document of {doc_tokens} tokens cannot hold a span of {hi} "
                             f"recurring {min_offset} + {max(jitters)} tokens later; lower the offset or jitters, "
                             "or raise data.synthetic_doc_tokens.")
        self.vocab_size, self.doc_tokens, self.span_tokens = vocab_size, doc_tokens, (lo, hi)
        self.min_offset, self.jitters = min_offset, list(jitters)
        self.answers_only, self.seed = answers_only, seed
        self.gate, self.gate_steps = gate, gate_steps
        self.level_starts = [0]  # document index from which each reached level holds
        self.recent: list[float] = []
        self.requested = -1  # the highest document index handed out

    def __len__(self) -> int:
        return UNBOUNDED

    def state_dict(self) -> dict:
        return {"level_starts": list(self.level_starts), "recent": list(self.recent), "requested": self.requested}

    def load_state_dict(self, state: dict) -> None:
        self.level_starts, self.recent = list(state["level_starts"]), list(state["recent"])
        self.requested = state["requested"]

    def after_step(self, loss: float) -> None:
        """Gate the curriculum on the step's (all-reduced) training loss; nothing without ``gate``."""
        if self.gate is None or len(self.level_starts) == len(self.jitters):
            return
        self.recent = (self.recent + [loss])[-self.gate_steps :]
        if len(self.recent) == self.gate_steps and sum(self.recent) / self.gate_steps < self.gate:
            self.level_starts.append(self.requested + 1)
            self.recent = []
            level = len(self.level_starts) - 1
            logger.info("repeat: the mean loss of %d steps fell below %g; jitter level %d (J = %d) from document %d",
                        self.gate_steps, self.gate, level, self.jitters[level], self.requested + 1)

    def jitter(self, index: int, rng: np.random.Generator) -> int:
        if self.gate is None:
            return self.jitters[rng.integers(len(self.jitters))]
        return self.jitters[sum(1 for start in self.level_starts if start <= index) - 1]

    def get(self, epoch: int, index: int) -> Document:
        self.requested = max(self.requested, index)
        rng = np.random.default_rng([self.seed, epoch, index, 31])
        ids = rng.integers(self.FIRST, self.vocab_size, self.doc_tokens)
        ids[0] = 1
        length = int(rng.integers(self.span_tokens[0], self.span_tokens[1] + 1))
        offset = self.min_offset + int(rng.integers(0, self.jitter(index, rng) + 1))
        start = int(rng.integers(1, self.doc_tokens - offset - length + 1))
        ids[start + offset : start + offset + length] = ids[start : start + length]
        if not self.answers_only:
            return Document(ids.astype(np.int64))
        mask = np.zeros(self.doc_tokens, bool)
        mask[start + offset + 1 : start + offset + length] = True
        return Document(ids.astype(np.int64), mask)


# ----------------------------------------------------------------------------- in words (the synthetic mix)
COPY_MARKERS = (
    ("<<", ">>"), ("[[", "]]"), ("BEGIN", "END"), ("{{", "}}"), ("<quote>", "</quote>"), ("### start", "### end"),
    ("(*", "*)"), ("START>", "<STOP"), ("--- begin copy ---", "--- end copy ---"), ("|>", "<|"), ("@@", "@@"),
    ("%%", "%%"),
)
COPY_INTROS = (
    "", "", "Part of this text is marked. You will have to copy it later.",
    "Notice the marked passage below.", "One passage is set off by markers; keep it in mind.",
    "A marked fragment appears below.",
)
COPY_ASKS = (
    "Repeat the marked passage:", "Copy the text between {open} and {close}:", "The marked passage was:",
    "Now write out the marked text exactly.", "Reproduce it:", "Quote the marked fragment word for word:",
    "What did the marker enclose?", "Copy it here:", "Write the marked part again:", "Recite the passage:",
)


def copy_span(rng: np.random.Generator, hay: BookHaystack) -> str:
    kind = int(rng.integers(4))
    if kind == 0:
        return hay.passage(int(rng.integers(30, 160)), rng)
    if kind == 1:
        return " ".join(number_value(rng) for _ in range(int(rng.integers(2, 6))))
    if kind == 2:
        return " ".join(code_value(rng) for _ in range(int(rng.integers(2, 5))))
    return " ".join(value(rng, ("word", "pair", "name")) for _ in range(int(rng.integers(3, 9))))


def copy_parts(rng: np.random.Generator, budget: int, hay: BookHaystack) -> list:
    """A marked span inside the haystack; at the end, an instruction, the opening marker, then the span."""
    open_, close = choose(rng, COPY_MARKERS)
    span = copy_span(rng, hay)
    parts: list = []
    intro = choose(rng, COPY_INTROS)
    if intro:
        parts.append(intro + "\n")
    depth = float(rng.random())
    parts += [Hay(depth), " ", f"{open_} {span} {close}", " ", Hay(1.0 - depth), "\n"]
    parts += [fill(choose(rng, COPY_ASKS), open=open_, close=close), "\n", open_, Target(f" {span} {close}"), "\n"]
    return parts


def repeat_parts(rng: np.random.Generator, budget: int, hay: BookHaystack) -> list:
    """A span that recurs two to four times, separated by haystack; the loss is on every recurrence."""
    span = copy_span(rng, hay)
    times = int(rng.integers(2, 5))
    cuts = np.diff(np.concatenate([[0.0], np.sort(rng.random(times)), [1.0]]))
    parts: list = [Hay(float(cuts[0])), " "]
    for i in range(times):
        parts += [Target(span) if i else span, " ", Hay(float(cuts[i + 1])), " "]
    return parts
