"""One window's top-k search at SmolLM2-135M's shapes: ``exact``, ``faiss-ivf``, ``ivf-gemm`` and ``ivf-scan``, side by side.

Each index searches the same memory of one memory layer (3 KV heads, head dim 64, bfloat16 keys drawn from a
mixture of Gaussian clusters, which trained models' keys resemble more than isotropic noise; ``--clusters``)
with the same queries (stored keys plus noise: one 512-token window of 9 query heads, 1,536 queries per KV
head), round-robin ``--repeats`` times on one thread. It prints each index's best search time, its build time,
its tie-aware recall@k against exact search, and for ``ivf-gemm`` and ``ivf-scan`` the rate of its useful scoring (2 H FLOPs per
(query, key) product it needed: centroids and probed keys, no padding) against this core's fp32 GEMM peak.

The search times are of a memory that does not change between searches. During a prefill each window first adds
its own 512 keys per KV head to the memory and updates the index, and the next search sees a larger memory, so the
last column, the best of ``--repeats`` such window steps (append, ``update``, search), is one layer's cost per
window there: what a prefill of ``--slots`` tokens pays per layer and window at its end.

    python -m benchmarks.window_search
    python -m benchmarks.window_search --slots 16384 65536 --nprobe 16
    python -m benchmarks.window_search --slots 262144 1048576 --indexes faiss-ivf ivf-gemm --repeats 2
"""

from __future__ import annotations

import argparse
import time

from benchmarks.bench_config import check_args
from plumbing.cli import ArgumentParser

KV_HEADS, HEAD_DIM, TOP_K = 3, 64, 32  # SmolLM2-135M every-layer setting
WINDOW = 512
QUERIES = 3 * WINDOW  # per KV head: its 3 query heads x a 512-token window
INDEXES = ("exact", "faiss-ivf", "ivf-gemm", "ivf-scan")


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
    parser.add_argument("--indexes", nargs="+", default=list(INDEXES), choices=list(INDEXES),
                        help="the indexes to time (recall is always against exact top-k, computed once)")
    args = parser.parse_args()
    check_args(parser, args, positive=("slots", "nprobe", "clusters", "repeats"))
    import faiss
    import torch

    from benchmarks.prefill import gemm_peak_gflops
    from fot.memory import MemoryStore
    from fot.search import ExactSearch, FaissIVFSearch, IVFGemmSearch, IVFScanSearch, exact_topk, recall_at_k

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    peak = gemm_peak_gflops()
    g = torch.Generator().manual_seed(0)
    G, H, X, K = KV_HEADS, HEAD_DIM, QUERIES, TOP_K
    print(f"one window: {G} KV heads x {X} queries, head dim {H}, bfloat16 keys, k={K}, nprobe={args.nprobe}, "
          f"1 thread; fp32 GEMM peak {peak:.1f} GFLOP/s")  # fmt: skip
    print(f"{'slots':>7} {'index':<10} {'search s':>9} {'x first':>8} {'build s':>8} {'recall@k':>9} {'scoring':>22} "
          f"{'window step s':>14}")  # fmt: skip
    for M in args.slots:
        keys = clustered(M, G, H, args.clusters, g)
        store = MemoryStore(torch.bfloat16)
        store.append(keys[None], keys[None], None)
        view = store.view()
        stored = view.k_BGMH.float()[0]
        q = stored.gather(1, torch.randint(0, M, (G, X, 1), generator=g).expand(-1, -1, H))
        q = (q + 0.3 * torch.randn(G, X, H, generator=g))[None]
        exact, _ = exact_topk(q, view.k_BGMH, None, K)
        made = {"exact": ExactSearch, "faiss-ivf": lambda: FaissIVFSearch(args.nprobe),
                "ivf-gemm": lambda: IVFGemmSearch(args.nprobe), "ivf-scan": lambda: IVFScanSearch(args.nprobe)}
        searches = [made[name]() for name in INDEXES if name in args.indexes]
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
        per_search = {s.name: getattr(s, "scored", 0) / args.repeats for s in searches}
        steps = window_steps(searches, store, q, K, G, H, args.clusters, args.repeats, g)
        first = min(times[searches[0].name])
        for search in searches:
            best = min(times[search.name])
            hits, wanted = recall_at_k(q, view.k_BGMH, found[search.name], exact)
            rate = ""
            if search.name in ("ivf-gemm", "ivf-scan"):
                gflops = 2 * H * per_search[search.name] / best / 1e9
                rate = (f"{per_search[search.name] / (G * X):.0f} keys/q, {gflops:.1f} GF/s "
                        f"({100 * gflops / peak:.0f}%)")  # fmt: skip
            print(f"{M:>7} {search.name:<10} {best:>9.3f} {best / first:>8.2f} {build[search.name]:>8.2f} "
                  f"{hits / wanted:>9.3f} {rate:>22} {steps[search.name]:>14.3f}", flush=True)  # fmt: skip


def window_steps(searches, store, q, K, G, H, clusters, repeats, generator) -> dict[str, float]:
    """The best of ``repeats`` window steps per index: the memory grows by one window's keys (the same keys for
    every index, in a store of its own), the index updates, and it searches again."""
    import copy

    import torch

    best = {}
    for search in searches:
        own = copy.deepcopy(store)
        times = []
        for r in range(repeats):
            new = clustered(WINDOW, G, H, clusters, torch.Generator().manual_seed(100 + r))[None]
            start = time.perf_counter()
            slots = own.append(new, new, None)
            search.update(own, slots, evicted=False)
            search.search(q, own.view(), K)
            times.append(time.perf_counter() - start)
        best[search.name] = min(times)
    return best


if __name__ == "__main__":
    main()
