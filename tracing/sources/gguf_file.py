"""GGUF files, memory-mapped with the `gguf` package's reader and dequantized one tensor at a time.

    src = GGUFSource("/ckpt/model.Q8_0.gguf", config)   # config: AutoConfig.from_pretrained(dir, gguf_file=...)
    w = src.get("model.layers.0.mlp.up_proj.weight")    # float32, named and laid out as transformers loads it

Names and layouts are transformers' own (`transformers.modeling_gguf_pytorch_utils`): the GGUF -> HF name map
of the architecture and its tensor processor (e.g. Llama's q/k rows un-interleaved, GPT-2's Conv1D weights
transposed), so ArchSpec keys and values are those of `from_pretrained(..., gguf_file=...)`. Every tensor type
is checked when the file opens: one gguf-py cannot dequantize is an error naming the tensor.

MoE experts (Qwen2/3-MoE): llama.cpp stores one (experts, ...) tensor per projection (`ffn_gate_exps`, `ffn_up_exps`,
`ffn_down_exps`); transformers' processor fuses gate and up into `gate_up_proj`. A model key may so come from
several GGUF tensors, and rows of a stacked key (experts) are cut from the file before dequantizing: one expert's
read dequantizes that expert only.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracing.errors import TracingError
from tracing.models import gguf_name_maps_cached
from tracing.sources.base import Source, check_checkpoint
from tracing.sources.renaming import skeleton

_REFETCH = "download or convert the GGUF file again"


class GGUFSource(Source):
    """Lazy, dequantized tensors of one .gguf file."""

    def __init__(self, path: str | Path, config: Any, name: str | None = None, dtype: torch.dtype | None = None,
                 allow_keys: Sequence[str] = (), notes: list | None = None):
        import gguf
        import transformers.modeling_gguf_pytorch_utils as tf_gguf

        super().__init__(name or str(path), config, dtype=dtype)
        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
            parsed = tf_gguf.load_gguf_checkpoint(str(self.path), return_tensors=False)
        except (ValueError, OSError, IndexError) as e:
            raise TracingError(f"{self.path} is not a readable GGUF file ({str(e).splitlines()[0][:120]}): "
                               f"{_REFETCH}") from None
        arch = tf_gguf.read_field(self._reader, "general.architecture")[0]
        self._processor = tf_gguf.TENSOR_PROCESSORS.get(arch, tf_gguf.TensorProcessor)(config=parsed["config"])
        model = skeleton(config)
        with gguf_name_maps_cached():
            to_hf = tf_gguf.get_gguf_hf_weights_map(model, self._processor)
        to_hf.setdefault("output.weight", "lm_head.weight")  # GPT-2's processor renames it itself
        self._to_hf = to_hf
        self._tensors: dict[str, list[Any]] = {}  # HF key -> its gguf ReaderTensors (MoE gate and up: two)
        for t in self._reader.tensors:
            key = to_hf.get(t.name) or to_hf.get(t.name.removesuffix(".weight"))  # stacked experts: no suffix
            if key is None:
                continue
            if not _dequantizable(t.tensor_type):
                raise TracingError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot "
                                   f"dequantize: convert the file to F16, BF16, Q8_0 or a K-quant with llama.cpp, "
                                   f"or pass the original checkpoint")
            self._tensors.setdefault(key, []).append(t)
        # shapes as the model has them (a processor may transpose or reshape what the file stores)
        self._model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in self._tensors}
        sizes = {k: sum(math.prod(map(int, t.shape)) for t in ts) for k, ts in self._tensors.items()}
        wrong = [k for k in self._tensors if math.prod(self._model_shapes[k]) != sizes[k]]
        if wrong:
            raise TracingError(f"{self.path}: tensor {self._tensors[wrong[0]][0].name} holds "
                               f"{sizes[wrong[0]]} values where the model's "
                               f"{wrong[0]} has {math.prod(self._model_shapes[wrong[0]])}: {_REFETCH}")
        check_checkpoint(self.name, self.spec, config, self._model_shapes, [], allow_keys, notes)
        self._present = [k for k in self.spec.axes if k in self._tensors or k in self.alias]

    def _keys(self) -> list[str]:
        return self._present

    def shape(self, key: str) -> tuple[int, ...]:
        return self._model_shapes[self.alias.get(key, key)]

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32  # dequantized

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        import gguf

        first = self.spec.axes[key][0]
        experts = rows is not None and first is not None and first.startswith("experts.")  # cut in the file
        scratch: dict = {"tensors": {}}  # where a processor puts a tensor it renames or fuses (GPT-2, MoE experts)
        for t in self._tensors[key]:  # MoE gate and up fill their halves of one tensor in scratch
            weights = gguf.dequantize(t.data[rows] if experts else t.data, t.tensor_type)  # float32
            out = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._to_hf,
                                          parsed_parameters=scratch)
        weights = out.weights if out.name is not None else next(iter(scratch["tensors"].values())).numpy()
        tensor = torch.from_numpy(np.array(weights, dtype=np.float32, copy=True))  # off the file mapping
        shape = self._model_shapes[key]
        tensor = tensor.reshape((len(range(shape[0])[rows]), *shape[1:]) if experts else shape)
        self._release()
        return tensor if rows is None or experts else tensor[rows]

    def _release(self) -> None:
        """Drop the file pages just read from this process's resident set (the page cache keeps them)."""
        m = getattr(self._reader.data, "_mmap", None)
        if m is not None and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)


def _dequantizable(qtype) -> bool:
    """Whether gguf-py's `dequantize` handles `qtype` (F32, F16 and every type with quantization traits)."""
    from gguf import GGMLQuantizationType, quants

    traits = getattr(quants, "_type_traits", None)
    if traits is None:  # another gguf version: let dequantize decide when the tensor is read
        return True
    return qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or qtype in traits
