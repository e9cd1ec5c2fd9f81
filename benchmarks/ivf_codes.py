"""IVF list codes: ``faiss-ivf`` (fp32 lifted keys) against ``faiss-ivf-sq8`` (8-bit residuals), side by side.

Both indexes are built on the same keys of one KV head (a mixture of Gaussian clusters, which trained models'
keys resemble more than isotropic noise; ``--clusters``), searched with the same queries (keys plus noise, one
window of a SmolLM2 memory layer: 1,536 per KV head), round-robin ``--repeats`` times on one thread. It prints
each index's best search time, its tie-aware recall@k against exact search and its bytes beyond the store.

    python -m benchmarks.ivf_codes
    python -m benchmarks.ivf_codes --slots 16384 65536 --nprobe 16
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_config import check_args
from plumbing.cli import ArgumentParser


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[16384])
    parser.add_argument("--queries", type=int, default=1536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_args(parser, args, positive=("slots", "queries", "head_dim", "clusters", "k", "nprobe", "repeats"))
    import faiss

    from fot.memory import MemoryStore
    from fot.search import FaissIVFSearch, FaissIVFSQ8Search, exact_topk, recall_at_k

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    H = args.head_dim
    print(f"IVF list codes, {args.queries} queries, head dim {H}, k={args.k}, nprobe={args.nprobe}, 1 thread")
    print(f"{'slots':>7} {'index':<15} {'search s':>9} {'recall@k':>9} {'index MB':>9}")
    for M in args.slots:
        centers = torch.randn(args.clusters, H, generator=g) * 2
        keys = centers[torch.randint(0, args.clusters, (M,), generator=g)] + torch.randn(M, H, generator=g)
        store = MemoryStore(torch.float32)
        store.append(keys[None, None], keys[None, None], None)
        view = store.view()
        q = keys[torch.randint(0, M, (args.queries,), generator=g)] + 0.3 * torch.randn(args.queries, H, generator=g)
        q = q[None, None]
        exact, _ = exact_topk(q, view.k_BGMH, None, args.k)
        searches = [cls(args.nprobe) for cls in (FaissIVFSearch, FaissIVFSQ8Search)]
        for search in searches:
            search.update(store, torch.arange(M), evicted=False)
        times = {s.name: [] for s in searches}
        found = {}
        for _ in range(args.repeats):
            for search in searches:
                start = time.perf_counter()
                found[search.name] = search.search(q, view, args.k)
                times[search.name].append(time.perf_counter() - start)
        for search in searches:
            hits, wanted = recall_at_k(q, view.k_BGMH, found[search.name], exact)
            print(f"{M:>7} {search.name:<15} {min(times[search.name]):>9.3f} {hits / wanted:>9.3f} "
                  f"{search.nbytes() / 1e6:>9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
