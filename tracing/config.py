"""Typed options: `RunConfig` for one run of main.py, and the YAML model lists of launch.py.

    cfg = RunConfig(base_model_id="A", ft_model_id="B", stat="csu", align=True)
    cfg = RunConfig.from_dict({"base_model_id": "A", "ft_model_id": "B", "alphas": "0,0.5,1"}, "main:")
    cfg.command_line()     # 'python main.py --base_model_id A --ft_model_id B --stat csu --align'
    lc = load_config("config/demo.yaml")   # pairs, slurm: block, main: block (checked against RunConfig)

Both are plain data: no argparse, no Slurm, no torch. The Hugging Face token is never part of a RunConfig;
it comes from $HF_TOKEN (or main.py's --token) and goes straight to the model loader.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracing import matching
from tracing.errors import TracingError
from tracing.naming import GENERATED_DIR, RESULTS_DIR

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_alphas(text: str) -> tuple[float, ...]:
    """'0,0.25,1' -> (0.0, 0.25, 1.0)."""
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise TracingError(f"--alphas takes comma-separated numbers, got '{text}'") from None


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,2,5-7' -> (0, 2, 5, 6, 7)."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise TracingError(f"--layers takes indices like '0,2,5-7', got '{text}'") from None
    return tuple(out)


def parse_bytes(text: str | int) -> int:
    """'8GiB' -> 8589934592, '500MB' -> 500000000, '2e9' -> 2000000000 (bytes; units B, kB/MB/GB/TB,
    KiB/MiB/GiB/TiB, case-insensitive)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m[2] not in _UNITS or float(m[1]) * _UNITS[m[2]] < 1:
        raise TracingError(f"--memory_budget takes a positive size like 8GiB, 500MB or 2e9 (bytes), got '{text}'")
    return int(float(m[1]) * _UNITS[m[2]])


@dataclass(frozen=True)
class RunConfig:
    """The options of one run of main.py (the flags of the same names), checked on construction."""

    base_model_id: str = ""  # required: checked with the other options
    ft_model_id: str = ""
    # models
    adapter_base: str | None = None  # base of a PEFT adapter whose recorded base is unreachable
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    device_map: str | None = None  # "auto": shard over all GPUs (accelerate)
    trust_remote_code: bool = False
    # statistic
    stat: str = "csu"
    permute: bool = False  # randomly permute ft's hidden units first
    rotate: bool = False  # randomly rotate ft's residual stream first
    align: bool = False  # also compute the statistic after aligning ft to base
    num_perm: int = 0  # PERMTEST with this many permutations
    alpha: float = 0.5  # mode: interpolation weight of ft
    alphas: tuple[float, ...] | None = None  # mode: a curve
    attn: bool = False  # mode: also interpolate attention
    emb: bool = False  # mode: also interpolate embeddings
    layers: tuple[int, ...] | None = None  # restrict per-layer statistics
    max_tokens: int | None = None  # activation statistics: token sample per layer
    matching: str = matching.DEFAULT_METHOD  # neuron matching: fast | exact (tracing/matching.py)
    memory_budget: int | None = None  # bytes for activation accumulators; None: from free device memory / RAM
    # data
    dataset: str = "wikitext"
    block_size: int = 512
    batch_size: int = 1
    max_blocks: int | None = None
    generated_dir: str = str(GENERATED_DIR)
    eval: bool = False  # base and ft loss and perplexity
    # fine-tuning diff report
    report: str | None = None  # output folder of report.md
    prompts: str | None = None
    report_token: str | None = None
    compare: str | None = None  # "foo=Paris"
    targets: str | None = None  # "English,French"
    top_k: int = 5
    # output
    save: str = str(RESULTS_DIR)  # folder, or an explicit .p/.pkl path
    seed: int = 0
    no_progress: bool = False

    def __post_init__(self) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, _coerce(name, getattr(self, name)))
        self._check()

    def _check(self) -> None:
        if not self.base_model_id or not self.ft_model_id:
            raise TracingError("both --base_model_id and --ft_model_id are required (or run --demo)")
        for a in (self.alpha, *(self.alphas or ())):
            if not 0.0 <= a <= 1.0:
                raise TracingError(f"--alpha/--alphas must lie in [0, 1], got {a}")
        if self.num_perm < 0:
            raise TracingError(f"--num_perm must be >= 0, got {self.num_perm}")
        if self.block_size < 1 or self.batch_size < 1:
            raise TracingError("--block_size and --batch_size must be positive")
        matching.check_method(self.matching)
        if self.compare and "=" not in self.compare:
            raise TracingError(f"--compare takes 'word=other', got '{self.compare}'")

    @classmethod
    def from_dict(cls, options: dict[str, Any], where: str = "options") -> RunConfig:
        """A RunConfig from flag names -> values (YAML, parsed flags); unknown names list the valid ones."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TracingError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(FIELDS))}")
        return cls(**options)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Flag name -> value, plain data (tuples as lists): what a record stores under "args"."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in vars(self).items()}

    def command_line(self) -> str:
        """The main.py command that repeats this run (flags at their default are left out)."""
        argv = ["python", "main.py"]
        for name, f in FIELDS.items():
            value = getattr(self, name)
            if name != "stat" and f.default is not dataclasses.MISSING and value == f.default:
                continue
            if isinstance(value, bool):
                argv.append(f"--{name}")
            else:
                argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
        return shlex.join(argv)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}
_KIND = {name: f.type.split(" |")[0] for name, f in FIELDS.items()}  # "bool", "int", "float", "str", "tuple[..]"
_PARSERS = {"alphas": parse_alphas, "layers": parse_layers, "memory_budget": parse_bytes}


def _coerce(name: str, value: Any) -> Any:
    """A value from YAML or the command line as the field's type; a one-line TracingError otherwise."""
    kind = _KIND[name]
    if value is None:
        if FIELDS[name].default is None:
            return None
        raise TracingError(f"--{name} needs a value")
    if name in _PARSERS:
        return _PARSERS[name](",".join(map(str, value)) if isinstance(value, (list, tuple)) else value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise TracingError(f"--{name} is a switch: give true or false, got {value!r}")
    if not isinstance(value, bool):  # a switch value where a number or a string belongs is a mistake
        if kind == "int" and (isinstance(value, int) or re.fullmatch(r"\s*-?\d+\s*", str(value))):
            return int(value)
        if kind == "float" and isinstance(value, (int, float, str)):
            try:
                return float(value)
            except ValueError:
                pass
        if kind == "str" and isinstance(value, (str, int, float)):
            return str(value)
    what = {"int": "an integer", "float": "a number"}.get(kind, "a string")
    raise TracingError(f"--{name} must be {what}, got {value!r}")


# ---------------------------------------------------------------------------------------- YAML model lists

MODEL_KEYS = {"all": ("models",), "split": ("base_models", "ft_models"),
              "specified": ("models_1", "models_2", "names_1", "names_2")}
SLURM_KEYS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos",
              "constraint", "array_parallelism", "nodes")
TOP_KEYS = ("models", "base_models", "ft_models", "models_1", "models_2", "names_1", "names_2", "slurm", "main")
PER_PAIR = ("base_model_id", "ft_model_id", "save")  # set by launch.py for each pair, never in main:


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


def load_config(path: str | Path, flat: str | None = None) -> LaunchConfig:
    """Parse and validate a model-list YAML (flat list | base_models x ft_models | models_1/models_2 pairs).

    A bare top-level list (the original tool's format) is a flat list. Duplicate pairs are kept once;
    a pair of a model with itself is dropped. The main: block is checked against RunConfig's fields.
    """
    path = Path(path)
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
        _coerce(key, value)
    return LaunchConfig(pairs=pairs, flat=flat, slurm=dict(slurm), main=dict(main), source=str(path),
                        duplicates=len(raw) - len(pairs))
