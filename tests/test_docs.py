"""The generated blocks of README and docs/*.md are the files the scripts wrote: no number is retyped by hand."""

import re
from pathlib import Path

import pytest

from tracing.docs import ROOT, pages, render, stale_blocks
from tracing.errors import TracingError


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_page_blocks_match_their_generated_files(page: Path):
    assert stale_blocks(page.read_text()) == []


def test_readme_is_a_front_page_linking_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in pages()[1:]:
        assert f"(docs/{page.name})" in readme, f"README's Documentation table does not link docs/{page.name}"


def test_relative_links_between_pages_resolve():
    for page in pages():
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_render_replaces_a_block_with_its_file(tmp_path: Path):
    (tmp_path / "t.md").write_text("| a | 1 |\n")
    readme = "intro\n<!-- generated: t.md -->\nold numbers\n<!-- end generated -->\nrest\n"
    assert stale_blocks(readme, tmp_path) == ["t.md"]
    fresh = render(readme, tmp_path)
    assert fresh == "intro\n<!-- generated: t.md -->\n| a | 1 |\n<!-- end generated -->\nrest\n"
    assert stale_blocks(fresh, tmp_path) == []


def test_a_block_naming_a_missing_file_says_which():
    with pytest.raises(TracingError, match="nothing.md, which does not exist"):
        render("<!-- generated: nothing.md -->\n<!-- end generated -->\n", ROOT)
