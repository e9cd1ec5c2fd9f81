"""Exact search: ``fot.search.exact_topk`` against the plain way, side by side in one process.

The plain way scores all memory at once (one [X, M] matmul per KV head) and selects with ``torch.topk``.
``exact_topk`` scores tiles of ``SEARCH_QUERY_BLOCK`` queries into one reused buffer and selects with
``select_topk`` (staged). Shapes are one window of a memory layer of SmolLM2-135M (3 KV heads, 3 query heads
each, 512 tokens: 1,536 queries per KV head, head dim 64); random keys and queries; one thread; best of
``--repeats``. Both must return the same scores, and the script checks that before it times anything.

    python -m benchmarks.exact_search
    python -m benchmarks.exact_search --slots 8192 16384 32768 65536 --k 32
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_config import check_args
from fot.search import exact_topk
from plumbing.cli import ArgumentParser


def plain_topk(q_BGXH: torch.Tensor, k_BGMH: torch.Tensor, k: int):
    """All scores at once, then torch.topk: (scores, idx) [B, G, X, k]."""
    return torch.matmul(q_BGXH, k_BGMH.transpose(-1, -2)).topk(k, dim=-1)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--queries", type=int, default=1536, help="queries per KV head")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_args(parser, args, positive=("slots", "queries", "kv_heads", "head_dim", "k", "repeats"))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"exact search, {args.kv_heads} KV heads x {args.queries} queries, head dim {args.head_dim}, k={args.k}, "
          f"1 thread, best of {args.repeats}")  # fmt: skip
    print(f"{'slots':>7} {'plain s':>8} {'exact_topk s':>12} {'speed-up':>8}")
    for M in args.slots:
        q = torch.randn(1, args.kv_heads, args.queries, args.head_dim, generator=g)
        keys = torch.randn(1, args.kv_heads, M, args.head_dim, generator=g)
        want, _ = plain_topk(q, keys, args.k)
        got, _ = exact_topk(q, keys, None, args.k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        plain = best_of(lambda: plain_topk(q, keys, args.k), args.repeats)
        tiled = best_of(lambda: exact_topk(q, keys, None, args.k), args.repeats)
        print(f"{M:>7} {plain:>8.3f} {tiled:>12.3f} {plain / tiled:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
