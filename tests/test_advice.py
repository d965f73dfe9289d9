"""Advice that ends: when a statistic cannot run on a pair, the error names only statistics that do, and each of
them runs (it used to go round in a circle: csu -> match_all -> csh/csu -> ...)."""

import re

import pytest

from tracing import zoo
from tracing.cli import main

SHAPE = dict(hidden=32, intermediate=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Pairs of saved tiny models whose shapes differ the ways real pairs do, and a text file."""
    root = tmp_path_factory.mktemp("advice")
    tok = zoo.build_tokenizer(zoo.synthetic_text(300, seed=0), vocab_size=300)
    other_tok = zoo.build_tokenizer(zoo.synthetic_text(300, seed=5) + " zebra quartz", vocab_size=360)
    made = {"llama": (zoo.tiny_model("llama", seed=0, layers=3, vocab_size=len(tok), **SHAPE), tok),
            "deeper": (zoo.tiny_model("llama", seed=1, layers=5, vocab_size=len(tok), **SHAPE), tok),
            "gpt2": (zoo.tiny_model("gpt2", seed=2, layers=2, vocab_size=len(tok), hidden=32, intermediate=64,
                                    heads=4), tok),
            "other_vocab": (zoo.tiny_model("llama", seed=3, layers=3, vocab_size=len(other_tok), **SHAPE), other_tok)}
    for name, (model, t) in made.items():
        model.save_pretrained(root / name)
        t.save_pretrained(root / name)
    (root / "text.txt").write_text(zoo.synthetic_text(200, seed=9))
    return {"root": str(root), "llama vs gpt2": ("llama", "gpt2"), "3 vs 5 layers": ("llama", "deeper"),
            "different vocabularies": ("llama", "other_vocab")}


def _run(pairs, capsys, pair, stat) -> tuple[int, str]:
    root = pairs["root"]
    base, ft = pairs[pair]
    code = main(["--base_model_id", f"{root}/{base}", "--ft_model_id", f"{root}/{ft}", "--stat", stat, "--device",
                 "cpu", "--dataset", f"{root}/text.txt", "--block_size", "32", "--max_blocks", "4",
                 "--save", f"{root}/results", "--no_progress"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("pair, refused", [("llama vs gpt2", "csu"), ("llama vs gpt2", "match_all"),
                                           ("3 vs 5 layers", "csu"), ("3 vs 5 layers", "csh"),
                                           ("different vocabularies", "jsd"), ("different vocabularies", "mode")])
def test_every_suggested_statistic_runs(pairs, capsys, pair, refused):
    code, err = _run(pairs, capsys, pair, refused)
    assert code == 2, err
    m = re.search(r"cannot run on this pair: .*; statistics that run on this pair: (.*)$", err.strip())
    assert m, err
    suggested = m[1].split(", ")
    assert refused not in suggested and suggested
    for stat in suggested:
        code, err = _run(pairs, capsys, pair, stat)
        assert code == 0, f"{pair}: {refused} suggested {stat}, which failed: {err}"
