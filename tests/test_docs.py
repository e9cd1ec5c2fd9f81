"""The documentation's relative links resolve, to a file and, where a link names one, to a heading in it; the
README stays short enough to read (issue 34: at most 200 lines; detail belongs in docs/)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def doc_files() -> list[Path]:
    """Every Markdown page of the checkout outside hidden folders (.venv, .git), runs, assets and build outputs."""
    skip = {"runs", "assets", "build", "dist", "node_modules", "__pycache__"}
    pages = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders
                         if not d.startswith(".") and d not in skip and not d.endswith(".egg-info")]
        pages += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(pages)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings, with GitHub's -1, -2 ... suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(text: str) -> list[str]:
    """Link targets outside code blocks and code spans."""
    return _LINK.findall(_CODE_SPAN.sub("", _FENCE.sub("", text)))


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per link of ``page`` whose file, or heading in that file, does not exist."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no file {dest.relative_to(root) if dest.is_relative_to(root) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_slug_follows_github():
    assert slug("The demo model") == "the-demo-model"
    assert slug("Passkey to 64K tokens: `make demo`") == "passkey-to-64k-tokens-make-demo"
    assert slug("Stage 9: short recall documents (2026-12-03; not shipped)") == \
        "stage-9-short-recall-documents-2026-12-03-not-shipped"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_checker_catches_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Here\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#here) [ok](#top) `[code](none.md)`\n# Top\n[bad](b.md#there) [gone](c.md)\n")
    assert broken_links(page, tmp_path) == ["b.md#there: no heading with anchor #there in b.md", "c.md: no file c.md"]


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})."
