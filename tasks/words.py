"""The words of the synthetic tasks: vocabularies, the values a key can take, named slots, and ``fill`` for their
patterns. None of them names the evaluations' keys (pass key, secret code, special number) or their haystacks'
words.
"""

from __future__ import annotations

import string
from typing import Callable, Sequence

import numpy as np

# Word lists written for the synthetic tasks; none of them names the evaluations' keys (pass key, secret code, special
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


def fill(pattern: str, **values: str) -> str:
    name = values.get("name")
    if name is not None:
        values["Name"] = name[0].upper() + name[1:]
    return pattern.format(**values)
