"""Model lists of launch.py: YAML files naming the pairs, the cluster resources and the main.py options.

    lc = load_config("config/demo.yaml")   # pairs, slurm: block, main: block (checked against RunConfig)
    ml = load_models("config/demo.yaml")   # every model the list names, once, with its name (the catalogue)
    read_yaml(Path("config/llama7b_tree.yaml"), "lineage tree")

Plain data, like tracing/config.py: no Slurm, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracing.config import FIELDS, PER_PAIR, coerce
from tracing.errors import TracingError

MODEL_KEYS = {"all": ("models",), "split": ("base_models", "ft_models"),
              "specified": ("models_1", "models_2", "names_1", "names_2")}
SLURM_KEYS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos",
              "constraint", "array_parallelism", "nodes")
TOP_KEYS = ("models", "base_models", "ft_models", "models_1", "models_2", "names_1", "names_2", "slurm", "main")


@dataclass(frozen=True)
class Pair:
    """One job: base and fine-tuned model ids as given in the YAML, plus display names."""

    base: str
    ft: str
    base_name: str
    ft_name: str


@dataclass
class LaunchConfig:
    pairs: list[Pair]
    flat: str
    slurm: dict = field(default_factory=dict)
    main: dict = field(default_factory=dict)  # RunConfig options shared by every pair
    source: str = ""
    duplicates: int = 0


def read_yaml(path: Path, what: str = "config") -> Any:
    """yaml.safe_load of a file; unreadable or malformed YAML is a TracingError naming the file (and line)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TracingError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TracingError(f"malformed YAML in {where}: {problem}; fix the syntax on that line") from None


def _model_list(doc: dict, key: str, path: Path) -> list[str]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise TracingError(f"{path}: '{key}' must be a list of model ids (strings)")
    return [str(v).strip() for v in value]


def infer_flat(doc: Any) -> str:
    """The pairing a YAML document asks for, from its keys: 'all', 'split' or 'specified'."""
    if isinstance(doc, list) or "models" in doc:
        return "all"
    if "base_models" in doc or "ft_models" in doc:
        return "split"
    if "models_1" in doc or "models_2" in doc:
        return "specified"
    return "all"


def _raw_pairs(doc: dict, flat: str, path: Path) -> list[tuple[str, str, str, str]]:
    if flat == "all":
        models = _model_list(doc, "models", path)
        return [(a, b, a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    if flat == "split":
        bases, fts = _model_list(doc, "base_models", path), _model_list(doc, "ft_models", path)
        return [(a, b, a, b) for a in bases for b in fts]
    m1, m2 = _model_list(doc, "models_1", path), _model_list(doc, "models_2", path)
    n1, n2 = _model_list(doc, "names_1", path) or m1, _model_list(doc, "names_2", path) or m2
    if not (len(m1) == len(m2) == len(n1) == len(n2)):
        raise TracingError(f"{path}: models_1, models_2 (and names_1, names_2) must have the same length, "
                           f"got {len(m1)}, {len(m2)}, {len(n1)}, {len(n2)}")
    return list(zip(m1, m2, n1, n2))


def _read_list(path: Path) -> dict:
    """A model-list YAML as a mapping of its known top-level keys (a bare list: its `models:`)."""
    doc = read_yaml(path)
    if doc is None:
        raise TracingError(f"{path} is empty; list models under 'models:' (see config/demo.yaml)")
    if isinstance(doc, list):
        doc = {"models": doc}
    if not isinstance(doc, dict):
        raise TracingError(f"{path}: expected a mapping with 'models:' (or a list of model ids)")
    unknown = sorted(set(map(str, doc)) - set(TOP_KEYS))
    if unknown:
        raise TracingError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    return doc


def load_config(path: str | Path, flat: str | None = None) -> LaunchConfig:
    """Parse and validate a model-list YAML (flat list | base_models x ft_models | models_1/models_2 pairs).

    A bare top-level list (the original tool's format) is a flat list. Duplicate pairs are kept once;
    a pair of a model with itself is dropped. The main: block is checked against RunConfig's fields.
    """
    path = Path(path)
    doc = _read_list(path)
    flat = flat or infer_flat(doc)
    if flat not in MODEL_KEYS:
        raise TracingError(f"--flat must be one of {', '.join(MODEL_KEYS)}, got '{flat}'")
    raw = _raw_pairs(doc, flat, path)
    if any(not m for pair in raw for m in pair[:2]):
        raise TracingError(f"{path}: empty model id in the model list")

    seen, pairs = set(), []
    for base, ft, bn, fn in raw:
        key = frozenset((base, ft)) if flat == "all" else (base, ft)  # flat lists pair models unordered
        if base == ft or key in seen:
            continue
        seen.add(key)
        pairs.append(Pair(base, ft, str(bn), str(fn)))
    if not pairs:
        keys = " / ".join(MODEL_KEYS[flat][:2])
        raise TracingError(f"{path}: no model pairs (flat={flat}); list at least two models under {keys}")

    slurm = doc.get("slurm") or {}
    main = doc.get("main") or {}
    if not isinstance(slurm, dict) or not isinstance(main, dict):
        raise TracingError(f"{path}: 'slurm:' and 'main:' must be mappings of name: value")
    bad = sorted(set(slurm) - set(SLURM_KEYS))
    if bad:
        raise TracingError(f"{path}: unknown slurm key(s) {', '.join(bad)}; valid: {', '.join(SLURM_KEYS)}")
    valid = sorted(set(FIELDS) - set(PER_PAIR))
    bad = sorted(set(map(str, main)) - set(valid))
    if bad:
        raise TracingError(f"{path}: unknown main key(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    for key, value in main.items():  # types now, not on the cluster
        coerce(key, value)
    return LaunchConfig(pairs=pairs, flat=flat, slurm=dict(slurm), main=dict(main), source=str(path),
                        duplicates=len(raw) - len(pairs))


@dataclass
class ModelList:
    """The models of a model-list YAML, each once, in order: (model id, name) pairs, and its slurm: block."""

    models: list[tuple[str, str]]
    slurm: dict = field(default_factory=dict)
    source: str = ""


def load_models(path: str | Path) -> ModelList:
    """Every model a model-list YAML names (any of its forms; names_1 / names_2 name models_1 / models_2), each
    once: what `python -m tracing.catalog add --config` catalogues. Its main: block (launch.py's) is not used."""
    path = Path(path)
    doc = _read_list(path)
    named: list[tuple[str, str]] = []
    for keys in (("models",), ("base_models",), ("ft_models",), ("models_1", "names_1"), ("models_2", "names_2")):
        ids = _model_list(doc, keys[0], path)
        names = _model_list(doc, keys[1], path) if len(keys) > 1 else []
        if names and len(names) != len(ids):
            raise TracingError(f"{path}: {keys[1]} must name each of {keys[0]} ({len(names)} names, {len(ids)} models)")
        named += list(zip(ids, names or ids))
    if any(not m for m, _ in named):
        raise TracingError(f"{path}: empty model id in the model list")
    seen, models = set(), []
    for model, name in named:
        if model not in seen:
            seen.add(model)
            models.append((model, str(name)))
    if not models:
        raise TracingError(f"{path} names no models; list them under 'models:' (see config/demo.yaml)")
    slurm = doc.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise TracingError(f"{path}: 'slurm:' must be a mapping of name: value")
    bad = sorted(set(slurm) - set(SLURM_KEYS))
    if bad:
        raise TracingError(f"{path}: unknown slurm key(s) {', '.join(bad)}; valid: {', '.join(SLURM_KEYS)}")
    return ModelList(models, dict(slurm), str(path))
