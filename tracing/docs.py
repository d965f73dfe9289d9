"""README numbers come from code: generated markdown files are spliced into README's marked blocks.

    python benchmarks/weight_stats.py --markdown docs/generated/weight_stats.md   # a script writes a table
    python -m tracing.docs                                                          # README takes it in
    python -m tracing.docs --check                                                  # exit 1 if README is stale
    python -m tracing.examples                      # regenerates the demo, report and launch files, then README

A block in README reads

    <!-- generated: docs/generated/weight_stats.md -->
    ...the file's content, copied here by `python -m tracing.docs`...
    <!-- end generated -->

so nobody retypes a number: whatever a script measured is what README shows.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tracing.errors import TracingError, exit_on_error

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def render(readme: str, root: Path = ROOT) -> str:
    """README text with every generated block replaced by its file's current content."""
    def fill(m: re.Match) -> str:
        path = root / m["path"]
        if not path.is_file():
            raise TracingError(f"README names {m['path']}, which does not exist: run the script that writes it")
        body = path.read_text()
        return m.group(1) + body + ("" if body.endswith("\n") else "\n") + m.group(4)
    return BLOCK.sub(fill, readme)


def stale_blocks(readme: str, root: Path = ROOT) -> list[str]:
    """Paths of the generated blocks whose README copy differs from the file."""
    fresh = {m["path"]: m["body"] for m in BLOCK.finditer(render(readme, root))}
    return [m["path"] for m in BLOCK.finditer(readme) if m["body"] != fresh[m["path"]]]


def write_markdown(path: str | Path, text: str) -> Path:
    """What a script calls to publish a table: the file README embeds (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.docs", description=__doc__.splitlines()[0])
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = p.parse_args(argv)

    def run() -> int:
        path = Path(args.readme)
        text = path.read_text()
        stale = stale_blocks(text, path.parent)
        if args.check:
            for s in stale:
                print(f"stale: {s} (run python -m tracing.docs)", file=sys.stderr)
            return 1 if stale else 0
        path.write_text(render(text, path.parent))
        print(f"updated {len(stale)} block(s) of {path}" + (f": {', '.join(stale)}" if stale else ""))
        return 0

    return exit_on_error(run)


if __name__ == "__main__":
    sys.exit(main())
