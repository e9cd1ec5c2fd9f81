"""Generated haystacks dense with numbers: records (numbers to look past when a key is one) and tallies (named
quantities with numbers, phrased like recall's key lines: other "the <name> is <number>" to look past).
"""

from __future__ import annotations

import numpy as np

from tasks.words import ADJECTIVES, NOUNS, OWNERS, PLACES, SURNAMES, choose, fill, qualified


# Record lines, written with the training vocabularies: every slot but the words is a number, of
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
