"""Passkey retrieval with the Landmark / LongLLaMA protocol: accuracy against prompt length, per setting.

    python eval/passkey.py --model models/fot-tiny --settings memory no-memory --out runs/passkey

The prompt is five lines joined by "\\n" (Landmark Attention's ``generate_prompt``, used by LongLLaMA):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz ...
    <filler[:n_prefix]>
    The pass key is K. Remember it. K is the pass key.
    <filler[:n_suffix]>
    What is the pass key? The pass key is

The filler is FILLER repeated and joined by spaces; prefix and suffix both start at the filler's start.
n_prefix is uniform in [0, n_garbage] and n_suffix = n_garbage - n_prefix; K is uniform in [1, 50000). Each
(length, trial) pair has its own seeded generator, so every setting sees the same prompts and a run is
reproducible. n_garbage is calibrated with the tokenizer so that the prompt has about the requested number of
tokens; the table and results.json report the actual counts.

Scoring: the model generates greedily exactly as many tokens as the answer " K" has; a trial is correct when
they equal the answer's tokens. The answer's tokens are the tail of tokenize(prompt + " " + K) after
tokenize(prompt) when the latter is a prefix of the former ("tail"); otherwise K tokenized alone without special
tokens ("separate"). results.json records which.

Outputs (``--out DIR``): results.json (configuration, per setting and length: accuracy, n, token counts,
seconds, and every trial) and passkey.png (accuracy against prompt length, log2 axis, window marked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from eval.common import (
    cli_main,
    SETTING_HELP,
    Setting,
    check_model_dir,
    check_tokenizer_dir,
    default_device,
    load_model,
    load_tokenizer,
    parse_settings,
    plot_accuracy,
    write_json,
)

logger = logging.getLogger("eval.passkey")

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_LOW, KEY_HIGH = 1, 50000  # K in [KEY_LOW, KEY_HIGH)
MIN_LENGTH = 64
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


def info_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(n_chars: int) -> str:
    """The first ``n_chars`` characters of FILLER repeated and joined by spaces."""
    return " ".join([FILLER] * (n_chars // (len(FILLER) + 1) + 1))[:n_chars]


@dataclass
class PasskeyPrompt:
    text: str
    key: int
    n_garbage: int
    n_prefix: int


def build_prompt(n_garbage: int, rng: np.random.Generator) -> PasskeyPrompt:
    """The protocol's prompt with ``n_garbage`` filler characters split at a uniform point (see module doc)."""
    if n_garbage < 0:
        raise ValueError(f"n_garbage must be >= 0, got {n_garbage}.")
    n_prefix = int(rng.integers(0, n_garbage + 1))  # drawn before the key, as in the original
    key = int(rng.integers(KEY_LOW, KEY_HIGH))
    text = "\n".join([TASK, filler(n_prefix), info_line(key), filler(n_garbage - n_prefix), QUESTION])
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

    def chars_per_token(self) -> float:
        """Characters per token of the filler, measured on a long stretch of it."""
        text = filler(40 * len(FILLER))
        return len(text) / max(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), 1)


def calibrate_n_garbage(encoder: PromptEncoder, target_tokens: int, iterations: int = 4) -> int:
    """Filler characters that give a prompt of about ``target_tokens`` tokens.

    Starts from the filler's characters per token and corrects with the measured length of a prompt split in
    the middle, until it is within 0.5% (the split point moves the count by a token or two).
    """
    cpt = encoder.chars_per_token()
    overhead = len(encoder.encode(build_prompt(0, np.random.default_rng(0)).text))
    n_garbage = max(round((target_tokens - overhead) * cpt), 0)
    for _ in range(iterations):
        if n_garbage == 0:
            break
        split = "\n".join([TASK, filler(n_garbage // 2), info_line(25000), filler(n_garbage - n_garbage // 2),
                           QUESTION])
        actual = len(encoder.encode(split))
        if abs(actual - target_tokens) <= max(1, 0.005 * target_tokens):
            break
        n_garbage = max(n_garbage + round((target_tokens - actual) * cpt), 0)
    return n_garbage


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

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids)


def make_trials(encoder: PromptEncoder, lengths: list[int], trials: int, seed: int) -> dict[int, list[Trial]]:
    """The prompts of every (length, trial), tokenized; the same for every setting."""
    out: dict[int, list[Trial]] = {}
    for length in lengths:
        n_garbage = calibrate_n_garbage(encoder, length)
        out[length] = []
        for t in range(trials):
            p = build_prompt(n_garbage, trial_rng(seed, length, t))
            ids = encoder.encode(p.text)
            answer, method = encoder.answer_ids(p.text, ids, p.key)
            out[length].append(Trial(length, t, p.key, n_garbage, p.n_prefix, ids, answer, method))
        mean = float(np.mean([tr.tokens for tr in out[length]]))
        if abs(mean - length) > 0.1 * length:
            fixed = len(encoder.encode(build_prompt(0, np.random.default_rng(0)).text))
            logger.warning("length %d: prompts have %.0f tokens on average; the prompt without filler already has "
                           "%d tokens with this tokenizer", length, mean, fixed)
    methods = {tr.answer_method for ts in out.values() for tr in ts}
    if "separate" in methods:
        logger.warning("the prompt's tokens are not a prefix of prompt + ' ' + K's for some trials; their answers "
                       "are K tokenized alone without special tokens")
    return out


# ----------------------------------------------------------------------------- scoring
def greedy_answer(model, prompt_ids: list[int], n_tokens: int, device: str | torch.device = "cpu",
                  **generate_kwargs) -> list[int]:
    """Greedily generate exactly ``n_tokens`` tokens (fewer if the model stops at EOS) after the prompt."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                             num_beams=1, use_cache=True, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()


def is_correct(predicted: list[int], answer: list[int]) -> bool:
    """Exact match over all the answer's tokens."""
    return list(predicted) == list(answer)


def evaluate(model, trials: dict[int, list[Trial]], device="cpu", desc: str = "passkey",
             **generate_kwargs) -> list[dict]:
    """Score every trial; returns one summary per length with its trials (tqdm progress over all trials)."""
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=sum(len(v) for v in trials.values()), desc=desc, unit="trial", dynamic_ncols=True) as bar:
        for length, ts in trials.items():
            start = time.perf_counter()
            records = []
            for tr in ts:
                predicted = greedy_answer(model, tr.prompt_ids, len(tr.answer_ids), device, **generate_kwargs)
                records.append({"trial": tr.trial, "key": tr.key, "tokens": tr.tokens, "n_garbage": tr.n_garbage,
                                "n_prefix": tr.n_prefix, "answer_ids": tr.answer_ids, "predicted_ids": predicted,
                                "answer_method": tr.answer_method, "correct": is_correct(predicted, tr.answer_ids)})
                bar.update(1)
            correct = sum(r["correct"] for r in records)
            rows.append({
                "length": length, "mean_tokens": float(np.mean([r["tokens"] for r in records])),
                "min_tokens": min(r["tokens"] for r in records), "max_tokens": max(r["tokens"] for r in records),
                "n": len(records), "correct": correct, "accuracy": 100.0 * correct / len(records),
                "seconds": time.perf_counter() - start, "trials": records,
            })
            bar.set_postfix(length=length, acc=f"{rows[-1]['accuracy']:.0f}%")
    return rows


def format_table(lengths: list[int], results: dict[str, list[dict]]) -> str:
    """Rows = requested lengths with the actual mean token count, columns = settings (accuracy % and n)."""
    names = list(results)
    width = max([14] + [len(n) + 2 for n in names])
    header = f"{'length':>8} {'tokens':>8}" + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for i, length in enumerate(lengths):
        first = results[names[0]][i]
        cells = "".join(f"{results[n][i]['accuracy']:>{width - 6}.1f}% ({results[n][i]['n']:>2})" for n in names)
        lines.append(f"{length:>8} {first['mean_tokens']:>8.0f}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local checkpoint directory (config.json + weights)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS,
                   help=f"prompt lengths in tokens (default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--trials", type=int, default=20, help="prompts per length (default 20)")
    p.add_argument("--settings", nargs="+", default=["memory", "no-memory"], help=f"any of: {SETTING_HELP}")
    p.add_argument("--last-context-length", type=int, help="override last_context_length for generate()")
    p.add_argument("--cache-policy", choices=["slide", "flush"], help="override the cache policy for generate()")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (length, trial) is seeded from it")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to prompts")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="output directory for results.json and passkey.png")
    return p


def validate_args(args) -> tuple[Path, Path, list[Setting]]:
    bad = [n for n in args.lengths if n < MIN_LENGTH]
    if bad:
        raise ValueError(f"--lengths {bad}: prompt lengths must be at least {MIN_LENGTH} tokens (the fixed lines "
                         "of the prompt alone take about 60).")
    if len(set(args.lengths)) != len(args.lengths):
        raise ValueError(f"--lengths lists a length twice: {args.lengths}.")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}.")
    if args.last_context_length is not None and args.last_context_length < 1:
        raise ValueError(f"--last-context-length must be >= 1, got {args.last_context_length}.")
    settings = parse_settings(args.settings)
    model_dir = check_model_dir(args.model)
    tokenizer_dir = check_tokenizer_dir(args.tokenizer or model_dir, model_dir)
    window = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if args.last_context_length is not None and window is not None and args.last_context_length > window:
        raise ValueError(f"--last-context-length {args.last_context_length} exceeds the model's window "
                         f"(max_position_embeddings={window}); use a value <= {window}.")
    return model_dir, tokenizer_dir, settings


def run(args, validated: tuple[Path, Path, list[Setting]] | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``).

    Raises ``ValueError`` for bad arguments (see ``validate_args``) before any model is loaded.
    """
    model_dir, tokenizer_dir, settings = validated or validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted(args.lengths)
    encoder = PromptEncoder(load_tokenizer(tokenizer_dir), add_bos=not args.no_bos)
    trials = make_trials(encoder, lengths, args.trials, args.seed)
    gen_kwargs = {}
    if args.last_context_length is not None:
        gen_kwargs["last_context_length"] = args.last_context_length
    if args.cache_policy is not None:
        gen_kwargs["cache_policy"] = args.cache_policy
    tok = encoder.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is not None:
        gen_kwargs["pad_token_id"] = pad

    results, configs, window = {}, {}, None
    for setting in settings:
        model = load_model(model_dir, setting, args.device, args.dtype)
        cfg = model.config
        window = cfg.max_position_embeddings
        configs[setting.name] = {
            "overrides": setting.overrides, "mem_layers": list(cfg.mem_layers), "mem_top_k": cfg.mem_top_k,
            "mem_index": cfg.mem_index, "last_context_length": args.last_context_length or cfg.last_context_length,
            "cache_policy": args.cache_policy or cfg.cache_policy,
        }
        start = time.perf_counter()
        results[setting.name] = evaluate(model, trials, args.device, desc=setting.name, **gen_kwargs)
        logger.info("%s: %.1f s", setting.name, time.perf_counter() - start)
        del model

    methods = [tr.answer_method for ts in trials.values() for tr in ts]
    report = {
        "task": "passkey", "model": str(model_dir), "tokenizer": str(tokenizer_dir), "window": window,
        "lengths": lengths, "trials": args.trials, "seed": args.seed, "bos": encoder.add_bos,
        "device": str(args.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "answer_tokenization": {m: methods.count(m) for m in sorted(set(methods))},
        "settings": configs, "results": results,
    }
    print(format_table(lengths, results))
    if args.out:
        out = Path(args.out)
        write_json(out / "results.json", report)
        plot_accuracy(out / "passkey.png", lengths, {n: [r["accuracy"] for r in rows] for n, rows in results.items()},
                      window, f"passkey retrieval: {model_dir.name} ({args.trials} trials per length)")
        print(f"wrote {out / 'results.json'} and {out / 'passkey.png'}")
    return report


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, validate_args, run, argv)


if __name__ == "__main__":
    main()
