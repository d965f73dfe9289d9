"""Every file name the project decides: result records, generated texts, figures, default folders.

    result_path("results", "meta-llama/Llama-2-7b-hf", "lmsys/vicuna-7b-v1.5", "csu", "3f2a9c1b")
        # results/meta-llama__Llama-2-7b-hf__vs__lmsys__vicuna-7b-v1.5__csu__3f2a9c1b.pkl
    generated_path("results/generated", "org/model")   # results/generated/org__model_gentext.json
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("results")  # main.py / launch.py --save
GENERATED_DIR = RESULTS_DIR / "generated"  # generate.py --save, main.py --generated_dir
DEMO_DIR = RESULTS_DIR / "demo"  # the demo's models, text and records
AGGREGATE_SUBDIR = "aggregate"  # <results>/aggregate: tables and figures of `python -m tracing.aggregate`
SUBMITIT_SUBDIR = "submitit"  # <save>/submitit: job logs and pickles (not result records)
MANIFEST = "launches.jsonl"  # <save>/launches.jsonl: one line per launch, for --status
RECORD_SUFFIXES = (".p", ".pkl", ".pickle")
CATALOG_INDEX = "index.json"  # <catalogue>/index.json: its schema, settings and models (written last)
CATALOG_LOCK = ".lock"  # <catalogue>/.lock: held while the index is read, changed and written
FINGERPRINTS_SUBDIR = "fingerprints"  # <catalogue>/fingerprints/<content hash>.safetensors


def safe_name(model_id: str, max_len: int = 80) -> str:
    """'meta-llama/Llama-2-7b-hf@main' -> 'meta-llama__Llama-2-7b-hf@main'; anything odd becomes '_'.

    Names that had to be changed or shortened get a short hash suffix so that two ids never collide.
    """
    s = model_id.strip().replace("/", "__")
    clean = re.sub(r"[^A-Za-z0-9._@+-]", "_", s).lstrip(".-")
    if clean != s or len(clean) > max_len:
        digest = hashlib.sha1(model_id.encode()).hexdigest()[:8]
        clean = f"{clean[: max_len - 9]}-{digest}"
    return clean or hashlib.sha1(model_id.encode()).hexdigest()[:8]


def pair_name(base_id: str, ft_id: str, stat: str) -> str:
    """Result file stem for one pair and one statistic."""
    return f"{safe_name(base_id)}__vs__{safe_name(ft_id)}__{safe_name(stat)}"


def result_key(flags: dict[str, Any]) -> str:
    """8 hex digits naming the options that define a result (RunConfig.key_flags(): {} for all defaults)."""
    return hashlib.sha1(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:8]


def result_path(save: str | Path, base_id: str, ft_id: str, stat: str, key: str | None = None) -> Path:
    """`--save` is a directory (file name from the pair, the statistic and `key`, the short hash of the flags
    that change the numbers: RunConfig.result_key) or an explicit .p/.pkl path, used as is."""
    save = Path(save)
    if save.suffix in RECORD_SUFFIXES:
        return save
    return save / f"{pair_name(base_id, ft_id, stat)}{f'__{key}' if key else ''}.pkl"


def failed_path(path: str | Path) -> Path:
    """Where a failed run's record goes when `path` already holds an ok record of the same configuration."""
    path = Path(path)
    return path.with_name(f"{path.stem}.failed{path.suffix}")


def generated_path(generated_dir: str | Path, model_id: str) -> Path:
    """Where generate.py writes (and `--dataset generated` reads) the texts sampled from `model_id`."""
    return Path(generated_dir) / f"{safe_name(model_id)}_gentext.json"


def heatmap_name(base_id: str, ft_id: str, stat: str = "match_all") -> str:
    """A localized test's layer x layer figure: one file per pair and statistic in a shared folder (unnamed
    in-memory models: one per statistic)."""
    return f"{pair_name(base_id, ft_id, stat)}_heatmap.png" if base_id and ft_id else f"{stat}_heatmap.png"


def job_name(base_name: str, ft_name: str) -> str:
    """Slurm job name of one pair."""
    return safe_name(f"{base_name}__vs__{ft_name}", max_len=120)


def fingerprint_file(content_hash: str) -> str:
    """A fingerprint's file in <catalogue>/fingerprints: named by its checkpoint's content hash."""
    if not re.fullmatch(r"[0-9a-f]{64}", content_hash):
        raise ValueError(f"not a sha256 content hash: {content_hash!r}")
    return f"{content_hash}.safetensors"


# merge attribution and family trees (tracing/attribution.py, tracing/trees.py)
ATTRIBUTION_JSON, ATTRIBUTION_PNG = "attribution.json", "attribution.png"
TREE_YAML, TREE_JSON, TREE_PNG = "tree.yaml", "tree.json", "tree.png"  # the lineage-tree YAML aggregate --truth reads
TREES_DIR = RESULTS_DIR / "trees"


def attribution_dir(suspect_id: str) -> Path:
    """Default folder of `python -m tracing.attribution` for one suspect."""
    return RESULTS_DIR / "attribution" / safe_name(suspect_id)
