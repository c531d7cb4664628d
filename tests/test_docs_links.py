"""Every relative link of README.md and docs/*.md reaches a file of the repository, and every #anchor a heading of
the page it names, as GitHub renders them (links inside code are not links)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code marks dropped) in lower case, characters other than
    letters, digits, spaces, hyphens and underscores removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """The links of ``page`` that reach no file or no heading, each as 'target (why)'."""
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(file, page.parent)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_every_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_page_of_docs():
    linked = {(REPO / target.partition("#")[0]).resolve()
              for line in prose_lines((REPO / "README.md").read_text()) for target in LINK.findall(line)}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_a_broken_file_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## 2. Speed, memory: `bench/`\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## A heading\n\n"
                    "[ok](other.md#2-speed-memory-bench) [ok](#a-heading) [ok](other.md#notes-1) [ok](https://x.org)\n"
                    "`[in code](missing.md)`\n```\n[in a block](missing.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#speed) ![image](missing.png) [no](#notes-2)\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#speed (no heading #speed in other.md)",
                                  "missing.png (no such file)", "#notes-2 (no heading #notes-2 in page.md)"]
