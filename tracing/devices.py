"""Where a run computes and in which precision: `--device` and `--dtype` resolved once, checked to exist;
and how much memory it took.

    dev = resolve_device("auto")          # cuda if available, else cpu
    dtype = resolve_dtype(None, dev, stored=(torch.bfloat16,) * 2)   # bf16 on GPU (fp16 before Ampere);
                                         # on a CPU bf16 if both checkpoints are stored so, else fp32
    model_device(model)                   # where a loaded model's inputs go
    with threads(None): ...               # torch threads and assignment workers = the CPUs we may use
    return_freed_memory(); reset_peak_memory(); ...; rss_mib, gpu_mib = peak_memory_mib()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator

import torch

from tracing import matching
from tracing.cosines import cpu_has_bf16
from tracing.errors import TracingError

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

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


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device,
                  stored: Iterable[str | torch.dtype | None] = ()) -> torch.dtype:
    """None/'auto' -> bfloat16 on GPU (float16 on GPUs without bf16, before Ampere); on a CPU bfloat16 when
    every checkpoint is `stored` in bfloat16 and the CPU has bf16 units (no weight changes, and the statistics'
    verdicts and p-values hold: benchmarks/cpu_dtype.py), else float32. Otherwise one of
    float32/fp32/float16/fp16/bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if torch.device(device).type != "cuda":
            stored = [str(d).removeprefix("torch.") for d in stored]  # a config's dtype: a torch dtype or its name
            all_bf16 = bool(stored) and all(d == "bfloat16" for d in stored)
            return torch.bfloat16 if all_bf16 and cpu_has_bf16() else torch.float32
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


# ---------------------------------------------------------------------- peak memory of a run
RETURNED_BLOCK = 2 << 20  # bytes: freed blocks at least this large go back to the OS at once


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks (>= RETURNED_BLOCK) back to the OS at once; True where it applied (glibc).

    Per-layer work in worker threads (cosine matrices, float64 copies) allocates and frees the same large
    blocks layer after layer; glibc's default raises its mmap threshold after such frees and then keeps them in
    per-thread arenas, so the resident set grew with depth (a 30-layer csu --align: +530 MiB). A fixed
    threshold keeps the peak that of one layer (+140 MiB), at the cost of fresh pages for each large block.
    At 2 MiB rather than glibc's initial 128 KiB, a forward pass's activations (a 135M model's MLP over 512
    tokens: 1.5 MB) are reused rather than faulted in afresh: φ_MATCH on two 135M models 5.7 -> 5.4 s against
    1 MiB (8 alternated runs each; 1.2 -> 0.8 s of forward passes against 128 KiB), peak RSS +70 MiB (1.12 ->
    1.19 GiB, the original's 1.39 GiB); a 135M csu --align +22 MiB, csh +50 MiB.
    """
    try:
        return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, RETURNED_BLOCK) == 1
    except (OSError, AttributeError):
        return False


def reset_peak_memory() -> None:
    """Start measuring peak memory from now: the kernel's peak RSS (VmHWM) and torch's peak CUDA memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass  # not Linux, or not permitted: the peak then counts from the process start
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib() -> tuple[float | None, float | None]:
    """(peak RSS of this process in MiB since `reset_peak_memory`, peak CUDA memory allocated by torch in MiB,
    None without CUDA); RSS is the kernel's VmHWM (None where /proc is absent)."""
    rss = None
    try:
        with open("/proc/self/status") as f:
            rss = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return rss, gpu
