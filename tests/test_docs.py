"""README's generated blocks are the files the scripts wrote: no number is retyped by hand."""

from pathlib import Path

import pytest

from tracing.docs import ROOT, render, stale_blocks
from tracing.errors import TracingError


def test_readme_blocks_match_their_generated_files():
    assert stale_blocks((ROOT / "README.md").read_text()) == []


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
