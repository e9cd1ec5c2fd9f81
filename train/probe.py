"""Does a model copy by content? Accuracy on held-out ``SyntheticRepeat`` documents, per jitter, inside one window.

    python -m train.probe --run runs/demo_stage0            # the newest verified step checkpoint of a run
    python -m train.probe --model runs/demo_stage0/final     # a save_pretrained directory
    python -m train.probe --model M --jitters 0 8 80 --docs 256 --json probe.json

A document is ``tasks.copying.SyntheticRepeat``'s: random ids in which a span recurs ``min_offset + U[0, J]``
tokens later. For each jitter J the probe reports the mean loss and the share of the recurrence's tokens (after
its first) that the model's argmax predicts exactly. At J = 0 a model can copy by position (the token
``offset - 1`` back); at large J only by content. A model with a content-based copying circuit (an induction
head) scores near 1 at every J; one that copies by position scores near 1 at J = 0 and falls as J grows;
chance is ``1 / (vocab_size - 6)``. The documents come from their own seed, never the training stream's.

The whole document is one window: ``last_context_length`` is raised to the document length so nothing goes
through memory (the model's own inference windowing would otherwise split it), and the memory layers attend
causally within it, as the trainer's one-window rows do.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

import fot
from plumbing.cli import ArgumentParser
from tasks.copying import SyntheticRepeat

logger = logging.getLogger(__name__)

PROBE_SEED = 7_000_003  # training streams use small seeds; this one is the probe's alone


def load_run_model(run_dir: Path) -> tuple[fot.LongLlamaForCausalLM, int]:
    """The model of the newest verified step checkpoint of a trainer run directory, and its step."""
    import torch.distributed.checkpoint as dcp

    from train.build import build_model
    from train.checkpoint import step_dirs, verify
    from train.config import load_config
    from train.parallel import DistInfo

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run_dir} holds no config.yaml; --run takes a trainer run directory (run.out_dir).")
    spec = load_config(config)
    info = DistInfo(rank=0, local_rank=0, world=1, device=torch.device("cpu"), initialized=False)
    # read-only: unlike a resume, the probe renames nothing (the run may still be writing and pruning)
    found = [(step, path) for step, path in reversed(step_dirs(run_dir)) if verify(path, info) is None][:1]
    if not found:
        raise ValueError(f"{run_dir} holds no complete step checkpoint yet; wait for run.save_every steps, or pass "
                         "--model.")
    step, path = found[0]
    model = build_model(spec)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=True)
    model.load_state_dict(state["model"])
    return model, step


@torch.no_grad()
def probe(model, jitters: list[int], docs: int, doc_tokens: int, span: tuple[int, int], min_offset: int,
          batch: int = 32) -> list[dict]:
    """Per jitter: ``{"jitter", "loss", "accuracy", "tokens"}`` over ``docs`` held-out documents."""
    model.eval()
    rows = []
    for jitter in jitters:
        source = SyntheticRepeat(model.config.vocab_size, doc_tokens, span, min_offset, [jitter], True, PROBE_SEED)
        loss_sum, hits, count = 0.0, 0, 0
        for first in range(0, docs, batch):
            documents = [source.get(0, i) for i in range(first, min(first + batch, docs))]
            ids_BN = torch.from_numpy(np.stack([d.ids for d in documents]))
            mask_BN = torch.from_numpy(np.stack([d.loss_mask for d in documents]))
            logits_BNV = model(input_ids=ids_BN, use_cache=False, last_context_length=doc_tokens).logits.float()
            # position t predicts token t + 1: the masked targets are ids[1:][mask[1:]]
            logits_XV = logits_BNV[:, :-1][mask_BN[:, 1:]]
            target_X = ids_BN[:, 1:][mask_BN[:, 1:]]
            loss_sum += torch.nn.functional.cross_entropy(logits_XV, target_X, reduction="sum").item()
            hits += int((logits_XV.argmax(-1) == target_X).sum())
            count += int(target_X.numel())
        rows.append({"jitter": jitter, "loss": loss_sum / count, "accuracy": hits / count, "tokens": count})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a save_pretrained checkpoint directory")
    which.add_argument("--run", help="a trainer run directory: its newest verified step checkpoint")
    parser.add_argument("--jitters", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32, 64, 80])
    parser.add_argument("--docs", type=int, default=128, help="documents per jitter (default 128)")
    parser.add_argument("--doc-tokens", type=int, default=128)
    parser.add_argument("--span", type=int, nargs=2, default=[6, 20], metavar=("LO", "HI"))
    parser.add_argument("--min-offset", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.docs < 1 or args.threads < 1:
        parser.error("--docs and --threads must be positive")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.run:
            model, step = load_run_model(Path(args.run))
            where = f"{args.run} step {step}"
        else:
            model, where = fot.LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32), args.model
        rows = probe(model, args.jitters, args.docs, args.doc_tokens, tuple(args.span), args.min_offset)
    except ValueError as err:
        parser.error(str(err))
    print(f"{where}: copying a recurring span of {args.span[0]}-{args.span[1]} random ids, "
          f"{args.min_offset} + U[0, J] tokens back ({args.docs} documents per J)")
    print(f"{'J':>4}{'loss':>8}{'accuracy':>10}")
    for row in rows:
        print(f"{row['jitter']:>4}{row['loss']:>8.3f}{row['accuracy']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": where, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
