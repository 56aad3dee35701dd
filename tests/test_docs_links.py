"""The documentation holds together: every relative link in README.md and docs/*.md reaches an existing
file (and heading, for a link with an anchor), every page in docs/ is reachable from the README, and no
text file in the project tells the story of its own development (results carry their command, date and
machine instead)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]

# What a reader would take for development history. "session" alone is fine (an HTTP ClientSession).
HISTORY = re.compile(r"\b(last|previous|earlier|this) session|session [0-9]+", re.IGNORECASE)
TEXT_SUFFIXES = {".md", ".py", ".toml", ".java", ".js", ".mjs", ".html", ".json", ".sh", ".txt", ".kts"}
SKIPPED_DIRS = {"node_modules", ".venv", ".flower-venv", ".git", "__pycache__", ".mypy_cache", ".pytest_cache",
                ".ruff_cache"}  # .flower-venv: bench_flower's venv for Flower (git-ignored)

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text a reader sees as links: code blocks, code spans and comments removed."""
    return INLINE_CODE.sub("", FENCE.sub("", COMMENT.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, https:, mailto:


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    assert DOCS, "docs/ holds the long documentation"
    assert [str(d.relative_to(REPO)) for d in DOCS if d.resolve() not in linked] == []


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n[ok](other.md#a-heading-with-punctuation) [self](#top) [web](https://x.org/y)\n"
                    "[gone](missing.md) [bad anchor](other.md#nope) `[code](ignored.md)`\n"
                    "```\n[fenced](ignored.md)\n```\n<!-- [comment](ignored.md) -->\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no such heading"]


def text_files() -> Iterator[Path]:
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in files:
            path = Path(root) / name
            if path.suffix in TEXT_SUFFIXES and not path.is_symlink():
                yield path


def test_no_development_history_in_the_project() -> None:
    found = []
    for path in text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert found == []


# Written in pieces, so that this file does not itself hold what it looks for.
@pytest.mark.parametrize("line", ["the rows are sess" "ion 7's", "as in the last " "session", "Sess" "ion 12 measured",
                                  "since this " "session"])
def test_history_pattern_catches(line: str) -> None:
    assert HISTORY.search(line)


@pytest.mark.parametrize("line", ["async with aiohttp.ClientSession() as session:", "session.post(url)",
                                  "one HTTP session per phone"])
def test_history_pattern_spares_http_sessions(line: str) -> None:
    assert not HISTORY.search(line)
