"""Typed options: `RunConfig`, the options of one run of main.py (launch.py's YAML lists: tracing/model_lists.py).

    cfg = RunConfig(base_model_id="A", ft_model_id="B", stat="csu", align=True)
    cfg = RunConfig.from_dict({"base_model_id": "A", "ft_model_id": "B", "alphas": "0,0.5,1"}, "main:")
    cfg.command_line()     # 'python main.py --base_model_id A --ft_model_id B --stat csu --align'

Plain data: no argparse, no Slurm, no torch. The Hugging Face token is never part of a RunConfig;
it comes from $HF_TOKEN (or main.py's --token) and goes straight to the model loader.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracing import naming
from tracing.choices import DEFAULT_METHOD, check_method
from tracing.errors import TracingError
from tracing.naming import GENERATED_DIR, RESULTS_DIR

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_alphas(text: str) -> tuple[float, ...]:
    """'0,0.25,1' -> (0.0, 0.25, 1.0); no number at all (',') is an error, never a silent default."""
    try:
        out = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise TracingError(f"--alphas takes comma-separated numbers, got '{text}'") from None
    if not out:
        raise TracingError(f"--alphas '{text}' holds no number: give values in [0, 1], e.g. 0,0.5,1")
    return out


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,2,5-7' -> (0, 2, 5, 6, 7); an empty range ('2-0') or no index at all (',') is an error."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise TracingError(f"--layers range '{part.strip()}' is empty: write the lower index first "
                                       f"({hi}-{lo})")
                out.extend(range(lo, hi + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise TracingError(f"--layers takes indices like '0,2,5-7', got '{text}'") from None
    if not out:
        raise TracingError(f"--layers '{text}' names no layer: give indices like '0,2,5-7' (or leave it out)")
    return tuple(out)


def parse_bytes(text: str | int) -> int:
    """'8GiB' -> 8589934592, '500MB' -> 500000000, '2e9' -> 2000000000 (bytes; units B, kB/MB/GB/TB,
    KiB/MiB/GiB/TiB, case-insensitive)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m[2] not in _UNITS or float(m[1]) * _UNITS[m[2]] < 1:
        raise TracingError(f"--memory_budget takes a positive size like 8GiB, 500MB or 2e9 (bytes), got '{text}'")
    return int(float(m[1]) * _UNITS[m[2]])


def parse_keys(text: str) -> tuple[str, ...]:
    """'lm_head.weight,*.inv_freq' -> ('lm_head.weight', '*.inv_freq'): weight names or glob patterns."""
    out = tuple(x.strip() for x in str(text).split(",") if x.strip())
    if not out:
        raise TracingError(f"--allow_keys '{text}' names no weight: give names or glob patterns, e.g. lm_head.weight")
    return out


@dataclass(frozen=True)
class RunConfig:
    """The options of one run of main.py (the flags of the same names), checked on construction."""

    base_model_id: str = ""  # required: checked with the other options
    ft_model_id: str = ""
    # models
    adapter_base: str | None = None  # base of a PEFT adapter whose recorded base is unreachable
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bf16 on GPU, on CPU as stored if bf16, else fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    device_map: str | None = None  # "auto": shard over all GPUs (accelerate)
    trust_remote_code: bool = False
    allow_keys: tuple[str, ...] | None = None  # weights that may be missing from / unexpected in a checkpoint
    # statistic
    stat: str = "auto"
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
    matching: str = DEFAULT_METHOD  # neuron matching: fast | exact (tracing/matching.py)
    memory_budget: int | None = None  # bytes for activation accumulators; None: from free device memory / RAM
    # data
    dataset: str | None = None  # None: the statistic's default (WikiText-103; random token blocks for auto)
    block_size: int | None = None  # None: 512, shortened to the shorter context of the two models
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
    threads: int | None = None  # torch threads and assignment workers; None: the CPUs this process may use

    def __post_init__(self) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, coerce(name, getattr(self, name)))
        self._check()

    def _check(self) -> None:
        if not self.base_model_id or not self.ft_model_id:
            raise TracingError("both --base_model_id and --ft_model_id are required (or run --demo)")
        for a in (self.alpha, *(self.alphas or ())):
            if not 0.0 <= a <= 1.0:
                raise TracingError(f"--alpha/--alphas must lie in [0, 1], got {a}")
        if self.num_perm < 0:
            raise TracingError(f"--num_perm must be >= 0, got {self.num_perm}")
        if (self.block_size is not None and self.block_size < 1) or self.batch_size < 1:
            raise TracingError("--block_size and --batch_size must be positive")
        check_method(self.matching)
        if self.threads is not None and self.threads < 1:
            raise TracingError(f"--threads must be >= 1, got {self.threads}")
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

    def key_flags(self) -> dict[str, Any]:
        """The options that define this run's numbers beyond pair and statistic: fields off their default,
        except NOT_IN_KEY. Their hash, result_key(), names the record file; the record stores both."""
        skip = {*NOT_IN_KEY, "base_model_id", "ft_model_id", "stat"}
        return {k: v for k, v in self.to_dict().items() if k not in skip and v != FIELDS[k].default}

    def result_key(self) -> str:
        return naming.result_key(self.key_flags())

    def result_path(self) -> Path:
        return naming.result_path(self.save, self.base_model_id, self.ft_model_id, self.stat, self.result_key())

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
# Fields that never change a result's numbers (runs differing only in them share one record file): where it
# is written, progress bars, CPU threads, permission to run shipped code, GPU sharding, accumulator memory.
NOT_IN_KEY = ("save", "no_progress", "threads", "trust_remote_code", "device_map", "memory_budget")
_KIND = {name: f.type.split(" |")[0] for name, f in FIELDS.items()}  # "bool", "int", "float", "str", "tuple[..]"
PER_PAIR = ("base_model_id", "ft_model_id", "save")  # set by launch.py for each pair, never in a YAML main:
_PARSERS = {"alphas": parse_alphas, "layers": parse_layers, "allow_keys": parse_keys, "memory_budget": parse_bytes}


def coerce(name: str, value: Any) -> Any:
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
