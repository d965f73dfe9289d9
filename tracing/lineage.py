"""Lineage trees (config/llama7b_tree.yaml): which models are derived from which, as ground truth.

A tree YAML is a list of roots; each item is a model id (a leaf) or a one-key mapping
`parent: [children...]`. Two models are related when one is an ancestor of the other or both share an
ancestor, i.e. when they lie in the same tree; models in different trees are independent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracing.errors import TracingError
from tracing.model_lists import read_yaml


def _walk(items: Any, root: str | None, out: dict[str, str], path: Path) -> None:
    if not isinstance(items, list):
        raise TracingError(f"{path}: children must be a list of model ids or 'parent: [children]' items")
    for item in items:
        if isinstance(item, dict):
            if len(item) != 1:
                raise TracingError(f"{path}: each item is one model id or one 'parent: [children]' mapping, "
                                   f"got {sorted(item)}")
            ((name, children),) = item.items()
            _add(str(name), root, out, path)
            _walk(children or [], root or str(name), out, path)
        elif isinstance(item, (str, int, float)):
            _add(str(item), root, out, path)
        else:
            raise TracingError(f"{path}: unexpected {type(item).__name__} in the tree")


def _add(name: str, root: str | None, out: dict[str, str], path: Path) -> None:
    if name in out:
        raise TracingError(f"{path}: model '{name}' appears twice in the lineage tree")
    out[name] = root or name


def load_tree(path: str | Path) -> dict[str, str]:
    """{model id: id of its tree's root} for every model in the tree YAML."""
    path = Path(path)
    doc = read_yaml(path, "lineage tree")
    roots: dict[str, str] = {}
    _walk(doc or [], None, roots, path)
    if not roots:
        raise TracingError(f"{path}: the lineage tree is empty")
    return roots


def related(roots: dict[str, str], a: str, b: str) -> bool | None:
    """True if a and b share a tree, False if not, None if either model is not in the tree."""
    if a not in roots or b not in roots:
        return None
    return roots[a] == roots[b]
