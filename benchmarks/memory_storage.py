"""Memory storage side by side: bfloat16 in RAM, int8 in RAM, and memory-mapped to disk (``mem_offload="disk"``).

One prefill of ``--tokens`` tokens per case, each case in its own process (so its peak RSS is its own), on a
checkpoint with memory in every layer (``--layers all``, the default) and top-k retrieval. It prints prefill
seconds, the ratio to the first case, peak RSS, the bytes the memory holds in RAM and on disk, and
``fot.budget``'s estimate of the RAM the run needs (which the memory check compares with what is free).

The input is seeded random token ids: the timing and the bytes do not depend on the text. The disk case writes
its memory files under ``--offload-dir`` and removes them afterwards; its pages stay in the OS's file cache while
RAM is free, so on a machine with RAM to spare it measures the cost of the memory mapping, not of the disk.

    python -m benchmarks.memory_storage --model models/smollm2-fot --tokens 16384
    python -m benchmarks.memory_storage --model models/smollm2-fot --cases bf16 disk --index exact --k 32
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from plumbing.cli import ArgumentParser

CASES = {
    "bf16": {"mem_dtype": "bfloat16"},
    "int8": {"mem_dtype": "int8"},
    "disk": {"mem_dtype": "bfloat16", "mem_offload": "disk"},
    "int8-disk": {"mem_dtype": "int8", "mem_offload": "disk"},
}


def run_case(args) -> dict:
    """One prefill in this process; returns its measurements."""
    import torch

    import fot
    from fot import budget

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    overrides = dict(CASES[args.case], mem_top_k=args.k, mem_index=args.index, use_cache=True)
    if overrides.get("mem_offload") == "disk":
        overrides["mem_offload_dir"] = args.offload_dir
    base = fot.LongLlamaConfig.from_pretrained(args.model)
    if args.layers == "all":
        overrides["mem_layers"] = list(range(base.num_hidden_layers))
    model = fot.LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, **overrides).eval()
    ids = torch.randint(100, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    estimate = budget.estimate_memory(model.config, args.tokens)
    cache = fot.LongLlamaCache(model.config)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
    seconds = time.perf_counter() - start
    stores = list(cache.memories.values())
    return {
        "case": args.case, "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_ram": sum(s.ram_bytes() for s in stores), "memory_disk": sum(s.allocated_bytes() - s.ram_bytes() for s in stores),
        "index": sum(s.nbytes() for s in cache.searches.values()), "estimate_ram": estimate.ram,
    }  # fmt: skip


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["bf16", "int8", "disk"])
    parser.add_argument("--layers", choices=["all", "checkpoint"], default="all",
                        help="memory in every layer, or the checkpoint's own mem_layers")  # fmt: skip
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--index", default="faiss-ivf")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--offload-dir", default=None, help="folder for the disk case's files (a temporary one)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # the child process of one case
        print(json.dumps(run_case(args)))
        return
    rows = []
    for case in args.cases:
        folder = args.offload_dir or tempfile.mkdtemp(prefix="fot-bench-offload-")
        cmd = [sys.executable, "-m", "benchmarks.memory_storage", "--model", args.model, "--tokens", str(args.tokens),
               "--layers", args.layers, "--k", str(args.k), "--index", args.index, "--threads", str(args.threads),
               "--offload-dir", folder, "--case", case]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        except subprocess.CalledProcessError as err:
            sys.exit(f"case {case} failed: {err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err}")
        finally:
            if args.offload_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{case}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    first = rows[0]["seconds"]
    gb = 1e9
    print(f"{args.tokens} tokens, {args.model}, memory layers: {args.layers}, top-k {args.k} ({args.index}), "
          f"{args.threads} thread(s)")  # fmt: skip
    print("| case | prefill s | vs " + rows[0]["case"] + " | peak RSS GB | memory in RAM GB | memory on disk GB | "
          "index GB | estimated RAM GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.1f} | {r['seconds'] / first:.2f}x | {r['peak_rss'] / gb:.2f} | "
              f"{r['memory_ram'] / gb:.2f} | {r['memory_disk'] / gb:.2f} | {r['index'] / gb:.2f} | "
              f"{r['estimate_ram'] / gb:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
