"""The package's layout stays as ARCHITECTURE.md draws it: imports point down only, no cycles, imports at the
top of files (except optional heavy libraries), short modules."""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tracing"

# Lower layers never import higher ones (a layer may import itself: the cycle test keeps that acyclic).
LAYERS = [
    ["errors", "naming", "choices", "solvers", "cosines", "matching", "plots", "zoo", "docs"],  # no model code
    ["config", "model_lists", "results", "result_folder", "devices", "arch", "access", "digests", "checkpoints",
     "lineage", "hub", "describe", "forest"],
    # tensors, models, and the opened pair built from them; experts
    ["perm", "data", "models", "sources", "evaluate", "activations", "grams", "moments", "transforms", "align", "pair",
     "derivations", "moe", "units", "recipes"],  # ... and derivation recipes
    ["statistics", "report", "shares", "attribution", "kinship"],  # what is computed on a pair (or a few models)
    ["pipeline", "aggregate", "generate", "trees"],  # one pair start to finish; offline aggregation; text sampling;
    # family trees of many models
    ["demo", "cluster", "catalog"],  # many pairs; a catalogue of fingerprints (one suspect, many bases)
    ["cli", "launcher", "examples"],  # main.py's and launch.py's flags; README examples from code
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# optional heavy libraries a function may import when it needs them (each costs a second or more to import,
# or is needed by one rare path only)
LAZY_OK = {"matplotlib", "matplotlib.pyplot", "datasets", "pandas", "peft", "peft.utils.other",
           "peft.tuners.tuners_utils", "torch", "gguf", "transformers.modeling_gguf_pytorch_utils",
           "transformers.conversion_mapping", "transformers.core_model_loading",
           "scipy.stats"}  # scipy.stats: Spearman with ties only (0.27 s at start-up otherwise)
MAX_LINES = 320
# Entry points may import the layers below them inside the function that runs: `--help`, flag errors and
# `--dry_run` must not pay for torch (start-up time).
LAZY_ENTRY = {"tracing.cli"}


@functools.cache
def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracing"):
            found |= {f"tracing.{a.name}" for a in node.names if a.name != "__version__"} \
                if node.module == "tracing" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tracing")}
    return found


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_module_has_a_layer():
    assert {_top(m) for m in _modules() if m != "tracing"} == set(RANK)


def test_imports_point_down_only():
    upward = []
    for module, tree in _modules().items():
        if module == "tracing":
            continue
        for imported in _imports(tree):
            if RANK[_top(imported)] > RANK[_top(module)]:
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_no_import_cycles():
    graph = {m: {i for i in _imports(t) if i in _modules()} - {m} for m, t in _modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_imports_sit_at_the_top_of_files():
    hidden = []
    for module, tree in _modules().items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                hidden += [f"{module}.{fn.name} imports {n}" for n in names
                           if n not in LAZY_OK and not (module in LAZY_ENTRY and n.startswith("tracing."))]
    assert not hidden, hidden


def test_modules_stay_short():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
