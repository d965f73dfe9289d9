"""Documentation numbers come from code: generated markdown files are spliced into the marked blocks of README.md
and every page under docs/.

    python benchmarks/weight_stats.py --markdown docs/generated/weight_stats.md   # a script writes a table
    python -m tracing.docs                                                          # the pages take it in
    python -m tracing.docs --check                                                  # exit 1 if a page is stale
    python -m tracing.examples                      # regenerates the demo, report and launch files, then the pages

A block in a page reads

    <!-- generated: docs/generated/weight_stats.md -->
    ...the file's content, copied here by `python -m tracing.docs`...
    <!-- end generated -->

(paths relative to the repository root), so nobody retypes a number: whatever a script measured is what the
pages show.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tracing.errors import TracingError, exit_on_error

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every documentation page (docs/*.md)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, root: Path = ROOT) -> str:
    """A page's text with every generated block replaced by its file's current content."""
    def fill(m: re.Match) -> str:
        path = root / m["path"]
        if not path.is_file():
            raise TracingError(f"a page names {m['path']}, which does not exist: run the script that writes it")
        body = path.read_text()
        return m.group(1) + body + ("" if body.endswith("\n") else "\n") + m.group(4)
    return BLOCK.sub(fill, text)


def stale_blocks(text: str, root: Path = ROOT) -> list[str]:
    """Paths of the generated blocks whose copy in the page differs from the file."""
    fresh = {m["path"]: m["body"] for m in BLOCK.finditer(render(text, root))}
    return [m["path"] for m in BLOCK.finditer(text) if m["body"] != fresh[m["path"]]]


def write_markdown(path: str | Path, text: str) -> Path:
    """What a script calls to publish a table: the file a page embeds (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.docs", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = p.parse_args(argv)

    def run() -> int:
        stale = {page: stale_blocks(page.read_text()) for page in pages()}
        if args.check:
            for page, paths in stale.items():
                for s in paths:
                    print(f"stale: {s} in {page.relative_to(ROOT)} (run python -m tracing.docs)", file=sys.stderr)
            return 1 if any(stale.values()) else 0
        for page, paths in stale.items():
            if paths:
                page.write_text(render(page.read_text()))
                print(f"updated {len(paths)} block(s) of {page.relative_to(ROOT)}: {', '.join(paths)}")
        return 0

    return exit_on_error(run)


if __name__ == "__main__":
    sys.exit(main())
