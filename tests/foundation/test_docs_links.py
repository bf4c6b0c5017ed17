"""Every relative link in README.md and docs/*.md points at a file (and heading) that exists, and
no text addresses the people who built it instead of its readers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
LEFTOVERS = re.compile(r"closing note|not built yet|\(issue: ?\w+\)|LOCAL-STACK\.md", re.IGNORECASE)


def _without_code(text: str) -> str:
    """Markdown without fenced blocks and inline code (links there are not links)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in re.sub(r"```.*?```", "", path.read_text(), flags=re.S).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            out.add(title.replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(_without_code(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part) if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_no_leftover_notes_to_builders() -> None:
    texts = [*DOCS, ROOT / "banditgate" / "cli.py", ROOT / "loadtests" / "registry.py"]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in texts for number, line in enumerate(path.read_text().splitlines(), start=1)
             if LEFTOVERS.search(line)]
    assert not found, "\n".join(found)


def test_stack_environment_is_in_the_readme_and_the_help() -> None:
    """README.md and `banditgate stack --help` name every variable the stack reads."""
    from banditgate.cli import build_parser

    source = "".join((ROOT / "banditgate" / name).read_text() for name in ("stack.py", "jars.py"))
    names = set(re.findall(r"BANDITGATE_[A-Z_]+", source))
    parser = build_parser()
    stack_help = next(action.choices["stack"] for action in parser._subparsers._group_actions).format_help()
    readme = (ROOT / "README.md").read_text()
    assert names, "the stack reads no BANDITGATE_ variable?"
    assert not {n for n in names if n not in readme}, "README.md lacks some"
    assert not {n for n in names if n not in stack_help}, "`banditgate stack --help` lacks some"
