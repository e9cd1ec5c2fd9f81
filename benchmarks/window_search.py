"""One window's top-k search at SmolLM2-135M's shapes: ``exact``, ``faiss-ivf`` and ``ivf-gemm``, side by side.

Each index searches the same memory of one memory layer (3 KV heads, head dim 64, bfloat16 keys drawn from a
mixture of Gaussian clusters, which trained models' keys resemble more than isotropic noise; ``--clusters``)
with the same queries (stored keys plus noise: one 512-token window of 9 query heads, 1,536 queries per KV
head), round-robin ``--repeats`` times on one thread. It prints each index's best search time, its build time,
its tie-aware recall@k against exact search, and for ``ivf-gemm`` the rate of its useful scoring (2 H FLOPs per
(query, key) product it needed: centroids and probed keys, no padding) against this core's fp32 GEMM peak.

    python -m benchmarks.window_search
    python -m benchmarks.window_search --slots 16384 65536 --nprobe 16
"""

from __future__ import annotations

import argparse
import time

from benchmarks.bench_config import check_args
from plumbing.cli import ArgumentParser

KV_HEADS, HEAD_DIM, TOP_K = 3, 64, 32  # SmolLM2-135M every-layer setting
QUERIES = 3 * 512  # per KV head: its 3 query heads x a 512-token window


def clustered(M: int, G: int, H: int, clusters: int, generator):
    import torch

    centers = torch.randn(G, clusters, H, generator=generator) * 2
    pick = torch.randint(0, clusters, (G, M), generator=generator)
    return centers.gather(1, pick[..., None].expand(-1, -1, H)) + torch.randn(G, M, H, generator=generator)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[16384, 65536], help="memory slots per KV head")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=256, help="Gaussian clusters the keys are drawn from")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_args(parser, args, positive=("slots", "nprobe", "clusters", "repeats"))
    import faiss
    import torch

    from benchmarks.prefill import gemm_peak_gflops
    from fot.memory import MemoryStore
    from fot.search import ExactSearch, FaissIVFSearch, IVFGemmSearch, exact_topk, recall_at_k

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    peak = gemm_peak_gflops()
    g = torch.Generator().manual_seed(0)
    G, H, X, K = KV_HEADS, HEAD_DIM, QUERIES, TOP_K
    print(f"one window: {G} KV heads x {X} queries, head dim {H}, bfloat16 keys, k={K}, nprobe={args.nprobe}, "
          f"1 thread; fp32 GEMM peak {peak:.1f} GFLOP/s")  # fmt: skip
    print(f"{'slots':>7} {'index':<10} {'search s':>9} {'x exact':>8} {'build s':>8} {'recall@k':>9} {'scoring':>22}")
    for M in args.slots:
        keys = clustered(M, G, H, args.clusters, g)
        store = MemoryStore(torch.bfloat16)
        store.append(keys[None], keys[None], None)
        view = store.view()
        stored = view.k_BGMH.float()[0]
        q = stored.gather(1, torch.randint(0, M, (G, X, 1), generator=g).expand(-1, -1, H))
        q = (q + 0.3 * torch.randn(G, X, H, generator=g))[None]
        exact, _ = exact_topk(q, view.k_BGMH, None, K)
        searches = [ExactSearch(), FaissIVFSearch(args.nprobe), IVFGemmSearch(args.nprobe)]
        build = {}
        for search in searches:
            start = time.perf_counter()
            search.update(store, torch.arange(M), evicted=False)
            build[search.name] = time.perf_counter() - start
        times = {s.name: [] for s in searches}
        found = {}
        for _ in range(args.repeats):
            for search in searches:
                start = time.perf_counter()
                found[search.name] = search.search(q, view, K)
                times[search.name].append(time.perf_counter() - start)
        gemm = searches[-1]
        per_search = gemm.scored / args.repeats
        for search in searches:
            best = min(times[search.name])
            hits, wanted = recall_at_k(q, view.k_BGMH, found[search.name], exact)
            rate = ""
            if search is gemm:
                gflops = 2 * H * per_search / best / 1e9
                rate = f"{per_search / (G * X):.0f} keys/q, {gflops:.1f} GF/s ({100 * gflops / peak:.0f}%)"
            print(f"{M:>7} {search.name:<10} {best:>9.3f} {best / min(times['exact']):>8.2f} "
                  f"{build[search.name]:>8.2f} {hits / wanted:>9.3f} {rate:>22}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
