"""A fresh install is the one the suite ran with: pinned libraries, a version in every record, a light start-up."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import tracing
from tracing.config import RunConfig
from tracing.results import new_record

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(ln.split("==") for ln in lines if ln and not ln.startswith("#"))


def test_installed_libraries_are_the_pinned_ones():
    """README's numbers were produced with constraints.txt; another release of torch or transformers trains other
    demo models (python .ci/pins.py regenerates the file after a deliberate upgrade)."""
    off = {}
    for name, want in _pins().items():
        try:
            have = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            off[name] = f"{have} installed, {want} pinned"
    assert not off, f"pip install -c constraints.txt -e '.[dev]' installs the pinned versions: {off}"


def test_a_record_names_the_code_version_and_commit():
    record = new_record(RunConfig(base_model_id="a", ft_model_id="b").to_dict())
    assert record["versions"]["model-tracing"] == tracing.__version__
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert set(record["git"]) == {"commit", "dirty"}


def test_help_and_flag_errors_import_no_torch():
    """main.py --help and a bad flag answer at once: torch (~1 s to import) is loaded when a run starts."""
    code = ("import sys; from tracing.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout[-300:]


@pytest.mark.parametrize("argv", [["--version"]])
def test_the_version_flag_prints_the_package_version(argv):
    out = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"model-tracing {tracing.__version__}"
