"""Search bound: the least time any IVF search could add to a long prefill on this core, from measurements.

``memory_scaling.py`` times top-k memory as it is. This script asks what the best possible IVF search could
do on the same model and input, so a prefill target can be checked against arithmetic, not only against our
implementation. It measures, in one run:

  1. memory off: the model with ``mem_layers=[]`` (the floor of every memory backend);
  2. the top-k pipeline with a free search: every query "retrieves" the first k slots at no search cost,
     so storing keys, gathering the retrieved keys and values, the top-k attention and its merge with the
     local attention are all paid, and only the search itself is missing;
  3. the scoring a search must do. While the model reads the input with ``faiss-ivf``, every search call
     of every memory layer is counted (memory size, queries), and at several memory sizes the queries of
     the next windows are kept with the memory as it stood. On those keys and queries, for IVF indexes
     with nlist = 2, 4 and 8 x sqrt(M) (k-means over lifted keys, as ``faiss-ivf`` builds them), it finds
     the smallest nprobe whose recall@k (tie-aware, against exact search) reaches ``--recall``, and counts
     the keys each query scores there: the keys of its probed lists plus the centroids. It keeps the count
     at one nprobe *below* that (which misses the target), the smallest over the three nlists. Counts for
     other memory sizes are interpolated linearly (and shrunk linearly below the first size), which
     underestimates them for a count that grows sublinearly with memory.

The scoring is then priced at this core's fp32 GEMM peak (``prefill.gemm_peak_gflops``): 2 * H FLOPs per
scored key at 100% of peak, with no selection, no memory traffic and no index upkeep. FAISS runs about 8x
slower than that. So

    lower bound = memory off + pipeline with a free search + scoring at GEMM peak

and no IVF search, however it is implemented, prefills faster here at that recall. Every part is an
underestimate of the real cost.

    python benchmarks/search_bound.py                        # bench model, 256K tokens, recall 0.9
    python benchmarks/search_bound.py --tokens 65536 --model models/fot-tiny
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import fot
from benchmarks.bench_config import check_args
from benchmarks.memory_scaling import build_model, input_ids
from benchmarks.prefill import gemm_peak_gflops
from plumbing.cli import ArgumentParser

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Recorder:
    """Wraps the search backends the caches create: counts every call's (memory size, queries) per layer,
    and keeps, per layer and for each requested memory size, the queries of the first calls at or past it
    (at least ``min_queries`` per head) with the keys as memory held them."""

    def __init__(self, sizes: list[int], min_queries: int, heads: int):
        self.sizes, self.min_queries, self.heads = sizes, min_queries, heads
        self.calls: list[tuple[int, int, int]] = []  # (layer, memory size, query-heads searched)
        self.samples: dict[tuple[int, int], dict] = {}  # (layer order, size) -> {"keys", "queries"}
        self.layers: list[object] = []

    def factory(self, config, layer_idx):
        """A search factory for the caches: the configured backend, recording as the class docstring says."""
        from fot.search import default_search_factory

        search = default_search_factory(config, layer_idx)
        inner = search.search

        def search_and_record(q_BGXH, view, k):
            if search not in self.layers:
                self.layers.append(search)
            layer = self.layers.index(search)
            M = view.k_BGMH.shape[2]
            self.calls.append((layer, M, q_BGXH.shape[0] * q_BGXH.shape[1] * q_BGXH.shape[2]))
            for size in self.sizes:
                sample = self.samples.setdefault((layer, size), {"keys": None, "queries": []})
                have = sum(q.shape[1] for q in sample["queries"])
                if M >= size and have < self.min_queries:
                    if sample["keys"] is None:  # memory as it stood when the sample began
                        sample["keys"] = view.k_BGMH[0, : self.heads, :size].float().clone()
                    sample["queries"].append(q_BGXH[0, : self.heads].float().clone())
            return inner(q_BGXH, view, k)

        search.search = search_and_record
        return search


def keys_scored(faiss, keys: torch.Tensor, queries: torch.Tensor, k: int, target: float):
    """(keys scored per query just below ``target`` recall, nlist, nprobe reaching it, its recall) for the
    cheapest of three IVF sizes, on one head's keys [M, H] and queries [X, H]."""
    from fot.search import IVF_NORM_MARGIN, IVF_POINTS_PER_LIST, exact_topk, lift_keys, recall_at_k

    M, H = keys.shape
    exact_scores, _ = exact_topk(queries[None, None], keys[None, None], None, k)
    bound_sq = float(keys.pow(2).sum(1).max()) * IVF_NORM_MARGIN**2
    lifted = lift_keys(keys, bound_sq)
    q_lifted = np.ascontiguousarray(np.concatenate([queries.numpy(), np.zeros((len(queries), 1), "float32")], 1))
    best = None
    for factor in (2, 4, 8):
        nlist = max(16, int(factor * math.sqrt(M)))
        quantizer = faiss.IndexFlatL2(H + 1)
        index = faiss.IndexIVFFlat(quantizer, H + 1, nlist)
        index.cp.min_points_per_centroid = 1
        index.cp.max_points_per_centroid = IVF_POINTS_PER_LIST
        index.train(lifted)
        index.add(lifted)
        sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
        below = 0.0  # keys scored at the last nprobe that missed the target
        for nprobe in NPROBES:
            if nprobe > nlist:
                break
            index.nprobe = nprobe
            _, found = index.search(q_lifted, k)
            _, probed = quantizer.search(q_lifted, nprobe)
            scored = float(sizes[probed].sum(1).mean()) + nlist
            hit, total = recall_at_k(queries[None, None], keys[None, None], torch.from_numpy(found)[None, None],
                                     exact_scores)  # fmt: skip
            if hit / total >= target:
                if best is None or below < best[0]:
                    best = (below, nlist, nprobe, hit / total)
                break
            below = scored
    if best is None:
        raise RuntimeError(f"no IVF setting reached recall {target} on {M} keys")
    return best


def timed_forward(model, ids, cache=None) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1, past_key_values=cache)
    return time.perf_counter() - start


def free_search_forward(args, ids) -> float:
    """Prefill time with every top-k search replaced by a free one (the first k slots)."""
    from fot.search import KeySearch

    class FreeSearch(KeySearch):
        name = "free"

        def search(self, q_BGXH, view, k):
            B, G, X, _ = q_BGXH.shape
            slots = torch.arange(k, device=q_BGXH.device).clamp(max=view.k_BGMH.shape[2] - 1)
            return slots.expand(B, G, X, k).contiguous()

    model = build_model("exact", args.k, args.nprobe, args.model)
    return timed_forward(model, ids, fot.LongLlamaCache(model.config, search_factory=lambda config, i: FreeSearch()))


def interpolate(points: list[tuple[int, float]], M: int) -> float:
    """Scored keys at memory size M from the measured (size, keys) points: linear between them, shrunk
    linearly toward 0 below the first, the last value above the last."""
    if M <= points[0][0]:
        return points[0][1] * M / points[0][0]
    for (m0, c0), (m1, c1) in zip(points, points[1:]):
        if M <= m1:
            return c0 + (c1 - c0) * (M - m0) / (m1 - m0)
    return points[-1][1]


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--model", help="a trained checkpoint directory (passkey text through its tokenizer)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--recall", type=float, default=0.9)
    parser.add_argument("--nprobe", type=int, default=16, help="faiss-ivf's nprobe while the model reads")
    parser.add_argument("--queries", type=int, default=512, help="queries per head and memory size")
    parser.add_argument("--heads", type=int, default=1, help="KV heads measured per memory layer")
    parser.add_argument("--target", type=float, default=1.5, help="the prefill target, x memory off")
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "k", "nprobe", "queries", "heads", "target"))
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    ids = input_ids(args.tokens, args.model)
    N = ids.shape[1]
    peak = gemm_peak_gflops()
    off = timed_forward(build_model("off", None, args.nprobe, args.model), ids)
    free = free_search_forward(args, ids)

    sizes = [N // 8, N // 4, N // 2, N - N // 8]
    recorder = Recorder(sizes, args.queries, args.heads)
    model = build_model("faiss-ivf", args.k, args.nprobe, args.model)
    with torch.inference_mode():
        model(ids, logits_to_keep=1, past_key_values=fot.LongLlamaCache(model.config, search_factory=recorder.factory))
    H = model.config.head_dim
    del model

    print(f"{N} tokens, k={args.k}, recall target {args.recall}, 1 thread; fp32 GEMM peak {peak:.1f} GFLOP/s")
    print(f"{'layer':>5} {'memory':>8} {'head':>4} {'nlist':>6} {'nprobe':>6} {'recall':>6} "
          f"{'keys scored/query':>17} {'share':>6} {'us at peak':>10}")  # fmt: skip
    points: dict[int, list[tuple[int, float]]] = {}
    for (layer, size), sample in sorted(recorder.samples.items()):
        if sample["keys"] is None:
            continue
        queries = torch.cat(sample["queries"], dim=1)
        counts = []
        for g in range(queries.shape[0]):
            scored, nlist, nprobe, rec = keys_scored(faiss, sample["keys"][g], queries[g], args.k, args.recall)
            counts.append(scored)
            us = scored * 2 * H / (peak * 1e3)
            print(f"{layer:>5} {size:>8} {g:>4} {nlist:>6} {nprobe:>6} {rec:>6.3f} {scored:>17.0f} "
                  f"{scored / size:>6.1%} {us:>10.2f}", flush=True)  # fmt: skip
        points.setdefault(layer, []).append((size, float(np.mean(counts))))

    # every recorded call, priced with its layer's interpolated count
    total_keys = sum(n * interpolate(points[layer], M) for layer, M, n in recorder.calls)
    searches = sum(n for _, _, n in recorder.calls)
    scoring = total_keys * 2 * H / (peak * 1e9)
    bound = off + (free - off) + scoring
    print()
    print(f"memory off:                                {off:8.2f} s")
    print(f"top-k pipeline with a free search:         {free - off:+8.2f} s")
    print(f"scoring at GEMM peak ({searches} searches, {total_keys / max(searches, 1):.0f} keys each on average): "
          f"{scoring:+.2f} s")  # fmt: skip
    print(f"lower bound for any IVF search:            {bound:8.2f} s = {bound / off:.2f}x memory off "
          f"(target {args.target}x = {args.target * off:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
