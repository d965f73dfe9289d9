"""A folder of result records -> one pandas table, CSV, markdown, figures, and scores against a lineage tree.

    python -m tracing.aggregate results/llama7b
    python -m tracing.aggregate results/llama7b --truth config/llama7b_tree.yaml --threshold -2

Every *.pkl / *.p under RESULTS_DIR (submitit's own folders excepted) is read with the restricted
unpickler: a corrupt, truncated or hostile file is reported and skipped, the others are aggregated.
Outputs land in RESULTS_DIR/aggregate/ (or --out): results.csv, results.md, heatmap_<stat>.png,
mode_curves.png, and with --truth scores.csv / scores.md (confusion matrix at the threshold, AUC).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from tracing import plots
from tracing.choices import LOWER_IS_RELATED
from tracing.errors import TracingError, exit_on_error
from tracing.lineage import load_tree, related
from tracing.naming import AGGREGATE_SUBDIR
from tracing.result_folder import read_records, record_key
from tracing.results import check_writable, error_line

COLUMNS = ["base", "ft", "stat", "status", "value", "log10_pvalue", "aligned_value", "aligned_log10_pvalue",
           "base_loss", "ft_loss", "base_ppl", "ft_ppl", "wall_time_s", "key", "commit", "dirty", "finished", "error",
           "file"]
# (variant, value column, log10 p column) of the two results every record can carry
VARIANTS = (("non-aligned", "value", "log10_pvalue"), ("aligned", "aligned_value", "aligned_log10_pvalue"))


def _row(rec: dict, path: Path) -> dict:
    git = rec.get("git") if isinstance(rec.get("git"), dict) else {}
    args = rec.get("args") if isinstance(rec.get("args"), dict) else {}
    row = {k: rec.get(k) for k in COLUMNS}
    row.update(base=rec.get("base_model_id", args.get("base_model_id")),
               ft=rec.get("ft_model_id", args.get("ft_model_id")), stat=rec.get("stat", args.get("stat")),
               commit=git.get("commit"), dirty=git.get("dirty"), file=str(path), error=error_line(rec.get("error")),
               key=(record_key(rec) or [None] * 4)[3])
    return row


def load_results(folder: str | Path) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """(table with one row per result, one problem line per skipped file, the records).

    A result stored twice (a copied folder, a failed rerun beside its ok record) is one row: the ok record,
    else the newest (results.read_records); a problem line says how many records were set aside."""
    if not Path(folder).is_dir():
        raise TracingError(f"results folder {folder} does not exist; pass the --save folder of main.py/launch.py")
    found, problems, superseded = read_records(folder)
    if superseded:
        problems.append(f"{superseded} record(s) of results already counted (same pair, statistic and flags: "
                        "a copy, or a failed rerun beside an ok record) left out")
    rows = [_row(rec, path) for path, rec in found]
    return pd.DataFrame(rows, columns=COLUMNS), problems, [rec for _, rec in found]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency); floats in %.6g, p-values never rounded to 0."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- truth scoring


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _higher_is_related(stat: str) -> bool:
    return stat not in LOWER_IS_RELATED  # a statistic this version does not know: higher


def score(df: pd.DataFrame, tree: dict[str, str], threshold: float) -> pd.DataFrame:
    """Per statistic and variant (non-aligned / aligned): confusion matrix at log10 p <= threshold, and AUC.

    AUC ranks pairs by -log10 p where the statistic has p-values, else by its value (sign from the registry).
    """
    ok = df[df["status"] == "ok"].copy()
    ok["related"] = [related(tree, b, f) for b, f in zip(ok["base"], ok["ft"])]
    ok = ok[ok["related"].notna()]
    rows = []
    for stat, group in ok.groupby("stat", sort=True):
        for variant, vcol, pcol in VARIANTS:
            labels = [bool(x) for x in group["related"]]
            pvals = pd.to_numeric(group[pcol], errors="coerce")
            values = pd.to_numeric(group[vcol], errors="coerce")
            row = {"stat": stat, "variant": variant, "n": 0, "tp": None, "fp": None, "tn": None, "fn": None,
                   "auc": None, "by": None}
            if pvals.notna().any():
                mask = pvals.notna().tolist()
                lab = [y for y, m in zip(labels, mask) if m]
                pred = [p <= threshold for p in pvals[pvals.notna()]]
                row.update(n=len(lab), by=f"log10 p <= {threshold:g}",
                           tp=sum(p and y for p, y in zip(pred, lab)), fp=sum(p and not y for p, y in zip(pred, lab)),
                           tn=sum(not p and not y for p, y in zip(pred, lab)),
                           fn=sum(not p and y for p, y in zip(pred, lab)),
                           auc=auc([-p for p in pvals[pvals.notna()]], lab))
            elif values.notna().any():
                sign = 1.0 if _higher_is_related(str(stat)) else -1.0
                mask = values.notna().tolist()
                lab = [y for y, m in zip(labels, mask) if m]
                row.update(n=len(lab), by="value", auc=auc([sign * v for v in values[values.notna()]], lab))
            else:
                continue
            rows.append(row)
    return pd.DataFrame(rows, columns=["stat", "variant", "n", "by", "tp", "fp", "tn", "fn", "auc"])


# ---------------------------------------------------------------------------------------- entry point


def aggregate(folder: str | Path, out: str | Path | None = None, truth: str | Path | None = None,
              threshold: float = -2.0, figures: bool = True) -> dict:
    """Write the table, figures and (with a truth tree) the scores; returns paths, the frames and problems."""
    if not Path(folder).is_dir():
        raise TracingError(f"results folder {folder} does not exist; pass the --save folder of main.py/launch.py")
    out = check_writable(Path(out) if out else Path(folder) / AGGREGATE_SUBDIR, "--out")  # before any work
    df, problems, records = load_results(folder)
    written = {"csv": out / "results.csv", "md": out / "results.md"}
    df.to_csv(written["csv"], index=False)
    written["md"].write_text(to_markdown(df.drop(columns=["file", "commit", "dirty", "finished"])))
    result = {"table": df, "problems": problems, "paths": written, "scores": None}
    if figures:
        ok = df[df["status"] == "ok"]
        for stat in sorted(ok["stat"].dropna().unique()):
            sub = ok[ok["stat"] == stat]
            for variant, vcol, pcol in VARIANTS:
                col, label = (pcol, "log10 p") if sub[pcol].notna().any() else (vcol, "value")
                if not sub[col].notna().any():
                    continue
                cells = [(b, f, float(v)) for b, f, v in zip(sub["base"], sub["ft"], sub[col]) if v is not None
                         and not (isinstance(v, float) and math.isnan(v))]
                name = f"heatmap_{'aligned_' if variant == 'aligned' else ''}{stat}.png"
                written[name] = Path(plots.pair_heatmap(cells, str(out / name), f"{stat} {variant}: {label}", label,
                                                        threshold=threshold if col == pcol else None))
        curves = _mode_curves(records)
        if curves:
            written["mode_curves.png"] = Path(plots.loss_vs_alpha(curves, str(out / "mode_curves.png")))
    if truth:
        scores = score(df, load_tree(truth), threshold)
        written["scores_csv"], written["scores_md"] = out / "scores.csv", out / "scores.md"
        scores.to_csv(written["scores_csv"], index=False)
        written["scores_md"].write_text(to_markdown(scores))
        result["scores"] = scores
    return result


def _mode_curves(records: list[dict]) -> list[tuple[str, list, list, bool]]:
    """(pair label, alphas, losses, aligned) of every ok mode curve, the aligned one beside the plain one."""
    ok = [r for r in records if r.get("status") == "ok"]
    names = plots.short_names([m for r in ok for m in (str(r.get("base_model_id")), str(r.get("ft_model_id")))])
    curves = []
    for r in ok:
        for aligned, extras in ((False, r.get("extras")), (True, r.get("aligned_extras"))):
            if isinstance(extras, dict) and extras.get("alphas") and extras.get("losses"):
                label = f"{names[str(r.get('base_model_id'))]} vs {names[str(r.get('ft_model_id'))]}"
                curves.append((label, extras["alphas"], extras["losses"], aligned))
    return curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.aggregate", description=__doc__.splitlines()[0])
    p.add_argument("results_dir", help="folder of result records (the --save of main.py / launch.py)")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/aggregate)")
    p.add_argument("--truth", default=None, help="lineage tree YAML (e.g. config/llama7b_tree.yaml)")
    p.add_argument("--threshold", type=float, default=-2.0, help="call a pair related when log10 p <= this")
    p.add_argument("--no_figures", action="store_true")
    args = p.parse_args(argv)
    return exit_on_error(lambda: _report(aggregate(args.results_dir, args.out, args.truth, args.threshold,
                                                   figures=not args.no_figures)))


def _report(res: dict) -> int:
    """Print what aggregate() found and wrote."""
    for line in res["problems"]:
        print(f"skipped: {line}", file=sys.stderr)
    df = res["table"]
    print(f"{len(df)} results ({(df['status'] == 'ok').sum()} ok, {(df['status'] != 'ok').sum()} failed), "
          f"{len(res['problems'])} unreadable files skipped")
    if res["scores"] is not None:
        print(to_markdown(res["scores"]), end="")
    for path in res["paths"].values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
