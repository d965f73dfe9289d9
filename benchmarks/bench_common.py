"""What every benchmark of benchmarks/ prints and reuses: the header line, peak memory, statistics on a pair.

    args, head, t0 = start(ap)            # parse the arguments, print the header line (command, date, machine)
    publish(lines, head, t0, args.markdown)   # the table with its header and duration, printed and written
    log10p(ctx_pair(base, ft, blocks, matching="fast"), "csu --align")
"""

from __future__ import annotations

import copy
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def header() -> str:
    """`command` run on `date` on `machine` (cores, load average), for the first line of every result."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return (f"`{cmd}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
            f"{platform.processor() or ''} with {cores} cores (load average {load} at the start)")


def rss_mib(field: str = "VmHWM") -> int:
    """VmHWM (peak) or VmRSS of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def log10p(stat: str, base, ft, blocks=None, matching: str = "fast", **options):
    """One statistic on a pair, as main.py runs it: "csu --align" aligns a copy of ft to base first.
    Returns the StatResult."""
    from tracing.align import align_weights
    from tracing.arch import get_spec
    from tracing.perm import apply_perm
    from tracing.statistics import StatContext, get_stat

    spec_b, spec_f = get_spec(base.config), get_spec(ft.config)
    if stat.endswith("--align"):
        ft = copy.deepcopy(ft)
        apply_perm(ft, spec_f, align_weights(base, ft, spec_b, progress=False, method=matching))
    ctx = StatContext(base=base, ft=ft, spec_base=spec_b, spec_ft=spec_f, blocks=blocks, progress=False,
                      matching=matching, **options)
    return get_stat(stat.split()[0]).fn(ctx)


def save_base_and_derived(model, folder) -> None:
    """`model` saved as folder/base, then with 1% Gaussian noise (seed 2) on every weight as folder/derived."""
    import torch

    model.save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder / "derived")


def heavy_tailed(model, seed: int, sigma_neuron: float = 1.0, sigma_resid: float = 1.0):
    """Give a random-init Llama the structure of a trained one, in place: log-normal gains on each MLP neuron
    (its gate and up rows) and on each residual dimension (embedding columns), so activation norms are
    heavy-tailed. Exact assignment on an independent pair of such models is as slow as on a trained model
    against an unrelated one (on random-init pairs it is not), so benchmarks see the real cost."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (vocab, hidden)
        emb.mul_(torch.exp(sigma_resid * torch.randn(emb.shape[1], generator=g)))
        for layer in model.model.layers:
            gain = torch.exp(sigma_neuron * torch.randn(layer.mlp.up_proj.weight.shape[0], 1, generator=g))
            layer.mlp.gate_proj.weight.mul_(gain)
            layer.mlp.up_proj.weight.mul_(gain)
    return model


def start(ap) -> tuple:
    """Parse the benchmark's arguments (an argparse parser) and print its header line: (args, head, started),
    the last two what `publish` takes."""
    import time

    args = ap.parse_args()
    head = header()
    print(head, flush=True)
    return args, head, time.perf_counter()


def publish(lines: list[str], head: str, started: float, markdown: str | None) -> str:
    """The result table with its header line and duration: printed, and written to `markdown` (README embeds
    that file between <!-- generated --> markers; tracing.docs copies it in)."""
    import time

    from tracing.docs import write_markdown

    text = "\n".join(lines) + f"\n\n{head}; took {time.perf_counter() - started:.0f} s.\n"
    print("\n" + text)
    if markdown:
        print(f"wrote {write_markdown(markdown, text)}")
    return text
