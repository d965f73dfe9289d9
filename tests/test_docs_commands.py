"""Every command in README.md and docs/*.md runs as written on the demo models: the test extracts each command of
their ```bash blocks and runs it in a folder holding the demo models (results/demo/) and the repository's entry
points, as a user who has run `python main.py --demo` would. Commands for hub-sized models sit in ```text
blocks, which are not run; `pip install` and the test command itself are the quick start's and are not run here."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tracing.demo import ensure_demo_models
from tracing.docs import ROOT, pages
from tracing.examples import table_of

FENCE = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
NOT_RUN = ("pip ", "python -m pytest", "git ")  # installing, and the test command that runs this test


def commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block (continuations joined)."""
    out = []
    for page in pages():
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line and not line.startswith("#") and not line.startswith(NOT_RUN):
                    out.append((page.name, line))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder like a user's checkout after `python main.py --demo`: entry points, config/, docs/, tracing/ and
    results/demo/ with the demo models."""
    root = tmp_path_factory.mktemp("user")
    for name in ("main.py", "launch.py", "generate.py", "config", "docs", "tracing"):
        os.symlink(ROOT / name, root / name)
    ensure_demo_models(root / "results" / "demo", progress=False)
    return root


def test_the_pages_hold_commands():
    found = commands()
    assert len({page for page, _ in found}) >= 4 and len(found) >= 12


@pytest.mark.parametrize("page, command", commands(), ids=lambda x: x[:60] if isinstance(x, str) else x)
def test_every_documented_command_runs(workdir, page, command):
    proc = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page}: `{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    if command.strip() == "python main.py --demo":  # outside pytest, a fresh process prints README's table
        readme = (ROOT / "README.md").read_text()
        assert table_of(proc.stdout) in readme, proc.stdout[-3000:]
