"""RULER's variable tracking (``scripts/data/synthetic/variable_tracking.py``, task ``vt``), rewritten for fot.

A chain of assignments ``VAR AAAAA = 12345``, ``VAR BBBBB = VAR AAAAA``, ... (``num_hops`` hops, variable names
of five random capital letters, the value five digits) is spread over RULER's noise haystack, one line each, in
order, at uniform random depths. The question asks for every variable that holds the value; the answer is the
chain's variables. As RULER does, a worked one-shot example comes first: a short prompt of the same shape (three
letter names, about 500 tokens of noise in RULER; ``EXAMPLE_UNITS`` paragraphs here) with its answer.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tasks.ruler_prompt import NOISE, VT, Built

EXAMPLE_UNITS = 15  # noise paragraphs of the one-shot example: about RULER's 500 tokens with a Llama tokenizer


@dataclass(frozen=True)
class VariableTracking:
    num_chains: int = 1
    num_hops: int = 4
    kind: str = "var"  # the read score's item kind: capitalized names

    def chains(self, rng: np.random.Generator, letters: int) -> tuple[list[list[str]], list[list[str]], list[str]]:
        """(variable names, assignment lines, value) of each chain; every name distinct."""
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            name = "".join(string.ascii_uppercase[i] for i in rng.integers(0, 26, letters))
            if name not in names and name != "VAR":
                names.append(name)
        groups, lines, values = [], [], []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)]
            value = str(int(rng.integers(10000, 99999)))
            # RULER's hop lines end with a space before the newline
            lines.append([f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])])
            groups.append(chain)
            values.append(value)
        return groups, lines, values

    def context(self, units: int, lines: list[list[str]], rng: np.random.Generator) -> tuple[str, list[float],
                                                                                               list[str]]:
        """Noise paragraphs with each chain's lines at sorted uniform depths; returns the text, every placed line's
        depth and the lines in the order placed."""
        placed: list[tuple[float, int, str]] = []
        for c, chain in enumerate(lines):
            for j, (depth, line) in enumerate(zip(sorted(rng.random(len(chain))), chain)):
                placed.append((float(depth), c * 100 + j, line))
        placed.sort()
        out, done = [], 0
        for depth, _, line in placed:
            cut = int(units * depth)
            out.extend([NOISE] * (cut - done))
            out.append(line)
            done = cut
        out.extend([NOISE] * (units - done))
        return "\n".join(out), [p[0] for p in placed], [p[2] for p in placed]

    def render(self, context: str, value: str) -> tuple[str, str]:
        template, prefix = VT
        return template.format(context=context, query=value), prefix.format(num_v=self.num_hops + 1, query=value)

    def build(self, units: int, seed: Sequence[int], books=None) -> Built:
        rng = np.random.default_rng(list(seed))
        names, lines, values = self.chains(rng, 5)
        text, depths, placed = self.context(units, lines, rng)
        example = self.example(np.random.default_rng([*seed, 2]))
        question, prefix = self.render(text, values[0])
        return Built(example + "\n" + question, prefix, names[0], depths, placed)

    def example(self, rng: np.random.Generator) -> str:
        """The one-shot example: a short prompt of the same task with its answer, then a newline."""
        names, lines, values = self.chains(rng, 3)
        text, _, _ = self.context(EXAMPLE_UNITS, lines, rng)
        question, prefix = self.render(text, values[0])
        return question + prefix + " " + " ".join(names[0]) + "\n"
