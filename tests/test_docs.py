"""The README and the pages under docs/ point at things that exist: every relative link and
image target, every `#anchor` (a heading of the target page, in GitHub's slug form), and
every repository path written in backticks (`bench/...`, `results/...`, ...)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(
    r"`((?:bench|metrics|results|tests|conf|scripts|benchmarks|hydra_plugins|docs)/[^`\s:]*)"
)


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6}\s+(.*)$", FENCE.sub("", page.read_text()), flags=re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # links in code are text
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading #{frag}")
    return bad


def missing_paths(page: Path) -> list[str]:
    bad = []
    for m in REPO_PATH.finditer(page.read_text()):
        p = m.group(1).rstrip(".,;")
        if any(c in p for c in "<>{}*…") or "tableN" in p:  # placeholders, not paths
            continue
        if not (ROOT / p).exists():
            bad.append(p)
    return bad


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "conventions.md", "architecture.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_repository_paths_exist(page):
    assert missing_paths(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    text = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text] == []


def test_the_checks_catch_what_they_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B: the `page`\n")
    page = tmp_path / "README.md"
    page.write_text("# A\n[b](docs/b.md#b-the-page) [x](docs/b.md#nope) ![i](img.png) `[c](no.md)`\n")
    assert broken_links(page) == ["docs/b.md#nope: no heading #nope", "img.png: no such file"]
