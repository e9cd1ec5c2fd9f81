"""Memory scaling: prefill time against input length for every memory backend, side by side.

Bench config as ``benchmarks/prefill.py`` (vocab 1000, 4 layers, hidden 256, 4 heads, FFN 688, window 512,
``last_context_length`` 256, memory layers [2, 3], fp32, one thread for torch and FAISS). For each N in
{16K, 32K, 64K, 128K, 256K} it times one forward with: memory off (the floor), dense memory, and top-k memory
through "exact", "faiss-flat" and "faiss-ivf", with k = 32 and 128. Each case runs in its own process, so its
peak RSS is its own. It prints seconds, the ratio to memory-off, peak RSS, recall@k for the approximate index
(tie-aware, measured on a sample of the real queries against exact search on the same memory; the time of that
check is left out of the seconds), and the growth exponent (log-log slope of seconds from 32K to 256K). Cases
whose predicted time exceeds ``--max-seconds`` (10 min) are skipped and say so. Finally it times decoding one
token after a 16K prompt.

``--model DIR`` runs the same sweep on a trained checkpoint instead of the random bench model, reading the
passkey protocol's text (filler with one pass key) through the checkpoint's tokenizer: memory off means
``mem_layers=[]`` on the same weights. A random model's memory keys are nearly isotropic, the hardest case
for any approximate index; a trained model's keys show what the index does on the keys it is meant for.

    python benchmarks/memory_scaling.py
    python benchmarks/memory_scaling.py --tokens 16384 32768 --backends off dense faiss-ivf --k 32
    python benchmarks/memory_scaling.py --model models/fot-tiny --backends off faiss-ivf --k 32
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_config import check_args
from benchmarks.bench_config import LONG as BENCH
from plumbing.cli import ArgumentParser
from tasks.passkey import TEMPLATES
RECALL_EVERY = 16  # probe every 16th search call of a layer
RECALL_QUERIES = 64  # queries per probe


def build_model(backend: str, k: int | None, nprobe: int, model_path: str | None = None):
    import torch

    import fot

    torch.manual_seed(0)
    mem = backend != "off"
    top_k = None if backend in ("off", "dense") else k
    if model_path is not None:
        overrides = dict(mem_top_k=top_k, mem_index=backend if top_k else "exact", mem_nprobe=nprobe, use_cache=False)
        if not mem:
            overrides["mem_layers"] = []
        return fot.LongLlamaForCausalLM.from_pretrained(model_path, **overrides).eval()
    config = fot.LongLlamaConfig(
        **BENCH, mem_layers=[2, 3] if mem else [], mem_dtype="float32", mem_top_k=top_k,
        mem_index=backend if top_k else "exact", mem_nprobe=nprobe, use_cache=False,
    )  # fmt: skip
    return fot.LongLlamaForCausalLM(config).eval()


def input_ids(tokens: int, model_path: str | None, template: str = "landmark"):
    """[1, tokens] ids: random ids for the bench model; a passkey prompt of ``template`` (tasks/passkey.py) for a
    trained checkpoint."""
    import torch

    if model_path is None:
        return torch.randint(0, BENCH["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    from plumbing.tokenizer import load_tokenizer
    from eval.passkey import PromptEncoder, make_trials

    trial = make_trials(PromptEncoder(load_tokenizer(Path(model_path))), [tokens], 1, seed=0,
                        templates=[template])[tokens][0]
    return torch.tensor([trial.prompt_ids[:tokens]])


def recall_probe_factory(stats: dict):
    """A search factory for the caches: each backend it builds also searches a sample of its real queries
    exactly and counts the recall in ``stats``."""
    from fot.search import default_search_factory, exact_topk, recall_at_k

    def probed(config, layer_idx):
        search = default_search_factory(config, layer_idx)
        inner = search.search_scored  # what the cache calls (``search`` for the backends that give no scores)
        calls = [0]

        def search_with_probe(q_BGXH, view, k):
            idx, scores = inner(q_BGXH, view, k)
            calls[0] += 1
            if calls[0] % RECALL_EVERY == 0 and view.size > k:
                start, cpu_start = time.perf_counter(), time.process_time()
                q = q_BGXH[:, :, :RECALL_QUERIES]
                exact_scores, _ = exact_topk(q, view.k_BGMH, view.valid_BM, k)
                hits, wanted = recall_at_k(q, view.k_BGMH, idx[:, :, :RECALL_QUERIES], exact_scores)
                stats["hits"] += hits
                stats["total"] += wanted
                stats["probe_seconds"] += time.perf_counter() - start  # not part of the backend's time
                stats["probe_cpu_seconds"] = stats.get("probe_cpu_seconds", 0.0) + time.process_time() - cpu_start
            return idx, scores

        search.search_scored = search_with_probe
        return search

    return probed


def run_case(tokens: int, backend: str, k: int | None, nprobe: int, model_path: str | None, template: str,
             threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if backend.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
    import fot
    from fot.search import default_search_factory

    stats = {"hits": 0, "total": 0, "probe_seconds": 0.0}
    factory = recall_probe_factory(stats) if backend == "faiss-ivf" else default_search_factory
    model = build_model(backend, k, nprobe, model_path)
    ids = input_ids(tokens, model_path, template)
    with torch.inference_mode():
        model(ids[:, :1024], past_key_values=fot.LongLlamaCache(model.config, search_factory=factory))  # warm-up
        stats.update(hits=0, total=0, probe_seconds=0.0)
        cache = fot.LongLlamaCache(model.config, search_factory=factory)
        start = time.perf_counter()
        model(ids, logits_to_keep=1, past_key_values=cache)
        seconds = time.perf_counter() - start - stats["probe_seconds"]
    recall = stats["hits"] / stats["total"] if stats["total"] else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": tokens, "input_tokens": ids.shape[1], "backend": backend, "k": k, "seconds": seconds,
            "recall": recall, "peak_rss_mib": peak}  # fmt: skip


def run_decode(prompt: int, backend: str, k: int | None, nprobe: int, model_path: str | None, template: str,
               threads: int, steps: int = 200) -> dict:
    import torch

    torch.set_num_threads(threads)
    if backend.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
    model = build_model(backend, k, nprobe, model_path)
    ids = input_ids(prompt, model_path, template)
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            out = model(tok, cache=cache, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(tok, cache=cache, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
        ms = (time.perf_counter() - start) / steps * 1000
    return {"backend": backend, "k": k, "ms_per_token": ms}


def spawn(args, *case) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(case), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def predict(history: list[tuple[int, float]], tokens: int) -> float | None:
    """Extrapolate seconds to ``tokens`` from the last two sizes (power law), or None."""
    if len(history) < 2:
        return None
    (n0, t0), (n1, t1) = history[-2:]
    slope = math.log(t1 / t0) / math.log(n1 / n0)
    return t1 * (tokens / n1) ** max(slope, 1.0)


def growth_exponent(rows: list[dict]) -> float | None:
    by_n = {r["tokens"]: r["seconds"] for r in rows}
    if 32768 in by_n and 262144 in by_n:
        return math.log(by_n[262144] / by_n[32768]) / math.log(8)
    return None


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--backends", nargs="+", default=["off", "dense", "exact", "faiss-flat", "faiss-ivf"],
                        choices=["off", "dense", "exact", "faiss-flat", "faiss-ivf"])
    parser.add_argument("--k", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--decode-prompt", type=int, default=16384)
    parser.add_argument("--model", help="a trained checkpoint directory, read on passkey text (module docstring)")
    parser.add_argument("--template", default="landmark", choices=list(TEMPLATES),
                        help="with --model: the passkey template whose text is read (tasks/passkey.py), e.g. "
                             "number-ledger for varied text full of numbers")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "k", "nprobe", "threads", "max_seconds", "decode_prompt"))
    if args.case:
        case = json.loads(args.case)
        if case[0] == "decode":
            print(json.dumps(run_decode(*case[1:], threads=args.threads)))
        else:
            print(json.dumps(run_case(*case, threads=args.threads)))
        return

    variants = [(b, None) for b in args.backends if b in ("off", "dense")]
    variants += [(b, k) for b in args.backends if b not in ("off", "dense") for k in args.k]
    source = f"{args.model} on {args.template} passkey text" if args.model else "bench model (random weights) on random ids"
    print(f"memory scaling, {source}, {args.threads} thread(s), nprobe={args.nprobe}")
    header = f"{'backend':<12}{'k':>5}{'tokens':>8}{'seconds':>10}{'x off':>7}{'recall@k':>10}{'RSS MiB':>9}"
    print(header)
    print("-" * len(header))
    rows, off = [], {}
    for backend, k in variants:
        history, done = [], []
        for tokens in args.tokens:
            guess = predict(history, tokens)
            if guess is not None and guess > args.max_seconds:
                print(f"{backend:<12}{k or '-':>5}{tokens:>8}   skipped (predicted {guess:.0f} s > {args.max_seconds:.0f} s)")
                continue
            row = spawn(args, tokens, backend, k, args.nprobe, args.model, args.template)
            history.append((tokens, row["seconds"]))
            if backend == "off":
                off[tokens] = row["seconds"]
            ratio = row["seconds"] / off[tokens] if tokens in off else float("nan")
            recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
            print(f"{backend:<12}{k or '-':>5}{tokens:>8}{row['seconds']:>10.2f}{ratio:>7.2f}{recall:>10}"
                  f"{row['peak_rss_mib']:>9.0f}", flush=True)  # fmt: skip
            row["ratio_to_off"] = ratio
            rows.append(row)
            done.append(row)
        slope = growth_exponent(done)
        if slope is not None:
            print(f"{backend:<12}{k or '-':>5}  growth exponent 32K->256K: {slope:.3f}", flush=True)
    print(f"\ndecode one token after a {args.decode_prompt}-token prompt")
    decode_off = None
    for backend, k in variants:
        row = spawn(args, "decode", args.decode_prompt, backend, k, args.nprobe, args.model, args.template)
        decode_off = row["ms_per_token"] if backend == "off" else decode_off
        ratio = row["ms_per_token"] / decode_off if decode_off else float("nan")
        print(f"{backend:<12}{k or '-':>5}{row['ms_per_token']:>10.2f} ms{ratio:>7.2f}x off", flush=True)
        rows.append({"decode": True, **row, "ratio_to_off": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
