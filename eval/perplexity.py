"""Perplexity against position in long documents, per inference setting.

    python eval/perplexity.py --model models/fot-tiny --settings memory no-memory topk:32 \\
        --source passkey --length 8192 --docs 8 --out runs/perplexity
    python eval/perplexity.py --model DIR --source files --files a.jsonl b.txt --text-field text --length 16384

Documents (the same for every setting):

* ``--source passkey``: ``--docs`` passkey prompts of eval/passkey.py at length ``--length`` (the same
  prompts that ``eval/passkey.py --lengths N --seed S`` builds: ``make_trials`` with the calibrated filler and
  the (seed, length, trial) generators), each followed by " K." -- the answer. A document's tokens are
  tokenize(prompt + " K.") when they start with the prompt's tokens and the answer's tokens, otherwise the
  prompt's tokens followed by the answer's (the answer's tokens as eval/passkey.py finds them). Documents
  therefore have about ``--length`` tokens plus the answer; the table and results.json give the actual counts.
* ``--source files``: plain ``.txt`` files (one document per file), ``.jsonl`` files (one JSON object per
  line, its text in ``--text-field``) and ``.parquet`` files (one row per document, e.g. the held-out books of
  ``assets/books/heldout.parquet``), in the order given. The first ``--docs`` documents with at least
  ``--length`` tokens are used, truncated to exactly ``--length`` tokens; shorter ones are skipped.

Documents are tokenized with BOS as eval/passkey.py's ``PromptEncoder`` does (``--no-bos`` turns it off).

Scoring: for each setting (the model loaded once per setting) and document, one forward pass of the whole
document through ``model.model`` under ``torch.no_grad()`` (LongLLaMA splits it into windows of
``max_position_embeddings`` and fills its memory), then ``lm_head`` on ``--chunk`` positions at a time with
``log_softmax`` in fp32 (fp64 for fp64 models), so the logits of a long document are never all held at once.
The NLL at position t is that of predicting token t + 1 from tokens 0..t; a document of N tokens has N - 1.

Buckets by position t, with W the model's window: [0, W), [W, 2W), [2W, 4W), [4W, 8W), ... up to the longest
document. A bucket's perplexity is exp(mean NLL over every position of every document in it); "all" is over
every position. For passkey documents the answer is also scored: the mean NLL of its tokens (each predicted
from the prompt and the answer's earlier tokens), and exact match (%): every answer token is the argmax at its
position (teacher-forced greedy decoding; it can differ from eval/passkey.py's generate(), which runs the
prompt alone and so windows it differently).

Outputs: a table (rows: buckets, columns: settings, cells: perplexity) on stdout, and with ``--out DIR``
trials.jsonl (each scored document as it arrives; ``--resume`` continues a killed run from it), then at the end
results.json (configuration, documents' token counts, per setting and bucket lo, hi, tokens, nll, ppl, the
whole-document perplexity, the answer's NLL and exact match for passkey, per-document results, seconds) and
perplexity.png (perplexity against the bucket's upper edge, log2 axis, window marked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.common import (
    LINE_STYLES,
    new_figure,
    Setting,
    TrialLog,
    add_model_arguments,
    add_run_arguments,
    add_settings_argument,
    check_model_args,
    check_vocab,
    cli_main,
    finish_plot,
    load_model,
    open_trials,
    print_and_write,
    run_identity,
    run_report,
    setting_model,
)
from eval.passkey import PromptEncoder, build_prompt, make_trials, trial_rng
from plumbing.cli import ArgumentParser
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger("eval.perplexity")

DEFAULT_CHUNK = 2048  # positions per lm_head call
FILE_KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- documents
@dataclass
class Document:
    ids: list[int]
    source: str  # "passkey trial T" or "FILE" / "FILE:LINE"
    answer: tuple[int, int] | None = None  # token index span [start, end) of the passkey answer
    key: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def digest(self) -> str:
        """A short hash of the token ids: the trials log checks a resumed document against it."""
        return hashlib.sha256(np.asarray(self.ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def passkey_documents(encoder: PromptEncoder, length: int, docs: int, seed: int) -> list[Document]:
    """eval/passkey.py's prompts at ``length`` tokens followed by " K." (module docstring)."""
    out = []
    for tr in make_trials(encoder, [length], docs, seed)[length]:
        prompt = build_prompt(tr.n_garbage, trial_rng(seed, length, tr.trial))
        assert prompt.key == tr.key, "make_trials and build_prompt disagree on the trial's generator"
        ids = tr.prompt_ids + tr.answer_ids
        full = encoder.encode(f"{prompt.text} {tr.key}.")
        if full[: len(ids)] == ids:
            ids = full
        start = len(tr.prompt_ids)
        out.append(Document(ids, f"passkey trial {tr.trial}", (start, start + len(tr.answer_ids)), tr.key))
    return out


def check_files(paths: list[str] | None) -> list[Path]:
    """Existing files of a known kind, or a ``ValueError`` naming the fix."""
    if not paths:
        raise ValueError("--source files needs --files: .txt files (one document each) or .jsonl files.")
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"--files: {p!r} does not exist; pass existing .txt or .jsonl files.")
        if path.suffix.lower() not in FILE_KINDS:
            raise ValueError(f"--files: {p!r} has an unknown extension {path.suffix!r}; use .txt (one document "
                             "per file), .jsonl (one JSON object per line) or .parquet (one row per document), "
                             "with the text in --text-field.")
        out.append(path)
    return out


def read_texts(paths: list[Path], text_field: str):
    """Yield (source, text) for every document of ``paths`` in order (module docstring)."""
    for path in paths:
        kind = FILE_KINDS[path.suffix.lower()]
        if kind == "text":
            yield str(path), path.read_text()
            continue
        if kind == "parquet":  # e.g. assets/books/heldout.parquet (train/corpus.py)
            yield from _parquet_texts(path, text_field)
            continue
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}); a .jsonl file holds one JSON "
                                     "object per line.") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    fields = sorted(obj) if isinstance(obj, dict) else []
                    raise ValueError(f"{path}:{n} has no text field {text_field!r} (fields: {fields}); set "
                                     "--text-field to the field that holds the document's text.")
                yield f"{path}:{n}", obj[text_field]


def _parquet_texts(path: Path, text_field: str):
    import pyarrow.parquet as pq  # installed with datasets

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set --text-field.")
    names = table.column("title").to_pylist() if "title" in table.column_names else None
    for n, text in enumerate(table.column(text_field).to_pylist()):
        yield f"{path}:{names[n] if names else n}", text


def file_documents(encoder: PromptEncoder, paths: list[Path], text_field: str, length: int,
                   docs: int) -> list[Document]:
    """The first ``docs`` documents with at least ``length`` tokens, truncated to ``length`` tokens."""
    out, longest, seen = [], 0, 0
    for source, text in read_texts(paths, text_field):
        ids = encoder.encode(text)
        seen += 1
        longest = max(longest, len(ids))
        if len(ids) >= length:
            out.append(Document(ids[:length], source))
            if len(out) == docs:
                break
    if not out:
        raise ValueError(f"no document has --length {length} tokens: the longest of {seen} has {longest}; lower "
                         "--length or pass longer documents.")
    if len(out) < docs:
        logger.warning("only %d of %d documents have >= %d tokens (asked for --docs %d)", len(out), seen, length,
                       docs)
    return out


# ----------------------------------------------------------------------------- scoring
def score_tokens(model, input_ids, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL and argmax prediction at every position but the last: ([N - 1] float64, [N - 1] long).

    One forward of ``model.model`` over the whole sequence (``input_ids``: [N] or [1, N]), then ``model.lm_head``
    on ``chunk`` positions at a time with ``log_softmax`` in fp32 (fp64 for an fp64 model). Position t's NLL is
    -log p(token t + 1 | tokens 0..t). Works for any causal LM with ``.model`` and ``.lm_head`` (fot's and HF
    Llama's).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"a document needs at least 2 tokens to score, got {n}.")
    nll, predicted = torch.empty(n - 1, dtype=torch.float64), torch.empty(n - 1, dtype=torch.long)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        for s in range(0, n - 1, chunk):
            e = min(s + chunk, n - 1)
            logp = torch.log_softmax(model.lm_head(hidden[s:e]).to(wide), dim=-1)
            nll[s:e] = -logp.gather(-1, ids[0, s + 1: e + 1, None])[:, 0].to("cpu", torch.float64)
            predicted[s:e] = logp.argmax(-1).cpu()
    return nll, predicted


def bucket_edges(n_tokens: int, window: int) -> list[int]:
    """0, W, 2W, 4W, ... below the last scored position (n_tokens - 2), then n_tokens."""
    if n_tokens < 2:
        raise ValueError(f"documents need at least 2 tokens, got {n_tokens}.")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    edges, e = [0], window
    while e < n_tokens - 1:
        edges.append(e)
        e *= 2
    return edges + [n_tokens]


def summarize(total: float, count: int) -> dict:
    """Token count, mean NLL and perplexity (None for no tokens)."""
    if count == 0:
        return {"tokens": 0, "nll": None, "ppl": None}
    mean = total / count
    return {"tokens": count, "nll": mean, "ppl": math.exp(mean)}


def bucket_sums(nll: torch.Tensor, edges: list[int]) -> list[list]:
    """One document's [NLL sum, positions] per bucket [lo, hi): all that ``merge_buckets`` needs of it."""
    return [[float(nll[lo:hi].sum().item()), nll[lo:hi].numel()] for lo, hi in zip(edges[:-1], edges[1:])]


def merge_buckets(per_doc: list[list[list]], edges: list[int]) -> list[dict]:
    """Per bucket [lo, hi) of positions: lo, hi, tokens, mean NLL over every document's positions, exp of it;
    from each document's ``bucket_sums``."""
    rows = []
    for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        total = float(sum(doc[j][0] for doc in per_doc))
        rows.append({"lo": lo, "hi": hi, **summarize(total, sum(doc[j][1] for doc in per_doc))})
    return rows


def aggregate(nlls: list[torch.Tensor], edges: list[int]) -> list[dict]:
    """``merge_buckets`` of whole documents' per-position NLLs."""
    return merge_buckets([bucket_sums(x, edges) for x in nlls], edges)


def answer_score(doc: Document, nll: torch.Tensor, predicted: torch.Tensor) -> dict:
    """The passkey answer's NLL (sum over its tokens) and teacher-forced exact match."""
    a, b = doc.answer
    target = doc.ids[a:b]
    return {"answer_tokens": b - a, "answer_nll_sum": float(nll[a - 1: b - 1].sum()),
            "answer_correct": predicted[a - 1: b - 1].tolist() == target}


# What a document's trials-log record holds beyond its row of results.json: enough to rebuild the buckets exactly.
_LOG_ONLY = ("digest", "bucket_sums", "nll_sum", "seconds")


def score_document(model, doc: Document, edges: list[int], chunk: int) -> dict:
    """One document's results.json row, with its ``bucket_sums``, whole NLL sum and the seconds it took."""
    start = time.perf_counter()
    nll, predicted = score_tokens(model, doc.ids, chunk)
    row = {"source": doc.source, "tokens": doc.tokens, "nll": float(nll.mean())}
    if doc.answer is not None:
        row.update(key=doc.key, **answer_score(doc, nll, predicted))
    return {**row, "digest": doc.digest, "bucket_sums": bucket_sums(nll, edges), "nll_sum": float(nll.sum().item()),
            "seconds": time.perf_counter() - start}


def logged_document(log: TrialLog | None, setting: str, i: int, doc: Document) -> dict | None:
    """Document ``i``'s logged record (checked against its source and tokens), or None when not scored."""
    return None if log is None else log.get((setting, i), source=doc.source, digest=doc.digest)


def evaluate(model, docs: list[Document], edges: list[int], chunk: int, bar=None, log: TrialLog | None = None,
             setting: str = "") -> dict:
    """Score every document with one model: buckets, whole-document and (passkey) answer results.

    With ``log``, documents it holds for ``setting`` (keyed (setting, document index)) are taken from it and each
    new one is appended to it as soon as it is scored. The seconds are the sum of the documents'.
    """
    records = []
    for i, doc in enumerate(docs):
        record = logged_document(log, setting, i, doc)
        if record is None:
            record = score_document(model, doc, edges, chunk)
            if log is not None:
                log.put((setting, i), record)
        records.append(record)
        if bar is not None:
            bar.update(1)
    per_doc = [{k: v for k, v in r.items() if k not in _LOG_ONLY} for r in records]
    result = {"buckets": merge_buckets([r["bucket_sums"] for r in records], edges),
              "all": summarize(float(sum(r["nll_sum"] for r in records)), sum(d.tokens - 1 for d in docs))}
    if all(d.answer is not None for d in docs):
        answered = summarize(sum(r["answer_nll_sum"] for r in per_doc), sum(r["answer_tokens"] for r in per_doc))
        result["answer"] = {**answered,
                            "exact_match": 100.0 * sum(r["answer_correct"] for r in per_doc) / len(per_doc)}
    result["seconds"] = sum(r["seconds"] for r in records)
    result["documents"] = per_doc
    return result


# ----------------------------------------------------------------------------- outputs
def _cell(x: float | None, fmt: str) -> str:
    if x is None:
        return "-"
    return format(x, ".4g" if abs(x) >= 1e6 else fmt)  # e.g. a model never trained on filler: 6.7e+12


def format_table(results: dict[str, dict]) -> str:
    """Rows = buckets (token counts), then "all" and for passkey the answer; columns = settings (perplexity)."""
    names = list(results)
    width = max([12] + [len(n) + 2 for n in names])
    first = results[names[0]]
    header = f"{'positions':<18}{'tokens':>9}" + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for i, b in enumerate(first["buckets"]):
        cells = "".join(f"{_cell(results[n]['buckets'][i]['ppl'], '.3f'):>{width}}" for n in names)
        label = f"[{b['lo']}, {b['hi']})"
        lines.append(f"{label:<18}{b['tokens']:>9}{cells}")
    cells = "".join(f"{_cell(results[n]['all']['ppl'], '.3f'):>{width}}" for n in names)
    lines.append(f"{'all':<18}{first['all']['tokens']:>9}{cells}")
    if "answer" in first:
        cells = "".join(f"{_cell(results[n]['answer']['nll'], '.3f'):>{width}}" for n in names)
        lines.append(f"{'answer NLL':<18}{first['answer']['tokens']:>9}{cells}")
        cells = "".join(f"{results[n]['answer']['exact_match']:>{width - 1}.1f}%" for n in names)
        lines.append(f"{'answer exact':<18}{len(first['documents']):>9}{cells}")
    return "\n".join(lines)


def plot_perplexity(path: Path, results: dict[str, dict], window: int, title: str) -> None:
    """Perplexity against the bucket's upper edge (log2 axis), one line per setting, window marked."""
    fig, ax = new_figure()
    values = []
    for i, (name, res) in enumerate(results.items()):
        points = [(b["hi"], b["ppl"]) for b in res["buckets"] if b["ppl"] is not None]
        values += [p for _, p in points]
        marker, line = LINE_STYLES[i % len(LINE_STYLES)]
        ax.plot([x for x, _ in points], [p for _, p in points], marker=marker, linestyle=line, label=name,
                alpha=0.85)
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.axvline(window, color="grey", linestyle="--", linewidth=1)
    ax.text(window, 1.0, f" window {window}", color="grey", fontsize=8, va="top", transform=ax.get_xaxis_transform())
    his = [b["hi"] for b in next(iter(results.values()))["buckets"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(his, [str(h) for h in his], rotation=45 if len(his) > 8 else 0)
    ax.set_xlabel("position (bucket's upper edge, tokens)")
    ax.set_ylabel("perplexity")
    finish_plot(fig, ax, path, title)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_settings_argument(p)
    p.add_argument("--length", type=int, default=4096, help="document length in tokens (default 4096)")
    p.add_argument("--docs", type=int, default=8, help="documents (default 8)")
    p.add_argument("--source", choices=["passkey", "files"], default="passkey", help="where documents come from")
    p.add_argument("--files", nargs="+", help="--source files: .txt (one document each), .jsonl or .parquet files")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl objects (default 'text')")
    p.add_argument("--seed", type=int, default=0, help="--source passkey: base seed, as eval/passkey.py")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to documents (default: as the tokenizer_config.json declares, else BOS)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"positions per lm_head call (default {DEFAULT_CHUNK})")
    add_run_arguments(p, "output directory for trials.jsonl, results.json and perplexity.png; checked before any "
                         "model is loaded")
    return p


def run_config(args, model_dir: Path, tokenizer_dir: Path, settings: list[Setting]) -> dict:
    """What determines a run's results: a resumed run must have the same (``TrialLog``). Files are compared by
    path; each logged document is checked against its source and a hash of its tokens."""
    files = [str(Path(f).resolve()) for f in args.files] if args.source == "files" else None
    return {**run_identity("perplexity", args, model_dir, tokenizer_dir, settings), "source": args.source,
            "files": files, "text_field": args.text_field if args.source == "files" else None,
            "length": args.length, "docs": args.docs, "chunk": args.chunk}


@dataclass
class Prepared:
    model_dir: Path
    tokenizer_dir: Path
    settings: list[Setting]
    window: int
    docs: list[Document]
    bos: bool
    log: TrialLog | None = None


def validate_args(args) -> tuple[Path, Path, list[Setting], dict]:
    """Argument checks that need no tokenizer or model; returns the directories, settings and saved config."""
    if args.length < 2:
        raise ValueError(f"--length must be >= 2 tokens (one prediction needs two), got {args.length}.")
    if args.docs < 1:
        raise ValueError(f"--docs must be >= 1, got {args.docs}.")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}.")
    if args.source == "files":
        check_files(args.files)
    elif args.files:
        raise ValueError("--files is only read with --source files; add --source files or drop --files.")
    settings, model_dir, tokenizer_dir, config = check_model_args(args)
    return model_dir, tokenizer_dir, settings, config


def prepare(args) -> Prepared:
    """Validate the arguments, load the tokenizer and build the documents; ``ValueError`` for bad input."""
    model_dir, tokenizer_dir, settings, config = validate_args(args)
    log = open_trials(args, run_config(args, model_dir, tokenizer_dir, settings))
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, tokenizer_dir, config)
    encoder = PromptEncoder(tokenizer, add_bos=args.bos)
    if args.source == "passkey":
        docs = passkey_documents(encoder, args.length, args.docs, args.seed)
    else:
        docs = file_documents(encoder, check_files(args.files), args.text_field, args.length, args.docs)
    logger.info("settings: %s", ", ".join(s.name for s in settings))
    logger.info("%d %s documents of %d..%d tokens", len(docs), args.source, min(d.tokens for d in docs),
                max(d.tokens for d in docs))
    return Prepared(model_dir, tokenizer_dir, settings, int(config["max_position_embeddings"]), docs,
                    encoder.add_bos, log)


def run(args, prepared: Prepared | None = None) -> dict:
    """Evaluate every setting; returns the results dictionary (also written to ``--out``)."""
    from tqdm.auto import tqdm

    p = prepared or prepare(args)
    edges = bucket_edges(max(d.tokens for d in p.docs), p.window)
    results, configs = {}, {}
    with tqdm(total=len(p.settings) * len(p.docs), desc="perplexity", unit="doc", dynamic_ncols=True) as bar:
        for setting in p.settings:
            pending = any(logged_document(p.log, setting.name, i, doc) is None for i, doc in enumerate(p.docs))
            model, configs[setting.name] = setting_model(
                p.log, setting, pending, lambda: load_model(p.model_dir, setting, args.device, args.dtype),
                lambda cfg: {"overrides": setting.overrides, "mem_layers": list(cfg.mem_layers),
                             "mem_top_k": cfg.mem_top_k, "mem_index": cfg.mem_index,
                             "last_context_length": cfg.last_context_length})
            bar.set_postfix(setting=setting.name)
            results[setting.name] = evaluate(model, p.docs, edges, args.chunk, bar, p.log, setting.name)
            logger.info("%s: perplexity %.3f, %.1f s", setting.name, results[setting.name]["all"]["ppl"],
                        results[setting.name]["seconds"])
            del model

    mean_tokens = float(np.mean([d.tokens for d in p.docs]))
    fields = {
        "source": args.source, "files": args.files if args.source == "files" else None,
        "text_field": args.text_field if args.source == "files" else None, "length": args.length,
        "docs": len(p.docs), "doc_tokens": [d.tokens for d in p.docs], "mean_tokens": mean_tokens, "seed": args.seed,
        "bos": p.bos, "chunk": args.chunk, "edges": edges,
    }
    report = run_report("perplexity", args, p.model_dir, p.tokenizer_dir, p.window, fields, configs, results)
    title = f"perplexity: {p.model_dir.name} ({len(p.docs)} {args.source} documents, {mean_tokens:.0f} tokens)"
    return print_and_write(args, report, format_table(results),
                           {"perplexity.png": lambda path: plot_perplexity(path, results, p.window, title)})


def main(argv: list[str] | None = None) -> dict:
    return cli_main(build_parser, prepare, run, argv)


if __name__ == "__main__":
    main()
