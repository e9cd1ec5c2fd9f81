"""``fot export-code SRC OUT``: a copy of a fot checkpoint that loads where fot is not installed.

    fot export-code models/fot-tiny runs/fot-tiny-code
    python -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('runs/fot-tiny-code', trust_remote_code=True)"

OUT gets the weights, config and generation config, fot's modeling code with an ``auto_map``
(``save_pretrained(save_code=True)``, so ``trust_remote_code=True`` loads it with only transformers and torch
installed), and the tokenizer. Tools that tokenize by themselves (lm-eval, pipelines) take BOS from the tokenizer,
while fot's own tokenizers leave it to the caller (the trainer and the evaluations prepend it): so where the source
tokenizer has a BOS token but does not add it, the exported one adds it (``--keep-tokenizer`` exports it as it is).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_code(src: str | Path, out: str | Path, tokenizer_adds_bos: bool = True) -> Path:
    """Write the checkpoint at ``src`` with its code to ``out`` (see the module docstring); returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import LongLlamaForCausalLM

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint directory (no config.json); pass a fot checkpoint.")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder.")
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    if not isinstance(model, LongLlamaForCausalLM):
        raise ValueError(f"{src} holds a {type(model).__name__}, not a fot model.")
    model.save_pretrained(out, save_code=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    bos = tokenizer.bos_token_id
    if tokenizer_adds_bos and bos is not None and tokenizer("a")["input_ids"][:1] != [bos]:
        tokenizer = AutoTokenizer.from_pretrained(src, add_bos_token=True)
        if tokenizer("a")["input_ids"][:1] != [bos]:
            raise ValueError(f"the tokenizer of {src} cannot be made to add BOS; export it as it is (--keep-tokenizer).")
        print(f"fot export-code: the exported tokenizer adds BOS ({tokenizer.bos_token}) as tools expect; "
              "--keep-tokenizer keeps the original", file=sys.stderr)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fot export-code", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src", help="fot checkpoint directory")
    p.add_argument("out", help="new folder for the copy with code")
    p.add_argument("--keep-tokenizer", action="store_true", help="export the tokenizer as it is (no BOS added)")
    args = p.parse_args(argv)
    try:
        out = export_code(args.src, args.out, tokenizer_adds_bos=not args.keep_tokenizer)
    except ValueError as err:
        print(f"fot export-code: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"fot export-code: wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True)", file=sys.stderr)


if __name__ == "__main__":
    main()
