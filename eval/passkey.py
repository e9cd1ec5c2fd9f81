# Over 500 lines: one evaluation end to end (prompt calibration, trials, scoring by protocol and as read, report, CLI).
"""Passkey retrieval with the Landmark / LongLLaMA protocol: accuracy against prompt length, per setting.

    python eval/passkey.py --model models/fot-tiny --settings memory no-memory --out runs/passkey
    python eval/passkey.py --model models/fot-tiny --template all --depths 0 0.5 1 --out runs/passkey-all

The prompt is five lines joined by "\\n" (Landmark Attention's ``generate_prompt``, used by LongLLaMA):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz ...
    <filler[:n_prefix]>
    The pass key is K. Remember it. K is the pass key.
    <filler[:n_suffix]>
    What is the pass key? The pass key is

That is the default template, ``landmark``. ``--template`` picks others from tasks/passkey.py: other phrasings
of the three fixed lines and generated haystacks in place of the filler (held out of training). The filler is
FILLER repeated and joined by spaces; prefix and suffix both start at the filler's start. n_prefix is uniform in
[0, n_garbage] (or ``round(depth * n_garbage)`` with ``--depths``), then K is uniform in [1, 50000). Each
(length, trial) pair has its own seeded generator, so every setting, template and depth sees the same keys and
a run is reproducible. ``--prompts-for 16384:=10`` runs 10 of a length's prompts from 16384 tokens on, spread
evenly over templates and depths, where a full grid would take too long.

Lengths are exact: n_garbage is calibrated per template and length, then adjusted per trial (a few characters)
until the prompt has exactly the requested number of tokens, when the fixed lines fit in it.

Scoring: the model generates greedily exactly as many tokens as the answer " K" has; a trial is correct when
they equal the answer's tokens. The answer's tokens are the tail of tokenize(prompt + " " + K) after
tokenize(prompt) when the latter is a prefix of the former ("tail"); otherwise K tokenized alone without special
tokens ("separate"). results.json records which. With several templates, a length's accuracy is the mean over
templates, and each row also holds the per-template (and per-depth) accuracies.

The answer as read: the protocol never sees what the model writes after the answer's last token, so a model that
copies the key and runs on ("33543" -> "3354359") scores as right, while a user who calls ``generate`` reads the
wrong number. Each trial therefore generates ``--read-tokens`` (default 4) tokens beyond the answer (greedy
decoding: the first tokens are the protocol's) and is also scored as a reader reads it: right when the first
number in the generated text is the key, with no digit after it ("33543." and "33543\nWhat" are right, "3354359"
and "3354" are not; ``read_answer``). ``accuracy_read`` stands next to ``accuracy`` in every row and breakdown,
and the tables and plots show both.

Outputs (``--out DIR``): trials.jsonl (each finished trial as it arrives; ``--resume`` continues a killed run
from it), then at the end results.json (configuration, per setting and length: accuracy, n, token counts,
seconds, breakdowns and every trial), passkey.png (accuracy against prompt length, log2 axis, window marked) and,
with ``--depths``, passkey_depth.png (a length x depth heatmap of accuracy per setting).

Very long prompts (``--prefill-segment``, ``--offload-dir``): each prompt's memory is filled in segments before
``generate`` (``fot.prefill``; the result is that of one call), and with ``--offload-dir`` it lives in files on
disk, so a 1M-token prompt interrupted by a kill or the end of a session continues, with ``--resume``, from its
last window bound instead of from the start.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from eval.common import (
    PromptPrefill,
    Setting,
    TrialLog,
    add_model_arguments,
    add_prefill_arguments,
    add_run_arguments,
    add_settings_argument,
    check_full_attention_lengths,
    check_model_args,
    cell_peak_rss,
    cli_main,
    load_model,
    open_trials,
    finish_plot,
    new_figure,
    print_and_write,
    release_memory,
    run_identity,
    run_report,
    save_figure,
    setting_model,
    with_peak_rss,
)
from plumbing.cli import ArgumentParser
from plumbing.tokenizer import load_tokenizer
from tasks.passkey import DEFAULT_TEMPLATE, GRASS, LANDMARK_PHRASING, TEMPLATES, repeat_text, resolve_templates
from tasks.passkey_probe import PROBE_TEMPLATES

logger = logging.getLogger("eval.passkey")

TASK, QUESTION = LANDMARK_PHRASING.intro, LANDMARK_PHRASING.question
FILLER = GRASS.text
KEY_LOW, KEY_HIGH = 1, 50000  # K in [KEY_LOW, KEY_HIGH)
MIN_LENGTH = 64
READ_TOKENS = 4  # tokens generated beyond the answer to score it as read
NUMBER = re.compile(r"\d+(?:\.\d+)*")  # "33543" and "2.5" are one number each; "33543." ends at the digit
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


KNOWN_TEMPLATES = {**TEMPLATES, **PROBE_TEMPLATES}  # --template names; "all" stays the evaluated TEMPLATES


def template_names(names: Sequence[str]) -> list[str]:
    """``--template`` names -> template names: ``resolve_templates`` for the evaluated ones ("all" among them), then
    any probe template named (tasks/passkey_probe.py), which "all" leaves out."""
    probes = [n for n in names if n in PROBE_TEMPLATES]
    if len(set(probes)) != len(probes):
        raise ValueError(f"--template lists a template twice: {list(names)}.")
    rest = [n for n in names if n not in PROBE_TEMPLATES]
    return (resolve_templates(rest) if rest else []) + probes


def info_line(key: int) -> str:
    return LANDMARK_PHRASING.key_text(key)


def filler(n_chars: int) -> str:
    """The first ``n_chars`` characters of FILLER repeated and joined by spaces."""
    return repeat_text(FILLER, n_chars)


@dataclass
class PasskeyPrompt:
    text: str
    key: int
    n_garbage: int
    n_prefix: int


def build_prompt(n_garbage: int, rng: np.random.Generator, template: str = DEFAULT_TEMPLATE,
                 depth: float | None = None) -> PasskeyPrompt:
    """The protocol's prompt with ``n_garbage`` filler characters split at a uniform point, or at ``depth`` (the
    fraction of the filler before the key line), in ``template`` (see module doc)."""
    if n_garbage < 0:
        raise ValueError(f"n_garbage must be >= 0, got {n_garbage}.")
    n_prefix = int(rng.integers(0, n_garbage + 1))  # drawn before the key, as in the original
    key = int(rng.integers(KEY_LOW, KEY_HIGH))
    haystack_seed = int(rng.integers(0, 2**32))  # drawn last, so the split and key match the original's draws
    if depth is not None:
        n_prefix = round(depth * n_garbage)
    text = KNOWN_TEMPLATES[template].render(key, n_prefix, n_garbage - n_prefix, haystack_seed)
    return PasskeyPrompt(text, key, n_garbage, n_prefix)


def trial_rng(seed: int, length: int, trial: int) -> np.random.Generator:
    """The generator of one (requested length, trial) pair: independent of the setting and of other trials."""
    return np.random.default_rng([seed, length, trial])


# ----------------------------------------------------------------------------- tokenization
class PromptEncoder:
    """Token ids of prompts and answers.

    A prompt is tokenized as the tokenizer does by default (``add_special_tokens=True``), and BOS is prepended
    when the tokenizer has one but did not add it (the original's LLaMA tokenizer adds BOS; fot's sentencepiece
    tokenizers leave it to the caller, and the trainer prepends it).
    """

    def __init__(self, tokenizer, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.add_bos = add_bos and tokenizer.bos_token_id is not None

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        if self.add_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def answer_ids(self, prompt_text: str, prompt_ids: list[int], key: int) -> tuple[list[int], str]:
        """The answer's tokens and the method used: "tail" or "separate" (module docstring)."""
        full = self.encode(f"{prompt_text} {key}")
        if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
            return full[len(prompt_ids):], "tail"
        alone = list(self.tokenizer(str(key), add_special_tokens=False)["input_ids"])
        return alone, "separate"

    def chars_per_token(self, template: str = DEFAULT_TEMPLATE) -> float:
        """Characters per token of a template's filler, measured on a long stretch of it."""
        text = KNOWN_TEMPLATES[template].haystack.sample(40 * len(FILLER))
        return len(text) / max(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), 1)


def calibrate_n_garbage(encoder: PromptEncoder, target_tokens: int, template: str = DEFAULT_TEMPLATE,
                        iterations: int = 4) -> int:
    """Filler characters that give a prompt of about ``target_tokens`` tokens.

    Starts from the filler's characters per token and corrects with the measured length of a prompt split in
    the middle, until it is within 0.5% (``fit_prompt`` then makes each trial exact).
    """
    cpt = encoder.chars_per_token(template)
    render = KNOWN_TEMPLATES[template].render
    overhead = len(encoder.encode(render(25000, 0, 0, 0)))
    n_garbage = max(round((target_tokens - overhead) * cpt), 0)
    for _ in range(iterations):
        if n_garbage == 0:
            break
        actual = len(encoder.encode(render(25000, n_garbage // 2, n_garbage - n_garbage // 2, 0)))
        if abs(actual - target_tokens) <= max(1, 0.005 * target_tokens):
            break
        n_garbage = max(n_garbage + round((target_tokens - actual) * cpt), 0)
    return n_garbage


def fit_prompt(encoder: PromptEncoder, target: int, n_start: int, rng_factory, template: str,
               depth: float | None, cpt: float) -> tuple[PasskeyPrompt, list[int]]:
    """The trial's prompt (``build_prompt(n, rng_factory(), ...)``) and its ids, for an n near ``n_start`` that
    gives exactly ``target`` tokens; the closest count when none in reach does (e.g. the fixed lines alone are
    longer).

    The count is not monotone in n_garbage: the split point is drawn from it and a cut word can take one token or
    two. So steps along the characters-per-token slope get within a token or two, then a scan of neighbouring
    lengths finds an exact one.
    """
    tried: dict[int, tuple[PasskeyPrompt, list[int]]] = {}

    def miss(n: int) -> int:
        if n not in tried:
            prompt = build_prompt(n, rng_factory(), template, depth)
            tried[n] = (prompt, encoder.encode(prompt.text))
        return len(tried[n][1]) - target

    n = n_start
    for _ in range(6):
        off = miss(n)
        if off == 0 or (n == 0 and off > 0):
            return tried[n]
        step = -round(off * cpt) or (-1 if off > 0 else 1)
        if max(n + step, 0) in tried:
            break
        n = max(n + step, 0)
    best = min(tried, key=lambda m: (abs(miss(m)), m))
    reach = max(8, math.ceil(4 * cpt))
    for m in sorted(range(max(best - reach, 0), best + reach + 1), key=lambda m: abs(m - best)):
        if miss(m) == 0:
            return tried[m]
    return tried[min(tried, key=lambda m: (abs(miss(m)), m))]


@dataclass
class Trial:
    length: int  # requested prompt tokens
    trial: int
    key: int
    n_garbage: int
    n_prefix: int
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_method: str
    template: str = DEFAULT_TEMPLATE
    depth: float | None = None  # None: the split point is uniform

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids)


def spread_cells(n_templates: int, n_depths: int, trials: int, n: int) -> list[tuple[int, int, int]]:
    """``n`` of the (template, depth, trial) index triples, spread so that every template and every depth keeps
    about its share: the triples in diagonals, (template + depth + trial) mod ``n_depths`` = 0 first, then 1, ...
    With 5 templates and 3 depths, 10 of the 15 cells give each template two depths and each depth three or four
    templates (a plain prefix would drop whole templates)."""
    cells = [(i, j, t) for t in range(trials) for i in range(n_templates) for j in range(n_depths)]
    return sorted(sorted(cells, key=lambda c: ((c[0] + c[1] + c[2]) % n_depths, c[2], c[0], c[1]))[:n])


def make_trials(encoder: PromptEncoder, lengths: list[int], trials: int, seed: int,
                templates: Sequence[str] = (DEFAULT_TEMPLATE,), depths: Sequence[float] | None = None,
                prompts: dict[int, int] | None = None) -> dict[int, list[Trial]]:
    """The prompts of every (length, template, depth, trial), tokenized; the same for every setting.
    ``prompts``: at these lengths only this many of them, spread over templates and depths (``spread_cells``).

    ``build_prompt(tr.n_garbage, trial_rng(seed, length, tr.trial), tr.template, tr.depth)`` rebuilds a trial's
    prompt. Trial t has the same key in every template and depth.
    """
    from tqdm.auto import tqdm

    out: dict[int, list[Trial]] = {}
    depth_list = list(depths or [None])
    full = len(templates) * len(depth_list) * trials
    chosen = {n: spread_cells(len(templates), len(depth_list), trials, min((prompts or {}).get(n, full), full))
              for n in lengths}
    with tqdm(total=sum(map(len, chosen.values())), desc="prompts", unit="prompt", leave=False,
              dynamic_ncols=True) as bar:
        for length in lengths:
            out[length] = []
            for i, name in enumerate(templates):
                kept = [(j, t) for (ci, j, t) in chosen[length] if ci == i]
                if not kept:
                    continue
                n_garbage, cpt = calibrate_n_garbage(encoder, length, name), encoder.chars_per_token(name)
                for j, t in sorted(kept):
                    depth = depth_list[j]
                    p, ids = fit_prompt(encoder, length, n_garbage, lambda: trial_rng(seed, length, t), name, depth,
                                        cpt)
                    answer, method = encoder.answer_ids(p.text, ids, p.key)
                    out[length].append(Trial(length, t, p.key, p.n_garbage, p.n_prefix, ids, answer, method, name,
                                             depth))
                    bar.update(1)
            _warn_about_lengths(encoder, length, out[length])
    methods = {tr.answer_method for ts in out.values() for tr in ts}
    if "separate" in methods:
        logger.warning("the prompt's tokens are not a prefix of prompt + ' ' + K's for some trials; their answers "
                       "are K tokenized alone without special tokens")
    return out


def _warn_about_lengths(encoder: PromptEncoder, length: int, trials: list[Trial]) -> None:
    mean = float(np.mean([tr.tokens for tr in trials]))
    if abs(mean - length) > 0.1 * length:
        names = {tr.template for tr in trials}
        fixed = max(len(encoder.encode(KNOWN_TEMPLATES[name].render(25000, 0, 0, 0))) for name in names)
        logger.warning("length %d: prompts have %.0f tokens on average; the prompt without filler already has "
                       "%d tokens with this tokenizer", length, mean, fixed)
    elif any(tr.tokens != length for tr in trials):
        worst = max(abs(tr.tokens - length) for tr in trials)
        logger.warning("length %d: %d prompts miss the exact length by up to %d tokens", length,
                       sum(tr.tokens != length for tr in trials), worst)


# ----------------------------------------------------------------------------- scoring
def greedy_answer(model, prompt_ids: list[int], n_tokens: int, device: str | torch.device = "cpu",
                  prefill: PromptPrefill | None = None, job: str = "", **generate_kwargs) -> list[int]:
    """Greedily generate exactly ``n_tokens`` tokens (fewer if the model stops at EOS) after the prompt. With
    ``prefill``, the prompt's memory is filled in segments first (job ``job``), then ``generate`` runs the rest."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if prefill is not None:
        generate_kwargs = {**generate_kwargs, "cache": prefill.cache(job, model, ids)}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                             num_beams=1, use_cache=True, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()


def is_correct(predicted: list[int], answer: list[int]) -> bool:
    """Exact match over all the answer's tokens."""
    return list(predicted) == list(answer)


def read_answer(text: str) -> str | None:
    """The number a reader takes as the answer: the first run of digits in ``text`` (with any decimal part), or
    None when there is none. " 33543. Remember" -> "33543"; " 3354359" -> "3354359"."""
    match = NUMBER.search(text)
    return None if match is None else match.group()


def is_correct_read(text: str, key: int) -> bool:
    """The answer as read: the first number in the generated ``text`` is ``key``, with no digit after it."""
    return read_answer(text) == str(key)


def depth_name(depth: float | None) -> str:
    return "uniform" if depth is None else f"{depth:g}"


def summarize(records: list[dict]) -> dict:
    """Accuracy of ``records`` as the mean over their templates (pooled within one), with counts."""
    out = {}
    for field, suffix in (("correct", ""), ("correct_read", "_read")):
        per_template = defaultdict(list)
        for r in records:
            per_template[r["template"]].append(r[field])
        out[f"accuracy{suffix}"] = float(np.mean([100.0 * sum(v) / len(v) for v in per_template.values()]))
        out[f"correct{suffix}"] = sum(r[field] for r in records)
    return {**out, "n": len(records)}


def trial_key(setting: str, tr: Trial) -> tuple:
    """A trial's key in the trials log: (setting, template, depth, length, trial)."""
    return setting, tr.template, tr.depth, tr.length, tr.trial


def logged_trial(log: TrialLog | None, setting: str, tr: Trial) -> dict | None:
    """The trial's logged result (checked against its key and prompt length), or None when it has not run."""
    return None if log is None else log.get(trial_key(setting, tr), key=tr.key, tokens=tr.tokens)


def key_token(tr: Trial) -> int | None:
    """Where the key sits in the prompt: the index of the first token of the first run of the answer's tokens in
    ``prompt_ids`` (None when the key line tokenizes differently). With W-token windows, ``key_token % W`` is the
    key's offset in its window: a key in the first few tokens of a window is read with almost no local context,
    which the score by position shows (docs/results.md)."""
    n, ids, ans = len(tr.answer_ids), tr.prompt_ids, tr.answer_ids
    return next((i for i in range(len(ids) - n + 1) if ids[i:i + n] == ans), None)


def score_trial(model, tr: Trial, tokenizer, device, read_tokens: int = READ_TOKENS,
                prefill: PromptPrefill | None = None, job: str = "", **generate_kwargs) -> dict:
    """One trial's result record, with the seconds it took (not part of results.json's record): the protocol's
    score on the first ``len(answer_ids)`` generated tokens, the score as read on them and ``read_tokens`` more.
    A prompt prefilled from disk counts the seconds its earlier processes spent too."""
    start = time.perf_counter() - (0.0 if prefill is None else prefill.earlier_seconds(job))
    n = len(tr.answer_ids)
    generated = greedy_answer(model, tr.prompt_ids, n + read_tokens, device, prefill, job, **generate_kwargs)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return {"trial": tr.trial, "template": tr.template, "depth": tr.depth, "key": tr.key, "tokens": tr.tokens,
            "n_garbage": tr.n_garbage, "n_prefix": tr.n_prefix, "key_token": key_token(tr), "answer_ids": tr.answer_ids,
            "predicted_ids": generated[:n], "read_ids": generated[n:], "read_text": text,
            "answer_read": read_answer(text), "answer_method": tr.answer_method,
            "correct": is_correct(generated[:n], tr.answer_ids), "correct_read": is_correct_read(text, tr.key),
            "seconds": time.perf_counter() - start}


def evaluate(model, trials: dict[int, list[Trial]], tokenizer, device="cpu", desc: str = "passkey",
             log: TrialLog | None = None, setting: str = "", read_tokens: int = READ_TOKENS,
             prefill: PromptPrefill | None = None, **generate_kwargs) -> list[dict]:
    """Score every trial; returns one summary per length with its trials (tqdm progress over all trials).
    ``tokenizer`` decodes the generated tokens for the score as read (``score_trial``). ``prefill`` fills each
    prompt's memory in segments first (``--prefill-segment``, ``--offload-dir``), its job named by the trial key.

    With ``log``, trials it holds for ``setting`` are taken from it (``model`` is then not called for them) and
    each new one is appended to it as soon as it is scored. A row's accuracy is the mean over templates;
    ``by_template`` and, with depths, ``by_depth`` break it down; its seconds are the sum of its trials'.
    """
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=sum(len(v) for v in trials.values()), desc=desc, unit="trial", dynamic_ncols=True) as bar:
        for length, ts in trials.items():
            records, seconds = [], 0.0
            for tr in ts:
                record = logged_trial(log, setting, tr)
                if record is None:
                    job = json.dumps(trial_key(setting, tr))
                    record = with_peak_rss(score_trial, model, tr, tokenizer, device, read_tokens, prefill, job,
                                           **generate_kwargs)
                    release_memory()
                    if log is not None:
                        log.put(trial_key(setting, tr), record)
                    if prefill is not None:
                        prefill.finish(job)
                seconds += record["seconds"]
                records.append({k: v for k, v in record.items() if k != "seconds"})
                bar.update(1)
            row = {"length": length, "mean_tokens": float(np.mean([r["tokens"] for r in records])),
                   "min_tokens": min(r["tokens"] for r in records), "max_tokens": max(r["tokens"] for r in records),
                   **summarize(records), "seconds": seconds, "peak_rss_bytes": cell_peak_rss(records)}
            row["by_template"] = {name: summarize([r for r in records if r["template"] == name])
                                  for name in dict.fromkeys(r["template"] for r in records)}
            if any(r["depth"] is not None for r in records):
                row["by_depth"] = {depth_name(d): summarize([r for r in records if r["depth"] == d])
                                   for d in dict.fromkeys(r["depth"] for r in records)}
            rows.append({**row, "trials": records})
            bar.set_postfix(length=length, acc=f"{row['accuracy']:.0f}%", read=f"{row['accuracy_read']:.0f}%")
    return rows


def row_at(rows: list[dict], length: int) -> dict | None:
    """A setting's row for ``length``, or None when ``--lengths-for`` leaves that length out of the setting."""
    return next((r for r in rows if r["length"] == length), None)


def both(row: dict) -> str:
    """A row's two accuracies as a table cell: "protocol / as read", in %."""
    return f"{row['accuracy']:.1f} / {row['accuracy_read']:.1f}%"


def format_table(lengths: list[int], results: dict[str, list[dict]]) -> str:
    """Rows = requested lengths with the actual mean token count, columns = settings (accuracy % of the protocol
    and as read, and n; "-" where a setting does not run at that length)."""
    names = list(results)
    width = max([22] + [len(n) + 2 for n in names])
    header = f"{'length':>8} {'tokens':>8}" + "".join(f"{n:>{width}}" for n in names)
    lines = ["accuracy %: protocol / as read (n)", header, "-" * len(header)]
    for length in lengths:
        rows = [row_at(results[n], length) for n in names]
        first = next(r for r in rows if r is not None)
        cells = "".join(f"{'-':>{width}}" if r is None else f"{both(r):>{width - 5}} ({r['n']:>2})" for r in rows)
        lines.append(f"{length:>8} {first['mean_tokens']:>8.0f}{cells}")
    return "\n".join(lines)


def format_breakdown(lengths: list[int], results: dict[str, list[dict]], field: str, label: str) -> str:
    """Rows = (length, template or depth) from each row's ``field`` breakdown, columns = settings (accuracy % of
    the protocol and as read)."""
    names = list(results)
    # Every group of any row: with --prompts-for capping a length below the template (or depth) count, a row may
    # hold only some of them; the others print as "-".
    groups = list(dict.fromkeys(g for rows in results.values() for row in rows for g in row[field]))
    width = max([16] + [len(n) + 2 for n in names])
    first = max([len(label)] + [len(g) for g in groups]) + 2
    header = f"{'length':>8}  {label:<{first}}" + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for length in lengths:
        rows = [row_at(results[n], length) for n in names]
        for g in groups:
            cells = "".join(f"{'-':>{width}}" if r is None or g not in r[field] else f"{both(r[field][g]):>{width}}"
                            for r in rows)
            lines.append(f"{length:>8}  {g:<{first}}{cells}")
    return "\n".join(lines)


def accuracy_curve(rows: list[dict], lengths: list[int], field: str | None = None, group: str | None = None,
                   score: str = "accuracy") -> list:
    """Accuracy per length (NaN where the setting did not run: plots leave a gap); ``score`` "accuracy" (the
    protocol) or "accuracy_read" (as read)."""
    out = []
    for length in lengths:
        r = row_at(rows, length)
        if r is not None and field is not None:
            r = r[field].get(group)  # None where --prompts-for left this group out of the length
        out.append(float("nan") if r is None else r[score])
    return out


SCORES = {"accuracy": "protocol", "accuracy_read": "as read"}


def plot_both(path: Path, xs: list[int], curves: dict[str, dict[str, list[float]]], window: int, title: str,
              xlabel: str = "prompt length (tokens)") -> None:
    """Accuracy (%) against ``xs`` on a log2 axis, window marked: one colour per setting, a solid line for the
    protocol's score and a dashed one for the score as read (``curves[setting][score]``)."""
    fig, ax = new_figure()
    for i, (name, scores) in enumerate(curves.items()):
        for score, style, marker in (("accuracy", "-", "o"), ("accuracy_read", "--", "x")):
            ax.plot(xs, scores[score], color=f"C{i}", linestyle=style, marker=marker, alpha=0.85,
                    label=f"{name}, {SCORES[score]}")
    ax.axvline(window, color="grey", linestyle="--", linewidth=1)
    ax.annotate(f" window {window}", (window, 103), color="grey", fontsize=8, va="bottom")
    ax.set(ylim=(-3, 110), xlabel=xlabel, ylabel="accuracy (%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(n) for n in xs], rotation=45 if len(xs) > 8 else 0)
    finish_plot(fig, ax, path, title)


def plot_depth_heatmap(path: Path, lengths: list[int], results: dict[str, list[dict]], title: str) -> None:
    """One panel per setting (columns) and score (rows: the protocol's, as read): accuracy (%) by depth (a panel's
    rows, 0 = key at the start) and length (its columns)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    names = list(results)
    depths = list(results[names[0]][0]["by_depth"])  # every setting runs at one length at least
    panel = max(2.4, 0.75 * len(lengths))
    fig, axes = plt.subplots(2, len(names), figsize=(1.6 + panel * len(names), 2.6 + 0.9 * len(depths)),
                             sharex=True, sharey=True, squeeze=False)
    for (row, score), (col, name) in ((rs, cn) for rs in enumerate(SCORES) for cn in enumerate(names)):
        ax = axes[row][col]
        acc = np.array([accuracy_curve(results[name], lengths, "by_depth", d, score) for d in depths])
        image = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(acc):
            if np.isnan(value):  # a length this setting does not run at (--lengths-for): left blank
                continue
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 60 else "black")  # readable on both ends of the colormap
        ax.set_title(f"{name}, {SCORES[score]}", fontsize=9)
    for ax in axes[-1]:  # shared x: ticks and label on the bottom row only, clear of the titles below the top row
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_xlabel("prompt length (tokens)")
    for row in axes:
        row[0].set_yticks(range(len(depths)), depths)
        row[0].set_ylabel("depth of the key (0 = start)")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy (%)")
    fig.suptitle(title, fontsize=10, y=1.02)
    save_figure(fig, path, bbox_inches="tight")


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS,
                   help=f"prompt lengths in tokens (default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--trials", type=int, default=20, help="prompts per length, template and depth (default 20)")
    p.add_argument("--template", nargs="+", default=[DEFAULT_TEMPLATE],
                   help=f"prompt templates: all, or any of {', '.join(TEMPLATES)} (default {DEFAULT_TEMPLATE}); "
                        f"also {', '.join(PROBE_TEMPLATES)}, a one-off check that 'all' leaves out")
    p.add_argument("--depths", type=float, nargs="+",
                   help="place the key at these fractions of the filler (0 = start, 1 = end) instead of a uniform "
                        "split, and plot a length x depth heatmap")
    add_settings_argument(p)
    p.add_argument("--lengths-for", nargs="+", default=[], metavar="SETTING=LO:HI",
                   help="run a setting only at the lengths in [LO, HI] (either bound may be left out), e.g. "
                        "memory=:8192 topk-ivf:32=16384: (dense memory where it is fast, kNN beyond)")
    p.add_argument("--prompts-for", nargs="+", default=[], metavar="LO:HI=N",
                   help="at the lengths in [LO, HI] (either bound may be left out) run only N of the prompts of "
                        "every template, depth and trial, spread evenly over templates and depths, e.g. 16384:=10 "
                        "(fewer prompts where they are slow)")
    p.add_argument("--last-context-length", type=int, help="override last_context_length for generate()")
    p.add_argument("--cache-policy", choices=["slide", "flush"], help="override the cache policy for generate()")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (length, trial) is seeded from it")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to prompts (default: as the tokenizer_config.json declares, else BOS)")
    p.add_argument("--read-tokens", type=int, default=READ_TOKENS,
                   help=f"tokens generated beyond the answer for the score as read (default {READ_TOKENS})")
    add_prefill_arguments(p)
    add_run_arguments(p, "output directory for trials.jsonl, results.json, passkey.png (and passkey_depth.png); "
                         "checked before any model is loaded")
    return p


def run_config(args, model_dir: Path, tokenizer_dir: Path, settings: list[Setting]) -> dict:
    """What determines a run's results: a resumed run must have the same (``TrialLog``)."""
    return {**run_identity("passkey", args, model_dir, tokenizer_dir, settings), "lengths": sorted(args.lengths),
            "trials": args.trials, "templates": args.template, "depths": args.depths,
            "last_context_length": args.last_context_length, "cache_policy": args.cache_policy,
            "read_tokens": args.read_tokens, **({"lengths_for": args.lengths_for} if args.lengths_for else {}),
            **({"prompts_for": args.prompts_for} if args.prompts_for else {})}


def lengths_in(bounds: str, lengths: list[int]) -> list[int] | None:
    """The ``lengths`` (sorted) within an inclusive range written "LO:HI" (either side may be empty: no bound), or
    None when ``bounds`` is not written so."""
    lo, colon, hi = bounds.partition(":")
    if not colon or not (lo.isdigit() or not lo) or not (hi.isdigit() or not hi):
        return None
    low, high = int(lo or 0), int(hi) if hi else math.inf
    return [n for n in sorted(lengths) if low <= n <= high]


def parse_lengths_for(texts: list[str], settings: list[Setting], lengths: list[int]) -> dict[str, list[int]]:
    """``--lengths-for`` -> the lengths each setting runs at (all of them unless named)."""
    names = [s.name for s in settings]
    out = {name: sorted(lengths) for name in names}
    seen = set()
    for text in texts:
        name, sep, bounds = text.rpartition("=")
        matched = lengths_in(bounds, lengths) if sep else None
        if matched is None:
            raise ValueError(f"--lengths-for {text!r}: write SETTING=LO:HI, e.g. memory=:8192 or topk-ivf:32=16384:.")
        if name not in names:
            raise ValueError(f"--lengths-for {text!r}: {name!r} is not among --settings {names}.")
        if name in seen:
            raise ValueError(f"--lengths-for names {name!r} twice.")
        seen.add(name)
        if not matched:
            raise ValueError(f"--lengths-for {text!r}: none of --lengths {sorted(lengths)} is in that range.")
        out[name] = matched
    return out


def parse_prompts_for(texts: list[str], lengths: list[int], per_length: int) -> dict[int, int]:
    """``--prompts-for`` -> {length: prompts} for the lengths it caps (``per_length``: the uncapped count)."""
    out: dict[int, int] = {}
    for text in texts:
        bounds, sep, count = text.rpartition("=")
        matched = lengths_in(bounds, lengths) if sep and count.isdigit() else None
        if matched is None:
            raise ValueError(f"--prompts-for {text!r}: write LO:HI=N, e.g. 16384:=10 (N prompts at 16384 tokens "
                             "and beyond).")
        n = int(count)
        if not 1 <= n <= per_length:
            raise ValueError(f"--prompts-for {text!r}: N must be between 1 and the {per_length} prompts a length "
                             "has (templates x depths x --trials).")
        if not matched:
            raise ValueError(f"--prompts-for {text!r}: none of --lengths {sorted(lengths)} is in that range.")
        for m in matched:
            if m in out:
                raise ValueError(f"--prompts-for: length {m} is in two ranges ({texts}).")
            out[m] = n
    return out


def validate_args(args) -> tuple[Path, Path, list[Setting], TrialLog | None]:
    bad = [n for n in args.lengths if n < MIN_LENGTH]
    if bad:
        raise ValueError(f"--lengths {bad}: prompt lengths must be at least {MIN_LENGTH} tokens (the fixed lines "
                         "of the prompt alone take about 60).")
    if len(set(args.lengths)) != len(args.lengths):
        raise ValueError(f"--lengths lists a length twice: {args.lengths}.")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}.")
    if args.read_tokens < 1:
        raise ValueError(f"--read-tokens must be >= 1 (the score as read looks past the answer), got "
                         f"{args.read_tokens}.")
    args.template = template_names(args.template)
    if args.depths is not None:
        if any(not 0.0 <= d <= 1.0 for d in args.depths):
            raise ValueError(f"--depths {args.depths}: depths are fractions of the filler in [0, 1].")
        if len(set(args.depths)) != len(args.depths):
            raise ValueError(f"--depths lists a depth twice: {args.depths}.")
    if args.last_context_length is not None and args.last_context_length < 1:
        raise ValueError(f"--last-context-length must be >= 1, got {args.last_context_length}.")
    settings, model_dir, tokenizer_dir, config = check_model_args(args, full_attention_baseline=True)
    window = config.get("max_position_embeddings")
    if args.last_context_length is not None and window is not None and args.last_context_length > window:
        raise ValueError(f"--last-context-length {args.last_context_length} exceeds the model's window "
                         f"(max_position_embeddings={window}); use a value <= {window}.")
    PromptPrefill.check_args(args, settings, window)
    args.setting_lengths = parse_lengths_for(args.lengths_for, settings, args.lengths)
    check_full_attention_lengths(settings, args.setting_lengths)
    per_length = len(args.template) * len(args.depths or [None]) * args.trials
    args.prompts = parse_prompts_for(args.prompts_for, args.lengths, per_length)
    log = open_trials(args, run_config(args, model_dir, tokenizer_dir, settings))
    return model_dir, tokenizer_dir, settings, log


def generation_kwargs(args, tokenizer) -> dict:
    """The ``generate`` overrides every call gets: the CLI's window options and a pad id (silences a warning)."""
    kwargs = {}
    if args.last_context_length is not None:
        kwargs["last_context_length"] = args.last_context_length
    if args.cache_policy is not None:
        kwargs["cache_policy"] = args.cache_policy
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def run(args, validated: tuple[Path, Path, list[Setting], TrialLog | None] | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``).

    Raises ``ValueError`` for bad arguments, an unwritable ``--out`` or a refused ``--resume`` (see
    ``validate_args``) before any model is loaded. A setting whose trials are all in the log is not loaded.
    """
    model_dir, tokenizer_dir, settings, log = validated or validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted(args.lengths)
    encoder = PromptEncoder(load_tokenizer(tokenizer_dir), add_bos=args.bos)
    trials = make_trials(encoder, lengths, args.trials, args.seed, args.template, args.depths, args.prompts)
    gen_kwargs = generation_kwargs(args, encoder.tokenizer)
    prefill = PromptPrefill.from_args(args)

    results, configs = {}, {}
    for setting in settings:
        mine = {n: ts for n, ts in trials.items() if n in args.setting_lengths[setting.name]}
        pending = any(logged_trial(log, setting.name, tr) is None for ts in mine.values() for tr in ts)
        model, configs[setting.name] = setting_model(
            log, setting, pending, lambda: load_model(model_dir, setting, args.device, args.dtype),
            lambda cfg: describe_setting(setting, cfg, args))
        if prefill is not None and model is not None:
            prefill.configure(model)
        start = time.perf_counter()
        results[setting.name] = evaluate(model, mine, encoder.tokenizer, args.device, desc=setting.name, log=log,
                                         setting=setting.name, read_tokens=args.read_tokens, prefill=prefill,
                                         **gen_kwargs)
        logger.info("%s: %.1f s", setting.name, time.perf_counter() - start)
        del model
    window = configs[settings[-1].name]["window"]

    fields = {"lengths": lengths, "trials": args.trials, "templates": args.template, "depths": args.depths,
              "read_tokens": args.read_tokens, "seed": args.seed, "bos": encoder.add_bos,
              "setting_lengths": args.setting_lengths,
              "prompts_per_length": {n: len(trials[n]) for n in lengths}}
    methods = [tr.answer_method for ts in trials.values() for tr in ts]
    report = run_report("passkey", args, model_dir, tokenizer_dir, window, fields, configs, results, methods)
    tables = [format_table(lengths, results)]
    both_scores = "(accuracy %: protocol / as read)"
    if len(args.template) > 1:
        tables.append(f"\nper template {both_scores}\n" + format_breakdown(lengths, results, "by_template", "template"))
    if args.depths:
        tables.append(f"\nper depth {both_scores}\n" + format_breakdown(lengths, results, "by_depth", "depth"))
    return print_and_write(args, report, "\n".join(tables), plots(report, model_dir.name))


def describe_setting(setting: Setting, cfg, args) -> dict:
    """A setting's effective configuration, as results.json records it (lookup.py's too)."""
    described = {"overrides": setting.overrides, "window": cfg.max_position_embeddings,
                 "mem_layers": list(cfg.mem_layers), "mem_top_k": cfg.mem_top_k, "mem_index": cfg.mem_index,
                 "mem_blocks": cfg.mem_blocks, "window_overlap": cfg.window_overlap,
                 "mem_score_bias": cfg.mem_score_bias}
    if cfg.mem_rope_distance is not None:  # only when set: records of runs before the setting stay as they were
        described["mem_rope_distance"] = cfg.mem_rope_distance
    if getattr(cfg, "mem_heads", None) is not None:  # the same: JSON's string keys, so a logged setting compares equal on --resume
        described["mem_heads"] = {str(layer): heads for layer, heads in cfg.mem_heads.items()}
    return {**described, "last_context_length": args.last_context_length or cfg.last_context_length,
            "cache_policy": args.cache_policy or cfg.cache_policy}


def plots(report: dict, model_name: str) -> dict:
    """passkey.png and, with depths, passkey_depth.png, each as a function of the path to draw it to."""
    lengths, results, templates = report["lengths"], report["results"], report["templates"]
    what = templates[0] if len(templates) == 1 else f"mean of {len(templates)} templates"
    accuracy = {n: {score: accuracy_curve(rows, lengths, score=score) for score in SCORES}
                for n, rows in results.items()}
    per = "template and depth" if report["depths"] else "template" if len(templates) > 1 else "length"
    n = report["trials"]
    title = f"passkey retrieval: {model_name}, {what} ({n} trial{'s' if n > 1 else ''} per {per})"
    out = {"passkey.png": lambda path: plot_both(path, lengths, accuracy, report["window"], title)}
    if report["depths"]:
        depth_title = f"passkey accuracy by key depth: {model_name}, {what}"
        out["passkey_depth.png"] = lambda path: plot_depth_heatmap(path, lengths, results, depth_title)
    return out


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, validate_args, run, argv)


if __name__ == "__main__":
    main()
