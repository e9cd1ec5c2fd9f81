"""The scan that keeps evaluation strings out of training.

``eval_only_strings()`` lists what only the evaluations emit (held-out phrasings, generated haystacks, the lookup
header); ``forbidden_strings()`` adds what the plain passkey source trains on, for the synthetic mix, which must
contain no evaluation string at all. Both are read from the registered templates (``tasks.passkey``) and the lookup
format (``tasks.lookup``), so a new evaluation template is covered without an edit here. ``Scanner`` finds them in a
text; ``drop_lines`` removes the lines of a book that hold one.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from tasks.lookup import LOOKUP_HEADER, lookup_line
from tasks.passkey import LANDMARK_PHRASING, TEMPLATES, GeneratedFiller, RepeatedFiller
from tasks.passkey_probe import PROBE_TEMPLATES
from tasks.ruler_prompt import eval_strings as ruler_strings

MIN_FRAGMENT = 10  # shorter literal pieces ("the", "boxes of") are too common to prove a leak


def literal_fragments(pattern: str, min_chars: int = MIN_FRAGMENT) -> list[str]:
    """The literal text between a pattern's ``{fields}``, stripped, keeping pieces of ``min_chars`` or more."""
    pieces = (literal.strip() for literal, _, _, _ in string.Formatter().parse(pattern))
    return [p for p in pieces if len(p) >= min_chars]


def eval_only_strings() -> list[str]:
    """Distinctive strings that only the evaluations emit: training text must contain none of them.

    They are the held-out phrasings' task lines, questions and key-line fragments, the literal fragments of the
    generated haystacks' sentence patterns, the lookup header, and the RULER-style prompts' template pieces
    (``tasks.ruler_prompt.eval_strings``). The landmark phrasing and filler are not among them: the trainer's
    passkey documents use that format on purpose.
    """
    out: set[str] = {LOOKUP_HEADER, *ruler_strings()}
    for template in (*TEMPLATES.values(), *PROBE_TEMPLATES.values()):  # the probe is an evaluation too
        p, h = template.phrasing, template.haystack
        if p is not LANDMARK_PHRASING:
            out.update([p.intro, p.question, *literal_fragments(p.key_line)])
        if isinstance(h, GeneratedFiller):
            out.update(f for pattern in h.patterns for f in literal_fragments(pattern))
    return sorted(out)


def forbidden_strings() -> list[str]:
    """Every evaluation string that training text must not contain, matched case-insensitively.

    ``eval_only_strings()`` (the held-out phrasings, generated haystacks and the lookup header), plus what it
    leaves out on purpose because the plain passkey source trains on it: the landmark template's task line,
    question and key-line fragments, and the sentences of every repeated filler. Each phrasing's answer stem (the
    question's last sentence, "The pass key is") is added too, so the evaluated key names never appear.
    """
    out = set(eval_only_strings()) | {LOOKUP_HEADER}
    for template in (*TEMPLATES.values(), *PROBE_TEMPLATES.values()):  # the probe is an evaluation too
        p, h = template.phrasing, template.haystack
        out.update([p.intro, p.question, *literal_fragments(p.key_line)])
        out.add(re.split(r"(?<=[.?!])\s+", p.question)[-1])
        if isinstance(h, RepeatedFiller):
            out.update(s.strip() + "." for s in h.text.split(".") if s.strip())
        elif isinstance(h, GeneratedFiller):
            out.update(f for pattern in h.patterns for f in literal_fragments(pattern))
    return sorted(out)


def forbidden_patterns() -> list[re.Pattern]:
    """Regular expressions of the evaluations' line formats: the lookup line with any numbers in it."""
    line = re.escape(lookup_line(111, 222)).replace("111", r"\d+").replace("222", r"\d+")
    return [re.compile(line, re.IGNORECASE)]


class Scanner:
    """Finds evaluation strings and line formats in a text (case-insensitive)."""

    def __init__(self, strings: Sequence[str] | None = None, patterns: Sequence[re.Pattern] | None = None):
        strings = forbidden_strings() if strings is None else list(strings)
        self.strings = sorted({s.lower() for s in strings if s}, key=len, reverse=True)
        self.patterns = forbidden_patterns() if patterns is None else list(patterns)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Start and end of every match, sorted. Literal strings are found with ``str.find``: a regex alternation
        of them is several times slower on a whole book."""
        lower = text.lower()
        if len(lower) != len(text):  # a character whose lower case is longer: positions would shift
            lower = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
        out = []
        for s in self.strings:
            at = lower.find(s)
            while at >= 0:
                out.append((at, at + len(s)))
                at = lower.find(s, at + 1)
        out += [m.span() for p in self.patterns for m in p.finditer(text)]
        return sorted(out)

    def find(self, text: str) -> str | None:
        """The first evaluation string or line format in ``text``, or None."""
        spans = self.spans(text)
        return text[spans[0][0] : spans[0][1]] if spans else None


def drop_lines(text: str, scanner: Scanner) -> str:
    """``text`` without the lines that hold a match of ``scanner``."""
    keep, at = [], 0
    for match_start, match_end in scanner.spans(text):
        if match_start < at:
            continue
        start = text.rfind("\n", 0, match_start) + 1
        end = text.find("\n", match_end)
        end = len(text) if end < 0 else end + 1
        keep.append(text[at:start])
        at = end
    return "".join(keep) + text[at:]
