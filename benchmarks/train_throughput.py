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

With ``--model DIR`` (a fot checkpoint, e.g. ``make smollm2``'s models/smollm2-fot) the same cases run on that
model's architecture and weights instead: ``hf`` is ``LlamaForCausalLM`` with the same state dict, the memory
layers are the checkpoint's, and one more case, ``ours_lora_crossbatch_d4``, trains LoRA adapters (r 8 on q, k,
v, o of every layer, through peft) with the base frozen, as ``adapter.kind: lora`` in the trainer does.

    python benchmarks/train_throughput.py --model models/smollm2-fot --threads 2 --steps 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_config import check_args
from benchmarks.bench_config import LLAMA as BENCH
from plumbing.cli import ArgumentParser
CASES = ("hf", "ours_mem_off", "ours_crossbatch_d4")
MODEL_CASES = CASES + ("ours_lora_crossbatch_d4",)
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")


def build_from_checkpoint(case: str, model_dir: str):
    """``case``'s model from a fot checkpoint: HF's LlamaForCausalLM on the same weights, or ours."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fot

    overrides = {"mem_layers": []} if case == "ours_mem_off" else {}
    ours = fot.LongLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_cache=False,
                                                    mem_dtype="float32", **overrides)  # fmt: skip
    if case == "hf":
        fields = {k: getattr(ours.config, k) for k in LLAMA_FIELDS}
        hf = LlamaForCausalLM(LlamaConfig(**fields, max_position_embeddings=ours.config.max_position_embeddings,
                                          attn_implementation="sdpa"))  # fmt: skip
        hf.load_state_dict(ours.state_dict())
        return hf
    if case == "ours_lora_crossbatch_d4":
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        return peft.get_peft_model(ours, lora)
    return ours


def build(case: str, pack: int, batch: int, model_dir: str | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fot
    from fot.crossbatch import CrossBatchPlan, paper_layout

    torch.manual_seed(0)
    if model_dir is not None:
        model = build_from_checkpoint(case, model_dir)
    elif case == "hf":
        model = LlamaForCausalLM(LlamaConfig(**BENCH, attn_implementation="sdpa"))
    else:
        mem_layers = [2, 3] if case == "ours_crossbatch_d4" else []
        config = fot.LongLlamaConfig(**BENCH, mem_layers=mem_layers, last_context_length=256, mem_dtype="float32",
                                     use_cache=False)
        model = fot.LongLlamaForCausalLM(config)
    if case == "hf":
        return model, lambda ids: model(input_ids=ids, labels=ids).loss
    if case.endswith("crossbatch_d4"):
        plan = paper_layout(batch, pack, d=4)
    else:
        empty = torch.zeros(batch, 0, dtype=torch.long)
        plan = CrossBatchPlan(empty, empty.bool(), empty.bool())
    return model, lambda ids: model(input_ids=ids, labels=ids, crossbatch=plan).loss


def run_case(case: str, batch: int, pack: int, steps: int, model_dir: str | None, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, loss_fn = build(case, pack, batch, model_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    window = 512 if model_dir is None else model.config.max_position_embeddings
    ids = torch.randint(3, vocab, (batch, window), generator=g)
    times = []
    for i in range(steps + 1):  # the first step warms up the allocator and kernels
        start = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    best = min(times)
    return {"case": case, "seconds": best, "tokens_per_s": ids.numel() / best, "loss": float(loss)}


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step (512 tokens each)")
    parser.add_argument("--pack", type=int, default=2, help="consecutive rows per document (k); batch/pack >= 4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of all is kept)")
    parser.add_argument("--model", help="a fot checkpoint directory to measure instead of the bench model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case")
    parser.add_argument("--case", choices=MODEL_CASES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    check_args(parser, args, positive=("batch", "pack", "steps", "rounds", "threads"))
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.pack, args.steps, args.model, args.threads)))
        return
    cases = MODEL_CASES if args.model else CASES
    if args.batch % args.pack or args.batch // args.pack < 4:
        parser.error("--batch must be a multiple of --pack with at least 4 documents (d=4)")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for case in cases:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--batch", str(args.batch),
                   "--pack", str(args.pack), "--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--model", args.model] if args.model else []
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            if case not in best or result["seconds"] < best[case]["seconds"]:
                best[case] = result
    hf = best["hf"]["tokens_per_s"]
    print(f"train throughput: {args.model or 'bench model'}, batch {args.batch} rows of one window, pack "
          f"{args.pack}, fp32, {args.threads} thread(s), best of {args.rounds} rounds x {args.steps} steps")
    print(f"{'case':<26}{'s/step':>10}{'tokens/s':>12}{'vs HF':>8}")
    for case in cases:
        r = best[case]
        print(f"{case:<26}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / hf:>8.3f}")
    print(f"targets: ours_mem_off >= 0.95 x HF, ours_crossbatch_d4 >= 0.75 x HF")


if __name__ == "__main__":
    main()
