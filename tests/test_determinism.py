"""The same numbers on every run, whatever the thread count: the demo models are built bit for bit alike under 1
and 2 torch threads, and the statistics give identical p-values under 1, 2 and 4 threads (README's numbers and
the demo table depend on it; a fresh install gets the pinned libraries, tests/test_install.py)."""

import hashlib
from pathlib import Path

import pytest
import torch

from tracing.config import RunConfig
from tracing.demo import ensure_demo_models
from tracing.devices import threads
from tracing.pipeline import run_pair


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def demo_1_thread(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ensure_demo_models(tmp_path_factory.mktemp("t1") / "demo", progress=False)
    finally:
        torch.set_num_threads(before)


def test_demo_models_are_the_same_bits_under_1_and_2_threads(demo_1_thread, tmp_path):
    """... and with the progress bar shown (as `python main.py --demo` builds them) or not (as pytest does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = ensure_demo_models(tmp_path / "demo", progress=True)
    finally:
        torch.set_num_threads(before)
    assert _digests(two) == _digests(demo_1_thread) and len(_digests(two)) == 3


@pytest.mark.parametrize("stat, extra", [("auto", {}), ("csu_all", {}), ("match", {"dataset": "text"}),
                                         ("mode", {"dataset": "text", "align": True})])
def test_statistics_give_the_same_numbers_under_1_2_and_4_threads(demo_1_thread, tmp_path, stat, extra):
    root = demo_1_thread
    opts = {**extra, **({"dataset": str(root / "text.txt"), "block_size": 64, "max_blocks": 4}
                        if "dataset" in extra else {})}
    numbers = []
    for n in (1, 2, 4):
        cfg = RunConfig(base_model_id=str(root / "base"), ft_model_id=str(root / "derived"), stat=stat,
                        device="cpu", save=str(tmp_path / f"t{n}"), no_progress=True, threads=n, **opts)
        with threads(n):
            rec = run_pair(cfg)
        assert rec["status"] == "ok", rec["error"]
        layers = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rec["per_layer"]]  # not times
        numbers.append((rec["value"], rec["log10_pvalue"], rec["aligned_value"], layers))
    assert numbers[0] == numbers[1] == numbers[2]
