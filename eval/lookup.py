"""Dictionary lookup, the Focused Transformer paper's synthetic task: accuracy against memory size, per setting.

    python eval/lookup.py --model models/fot-tiny --settings memory no-memory --sizes 512 2048 8192 --out runs/lookup

A dictionary is text (the strings live in tasks/lookup.py):

    Below is a dictionary. Each line gives a key and its value. Remember every value.
    key 48213 value 9071
    key 11022 value 5531
    ...

Keys are five-digit numbers, distinct within a dictionary; values are four-digit numbers. Lines are added until
the next one would pass the requested size, so a dictionary has at most ``size`` tokens and at most one line
fewer. Each (size, trial) has its own seeded generator, so every setting sees the same dictionaries.

Queries come only from pairs that end at least W tokens (W = the model's window, max_position_embeddings) before
the end of the dictionary: no local window ever holds them, so they can only be read from memory (and
``no-memory`` cannot see them at all). The dictionary is prefilled once; each query continues a fork of that
cache (``cache.fork()``: the local windows copied, the memory shared read-only; ``cache.copy()`` when the query
would not fit in the window's free room) with "\\nkey K value" and greedily generates as many tokens as the answer " V" has. The
query's and the answer's tokens are the tails of tokenize(dictionary + query) and tokenize(dictionary + query +
" V"), as eval/passkey.py finds its answer's. A query is correct when the generated text, leading whitespace
removed, starts with V's digits and no other digit follows (``value_matches``).

The answer as read, as in eval/passkey.py: each query generates ``--read-tokens`` (default 4) tokens beyond the
answer, and is right as read when the first number in that text is V with no digit after it ("9071\nkey" is right,
"90712" is not). The protocol's score above sees only the answer's own tokens, so it cannot tell "9071" from
"90712"; ``accuracy_read`` stands next to ``accuracy`` in every row, the table and the plot.

Outputs (``--out DIR``): trials.jsonl (each answered query as it arrives; ``--resume`` continues a killed run
from it), then at the end results.json (configuration, per setting and size: accuracy, n, token counts, seconds
and every query) and lookup.png (both accuracies against memory size, log2 axis, window marked).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.common import (
    Setting,
    TrialLog,
    add_model_arguments,
    add_run_arguments,
    add_settings_argument,
    check_model_args,
    cli_main,
    load_model,
    open_trials,
    print_and_write,
    release_memory,
    run_identity,
    run_report,
    setting_model,
)
from eval.passkey import (READ_TOKENS, SCORES, PromptEncoder, both, describe_setting, generation_kwargs,
                          is_correct_read, plot_both)
from plumbing.cli import ArgumentParser
from plumbing.tokenizer import load_tokenizer
from tasks.lookup import LOOKUP_HEADER, lookup_line, lookup_query

logger = logging.getLogger("eval.lookup")

KEY_LOW, KEY_HIGH = 10000, 100000  # keys in [KEY_LOW, KEY_HIGH), distinct within a dictionary
VALUE_LOW, VALUE_HIGH = 1000, 10000
DEFAULT_SIZES = [512, 1024, 2048, 4096, 8192]


@dataclass
class Query:
    key: int
    value: int
    line: int  # index of the pair's line in the dictionary
    span: tuple[int, int]  # the line's tokens [start, end) in the dictionary's ids
    query_ids: list[int]
    answer_ids: list[int]
    method: str  # "tail" or "separate", as for passkey answers


@dataclass
class Dictionary:
    size: int  # requested tokens
    trial: int
    text: str
    ids: list[int]
    pairs: list[tuple[int, int]]
    spans: list[tuple[int, int]]
    queries: list[Query]

    @property
    def tokens(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------- dictionaries
def dictionary_text(pairs) -> str:
    return "\n".join([LOOKUP_HEADER] + [lookup_line(k, v) for k, v in pairs])


def line_spans(encoder: PromptEncoder, pairs) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The dictionary's text, its ids (BOS as ``encoder``), and each line's tokens [start, end)."""
    text = dictionary_text(pairs)
    enc = encoder.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if encoder.add_bos and (not ids or ids[0] != encoder.tokenizer.bos_token_id):
        ids, offsets = [encoder.tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    starts, ends = np.array([o[0] for o in offsets]), np.array([o[1] for o in offsets])
    spans, a = [], len(LOOKUP_HEADER) + 1
    for k, v in pairs:
        b = a + len(lookup_line(k, v))
        # tokens overlapping the line's characters [a, b); offsets are sorted, special tokens sit at (0, 0)
        spans.append((int(np.searchsorted(ends, a, side="right")), int(np.searchsorted(starts, b, side="left"))))
        a = b + 1
    return text, ids, spans


def continuation(encoder: PromptEncoder, prefix_text: str, prefix_ids: list[int], text: str) -> tuple[list[int], str]:
    """The tokens ``text`` adds after ``prefix_text``: the tail of tokenize(prefix + text) when tokenize(prefix)
    is its prefix ("tail"), else ``text`` tokenized alone without special tokens ("separate")."""
    full = encoder.encode(prefix_text + text)
    if len(full) > len(prefix_ids) and full[: len(prefix_ids)] == prefix_ids:
        return full[len(prefix_ids):], "tail"
    return list(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]), "separate"


def build_dictionary(encoder: PromptEncoder, size: int, trial: int, seed: int, window: int,
                     queries: int) -> Dictionary:
    """A dictionary of at most ``size`` tokens and ``queries`` queries on pairs that lie in memory only.

    Raises ``ValueError`` when fewer than ``queries`` pairs end ``window`` tokens before the end.
    """
    rng = np.random.default_rng([seed, size, trial])
    sample = [(KEY_LOW, VALUE_LOW)] * 32
    per_line = (len(line_spans(encoder, sample)[1]) - len(line_spans(encoder, [])[1])) / len(sample)
    n_lines = int(size / max(per_line, 1) * 1.1) + 8
    while True:
        if n_lines > KEY_HIGH - KEY_LOW:
            raise ValueError(f"--sizes {size}: a dictionary that long needs more than {KEY_HIGH - KEY_LOW} distinct "
                             f"five-digit keys; use sizes up to about {int((KEY_HIGH - KEY_LOW) * per_line)} tokens.")
        draw = np.random.default_rng([seed, size, trial, n_lines])  # one fixed draw per attempt: deterministic
        keys = draw.choice(KEY_HIGH - KEY_LOW, n_lines, replace=False) + KEY_LOW
        pairs = [(int(k), int(v)) for k, v in zip(keys, draw.integers(VALUE_LOW, VALUE_HIGH, n_lines))]
        _, _, spans = line_spans(encoder, pairs)
        fit = sum(end <= size for _, end in spans)
        if fit < n_lines:
            break
        n_lines *= 2  # every line fit: draw a longer candidate
    pairs = pairs[:fit]
    text, ids, spans = line_spans(encoder, pairs)
    while len(ids) > size and pairs:  # the cut can retokenize a boundary differently: drop lines until it fits
        pairs = pairs[:-1]
        text, ids, spans = line_spans(encoder, pairs)
    in_memory = [i for i, (_, end) in enumerate(spans) if end <= len(ids) - window]
    if len(in_memory) < queries:
        raise ValueError(f"--sizes {size}: only {len(in_memory)} pairs of a {len(ids)}-token dictionary end {window} "
                         f"tokens (the window) before its end, fewer than --queries {queries}; use a larger size "
                         "or fewer queries.")
    out = []
    for i in rng.choice(in_memory, queries, replace=False):
        key, value = pairs[i]
        query = lookup_query(key)
        query_ids, method = continuation(encoder, text, ids, query)
        answer_ids, answer_method = continuation(encoder, text + query, ids + query_ids, f" {value}")
        method = "tail" if (method, answer_method) == ("tail", "tail") else "separate"
        out.append(Query(key, value, int(i), spans[i], query_ids, answer_ids, method))
    return Dictionary(size, trial, text, ids, pairs, spans, out)


def make_dictionaries(encoder: PromptEncoder, sizes: list[int], trials: int, queries: int, seed: int,
                      window: int) -> dict[int, list[Dictionary]]:
    from tqdm.auto import tqdm

    out: dict[int, list[Dictionary]] = {size: [] for size in sizes}
    with tqdm(total=len(sizes) * trials, desc="dictionaries", leave=False, dynamic_ncols=True) as bar:
        for size in sizes:
            for t in range(trials):
                out[size].append(build_dictionary(encoder, size, t, seed, window, queries))
                bar.update(1)
    return out


# ----------------------------------------------------------------------------- scoring
def value_matches(generated: str, value: int) -> bool:
    """True when ``generated``, leading whitespace removed, starts with ``value``'s digits not followed by another
    digit: " 9071" and "9071\\nkey" match 9071; " 90712", " 907" and "x9071" do not."""
    match = re.match(r"\s*(\d+)", generated)
    return match is not None and match.group(1) == str(value)


def answer_from_cache(model, cache, query_ids: list[int], n_tokens: int, device, **generate_kwargs) -> list[int]:
    """Greedily generate ``n_tokens`` tokens after ``query_ids`` from ``cache``, which is left unchanged: the query
    continues a ``fork()`` (local windows copied, memory shared read-only) when it and its answer fit in the
    window's free room, and a full ``copy()`` otherwise (at 1M tokens a copy is about 10 GB)."""
    ids = torch.tensor([query_ids], dtype=torch.long, device=device)
    mask = torch.ones(1, cache.seen_tokens + len(query_ids), dtype=torch.long, device=device)  # cached + new
    fits = len(query_ids) + n_tokens <= cache.free_tokens
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=cache.fork() if fits else cache.copy(),
                             max_new_tokens=n_tokens, do_sample=False, num_beams=1, use_cache=True, **generate_kwargs)
    return out[0, len(query_ids):].tolist()


def query_key(setting: str, d: Dictionary, i: int) -> tuple:
    """A query's key in the trials log: (setting, size, trial, query index)."""
    return setting, d.size, d.trial, i


def logged_query(log: TrialLog | None, setting: str, d: Dictionary, i: int) -> dict | None:
    """The query's logged result (checked against its key and value), or None when it has not run."""
    q = d.queries[i]
    return None if log is None else log.get(query_key(setting, d, i), key=q.key, value=q.value)


def evaluate(model, dictionaries: dict[int, list[Dictionary]], tokenizer, device="cpu", desc: str = "lookup",
             forward_kwargs: dict | None = None, log: TrialLog | None = None, setting: str = "",
             read_tokens: int = READ_TOKENS, **generate_kwargs) -> list[dict]:
    """Prefill each dictionary once and answer its queries; one summary per size with every query, scored by the
    protocol (the answer's own tokens) and as read (``read_tokens`` more).

    With ``log``, queries it holds for ``setting`` are taken from it (a dictionary whose queries all are is not
    prefilled) and each new one is appended to it as soon as it is answered. A row's seconds are the sum of its
    queries' (a prefill counts towards the first query answered after it).
    """
    from tqdm.auto import tqdm

    rows = []
    total = sum(len(d.queries) for ds in dictionaries.values() for d in ds)
    with tqdm(total=total, desc=desc, unit="query", dynamic_ncols=True) as bar:
        for size, ds in dictionaries.items():
            records, seconds = [], 0.0
            for d in ds:
                cache, queries = None, []
                for i, q in enumerate(d.queries):
                    record = logged_query(log, setting, d, i)
                    if record is None:
                        start = time.perf_counter()
                        if cache is None:
                            with torch.no_grad():
                                cache = model(torch.tensor([d.ids], device=device), use_cache=True, logits_to_keep=1,
                                              **(forward_kwargs or {})).cache
                        n = len(q.answer_ids)
                        generated = answer_from_cache(model, cache, q.query_ids, n + read_tokens, device,
                                                      **generate_kwargs)
                        text = tokenizer.decode(generated[:n], skip_special_tokens=True)
                        read = tokenizer.decode(generated, skip_special_tokens=True)
                        record = {"key": q.key, "value": q.value, "line": q.line, "span": list(q.span),
                                  "distance": d.tokens - q.span[1], "query_ids": q.query_ids,
                                  "answer_ids": q.answer_ids, "answer_method": q.method,
                                  "predicted_ids": generated[:n], "predicted_text": text, "read_ids": generated[n:],
                                  "read_text": read, "correct": value_matches(text, q.value),
                                  "correct_read": is_correct_read(read, q.value),
                                  "seconds": time.perf_counter() - start}
                        if log is not None:
                            log.put(query_key(setting, d, i), record)
                    seconds += record["seconds"]
                    queries.append({k: v for k, v in record.items() if k != "seconds"})
                    bar.update(1)
                records.append({"trial": d.trial, "tokens": d.tokens, "pairs": len(d.pairs), "queries": queries})
                if cache is not None:
                    cache = None
                    release_memory()
            correct = sum(q["correct"] for r in records for q in r["queries"])
            correct_read = sum(q["correct_read"] for r in records for q in r["queries"])
            n = sum(len(r["queries"]) for r in records)
            rows.append({
                "size": size, "mean_tokens": float(np.mean([r["tokens"] for r in records])),
                "min_tokens": min(r["tokens"] for r in records), "max_tokens": max(r["tokens"] for r in records),
                "mean_pairs": float(np.mean([r["pairs"] for r in records])), "n": n, "correct": correct,
                "accuracy": 100.0 * correct / n, "correct_read": correct_read,
                "accuracy_read": 100.0 * correct_read / n,
                "seconds": seconds, "dictionaries": records,
            })
            bar.set_postfix(size=size, acc=f"{rows[-1]['accuracy']:.0f}%", read=f"{rows[-1]['accuracy_read']:.0f}%")
    return rows


def format_table(sizes: list[int], results: dict[str, list[dict]]) -> str:
    """Rows = requested sizes with the actual mean token count, columns = settings (accuracy % of the protocol and
    as read, and n)."""
    names = list(results)
    width = max([22] + [len(n) + 2 for n in names])
    header = f"{'size':>8} {'tokens':>8}" + "".join(f"{n:>{width}}" for n in names)
    lines = ["accuracy %: protocol / as read (n)", header, "-" * len(header)]
    for i, size in enumerate(sizes):
        cells = "".join(f"{both(results[n][i]):>{width - 6}} ({results[n][i]['n']:>3})" for n in names)
        lines.append(f"{size:>8} {results[names[0]][i]['mean_tokens']:>8.0f}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES,
                   help=f"dictionary (memory) sizes in tokens (default: {' '.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--trials", type=int, default=4, help="dictionaries per size (default 4)")
    p.add_argument("--queries", type=int, default=8, help="queries per dictionary (default 8)")
    add_settings_argument(p)
    p.add_argument("--last-context-length", type=int, help="override last_context_length for prefill and generate()")
    p.add_argument("--cache-policy", choices=["slide", "flush"], help="override the cache policy")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (size, trial) is seeded from it")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to dictionaries (default: as the tokenizer_config.json declares, else BOS)")
    p.add_argument("--read-tokens", type=int, default=READ_TOKENS,
                   help=f"tokens generated beyond the answer for the score as read (default {READ_TOKENS})")
    add_run_arguments(p, "output directory for trials.jsonl, results.json and lookup.png; checked before any model "
                         "is loaded")
    return p


def run_config(args, model_dir: Path, tokenizer_dir: Path, settings: list[Setting]) -> dict:
    """What determines a run's results: a resumed run must have the same (``TrialLog``)."""
    return {**run_identity("lookup", args, model_dir, tokenizer_dir, settings), "sizes": sorted(args.sizes),
            "trials": args.trials, "queries": args.queries, "last_context_length": args.last_context_length,
            "cache_policy": args.cache_policy, "read_tokens": args.read_tokens}


@dataclass
class Prepared:
    model_dir: Path
    tokenizer_dir: Path
    settings: list[Setting]
    window: int
    encoder: PromptEncoder
    dictionaries: dict[int, list[Dictionary]]
    log: TrialLog | None = None


def prepare(args) -> Prepared:
    """Check the arguments and build the dictionaries, so every bad input is a ``ValueError`` before a model
    is loaded."""
    for flag in ("trials", "queries", "read_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    if len(set(args.sizes)) != len(args.sizes):
        raise ValueError(f"--sizes lists a size twice: {args.sizes}.")
    settings, model_dir, tokenizer_dir, config = check_model_args(args)
    window = config["max_position_embeddings"]
    small = [n for n in args.sizes if n <= window]
    if small:
        raise ValueError(f"--sizes {small}: a dictionary must be longer than the model's window ({window} tokens) "
                         f"for any pair to lie in memory; use sizes of at least {2 * window}.")
    if args.last_context_length is not None and not 1 <= args.last_context_length <= window:
        raise ValueError(f"--last-context-length {args.last_context_length} must be in [1, {window}] (the window).")
    log = open_trials(args, run_config(args, model_dir, tokenizer_dir, settings))
    encoder = PromptEncoder(load_tokenizer(tokenizer_dir), add_bos=args.bos)
    if not encoder.tokenizer.is_fast:
        raise ValueError(f"the tokenizer in {str(tokenizer_dir)!r} is not a fast tokenizer; lookup needs offset "
                         "mappings: save it with tokenizers installed (tokenizer.json).")
    sizes = sorted(args.sizes)
    dictionaries = make_dictionaries(encoder, sizes, args.trials, args.queries, args.seed, window)
    return Prepared(model_dir, tokenizer_dir, settings, window, encoder, dictionaries, log)


def run(args, prepared: Prepared | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``)."""
    prepared = prepared or prepare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, sizes = prepared.encoder.tokenizer, list(prepared.dictionaries)
    gen_kwargs = generation_kwargs(args, tokenizer)
    forward_kwargs = {k: gen_kwargs[k] for k in ("last_context_length", "cache_policy") if k in gen_kwargs}

    results, configs, log = {}, {}, prepared.log
    for setting in prepared.settings:
        pending = any(logged_query(log, setting.name, d, i) is None
                      for ds in prepared.dictionaries.values() for d in ds for i in range(len(d.queries)))
        model, configs[setting.name] = setting_model(
            log, setting, pending, lambda: load_model(prepared.model_dir, setting, args.device, args.dtype),
            lambda cfg: describe_setting(setting, cfg, args))
        start = time.perf_counter()
        results[setting.name] = evaluate(model, prepared.dictionaries, tokenizer, args.device, setting.name,
                                         forward_kwargs, log=log, setting=setting.name, read_tokens=args.read_tokens,
                                         **gen_kwargs)
        logger.info("%s: %.1f s", setting.name, time.perf_counter() - start)
        del model

    fields = {"sizes": sizes, "trials": args.trials, "queries": args.queries, "read_tokens": args.read_tokens,
              "seed": args.seed,
              "bos": prepared.encoder.add_bos}
    methods = [q.method for ds in prepared.dictionaries.values() for d in ds for q in d.queries]
    report = run_report("lookup", args, prepared.model_dir, prepared.tokenizer_dir, prepared.window, fields, configs,
                        results, methods)
    title = (f"dictionary lookup: {prepared.model_dir.name} ({args.trials} dictionaries x {args.queries} queries per "
             "size)")
    accuracy = {n: {score: [r[score] for r in rows] for score in SCORES} for n, rows in results.items()}
    return print_and_write(args, report, format_table(sizes, results), {
        "lookup.png": lambda path: plot_both(path, sizes, accuracy, prepared.window, title,
                                             xlabel="memory size (dictionary tokens)"),
    })  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, prepare, run, argv)


if __name__ == "__main__":
    main()
