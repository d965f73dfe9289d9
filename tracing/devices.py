"""Where a run computes and in which precision: `--device` and `--dtype` resolved once, checked to exist.

    dev = resolve_device("auto")          # cuda if available, else cpu
    dtype = resolve_dtype(None, dev)      # bf16 on GPU (fp16 before Ampere), fp32 on CPU
    model_device(model)                   # where a loaded model's inputs go
    with threads(None): ...               # torch threads and assignment workers = the CPUs we may use
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from tracing import matching
from tracing.errors import TracingError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' (and 'mps') are checked to exist."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TracingError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise TracingError(f"--device {device} asked for a GPU but no CUDA device is visible: "
                               f"use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise TracingError(f"--device {device} does not exist ({n} CUDA device(s) visible): "
                               f"use cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise TracingError(f"--device {device} is not available here: use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise TracingError(f"unsupported device '{device}': use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None/'auto' -> bfloat16 on GPU (float16 on GPUs without bf16, before Ampere), float32 on CPU;
    else one of float32/fp32/float16/fp16/bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise TracingError(f"unknown --dtype '{dtype}': use float32, bfloat16 or float16 "
                           f"(or fp32, bf16, fp16)")
    return _DTYPES[key]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go (the first shard's device under device_map)."""
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else next(model.parameters()).device


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, and inside a Slurm job at most its SLURM_CPUS_PER_TASK
    (Slurm without a task plugin binds nothing, so the mask alone would claim the whole node)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """`--threads` for the duration of a run: torch's intra-op threads and tracing.matching's assignment
    workers. None: usable_cpus() for torch, and matching's own default capped at the same count.
    Yields torch's thread count; torch's count is restored afterwards and matching's default comes back."""
    before = torch.get_num_threads()
    cpus = n or usable_cpus()
    torch.set_num_threads(cpus)
    matching.set_workers(None)
    matching.set_workers(n or min(cpus, matching.default_workers()))
    try:
        yield cpus
    finally:
        torch.set_num_threads(before)
        matching.set_workers(None)
