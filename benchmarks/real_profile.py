"""Where a real model's prefill spends its time with memory in every layer: one forward under cProfile.

Reads a passkey prompt (eval/passkey.py's protocol, ``--template``) through a checkpoint with every layer a memory
layer (``mem_layers`` overridden), top-k memory through ``--index``, and attributes the wall time to what the
issue of every-layer memory asks about:

  * model GEMMs: the projections and MLP (``torch.nn.functional.linear``) and the LM head;
  * local attention: the fused causal attention over the window, with its LSE (``fot.attention._local_part``);
  * search: ``KeySearch.search`` of every memory layer, split into its scoring matmul, ``topk``, the dtype
    conversions (``.float()``/``.to``) and the torch <-> numpy copies it makes, and FAISS's own calls;
  * index upkeep: ``KeySearch.update`` (IVF k-means training, rebuilds, adds);
  * gather: ``fot.attention.gather_memory`` (retrieved keys and values, with their conversion to the query dtype);
  * top-k attention: ``fot.attention._topk_block`` less its gather (scores, softmax, the LSE merge);
  * memory writes: ``MemoryStore.append``.

cProfile's own overhead is a few percent here: the time goes to a few thousand large tensor calls, not to Python.
Each row is a function's cumulative time; sub-rows (indented) are parts of the row above them.

    python -m benchmarks.real_profile --tokens 8192 --index exact
    python -m benchmarks.real_profile --model models/smollm2-fot --tokens 16384 --index faiss-ivf --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import time

from benchmarks.bench_config import check_args
from tasks.passkey import TEMPLATES
from plumbing.cli import ArgumentParser

# (label, "own" or "cum", predicate on a function's (file, name)). A row sums the matching functions' own time or
# their cumulative time.
ROWS = [
    ("model GEMMs (linear)", "own", lambda f, n: n == "<built-in method torch._C._nn.linear>"),
    ("local attention (fused, with LSE)", "cum", lambda f, n: f.endswith("fot/attention.py") and n == "_local_part"),
    ("search (KeySearch.search, all layers)", "cum", lambda f, n: f.endswith("fot/cache.py") and n == "retrieve"),
    ("index upkeep (KeySearch.update)", "cum", lambda f, n: f.endswith("fot/search.py") and n == "update"),
    ("top-k attention (incl. gather)", "cum", lambda f, n: f.endswith("fot/attention.py") and n == "_topk_block"),
    ("memory writes (MemoryStore.append)", "cum", lambda f, n: f.endswith("fot/memory.py") and n == "append"),
]
# parts of a row above, each (row label, part label, "own"/"cum"/"called" (own time when called from fot/search.py),
# predicate)
PARTS = [
    ("search", "exact_topk (exact, or IVF before training)", "cum", lambda f, n: n == "exact_topk"),
    ("search", "score matmul", "called", lambda f, n: n in ("<built-in method torch.matmul>",
                                                            "<built-in method torch.mm>")),
    ("search", "topk selection", "called", lambda f, n: n == "<method 'topk' of 'torch._C.TensorBase' objects>"),
    ("search", "dtype conversions (.float())", "called",
     lambda f, n: n == "<method 'float' of 'torch._C.TensorBase' objects>"),
    ("search", "torch <-> numpy (.numpy(), .contiguous())", "called",
     lambda f, n: n in ("<method 'numpy' of 'torch._C.TensorBase' objects>",
                        "<method 'contiguous' of 'torch._C.TensorBase' objects>")),
    ("search", "FAISS search calls", "own", lambda f, n: "_swigfaiss" in n and "search" in n),
    ("index upkeep", "FAISS train and add", "own", lambda f, n: "_swigfaiss" in n and "search" not in n),
    ("top-k attention", "gather of retrieved K/V", "cum", lambda f, n: f.endswith("fot/attention.py")
     and n == "gather_memory"),
]


def _sum(stats: pstats.Stats, kind: str, match) -> float:
    total = 0.0
    for (file, _, name), (_, _, tt, ct, callers) in stats.stats.items():
        if not match(file, name):
            continue
        if kind == "called":
            total += sum(c[2] for caller, c in callers.items() if caller[0].endswith("fot/search.py"))
        else:
            total += tt if kind == "own" else ct
    return total


def attribute(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    """(label, seconds, indent) rows from a profile (module docstring), each row followed by its parts."""
    rows = []
    for label, kind, match in ROWS:
        rows.append((label, _sum(stats, kind, match), 0))
        rows += [(part, _sum(stats, k, m), 1) for row, part, k, m in PARTS if label.startswith(row)]
    return rows


def build(model_path: str, index: str, k: int, nprobe: int, layers: str, mem_dtype: str | None):
    import fot

    n_layers = fot.LongLlamaConfig.from_pretrained(model_path).num_hidden_layers
    mem_layers = list(range(n_layers)) if layers == "all" else [int(x) for x in layers.split(",")]
    overrides = dict(mem_layers=mem_layers, mem_top_k=k, mem_index=index, mem_nprobe=nprobe, use_cache=False)
    if mem_dtype:
        overrides["mem_dtype"] = mem_dtype
    return fot.LongLlamaForCausalLM.from_pretrained(model_path, **overrides).eval()


def run(args) -> dict:
    import torch

    import fot
    from benchmarks.memory_scaling import input_ids

    torch.set_num_threads(args.threads)
    if args.index.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(args.threads)
    model = build(args.model, args.index, args.k, args.nprobe, args.layers, args.mem_dtype)
    ids = input_ids(args.tokens, args.model, args.template)
    with torch.inference_mode():
        model(ids[:, :600], past_key_values=fot.LongLlamaCache(model.config))  # warm-up, memory included
        cache = fot.LongLlamaCache(model.config)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        model(ids, logits_to_keep=1, past_key_values=cache)
        profiler.disable()
        seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    if args.pstats:
        stats.dump_stats(args.pstats)
    rows = attribute(stats)
    cfg = model.config
    return {
        "tokens": ids.shape[1], "index": args.index, "k": args.k, "nprobe": args.nprobe, "threads": args.threads,
        "mem_layers": len(cfg.mem_layers), "mem_dtype": cfg.mem_dtype, "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_bytes": cache.memory_bytes(), "rows": rows,
    }  # fmt: skip


def print_report(report: dict) -> None:
    total = report["seconds"]
    print(f"{report['tokens']} tokens, {report['mem_layers']} memory layers, mem_index={report['index']} "
          f"k={report['k']} nprobe={report['nprobe']}, mem_dtype={report['mem_dtype']}, {report['threads']} "
          f"thread(s): {total:.1f} s, peak RSS {report['peak_rss_mib']:.0f} MiB")  # fmt: skip
    print(f"{'part':<44}{'seconds':>9}{'share':>8}")
    for label, seconds, indent in report["rows"]:
        print(f"{'  ' * indent + label:<44}{seconds:>9.2f}{seconds / total:>8.1%}")
    print(f"memory: {json.dumps(report['memory_bytes'])}")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-fot")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--index", default="exact", choices=["exact", "faiss-flat", "faiss-ivf"])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--layers", default="all", help="'all' or comma-separated memory layers")
    parser.add_argument("--mem-dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--template", default="landmark", choices=list(TEMPLATES))
    parser.add_argument("--pstats", help="also write the raw profile here (python -m pstats FILE)")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "k", "nprobe", "threads"))
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
