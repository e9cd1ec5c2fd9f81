"""The passkey task: the evaluation's prompt templates and the trainer's passkey documents.

A passkey *template* is a phrasing (task line, key line, question) over a haystack (the filler text). The
``landmark`` template is the LongLLaMA / Landmark Attention prompt, kept as the default so numbers stay
comparable with the papers; ``SyntheticPasskey`` below generates that same format as training text on purpose.
The other templates are held out: their phrasings and their haystacks never appear in training, so they measure
whether retrieval generalizes beyond the trained format. ``tasks.heldout.eval_only_strings()`` lists their
distinctive strings for a leak check on training text.

Generated haystacks are sentences drawn from patterns and word lists with a seeded generator: varied, natural
enough, reproducible, and written for this project (nothing is copied from a corpus).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from plumbing.cli import resolve_choices
from tasks.document import UNBOUNDED, Document, encode

DEFAULT_TEMPLATE = "landmark"


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
    Template("landmark", "the LongLLaMA / Landmark prompt (default; the format the trainer's passkey documents use)",
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
    return resolve_choices(names, list(TEMPLATES), "--template", "template")


# ----------------------------------------------------------------------------- training documents
# The trainer's passkey format is the "landmark" template above, the one place both sides read it from. It holds
# no held-out evaluation string (tests/test_eval_passkey.py checks every length against tasks.heldout).
FILLER, PASSKEY_INTRO = GRASS.text, LANDMARK_PHRASING.intro


def passkey_prompt(n_garbage: int, rng: np.random.Generator) -> tuple[str, int]:
    """A passkey prompt in the Landmark / LongLLaMA format (see FACTS, "Passkey") and its key: the split point
    is drawn first, then the key; prefix and suffix are both character prefixes of the filler, as in the
    evaluation's ``landmark`` template, so the model trains on exactly the format it is tested on."""
    n_prefix = int(rng.integers(0, n_garbage + 1))
    key = int(rng.integers(1, 50000))
    prompt = TEMPLATES["landmark"].render(key, n_prefix, n_garbage - n_prefix, seed=0)
    return prompt, key


def passkey_text(n_garbage: int, rng: np.random.Generator) -> str:
    """A whole passkey document: the prompt followed by its answer."""
    prompt, key = passkey_prompt(n_garbage, rng)
    return f"{prompt} {key}."


class SyntheticPasskey:
    """Passkey documents (text, tokenized with ``tokenizer``) of about ``doc_tokens/2 ... doc_tokens`` tokens.

    With ``answers_only`` only the retrievals of the key carry loss: its repetition inside the info line
    ("... Remember it. K is the pass key.", a copy from a few tokens back that teaches the copying circuit first)
    and the answer after the final question (a copy from anywhere, often an earlier window). This concentrates
    the signal on retrieval instead of on predicting the filler; the key's first occurrence is random and never
    carries loss.
    """

    def __init__(self, tokenizer, doc_tokens: int, seed: int, add_bos: bool = True, add_eos: bool = True,
                 answers_only: bool = False):
        self.tokenizer, self.doc_tokens, self.seed = tokenizer, doc_tokens, seed
        self.add_bos, self.add_eos, self.answers_only = add_bos, add_eos, answers_only
        n = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
        self.chars_per_token = len(FILLER) / max(n, 1)
        # tokens of a document without filler (intro, info line, question, a 5-digit answer, BOS/EOS), + 2 spare
        self.overhead = len(encode(tokenizer, f"{passkey_prompt(0, np.random.default_rng(0))[0]} 49999.",
                                   add_bos, add_eos)) + 2
        self.digit_ids = None
        if answers_only:
            digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
            unk = getattr(tokenizer, "unk_token_id", None)
            if any(i is None or i == unk for i in digits):
                raise ValueError("answers-only passkey documents need a tokenizer with one piece per digit "
                                 "(sentencepiece split_digits=True, as train/tokenizer.py trains).")
            self.digit_ids = dict(zip("0123456789", digits))

    def __len__(self) -> int:
        return UNBOUNDED

    def get(self, epoch: int, index: int) -> Document:
        rng = np.random.default_rng([self.seed, epoch, index, 29])
        tokens = int(rng.integers(max(self.doc_tokens // 2, 16), self.doc_tokens + 1))
        prompt, key = passkey_prompt(max(int((tokens - self.overhead) * self.chars_per_token), 0), rng)
        ids = encode(self.tokenizer, f"{prompt} {key}.", self.add_bos, self.add_eos)[: self.doc_tokens]
        if not self.answers_only:
            return Document(ids)
        n_prompt = len(encode(self.tokenizer, prompt, self.add_bos, False))
        mask = np.zeros(len(ids), bool)
        mask[n_prompt:] = True  # the key, the period and EOS
        key_ids = np.array([self.digit_ids[c] for c in str(key)])
        starts = [i for i in range(min(n_prompt, len(ids)) - len(key_ids) + 1)
                  if ids[i] == key_ids[0] and np.array_equal(ids[i : i + len(key_ids)], key_ids)]
        if len(starts) != 2 and n_prompt < len(ids):  # the info line holds the key twice, nothing else has digits
            raise ValueError(f"expected the pass key {key} twice in the prompt's tokens, found it {len(starts)} "
                             "times; is the tokenizer splitting digits?")
        if len(starts) == 2:
            mask[starts[1] : starts[1] + len(key_ids)] = True  # the repetition inside the info line
        return Document(ids, mask)
