"""The docs a clone has: every relative link in README.md and docs/*.md points inside the repository,
at a file or directory that exists (README once linked ../shared/docs/topd-method.md, which a clone
does not have)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
# [text](target) and ![alt](target), target up to a space or ")"; reference definitions "[x]: target".
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def strip_code(markdown: str) -> str:
    """The text outside fenced code blocks and inline code (links there are examples, not links)."""
    without_fences = re.sub(r"^(```|~~~).*?^\1", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", without_fences)


def relative_links(markdown: str) -> list[str]:
    text = strip_code(markdown)
    targets = INLINE.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not EXTERNAL.match(t) and not t.startswith("#")]


def test_finds_links_and_skips_code_and_urls():
    sample = ("See [a](docs/a.md), ![img](results.png \"title\") and [b][1], [web](https://x.org/y), "
              "[top](#usage), `[not](code.md)`.\n\n```\n[nor](fenced.md)\n```\n[1]: ../outside.md\n")
    assert relative_links(sample) == ["docs/a.md", "results.png", "../outside.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    broken = []
    for target in relative_links(doc.read_text()):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_readme_links_the_method():
    assert "docs/method.md" in relative_links((ROOT / "README.md").read_text())
