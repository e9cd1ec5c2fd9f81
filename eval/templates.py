"""Every prompt string of the passkey and lookup evaluations, in one place.

A passkey *template* is a phrasing (task line, key line, question) over a haystack (the filler text). The
``landmark`` template is the LongLLaMA / Landmark Attention prompt, kept as the default so numbers stay
comparable with the papers; ``train/data.py`` generates that same format as training text on purpose. The other
templates are held out: their phrasings and their haystacks never appear in training, so they measure whether
retrieval generalizes beyond the trained format. ``eval_only_strings()`` lists their distinctive strings for a
leak check on training text.

Generated haystacks are sentences drawn from patterns and word lists with a seeded generator: varied, natural
enough, reproducible, and written for this project (nothing is copied from a corpus).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

DEFAULT_TEMPLATE = "landmark"
MIN_FRAGMENT = 10  # shorter literal pieces ("the", "boxes of") are too common to prove a leak


# ----------------------------------------------------------------------------- phrasings
@dataclass(frozen=True)
class Phrasing:
    """The three fixed lines of a passkey prompt; ``key_line`` holds ``{key}`` where the key goes."""

    name: str
    intro: str
    key_line: str
    question: str

    def key_text(self, key: int) -> str:
        return self.key_line.format(key=key)


LANDMARK_PHRASING = Phrasing(
    "landmark",
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
    "The pass key is {key}. Remember it. {key} is the pass key.",
    "What is the pass key? The pass key is",
)
CODE_PHRASING = Phrasing(
    "code",
    "A secret code is hidden somewhere in the long text below. Read all of it, because at the end you will be "
    "asked for the code.",
    "Attention: the secret code is {key}. Once more, the secret code is {key}.",
    "Now recall the secret code from the text. The secret code is",
)
NUMBER_PHRASING = Phrasing(
    "number",
    "These notes contain one special number among many ordinary lines. Memorize the special number; a question "
    "about it comes at the end.",
    "Write this down: the special number is {key}. Again, {key} is the special number.",
    "Which special number appeared in the notes? The special number is",
)


# ----------------------------------------------------------------------------- haystacks
def repeat_text(text: str, n_chars: int) -> str:
    """The first ``n_chars`` characters of ``text`` repeated and joined by spaces."""
    return " ".join([text] * (n_chars // (len(text) + 1) + 1))[:n_chars]


@dataclass(frozen=True)
class RepeatedFiller:
    """One passage repeated; prefix and suffix both start at its start (the Landmark protocol)."""

    name: str
    description: str
    text: str

    def spans(self, n_prefix: int, n_suffix: int, seed: int) -> tuple[str, str]:
        return repeat_text(self.text, n_prefix), repeat_text(self.text, n_suffix)

    def sample(self, n_chars: int) -> str:
        return repeat_text(self.text, n_chars)


def _integers(low: int, high: int) -> Callable[[np.random.Generator], str]:
    return lambda rng: str(int(rng.integers(low, high)))


@dataclass(frozen=True)
class GeneratedFiller:
    """Sentences drawn from ``patterns``, whose ``{slot}`` fields are filled from ``slots`` (a tuple of words
    or a function of the generator). Prefix and suffix are two independent streams of one trial's seed, so both
    start at a sentence, as the Landmark filler's do."""

    name: str
    description: str
    patterns: tuple[str, ...]
    slots: dict = field(default_factory=dict)

    def sentence(self, rng: np.random.Generator) -> str:
        pattern = self.patterns[int(rng.integers(len(self.patterns)))]
        values = {}
        for _, slot, _, _ in string.Formatter().parse(pattern):
            if slot and slot not in values:
                source = self.slots[slot]
                values[slot] = source(rng) if callable(source) else source[int(rng.integers(len(source)))]
        return pattern.format(**values)

    def stream(self, seed: Sequence[int], n_chars: int) -> str:
        """The first ``n_chars`` characters of the sentence stream of ``seed``; a longer request extends it."""
        rng, parts, size = np.random.default_rng(list(seed)), [], -1
        while size < n_chars:
            parts.append(self.sentence(rng))
            size += len(parts[-1]) + 1
        return " ".join(parts)[:n_chars]

    def spans(self, n_prefix: int, n_suffix: int, seed: int) -> tuple[str, str]:
        return self.stream([seed, 0], n_prefix), self.stream([seed, 1], n_suffix)

    def sample(self, n_chars: int) -> str:
        return self.stream([0], n_chars)


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_NAMES = ("Mara", "Tomas", "Ines", "Oskar", "Lena", "Pavel", "Ruth", "Emil", "Nadia", "Felix", "Greta", "Hugo")
_TOWNS = ("Alden", "Brickford", "Colewater", "Dunmere", "Eastwick", "Fernhill", "Greyport", "Hollins")
_COLORS = ("red", "green", "grey", "yellow", "brown", "white", "orange", "blue")
_FRUIT = ("apples", "pears", "plums", "cherries", "figs", "apricots", "quinces")

GRASS = RepeatedFiller(
    "grass", "the Landmark filler: five short sentences repeated",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
)
TOWN = GeneratedFiller(
    "town", "generated sentences about an invented small town",
    (
        "The {adj} {shop} on {street} Street opens at {hour} in the morning.",
        "{name} walks past the {place} every {weekday} on the way to work.",
        "One {color} {animal} often sleeps under the {tree} tree near the {water}.",
        "In {month} the {tree} trees along the {water} turn {color}.",
        "{name} sells {fruit} from a {color} cart beside the {place}.",
        "The bus to {town} leaves from the {place} twice an hour.",
        "Children fly {color} kites on the hill above the {water}.",
        "Nobody remembers who painted the {place} {color}, but {name} likes it.",
    ),
    dict(adj=("quiet", "old", "busy", "narrow", "bright", "small", "crowded", "tidy"),
         shop=("bakery", "bookshop", "pharmacy", "tailor", "hardware store", "flower shop", "cafe"),
         street=("Mill", "Church", "Station", "Harbour", "Orchard", "Bridge", "Elm", "Market"),
         place=("town hall", "library", "fountain", "old mill", "railway station", "school", "post office"),
         animal=("cat", "dog", "goat", "fox", "heron", "duck"), tree=("oak", "birch", "willow", "apple", "pine"),
         water=("river", "canal", "pond", "lake", "harbour"), hour=("six", "seven", "eight", "nine", "ten"),
         name=_NAMES, weekday=_WEEKDAYS, color=_COLORS, month=_MONTHS, fruit=_FRUIT, town=_TOWNS),
)
DIARY = GeneratedFiller(
    "diary", "generated diary entries with dates, times and small numbers",
    (
        "On {weekday}, {day} {month} {year}, it rained until {time}.",
        "Dear diary, {name} visited on {day} {month} and stayed for {small} days.",
        "The {time} train to {town} was {small} minutes late again today.",
        "By the end of {month} {year} the garden had {small} young {tree} trees.",
        "I wrote {small} letters to {name} before {weekday} and posted them all at once.",
        "{weekday} {day} {month}: the market opened late and closed early.",
        "It took {small} hours to walk from {town} to {town2} along the old road.",
    ),
    dict(day=_integers(1, 29), year=_integers(1950, 2020), small=_integers(2, 31),
         time=lambda rng: f"{int(rng.integers(5, 23)):02d}:{int(rng.integers(0, 60)):02d}",
         tree=("oak", "birch", "willow", "apple", "pine"), name=_NAMES, weekday=_WEEKDAYS, month=_MONTHS,
         town=_TOWNS, town2=_TOWNS),
)
LEDGER = GeneratedFiller(
    "ledger", "a generated inventory ledger full of other numbers (distractors for a numeric key)",
    (
        "Shelf {n3} in the back room holds {n2} boxes of {item}.",
        "Order {n4} for {n2} {item} was shipped to {town} on {day} {month}.",
        "Invoice {n4}: {n2} {item} at {n2b} coins each, paid in full.",
        "Stock check in row {n2}: {n3} {item} counted, {small} damaged.",
        "Crate {n3} of {item} weighs {n2} kilograms and waits at the loading dock.",
        "Returned to the supplier in {town}: {small} {item} from delivery {n4}.",
    ),
    dict(n2=_integers(10, 100), n2b=_integers(10, 100), n3=_integers(100, 1000), n4=_integers(1000, 10000),
         small=_integers(2, 10), day=_integers(1, 29), month=_MONTHS, town=_TOWNS,
         item=("copper bolts", "brass hinges", "wool blankets", "glass jars", "oak planks", "iron nails",
               "paper rolls", "clay pots", "candles", "rope coils")),
)


# ----------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """A phrasing over a haystack; ``render`` builds the five-line prompt (see eval/passkey.py)."""

    name: str
    description: str
    phrasing: Phrasing
    haystack: RepeatedFiller | GeneratedFiller

    def render(self, key: int, n_prefix: int, n_suffix: int, seed: int) -> str:
        """The prompt with ``n_prefix`` filler characters before the key line and ``n_suffix`` after it."""
        prefix, suffix = self.haystack.spans(n_prefix, n_suffix, seed)
        p = self.phrasing
        return "\n".join([p.intro, prefix, p.key_text(key), suffix, p.question])


TEMPLATES = {t.name: t for t in (
    Template("landmark", "the LongLLaMA / Landmark prompt (default; the format train/data.py trains on)",
             LANDMARK_PHRASING, GRASS),
    Template("landmark-town", "the landmark phrasing over generated small-town sentences (new haystack only)",
             LANDMARK_PHRASING, TOWN),
    Template("code-grass", "a 'secret code' phrasing over the landmark filler (new phrasing only)",
             CODE_PHRASING, GRASS),
    Template("code-diary", "the 'secret code' phrasing over generated diary entries with dates and times",
             CODE_PHRASING, DIARY),
    Template("number-ledger", "a 'special number' phrasing over a generated ledger full of other numbers",
             NUMBER_PHRASING, LEDGER),
)}


def resolve_templates(names: Sequence[str]) -> list[str]:
    """``--template`` names (or ``all``) -> template names in registry order, or a ``ValueError``."""
    if "all" in names:
        if len(names) > 1:
            raise ValueError(f"--template all already includes every template; drop the others from {list(names)}.")
        return list(TEMPLATES)
    unknown = [n for n in names if n not in TEMPLATES]
    if unknown:
        raise ValueError(f"--template {unknown}: unknown; use 'all' or any of {', '.join(TEMPLATES)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"--template lists a template twice: {list(names)}.")
    return list(names)


# ----------------------------------------------------------------------------- lookup (eval/lookup.py)
LOOKUP_HEADER = "Below is a dictionary. Each line gives a key and its value. Remember every value."


def lookup_line(key: int, value: int) -> str:
    return f"key {key} value {value}"


def lookup_query(key: int) -> str:
    """What follows the dictionary for one query: the definition's line up to its value."""
    return f"\nkey {key} value"


# ----------------------------------------------------------------------------- leak check
def literal_fragments(pattern: str, min_chars: int = MIN_FRAGMENT) -> list[str]:
    """The literal text between a pattern's ``{fields}``, stripped, keeping pieces of ``min_chars`` or more."""
    pieces = (literal.strip() for literal, _, _, _ in string.Formatter().parse(pattern))
    return [p for p in pieces if len(p) >= min_chars]


def eval_only_strings() -> list[str]:
    """Distinctive strings that only the evaluations emit: training text must contain none of them.

    They are the held-out phrasings' task lines, questions and key-line fragments, the literal fragments of the
    generated haystacks' sentence patterns, and the lookup header. The landmark phrasing and filler are not
    among them: train/data.py trains on that format on purpose.
    """
    out: set[str] = {LOOKUP_HEADER}
    for template in TEMPLATES.values():
        p, h = template.phrasing, template.haystack
        if p is not LANDMARK_PHRASING:
            out.update([p.intro, p.question, *literal_fragments(p.key_line)])
        if isinstance(h, GeneratedFiller):
            out.update(f for pattern in h.patterns for f in literal_fragments(pattern))
    return sorted(out)
