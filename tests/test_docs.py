"""The README stays a short front door, and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
README_MAX_LINES = 200
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """Link targets outside fenced code blocks that point into the repository."""
    targets, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, mailto: or an anchor in the same page
            targets.append(target.split("#", 1)[0])
    return targets


def resolve(page: Path, target: str) -> Path:
    """Where a relative link from `page` lands."""
    return (page.parent / target).resolve()


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail under docs/"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = [target for target in relative_links(page) if not resolve(page, target).exists()]
    assert not broken, f"{page.relative_to(REPO_ROOT)} links to missing paths: {broken}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, queue = {README.resolve()}, [README]
    while queue:
        page = queue.pop()
        for target in relative_links(page):
            landed = resolve(page, target)
            if landed.suffix == ".md" and landed.exists() and landed not in seen:
                seen.add(landed)
                queue.append(landed)
    unreachable = [page.name for page in markdown_files() if page.resolve() not in seen]
    assert not unreachable, f"docs pages no link from README.md reaches: {unreachable}"


def test_link_finder_sees_what_a_reader_would_follow(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/x.md#part) ![b](figures/y.png) [c](https://example.org) [d](#top)\n"
                    "```\n[not a link](inside/code.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["docs/x.md", "figures/y.png"]
