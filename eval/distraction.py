"""The distraction test: a target document's perplexity with other documents in memory, per inference setting.

    python eval/distraction.py --model models/smollm2-fot --files assets/books/heldout.parquet --split-tokens 4096 \\
        --target-tokens 4096 --distractors 0 1 3 7 --distractor-tokens 4096 --targets 6 --no-bos \\
        --settings memory no-memory --out runs/distraction

The Focused Transformer paper's distraction issue: when a memory holds keys of unrelated documents, a model whose
memory layers were not trained with negatives cannot tell them from the relevant keys; FoT's crossbatch training
is meant to make memory layers robust to them. This tool measures it: the same target documents are scored with
0, 1, 3, 7, ... other documents (the distractors) put in memory before them.

Documents come from ``--files`` as eval/perplexity.py reads them (``.txt``: one per file; ``.jsonl``: one per
line, text in ``--text-field``; ``.parquet``: one per row). ``--split-tokens S`` cuts every text into consecutive,
non-overlapping pieces of S tokens (BOS included; a shorter remainder is dropped), so a few long books give many
documents. BOS is prepended as in eval/passkey.py (``--no-bos`` turns it off).

* Targets: ``--targets`` documents with at least ``--target-tokens`` (T) tokens, taken round-robin over the texts
  (the first long-enough piece of every text, then the second, ...), each truncated to T tokens.
* Distractors of a target: documents with at least ``--distractor-tokens`` (M) tokens that are not targets and
  do not come from the target's own text (a piece of the same book is context, not a distraction), each truncated
  to M tokens. Target i draws one order of its candidates with ``numpy.random.default_rng([seed, i])``; d
  distractors are the first d of that order, so the draws are nested (d = 3 adds two to d = 1's) and the same for
  every setting.

Method: for each setting, target and d, one forward of ``[distractor 1; ...; distractor d; target]`` through
``model.model`` (no grad, a fresh cache), then ``lm_head`` and ``log_softmax`` (fp32, fp64 for fp64 models) on the
target's positions only. The target's T - 1 NLLs are those of its tokens 1..T-1, each predicted from all tokens
before it as the model windows them; the prediction of the target's first token is not scored, so d = 0 is
exactly eval/perplexity.py's score of the target alone.

What each target token sees (W = the setting's window ``max_position_embeddings``, L its ``last_context_length``,
D = d * M): D must be a multiple of W, so the distractors fill whole windows and the target starts a window; the
forward gets ``last_context_length = min(L, T)``, so the last window never reaches back into the distractors. The
target is then windowed exactly as when it is scored alone: windows of W from its start over its first
T - min(L, T) tokens, then its last min(L, T) tokens. A target token in the window starting at target position a
attends, in every layer, locally to the target's tokens a..t; memory layers also attend to their memory, which
holds the keys and values of the D distractor tokens (in draw order) followed by the target's tokens 0..a-1
(``topk:K``: the K best of them per query; with ``mem_max_tokens`` the oldest are evicted first, i.e. the
distractors). Layers without memory never see a distractor, so with ``no-memory`` (and ``full:W``) the target's
NLLs are the same for every d: the baseline. The one exception to "D is a multiple of W" is a sequence that fits
in one window (D + T <= L, e.g. ``full:32768``): then there is no windowing and every layer attends to the
distractors locally (plain causal attention); results.json records each row's ``placement`` ("none", "memory"
or "local"). Any other length is refused before a model is loaded.

Outputs: a table (rows: distractor counts; columns: settings; cells: the target perplexity, exp of the mean NLL
over every target token of every target) on stdout, and with ``--out DIR`` results.json (configuration, the
documents, every target's distractor draw, per setting and d: tokens, nll, ppl, placement, buckets by position in
the target as eval/perplexity.py makes them, per-target values) and distraction.png (perplexity against the number
of distracting documents, one line per setting, linear axes).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.common import (
    LINE_STYLES,
    new_figure,
    Setting,
    add_model_arguments,
    add_run_arguments,
    add_settings_argument,
    check_model_args,
    check_vocab,
    cli_main,
    finish_plot,
    load_model,
    print_and_write,
    run_report,
)
from eval.passkey import PromptEncoder
from eval.perplexity import DEFAULT_CHUNK, aggregate, bucket_edges, check_files, read_texts, summarize
from plumbing.cli import ArgumentParser
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger("eval.distraction")

DEFAULT_DISTRACTORS = (0, 1, 3, 7)


# ----------------------------------------------------------------------------- documents
@dataclass
class Document:
    ids: list[int]
    source: str  # "FILE", "FILE:LINE" or "FILE:TITLE", then "#k" for the k-th piece with --split-tokens
    text: int  # index of the text it comes from: pieces of one text never distract each other

    @property
    def tokens(self) -> int:
        return len(self.ids)


def split_ids(ids: list[int], bos_id: int | None, size: int) -> list[list[int]]:
    """Consecutive non-overlapping pieces of ``size`` tokens; a leading BOS is moved to the front of every piece
    (and counts in ``size``), and a remainder shorter than a piece is dropped."""
    bos = ids[:1] if ids and bos_id is not None and ids[0] == bos_id else []
    body, step = ids[len(bos):], size - len(bos)
    return [bos + body[s: s + step] for s in range(0, len(body) - step + 1, step)]


def read_documents(encoder: PromptEncoder, paths: list[Path], text_field: str,
                   split_tokens: int | None) -> list[Document]:
    """Every document of ``paths`` in order, tokenized (with BOS unless turned off), split when asked."""
    docs = []
    for text_index, (source, text) in enumerate(read_texts(paths, text_field)):
        ids = encoder.encode(text)
        if split_tokens is None:
            docs.append(Document(ids, source, text_index))
            continue
        for k, piece in enumerate(split_ids(ids, encoder.tokenizer.bos_token_id, split_tokens)):
            docs.append(Document(piece, f"{source}#{k}", text_index))
    return docs


@dataclass
class Draw:
    """A target and its distractors in draw order (the first d are used with d distractors)."""

    target: Document
    distractors: list[Document]


def pick_targets(docs: list[Document], count: int, target_tokens: int) -> list[int]:
    """Indices of ``count`` documents with >= ``target_tokens`` tokens, round-robin over texts (module docstring)."""
    by_text: dict[int, list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        if doc.tokens >= target_tokens:
            by_text[doc.text].append(i)
    order = [queue[r] for r in range(max(map(len, by_text.values()), default=0))
             for queue in by_text.values() if r < len(queue)]
    if len(order) < count:
        longest = max((d.tokens for d in docs), default=0)
        raise ValueError(
            f"--targets {count} needs {count} documents of >= {target_tokens} tokens (--target-tokens), but only "
            f"{len(order)} of {len(docs)} have that many (the longest has {longest}); pass more or longer documents, "
            "cut long texts into several with --split-tokens, or lower --targets or --target-tokens.")
    return order[:count]


def draw_distractors(docs: list[Document], targets: list[int], max_d: int, distractor_tokens: int,
                     seed: int) -> list[Draw]:
    """For target i, its candidates (module docstring) in the order of ``default_rng([seed, i])``, the first
    ``max_d`` kept."""
    chosen = set(targets)
    draws = []
    for i, t in enumerate(targets):
        target = docs[t]
        pool = [j for j, doc in enumerate(docs)
                if j not in chosen and doc.text != target.text and doc.tokens >= distractor_tokens]
        if len(pool) < max_d:
            raise ValueError(
                f"target {target.source} has only {len(pool)} possible distractors (documents of >= "
                f"{distractor_tokens} tokens that are not targets and not from its own text), fewer than the "
                f"largest --distractors {max_d}; pass more documents (or --split-tokens to cut long texts into "
                "several), or lower --targets, --distractor-tokens or the largest distractor count.")
        order = np.random.default_rng([seed, i]).permutation(len(pool))[:max_d]
        draws.append(Draw(target, [docs[pool[k]] for k in order]))
    return draws


# ----------------------------------------------------------------------------- windowing and scoring
def placement(distractor_tokens: int, target_tokens: int, window: int, last_context_length: int) -> str:
    """Where D = ``distractor_tokens`` reach the target (module docstring): "none" (D = 0), "memory" (D a multiple
    of the window: whole windows before the target's first), "local" (D + T <= L: one window holds everything);
    any other D would put the tail of the distractors into the target's first window: ``ValueError``."""
    if distractor_tokens == 0:
        return "none"
    if distractor_tokens % window == 0:
        return "memory"
    if distractor_tokens + target_tokens <= last_context_length:
        return "local"
    raise ValueError(
        f"{distractor_tokens} distractor tokens are not a multiple of the window {window}, so the target's first "
        f"window would also hold the last {distractor_tokens % window} of them, and distractors + target "
        f"({distractor_tokens + target_tokens}) do not fit one window (last_context_length {last_context_length}).")


def setting_window(config: dict, setting: Setting) -> tuple[int, int]:
    """The window W and last context L a setting runs with: the saved config's, unless it overrides them."""
    window = int(setting.overrides.get("max_position_embeddings", config["max_position_embeddings"]))
    lcl = setting.overrides.get("last_context_length", config.get("last_context_length"))
    return window, int(lcl) if lcl is not None else min(1024, window)  # fot.LongLlamaConfig's default


def target_nll(model, distractors: list[list[int]], target: list[int], chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """NLL [T - 1] (float64, CPU) of the target's tokens 1..T-1 after ``distractors`` in one forward.

    Args:
        model: a fot ``LongLlamaForCausalLM`` (or one with ``.model``, ``.lm_head`` and a fot config).
        distractors: token ids of the distractor documents, in the order they are fed.
        target: the target's T >= 2 token ids.
        chunk: target positions per ``lm_head`` call.

    The input is ``[*distractors, target]``; the forward gets ``last_context_length = min(L, T)`` when the
    distractors go to memory (module docstring), so the target is windowed as when scored alone.
    """
    cfg = model.config
    n_dis, n_tgt = sum(map(len, distractors)), len(target)
    if n_tgt < 2:
        raise ValueError(f"a target needs at least 2 tokens to score, got {n_tgt}.")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    where = placement(n_dis, n_tgt, cfg.max_position_embeddings, cfg.last_context_length)
    lcl = cfg.last_context_length if where == "local" else min(cfg.last_context_length, n_tgt)
    device = next(model.parameters()).device
    ids_1N = torch.tensor([[t for doc in distractors for t in doc] + list(target)], dtype=torch.long, device=device)
    nll = torch.empty(n_tgt - 1, dtype=torch.float64)
    with torch.no_grad():
        hidden_ND = model.model(input_ids=ids_1N, use_cache=False, last_context_length=lcl).last_hidden_state[0]
        wide = torch.float64 if hidden_ND.dtype == torch.float64 else torch.float32
        for s in range(0, n_tgt - 1, chunk):  # target position s predicts target token s + 1
            e = min(s + chunk, n_tgt - 1)
            logp = torch.log_softmax(model.lm_head(hidden_ND[n_dis + s: n_dis + e]).to(wide), dim=-1)
            nll[s:e] = -logp.gather(-1, ids_1N[0, n_dis + s + 1: n_dis + e + 1, None])[:, 0].to("cpu", torch.float64)
    return nll


def evaluate(model, draws: list[Draw], counts: list[int], target_tokens: int, distractor_tokens: int, chunk: int,
             bar=None) -> dict:
    """Score every target with every distractor count; one result row per count."""
    cfg = model.config
    edges = bucket_edges(target_tokens, cfg.max_position_embeddings)
    start = time.perf_counter()
    rows = []
    for d in counts:
        nlls, per_target = [], []
        for draw in draws:
            used = draw.distractors[:d]
            nll = target_nll(model, [doc.ids[:distractor_tokens] for doc in used], draw.target.ids[:target_tokens],
                             chunk)
            nlls.append(nll)
            per_target.append({"target": draw.target.source, "distractors": [doc.source for doc in used],
                               "nll": float(nll.mean()), "ppl": math.exp(float(nll.mean()))})
            if bar is not None:
                bar.update(1)
        total = float(sum(x.sum().item() for x in nlls))
        rows.append({"distractors": d, "distractor_tokens": d * distractor_tokens,
                     "placement": placement(d * distractor_tokens, target_tokens, cfg.max_position_embeddings,
                                            cfg.last_context_length),
                     **summarize(total, sum(x.numel() for x in nlls)), "buckets": aggregate(nlls, edges),
                     "targets": per_target})
    return {"rows": rows, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- outputs
def _cell(ppl: float) -> str:
    return format(ppl, ".4g" if abs(ppl) >= 1e6 else ".3f")  # e.g. a model never trained on books: 4.4e+10


def format_table(results: dict[str, dict]) -> str:
    """Rows = distractor counts (with their tokens), columns = settings, cells = target perplexity."""
    names = list(results)
    width = max([12] + [len(n) + 2 for n in names])
    header = f"{'distractors':<13}{'in memory':>10}{'scored':>9}" + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for i, row in enumerate(results[names[0]]["rows"]):
        cells = "".join(f"{_cell(results[n]['rows'][i]['ppl']):>{width}}" for n in names)
        lines.append(f"{row['distractors']:<13}{row['distractor_tokens']:>10}{row['tokens']:>9}{cells}")
    for n in names:
        local = [r["distractors"] for r in results[n]["rows"] if r["placement"] == "local"]
        if local:
            lines.append(f"{n}: with {local} distractors everything fits one window (distractors in local context)")
    return "\n".join(lines)


def plot_distraction(path: Path, results: dict[str, dict], title: str) -> None:
    """Target perplexity against the number of distracting documents (linear axes), one line per setting."""
    fig, ax = new_figure()
    for i, (name, res) in enumerate(results.items()):
        marker, line = LINE_STYLES[i % len(LINE_STYLES)]
        ax.plot([r["distractors"] for r in res["rows"]], [r["ppl"] for r in res["rows"]], marker=marker,
                linestyle=line, label=name, alpha=0.85)
    counts = [r["distractors"] for r in next(iter(results.values()))["rows"]]
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("distracting documents in memory")
    ax.set_ylabel("target perplexity")
    finish_plot(fig, ax, path, title)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "local checkpoint directory (or a LoRA adapter directory)")
    p.add_argument("--files", nargs="+", required=True, help=".txt (one document each), .jsonl or .parquet files")
    p.add_argument("--text-field", default="text", help="the text field (.jsonl) or column (.parquet)")
    p.add_argument("--split-tokens", type=int,
                   help="cut every text into non-overlapping documents of this many tokens (BOS included)")
    p.add_argument("--target-tokens", type=int, default=4096, help="scored length of a target (default 4096)")
    p.add_argument("--distractors", type=int, nargs="+", default=list(DEFAULT_DISTRACTORS),
                   help="numbers of distracting documents before the target (default 0 1 3 7)")
    p.add_argument("--distractor-tokens", type=int, default=4096, help="tokens per distractor (default 4096)")
    p.add_argument("--targets", type=int, default=4, help="target documents (default 4)")
    add_settings_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the distractor draws")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to documents (default: as the tokenizer_config.json declares, else BOS)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"target positions per lm_head call (default {DEFAULT_CHUNK})")
    add_run_arguments(p, "output directory for results.json and distraction.png", resume=False)
    return p


@dataclass
class Prepared:
    model_dir: Path
    tokenizer_dir: Path
    settings: list[Setting]
    window: int
    counts: list[int]
    docs: list[Document]
    draws: list[Draw]
    bos: bool


def validate_args(args) -> tuple[Path, Path, list[Setting], dict, list[int]]:
    """Checks that need no tokenizer or model; returns the directories, settings, saved config and counts."""
    for name in ("target_tokens", "distractor_tokens", "targets", "chunk", "split_tokens"):
        value, least = getattr(args, name), 2 if name == "target_tokens" else 1
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0 (numpy seeds the draws), got {args.seed}.")
    if any(d < 0 for d in args.distractors) or len(set(args.distractors)) != len(args.distractors):
        raise ValueError(f"--distractors must be distinct counts >= 0, got {args.distractors}.")
    if args.split_tokens is not None and args.split_tokens < max(args.target_tokens, args.distractor_tokens):
        raise ValueError(f"--split-tokens {args.split_tokens} is shorter than a target ({args.target_tokens}) or a "
                         f"distractor ({args.distractor_tokens}); use at least "
                         f"{max(args.target_tokens, args.distractor_tokens)}.")
    check_files(args.files)
    settings, model_dir, tokenizer_dir, config = check_model_args(args)
    for setting in settings:
        window, lcl = setting_window(config, setting)
        for d in args.distractors:
            try:
                placement(d * args.distractor_tokens, args.target_tokens, window, lcl)
            except ValueError as err:
                example = window * max(1, round(args.distractor_tokens / window))
                raise ValueError(f"setting {setting.name}, --distractors {d}: {err} Use a --distractor-tokens that is "
                                 f"a multiple of {window} (e.g. {example}).") from None
    return model_dir, tokenizer_dir, settings, config, sorted(args.distractors)


def prepare(args) -> Prepared:
    """Validate the arguments, load the tokenizer, read the documents and draw the distractors."""
    model_dir, tokenizer_dir, settings, config, counts = validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, tokenizer_dir, config)
    encoder = PromptEncoder(tokenizer, add_bos=args.bos)
    docs = read_documents(encoder, check_files(args.files), args.text_field, args.split_tokens)
    targets = pick_targets(docs, args.targets, args.target_tokens)
    draws = draw_distractors(docs, targets, counts[-1], args.distractor_tokens, args.seed)
    logger.info("settings: %s", ", ".join(s.name for s in settings))
    logger.info("%d documents from %d texts; %d targets of %d tokens, up to %d distractors of %d tokens each",
                len(docs), len({d.text for d in docs}), len(draws), args.target_tokens, counts[-1],
                args.distractor_tokens)
    return Prepared(model_dir, tokenizer_dir, settings, int(config["max_position_embeddings"]), counts, docs, draws,
                    encoder.add_bos)


def run(args, prepared: Prepared | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``)."""
    from tqdm.auto import tqdm

    p = prepared or prepare(args)
    results, configs = {}, {}
    total = len(p.settings) * len(p.draws) * len(p.counts)
    with tqdm(total=total, desc="distraction", unit="forward", dynamic_ncols=True) as bar:
        for setting in p.settings:
            model = load_model(p.model_dir, setting, args.device, args.dtype)
            cfg = model.config
            configs[setting.name] = {"overrides": setting.overrides, "window": cfg.max_position_embeddings,
                                     "last_context_length": cfg.last_context_length, "mem_layers": list(cfg.mem_layers),
                                     "mem_top_k": cfg.mem_top_k, "mem_index": cfg.mem_index,
                                     "mem_max_tokens": cfg.mem_max_tokens}
            bar.set_postfix(setting=setting.name)
            results[setting.name] = evaluate(model, p.draws, p.counts, args.target_tokens, args.distractor_tokens,
                                             args.chunk, bar)
            logger.info("%s: %s, %.1f s", setting.name, ", ".join(
                f"{r['distractors']}: {r['ppl']:.3f}" for r in results[setting.name]["rows"]),
                results[setting.name]["seconds"])
            del model

    fields = {
        "files": args.files, "text_field": args.text_field, "split_tokens": args.split_tokens,
        "target_tokens": args.target_tokens, "distractor_tokens": args.distractor_tokens, "distractors": p.counts,
        "targets": len(p.draws), "seed": args.seed, "bos": p.bos, "chunk": args.chunk,
        "documents": len(p.docs), "texts": len({d.text for d in p.docs}),
        "draws": [{"target": dr.target.source, "target_doc_tokens": dr.target.tokens,
                   "distractors": [doc.source for doc in dr.distractors]} for dr in p.draws],
    }
    report = run_report("distraction", args, p.model_dir, p.tokenizer_dir, p.window, fields, configs, results)
    title = (f"distraction: {p.model_dir.name} ({len(p.draws)} targets of {args.target_tokens} tokens, distractors "
             f"of {args.distractor_tokens})")
    return print_and_write(args, report, format_table(results),
                           {"distraction.png": lambda path: plot_distraction(path, results, title)})


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, prepare, run, argv)


if __name__ == "__main__":
    main()
