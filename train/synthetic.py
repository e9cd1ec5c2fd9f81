"""Command line of the synthetic mix (tasks/mix.py): train its tokenizer, or print sample documents.

    python -m train.synthetic tokenizer --out runs/tokenizer_mix --vocab_size 2000
    python -m train.synthetic sample --tokenizer runs/tokenizer_mix --documents 4
"""

from __future__ import annotations

from tasks.books import BookHaystack
from tasks.heldout import Scanner
from tasks.mix import FAMILIES, HAYSTACK_STYLES, SyntheticMix, mask_runs, training_texts


def main(argv: list[str] | None = None) -> None:
    """``tokenizer``: train the mix's tokenizer; ``sample``: print generated documents with their answers marked."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.synthetic", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer (digits split) on book passages and templates")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab_size", type=int, default=2000)
    tok.add_argument("--documents", type=int, default=3000, help="book passages (plus one task text each)")
    show = sub.add_parser("sample", help="print documents and their answers")
    show.add_argument("--tokenizer", required=True)
    show.add_argument("--doc_tokens", type=int, default=512)
    show.add_argument("--documents", type=int, default=4)
    show.add_argument("--haystacks", nargs="+", metavar="STYLE=WEIGHT",
                      help=f"haystack styles as data.mix_haystacks, e.g. records=1 "
                           f"(styles: {', '.join(HAYSTACK_STYLES)})")
    for p in (tok, show):
        p.add_argument("--paths", nargs="+", default=["assets/books/train.parquet"])
        p.add_argument("--text_field", default="text")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    haystack = BookHaystack.from_files(args.paths, args.text_field, Scanner())
    if args.command == "tokenizer":
        from train.tokenizer import train_tokenizer

        lines = [line for text in training_texts(haystack, args.documents, args.seed) for line in text.split("\n")]
        tokenizer = train_tokenizer(iter([line for line in lines if line.strip()]), args.out, args.vocab_size)
        print(f"saved a {len(tokenizer)}-piece tokenizer to {args.out}")
        return
    from transformers import AutoTokenizer

    haystacks = None
    if args.haystacks:
        try:
            haystacks = {k: float(w) for k, w in (item.split("=") for item in args.haystacks)}
        except ValueError:
            parser.error(f"--haystacks {' '.join(args.haystacks)}: give STYLE=WEIGHT pairs, e.g. records=1 books=1")
    try:
        mix = SyntheticMix(AutoTokenizer.from_pretrained(args.tokenizer), haystack, args.doc_tokens,
                           {f: 1.0 for f in FAMILIES}, args.seed, haystacks=haystacks)
    except ValueError as e:  # bad weights or doc_tokens: one line naming the fix
        parser.error(str(e))
    for i in range(args.documents):
        family, text, ids, mask = mix.sample(0, i)
        shown = text
        answers = [mix.tokenizer.decode(ids[a:b]) for a, b in mask_runs(mask)]
        print(f"=== {family}: {len(ids)} tokens, {int(mask.sum())} with loss; answers {answers[:8]}\n{shown}\n")


if __name__ == "__main__":
    main()
