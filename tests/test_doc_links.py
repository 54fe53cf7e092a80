"""Every relative link of README.md, deploy/README.md and docs/*.md resolves: the file exists,
and a ``#fragment`` names a heading of the Markdown file it points into."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [REPOSITORY / "README.md", REPOSITORY / "deploy" / "README.md", *REPOSITORY.glob("docs/*.md")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#+\s+(.*?)\s*$", re.MULTILINE)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def relative_links(document: Path) -> list[str]:
    text = FENCE.sub("", document.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_documents_have_links_to_check() -> None:
    assert REPOSITORY / "docs" / "your-own-logs.md" in DOCUMENTS
    assert len(relative_links(REPOSITORY / "README.md")) >= 7


@pytest.mark.parametrize(
    "document", DOCUMENTS, ids=[str(d.relative_to(REPOSITORY)) for d in DOCUMENTS]
)
def test_every_relative_link_resolves(document: Path) -> None:
    broken = []
    for target in relative_links(document):
        file, _, fragment = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(f"{target}: no {path.relative_to(REPOSITORY.parent)}")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target}: no heading #{fragment} in {path.name}")
    assert not broken, f"{document.relative_to(REPOSITORY)}: " + "; ".join(broken)
