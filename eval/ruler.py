"""RULER-style tasks (NVIDIA/RULER) on a checkpoint's settings: scores against prompt length, per task.

    python eval/ruler.py --model models/smollm2-fot --lengths 4096 16384 --samples 10 \\
        --settings no-memory memory --out runs/ruler
    python eval/ruler.py --model models/smollm2-fot --jsonl ruler_data/4096/data/niah_single_1/validation.jsonl \\
        --out runs/ruler-jsonl

The tasks (tasks/ruler.py) are RULER's families that need no download: needles in noise, in held-out books
(``--books``, from ``make assets``; ``--haystack noise`` puts RULER's noise there instead) and among distractor
needles; multi-key, multi-value and multi-query needles; variable tracking; common-words extraction. A prompt is
RULER's task template and answer prefix, with no chat template unless ``--chat-template``; a length counts the
prompt's tokens and the tokens to generate (RULER's ``max_seq_length``). Each (task, length, sample) has its own
seed, so every setting sees the same prompts. ``--jsonl FILE ...`` scores files written by RULER's prepare.py
(``input``, ``outputs``, ``answer_prefix``) as they are.

Generation is greedy, at most the task's tokens (RULER's: 128 needles, 30 vt, 120 cwe; ``--max-new-tokens``),
stopping at EOS. Two scores (tasks/ruler_score.py): RULER's (``string_match_all``: the share of the references
contained in the answer, case-insensitively, with partial credit; ``string_match_part`` for RULER's QA files), and
*read*: the share of answers whose answer line (the first that names an item of the answers' kind, e.g. a number)
names exactly the references and nothing else of their kind.

Very long prompts (``--prefill-segment``, ``--offload-dir``), as in eval/passkey.py: each prompt's memory is filled in
segments before ``generate``, with a progress bar in tokens (``fot.prefill``; the answer is that of one call), and
with ``--offload-dir`` it lives in files on disk, so ``--resume`` continues a killed prompt from its last segment.

Outputs (``--out DIR``): trials.jsonl (each answer as it arrives; ``--resume`` continues a killed run), then
results.json (configuration; per setting, task and length: both scores, n, tokens, seconds and every sample's
answer) and ruler.png (one panel per task and the mean over tasks: score against length, RULER's solid, read
dashed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from eval.common import (
    LINE_STYLES,
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
    print_and_write,
    release_memory,
    run_identity,
    run_report,
    save_figure,
    setting_model,
    with_peak_rss,
)
from eval.passkey import PromptEncoder, describe_setting, generation_kwargs, greedy_answer
from tasks.ruler import (
    HAYSTACK_CHOICES,
    TASKS,
    BookHaystack,
    Sample,
    Task,
    make_sample,
    read_jsonl,
    resolve_tasks,
    task_for,
)
from tasks.ruler_books import DEFAULT_BOOKS
from tasks.ruler_score import METRICS, postprocess, read_correct
from plumbing.cli import ArgumentParser
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger("eval.ruler")

DEFAULT_LENGTHS = [4096]
DEFAULT_SAMPLES = 10
MIN_PROMPT = 64  # the fewest prompt tokens a length must leave after the tokens to generate


# ----------------------------------------------------------------------------- prompts
class RulerEncoder(PromptEncoder):
    """Token ids of a sample's prompt: RULER's ``input + answer_prefix`` as a base model reads it (BOS as eval/passkey.py
    adds it), or with ``chat`` the input as the user's turn of the tokenizer's chat template, the answer prefix
    after the assistant turn's opening."""

    def __init__(self, tokenizer, add_bos: bool = True, chat: bool = False):
        super().__init__(tokenizer, add_bos)
        self.chat = chat

    def text(self, input_text: str, answer_prefix: str) -> str:
        if not self.chat:
            return input_text + answer_prefix
        opened = self.tokenizer.apply_chat_template([{"role": "user", "content": input_text}], tokenize=False,
                                                    add_generation_prompt=True)
        return opened + answer_prefix  # as RULER's chat model templates: the prefix follows the turn's opening as is

    def ids(self, input_text: str, answer_prefix: str) -> list[int]:
        return self.encode(self.text(input_text, answer_prefix))


def make_samples(encoder: RulerEncoder, tasks: list[Task], lengths: list[int], samples: int, seed: int,
                 books: BookHaystack | None) -> list[Sample]:
    """Every (task, length, sample) prompt, fitted to its length with ``encoder``'s tokenizer; the same for every
    setting and run."""
    from tqdm.auto import tqdm

    def count(built) -> int:
        return len(encoder.ids(built.input, built.answer_prefix))

    out = []
    with tqdm(total=len(tasks) * len(lengths) * samples, desc="prompts", unit="prompt", leave=False,
              dynamic_ncols=True) as bar:
        for task in tasks:
            for length in lengths:
                guess = None  # then each sample's search starts from the previous one's unit count
                for index in range(samples):
                    sample, _ = make_sample(task, length, index, seed, count, books, guess)
                    guess = sample.units
                    out.append(sample)
                    bar.update(1)
    return out


# ----------------------------------------------------------------------------- scoring
def trial_key(setting: str, s: Sample) -> tuple:
    return setting, s.task, s.length, s.index


def score_sample(model, encoder: RulerEncoder, s: Sample, device, prefill: PromptPrefill | None = None, job: str = "",
                 **generate_kwargs) -> dict:
    """One sample's record: the answer, RULER's score (0-1, partial credit), the read score, and the seconds (with
    ``prefill`` from disk, those of the earlier processes that prefilled it too)."""
    start = time.perf_counter() - (0.0 if prefill is None else prefill.earlier_seconds(job))
    ids = encoder.ids(s.input, s.answer_prefix)
    new = greedy_answer(model, ids, s.max_new_tokens, device, prefill, job, **generate_kwargs)
    answer = encoder.tokenizer.decode(new, skip_special_tokens=True)
    return {"task": s.task, "index": s.index, "length": s.length, "tokens": len(ids), "outputs": s.outputs,
            "answer": answer, "new_tokens": len(new), "metric": s.metric, "kind": s.kind,
            "score": METRICS[s.metric](postprocess(answer), s.outputs),
            "read": read_correct(answer, s.outputs, s.kind, s.metric, s.input), "depths": s.depths, "units": s.units,
            "seconds": time.perf_counter() - start}


def summarize(task: str, length: int, records: list[dict], seconds: float) -> dict:
    tokens = [r["tokens"] for r in records]
    return {"task": task, "length": length, "n": len(records),
            "score": 100.0 * float(np.mean([r["score"] for r in records])),
            "read": 100.0 * float(np.mean([r["read"] for r in records])),
            "mean_tokens": float(np.mean(tokens)), "min_tokens": min(tokens), "max_tokens": max(tokens),
            "seconds": seconds, "peak_rss_bytes": cell_peak_rss(records), "samples": records}


def evaluate(model, encoder: RulerEncoder, samples: list[Sample], device="cpu", desc: str = "ruler",
             log: TrialLog | None = None, setting: str = "", show: bool = False, prefill: PromptPrefill | None = None,
             **generate_kwargs) -> list[dict]:
    """Score every sample; one row per (task, length) in the samples' order. Samples that ``log`` holds for
    ``setting`` are taken from it; each new one is appended to it as soon as it is scored. ``prefill`` fills each
    prompt's memory in segments first (``--prefill-segment``, ``--offload-dir``), its job named by the trial key."""
    from tqdm.auto import tqdm

    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.length), []).append(s)
    rows = []
    with tqdm(total=len(samples), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for (task, length), group in groups.items():
            records, seconds = [], 0.0
            for s in group:
                record = None if log is None else log.get(trial_key(setting, s), outputs=s.outputs, units=s.units)
                if record is None:
                    job = json.dumps(trial_key(setting, s))
                    record = with_peak_rss(score_sample, model, encoder, s, device, prefill, job, **generate_kwargs)
                    release_memory()
                    if log is not None:
                        log.put(trial_key(setting, s), record)
                    if prefill is not None:
                        prefill.finish(job)
                if show:
                    tqdm.write(f"{setting} {task} {length} #{s.index}: {'right' if record['read'] else 'wrong'} "
                               f"(score {record['score']:.2f}); expected {s.outputs}, answered "
                               f"{postprocess(record['answer'])[:160]!r}")
                seconds += record["seconds"]
                records.append({k: v for k, v in record.items() if k != "seconds"})
                bar.update(1)
            rows.append(summarize(task, length, records, seconds))
            bar.set_postfix(task=task, length=length, score=f"{rows[-1]['score']:.0f}%")
    return rows


def averages(rows: list[dict]) -> dict[int, dict]:
    """Per length: the mean over tasks of both scores (each task weighs the same, as in RULER's average)."""
    out = {}
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        out[length] = {"score": float(np.mean([r["score"] for r in mine])),
                       "read": float(np.mean([r["read"] for r in mine])), "tasks": len(mine)}
    return out


# ----------------------------------------------------------------------------- report
def format_table(results: dict[str, list[dict]]) -> str:
    """Rows = (task, length) with the mean prompt tokens; columns = settings, "RULER score / read" in percent."""
    names = list(results)
    width = max([17] + [len(n) + 2 for n in names])
    first_rows = next(iter(results.values()))
    task_w = max([6] + [len(r["task"]) for r in first_rows]) + 2
    header = f"{'task':<{task_w}}{'length':>7} {'tokens':>7}" + "".join(f"{n:>{width}}" for n in names)
    lines = [f"{'':<{task_w + 16}}" + "".join(f"{'ruler / read':>{width}}" for _ in names), header, "-" * len(header)]
    for i, row in enumerate(first_rows):
        cells = "".join(f"{results[n][i]['score']:>{width - 9}.1f} / {results[n][i]['read']:>5.1f}" for n in names)
        lines.append(f"{row['task']:<{task_w}}{row['length']:>7} {row['mean_tokens']:>7.0f}{cells}")
    for length in sorted({r["length"] for r in first_rows}):
        means = {n: averages(results[n])[length] for n in names}
        cells = "".join(f"{means[n]['score']:>{width - 9}.1f} / {means[n]['read']:>5.1f}" for n in names)
        lines.append(f"{'mean':<{task_w}}{length:>7} {'':>7}{cells}")
    return "\n".join(lines)


def plot_tasks(path: Path, results: dict[str, list[dict]], window: int, title: str) -> None:
    """One panel per task and one for the mean over tasks: score (%) against length (log2 axis), a color per
    setting, RULER's score solid and the read score dashed, the window marked."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in next(iter(results.values()))))
    panels = tasks + (["mean of tasks"] if len(tasks) > 1 else [])
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.7 * nrows + 0.6), squeeze=False, sharey=True)
    lengths = sorted({r["length"] for rows in results.values() for r in rows})
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for i, (name, rows) in enumerate(results.items()):
            if panel == "mean of tasks":
                means = averages(rows)
                xs, score, read = lengths, [means[n]["score"] for n in lengths], [means[n]["read"] for n in lengths]
            else:
                mine = [r for r in rows if r["task"] == panel]
                xs, score, read = [r["length"] for r in mine], [r["score"] for r in mine], [r["read"] for r in mine]
            marker = LINE_STYLES[i % len(LINE_STYLES)][0]
            line = ax.plot(xs, score, marker=marker, linestyle="-", label=name, alpha=0.85)[0]
            ax.plot(xs, read, marker=marker, linestyle="--", color=line.get_color(), alpha=0.6, fillstyle="none")
        low, high = min(lengths) / 1.5, max(lengths) * 1.5
        if low <= window <= high:
            ax.axvline(window, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(low, high)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-3, 105)
        ax.set_title(panel, fontsize=9)
        ax.grid(True, alpha=0.3)
    for k in range(len(panels), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("score (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               title="solid: RULER's score; dashed, hollow: read (the answer line names exactly the answers)", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if nrows == 1 else 0.07, 1, 1))
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--tasks", nargs="+", help=f"tasks: all (default), or any of {', '.join(TASKS)}")
    p.add_argument("--lengths", type=int, nargs="+",
                   help="sequence lengths in tokens: prompt plus tokens to generate, as RULER counts (default 4096)")
    p.add_argument("--samples", type=int,
                   help=f"prompts per task and length (default {DEFAULT_SAMPLES}; with --jsonl, the first N of each "
                        "file, default all)")
    add_settings_argument(p)
    p.add_argument("--jsonl", nargs="+", metavar="FILE",
                   help="score RULER's own jsonl files (input, outputs, answer_prefix) instead of generated tasks; "
                        "each file's task is its folder's name (RULER's <task>/validation.jsonl)")
    p.add_argument("--jsonl-metric", choices=sorted(METRICS),
                   help="RULER's metric for --jsonl files: all (string_match_all) or part (string_match_part); "
                        "default: part for qa tasks, all for the rest, as RULER scores them")
    p.add_argument("--max-new-tokens", nargs="+", default=[], metavar="N|TASK=N",
                   help="tokens to generate: N for every task, or TASK=N for one (default: RULER's, 128 for needles, "
                        "30 vt, 120 cwe)")
    p.add_argument("--haystack", choices=HAYSTACK_CHOICES, default="book",
                   help="haystack of the needle tasks RULER puts in essays: the held-out books (default) or RULER's "
                        "noise")
    p.add_argument("--books", default=str(DEFAULT_BOOKS),
                   help=f"held-out books for --haystack book, a parquet with a text column (default {DEFAULT_BOOKS}, "
                        "built by make assets)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template (RULER's default is none, for base models)")
    p.add_argument("--show", action="store_true",
                   help="print each task's first prompt (head and tail) and every answer as it comes")
    p.add_argument("--last-context-length", type=int, help="override last_context_length for generate()")
    p.add_argument("--cache-policy", choices=["slide", "flush"], help="override the cache policy for generate()")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (task, length, sample) is seeded from it")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to prompts (default: as the tokenizer_config.json declares, else BOS)")
    add_prefill_arguments(p)
    add_run_arguments(p, "output directory for trials.jsonl, results.json and ruler.png; checked before any model "
                         "is loaded")
    return p


def parse_max_new_tokens(texts: list[str], tasks: list[str]) -> dict[str, int]:
    """``--max-new-tokens`` -> {task: N} for the tasks it names (every task for a bare N)."""
    out: dict[str, int] = {}
    for text in texts:
        name, sep, count = text.rpartition("=")
        if not count.isdigit() or int(count) < 1 or (sep and not name):
            raise ValueError(f"--max-new-tokens {text!r}: write N or TASK=N with N >= 1, e.g. 128 or vt=30.")
        names = [name] if sep else tasks
        if sep and name not in tasks:
            raise ValueError(f"--max-new-tokens {text!r}: {name!r} is not among the tasks run ({', '.join(tasks)}).")
        for n in names:
            out[n] = int(count)
    return out


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def validate_args(args) -> tuple[Path, Path, list[Setting], TrialLog | None]:
    """Every check made before a model is loaded; fills ``args.task_names``, ``args.new_tokens``, ``args.book_info``."""
    if args.jsonl and (args.tasks or args.lengths):
        flag = "--tasks" if args.tasks else "--lengths"
        raise ValueError(f"{flag} and --jsonl exclude each other: --jsonl scores the files' own prompts.")
    args.lengths = args.lengths or ([] if args.jsonl else DEFAULT_LENGTHS)
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}.")
    if len(set(args.lengths)) != len(args.lengths):
        raise ValueError(f"--lengths lists a length twice: {args.lengths}.")
    if args.jsonl_metric and not args.jsonl:
        raise ValueError("--jsonl-metric applies to --jsonl files only; drop it or pass --jsonl FILE.")
    if args.last_context_length is not None and args.last_context_length < 1:
        raise ValueError(f"--last-context-length must be >= 1, got {args.last_context_length}.")
    args.task_names = [] if args.jsonl else resolve_tasks(args.tasks or ["all"])
    args.new_tokens = parse_max_new_tokens(args.max_new_tokens, args.task_names) if not args.jsonl else {}
    if args.jsonl:
        if len(args.max_new_tokens) > 1 or any(not t.isdigit() or int(t) < 1 for t in args.max_new_tokens):
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: with --jsonl give one N >= 1 for every file.")
        args.jsonl_samples = [read_jsonl(f, int(args.max_new_tokens[0]) if args.max_new_tokens else None,
                                         args.jsonl_metric)[: args.samples] for f in args.jsonl]
    for length in args.lengths:
        for name in args.task_names:
            new = args.new_tokens.get(name, TASKS[name].max_new_tokens)
            if length - new < MIN_PROMPT:
                raise ValueError(f"--lengths {length}: {name} generates {new} tokens, which leaves less than "
                                 f"{MIN_PROMPT} for its prompt; use lengths of at least {new + MIN_PROMPT}.")
    args.books_data, args.book_info = None, None
    if args.haystack == "book" and any(task_for(n).needs_books for n in args.task_names):
        args.books_data = BookHaystack.from_parquet(args.books)
        books = Path(args.books)
        args.book_info = {"path": str(books.resolve()), "digest": file_digest(books)}
    settings, model_dir, tokenizer_dir, config = check_model_args(args, full_attention_baseline=True)
    PromptPrefill.check_args(args, settings, config.get("max_position_embeddings"))
    check_full_attention_lengths(settings, {s.name: args.lengths for s in settings})
    if args.chat_template and getattr(load_tokenizer(tokenizer_dir), "chat_template", None) is None:
        raise ValueError(f"--chat-template: the tokenizer in {str(tokenizer_dir)!r} has no chat template; drop "
                         "--chat-template (RULER's prompts for base models have none).")
    log = open_trials(args, run_config(args, model_dir, tokenizer_dir, settings))
    return model_dir, tokenizer_dir, settings, log


def run_config(args, model_dir: Path, tokenizer_dir: Path, settings: list[Setting]) -> dict:
    """What determines a run's results: a resumed run must have the same (``TrialLog``)."""
    config = {**run_identity("ruler", args, model_dir, tokenizer_dir, settings),
              "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
              "last_context_length": args.last_context_length, "cache_policy": args.cache_policy}
    if args.jsonl:
        return {**config, "jsonl": [{"path": str(Path(f).resolve()), "digest": file_digest(Path(f))}
                                    for f in args.jsonl], "jsonl_metric": args.jsonl_metric, "samples": args.samples}
    return {**config, "tasks": args.task_names, "lengths": sorted(args.lengths),
            "samples": args.samples or DEFAULT_SAMPLES, "haystack": args.haystack, "books": args.book_info}


def show_prompt(encoder: RulerEncoder, s: Sample, chars: int = 400) -> None:
    text = encoder.text(s.input, s.answer_prefix)
    print(f"--- {s.task} at {s.length} (sample {s.index}, {len(encoder.ids(s.input, s.answer_prefix))} tokens), "
          f"answers {s.outputs}, depths {[round(d, 2) for d in s.depths]}\n{text[:chars]}\n[...]\n{text[-chars:]}\n---")


def run(args, validated: tuple[Path, Path, list[Setting], TrialLog | None] | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``)."""
    model_dir, tokenizer_dir, settings, log = validated or validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = RulerEncoder(load_tokenizer(tokenizer_dir), add_bos=args.bos, chat=args.chat_template)
    if args.jsonl:
        samples = [s for group in args.jsonl_samples for s in group]
    else:
        tasks = [replace(task_for(n, args.haystack), max_new_tokens=args.new_tokens.get(n, TASKS[n].max_new_tokens))
                 for n in args.task_names]
        samples = make_samples(encoder, tasks, sorted(args.lengths), args.samples or DEFAULT_SAMPLES, args.seed,
                               args.books_data)
    if args.show:
        firsts: dict[tuple[str, int], Sample] = {}
        for s in samples:
            firsts.setdefault((s.task, s.length), s)
        for s in firsts.values():
            show_prompt(encoder, s)
    gen_kwargs = generation_kwargs(args, encoder.tokenizer)
    prefill = PromptPrefill.from_args(args)

    results, configs = {}, {}
    for setting in settings:
        pending = log is None or any(log.get(trial_key(setting.name, s)) is None for s in samples)
        model, configs[setting.name] = setting_model(
            log, setting, pending, lambda: load_model(model_dir, setting, args.device, args.dtype),
            lambda cfg: describe_setting(setting, cfg, args))
        if prefill is not None and model is not None:
            prefill.configure(model)
        start = time.perf_counter()
        results[setting.name] = evaluate(model, encoder, samples, args.device, desc=setting.name, log=log,
                                         setting=setting.name, show=args.show, prefill=prefill, **gen_kwargs)
        logger.info("%s: %.1f s", setting.name, time.perf_counter() - start)
        del model
    window = configs[settings[-1].name]["window"]
    fields = {"tasks": list(dict.fromkeys(s.task for s in samples)),
              "lengths": sorted({s.length for s in samples}), "samples": args.samples or (None if args.jsonl else DEFAULT_SAMPLES),
              "seed": args.seed, "bos": encoder.add_bos, "chat_template": args.chat_template,
              "haystack": None if args.jsonl else args.haystack, "books": args.book_info,
              "jsonl": args.jsonl, "max_new_tokens": {s.task: s.max_new_tokens for s in samples},
              "average": {name: averages(rows) for name, rows in results.items()}}
    report = run_report("ruler", args, model_dir, tokenizer_dir, window, fields, configs, results)
    title = f"RULER-style tasks: {model_dir.name}" + (" (chat template)" if args.chat_template else "")
    return print_and_write(args, report, format_table(results),
                           {"ruler.png": lambda path: plot_tasks(path, results, window, title)})


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, validate_args, run, argv)


if __name__ == "__main__":
    main()
