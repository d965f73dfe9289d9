"""A PEFT LoRA adapter over a base source: W + scale · B @ A, computed per tensor when it is read.

    src = LoraSource("/ckpt/lora", base_source, adapter_config)
    w = src.get("model.layers.0.mlp.up_proj.weight")   # the merged weight of this one matrix

Nothing is merged ahead: each adapted weight is the base tensor plus its low-rank update, computed as peft's
`merge_and_unload` does (float32 on the CPU: `W + transpose(B @ A) * scaling`, scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA, per-module rank and alpha patterns honoured), so statistics see the same values
bit for bit. Modules the adapter saves whole (`modules_to_save`, saved embedding layers) replace the base's.
Adapters this view does not cover (DoRA, LoRA biases, trainable tokens, other PEFT methods, .bin files)
raise `Unsupported`, and `open_source` merges them through peft instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from tracing.errors import TracingError
from tracing.models import check_loading_info
from tracing.sources.base import Source
from tracing.sources.safetensors_files import open_safetensors

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class Unsupported(Exception):
    """An adapter feature this view does not compute; the caller merges the adapter through peft instead."""


def _unsupported_features(cfg: dict) -> list[str]:
    checks = {"a PEFT method other than LoRA": cfg.get("peft_type", "LORA") != "LORA",
              "DoRA": bool(cfg.get("use_dora")), "LoRA biases": bool(cfg.get("lora_bias")),
              "trainable tokens": bool(cfg.get("trainable_token_indices")),
              "layer replication": bool(cfg.get("layer_replication"))}
    return [what for what, present in checks.items() if present]


class LoraSource(Source):
    """The merged weights of `base` + the LoRA adapter in `adapter_dir`, one tensor at a time."""

    def __init__(self, adapter_dir: str | Path, base: Source, adapter_cfg: dict, name: str | None = None,
                 dtype: torch.dtype | None = None, allow_keys: Sequence[str] = (), notes: list | None = None):
        super().__init__(name or str(adapter_dir), base.config, base.spec, dtype=dtype)
        self.base, self.cfg = base, adapter_cfg
        self.file = Path(adapter_dir) / ADAPTER_FILE
        features = _unsupported_features(adapter_cfg)
        if features:
            raise Unsupported(", ".join(features))
        if not self.file.is_file():
            raise Unsupported(f"no {ADAPTER_FILE}")
        self.lora: dict[str, tuple[str, str, bool]] = {}  # weight key -> (A key, B key, embedding?)
        self.whole: dict[str, str] = {}  # weight key -> adapter-file key of a saved whole module
        with open_safetensors(self.file) as f:
            names = list(f.keys())
        for n in names:
            self._classify(n)
        self._check_complete(Path(adapter_dir), set(names), allow_keys, notes)
        absent = [k for k in [*self.lora, *self.whole] if k not in base.shapes()]
        if absent:
            module = absent[0].rsplit(".", 1)[0]
            raise TracingError(f"adapter {self.name} ({self.file.name}) adapts {module}, which base {base.name} "
                               f"does not have ({len(absent)} such modules): pass the base it was trained on "
                               f"with --adapter_base PATH")
        with open_safetensors(self.file) as f:
            for key, (a_key, b_key, _) in self.lora.items():
                (_, n_in), (n_out, _) = f.get_slice(a_key).get_shape(), f.get_slice(b_key).get_shape()
                want = (n_in, n_out) if self._transposed(key) else (n_out, n_in)
                if tuple(base.shape(key)) != want:
                    raise TracingError(f"adapter {self.name}: its update of {key} is {want} but base {base.name} "
                                       f"has {tuple(base.shape(key))}: pass the base it was trained on with "
                                       f"--adapter_base PATH")

    def _check_complete(self, adapter_dir: Path, names: set[str], allow_keys: Sequence[str],
                        notes: list | None) -> None:
        """Every module the adapter targets (peft's own matching) has both LoRA matrices, as `load_model`
        requires: a missing one would leave that module's update silently out. Allowed ones are left out."""
        from peft import PeftConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        cfg = PeftConfig.from_pretrained(str(adapter_dir))
        missing = []
        for key in self.spec.axes:
            module = key.rsplit(".", 1)[0]
            if not key.endswith(".weight") or key in self.whole or not check_target_module_exists(cfg, module):
                continue
            pair = (".lora_embedding_A", ".lora_embedding_B") if key == self.spec.embed else \
                (".lora_A.weight", ".lora_B.weight")
            missing += [f"{PREFIX}{module}{part}" for part in pair if f"{PREFIX}{module}{part}" not in names]
        check_loading_info(f"adapter {self.name}", {"missing_keys": missing}, allow_keys, notes, "adapter_config.json")
        for m in missing:  # allowed: that module keeps its base weight (nothing random is added)
            self.lora.pop(m.removeprefix(PREFIX).rsplit(".lora_", 1)[0] + ".weight", None)

    def _transposed(self, key: str) -> bool:
        """peft's fan_in_fan_out: embeddings and GPT-2's Conv1D weights store B @ A transposed."""
        return self.lora[key][2] or (self.spec.conv1d and key in self.spec.layer_of)

    def _classify(self, name: str) -> None:
        if not name.startswith(PREFIX):
            raise Unsupported(f"unexpected tensor {name}")
        local = name[len(PREFIX):]
        for a, b, emb in ((".lora_A.weight", ".lora_B.weight", False),
                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if local.endswith(a):
                module = local[: -len(a)]
                self.lora[f"{module}.weight"] = (name, f"{PREFIX}{module}{b}", emb)
                return
            if local.endswith(b):
                return  # paired with its A above
        if local.endswith(".base_layer.weight"):  # an embedding layer saved with the adapter
            self.whole[local.replace(".base_layer.weight", ".weight")] = name
        elif local.endswith((".weight", ".bias")) and ".lora_" not in local:  # modules_to_save
            self.whole[local] = name
        else:
            raise Unsupported(f"adapter tensor {local}")

    # ------------------------------------------------------------------ Source
    def _keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        key = self.alias.get(key, key)
        if key in self.whole:
            with open_safetensors(self.file) as f:
                return tuple(f.get_slice(self.whole[key]).get_shape())
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        key = self.alias.get(key, key)
        return torch.float32 if key in self.lora else self.base.dtype(key)

    def scaling(self, key: str, r: int) -> float:
        """peft's scaling for the module of `key`: lora_alpha / r, or / sqrt(r) with rsLoRA; patterns first."""
        module = key.rsplit(".", 1)[0]
        alpha = self.cfg.get("lora_alpha", 8)
        patterns = self.cfg.get("alpha_pattern") or {}
        if patterns:
            from peft.utils.other import get_pattern_key

            alpha = patterns.get(get_pattern_key(patterns.keys(), module), alpha)
        return alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        if key in self.whole:
            with open_safetensors(self.file) as f:
                t = f.get_tensor(self.whole[key])
            return t if rows is None else t[rows]
        if key not in self.lora:
            return self.base.get(key, rows)
        a_key, b_key, _ = self.lora[key]
        with open_safetensors(self.file) as f:
            lora_a, lora_b = f.get_tensor(a_key).float(), f.get_tensor(b_key).float()  # (r, in), (out, r)
        delta = lora_b @ lora_a  # (out, in); an embedding's is (dim, vocab)
        if self._transposed(key):
            delta = delta.T
        out = self.base.get(key).float() + delta * self.scaling(key, lora_a.shape[0])  # as peft merges it
        return out if rows is None else out[rows]
