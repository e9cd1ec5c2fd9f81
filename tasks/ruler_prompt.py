"""What every RULER-style task shares: RULER's prompt strings, the sample record, seeds and depths, and the search
that fits a prompt to a token budget.

The strings are those of NVIDIA/RULER (``scripts/data/synthetic/constants.py``, arXiv 2404.06654), so that scores
are comparable with RULER's: a task *template* holds ``{context}`` and the question, an *answer prefix* follows it,
and the model's input is ``input + answer_prefix`` (RULER's ``call_api.py``). RULER builds prompts for base models
with no chat template (its ``base`` model template); ``eval/ruler.py --chat-template`` wraps ``input`` in the
tokenizer's chat template instead and appends the answer prefix after the assistant turn's opening, as RULER's
chat model templates do.

Length: RULER's ``max_seq_length`` counts the prompt's tokens and the tokens to generate, so a prompt of length L
has at most ``L - max_new_tokens`` tokens. Each generator builds its prompt from a number of haystack *units*
(noise paragraphs, distractor needles, book words, list words); ``fit_units`` finds the largest count whose prompt
fits, so a prompt falls short of its budget by less than one unit.
"""

from __future__ import annotations

import math
import string
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------- RULER's strings
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."  # kind is plural, as in RULER's needles

# RULER's niah template with several answers; with one answer RULER rewrites it word by word ("Some" -> "A",
# "are all" / "are" -> "is", the kind singular), which gives the second pair, written out here.
NIAH_MANY = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned in the "
    "provided text?",
    " The special magic {kind} for {query} mentioned in the provided text are",
)
NIAH_ONE = (
    "A special magic {kind} is hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the {kind} afterwards.\n{context}\nWhat is the special magic {kind} for {query} mentioned in the provided "
    "text?",
    " The special magic {kind} for {query} mentioned in the provided text is",
)
VT = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above.",
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: ",
)
CWE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
    " Answer: The top 10 words that appear most often in the list are:",
)

# RULER's depths: 40 evenly spaced percentages of the haystack, 0 to 100, rounded to whole percents.
DEPTHS = tuple(float(d) / 100 for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))


def eval_strings(min_chars: int = 20) -> list[str]:
    """The distinctive strings of these prompts (the literal pieces of the templates and answer prefixes between
    their fields and line breaks, of ``min_chars`` or more, and the needle's stem), for the scan that keeps
    evaluation text out of training. The noise paragraph is not among them: it is the Landmark passkey filler, which
    the passkey training source uses on purpose."""
    out = {NEEDLE.split(" {")[0]}
    for text in (*NIAH_MANY, *NIAH_ONE, *VT, *CWE):
        for literal, *_ in string.Formatter().parse(text):
            out.update(p.strip() for p in literal.split("\n") if len(p.strip()) >= min_chars)
    return sorted(out)


# ----------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One prompt in RULER's jsonl fields (``input``, ``outputs``, ``answer_prefix``, ``length``, ``index``) and
    what fot adds: the task, the scoring (``metric`` "all" or "part", ``kind`` for the read score, see
    tasks/ruler_score.py), tokens to generate, and where the needles lie."""

    task: str
    index: int
    length: int  # the requested length: prompt tokens + max_new_tokens at most (RULER's max_seq_length)
    input: str
    outputs: list[str]
    answer_prefix: str
    max_new_tokens: int
    metric: str = "all"
    kind: str = "text"
    depths: list[float] = field(default_factory=list)  # fraction of the haystack before each needle, in order
    needles: list[str] = field(default_factory=list)  # the needles (or chain lines) at those depths
    units: int = 0  # haystack units the prompt holds

    @property
    def prompt(self) -> str:
        """The text a base model continues: RULER's ``input + answer_prefix``."""
        return self.input + self.answer_prefix


@dataclass
class Built:
    """What a generator returns for a unit count: the sample's text fields and its needle depths."""

    input: str
    answer_prefix: str
    outputs: list[str]
    depths: list[float] = field(default_factory=list)
    needles: list[str] = field(default_factory=list)  # the lines placed at ``depths``


def task_seed(seed: int, task: str, length: int, index: int) -> list[int]:
    """The seed of one (task, length, sample): independent of the settings, of other samples and of the order in
    which tasks are listed (the task enters by a checksum of its name)."""
    return [seed, zlib.crc32(task.encode()), length, index]


def pick_depths(rng: np.random.Generator, n: int) -> list[float]:
    """``n`` distinct depths of RULER's 40, sorted (RULER's ``random.sample(DEPTHS, n)``)."""
    return sorted(float(DEPTHS[i]) for i in rng.choice(len(DEPTHS), size=n, replace=False))


def insert_at_depths(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """``units`` with ``items[i]`` inserted after ``int(len(units) * depths[i])`` of them (depths sorted)."""
    out, done = [], 0
    for item, depth in zip(items, depths):
        cut = int(len(units) * depth)
        out.extend(units[done:cut])
        out.append(item)
        done = cut
    return out + units[done:]


# ----------------------------------------------------------------------------- length
def fit_units(build: Callable[[int], Built], count: Callable[[Built], int], budget: int, guess: int | None = None,
              minimum: int = 1) -> tuple[Built, int, int]:
    """The prompt of the largest unit count whose token count is at most ``budget``.

    ``build(n)`` must be deterministic and its token count roughly increasing in n. The search starts from
    ``guess`` (e.g. the count of the previous sample of the same task and length), takes up to three secant steps
    toward the budget (each prompt of 64K tokens costs a tokenization), gallops to a bracket, then bisects.
    Returns (built, units, tokens); when even ``minimum`` units are over budget, that prompt (the caller warns).
    """
    seen: dict[int, tuple[Built, int]] = {}

    def tokens(n: int) -> int:
        if n not in seen:
            built = build(n)
            seen[n] = (built, count(built))
        return seen[n][1]

    if tokens(minimum) > budget:
        return seen[minimum][0], minimum, seen[minimum][1]
    if guess is None:  # the slope of two small prompts
        probe = minimum + 32
        per_unit = max((tokens(probe) - tokens(minimum)) / (probe - minimum), 1e-3)
        guess = minimum + int((budget - tokens(minimum)) / per_unit)
    n = max(guess, minimum)
    for _ in range(3):  # secant steps on the line through the minimum's count and n's: a long prompt is costly
        other = minimum if n > minimum else minimum + 32
        per_unit = max((tokens(n) - tokens(other)) / (n - other), 1e-3)
        step = math.floor((budget - tokens(n)) / per_unit)
        if step == 0:
            break
        n = max(n + step, minimum)
    step = 1
    if tokens(n) <= budget:  # gallop up to the first count over budget
        lo = n
        while tokens(lo + step) <= budget:
            lo, step = lo + step, step * 2
        hi = lo + step
    else:  # gallop down to the first count within it
        hi = n
        while tokens(max(hi - step, minimum)) > budget:
            hi, step = max(hi - step, minimum), step * 2
        lo = max(hi - step, minimum)
    while hi - lo > 1:  # tokens(lo) <= budget < tokens(hi)
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return seen[lo][0], lo, seen[lo][1]
