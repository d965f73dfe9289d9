"""Safetensors checkpoints, single file or sharded (`model.safetensors.index.json`), read one tensor at a time.

    src = SafetensorsSource("/ckpt/llama", config)     # a save_pretrained directory
    w = src.get("model.layers.0.mlp.up_proj.weight")   # (11008, 4096) bf16, only these bytes are read

Headers are read once when the source opens (keys, shapes, dtypes; every shard checked to exist and to be
complete). Each `get` opens the shard with `safe_open`, which memory-maps it, copies the tensor's bytes out
and closes it again: a process that reads a 13 GB model one matrix at a time holds one matrix, not the
file's pages (a mapping kept open would keep every page it touched resident).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tracing.checkpoints import INDEX, REFETCH, weight_files
from tracing.errors import TracingError
from tracing.sources.base import Source, check_checkpoint
from tracing.sources.renaming import key_map

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def open_safetensors(path: Path):
    """safe_open(path), or a TracingError naming the file (truncated or corrupt) and the fix."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise TracingError(f"{path}: a weight file is truncated or corrupt ({str(e).splitlines()[0]}): "
                           f"{REFETCH}") from None


class SafetensorsSource(Source):
    """Lazy tensors of a safetensors checkpoint directory (`files` overrides which files are read).

    Keys are the model's (checkpoint names renamed as `from_pretrained` does, see `renaming`)."""

    def __init__(self, directory: str | Path, config: Any, name: str | None = None,
                 dtype: torch.dtype | None = None, files: list[Path] | None = None,
                 allow_keys: Sequence[str] = (), notes: list | None = None):
        super().__init__(name or str(directory), config, dtype=dtype)
        weight_map = None
        if files is None:
            files, weight_map = weight_files(directory)
        stored: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}  # checkpoint key -> file, shape, dtype
        for path in files:
            with open_safetensors(path) as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    dt = _DTYPES.get(s.get_dtype())
                    if dt is None:
                        raise TracingError(f"{path}: tensor {key} has dtype {s.get_dtype()}, which torch cannot "
                                           f"read here: convert the checkpoint to bf16/fp16/fp32")
                    stored[key] = (path, tuple(s.get_shape()), dt)
        if weight_map is not None:
            stray = [k for k, fname in weight_map.items() if k not in stored or stored[k][0].name != fname]
            if stray:
                raise TracingError(f"{Path(directory) / INDEX} puts {stray[0]} in {weight_map[stray[0]]}, "
                                   f"which does not hold it: {REFETCH}")
        names = key_map(config, self.spec, list(stored))  # model key -> checkpoint key
        self._stored = {model_key: (key, *stored[key]) for model_key, key in names.items()}
        unexpected = sorted(set(stored) - set(names.values()))
        check_checkpoint(self.name, self.spec, config, {k: v[2] for k, v in self._stored.items()}, unexpected,
                         allow_keys, notes)
        self._present = [k for k in self.spec.axes if k in self._stored or k in self.alias]

    def _keys(self) -> list[str]:
        return self._present

    def shape(self, key: str) -> tuple[int, ...]:
        return self._stored[self.alias.get(key, key)][2]

    def dtype(self, key: str) -> torch.dtype:
        return self._stored[self.alias.get(key, key)][3]

    def file_of(self, key: str) -> Path:
        return self._stored[self.alias.get(key, key)][1]

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        stored_as, path = self._stored[key][:2]
        with open_safetensors(path) as f:  # reopened per tensor: see the module docstring
            t = f.get_tensor(stored_as) if rows is None else f.get_slice(stored_as)[rows]
            # a view of the file mapping would be read page by page wherever it is first touched: read it here,
            # in the caller's thread, into memory of its own (so read_s is the reading and mapped pages go at once)
            return t.clone()
