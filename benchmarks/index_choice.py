"""Index choice: recall@k against search time for the index families FAISS offers, on real memory keys.

``mem_index="faiss-ivf"`` is one of several ways to search a memory approximately. This script measures the
candidates side by side on the keys and queries a model really produces, so the choice rests on numbers:

  * exact        torch matmul + topk (``fot.search.exact_topk``), the reference;
  * faiss-flat   brute-force inner product (``faiss.knn``);
  * ivf-ip       IVF-Flat with FAISS's inner-product metric (no lifting, no exact outliers);
  * faiss-ivf    fot's backend itself (``FaissIVFSearch``: lifted keys, exact outliers), built through its
                 ``update`` on a real ``MemoryStore``;
  * ivfpq-fs     IVF with 4-bit PQ fast scan over the lifted keys, re-ranked exactly (``IndexRefineFlat``);
  * hnsw         HNSW graph over the lifted keys.

Keys and queries are captured from the last memory layer while the model reads the input with exact top-k
memory: the memory as it stands at the last window, and the queries of the last windows (at least
``--queries`` of them per head). Recall is tie-aware (``fot.search.recall_at_k``): repeated text gives
identical keys, and any of a tied set is a correct answer.
Two sources:

  * the bench model (random weights, bench config of ``prefill.py``) on random token ids (default);
  * a trained checkpoint on the passkey protocol's text: ``--model models/fot-tiny``.

Every index uses one thread, and all of them search the same queries; each row gives build seconds (training
and adding, per head), microseconds per query and head, recall@k against exact search, and the index's own
bytes per key (beyond the stored keys and values).

    python benchmarks/index_choice.py --tokens 65536
    python benchmarks/index_choice.py --model models/fot-tiny --tokens 16384
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import numpy as np
import torch

from benchmarks.bench_config import check_args
from benchmarks.memory_scaling import build_model, input_ids
from plumbing.cli import ArgumentParser


def capture(model, ids: torch.Tensor, min_queries: int):
    """(keys [G, M, H], queries [G, X, H]) of the model's last memory layer: its memory at the last search call,
    and the queries of its last search calls, at least ``min_queries`` of them (X >= min_queries)."""
    import fot
    from fot.search import default_search_factory

    recorded = {}  # search object -> (its latest query blocks, its memory keys at the last call)
    order = []  # search objects, by first call

    def recording(config, layer_idx):
        search = default_search_factory(config, layer_idx)
        inner = search.search

        def search_and_record(q_BGXH, view, k):
            if search not in recorded:
                order.append(search)
                recorded[search] = (deque(), None)
            queries = recorded[search][0]
            queries.append(q_BGXH[0].clone())
            while sum(x.shape[1] for x in queries) - queries[0].shape[1] >= min_queries:
                queries.popleft()
            recorded[search] = (queries, view.k_BGMH[0])  # a view: the store is append-only, it stays valid
            return inner(q_BGXH, view, k)

        search.search = search_and_record
        return search

    with torch.inference_mode():
        model(ids, logits_to_keep=1, past_key_values=fot.LongLlamaCache(model.config, search_factory=recording))
    queries, keys = recorded[order[-1]]  # the last memory layer
    return keys.float().clone(), torch.cat(list(queries), dim=1).float()


def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` [n, d] float32 with zero columns appended up to ``width``."""
    out = np.zeros((len(x), width), "float32")
    out[:, : x.shape[1]] = x
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def faiss_rows(faiss, keys: np.ndarray, queries: np.ndarray, k: int, nlist: int):
    """Rows (family, setting, build s, search s, ids, index bytes) for the plain FAISS indexes of one head."""
    from fot.search import IVF_NORM_MARGIN, lift_keys

    rows = []
    (_, ids), t = timed(lambda: faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT))
    rows.append(("faiss-flat", "", 0.0, t, ids, 0))
    d = keys.shape[1]
    sample = keys[np.random.default_rng(0).choice(len(keys), min(len(keys), 32 * nlist), replace=False)]

    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1
    _, build = timed(lambda: (ivf.train(sample), ivf.add(keys)))
    for nprobe in (8, 16, 32, 64):
        ivf.nprobe = nprobe
        (_, ids), t = timed(lambda: ivf.search(queries, k))
        rows.append(("ivf-ip", f"nprobe {nprobe}/{nlist}", build, t, ids, (d * 4 + 8) + nlist * d * 4 / len(keys)))

    bound_sq = float((keys * keys).sum(1).max()) * IVF_NORM_MARGIN**2
    dl = d + 1 + (d + 1) % 2  # lifted, padded to an even width for 2-dim PQ sub-vectors
    kl = pad_columns(lift_keys(torch.from_numpy(keys), bound_sq), dl)  # [k, sqrt(R^2 - |k|^2), 0...]
    ql = pad_columns(queries, dl)  # [q, 0, 0...]
    base = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(dl), dl, nlist, dl // 2, 4)
    base.by_residual = False
    base.cp.min_points_per_centroid = 1
    refine = faiss.IndexRefineFlat(base)
    lifted_sample = pad_columns(lift_keys(torch.from_numpy(sample), bound_sq), dl)
    _, build = timed(lambda: (refine.train(lifted_sample), refine.add(kl)))
    for nprobe, factor in ((16, 4), (64, 4), (64, 8), (128, 8)):
        base.nprobe, refine.k_factor = nprobe, factor
        (_, ids), t = timed(lambda: refine.search(ql, k))
        per_key = dl // 2 / 2 + 8 + nlist * dl * 4 / len(keys) + dl * 4  # codes, ids, centroids, refine copy
        rows.append(("ivfpq-fs", f"nprobe {nprobe}/{nlist}, re-rank {factor}k", build, t, ids, per_key))

    hnsw = faiss.IndexHNSWFlat(d + 1, 32)
    _, build = timed(lambda: hnsw.add(kl[:, : d + 1].copy()))
    for ef in (64, 128, 256):
        hnsw.hnsw.efSearch = ef
        (_, ids), t = timed(lambda: hnsw.search(np.ascontiguousarray(ql[:, : d + 1]), k))
        rows.append(("hnsw", f"M 32, efSearch {ef}", build, t, ids, (d + 1) * 4 + 2 * 32 * 4))
    return rows


def fot_ivf_rows(keys_GMH: torch.Tensor, queries_GXH: torch.Tensor, k: int):
    """Rows for fot's own ``faiss-ivf`` backend, built by ``update`` on a store holding the captured keys (all
    heads at once, as the model runs it); ids are returned per head."""
    from fot.attention import MemoryKV
    from fot.memory import MemoryStore
    from fot.search import FaissIVFSearch

    store = MemoryStore(torch.float32)
    G, M, _ = keys_GMH.shape
    slots = store.append(keys_GMH[None], keys_GMH[None], None)
    search = FaissIVFSearch(nprobe=8)
    _, build = timed(lambda: search.update(store, slots, evicted=False))
    nlist = next(iter(search.indexes.values())).index.nlist
    view = MemoryKV(store.k_BGMH[:, :, :M], store.v_BGMH[:, :, :M], None)
    rows = []
    for nprobe in (8, 16, 32, 64):
        for head in search.indexes.values():
            head.index.nprobe = nprobe
        ids, t = timed(lambda: search.search(queries_GXH[None], view, k))
        rows.append(("faiss-ivf", f"nprobe {nprobe}/{nlist} (fot)", build / G, t / G, ids[0].numpy(),
                     search.nbytes() / (G * M)))  # fmt: skip
    return rows


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="input length (memory size ~ this)")
    parser.add_argument("--model", help="a trained checkpoint directory (its tokenizer reads passkey text)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=512, help="queries per head, from the last windows")
    parser.add_argument("--heads", type=int, default=2, help="KV heads measured (of the last memory layer)")
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "k", "queries", "heads"))
    import faiss

    from fot.search import FaissIVFSearch, exact_topk, recall_at_k

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model = build_model("exact", args.k, 8, args.model)  # exact top-k memory while reading
    ids = input_ids(args.tokens, args.model)
    source = f"{args.model}, a passkey prompt" if args.model else "bench model (random weights), random token ids"
    source += f" of {ids.shape[1]} tokens"
    keys_GMH, queries_GXH = capture(model, ids, args.queries)
    G, M, H = keys_GMH.shape
    heads = min(args.heads, G)
    X = queries_GXH.shape[1]
    nlist = FaissIVFSearch.nlist_for(M)
    print(f"{source}: {M} memory keys per head, {X} queries per head, {heads} of {G} heads, k={args.k}, 1 thread")

    table: dict[tuple[str, str], list] = {}
    exact_scores = []
    for g in range(heads):
        q, keys = queries_GXH[None, g : g + 1], keys_GMH[None, g : g + 1]
        (scores, idx), t = timed(lambda: exact_topk(q, keys, None, args.k))
        exact_scores.append(scores)
        table.setdefault(("exact", ""), []).append((0.0, t, idx[0, 0].numpy(), 0))
        for fam, setting, build, t, found, nbytes in faiss_rows(faiss, keys_GMH[g].numpy(), queries_GXH[g].numpy(),
                                                                args.k, nlist):  # fmt: skip
            table.setdefault((fam, setting), []).append((build, t, found, nbytes))
    for fam, setting, build, t, found, nbytes in fot_ivf_rows(keys_GMH[:heads], queries_GXH[:heads], args.k):
        for g in range(heads):
            table.setdefault((fam, setting), []).append((build, t, found[g], nbytes))

    header = f"{'index':<11} {'setting':<30} {'build s/head':>12} {'us/query':>9} {f'recall@{args.k}':>10} "
    header += f"{'index B/key':>11}"
    print(header)
    print("-" * len(header))
    for (fam, setting), runs in table.items():
        build = np.mean([r[0] for r in runs])
        us = np.mean([r[1] for r in runs]) / X * 1e6
        hits = [recall_at_k(queries_GXH[None, g : g + 1], keys_GMH[None, g : g + 1],
                            torch.from_numpy(np.asarray(r[2], dtype=np.int64))[None, None], exact_scores[g])
                for g, r in enumerate(runs)]  # fmt: skip
        rec = sum(h for h, _ in hits) / max(sum(w for _, w in hits), 1)
        nbytes = np.mean([r[3] for r in runs])
        print(f"{fam:<11} {setting:<30} {build:>12.2f} {us:>9.1f} {rec:>10.3f} {nbytes:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
