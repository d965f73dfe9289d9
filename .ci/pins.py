"""Print constraints.txt: the exact versions installed here of everything requirements*.txt pull in.

    python .ci/pins.py > constraints.txt      # after an upgrade; then rerun the suite and the examples
"""

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def roots() -> list[str]:
    lines = [ln.split("#")[0].strip() for f in ("requirements.txt", "requirements-dev.txt")
             for ln in (ROOT / f).read_text().splitlines()]
    return [Requirement(ln).name for ln in lines if ln and not ln.startswith("-")]


def closure() -> dict[str, str]:
    """name -> installed version (local labels such as +cpu dropped) of the requirements and their dependencies."""
    seen: dict[str, str] = {}
    stack = roots()
    while stack:
        name = stack.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version.split("+")[0]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    seen.pop("setuptools", None)  # pip's own build tool: left to pip
    return seen


if __name__ == "__main__":
    print("# The library versions the test suite and README's numbers were produced with "
          "(pip install -c constraints.txt).")
    print("# Regenerate after an upgrade: python .ci/pins.py > constraints.txt, then rerun the suite and the examples.")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")
