"""eval/passkey.py's prompts as an offline lm-evaluation-harness task (YAML files and a jsonl, no download).

    python -m eval.lmeval_passkey --model models/fot-tiny --lengths 512 2048 --trials 5 --out runs/lmeval_passkey
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,max_length=1048576 \\
        --tasks fot_passkey --include_path runs/lmeval_passkey --batch_size 1

The prompts are eval/passkey.py's (``make_trials``: the same --lengths, --trials, --template, --depths and --seed
give the same keys and the same tokens). lm-eval scores them as eval/passkey.py does: greedy generation of exactly
as many tokens as the answer has (``max_gen_toks``; fewer at EOS), compared with the answer. Since lm-eval's
generation length is one number per task, prompts are split by their answer's token count into tasks
``fot_passkey_a<n>`` (one generation length each), grouped as ``fot_passkey``, whose ``exact_match`` is the share of
all prompts answered right (weighted by size). Each jsonl row keeps its length, template, depth and key.

lm-eval compares text: the target is the answer's tokens decoded as lm-eval decodes what the model generates
(``skip_special_tokens``), so a prompt counts as right when the generated tokens spell the answer. That equals
eval/passkey.py's token match unless a model spells the same text with other tokens of the same count.

Token ids are checked at generation: a prompt starts with the BOS string where eval/passkey.py prepends BOS (lm-eval
then adds no special tokens of its own), and every prompt must encode, as lm-eval encodes it, to eval/passkey.py's
ids; the command refuses otherwise. Loading a fot checkpoint on the lm_eval command line needs its code in it
(``fot export-code``, docs/use_with.md) and ``max_length``: lm-eval takes ``max_position_embeddings`` as the
context limit, and for fot that is only the window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.common import resolve_bos
from eval.passkey import DEFAULT_TEMPLATE, PromptEncoder, Trial, build_prompt, make_trials, trial_rng
from plumbing.cli import ArgumentParser, user_errors
from plumbing.tokenizer import load_tokenizer

GROUP = "fot_passkey"


def task_yaml(name: str, data_file: Path, answer_tokens: int) -> str:
    """One lm-eval task: the jsonl's prompts, greedy generation of ``answer_tokens`` tokens, exact match."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{target}}"',
        'target_delimiter: ""',
        "generation_kwargs:",
        "  until: []",
        "  do_sample: false",
        f"  max_gen_toks: {answer_tokens}",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])  # fmt: skip


def group_yaml(tasks: list[str]) -> str:
    lines = [f"group: {GROUP}", "task:"] + [f"  - {t}" for t in tasks]
    lines += ["aggregate_metric_list:", "  - metric: exact_match", "    aggregation: mean", "    weight_by_size: true",
              "metadata:", "  version: 1.0", ""]
    return "\n".join(lines)


def lm_eval_text(encoder: PromptEncoder, text: str, prompt_ids: list[int]) -> str:
    """The prompt as lm-eval is given it: the BOS string first where eval/passkey.py prepends BOS itself (lm-eval
    adds no special tokens to a prompt that starts with it). Raises ValueError when lm-eval would encode it to other
    ids than ``prompt_ids``."""
    tok = encoder.tokenizer
    prepended = encoder.add_bos and list(tok(text)["input_ids"][:1]) != [tok.bos_token_id]
    lm_text = tok.bos_token + text if prepended else text
    encoded = tok.encode(lm_text, add_special_tokens=False) if prepended else tok.encode(lm_text)
    if encoded != prompt_ids:
        hint = (" It does not add BOS itself, and lm-eval can only pass BOS as text, which tokenizes the start "
                "differently: use a tokenizer that adds BOS (fot export-code writes one) or --no-bos."
                if prepended else "")
        raise ValueError("lm-eval would tokenize a prompt differently from eval/passkey.py with this tokenizer "
                         f"({len(encoded)} tokens instead of {len(prompt_ids)}).{hint}")
    return lm_text


def prompt_text(tr: Trial, seed: int) -> str:
    """A trial's prompt text, rebuilt as ``make_trials`` built it."""
    return build_prompt(tr.n_garbage, trial_rng(seed, tr.length, tr.trial), tr.template, tr.depth).text


def write_tasks(tokenizer, out: Path, lengths: list[int], trials: int, seed: int = 0,
                templates: list[str] = (DEFAULT_TEMPLATE,), depths: list[float] | None = None,
                add_bos: bool = True) -> dict[str, int]:  # fmt: skip
    """Write the group's YAML files and jsonl files into ``out``; returns {task: prompts}."""
    encoder = PromptEncoder(tokenizer, add_bos=add_bos)
    by_answer: dict[int, list[dict]] = {}
    for length, ts in make_trials(encoder, sorted(lengths), trials, seed, list(templates), depths).items():
        for tr in ts:
            by_answer.setdefault(len(tr.answer_ids), []).append({
                "prompt": lm_eval_text(encoder, prompt_text(tr, seed), tr.prompt_ids),
                "target": tokenizer.decode(tr.answer_ids, skip_special_tokens=True),
                "key": tr.key, "length": length, "tokens": tr.tokens, "trial": tr.trial, "template": tr.template,
                "depth": tr.depth,
            })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for n, rows in sorted(by_answer.items()):
        name = f"{GROUP}_a{n}"
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(task_yaml(name, data, n))
        counts[name] = len(rows)
    (out / f"{GROUP}.yaml").write_text(group_yaml(list(counts)))
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint or tokenizer directory (its tokenizer sets the lengths)")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    p.add_argument("--trials", type=int, default=5, help="prompts per length, template and depth (default 5)")
    p.add_argument("--template", nargs="+", default=[DEFAULT_TEMPLATE], help="eval/passkey.py's --template")
    p.add_argument("--depths", type=float, nargs="+", help="eval/passkey.py's --depths")
    p.add_argument("--seed", type=int, default=0, help="eval/passkey.py's --seed")
    p.add_argument("--no-bos", action="store_true",
                   help="eval/passkey.py's --no-bos (default: as the tokenizer_config.json declares, else BOS)")
    p.add_argument("--out", required=True, help="folder for the YAML and jsonl files (lm_eval --include_path)")
    return p


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = build_parser().parse_args(argv)
    with user_errors("eval/lmeval_passkey.py"):
        if args.trials < 1 or any(n < 64 for n in args.lengths):
            raise ValueError("--trials must be >= 1 and --lengths at least 64 tokens each.")
        counts = write_tasks(load_tokenizer(args.model), Path(args.out), args.lengths, args.trials, args.seed,
                             args.template, args.depths, add_bos=resolve_bos(args, Path(args.model)))  # fmt: skip
    total = sum(counts.values())
    print(f"{total} prompts in {len(counts)} tasks ({', '.join(f'{k}: {v}' for k, v in counts.items())}), group "
          f"{GROUP}: lm_eval --tasks {GROUP} --include_path {args.out}")
    return counts


if __name__ == "__main__":
    main()
