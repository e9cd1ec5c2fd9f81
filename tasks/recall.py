"""Key-value recall in words: named values ("the harbour gate code is 6013") among a haystack, then questions
about some of them. Key lines, mentions, intros and questions each come in many phrasings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tasks.document import Hay, answer_end
from tasks.words import VALUE_KINDS, choose, fill, key_name, value

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


def recall_parts(rng: np.random.Generator, budget: int, value_kinds: Sequence[str] = tuple(VALUE_KINDS),
                 max_keys: int = 4, mentions: float = 0.0, named_intros: float = 0.0,
                 answer_ends: bool | str = False) -> list:
    """One to ``max_keys`` named values (of ``value_kinds``) among the haystack, then questions about one to three
    of them. With probability ``mentions`` per key, a ``MENTION_LINES`` sentence also names it, with words and no
    value after "the <name> is", at its own random depth (before or after the key line): an answer copied from the
    first "the <name> is" in the text is then often wrong. With probability ``named_intros`` the document opens
    with a ``NAMED_INTROS`` line naming the first asked key, with no value, in place of its intro. With
    ``answer_ends`` the character after each answer ("." or a line break) is part of it; with "period" every answer
    ends in "." and that "." is part of it (``answer_end``)."""
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
