"""Synthetic long-range tasks in varied surface forms, over natural book text as the haystack.

A document of the ``synthetic_mix`` source is one of these families, drawn per document with the mixture weights:

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
questions never do, unless ``data.mix_loss`` is "all" (every token). Answers come after the haystack, so the key is usually in an earlier window than the answer
and only the memory layers can reach it.

Held out. The haystack is text of the training books only (``assets/books/train.parquet``); lines of the books that
hold an evaluation string are removed when they are loaded. No template here uses the passkey evaluation's key
line, filler, question or answer stem ("The pass key is", "The secret code is", ...), nor the lookup evaluation's
header or line format: ``find_forbidden`` lists them from ``eval/templates.py`` (so a new evaluation template is
covered without an edit here), and every generated document is checked against it before it is returned.

Lengths. A document is planned in tokens: its fixed text (lines, questions, answers) is tokenized, and the rest of
the drawn length is haystack, converted to characters with the books' measured characters per token; a document
that comes out longer than ``doc_tokens`` gets a shorter haystack.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from plumbing.files import resolve_files
from tasks.document import Document, Hay, Target  # noqa: F401  Target: tests read it from here
from tasks.heldout import Scanner, drop_lines

FAMILIES = ("recall", "lookup", "copy", "repeat", "books")


# ----------------------------------------------------------------------------- the book haystack
class BookHaystack:
    """Passages of training books. Lines that hold a forbidden string are removed at load time."""

    def __init__(self, texts: Sequence[str], scanner: Scanner):
        self.texts = [drop_lines(t, scanner) for t in texts if t and len(t) > 2000]
        if not self.texts:
            raise ValueError("the book haystack has no text of at least 2000 characters; check data.paths.")
        sizes = np.array([len(t) for t in self.texts], np.float64)
        self.weights = sizes / sizes.sum()

    @classmethod
    def from_files(cls, paths: Sequence[str], text_field: str, scanner: Scanner) -> "BookHaystack":
        import pyarrow.parquet as pq

        files, fmt = resolve_files(list(paths), "auto")
        if fmt != "parquet":
            raise ValueError(f"data.source=synthetic_mix reads books from parquet files (assets/books/train.parquet, "
                             f"built by make assets); got {fmt} files {files}.")
        texts: list[str] = []
        for f in files:
            if "heldout" in Path(f).name:
                raise ValueError(f"data.paths names {f}: held-out books are for evaluation only.")
            table = pq.read_table(f, columns=[text_field])
            texts += [t for t in table.column(text_field).to_pylist() if t]
        return cls(texts, scanner)

    def passage(self, n_chars: int, rng: np.random.Generator) -> str:
        """About ``n_chars`` characters from a random book, starting at a word and ending at one."""
        if n_chars <= 0:
            return ""
        text = self.texts[int(rng.choice(len(self.texts), p=self.weights))]
        start = int(rng.integers(0, max(1, len(text) - n_chars - 200)))
        space = text.find(" ", start)
        start = start if space < 0 else space + 1
        piece = text[start : start + n_chars]
        cut = piece.rfind(" ")
        return (piece[:cut] if cut > n_chars // 2 else piece).strip()

    def repeated(self, n_chars: int, rng: np.random.Generator) -> str:
        """One short passage (one to three sentences) repeated to ``n_chars`` characters, like a repeated filler."""
        unit = self.passage(int(rng.integers(40, 200)), rng)
        sentences = re.findall(r"[^.!?]+[.!?]", unit)
        unit = " ".join(s.strip() for s in sentences[:3]) if sentences else unit
        unit = unit or "And so it went on."
        return " ".join([unit] * (n_chars // (len(unit) + 1) + 1))[:n_chars]


# ----------------------------------------------------------------------------- vocabularies
# Word lists written for this module; none of them names the evaluations' keys (pass key, secret code, special
# number) or their haystacks' words in their patterns.
THINGS = ("access code", "door number", "locker combination", "ticket number", "room number", "account number",
          "password", "code word", "serial number", "order number", "safe combination", "badge number", "gate code",
          "reference number", "catalogue number", "watchword", "cipher", "PIN", "vault number", "box number",
          "parcel number", "seat number", "licence number", "signal", "token", "call sign", "station code",
          "file number", "case number", "route number")
OWNERS = ("Amos", "Beatrix", "Cyril", "Dorothea", "Edgar", "Flora", "Gideon", "Harriet", "Isidore", "Juno",
          "Kasimir", "Lavinia", "Magnus", "Nell", "Orson", "Philippa", "Quentin", "Rosalind", "Silas", "Theodora",
          "Ulric", "Viola", "Wendell", "Xenia", "Yorick", "Zelda")
PLACES = ("harbour", "north tower", "old chapel", "blue cabin", "east wing", "lighthouse", "cellar", "garden shed",
          "observatory", "boathouse", "west gate", "attic", "granary", "workshop", "bell tower", "stable")
ADJECTIVES = ("amber", "silent", "crooked", "golden", "hollow", "misty", "northern", "scarlet", "velvet", "wild",
              "frozen", "gentle", "hidden", "ivory", "lucky", "patient", "rusty", "salty", "tall", "winter")
NOUNS = ("anchor", "badger", "candle", "lantern", "meadow", "pebble", "ribbon", "saddle", "thistle", "walnut",
         "harp", "compass", "feather", "kettle", "marble", "orchard", "parrot", "quill", "raven", "spindle",
         "tulip", "violin", "wagon", "yarrow", "zephyr", "beacon", "cobble", "dagger", "ember", "falcon")
SURNAMES = ("Ashdown", "Blackwood", "Carrow", "Dunmore", "Everly", "Fairfax", "Goodwin", "Hartley", "Ingram",
            "Kettering", "Lockwood", "Merriman", "Northcott", "Pembury", "Radley", "Stanton", "Thorne", "Whitlock")


def choose(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def number_value(rng: np.random.Generator) -> str:
    digits = int(rng.choice(np.arange(1, 10), p=[.04, .07, .12, .16, .2, .16, .11, .08, .06]))
    first = str(int(rng.integers(1, 10)))
    return first + "".join(str(d) for d in rng.integers(0, 10, digits - 1))


def code_value(rng: np.random.Generator) -> str:
    alphabet = string.ascii_uppercase + string.digits
    groups = [int(rng.integers(1, 5)) for _ in range(int(rng.integers(1, 4)))]
    sep = choose(rng, ("-", "-", "", "/", "."))
    return sep.join("".join(choose(rng, alphabet) for _ in range(n)) for n in groups)


VALUE_KINDS: dict[str, Callable[[np.random.Generator], str]] = {
    "number": number_value,
    "word": lambda rng: choose(rng, NOUNS + ADJECTIVES),
    "code": code_value,
    "name": lambda rng: f"{choose(rng, OWNERS)} {choose(rng, SURNAMES)}" if rng.random() < 0.5 else choose(rng, OWNERS),
    "pair": lambda rng: f"{choose(rng, ADJECTIVES)} {choose(rng, NOUNS)}",
}
VALUE_WEIGHTS = np.array([0.5, 0.12, 0.18, 0.1, 0.1])


def value(rng: np.random.Generator, kinds: Sequence[str] = tuple(VALUE_KINDS)) -> str:
    weights = np.array([VALUE_WEIGHTS[list(VALUE_KINDS).index(k)] for k in kinds])
    return VALUE_KINDS[kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]](rng)


def key_name(rng: np.random.Generator) -> str:
    """A named slot: "harbour gate code", "Amos's ticket number", "scarlet locker combination"..."""
    return qualified(rng, choose(rng, THINGS))


def qualified(rng: np.random.Generator, head: str) -> str:
    """``head`` made particular by an adjective, a place or an owner, in one of four forms."""
    form = int(rng.integers(4))
    if form == 0:
        return f"{choose(rng, ADJECTIVES)} {head}"
    if form == 1:
        return f"{choose(rng, PLACES)} {head}"
    if form == 2:
        return f"{head} of {choose(rng, OWNERS)}"
    return f"{choose(rng, OWNERS)}'s {head}"


# ----------------------------------------------------------------------------- templates
RECALL_INTROS = (
    "", "", "",
    "Read the following text carefully; some questions come at the end.",
    "Somewhere below a few values are mentioned. Keep track of them.",
    "The text below is long. A few facts in it will be asked about later.",
    "Pay attention to any numbers or names you are given in this passage.",
    "Several items are recorded in the pages that follow. You will be tested on them.",
    "Memorise what you are told below; it matters at the end.",
    "This is a reading exercise. Answer the questions after the text.",
    "Keep the values in this document in mind.",
    "Here follows a passage with some values worth remembering.",
    "Below is an excerpt interrupted by a few notes. Remember the notes.",
)
KEY_LINES = (
    "The {name} is {value}.",
    "Remember that the {name} is {value}.",
    "Note: the {name} is {value}. Again, the {name} is {value}.",
    "{Name}: {value}.",
    "Please write down the {name}, which is {value}.",
    "For later reference, the {name} is {value}.",
    "I have set the {name} to {value}.",
    "Here is something to keep: the {name} is {value}.",
    "The {name} you will need is {value}. Do not forget it.",
    "Important! The {name} = {value}.",
    "It was decided that the {name} would be {value}.",
    "{value} is the {name}. Yes, the {name} is {value}.",
    "Log entry: {name} recorded as {value}.",
    "The {name} reads {value}.",
    "(The {name}, by the way, is {value}.)",
)
# A key named with no value after it ("the <name> is" + words), for data.mix_mentions.
MENTION_LINES = (
    "The {name} is written down somewhere in these pages.",
    "The {name} is given later on, so keep reading.",
    "The {name} is important; you will need it.",
    "The {name} is not easy to remember.",
    "Everyone wanted to know what the {name} is.",
    "The {name} is something we return to below.",
    "Careful: the {name} is easy to confuse with other values.",
    "The {name} is recorded once in this text.",
    "I forgot what the {name} is, and had to look it up.",
    "{Name} is the thing to watch for.",
)
# An opening line that names a key with no value ("the <name> is" + words), for data.mix_named_intros: the first
# "the <name> is" of the document is then the task's statement, not the key line.
NAMED_INTROS = (
    "The {name} is given somewhere in the text below. You will be asked for it at the end.",
    "A {name} is stated once in the following pages; look out for it.",
    "Find the {name} in this passage. The {name} is asked for after it.",
    "The {name} is in here, among a lot of other text. Keep reading until you find it.",
    "Somewhere in what follows, the {name} is written down. Keep it in mind.",
    "Your task: read on and note the {name}. The {name} is needed at the end.",
    "There is a {name} in the text below; it is the only thing that matters.",
    "The {name} is buried in the notes that follow.",
)
QUESTIONS = (
    "What is the {name}? The {name} is",
    "Question: what was the {name}? Answer:",
    "Recall the {name} mentioned above. The {name} is",
    "Do you remember the {name}? It is",
    "The {name} was",
    "Q: {Name}? A:",
    "Tell me the {name}. The {name} is",
    "Which value was given for the {name}? It was",
    "Fill in the blank: the {name} is",
    "Earlier you were told the {name}. What is it? The {name} is",
    "{Name} =",
    "Now, the {name}:",
    "Looking back, the {name} was",
)
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


def fill(pattern: str, **values: str) -> str:
    name = values.get("name")
    if name is not None:
        values["Name"] = name[0].upper() + name[1:]
    return pattern.format(**values)


# ----------------------------------------------------------------------------- families
# The haystack of one document: a book passage, one short passage repeated (like a repeated filler), generated
# records dense with numbers (other numbers to look past when the key is one) or tallies (records of which half
# the lines give a named quantity a number, the way a key line does: other "the <name> is <number>" to look past).
# One uniform draw against the cumulative weights in this order, so the default weights draw exactly as documents
# always have, and adding a style at the end changes no earlier config's draws.
HAYSTACK_STYLES = ("repeated", "books", "records", "tallies")
# The generated styles, with the share of tally lines among their record lines (train.synthetic.records).
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


# Record lines, written for this module with the training vocabularies: every slot but the words is a number, of
# one to five digits, so a numeric key sits among many numbers of its own length.
RECORD_LINES = (
    "{owner} paid {n3} crowns for the {adj} {noun}.",
    "Entry {n5}: {n2} crates of {noun} went to the {place}.",
    "Parcel {n4} left the {place} at {hh}:{mm} with {n2} crates.",
    "At the {place}, {n2} of the {noun} crates and {n3} barrels were counted in week {n1}.",
    "{owner} {surname} still owes {n4} crowns from season {n2}.",
    "Tally {n1}-{n3}: the {adj} {noun} fetched {n5} at auction.",
    "The {place} measures {n3} by {n2} paces.",
    "{owner} walked {n2} miles and spent {n3} crowns at the {place}.",
    "Lot {n5} ({adj} {noun}) went for {n4}; lot {n5b} for {n3}.",
    "Between days {n1} and {n2}, the {place} took in {n4} visitors.",
)


# Tally lines: a named quantity and its number, phrased like KEY_LINES. The quantities (MEASURES) are none of the
# recall keys' THINGS, so a tally never names a document's key, though it may share the key's place, owner or
# adjective ("the harbour toll is 45" beside "the harbour gate code is 31898"): only the whole name picks the line.
MEASURES = ("count", "total", "tally", "weight", "price", "balance", "fee", "score", "toll", "rent", "height",
            "depth", "length", "width", "yield", "quota", "wage", "debt", "stock level", "head count")
TALLY_LINES = (
    "The {name} is {n}.",
    "{Owner} said the {name} was {n}.",
    "Note that the {name} is now {n}, up from {m}.",
    "The {name} reads {n} today.",
    "{Name}: {n}.",
    "For the record, the {name} came to {n}.",
    "It was agreed that the {name} would be {n}, not {m}.",
)


def tally_slot(rng: np.random.Generator) -> str:
    """A named quantity: "harbour toll", "Amos's rent", "amber weight", "stock level of Flora"..."""
    return qualified(rng, choose(rng, MEASURES))


def tally_number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1, 10 ** int(rng.integers(1, 6)))))


def records(n_chars: int, rng: np.random.Generator, tallies: float = 0.0) -> str:
    """About ``n_chars`` characters of generated record lines (``RECORD_LINES``); with probability ``tallies`` a
    line is a tally (``TALLY_LINES``) instead."""
    lines: list[str] = []
    size = 0
    while size < n_chars:
        if tallies > 0 and rng.random() < tallies:
            slot = tally_slot(rng)
            line = fill(choose(rng, TALLY_LINES), name=slot, n=tally_number(rng), m=tally_number(rng),
                        Owner=choose(rng, OWNERS))
            lines.append(line)
            size += len(line) + 1
            continue
        nums = {f"n{d}": str(int(rng.integers(10 ** (d - 1), 10 ** d))) for d in range(1, 6)}
        line = fill(choose(rng, RECORD_LINES), **nums, n5b=str(int(rng.integers(10000, 100000))),
                    hh=f"{int(rng.integers(0, 24)):02d}", mm=f"{int(rng.integers(0, 60)):02d}",
                    owner=choose(rng, OWNERS), surname=choose(rng, SURNAMES), adj=choose(rng, ADJECTIVES),
                    noun=choose(rng, NOUNS), place=choose(rng, PLACES))
        lines.append(line)
        size += len(line) + 1
    text = " ".join(lines)[:n_chars]
    cut = text.rfind(" ")
    return (text[:cut] if cut > n_chars // 2 else text).strip()


def answer_end(answer: str, after: str, ends: bool) -> list:
    """An answer and the text after it, as parts. With ``ends``, the first character after the answer ("." or a
    line break) carries the loss too. Without it, nothing trains the step after an answer's last token, so a
    model that copies a five-digit value has never learned to stop there and runs on into more digits
    ("33543" -> "3354359"; values have one to nine digits)."""
    if not ends:
        return [Target(answer), after]
    return [Target(answer + after[:1]), after[1:]]


def recall_parts(rng: np.random.Generator, budget: int, value_kinds: Sequence[str] = tuple(VALUE_KINDS),
                 max_keys: int = 4, mentions: float = 0.0, named_intros: float = 0.0,
                 answer_ends: bool = False) -> list:
    """One to ``max_keys`` named values (of ``value_kinds``) among the haystack, then questions about one to three
    of them. With probability ``mentions`` per key, a ``MENTION_LINES`` sentence also names it, with words and no
    value after "the <name> is", at its own random depth (before or after the key line): an answer copied from the
    first "the <name> is" in the text is then often wrong. With probability ``named_intros`` the document opens
    with a ``NAMED_INTROS`` line naming the first asked key, with no value, in place of its intro. With
    ``answer_ends`` the character after each answer ("." or a line break) is part of it (``answer_end``)."""
    n_keys = int(rng.integers(1, max_keys + 1))
    names: list[str] = []
    while len(names) < n_keys:
        name = key_name(rng)
        if all(name not in other and other not in name for other in names):
            names.append(name)
    kinds = (choose(rng, tuple(value_kinds)),) if rng.random() < 0.5 else tuple(value_kinds)
    values = [value(rng, kinds) for _ in names]
    lines = [fill(choose(rng, KEY_LINES), name=n, value=v) for n, v in zip(names, values)]
    cuts = np.sort(rng.random(n_keys))  # depths of the key lines in the haystack
    if mentions > 0:
        said = [(float(rng.random()), fill(choose(rng, MENTION_LINES), name=n))
                for n in names if rng.random() < mentions]
        placed = sorted([*zip(cuts.tolist(), lines), *said], key=lambda item: item[0])
        cuts, lines = [d for d, _ in placed], [line for _, line in placed]
    parts: list = []
    intro = choose(rng, RECALL_INTROS)
    if intro:
        parts.append(intro + "\n")
    previous = 0.0
    for depth, line in zip(cuts, lines):
        parts += [Hay(depth - previous), " " if rng.random() < 0.5 else "\n", line, " " if rng.random() < 0.5 else "\n"]
        previous = depth
    parts += [Hay(1.0 - previous), "\n"]
    asked = rng.permutation(n_keys)[: int(rng.integers(1, min(3, n_keys) + 1))]
    for i in asked:
        parts += [fill(choose(rng, QUESTIONS), name=names[i]),
                  *answer_end(" " + values[i], choose(rng, (".\n", "\n")), answer_ends)]
    if named_intros > 0 and rng.random() < named_intros:  # drawn last: with it off, the draws are as before
        line = fill(choose(rng, NAMED_INTROS), name=names[asked[0]]) + "\n"
        parts[:1 if intro else 0] = [line]
    return parts


LOOKUP_VALUE_KINDS = ("number", "number", "word", "code")  # drawn per dictionary: numbers half the time


LOOKUP_KEY_KINDS = ("number", "word", "code", "pair", "name")


def lookup_parts(rng: np.random.Generator, budget: int, value_kinds: Sequence[str] = LOOKUP_VALUE_KINDS,
                 key_kinds: Sequence[str] = LOOKUP_KEY_KINDS, answer_ends: bool = False) -> list:
    """A dictionary of items in one line format, haystack, then queries about some of them. The keys of one
    dictionary are all of one kind, drawn uniformly from ``key_kinds``. ``answer_ends``: each answer's line break
    is part of the answer (``answer_end``)."""
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


def copy_span(rng: np.random.Generator, hay: "BookHaystack") -> str:
    kind = int(rng.integers(4))
    if kind == 0:
        return hay.passage(int(rng.integers(30, 160)), rng)
    if kind == 1:
        return " ".join(number_value(rng) for _ in range(int(rng.integers(2, 6))))
    if kind == 2:
        return " ".join(code_value(rng) for _ in range(int(rng.integers(2, 5))))
    return " ".join(value(rng, ("word", "pair", "name")) for _ in range(int(rng.integers(3, 9))))


def copy_parts(rng: np.random.Generator, budget: int, hay: "BookHaystack") -> list:
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


def repeat_parts(rng: np.random.Generator, budget: int, hay: "BookHaystack") -> list:
    """A span that recurs two to four times, separated by haystack; the loss is on every recurrence."""
    span = copy_span(rng, hay)
    times = int(rng.integers(2, 5))
    cuts = np.diff(np.concatenate([[0.0], np.sort(rng.random(times)), [1.0]]))
    parts: list = [Hay(float(cuts[0])), " "]
    for i in range(times):
        parts += [Target(span) if i else span, " ", Hay(float(cuts[i + 1])), " "]
    return parts


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
                 answer_ends: bool = False):
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
                targets.append((at, at + len(text)))
            else:
                text = p
            pieces.append(text)
            at += len(text)
        text = "".join(pieces)
        lead = len(text) - len(text.lstrip())  # an empty first haystack leaves a separator in front: drop it
        return text[lead:], [(a - lead, b - lead) for a, b in targets]

    def encode(self, text: str, targets: list[tuple[int, int]], everything: bool):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [everything or any(s < b and a < e for a, b in targets) for s, e in offsets]
        if self.add_bos and self.tokenizer.bos_token_id is not None:
            ids, mask = [self.tokenizer.bos_token_id] + ids, [False] + mask
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            ids, mask = ids + [self.tokenizer.eos_token_id], mask + [everything]
        return np.asarray(ids, np.int64), np.asarray(mask, bool)

    def sample(self, epoch: int, index: int):
        """(family, text, ids int64 [N], loss mask bool [N]) of one document."""
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
                ids, mask = self.encode(text, targets, family == "books" or self.loss_on == "all")
                if hay_chars == 0 or 0.92 * tokens <= len(ids) <= self.doc_tokens:
                    break
                hay_chars = int(hay_chars * (tokens - n_fixed) / max(len(ids) - n_fixed, 1) * 0.98)
            if len(ids) <= self.doc_tokens and self.scanner.find(text) is None:
                return family, text, ids, mask
        raise ValueError(f"no {family} document of at most {self.doc_tokens} tokens without an evaluation string in "
                         f"12 draws (epoch {epoch}, index {index}); raise data.synthetic_doc_tokens.")

    def get(self, epoch: int, index: int):
        _, _, ids, mask = self.sample(epoch, index)
        return Document(ids, mask)


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


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """``tokenizer``: train the mix's tokenizer; ``sample``: print generated documents with their answers marked."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.synthetic", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer (digits split) on book passages and templates")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab_size", type=int, default=2000)
    tok.add_argument("--documents", type=int, default=3000, help="book passages (plus one task text each)")
    show = sub.add_parser("sample", help="print documents and their answers")
    show.add_argument("--tokenizer", required=True)
    show.add_argument("--doc_tokens", type=int, default=512)
    show.add_argument("--documents", type=int, default=4)
    show.add_argument("--haystacks", nargs="+", metavar="STYLE=WEIGHT",
                      help=f"haystack styles as data.mix_haystacks, e.g. records=1 "
                           f"(styles: {', '.join(HAYSTACK_STYLES)})")
    for p in (tok, show):
        p.add_argument("--paths", nargs="+", default=["assets/books/train.parquet"])
        p.add_argument("--text_field", default="text")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    haystack = BookHaystack.from_files(args.paths, args.text_field, Scanner())
    if args.command == "tokenizer":
        from train.tokenizer import train_tokenizer

        lines = [line for text in training_texts(haystack, args.documents, args.seed) for line in text.split("\n")]
        tokenizer = train_tokenizer(iter([line for line in lines if line.strip()]), args.out, args.vocab_size)
        print(f"saved a {len(tokenizer)}-piece tokenizer to {args.out}")
        return
    from transformers import AutoTokenizer

    haystacks = None
    if args.haystacks:
        try:
            haystacks = {k: float(w) for k, w in (item.split("=") for item in args.haystacks)}
        except ValueError:
            parser.error(f"--haystacks {' '.join(args.haystacks)}: give STYLE=WEIGHT pairs, e.g. records=1 books=1")
    try:
        mix = SyntheticMix(AutoTokenizer.from_pretrained(args.tokenizer), haystack, args.doc_tokens,
                           {f: 1.0 for f in FAMILIES}, args.seed, haystacks=haystacks)
    except ValueError as e:  # bad weights or doc_tokens: one line naming the fix
        parser.error(str(e))
    for i in range(args.documents):
        family, text, ids, mask = mix.sample(0, i)
        shown = text
        answers = [mix.tokenizer.decode(ids[a:b]) for a, b in _runs(mask)]
        print(f"=== {family}: {len(ids)} tokens, {int(mask.sum())} with loss; answers {answers[:8]}\n{shown}\n")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


if __name__ == "__main__":
    main()
