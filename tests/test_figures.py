"""Figures that do not mislead: distinct model labels, a colour scale centred on the significance threshold,
aligned mode curves beside the plain ones, progress bars that finish."""

import matplotlib
import pytest

from tracing import plots
from tracing.aggregate import _mode_curves
from tracing.cli import main


def test_two_models_with_the_same_last_name_get_distinct_labels():
    names = plots.short_names(["runs/a/base", "runs/b/base", "org/llama", "base"])
    assert names == {"runs/a/base": "a/base", "runs/b/base": "b/base", "org/llama": "llama", "base": "base"}
    assert len(set(names.values())) == 4


def test_log10p_colours_are_centred_on_the_threshold():
    scale = plots.threshold_scale([-1514.0, -3.0, -0.2], threshold=-2.0)
    cmap, norm = matplotlib.colormaps[scale["cmap"]], scale["norm"]
    r, g, b, _ = cmap(norm(-2.0))
    assert min(r, g, b) > 0.9  # white at the threshold
    r, _, b, _ = cmap(norm(-0.2))  # insignificant: blue, however close to 0 the whole map is
    assert b > r + 0.2
    r, _, b, _ = cmap(norm(-3.0))  # just significant: red, even beside -1514
    assert r > b


def test_mode_curves_keep_the_aligned_curve(tmp_path):
    rec = {"status": "ok", "base_model_id": "x/a/base", "ft_model_id": "y/a/base",
           "extras": {"alphas": [0, 0.5, 1], "losses": [1.0, 2.0, 1.1]},
           "aligned_extras": {"alphas": [0, 0.5, 1], "losses": [1.0, 1.05, 1.1]}}
    curves = _mode_curves([rec])
    assert [(c[0], c[3]) for c in curves] == [("x/a/base vs y/a/base", False), ("x/a/base vs y/a/base", True)]
    plots.loss_vs_alpha(curves, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0


@pytest.mark.parametrize("stat, desc", [("csu_all", "csu_all pairs"), ("match_all", "match_all base layers")])
def test_progress_bars_reach_100_percent(stat, desc, tmp_path, capsys):
    from tracing import zoo

    tok = zoo.build_tokenizer(zoo.synthetic_text(200, seed=0), vocab_size=128)
    for name, seed in (("a", 0), ("b", 1)):
        zoo.tiny_model("llama", seed=seed, hidden=16, layers=3, intermediate=32,
                       vocab_size=len(tok)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    code = main(["--base_model_id", str(tmp_path / "a"), "--ft_model_id", str(tmp_path / "b"), "--stat", stat,
                 "--dataset", "random", "--block_size", "16", "--max_blocks", "4", "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    last = [seg for seg in err.replace("\r", "\n").splitlines() if seg.startswith(desc)][-1]
    assert "100%" in last, last
