"""Train a sentencepiece BPE tokenizer on a corpus and save it as a directory ``AutoTokenizer`` loads.

    python train/tokenizer.py --out runs/tok --vocab_size 1000 --paths 'corpus/*.txt'
    python train/tokenizer.py --out runs/tok --vocab_size 1000 --synthetic passkey --documents 2000
    python train/crossbatch.py tokenizer ...        # the same, as a subcommand of the trainer

The directory holds ``tokenizer.model`` (the sentencepiece model) and ``tokenizer_config.json`` naming
``LlamaTokenizer`` and the special tokens, then whatever ``save_pretrained`` adds. Why not
``LlamaTokenizer(vocab_file=...)``: in transformers 5 it ignores the file; a saved directory with
``tokenizer.model`` and a ``tokenizer_class`` loads exactly the trained pieces (without ``tokenizer_class``,
``AutoTokenizer`` builds a different, generic backend). Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, as
in LLaMA except for the pad; digits are split and unknown bytes fall back to byte pieces.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Iterator

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterator[str], out_dir: str | Path, vocab_size: int, max_sentence_length: int = 1 << 16):
    """Train BPE on ``texts`` and save a tokenizer directory; returns the loaded ``AutoTokenizer``.

    ``vocab_size`` is an upper bound: a small corpus may give fewer pieces (``hard_vocab_limit=False``).
    """
    try:
        import sentencepiece as spm
    except ImportError as err:
        raise ImportError("training a tokenizer needs sentencepiece: pip install -e '.[train]'") from err
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # lossless: newlines survive
        max_sentence_length=max_sentence_length, minloglevel=2, hard_vocab_limit=False,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", **SPECIAL, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 1 << 30}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer


def corpus_texts(paths: list[str], fmt: str, text_field: str, chunk_chars: int) -> Iterator[str]:
    """Texts of local files, cut into pieces of at most ``chunk_chars`` characters (sentencepiece's limit). The
    files are opened here, so a path that matches nothing or a missing column raises ``ValueError`` at once."""
    from train.config import DataConfig
    from train.data import load_text_dataset

    ds = load_text_dataset(DataConfig(source="files", paths=paths, format=fmt, text_field=text_field))
    return _chunks(ds, text_field, chunk_chars)


def _chunks(ds, text_field: str, chunk_chars: int) -> Iterator[str]:
    for row in ds:
        text = row[text_field] or ""
        for line in text.split("\n"):
            for i in range(0, len(line), chunk_chars):
                if line[i : i + chunk_chars].strip():
                    yield line[i : i + chunk_chars]


def synthetic_texts(kind: str, documents: int, seed: int) -> Iterator[str]:
    import numpy as np

    from tasks.passkey import passkey_text

    if kind != "passkey":
        raise ValueError(f"--synthetic {kind!r}: only 'passkey' is text; the lookup kind needs no tokenizer.")
    for i in range(documents):
        rng = np.random.default_rng([seed, i])
        yield from passkey_text(int(rng.integers(100, 2000)), rng).split("\n")


def main(argv: list[str] | None = None) -> None:
    from plumbing.cli import ArgumentParser, fail, user_errors
    from plumbing.files import check_out_dir

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--paths", nargs="*", default=[], help="files or globs (text/json/jsonl/parquet)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "json", "parquet"])
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--synthetic", choices=["passkey"], help="train on generated passkey documents instead")
    parser.add_argument("--documents", type=int, default=2000, help="synthetic documents to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk_chars", type=int, default=4096)
    args = parser.parse_args(argv)
    if bool(args.paths) == bool(args.synthetic):
        parser.error("give either --paths or --synthetic")
    with user_errors(parser.prog):
        for flag in ("vocab_size", "documents", "chunk_chars"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}.")
        check_out_dir(args.out, "--out")
        if args.synthetic:
            texts = synthetic_texts(args.synthetic, args.documents, args.seed)
        else:
            texts = corpus_texts(args.paths, args.format, args.text_field, args.chunk_chars)
    try:
        tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    except RuntimeError as err:  # sentencepiece reports a too small vocabulary only once it has read the corpus
        if "Vocabulary size is smaller than required_chars" not in str(err):
            raise
        fail(parser.prog, f"--vocab_size {args.vocab_size} is too small for this corpus: {err}")
    print(f"saved a {len(tokenizer)}-piece BPE tokenizer to {args.out} (load it with AutoTokenizer.from_pretrained)")


if __name__ == "__main__":
    main()
