"""RULER-style tasks for real models (NVIDIA/RULER, arXiv 2404.06654): the families that need no download, built to a
token length with the model's tokenizer, and RULER's own jsonl files.

=====================  ========================  =================================================  ==========
task                   RULER's                   what                                               new tokens
=====================  ========================  =================================================  ==========
``niah_single_1``      niah_single_1             one needle (word key, 7-digit number), noise       128
``niah_single_2``      niah_single_2             one needle in held-out books (RULER: essays)       128
``niah_single_3``      niah_single_3             one needle with a UUID value, held-out books       128
``niah_multikey_1``    niah_multikey_1           four needles, one key asked, held-out books        128
``niah_multikey_2``    niah_multikey_2           one needle among distractor needles                128
``niah_multikey_3``    niah_multikey_3           the same with UUID keys and values                 128
``niah_multivalue``    niah_multivalue           one key with four values, all asked, books         128
``niah_multiquery``    niah_multiquery           four keys, all asked at once, books                128
``vt``                 vt                        variable tracking: a chain of four hops, noise     30
``cwe``                cwe                       the ten most common words of a numbered list       120
=====================  ========================  =================================================  ==========

The book tasks take their haystack from the held-out books (tasks/ruler_books.py), or from RULER's noise with
``haystack="noise"``. Each (task, length, sample) has its own seed (``task_seed``), so every setting and every run
sees the same prompts. Files: ruler_prompt.py (strings, sample, length search), ruler_niah.py, ruler_vt.py,
ruler_cwe.py (generators), ruler_books.py, ruler_words.py, ruler_score.py (scoring).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from plumbing.cli import resolve_choices
from tasks.ruler_books import BookHaystack
from tasks.ruler_cwe import CommonWords
from tasks.ruler_niah import Niah
from tasks.ruler_prompt import Built, Sample, eval_strings, fit_units, task_seed
from tasks.ruler_score import infer_kind
from tasks.ruler_vt import VariableTracking

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    name: str
    generator: Niah | VariableTracking | CommonWords
    max_new_tokens: int
    minimum: int = 1  # the fewest haystack units a prompt may have

    @property
    def needs_books(self) -> bool:
        return isinstance(self.generator, Niah) and self.generator.haystack == "essay"


TASKS = {t.name: t for t in (
    Task("niah_single_1", Niah("noise"), 128),
    Task("niah_single_2", Niah("essay"), 128),
    Task("niah_single_3", Niah("essay", value_type="uuids"), 128),
    Task("niah_multikey_1", Niah("essay", num_k=4), 128),
    Task("niah_multikey_2", Niah("needle"), 128),
    Task("niah_multikey_3", Niah("needle", key_type="uuids", value_type="uuids"), 128),
    Task("niah_multivalue", Niah("essay", num_v=4), 128),
    Task("niah_multiquery", Niah("essay", num_k=4, num_q=4), 128),
    Task("vt", VariableTracking(), 30),
    Task("cwe", CommonWords(), 120, minimum=11),
)}
# RULER's tokens to generate per task family, for its jsonl files (named by their folder, e.g. niah_single_1/)
FAMILY_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
HAYSTACK_CHOICES = ("book", "noise")


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """``--tasks`` names (or ``all``) -> task names in registry order, or a ``ValueError``."""
    return resolve_choices(names, list(TASKS), "--tasks", "task")


def task_for(name: str, haystack: str = "book") -> Task:
    """The registry's task, with its book haystack swapped for RULER's noise when ``haystack`` is "noise"."""
    task = TASKS[name]
    if haystack == "noise" and task.needs_books:
        return replace(task, generator=replace(task.generator, haystack="noise"))
    return task


def make_sample(task: Task, length: int, index: int, seed: int, count: Callable[[Built], int],
                books: BookHaystack | None = None, guess: int | None = None) -> tuple[Sample, int]:
    """One prompt of ``task`` whose tokens (``count``) and ``task.max_new_tokens`` fit in ``length``; returns it and
    its token count. ``guess``: a unit count to start the search from (the previous sample's)."""
    g = task.generator
    seed_list = task_seed(seed, task.name, length, index)
    if isinstance(g, CommonWords):
        def build(n: int) -> Built:
            return g.build(n, seed_list, length=length)
    else:
        def build(n: int) -> Built:
            return g.build(n, seed_list, books)
    budget = length - task.max_new_tokens
    built, units, tokens = fit_units(build, count, budget, guess, task.minimum)
    if tokens > budget:
        logger.warning("%s at %d tokens: the prompt with the fewest units already has %d tokens, over the %d left "
                       "after %d to generate", task.name, length, tokens, budget, task.max_new_tokens)
    sample = Sample(task.name, index, length, built.input, built.outputs, built.answer_prefix, task.max_new_tokens,
                    "all", g.kind, built.depths, built.needles, units)
    return sample, tokens


# ----------------------------------------------------------------------------- RULER's jsonl
def jsonl_task(path: Path) -> str:
    """A RULER jsonl's task: its folder's name (RULER writes ``<task>/validation.jsonl``), else the file's stem."""
    return path.parent.name if path.stem in ("validation", "test") and path.parent.name else path.stem


def jsonl_length(path: Path, rows: list[dict]) -> int | None:
    """The sequence length a RULER jsonl was made for: the last number in its path (RULER's layout
    ``.../<max_seq_length>/data/<task>/validation.jsonl``), else the largest ``length`` field, else None."""
    numbers = [int(p) for p in path.resolve().parts if p.isdigit()]
    if numbers:
        return numbers[-1]
    lengths = [int(r["length"]) for r in rows if isinstance(r.get("length"), (int, float))]
    return max(lengths) if lengths else None


def read_jsonl(path: str | Path, max_new_tokens: int | None = None, metric: str | None = None) -> list[Sample]:
    """The samples of a jsonl file RULER's ``prepare.py`` wrote: fields ``input``, ``outputs`` and, optionally,
    ``answer_prefix``, ``length`` and ``index``. Its task is named by its folder (``jsonl_task``); tokens to
    generate and the metric come from the task's family unless given (QA: ``part``, else ``all``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--jsonl {str(path)!r} does not exist; pass a jsonl file written by RULER's prepare.py.")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"--jsonl {path}, line {n}, is not JSON.") from None
        outputs = row.get("outputs") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(outputs, list) \
                or not outputs or not all(isinstance(o, str) for o in outputs):
            raise ValueError(f"--jsonl {path}, line {n}: a RULER sample needs 'input' (a string) and 'outputs' (a "
                             "non-empty list of strings).")
        rows.append(row)
    if not rows:
        raise ValueError(f"--jsonl {path} holds no samples.")
    task = jsonl_task(path)
    family = re.sub(r"_\d+$", "", task).split("_")[0]
    if max_new_tokens is None:
        if family not in FAMILY_NEW_TOKENS:
            raise ValueError(f"--jsonl {path}: task {task!r} is not one of RULER's families "
                             f"({', '.join(FAMILY_NEW_TOKENS)}); pass --max-new-tokens N.")
        max_new_tokens = FAMILY_NEW_TOKENS[family]
    metric = metric or ("part" if family == "qa" else "all")
    length = jsonl_length(path, rows) or 0
    logger.info("%s: task %s, length %d, %d samples, %d new tokens, string_match_%s", path, task, length, len(rows),
                max_new_tokens, metric)
    # the line number names a sample: RULER's niah files reuse "index" for the answer's character offset
    return [Sample(task, i, length, r["input"], list(r["outputs"]), r.get("answer_prefix", ""),
                   max_new_tokens, metric, infer_kind(r["outputs"], r["input"])) for i, r in enumerate(rows)]


__all__ = ["TASKS", "Task", "Sample", "BookHaystack", "eval_strings", "make_sample", "read_jsonl", "resolve_tasks",
           "task_for"]
