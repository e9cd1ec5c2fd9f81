"""Training throughput: HF LlamaForCausalLM vs ours with memory off vs ours with crossbatch d=4, side by side.

Bench config (the core issue's): vocab 1000, 4 layers, hidden 256, 4 heads, FFN 688, window 512, memory layers
[2, 3], fp32 weights, ``torch.set_num_threads(1)``. One training step is forward + backward + AdamW step on a
batch of ``--batch`` rows of 512 tokens (every row one window). The cases:

* ``hf``: transformers ``LlamaForCausalLM`` (SDPA attention), plain causal LM loss.
* ``ours_mem_off``: ``LongLlamaForCausalLM`` with ``mem_layers=[]`` and a crossbatch plan with no contexts
  (each row one window, exactly the trainer's step without the FoT objective).
* ``ours_crossbatch_d4``: memory layers [2, 3] and the paper's layout with d=4 (1 positive + 3 negatives of
  512 tokens for every row that has a previous window; ``--pack`` consecutive rows per document).

Each case runs in a fresh subprocess; cases are interleaved over ``--rounds`` and the best step time of each is
kept. Prints tokens/s and the ratios to HF. Nothing is asserted: this is a measurement.

    python benchmarks/train_throughput.py                  # batch 8, pack 2, 5 steps x 3 rounds
    python benchmarks/train_throughput.py --batch 16 --pack 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_config import LLAMA as BENCH  # noqa: E402
CASES = ("hf", "ours_mem_off", "ours_crossbatch_d4")


def build(case: str, pack: int, batch: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fot
    from fot.crossbatch import CrossBatchPlan, paper_layout

    torch.manual_seed(0)
    if case == "hf":
        model = LlamaForCausalLM(LlamaConfig(**BENCH, attn_implementation="sdpa"))
        return model, lambda ids: model(input_ids=ids, labels=ids).loss
    mem_layers = [2, 3] if case == "ours_crossbatch_d4" else []
    config = fot.LongLlamaConfig(**BENCH, mem_layers=mem_layers, last_context_length=256, mem_dtype="float32",
                                 use_cache=False)
    model = fot.LongLlamaForCausalLM(config)
    if case == "ours_crossbatch_d4":
        plan = paper_layout(batch, pack, d=4)
    else:
        empty = torch.zeros(batch, 0, dtype=torch.long)
        plan = CrossBatchPlan(empty, empty.bool(), empty.bool())
    return model, lambda ids: model(input_ids=ids, labels=ids, crossbatch=plan).loss


def run_case(case: str, batch: int, pack: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    model, loss_fn = build(case, pack, batch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, BENCH["vocab_size"], (batch, BENCH["max_position_embeddings"]), generator=g)
    times = []
    for i in range(steps + 1):  # the first step warms up the allocator and kernels
        start = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    best = min(times)
    return {"case": case, "seconds": best, "tokens_per_s": ids.numel() / best, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step (512 tokens each)")
    parser.add_argument("--pack", type=int, default=2, help="consecutive rows per document (k); batch/pack >= 4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of all is kept)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.pack, args.steps)))
        return
    if args.batch % args.pack or args.batch // args.pack < 4:
        parser.error("--batch must be a multiple of --pack with at least 4 documents (d=4)")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for case in CASES:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--batch", str(args.batch),
                   "--pack", str(args.pack), "--steps", str(args.steps)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            if case not in best or result["seconds"] < best[case]["seconds"]:
                best[case] = result
    hf = best["hf"]["tokens_per_s"]
    print(f"train throughput: batch {args.batch} x 512 tokens, pack {args.pack}, fp32, 1 thread, best of "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'case':<22}{'s/step':>10}{'tokens/s':>12}{'vs HF':>8}")
    for case in CASES:
        r = best[case]
        print(f"{case:<22}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / hf:>8.3f}")
    print(f"targets: ours_mem_off >= 0.95 x HF, ours_crossbatch_d4 >= 0.75 x HF")


if __name__ == "__main__":
    main()
