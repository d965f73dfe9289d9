"""`python main.py --demo`: build three small models offline and show what the tests conclude.

    base         a llama-family model trained from scratch on text the project generates
    derived      base fine-tuned a few steps on other text, then its hidden units randomly permuted
    independent  the same recipe from another random initialisation

The models and text are kept under results/demo/ and reused. Every row of the table is a real run of
the single-pair pipeline (`tracing.pipeline.run_pair`), whose records land in results/demo/results/.

Deterministic: everything runs on one CPU thread with deterministic algorithms, so the models, and with them
every number of the table, are the same from one run (and one machine of the same CPU kind) to the next.
README's table is this module's output (`python -m tracing.docs --regenerate demo`), checked by a test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import tokenizers
import torch
import transformers
from tqdm import tqdm

from tracing import zoo
from tracing.arch import get_spec
from tracing.config import RunConfig
from tracing.devices import threads
from tracing.naming import DEMO_DIR
from tracing.perm import apply_perm, random_perm
from tracing.pipeline import run_pair

RECIPE = dict(version=2, family="llama", hidden=96, layers=3, intermediate=256, vocab=512,
              train_steps=120, finetune_steps=30, lr=3e-3)
ALPHA = 0.01  # verdict threshold on p
Row = tuple  # (pair, test, log10 p or None, reading)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """zoo.deterministic (one CPU thread, deterministic algorithms) with one assignment worker, restored after."""
    with zoo.deterministic(), threads(1):
        yield


def _built_with() -> dict:
    """What decides the demo models' bits besides the recipe: another torch, transformers or tokenizers release
    initialises or trains differently, so models built by one are never reused by another."""
    return {"recipe": RECIPE, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def _train_models(root: Path, progress: bool) -> None:
    r = RECIPE
    text = zoo.synthetic_text(6000, seed=0)
    (root / "text.txt").write_text(zoo.synthetic_text(1500, seed=99))  # held-out evaluation text
    tok = zoo.build_tokenizer(text, vocab_size=r["vocab"])
    ids = torch.tensor(tok(text)["input_ids"])
    shape = dict(vocab_size=len(tok), hidden=r["hidden"], layers=r["layers"], intermediate=r["intermediate"])
    steps = tqdm(total=2 * r["train_steps"] + r["finetune_steps"], desc="demo: training", disable=not progress)
    models = {}
    for k, (name, seed) in enumerate((("base", 0), ("independent", 1))):
        models[name] = _fit(zoo.tiny_model(r["family"], seed=seed, **shape), ids, r["train_steps"], seed, steps,
                            start=k * r["train_steps"])
    ft_text = torch.tensor(tok(zoo.synthetic_text(2000, seed=7))["input_ids"])
    derived = _fit(copy.deepcopy(models["base"]), ft_text, r["finetune_steps"], 2, steps,
                   start=2 * r["train_steps"], lr=r["lr"] / 3)
    spec = get_spec(derived.config)
    apply_perm(derived, spec, random_perm(spec, derived.state_dict(), seed=123))
    models["derived"] = derived
    steps.close()
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "recipe.json").write_text(json.dumps(_built_with()))


def _fit(model, ids, steps, seed, bar, start, lr=RECIPE["lr"]):
    """`steps` training steps in rounds of 10, each seeded by the steps done before it (`start` + this model's:
    never by the progress bar, which counts nothing when it is disabled)."""
    for done in range(start, start + steps, 10):
        zoo.finetune(model, ids, steps=10, lr=lr, seed=seed * 7919 + done, block_size=64, batch_size=8)
        bar.update(10)
    return model


def ensure_demo_models(root: Path = DEMO_DIR, progress: bool = True) -> Path:
    """Build the demo models unless an identical recipe is already on disk."""
    root = Path(root)
    recipe = root / "recipe.json"
    if recipe.exists() and json.loads(recipe.read_text()) == _built_with() and all(
            (root / n / "config.json").exists() for n in ("base", "derived", "independent")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with deterministic():
        _train_models(root, progress)
    return root


def _run(cfg: RunConfig) -> dict:
    record = run_pair(cfg)
    if record["status"] != "ok":
        raise RuntimeError(f"demo run failed: {record['error']}")
    return record


def demo_rows(root: Path = DEMO_DIR, progress: bool = True) -> list[Row]:
    """Build (or reuse) the demo models under `root` and run both pairs: the rows of the verdict table. Per pair:
    each test `auto` ran, auto's combined verdict, and mode's loss barrier after --align (what mode is for; it
    has no valid p-value there, so it decides nothing)."""
    root = ensure_demo_models(root, progress=progress)
    rows: list[Row] = []
    data = dict(dataset=str(root / "text.txt"), block_size=64, max_blocks=8, batch_size=8)
    with deterministic():
        for pair in ("derived", "independent"):
            common = RunConfig(base_model_id=str(root / "base"), ft_model_id=str(root / pair), device="cpu",
                               save=str(root / "results"), no_progress=not progress, **data)
            auto = _run(common.replace(stat="auto"))
            extras = auto["extras"]
            for test in extras["tests"]:
                reading = "related" if test["log10_pvalue"] <= math.log10(ALPHA) else "no evidence"
                decides = "  <- decides" if test["test"] == extras["decided_by"] else ""
                rows.append((pair, test["test"], test["log10_pvalue"], reading + decides))
            verdict = "related" if auto["log10_pvalue"] <= math.log10(ALPHA) else "unrelated"
            rows.append((pair, "auto", auto["log10_pvalue"],
                         f"{verdict} (Bonferroni over {len(extras['plan'])} planned tests)"))
            mode = _run(common.replace(stat="mode", align=True))
            rows.append((pair, "mode --align", None, f"loss barrier {mode['aligned_extras']['barrier']:+.3f} nats "
                                                     f"(no p-value: evidence, not a test)"))
            rows.append((pair, "derivation", None, extras["derivation"]))
    return rows


def format_table(rows: list[Row]) -> str:
    """The verdict table as `python main.py --demo` prints it (and README shows it)."""
    lines = [f"{'pair':<20} {'test':<13} {'log10 p':>9}  reading"]
    for pair, test, log10p, note in rows:
        if test == "derivation":
            lines.append(f"{'':<20} {note}")
            continue
        shown = "-" if log10p is None else f"{log10p:.2f}"
        lines.append(f"{'base vs ' + pair:<20} {test:<13} {shown:>9}  {note}")
    return "\n".join(lines) + (f"\n\n(related = p <= {ALPHA}; auto combines its tests by Bonferroni over the tests it "
                               f"planned, and stops once one settles the pair)")


def run_demo(progress: bool = True, root: Path = DEMO_DIR) -> int:
    t0 = time.perf_counter()
    rows = demo_rows(root, progress)
    print()
    print(format_table(rows))
    print(f"records in {Path(root) / 'results'}; {time.perf_counter() - t0:.0f} s")
    return 0
