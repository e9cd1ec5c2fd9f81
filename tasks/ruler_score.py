"""Scoring of the RULER-style tasks: RULER's own metrics, and a score as a person reads the answer.

RULER (``scripts/eval/synthetic/constants.py``, ``scripts/eval/evaluate.py``) cleans a prediction (strip, every
control character made a newline, strip again), then scores it against its references, case-insensitively:

- ``string_match_all``: the fraction of the references contained anywhere in the prediction (partial credit: two
  of four values found scores 0.5). Used by every synthetic task.
- ``string_match_part``: 1 when any reference is contained in it. Used by RULER's QA tasks.

Containment is generous: a model that lists every number of the haystack scores full marks, and so does one that
gives the answer after three wrong ones. The *read* score asks what a person sees: the prediction's answer line
(its first line that names an item of the answers' kind) must name exactly the references, all of them and nothing
else of their kind (``read_correct``). The kind is the shape of the answers: numbers, UUIDs, capitalized
variable names (vt), words of the prompt's numbered list (cwe), adjective-noun keys; or ``text``, where the first
line must contain every reference (``all``) or be one of them (``part``). A numbered list goes on over the lines
that open with a number; its numbers ("1. ") are not items.
"""

from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ITEMS = {  # kind -> the pattern of one item of that kind in an answer's first line
    "number": re.compile(r"\d+"),
    "uuid": re.compile(_UUID, re.IGNORECASE),
    "var": re.compile(r"\b(?!VAR\b)[A-Z]{3,}\b"),
    "key": re.compile(r"[a-z]+(?:-[a-z]+)+", re.IGNORECASE),
    "word": re.compile(r"[a-z]+(?:-[a-z]+)*", re.IGNORECASE),
}
KINDS = (*ITEMS, "text")
_LISTED = re.compile(r"\d+\. (\S+)")
_ENUMERATOR = re.compile(r"(?:^|(?<=\s))\d{1,3}[.)](?=\s)")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, references: Sequence[str]) -> float:
    """One sample's ``string_match_all``: the fraction of ``references`` contained in ``prediction`` (any case)."""
    lower = prediction.lower()
    return sum(r.lower() in lower for r in references) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """One sample's ``string_match_part``: 1.0 when any reference is contained in ``prediction`` (any case)."""
    lower = prediction.lower()
    return float(any(r.lower() in lower for r in references))


METRICS = {"all": match_all, "part": match_part}


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all`` over samples: the mean of ``match_all``, in percent, rounded to 2 places."""
    return round(100 * sum(map(match_all, predictions, references)) / len(predictions), 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part`` over samples: the mean of ``match_part``, in percent, rounded to 2 places."""
    return round(100 * sum(map(match_part, predictions, references)) / len(predictions), 2)


def first_line(prediction: str) -> str:
    return postprocess(prediction).split("\n", 1)[0]


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def read_correct(prediction: str, references: Sequence[str], kind: str, metric: str = "all",
                 prompt: str = "") -> bool:
    """Whether a reader of the prediction's answer line gets exactly the references (module docstring).

    The answer line is the first line that names an item of the kind (a first line such as ":" or "are:" is passed
    over) with the numbered lines that follow it (a list), or for ``text`` the first line. List numbers ("1. ",
    "2) ") are not items. ``kind`` is one of ``KINDS``; ``word`` takes its candidate words from the
    numbered list in ``prompt``.
    """
    if kind == "text":
        line = first_line(prediction)
        if metric == "part":
            return _normal(line) in {_normal(r) for r in references}
        return all(re.search(rf"(?<!\w){re.escape(r.lower())}(?!\w)", line.lower()) for r in references)
    listed = {w.lower() for w in _LISTED.findall(prompt)} if kind == "word" else set()

    def named(line: str) -> list[str]:  # the items a line names, list numbering ("2. ", "3) ") left out
        return [i for i in ITEMS[kind].findall(_ENUMERATOR.sub(" ", line)) if kind != "word" or i.lower() in listed]

    lines = postprocess(prediction).split("\n")
    start = next((n for n, line in enumerate(lines) if named(line)), len(lines))
    items = named(lines[start]) if start < len(lines) else []
    for line in lines[start + 1:]:  # a numbered list goes on over the lines that open with a number
        if not _ENUMERATOR.match(line) or not named(line):
            break
        items += named(line)
    if kind in ("uuid", "key", "word"):
        return bool(items) and {i.lower() for i in items} == {r.lower() for r in references}
    return bool(items) and set(items) == set(references)


def infer_kind(references: Sequence[str], prompt: str = "") -> str:
    """The read score's kind for answers of unknown task (RULER's jsonl): the first kind every reference has the
    shape of; ``word`` when they are all entries of the prompt's numbered list."""
    def whole(kind: str) -> bool:
        return all(ITEMS[kind].fullmatch(r) for r in references)

    if references and whole("number"):
        return "number"
    if references and whole("uuid"):
        return "uuid"
    if references and whole("var"):
        return "var"
    listed = {w.lower() for w in _LISTED.findall(prompt)}
    if references and listed and all(r.lower() in listed for r in references):
        return "word"
    if references and whole("key"):
        return "key"
    return "text"
