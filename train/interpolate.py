"""Interpolate the weights of a fine-tuned model with those of the model it started from.

    python -m train.interpolate --base models/fot-tiny --tuned runs/demo_stage4/final --alpha 0.7 --out DIR

Every parameter becomes ``(1 - alpha) * base + alpha * tuned``, computed in float64 and stored in the tuned model's
dtype. A fine-tune on a narrow mixture can gain what it was aimed at and lose skills the base had; the weights on the
line between the two often keep both (weight-space ensembling of a fine-tune with its base, as in WiSE-FT). The
demo model's stage 4 is used this way (train/README.md, "The demo model"): alpha is chosen on validation prompts
whose seed no reported evaluation uses.

The two checkpoints must be ``save_pretrained`` directories of one architecture: the same config apart from
bookkeeping fields, and the same parameter names and shapes. ``DIR`` gets the tuned model's config and tokenizer
files with the interpolated weights, written through ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

import fot
from plumbing.cli import ArgumentParser, user_errors

logger = logging.getLogger(__name__)

# Config fields that may differ between two checkpoints of one architecture (versions and provenance).
BOOKKEEPING = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def check_compatible(base: fot.LongLlamaForCausalLM, tuned: fot.LongLlamaForCausalLM) -> None:
    """Raise ``ValueError`` naming what differs when the two models are not one architecture."""
    a, b = base.config.to_dict(), tuned.config.to_dict()
    differ = sorted(k for k in set(a) | set(b) if k not in BOOKKEEPING and a.get(k) != b.get(k))
    if differ:
        shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differ[:5])
        raise ValueError(f"the base and tuned configs differ ({shown}); interpolate checkpoints of one architecture.")
    sa, sb = base.state_dict(), tuned.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError("the base and tuned models' parameters differ in names or shapes.")


def interpolate(base: fot.LongLlamaForCausalLM, tuned: fot.LongLlamaForCausalLM,
                alpha: float) -> fot.LongLlamaForCausalLM:  # fmt: skip
    """``tuned`` with every parameter and buffer set to ``(1 - alpha) * base + alpha * tuned`` (in place)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: use a value in [0, 1] (0 gives the base model, 1 the tuned one).")
    check_compatible(base, tuned)
    sa = base.state_dict()
    with torch.no_grad():
        for name, t in tuned.state_dict().items():
            if t.is_floating_point():
                mixed = (1.0 - alpha) * sa[name].double() + alpha * t.double()
                t.copy_(mixed.to(t.dtype))
    return tuned


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the model the fine-tune started from (save_pretrained dir)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model (save_pretrained dir)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of the tuned model, in [0, 1]")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    with user_errors(parser.prog, (ValueError, OSError)):
        if out.exists():
            raise ValueError(f"{out} exists; remove it or choose another --out.")
        base = fot.LongLlamaForCausalLM.from_pretrained(args.base, dtype="auto")
        tuned = fot.LongLlamaForCausalLM.from_pretrained(args.tuned, dtype="auto")
        model = interpolate(base, tuned, args.alpha)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(args.tuned) / name).exists():
                shutil.copy2(Path(args.tuned) / name, tmp / name)
        tmp.rename(out)  # complete or absent: an interrupted run leaves only the .tmp directory
    logger.info("wrote %s: %.2f x %s + %.2f x %s", out, 1 - args.alpha, args.base, args.alpha, args.tuned)


if __name__ == "__main__":
    main()
