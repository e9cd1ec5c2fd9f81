"""What a task document is made of.

A training source returns a ``Document`` (token ids and which of them carry the loss). A text task first plans its
document as *parts*: plain strings, answers (``Target``, the only text that carries the loss) and haystack slots
(``Hay``, filled later to the drawn length).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNBOUNDED = 1 << 40  # synthetic sources have no end


@dataclass
class Document:
    """Token ids int64 [N] and, optionally, a bool [N] mask of the tokens that carry loss and a float32 [N] weight
    of each token's loss (None: 1 for every token; ``data.mix_answer_end_weight``)."""

    ids: np.ndarray
    loss_mask: np.ndarray | None = None
    loss_weight: np.ndarray | None = None



@dataclass(frozen=True)
class Target:
    """An answer: text that carries the loss. ``end``: the character that ends an answer (``answer_end``), whose
    loss a source may weight apart (``data.mix_answer_end_weight``)."""

    text: str
    end: bool = False

    def __repr__(self) -> str:  # as before ``end`` existed unless it is set (tests/test_tasks_digests.py hashes it)
        return f"Target(text={self.text!r}" + (", end=True)" if self.end else ")")


@dataclass(frozen=True)
class Hay:
    """A slot of haystack; a document's haystack characters are split among its slots by ``weight``."""

    weight: float = 1.0


def encode(tokenizer, text: str, add_bos: bool, add_eos: bool) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


ANSWER_ENDS = (False, True, "period")  # the values of data.mix_answer_ends


def answer_end(answer: str, after: str, ends: bool | str) -> list:
    """An answer and the text after it, as parts. Without ``ends``, nothing trains the step after an answer's last
    token, so a model that copies a five-digit value has never learned to stop there and runs on into more digits
    ("33543" -> "3354359"; values have one to nine digits). With ``ends=True`` the first character after the
    answer ("." or a line break) carries the loss too; the line break then becomes a likely token wherever the
    model is unsure of the answer. With ``ends="period"`` the answer is always followed by ".", which carries the
    loss, and then by the rest of ``after`` with its own "." dropped (".\n" and "\n" both give ".\n")."""
    if ends not in ANSWER_ENDS:
        raise ValueError(f"answer ends={ends!r}: use one of {', '.join(map(repr, ANSWER_ENDS))}.")
    if ends == "period":
        return [Target(answer), Target(".", end=True), after.removeprefix(".")]
    if not ends:
        return [Target(answer), after]
    return [Target(answer), Target(after[:1], end=True), after[1:]]
