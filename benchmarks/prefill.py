"""Prefill benchmark: one forward over N tokens, memory layers on (dense) vs off, side by side.

Bench config: vocab 1000, 4 layers, hidden 256, 4 heads, FFN 688, window 512, last_context_length 256,
memory layers [2, 3], fp32 weights, ``torch.set_num_threads(1)``. Each case runs in a fresh subprocess so its
peak RSS is its own. Prints seconds, tokens/s, the on/off ratio and peak RSS.

    python benchmarks/prefill.py                    # N in 4K, 16K, 32K
    python benchmarks/prefill.py --tokens 4096 --mem-dtype bfloat16 --attn-impl reference
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BENCH = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
    last_context_length=256,
)


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


def spawn(tokens: int, mem: bool, args) -> dict:
    cmd = [
        sys.executable, __file__, "--case", str(tokens), "--mem", str(int(mem)),
        "--mem-dtype", args.mem_dtype, "--attn-impl", args.attn_impl, "--repeats", str(args.repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--mem-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-impl", default="auto", choices=["auto", "sdpa", "reference"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mem", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, bool(args.mem), args.mem_dtype, args.attn_impl, args.repeats)))
        return

    print(f"prefill, 1 thread, fp32 weights, mem_dtype={args.mem_dtype}, attn_impl={args.attn_impl}")
    header = f"{'tokens':>7} | {'mem on s':>9} {'tok/s':>8} {'RSS MiB':>8} | {'mem off s':>9} {'tok/s':>8} {'RSS MiB':>8} | {'on/off':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for tokens in args.tokens:
        on, off = spawn(tokens, True, args), spawn(tokens, False, args)
        ratio = on["seconds"] / off["seconds"]
        print(
            f"{tokens:>7} | {on['seconds']:>9.2f} {tokens / on['seconds']:>8.0f} {on['peak_rss_mib']:>8.0f} | "
            f"{off['seconds']:>9.2f} {tokens / off['seconds']:>8.0f} {off['peak_rss_mib']:>8.0f} | {ratio:>6.2f}",
            flush=True,
        )
        rows.append({"on": on, "off": off, "ratio": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
