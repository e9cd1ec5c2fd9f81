"""Real-model benchmark: a pretrained checkpoint (SmolLM2-135M, ``models/smollm2-fot``) with memory in every layer,
against the same weights with memory off and against HF full attention, side by side in one run.

Cases, each in its own process so its peak RSS is its own:
  * ``off``: fot with ``mem_layers=[]`` (window W = the checkpoint's, 512): the cost of the model itself;
  * ``exact``, ``faiss-flat``, ``faiss-ivf``, ``faiss-ivf-sq8``, ``ivf-gemm``, ``ivf-scan``: every layer a memory
    layer, top-k memory (``--k``, default 32) through that ``mem_index``; the approximate ones also report
    tie-aware recall@k against exact search on a sample of their real queries (``benchmarks/memory_scaling.py``'s
    probe; the probe's time is left out of the wall seconds);
  * ``blocks``: every layer a memory layer with block retrieval (``fot.blocks``: ``--blocks`` blocks of
    ``--block-size`` slots per chunk of ``--block-queries`` queries); its recall@k is the share of each sampled
    query's exact top-k memory keys that lie in the blocks its chunk chose, so it reads on the scale of the
    indexes' recall;
  * ``heads``: ``ivf-scan`` with memory read only by the query heads of ``--heads`` (a ``mem_heads`` file of
    eval/retrieval_heads.py, or layer.head pairs), whose layers are then the only memory layers (``--layers`` does
    not apply); with ``--model-layers``, the heads of the layers kept;
  * ``hf``: transformers' ``LlamaForCausalLM`` with SDPA attention in fp32, loaded with the same weights, reading
    the whole prompt as one sequence (its attention grows with the square of the length).

Each case reads the same passkey prompt (eval/passkey.py's protocol, ``--template``) of N tokens, timed as one
prefill (wall seconds, and the CPU seconds the process got: on a shared machine the ratio of CPU seconds between
cases is the steadier one, since a case that waits for a core is not charged for the wait), then decodes
``--decode-steps`` tokens greedily and reports ms per token. Case x length pairs whose
predicted prefill (a power law through the case's last two lengths, or its quadratic terms from its first
length) exceeds ``--max-seconds`` are skipped, and the table says so.

The floors price arithmetic at this core's fp32 GEMM peak (``benchmarks/prefill.py``'s ``gemm_peak_gflops``),
added to memory off's measured time:
  * "floor, exact": every query scores every memory key of its KV head (2 H FLOPs each), plus top-k attention
    (4 K H FLOPs per query head): what no exact search can beat;
  * "floor, free search": top-k attention alone, as if the search cost nothing: what no search can beat.

    python -m benchmarks.real_model --tokens 16384
    python -m benchmarks.real_model --tokens 16384 65536 262144 --cases off faiss-ivf hf --max-seconds 1200
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

from benchmarks.bench_config import check_args
from tasks.passkey import TEMPLATES
from plumbing.cli import ArgumentParser

CASES = ("off", "exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8", "ivf-gemm", "ivf-scan", "heads", "blocks", "hf")
INDEXES = ("exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8", "ivf-gemm", "ivf-scan")
APPROXIMATE = ("faiss-ivf", "faiss-ivf-sq8", "ivf-gemm", "ivf-scan", "heads")


def memory_layers(model_path: str, layers: str, model_layers: int | None = None) -> list[int]:
    import fot

    n = model_layers or fot.LongLlamaConfig.from_pretrained(model_path).num_hidden_layers
    return list(range(n)) if layers == "all" else [int(x) for x in layers.split(",")]


def build(case: str, args):
    """``case``'s model (module docstring) from the checkpoint ``args.model``."""
    import torch

    import fot

    if case == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        from benchmarks.train_throughput import LLAMA_FIELDS

        ours = fot.LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, mem_layers=[],
                                                        **truncate(args))  # fmt: skip
        fields = {k: getattr(ours.config, k) for k in LLAMA_FIELDS}
        hf = LlamaForCausalLM(LlamaConfig(**fields, max_position_embeddings=max(args.tokens) + args.decode_steps + 8,
                                          attn_implementation="sdpa"))  # fmt: skip
        hf.load_state_dict(ours.state_dict())
        return hf.eval()
    overrides = {"mem_layers": [], **truncate(args)}
    if case in INDEXES:
        overrides.update(mem_layers=memory_layers(args.model, args.layers, args.model_layers), mem_top_k=args.k,
                         mem_index=case, mem_nprobe=args.nprobe)  # fmt: skip
    if case == "heads":
        heads = chosen_heads(args)
        overrides.update(mem_layers=list(heads), mem_heads=heads, mem_top_k=args.k, mem_index="ivf-scan",
                         mem_nprobe=args.nprobe)  # fmt: skip
    if case == "blocks":
        overrides.update(mem_layers=memory_layers(args.model, args.layers, args.model_layers), mem_top_k=None,
                         mem_index="exact", mem_blocks=args.blocks, mem_block_size=args.block_size,
                         mem_block_queries=args.block_queries)  # fmt: skip
    if args.mem_dtype:
        overrides["mem_dtype"] = args.mem_dtype
    return fot.LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, **overrides).eval()


def chosen_heads(args) -> dict[int, list[int]]:
    """The ``heads`` case's ``mem_heads``: ``--heads`` (a heads file or layer.head pairs), less the layers that
    ``--model-layers`` leaves out."""
    from fot.convert import _mem_heads_arg

    if not args.heads:
        raise SystemExit("the heads case needs --heads FILE (eval/retrieval_heads.py's heads.json) or layer.head pairs.")
    heads = _mem_heads_arg(args.heads)
    kept = {layer: hs for layer, hs in heads.items() if not args.model_layers or layer < args.model_layers}
    if not kept:
        raise SystemExit(f"--heads lists no head in the first {args.model_layers} layers (--model-layers).")
    return kept


def truncate(args) -> dict:
    """``--model-layers N``: only the first N decoder layers are built and loaded. Their keys and queries are the
    whole model's (layer l reads only layers below it), and model and search costs both scale with the layer
    count, so ratios to memory off and recall hold for those layers at N / L of the run time."""
    return {"num_hidden_layers": args.model_layers} if args.model_layers else {}


def probe_block_recall(stats: dict, k: int) -> None:
    """Make every ``MemoryReader.choose_blocks`` of this process also count, on a sample of its calls and queries,
    how many of each query's exact top-k memory slots lie in the blocks chosen for its chunk (in ``stats``, the
    probe's seconds apart). The benchmark runs each case in its own process, so the patch stays in it."""
    import torch

    from benchmarks.memory_scaling import RECALL_EVERY, RECALL_QUERIES
    from fot.cache import MemoryReader
    from fot.search import exact_topk

    inner = MemoryReader.choose_blocks
    calls = [0]

    def choose_with_probe(self, q_BNTH):
        choice = inner(self, q_BNTH)
        calls[0] += 1
        view = self.view()
        if calls[0] % RECALL_EVERY == 0 and view.size > k:
            start, cpu_start = time.perf_counter(), time.process_time()
            B, N, T, H = q_BNTH.shape
            G = view.k_BGMH.shape[1]
            t = torch.arange(min(T, RECALL_QUERIES))
            q = q_BNTH[:, :, t].reshape(B, G, (N // G) * t.numel(), H)  # rows (query head, query)
            scores, slots = exact_topk(q, view.k_BGMH, view.valid_BM, k)
            chunk_of_row = (t // choice.chunk).repeat(N // G)  # [X]
            chosen = choice.ids_BGCn[:, :, chunk_of_row]  # [B, G, X, n]
            inside = ((slots // choice.block_size)[..., None] == chosen[..., None, :]).any(-1)
            found = torch.isfinite(scores)
            stats["hits"] += int((inside & found).sum())
            stats["total"] += int(found.sum())
            stats["probe_seconds"] += time.perf_counter() - start
            stats["probe_cpu_seconds"] += time.process_time() - cpu_start
        return choice

    MemoryReader.choose_blocks = choose_with_probe


def run_case(case: str, tokens: int, args) -> dict:
    """Prefill ``tokens`` prompt tokens, then decode ``args.decode_steps`` tokens; seconds, ms/token, RSS."""
    import torch

    import fot
    from benchmarks.memory_scaling import input_ids, recall_probe_factory
    from fot.search import default_search_factory

    torch.set_num_threads(args.threads)
    if case.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(args.threads)
    model = build(case, args)
    ids = input_ids(tokens, args.model, args.template)
    stats = {"hits": 0, "total": 0, "probe_seconds": 0.0, "probe_cpu_seconds": 0.0}
    factory = recall_probe_factory(stats) if case in APPROXIMATE else default_search_factory
    if case == "blocks":
        probe_block_recall(stats, args.k)
    with torch.inference_mode():
        kwargs = {} if case == "hf" else {"past_key_values": fot.LongLlamaCache(model.config, search_factory=factory)}
        model(ids[:, :600], use_cache=False, **kwargs)  # warm-up: kernels, allocator, memory (600 > W + L)
        stats.update(hits=0, total=0, probe_seconds=0.0, probe_cpu_seconds=0.0)
        if case != "hf":
            kwargs = {"past_key_values": fot.LongLlamaCache(model.config, search_factory=factory)}
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model(ids, use_cache=True, logits_to_keep=1, **kwargs)
        prefill = time.perf_counter() - start - stats["probe_seconds"]
        prefill_cpu = time.process_time() - cpu_start - stats["probe_cpu_seconds"]  # the recall probe's left out
        cache = getattr(out, "cache", None) or out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        probe_before = stats["probe_seconds"]
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start - (stats["probe_seconds"] - probe_before)
    recall = stats["hits"] / stats["total"] if stats["total"] else None
    return {"case": case, "tokens": ids.shape[1], "prefill_seconds": prefill, "prefill_cpu_seconds": prefill_cpu,
            "decode_ms": decode / max(args.decode_steps, 1) * 1000, "recall": recall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "memory_bytes": None if case == "hf" else cache.memory_bytes()}  # fmt: skip


def search_flops(config, tokens: int, k: int) -> tuple[float, float]:
    """(exact search FLOPs, top-k attention FLOPs) of one prefill of ``tokens`` with every memory layer of
    ``config``: each window's queries score every memory key (2 H FLOPs per key and query head), then attend to
    their k retrieved slots (QK and PV, 4 k H)."""
    from fot.model import plan_chunks

    N, H = config.num_attention_heads, config.head_dim
    chunks = plan_chunks(tokens, config.max_position_embeddings, config.last_context_length)
    pairs = sum((end - start) * start for start, end in chunks)  # memory = every token before the window
    queries = sum(end - start for start, end in chunks if start > 0)  # windows that have memory to search
    layers = len(config.mem_layers)
    return 2.0 * H * N * pairs * layers, 4.0 * k * H * N * queries * layers


def spawn(args, case: str, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.real_model", "--case", case, "--tokens", str(tokens)]
    for name in ("model", "k", "nprobe", "layers", "threads", "decode_steps", "template", "mem_dtype", "model_layers",
                 "blocks", "block_size", "block_queries", "heads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def predict(history: list[tuple[int, float]], tokens: int, quadratic: bool) -> float | None:
    """Seconds at ``tokens`` from the case's measured (tokens, seconds): a power law through the last two (slope
    at least 1), or from one point, t * (tokens / n)^2 for a case that grows quadratically."""
    if not history:
        return None
    if len(history) == 1:
        n, t = history[0]
        return t * (tokens / n) ** (2 if quadratic else 1)
    (n0, t0), (n1, t1) = history[-2:]
    slope = math.log(t1 / t0) / math.log(n1 / n0)
    return t1 * (tokens / n1) ** max(slope, 1.0)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-fot")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=16, help="the blocks case: blocks each chunk of queries reads")
    parser.add_argument("--block-size", type=int, default=32, help="the blocks case: slots per block")
    parser.add_argument("--block-queries", type=int, default=64, help="the blocks case: queries per chunk")
    parser.add_argument("--layers", default="all", help="memory layers: 'all' or a comma-separated list")
    parser.add_argument("--heads", help="the heads case: a mem_heads file (eval/retrieval_heads.py) or layer.head pairs")
    parser.add_argument("--model-layers", type=int, help="run only the first N decoder layers (truncate's docstring)")
    parser.add_argument("--mem-dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--template", default="landmark", choices=list(TEMPLATES))
    parser.add_argument("--max-seconds", type=float, default=900.0, help="skip a case predicted to take longer")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_args(parser, args,
               positive=("tokens", "k", "nprobe", "threads", "decode_steps", "max_seconds", "model_layers", "blocks",
                         "block_size", "block_queries"))
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens[0], args)))
        return

    import fot
    from benchmarks.prefill import gemm_peak_gflops

    peak = gemm_peak_gflops()
    mem_config = fot.LongLlamaConfig.from_pretrained(
        args.model, mem_layers=memory_layers(args.model, args.layers, args.model_layers), **truncate(args))
    print(f"{args.model}: {mem_config.num_hidden_layers} layers, {len(mem_config.mem_layers)} memory layers, "
          f"k={args.k}, nprobe={args.nprobe}, "
          f"W={mem_config.max_position_embeddings}, L={mem_config.last_context_length}, {args.threads} thread(s); "
          f"fp32 GEMM peak {peak:.1f} GFLOP/s", flush=True)  # fmt: skip
    header = (f"{'case':<11}{'tokens':>8}{'prefill s':>11}{'x off':>7}{'cpu s':>9}{'x off':>7}{'decode ms':>11}"
              f"{'x off':>7}{'recall':>8}{'RSS MiB':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows, off, history = [], {}, {}
    for tokens in args.tokens:
        for case in args.cases:
            guess = predict(history.get(case, []), tokens, quadratic=case in ("hf", "exact", "faiss-flat"))
            if guess is not None and guess > args.max_seconds:
                print(f"{case:<11}{tokens:>8}   skipped (predicted {guess:.0f} s > --max-seconds {args.max_seconds:.0f})",
                      flush=True)  # fmt: skip
                rows.append({"case": case, "tokens": tokens, "skipped": True, "predicted_seconds": guess})
                continue
            row = spawn(args, case, tokens)
            history.setdefault(case, []).append((tokens, row["prefill_seconds"]))
            if case == "off":
                off[tokens] = row
            base = off.get(tokens)
            row["prefill_x_off"] = row["prefill_seconds"] / base["prefill_seconds"] if base else None
            row["cpu_x_off"] = row["prefill_cpu_seconds"] / base["prefill_cpu_seconds"] if base else None
            row["decode_x_off"] = row["decode_ms"] / base["decode_ms"] if base else None
            rows.append(row)
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            print(f"{case:<11}{tokens:>8}{row['prefill_seconds']:>11.1f}{fmt(row['prefill_x_off']):>7}"
                  f"{row['prefill_cpu_seconds']:>9.1f}{fmt(row['cpu_x_off']):>7}"
                  f"{row['decode_ms']:>11.1f}{fmt(row['decode_x_off']):>7}"
                  f"{'-' if row['recall'] is None else format(row['recall'], '.3f'):>8}{row['peak_rss_mib']:>9.0f}",
                  flush=True)  # fmt: skip
        if tokens in off:
            exact, attention = search_flops(mem_config, tokens, args.k)
            base = off[tokens]["prefill_seconds"]
            floor_exact = base + (exact + attention) / (peak * 1e9)
            floor_free = base + attention / (peak * 1e9)
            print(f"{'floor':<11}{tokens:>8}  exact search {floor_exact:.1f} s ({floor_exact / base:.2f}x off, "
                  f"{exact / 1e12:.1f} TFLOP); free search {floor_free:.1f} s ({floor_free / base:.2f}x off)",
                  flush=True)  # fmt: skip
            rows.append({"case": "floor", "tokens": tokens, "exact_seconds": floor_exact, "free_seconds": floor_free,
                         "exact_search_tflop": exact / 1e12, "gemm_peak_gflops": peak})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
