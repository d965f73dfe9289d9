"""python -m tracing.aggregate: result folder -> table, CSV, markdown, figures, scores against a lineage tree."""

import os
import pickle

import pandas as pd
import pytest

from tracing.aggregate import aggregate, auc, main
from tracing.lineage import load_tree, related
from tracing.results import new_record, save_record

TREE = """\
- org/base:
    - org/chat:
        - org/chat-v2
- other/indep
"""


def record(base, ft, stat, **kw) -> dict:
    rec = new_record({"base_model_id": base, "ft_model_id": ft, "stat": stat})
    rec.update(stat=stat, base_model_id=base, ft_model_id=ft, status="ok", error=None, value=None,
               log10_pvalue=None, aligned_value=None, aligned_log10_pvalue=None, extras={}, wall_time_s=1.0)
    rec.update(kw)
    return rec


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture()
def results(tmp_path):
    d = tmp_path / "res"
    recs = [record("org/base", "org/chat", "csu", value=0.99, log10_pvalue=-12000.5),
            record("org/base", "org/chat-v2", "csu", value=0.9, log10_pvalue=-300.25),
            record("org/base", "other/indep", "csu", value=0.01, log10_pvalue=-0.3),
            record("org/chat", "other/indep", "csu", value=0.02, log10_pvalue=-2.5),  # a false positive
            record("org/base", "org/chat", "l2", value=1.0),
            record("org/base", "other/indep", "l2", value=9.0),
            record("org/base", "org/chat", "mode", value=3.1,
                   extras={"alphas": [0.0, 0.5, 1.0], "losses": [3.0, 3.1, 3.05]}),
            record("org/chat", "org/chat-v2", "csu", status="failed", error="Traceback\nTracingError: no such model")]
    for i, rec in enumerate(recs):
        save_record(rec, d / f"r{i}.pkl")
    (d / "truncated.pkl").write_bytes((d / "r0.pkl").read_bytes()[:40])
    (d / "evil.pkl").write_bytes(pickle.dumps({"x": Evil()}))
    (d / "submitit").mkdir()
    (d / "submitit" / "1_0_result.pkl").write_bytes(pickle.dumps(("success", Evil())))  # not a record: ignored
    (tmp_path / "tree.yaml").write_text(TREE)
    return d


def test_lineage_tree_relations(tmp_path):
    (tmp_path / "tree.yaml").write_text(TREE)
    roots = load_tree(tmp_path / "tree.yaml")
    assert related(roots, "org/chat-v2", "org/base") and related(roots, "org/chat", "org/chat-v2")
    assert related(roots, "org/base", "other/indep") is False
    assert related(roots, "org/base", "unknown/model") is None


def test_auc_counts_ties_half():
    assert auc([3, 2, 1], [True, True, False]) == 1.0
    assert auc([1, 1], [True, False]) == 0.5
    assert auc([1, 2], [True, True]) is None


def test_aggregate_skips_bad_files_and_keeps_the_rest(results):
    out = aggregate(results, truth=results.parent / "tree.yaml", threshold=-2.0)
    df = out["table"]
    assert len(df) == 8 and (df["status"] == "failed").sum() == 1
    assert df.loc[df["status"] == "failed", "error"].item() == "TracingError: no such model"
    problems = " ".join(out["problems"])
    assert len(out["problems"]) == 2 and "truncated.pkl" in problems and "refusing to load" in problems
    csv = pd.read_csv(out["paths"]["csv"])
    assert csv["log10_pvalue"].min() == -12000.5  # exact, not rounded, not flushed to 0
    assert "-12000.5" in out["paths"]["md"].read_text()
    for name in ("heatmap_csu.png", "heatmap_l2.png", "heatmap_mode.png", "mode_curves.png"):
        assert out["paths"][name].stat().st_size > 1000


def test_scores_against_the_lineage_tree(results):
    scores = aggregate(results, truth=results.parent / "tree.yaml", threshold=-2.0, figures=False)["scores"]
    csu = scores[(scores["stat"] == "csu") & (scores["variant"] == "non-aligned")].iloc[0]
    assert (csu["n"], csu["tp"], csu["fp"], csu["tn"], csu["fn"]) == (4, 2, 1, 1, 0)
    assert csu["auc"] == pytest.approx(1.0)  # ranking is perfect even though the threshold lets one through
    l2 = scores[(scores["stat"] == "l2") & (scores["variant"] == "non-aligned")].iloc[0]
    assert l2["by"] == "value" and l2["auc"] == 1.0  # l2: low distance = related


def test_cli_reports_skipped_files_and_missing_folder(results, tmp_path, capsys):
    assert main([str(results), "--no_figures"]) == 0
    captured = capsys.readouterr()
    assert "8 results (7 ok, 1 failed), 2 unreadable files skipped" in captured.out
    assert captured.err.count("skipped:") == 2
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
