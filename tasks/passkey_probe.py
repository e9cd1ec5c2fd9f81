"""A passkey template kept apart from the evaluated ones: a one-off check of how retrieval generalizes.

``tasks.passkey.TEMPLATES`` are the templates that ``make demo``, the tests and every recipe's validation read, so
over many stages a recipe is, in effect, tuned to them. ``PROBE_TEMPLATES`` hold a template that none of them
reads: a new task line, a new key line and question, and a new prose haystack (a lighthouse keeper's log),
written for the check of issue 33 and reported once (docs/results.md). ``eval/passkey.py --template keeper-log``
runs it; ``--template all`` does not include it. Its strings are evaluation strings like any other:
``tasks.heldout`` scans training text for them.
"""

from __future__ import annotations

from tasks.passkey import GeneratedFiller, Phrasing, Template

LOCKER_PHRASING = Phrasing(
    "locker",
    "What follows is the night log of a lighthouse keeper. On one of its pages the keeper wrote down how the "
    "supply locker opens; after the log you will be asked for it.",
    "Note for my relief: the supply locker opens with {key}. I repeat, the supply locker opens with {key}.",
    "How does the supply locker open? The supply locker opens with",
)
KEEPER_LOG = GeneratedFiller(
    "keeper-log", "generated entries of a lighthouse keeper's night log (sea, weather, the lamp), numbers in words",
    (
        "Trimmed the wick at {hour} bells and wiped the salt from the lens panes.",
        "A {vessel} went by to the {direction}, her lanterns steady against the swell.",
        "The glass dropped a little before {meal}; the gulls kept low over the skerries.",
        "Fog rolled in from the {direction} and lay on us until the {watch} ended, so I worked the horn by hand.",
        "Wound the lamp clockwork and counted {count} sweeps of the beam before it settled.",
        "My tabby dozed on the {spot} while squalls rattled the gallery glass.",
        "Spray reached the {spot} twice tonight, which the old logbooks call rare in {season}.",
        "No boat came near the island; {birds} wheeled round the tower as the light came on.",
    ),
    dict(hour=("two", "four", "six", "eight"),
         vessel=("fishing smack", "collier brig", "mail steamer", "topsail schooner", "pilot cutter"),
         direction=("north", "north-east", "east", "south-west", "west"),
         meal=("supper", "breakfast", "the noon meal"), watch=("first watch", "middle watch", "morning watch"),
         count=("forty", "sixty", "ninety", "a hundred"),
         spot=("oil store step", "lamp room stair", "gallery rail", "boat slip"),
         season=("spring", "late summer", "autumn", "winter"),
         birds=("terns", "cormorants", "gannets", "kittiwakes")),
)
PROBE_TEMPLATES = {t.name: t for t in (
    Template("keeper-log", "a 'supply locker' phrasing over a lighthouse keeper's night log (issue 33's one-off "
             "generalization check; not among the evaluated templates)", LOCKER_PHRASING, KEEPER_LOG),
)}
