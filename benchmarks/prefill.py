"""Prefill benchmark: one forward over N tokens, memory layers on (dense) vs off, side by side.

Bench config: vocab 1000, 4 layers, hidden 256, 4 heads, FFN 688, window 512, last_context_length 256,
memory layers [2, 3], fp32 weights, ``torch.set_num_threads(1)``. Each case runs in a fresh subprocess so its
peak RSS is its own. Prints seconds, tokens/s, the on/off ratio and peak RSS.

    python benchmarks/prefill.py                    # N in 4K, 16K, 32K
    python benchmarks/prefill.py --tokens 4096 --mem-dtype bfloat16 --attn-impl reference

Side by side with the original LongLLaMA implementation (optional; it needs transformers <= 4.51, so it runs
in its own interpreter): point ``--reference-src`` at a directory holding its ``configuration_longllama.py``,
``modeling_longllama.py`` and ``longllama_utils.py`` as a package, and ``--reference-python`` at a Python
that has torch and transformers 4.51 installed. Its "default" and "SDPA" (torch_attention) modes are timed
on the same config, input length and thread count, and the table gains their columns and our speed-up.

The last columns put the memory attention in hardware terms. Dense memory attention is exact work:
each window's queries score every memory key and mix every memory value, 4 * T * M * head_dim FLOPs per head
and memory layer (``memory_attention_flops``). The script measures this core's fp32 GEMM peak with one thread
(``torch.mm`` at 2048^3), prints the GFLOP/s our memory attention reaches (its FLOPs over on - off seconds),
and the floor: mem-off time plus those FLOPs at GEMM peak. No exact fp32 implementation can be faster, so the
reference's best time over the floor is the largest speed-up any exact implementation could show.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.bench_config import check_args
from benchmarks.bench_config import LONG as BENCH
from benchmarks.bench_config import MEM_LAYERS
from plumbing.cli import ArgumentParser


def memory_attention_flops(tokens: int) -> float:
    """FLOPs of dense memory attention over one forward: QK^T and PV (2 FLOPs per multiply-add each) for every
    query head of every memory layer, each window against the memory of all windows before it."""
    from fot.model import plan_chunks

    heads, head_dim = BENCH["num_attention_heads"], BENCH["hidden_size"] // BENCH["num_attention_heads"]
    chunks = plan_chunks(tokens, BENCH["max_position_embeddings"], BENCH["last_context_length"])
    pairs = sum((end - start) * start for start, end in chunks)  # memory = every token before the window
    return 4.0 * pairs * head_dim * heads * len(MEM_LAYERS)


def gemm_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best single-thread fp32 ``torch.mm`` rate on a size^3 product."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(tokens: int, mem: bool, mem_dtype: str, attn_impl: str, repeats: int) -> dict:
    import torch

    import fot

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = fot.LongLlamaConfig(
        **BENCH, mem_layers=[2, 3] if mem else [], mem_dtype=mem_dtype, attn_impl=attn_impl, use_cache=False
    )
    model = fot.LongLlamaForCausalLM(config).eval()
    ids = torch.randint(0, BENCH["vocab_size"], (1, tokens))
    times = []
    with torch.inference_mode():
        model(ids[:, :1024])  # warm-up: kernels, allocator
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": tokens, "mem": mem, "seconds": min(times), "peak_rss_mib": peak_kib / 1024}


# Runs inside the reference's interpreter: builds its model on the bench config and times one forward.
REFERENCE_TIMER = """
import json, os, sys, time, importlib
import torch
src = sys.argv[1]
pkg = os.path.basename(os.path.abspath(src))
cfg_mod = importlib.import_module(pkg + ".configuration_longllama")
model_mod = importlib.import_module(pkg + ".modeling_longllama")
tokens, torch_attention, mem_dtype = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
bench = json.loads(sys.argv[5])
torch.set_num_threads(1)
torch.manual_seed(0)
config = cfg_mod.LongLlamaConfig(**bench, mem_layers=[2, 3], mem_dtype=mem_dtype, torch_attention=torch_attention)
model = model_mod.LongLlamaForCausalLM(config).eval()
ids = torch.randint(0, bench["vocab_size"], (1, tokens))
with torch.no_grad():
    model(ids[:, :1024], use_cache=False)
    start = time.perf_counter()
    model(ids, use_cache=False)
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def spawn_reference(tokens: int, torch_attention: bool, args) -> dict:
    cmd = [
        args.reference_python, "-c", REFERENCE_TIMER, args.reference_src, str(tokens),
        str(int(torch_attention)), args.mem_dtype, json.dumps(BENCH),
    ]  # fmt: skip
    # The reference's package is imported by name from the folder that holds it.
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(args.reference_src))}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def spawn(tokens: int, mem: bool, args) -> dict:
    cmd = [
        sys.executable, __file__, "--case", str(tokens), "--mem", str(int(mem)),
        "--mem-dtype", args.mem_dtype, "--attn-impl", args.attn_impl, "--repeats", str(args.repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--mem-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-impl", default="auto", choices=["auto", "torch", "reference"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mem", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--reference-src", help="package directory of the original LongLLaMA model code")
    parser.add_argument("--reference-python", help="interpreter with torch and transformers<=4.51 for it")
    parser.add_argument(
        "--reference-max-default", type=int, default=16384,
        help="skip the reference's slow default mode above this many tokens",
    )  # fmt: skip
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "repeats"))
    if bool(args.reference_src) != bool(args.reference_python):
        parser.error("--reference-src and --reference-python go together")
    if args.peak:
        print(json.dumps({"gflops": gemm_peak_gflops()}))
        return
    if args.case is not None:
        print(json.dumps(run_case(args.case, bool(args.mem), args.mem_dtype, args.attn_impl, args.repeats)))
        return

    peak = json.loads(subprocess.run([sys.executable, __file__, "--peak"], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])["gflops"]  # fmt: skip
    print(f"prefill, 1 thread, fp32 weights, mem_dtype={args.mem_dtype}, attn_impl={args.attn_impl}")
    print(f"fp32 GEMM peak of this core (torch.mm 2048^3, 1 thread): {peak:.1f} GFLOP/s")
    header = f"{'tokens':>7} | {'mem on s':>9} {'tok/s':>8} {'RSS MiB':>8} | {'mem off s':>9} {'tok/s':>8} {'RSS MiB':>8} | {'on/off':>6}"
    header += f" | {'mem GFLOP':>9} {'GFLOP/s':>7} {'floor s':>7}"
    if args.reference_src:
        header += f" | {'ref default s':>13} {'ref SDPA s':>10} | {'speed-up vs ref best':>20} {'at floor':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for tokens in args.tokens:
        on, off = spawn(tokens, True, args), spawn(tokens, False, args)
        ratio = on["seconds"] / off["seconds"]
        flops = memory_attention_flops(tokens)
        rate = flops / max(on["seconds"] - off["seconds"], 1e-9) / 1e9
        floor = off["seconds"] + flops / (peak * 1e9)
        line = (
            f"{tokens:>7} | {on['seconds']:>9.2f} {tokens / on['seconds']:>8.0f} {on['peak_rss_mib']:>8.0f} | "
            f"{off['seconds']:>9.2f} {tokens / off['seconds']:>8.0f} {off['peak_rss_mib']:>8.0f} | {ratio:>6.2f} | "
            f"{flops / 1e9:>9.0f} {rate:>7.1f} {floor:>7.2f}"
        )
        row = {"on": on, "off": off, "ratio": ratio, "memory_gflop": flops / 1e9, "memory_gflops_per_s": rate,
               "floor_seconds": floor, "gemm_peak_gflops": peak}  # fmt: skip
        if args.reference_src:
            sdpa = spawn_reference(tokens, True, args)["seconds"]
            default = None
            if tokens <= args.reference_max_default:
                default = spawn_reference(tokens, False, args)["seconds"]
            best = sdpa if default is None else min(sdpa, default)
            shown = "skipped" if default is None else f"{default:.2f}"
            line += f" | {shown:>13} {sdpa:>10.2f} | {best / on['seconds']:>19.2f}x {best / floor:>7.2f}x"
            row.update(reference_default=default, reference_sdpa=sdpa, speedup=best / on["seconds"],
                       speedup_at_floor=best / floor)  # fmt: skip
        print(line, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
