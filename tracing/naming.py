"""File-system-safe names derived from model ids (used for result files, job names, generated texts)."""

from __future__ import annotations

import hashlib
import re


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
