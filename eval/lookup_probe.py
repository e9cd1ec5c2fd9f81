"""Where the memory layers look when a dictionary-lookup query is answered: eval/lookup.py's dictionaries and
queries, one forward each, and the attention of every memory layer at the position that predicts the value.

    python eval/lookup_probe.py --model models/fot-tiny --sizes 1024 4096 --trials 2 --queries 16 --seed 1 \\
        --out runs/lookup_probe

eval/lookup.py says whether an answer is right; this says why not. A dictionary is prefilled once (dense memory,
the torch attention); each query continues a fork of the cache with the query and the first token of its answer
(" ", the space before the value's digits), so the last position is the one that predicts the value's first
digit. At that position, for each memory layer and head, with the layer's own scores (rotated query against
memory keys as stored, scaled by 1/sqrt(head_dim), one softmax over the local window and memory):

* ``rank``: the rank, among all memory slots, of the best-scoring token of the queried line (1 = no memory token
  scores higher). Memory slot m holds prompt token m: memory fills in order and nothing is evicted.
* ``line_mass``: the attention probability on the queried line's tokens.
* ``memory_mass``: the attention probability on all of memory (the rest is on the local window).

Per layer the summary gives, over queries, how often some head ranks the line first and in its top 5, the median
of the best head's rank, and each head's mean masses; ``first_digit`` counts the queries whose first value digit
is the model's greedy choice. Outputs (``--out DIR``): results.json, and a table on stdout.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch

import fot.attention as attention
from eval.common import add_probe_arguments, check_probe_args, write_json
from eval.lookup import Dictionary, make_dictionaries
from eval.passkey import PromptEncoder
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@contextmanager
def recording_dense_attention(records: list):
    """Within the block, every call of the torch dense memory attention with a non-empty memory appends
    ``(q_BN1H of the last position, local, memory, out_BN1H of the last position)`` to ``records``."""
    key = ("torch", "dense")
    inner = attention.ATTENTION_FUNCTIONS[key]

    def record(q_BNTH, local, memory, **kwargs):
        out_BNTH = inner(q_BNTH, local, memory, **kwargs)
        if memory is not None and memory.size > 0:
            records.append((q_BNTH[:, :, -1:], local, memory, out_BNTH[:, :, -1:]))
        return out_BNTH

    attention.ATTENTION_FUNCTIONS[key] = record
    try:
        yield records
    finally:
        attention.ATTENTION_FUNCTIONS[key] = inner


def last_position_attention(q_BN1H, local, memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memory scores [N, M], and the probabilities over local [N, S] and memory [N, M] of the last query position
    (batch row 0), as the layer's one softmax makes them: the last position sees every valid local token."""
    N, H = q_BN1H.shape[1], q_BN1H.shape[-1]
    R = N // local.k_BGSH.shape[1]
    q_NH = q_BN1H[0, :, 0].double()
    k_local_NSH = local.k_BGSH[0].repeat_interleave(R, 0).double()
    k_mem_NMH = memory.k_BGMH[0].repeat_interleave(R, 0).double()
    local_NS = torch.einsum("nh,nsh->ns", q_NH, k_local_NSH) / math.sqrt(H)
    mem_NM = torch.einsum("nh,nmh->nm", q_NH, k_mem_NMH) / math.sqrt(H)
    if local.valid_BS is not None:
        local_NS = local_NS.masked_fill(~local.valid_BS[0][None, :], -math.inf)
    if memory.valid_BM is not None:
        mem_NM = mem_NM.masked_fill(~memory.valid_BM[0][None, :], -math.inf)
    probs = torch.softmax(torch.cat([local_NS, mem_NM], dim=-1), dim=-1)
    return mem_NM, probs[:, : local_NS.shape[-1]], probs[:, local_NS.shape[-1]:]


def line_rank(mem_NM: torch.Tensor, start: int, end: int) -> list[int]:
    """Per head, 1 + the number of memory slots that score above the line's best token (slots start..end-1)."""
    best_N = mem_NM[:, start:end].max(dim=-1).values
    return ((mem_NM > best_N[:, None]).sum(dim=-1) + 1).tolist()


def probe_query(model, cache, query, device="cpu") -> dict:
    """One query's record: the greedy first value digit and, per memory layer, rank and masses per head."""
    ids = torch.tensor([query.query_ids + query.answer_ids[:1]], device=device)
    records: list = []
    with torch.no_grad(), recording_dense_attention(records):
        logits = model(ids, cache=cache.fork(), use_cache=True, logits_to_keep=1).logits
    layers = []
    start, end = query.span
    for q_BN1H, local, memory, _ in records:
        if end > memory.size:
            raise ValueError(f"line of key {query.key} ends at token {end}, past the {memory.size} memory slots.")
        mem_NM, _, mem_probs_NM = last_position_attention(q_BN1H, local, memory)
        layers.append(dict(rank=line_rank(mem_NM, start, end),
                           line_mass=mem_probs_NM[:, start:end].sum(-1).tolist(),
                           memory_mass=mem_probs_NM.sum(-1).tolist(), slots=memory.size))
    first_digit = len(query.answer_ids) > 1 and int(logits[0, -1].argmax()) == query.answer_ids[1]
    return dict(key=query.key, value=query.value, line=query.line, first_digit=bool(first_digit), layers=layers)


def probe_dictionary(model, d: Dictionary, device="cpu") -> list[dict]:
    with torch.no_grad():
        cache = model(torch.tensor([d.ids], device=device), use_cache=True, logits_to_keep=1).cache
    return [probe_query(model, cache, q, device) for q in d.queries]


def summarize(queries: list[dict], mem_layers: list[int]) -> dict:
    out = dict(queries=len(queries), first_digit=sum(q["first_digit"] for q in queries), layers={})
    for i, layer in enumerate(mem_layers):
        best = [min(q["layers"][i]["rank"]) for q in queries]
        heads = len(queries[0]["layers"][i]["rank"])
        out["layers"][layer] = dict(
            first=sum(b == 1 for b in best), top5=sum(b <= 5 for b in best), median_best_rank=statistics.median(best),
            line_mass=[statistics.fmean(q["layers"][i]["line_mass"][h] for q in queries) for h in range(heads)],
            memory_mass=[statistics.fmean(q["layers"][i]["memory_mass"][h] for q in queries) for h in range(heads)],
        )
    return out


def format_summary(size: int, s: dict) -> str:
    lines = [f"{size} tokens: first value digit right in {s['first_digit']}/{s['queries']}"]
    for layer, x in s["layers"].items():
        lines.append(
            f"  layer {layer}: line ranked first by some head {x['first']}/{s['queries']}, in its top 5 "
            f"{x['top5']}/{s['queries']}, median best rank {x['median_best_rank']}; per head, mass on the line "
            f"{[round(m, 3) for m in x['line_mass']]}, on memory {[round(m, 3) for m in x['memory_mass']]}")
    return "\n".join(lines)


def load_probe_model(path: Path, device: str):
    """The checkpoint as saved, with dense memory and the torch attention (the one the probe records)."""
    import fot

    model = fot.LongLlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_impl="torch").to(device).eval()
    cfg = model.config
    if cfg.mem_top_k is not None or cfg.mem_max_tokens is not None:
        raise ValueError(f"{path}: the probe needs dense memory that keeps every token (mem_top_k and mem_max_tokens "
                         f"None), not mem_top_k={cfg.mem_top_k}, mem_max_tokens={cfg.mem_max_tokens}.")
    if not cfg.mem_layers:
        raise ValueError(f"{path}: the model has no memory layers; there is nothing to probe.")
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_probe_arguments(p, "write results.json here")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="dictionary sizes in tokens")
    p.add_argument("--trials", type=int, default=2, help="dictionaries per size")
    p.add_argument("--queries", type=int, default=16, help="queries per dictionary")
    p.add_argument("--seed", type=int, default=0, help="eval/lookup.py's seed: the same seed probes its dictionaries")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = build_parser()
    args = p.parse_args(argv)
    try:  # every input is checked before a model is loaded
        model_dir, tokenizer_dir = check_probe_args(args)
        model = load_probe_model(model_dir, args.device)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    window = model.config.max_position_embeddings
    encoder = PromptEncoder(load_tokenizer(tokenizer_dir))
    dictionaries = make_dictionaries(encoder, args.sizes, args.trials, args.queries, args.seed, window)
    results = {}
    for size, ds in dictionaries.items():
        queries = [q for d in ds for q in probe_dictionary(model, d, args.device)]
        results[size] = dict(summary=summarize(queries, list(model.config.mem_layers)), queries=queries)
        print(format_summary(size, results[size]["summary"]), flush=True)
    report = dict(model=str(args.model), sizes=args.sizes, trials=args.trials, queries=args.queries, seed=args.seed,
                  results=results)
    if args.out is not None:
        write_json(args.out / "results.json", report)
        print(f"wrote {args.out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
