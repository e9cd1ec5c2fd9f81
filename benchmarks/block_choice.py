"""How well can block retrieval (``mem_blocks``, fot/blocks.py) do on a real model's keys: recall of exact top-k.

Runs the first ``--model-layers`` layers of the checkpoint over a passkey prompt of ``--tokens`` tokens with memory
in every one of them, keeps each layer's memory keys and the queries of its last window, and asks, for each block
size S and number of blocks n (n * S slots read) and chunk C of queries: what share of each query's exact top-k
memory keys (``--k``) lies in the n blocks its chunk chose? Two choosers side by side:

  * ``bound``: fot's, the largest upper bound max(q * min, q * max) over the chunk's queries;
  * ``oracle``: the largest true score of any key in the block over the chunk's queries, which no chooser that
    reads blocks by their best key can beat.

Also the share of the memory part of the softmax mass (scale 1/sqrt(H)) the chosen blocks hold. When the oracle
itself stays far below 1, a query's best keys are spread over more blocks than it reads, and only more slots help.

    python -m benchmarks.block_choice --tokens 4096 --model-layers 8
"""

from __future__ import annotations

import argparse
import math

from benchmarks.bench_config import check_args
from plumbing.cli import ArgumentParser


def layer_data(args) -> list[tuple]:
    """[(memory keys [G, M, H] fp32, last-window rotated queries [N, T, H])] of each layer."""
    import torch

    import fot
    from benchmarks.memory_scaling import input_ids
    from fot.cache import MemoryReader

    n = args.model_layers
    model = fot.LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, num_hidden_layers=n,
                                                     mem_layers=list(range(n)), mem_top_k=None, mem_index="exact",
                                                     mem_blocks=1).eval()  # fmt: skip
    seen, inner = {}, MemoryReader.choose_blocks

    def keep(self, q_BNTH):  # the last call of each layer is its last window
        seen[id(self.search)] = q_BNTH[0].clone()
        return inner(self, q_BNTH)

    MemoryReader.choose_blocks = keep
    with torch.inference_mode():
        cache = model(input_ids(args.tokens, args.model, "landmark"), use_cache=True).past_key_values
    MemoryReader.choose_blocks = inner
    return [(cache.memories[i].view().k_BGMH[0].float(), seen[id(cache.searches[i])]) for i in range(n)]


def score(data, S: int, n: int, C: int, k: int, chooser: str) -> tuple[float, float]:
    """(recall of exact top-k, share of the memory softmax mass) of ``chooser`` reading n blocks of S per chunk of C."""
    import torch

    recall, mass = [], []
    for keys, q in data:
        G, M, H = keys.shape
        N, T, _ = q.shape
        R, X = N // G, M // S
        for g in range(G):
            kb = keys[g, : X * S].reshape(X, S, H)
            qg = q[g * R:(g + 1) * R]  # [R, T, H]
            s = qg @ keys[g, : X * S].T  # [R, T, X * S]
            top_block = s.topk(k, dim=-1).indices // S
            p_block = torch.softmax(s / math.sqrt(H), -1).reshape(R, T, X, S).sum(-1)
            if chooser == "bound":
                b = qg.clamp(min=0) @ kb.amax(1).T + qg.clamp(max=0) @ kb.amin(1).T
            else:
                b = s.reshape(R, T, X, S).amax(-1)
            for c0 in range(0, T, C):
                chosen = torch.zeros(X, dtype=torch.bool)
                chosen[b[:, c0:c0 + C].amax(dim=(0, 1)).topk(min(n, X)).indices] = True
                recall.append(chosen[top_block[:, c0:c0 + C]].float().mean().item())
                mass.append((p_block[:, c0:c0 + C] * chosen).sum(-1).mean().item())
    return sum(recall) / len(recall), sum(mass) / len(mass)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-fot")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--model-layers", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reads", nargs="+", default=["32x16", "16x32", "32x32", "32x64"],
                        help="SxN: blocks of S slots, N of them per chunk")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 1])
    args = parser.parse_args()
    check_args(parser, args, positive=("tokens", "model_layers", "k", "threads"))
    import torch

    torch.set_num_threads(args.threads)
    data = layer_data(args)
    print(f"{args.model}: first {args.model_layers} layers, {args.tokens} tokens, recall@{args.k} of the last "
          f"window's queries")  # fmt: skip
    print(f"{'S':>4}{'n':>5}{'slots':>7}{'chunk':>7}{'bound recall':>14}{'oracle recall':>15}{'bound mass':>12}")
    for read in args.reads:
        S, n = (int(x) for x in read.split("x"))
        for C in args.chunks:
            (rb, mb), (ro, _) = score(data, S, n, C, args.k, "bound"), score(data, S, n, C, args.k, "oracle")
            print(f"{S:>4}{n:>5}{S * n:>7}{C:>7}{rb:>14.3f}{ro:>15.3f}{mb:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
