"""README's examples, regenerated from code: the demo's verdict table and timings, the fine-tuning report.

    python -m tracing.examples demo      # runs `python main.py --demo` twice in a fresh folder (from scratch,
                                         # then reused): docs/generated/demo.md, docs/generated/demo_timing.md
    python -m tracing.examples report    # the report example on the demo models: docs/report-example/ and
                                         # docs/generated/report_example.md (with a merged rank-4 LoRA beside it)
    python -m tracing.examples launch    # config/demo.yaml through launch.py --wait (local processes, and Slurm
                                         # when sinfo answers), then aggregate --truth: docs/generated/demo_launch.md
    python -m tracing.examples           # all three; then README takes the files in (tracing.docs)

The demo is deterministic (tracing/demo.py), so tests/test_examples.py can rebuild it and compare its table
with README's; the timings and the report's figures are only regenerated here.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import transformers

from tracing import zoo
from tracing.config import RunConfig
from tracing.demo import deterministic, ensure_demo_models
from tracing.devices import usable_cpus
from tracing.docs import ROOT, pages, render, write_markdown
from tracing.errors import TracingError, exit_on_error
from tracing.pipeline import run_pair

GENERATED = ROOT / "docs" / "generated"
REPORT_DIR = ROOT / "docs" / "report-example"
REPORT_FLAGS = dict(align=True, prompts=str(REPORT_DIR / "prompts.txt"), report_token="Paris", compare="Lima=Paris",
                    targets="English,French")


def demo_markdown(table: str) -> str:
    """README's demo block: the table exactly as `python main.py --demo` prints it."""
    return f"```\n{table.strip()}\n```\n"


def table_of(stdout: str) -> str:
    """The verdict table in the output of `python main.py --demo` (header to the '(related = ...)' line)."""
    m = re.search(r"^pair .*?^\(related = [^\n]*\)$", stdout, re.DOTALL | re.MULTILINE)
    if not m:
        raise TracingError("python main.py --demo printed no verdict table:\n" + stdout[-2000:])
    return m.group(0)


def _machine() -> str:
    return f"{platform.machine()}, {usable_cpus()} usable CPUs, torch {torch.__version__}, {date.today().isoformat()}"


def regenerate_demo(out: Path = GENERATED) -> list[Path]:
    """Run the demo as a user does, twice in a fresh folder; write its table and its timings."""
    tables, times = [], []
    with tempfile.TemporaryDirectory(prefix="demo-") as cwd:
        for _ in range(2):  # from scratch (training included), then with the models reused
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--demo", "--no_progress"], cwd=cwd,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise TracingError(f"python main.py --demo failed: {proc.stderr.strip()[-500:]}")
            tables.append(table_of(proc.stdout))
    if tables[0] != tables[1]:
        raise TracingError("the demo printed two different tables from the same models: it is not deterministic")
    timing = (f"On {_machine()}: `python main.py --demo` took {times[0]:.0f} s from scratch (three models "
              f"trained, one CPU thread so that every run trains the same models) and {times[1]:.0f} s with the "
              f"models reused (whole processes, Python start-up and imports included).\n")
    return [write_markdown(out / "demo.md", demo_markdown(tables[0])), write_markdown(out / "demo_timing.md", timing)]


def _lora(root: Path) -> Path:
    """A rank-4 LoRA on q_proj, v_proj and up_proj of the demo base, trained 20 steps, saved as an adapter."""
    import peft

    tok = transformers.AutoTokenizer.from_pretrained(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "up_proj"]))
    ids = torch.tensor(tok(zoo.synthetic_text(800, seed=11))["input_ids"])
    zoo.finetune(model, ids, steps=20, lr=3e-3, seed=5, block_size=64, batch_size=8)
    model.save_pretrained(root / "lora")
    return root / "lora"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def weight_summary(w: dict) -> str:
    """One sentence of what the weight section of a report found (report["weights"])."""
    rows = [r for r in w["per_key"] if r["rel_change"] is not None]
    mats = [r for r in rows if r["layer"] is not None and r["max_rank"]]
    norms = [r for r in rows if r["layer"] is not None and not r["max_rank"]]
    changed = [r for r in mats if r["abs_change"] > 0]
    parts = []
    if changed:
        lo, hi = min(r["rel_change"] for r in changed), max(r["rel_change"] for r in changed)
        ranks = [r["eff_rank"] for r in changed]
        sizes = "/".join(str(s) for s in sorted({r["max_rank"] for r in changed}))
        modules = sorted({r["module"] for r in changed})
        parts.append(f"{len(changed)} of {len(mats)} layer matrices changed ({', '.join(modules)}), by "
                     f"{_pct(lo)}–{_pct(hi)} with effective ranks {min(ranks)}–{max(ranks)} (of {sizes})")
    if norms and any(r["abs_change"] > 0 for r in norms):
        parts.append(f"the norm gains by at most {_pct(max(r['rel_change'] for r in norms))}")
    for r in w["globals"]:
        if r["abs_change"] > 0:
            rank = f", rank {r['eff_rank']} of {r['max_rank']}" if r["max_rank"] else ""
            parts.append(f"`{r['key']}` by {_pct(r['rel_change'])}{rank}")
    untouched = [r for r in rows if r["abs_change"] == 0]
    if untouched:
        parts.append(f"{len(untouched)} weights unchanged")
    return "; ".join(parts) + "."


def prediction_summary(report: dict) -> str:
    """The first prompt's top next tokens under both models, and its target continuations."""
    first = report["prompts_detail"][0]
    nt = first["next_token"]

    def top(key: str) -> str:
        return ", ".join(f"`{t['token']!r}` {t['prob']:.2f}" for t in nt[key][:3])

    line = f"After `{first['prompt']}` the base model's top next tokens are {top('top_base')}; the fine-tuned " \
           f"model's {top('top_ft')}."
    if first.get("targets"):
        line += " Log-probability of each continuation, base → fine-tuned: " + ", ".join(
            f"`{t['target']}` {t['logp_base']:.2f} → {t['logp_ft']:.2f}" for t in first["targets"]) + "."
    return line


def regenerate_report(out: Path = GENERATED, report_dir: Path = REPORT_DIR) -> list[Path]:
    """The report example on fresh demo models (full fine-tuning, permuted, aligned), and a merged LoRA."""
    with tempfile.TemporaryDirectory(prefix="report-") as tmp, deterministic():
        root = ensure_demo_models(Path(tmp) / "demo", progress=False)
        save = str(Path(tmp) / "records")
        full = run_pair(RunConfig(base_model_id=str(root / "base"), ft_model_id=str(root / "derived"),
                                  stat="csu", report=str(report_dir), save=save, no_progress=True, **REPORT_FLAGS))
        lora = run_pair(RunConfig(base_model_id=str(root / "base"), ft_model_id=str(_lora(root)), stat="l2",
                                  report=str(Path(tmp) / "lora-report"), save=save, no_progress=True))
    for rec in (full, lora):
        if rec["status"] != "ok":
            raise TracingError(f"the report example failed: {rec['error']}")
    full_w, lora_w = weight_summary(full["report"]["weights"]), weight_summary(lora["report"]["weights"])
    text = (f"Full fine-tuning (the demo's derived model, aligned to the base): {full_w}\n\n"
            f"{prediction_summary(full['report'])}\n\n"
            f"A rank-4 LoRA on `q_proj`, `v_proj` and `up_proj` of the same base, trained 20 steps and merged: "
            f"{lora_w}\n")
    return [write_markdown(out / "report_example.md", text)]


def _slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _timed(argv: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise TracingError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def regenerate_launch(out: Path = GENERATED) -> list[Path]:
    """What README's cluster section shows: the three commands of config/demo.yaml, run as a user runs them
    (in a fresh folder holding results/demo), timed; the scores against config/demo_tree.yaml."""
    times = {}
    with tempfile.TemporaryDirectory(prefix="launch-") as cwd:
        with deterministic():
            ensure_demo_models(Path(cwd) / "results" / "demo", progress=False)
        for cluster in ("local", "slurm") if _slurm_answers() else ("local",):
            times[cluster] = _timed([str(ROOT / "launch.py"), "--config", str(ROOT / "config" / "demo.yaml"),
                                     "--save", f"results/demo_{cluster}", "--cluster", cluster, "--wait"], cwd)
        _timed(["-m", "tracing.aggregate", "results/demo_local", "--truth", str(ROOT / "config" / "demo_tree.yaml"),
                "--no_figures"], cwd)
        scores = (Path(cwd) / "results" / "demo_local" / "aggregate" / "scores.md").read_text()
    how = " and ".join(f"{t:.1f} s with {'the one-node Slurm cluster' if c == 'slurm' else 'local processes'}"
                       for c, t in times.items())
    text = (f"{scores}\n`launch.py --config config/demo.yaml --wait` (3 pairs, `csu --align`, CPU jobs) took {how} "
            f"(the whole command; {_machine()}).\n")
    return [write_markdown(out / "demo_launch.md", text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.examples", description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("demo", "report", "launch", "all"), default="all")
    args = p.parse_args(argv)

    def run() -> int:
        print(f"python -m tracing.examples {args.what}  ({_machine()})", flush=True)
        t0 = time.perf_counter()
        written = []
        if args.what in ("demo", "all"):
            written += regenerate_demo()
        if args.what in ("report", "all"):
            written += regenerate_report()
        if args.what in ("launch", "all"):
            written += regenerate_launch()
        for page in pages():
            page.write_text(render(page.read_text()))
        for path in written:
            print(f"wrote {path.relative_to(ROOT)}")
        print(f"updated README.md and docs/*.md ({time.perf_counter() - t0:.0f} s)")
        return 0

    return exit_on_error(run)


if __name__ == "__main__":
    sys.exit(main())
