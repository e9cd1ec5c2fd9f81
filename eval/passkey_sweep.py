"""Passkey prompts swept finely over short lengths: where the misses inside and just past the window lie.

    python eval/passkey_sweep.py --model models/fot-tiny --template all --chars 40 400 20 --generators 3 \\
        --depth 0 --threads 2 --out runs/sweep

eval/passkey.py asks for a few lengths and calibrates each prompt to them; a miss that only happens in a band of
lengths (the model reads the opening line against the key line while both sit in the first window or two) falls
between its lengths. This tool instead walks the filler length: for every template, every ``n`` in ``--chars LO HI
STEP`` (filler characters) and every generator ``g < --generators``, the prompt is
``eval.passkey.build_prompt(n, numpy.random.default_rng([g, n, 99]), template, depth)``, so the key differs per
prompt and the key line sits at ``--depth`` of the filler. Each prompt is tokenized, answered greedily and scored
as eval/passkey.py scores a trial, in one ``--setting`` (default dense ``memory``): by exact match on the answer's
tokens (the protocol) and as read, on ``eval.passkey.READ_TOKENS`` tokens more.

It prints, per template, the share right both ways, the token lengths of the misses and their most common first
answer word, and writes ``results.json`` (every prompt's record) and ``sweep.png`` (each prompt a point at its token
length, one row per template: right both ways in green, right by the protocol but wrong as read in orange, wrong in
red) to ``--out``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.common import (add_model_arguments, add_run_arguments, check_model_args, check_vocab, cli_main, load_model,
                         new_figure, print_and_write, run_report, save_figure)
from eval.passkey import (READ_TOKENS, PromptEncoder, build_prompt, greedy_answer, is_correct, is_correct_read,
                          template_names)
from plumbing.files import check_out_dir
from plumbing.tokenizer import load_tokenizer


def sweep_prompts(encoder: PromptEncoder, template: str, chars: range, generators: int, depth: float) -> list[dict]:
    """The swept prompts of one template: (n_garbage, generator, key, prompt ids, answer ids) in sweep order."""
    out = []
    for g in range(generators):
        for n in chars:
            p = build_prompt(n, np.random.default_rng([g, n, 99]), template, depth)
            ids = encoder.encode(p.text)
            answer, method = encoder.answer_ids(p.text, ids, p.key)
            out.append({"template": template, "n_garbage": n, "generator": g, "key": p.key, "tokens": len(ids),
                        "prompt_ids": ids, "answer_ids": answer, "answer_method": method})
    return out


def summarize_template(records: list[dict], tokenizer) -> dict:
    """Right / total (by the protocol and as read), the misses' token lengths and their most common first answer
    word."""
    misses = [r for r in records if not r["correct"]]
    words = Counter((tokenizer.decode(r["predicted_ids"]).split() or [""])[0] for r in misses)
    return {"right": len(records) - len(misses), "right_read": sum(r["correct_read"] for r in records),
            "n": len(records),
            "miss_tokens": sorted(r["tokens"] for r in misses),
            "miss_first_word": words.most_common(1)[0][0] if misses else None,
            "tokens": [min(r["tokens"] for r in records), max(r["tokens"] for r in records)]}


def format_summary(summary: dict[str, dict]) -> str:
    lines = [f"{'template':<16} {'right':>9} {'as read':>9}  prompt tokens  misses at tokens (most common first word)"]
    for name, s in summary.items():
        span = f"{s['tokens'][0]}-{s['tokens'][1]}"
        miss = ", ".join(map(str, s["miss_tokens"])) or "-"
        word = f" ({s['miss_first_word']!r})" if s["miss_first_word"] is not None else ""
        lines.append(f"{name:<16} {s['right']:>4}/{s['n']:<4} {s['right_read']:>4}/{s['n']:<4}  {span:>13}  "
                     f"{miss}{word}")
    right, read, n = (sum(s[k] for s in summary.values()) for k in ("right", "right_read", "n"))
    lines.append(f"{'all':<16} {right:>4}/{n:<4} {read:>4}/{n:<4}")
    return "\n".join(lines)


def plot_sweep(path: Path, records: list[dict], templates: list[str], window: int, title: str) -> None:
    """One row per template; each prompt a point at its token length: green if right both ways, orange if right by
    the protocol but wrong as read, red if wrong."""
    fig, ax = new_figure()
    generators = 1 + max(r["generator"] for r in records)
    for row, name in enumerate(templates):
        mine = [r for r in records if r["template"] == name]
        groups = (((True, True), "tab:green", "right"), ((True, False), "tab:orange", "right, wrong as read"),
                  ((False, None), "tab:red", "wrong"))
        for (ok, read), color, label in groups:
            kept = [r for r in mine if r["correct"] == ok and read in (None, r["correct_read"])]
            xs = [r["tokens"] for r in kept]
            # each generator's prompts on their own line within the template's row (within +-0.15 of it)
            jitter = [row + 0.3 * (r["generator"] / max(generators - 1, 1) - 0.5) for r in kept]
            ax.scatter(xs, jitter, s=14, color=color, label=label if row == 0 else None, alpha=0.8)
    ax.axvline(window, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(-0.7, len(templates) - 0.5)
    ax.text(window, -0.65, f" window {window}", color="grey", fontsize=8)
    ax.set_yticks(range(len(templates)), templates)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python eval/passkey_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--template", nargs="+", default=["all"], help="template names, or all (tasks/passkey.py)")
    p.add_argument("--chars", nargs=3, type=int, default=[40, 400, 20], metavar=("LO", "HI", "STEP"),
                   help="filler characters from LO to HI inclusive in steps of STEP (default 40 400 20)")
    p.add_argument("--generators", type=int, default=3, help="prompts per (template, length), each its own key")
    p.add_argument("--depth", type=float, default=0.0, help="where the key line sits in the filler, 0 to 1")
    p.add_argument("--setting", default="memory", help="one inference setting, as eval/passkey.py's --settings")
    add_run_arguments(p, "folder for results.json and sweep.png", resume=False)
    return p


def validate_args(args):
    args.settings = [args.setting]
    settings, model_dir, tokenizer_dir, config = check_model_args(args)
    lo, hi, step = args.chars
    if not (0 <= lo <= hi and step >= 1):
        raise ValueError(f"--chars {lo} {hi} {step}: need 0 <= LO <= HI and STEP >= 1.")
    if args.generators < 1:
        raise ValueError(f"--generators must be >= 1, got {args.generators}.")
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth must be in [0, 1], got {args.depth}.")
    args.template = template_names(args.template)
    if args.out:
        check_out_dir(args.out)  # before the model is loaded, so a bad --out fails at once
    return settings[0], model_dir, tokenizer_dir, config


def run(args, prepared) -> dict:
    setting, model_dir, tokenizer_dir, config = prepared
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, tokenizer_dir, config)
    encoder = PromptEncoder(tokenizer)
    lo, hi, step = args.chars
    prompts = [r for t in args.template for r in sweep_prompts(encoder, t, range(lo, hi + 1, step), args.generators,
                                                                args.depth)]
    model = load_model(model_dir, setting, args.device, args.dtype)
    records = []
    for r in tqdm(prompts, desc=f"sweep {setting.name}", unit="prompt"):
        n = len(r["answer_ids"])
        generated = greedy_answer(model, r["prompt_ids"], n + READ_TOKENS, args.device)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        records.append({k: v for k, v in r.items() if k != "prompt_ids"}
                       | {"predicted_ids": generated[:n], "read_ids": generated[n:], "read_text": text,
                          "correct": is_correct(generated[:n], r["answer_ids"]),
                          "correct_read": is_correct_read(text, r["key"])})
    summary = {t: summarize_template([r for r in records if r["template"] == t], tokenizer) for t in args.template}
    window = model.config.max_position_embeddings
    fields = {"templates": args.template, "chars": [lo, hi, step], "generators": args.generators,
              "depth": args.depth, "summary": summary}
    configs = {setting.name: {"overrides": setting.overrides, "last_context_length": model.config.last_context_length}}
    report = run_report("passkey_sweep", args, model_dir, tokenizer_dir, window, fields, configs,
                        {setting.name: records})
    title = f"passkey sweep: {model_dir.name}, key at depth {args.depth:g}, {setting.name}"
    return print_and_write(args, report, format_summary(summary),
                           {"sweep.png": lambda path: plot_sweep(path, records, args.template, window, title)})


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, validate_args, run, argv)


if __name__ == "__main__":
    main()
