"""Every docs/ page the README and the commands' --help texts name exists, and every command's --help names its page."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from abliterate.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOC_REF = re.compile(r"docs/[A-Za-z0-9_./-]+?\.md")


def _missing(text: str) -> list[str]:
    return [ref for ref in DOC_REF.findall(text) if not (ROOT / ref).is_file()]


def test_readme_links_exist_and_every_page_is_linked():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert DOC_REF.findall(text), "the README names no docs/ page"
    assert _missing(text) == []
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages - set(DOC_REF.findall(text)) == set(), "docs pages the README does not link"


def test_links_between_docs_pages_exist():
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links {target}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_help_names_its_existing_page(name):
    module = importlib.import_module(f"abliterate.commands.{name}")
    text = module.build_parser().format_help()
    refs = DOC_REF.findall(text)
    assert f"docs/{name}.md" in refs, f"{name} --help does not name docs/{name}.md"
    assert _missing(text) == []
