"""README's examples are the code's output: the demo table in README is what a fresh, deterministic build of
the demo prints (regenerate with `python -m tracing.examples demo` when the code changes the numbers)."""

from tracing.demo import demo_rows, format_table
from tracing.docs import ROOT
from tracing.examples import demo_markdown, table_of, weight_summary

GENERATED_DEMO = ROOT / "docs" / "generated" / "demo.md"


def test_readme_demo_table_is_what_the_demo_prints(tmp_path, summary_lines):
    rows = demo_rows(tmp_path / "demo", progress=False)  # trains the three models from scratch (~15 s)
    fresh = demo_markdown(format_table(rows))
    assert fresh == GENERATED_DEMO.read_text(), (
        "README's demo table differs from a fresh demo run; run `python -m tracing.examples demo`:\n" + fresh)
    assert fresh in (ROOT / "README.md").read_text()
    summary_lines.append("demo rebuilt from scratch: its table equals README's")


def test_the_table_is_cut_from_the_demo_output():
    table = "pair   statistic\nbase vs derived  csu  -1.00  unrelated\n\n(related = p <= 0.01)"
    assert table_of(f"noise\n{table}\nrecords in x; 9 s\n") == table


def test_weight_summary_names_ranges_ranks_and_untouched_weights():
    def key(name, layer, rel, rank, size):
        return dict(key=name, layer=layer, module=name.split(".")[-2], rel_change=rel, abs_change=rel,
                    eff_rank=rank, max_rank=size)

    w = {"per_key": [key("l.0.q.w", 0, 0.5, 4, 64), key("l.0.k.w", 0, 0.0, 0, 64), key("l.1.q.w", 1, 0.25, 3, 64),
                     key("lm_head.w", None, 0.02, 1, 64)]}
    w["globals"] = [w["per_key"][-1]]
    assert weight_summary(w) == ("2 of 3 layer matrices changed (q), by 25%–50% with effective ranks 3–4 (of 64); "
                                 "`lm_head.w` by 2.0%, rank 1 of 64; 1 weights unchanged.")
