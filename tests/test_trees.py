"""Family trees: unrelated models never share a family; a parent is found above its child across pruning,
up-scaling and vocabulary extension (from shapes) and fine-tunes (the weak vote); merges sit below each parent;
the tree YAML is what `aggregate --truth` reads; the CLI runs every pair through the pipeline."""

import json

import pytest
import yaml

from tracing import zoo
from tracing.derivations import derive
from tracing.derivations.train import tuned
from tracing.forest import build_forest, families, score_edges, to_yaml
from tracing.kinship import STRONG, kinship, profile
from tracing.lineage import load_tree
from tracing.sources import ModuleSource
from tracing.trees import main

SHAPE = dict(hidden=64, layers=4, intermediate=128)


def _pair(a, b, related=True, distance=0.1, direction=0.0):
    return {"a": a, "b": b, "related": related, "distance": distance, "direction": direction, "why": ""}


# ---------------------------------------------------------------------- the forest from pairwise evidence
def test_unrelated_models_never_share_a_family():
    pairs = [_pair("a", "b"), _pair("b", "c"), _pair("a", "x", related=False), _pair("c", "y", related=False),
             _pair("x", "y")]
    assert sorted(map(sorted, families(["a", "b", "c", "x", "y", "z"], pairs))) == [["a", "b", "c"], ["x", "y"],
                                                                                  ["z"]]


def test_the_nearest_pairs_are_edges_and_a_strong_edge_overrules_weak_votes():
    # chain a - b - c (a-c far); weak votes point up the chain (a's parent b, b's parent c), but c is pruned
    # from b (STRONG): c cannot be the root, so the tree is rooted at b
    pairs = [_pair("a", "b", distance=0.1, direction=-0.2), _pair("b", "c", distance=0.1, direction=STRONG),
             _pair("a", "c", distance=0.3)]
    forest = build_forest(["a", "b", "c"], pairs)
    (fam,) = forest["families"]
    assert fam["root"] == "b"
    assert sorted((e["parent"], e["child"]) for e in fam["edges"]) == [("b", "a"), ("b", "c")]
    assert score_edges(forest, {"a": ["b"], "c": ["b"]}) == {
        "edges_true": 2, "edges_found": 2, "edges_right": 2, "directions_right": 2}
    pairs[1]["direction"] = -0.3  # weak evidence only (c the parent of b): the votes root it at c
    assert build_forest(["a", "b", "c"], pairs)["families"][0]["root"] == "c"


def test_the_yaml_is_a_lineage_tree_with_merges_below_their_main_parent():
    pairs = [_pair("base", "ft1", direction=1.0), _pair("base", "ft2", direction=1.0, distance=0.12),
             _pair("ft1", "ft2", distance=0.2), _pair("ft1", "m", distance=0.05), _pair("ft2", "m", distance=0.06),
             _pair("base", "m", distance=0.1), _pair("x", "base", related=False)]
    merges = {"m": {"parents": ["ft1", "ft2"], "shares": {"ft1": 0.3, "ft2": 0.7}}}
    forest = build_forest(["base", "ft1", "ft2", "m", "x"], pairs, merges)
    text = to_yaml(forest)
    assert "# also merged from: ft1" in text
    doc = yaml.safe_load(text)
    assert doc == [{"base": ["ft1", {"ft2": ["m"]}]}, "x"]


def test_the_yaml_reads_back_as_the_truth_aggregate_scores(tmp_path):
    forest = build_forest(["r", "c", "g", "u"], [_pair("r", "c", direction=1.0), _pair("c", "g", direction=1.0),
                                                 _pair("r", "g", distance=0.2), _pair("u", "r", related=False),
                                                 _pair("u", "c", related=False), _pair("u", "g", related=False)])
    (tmp_path / "tree.yaml").write_text(to_yaml(forest))
    assert load_tree(tmp_path / "tree.yaml") == {"r": "r", "c": "r", "g": "r", "u": "u"}


# ---------------------------------------------------------------------- kinship from the weights
@pytest.fixture(scope="module")
def base(tokenizer, text_ids):
    model = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), **SHAPE)
    return zoo.finetune(model, text_ids, steps=30, lr=3e-3)


def _kin(parent, child, tokenizer=None, child_tokenizer=None):
    pa = profile(ModuleSource(parent, tokenizer=tokenizer))
    pb = profile(ModuleSource(child, tokenizer=child_tokenizer or tokenizer))
    return kinship(pa, pb), kinship(pb, pa)


@pytest.mark.parametrize("kind, options, word", [
    ("layer-prune", {"drop": [2]}, "pruned"), ("depth-upscale", {"steps": 0}, "up-scaled"),
    ("width-prune-mlp", {}, "mlp"), ("vocab-extend", {"steps": 0, "new_tokens": 16}, "vocabulary")])
def test_shapes_say_who_the_parent_is_either_way_round(base, tokenizer, text_ids, kind, options, word):
    d = derive(kind, base, tokenizer, text_ids, **options)
    forward, backward = _kin(base, d.model, tokenizer, d.tokenizer)
    assert forward["direction"] == STRONG and backward["direction"] == -STRONG
    assert word in forward["why"]


def test_a_child_is_nearer_its_parent_than_its_grandparent(base, text_ids):
    child = tuned(base, text_ids, 15, 1e-3, 1)
    grandchild = tuned(child, text_ids, 15, 1e-3, 2)
    (pc, _), (cg, _), (pg, _) = _kin(base, child), _kin(child, grandchild), _kin(base, grandchild)
    assert max(pc["distance"], cg["distance"]) < pg["distance"]
    assert pc["direction"] > 0 and cg["direction"] > 0  # the child's weights grew (norm vote)


# ---------------------------------------------------------------------- the command line, end to end
@pytest.fixture(scope="module")
def zoo_dirs(base, tokenizer, text_ids, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trees")
    other = zoo.finetune(zoo.tiny_model("llama", seed=5, vocab_size=len(tokenizer), **SHAPE), text_ids, steps=30,
                         lr=3e-3)
    ft = tuned(base, text_ids, 15, 1e-3, 1)
    models = {"base": (base, tokenizer), "ft": (ft, tokenizer),
              "pruned": (derive("layer-prune", ft, tokenizer, text_ids, drop=[1]).model, tokenizer),
              "other": (other, tokenizer), "other-ft": (tuned(other, text_ids, 15, 1e-3, 3), tokenizer)}
    vocab = derive("vocab-extend", base, tokenizer, text_ids, steps=0, new_tokens=16)
    models["vocab"] = (vocab.model, vocab.tokenizer)
    out = {}
    for name, (model, tok) in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_the_cli_finds_both_families_and_every_edge(zoo_dirs, tmp_path, capsys):
    names = ",".join(zoo_dirs.values())
    assert main(["--models", names, "--out", str(tmp_path), "--evidence", "weights"]) == 0
    roots = load_tree(tmp_path / "tree.yaml")
    p = zoo_dirs
    assert {m for m, r in roots.items() if r == p["base"]} == {p["base"], p["ft"], p["pruned"], p["vocab"]}
    assert {m for m, r in roots.items() if r == p["other"]} == {p["other"], p["other-ft"]}
    truth = {p["ft"]: [p["base"]], p["pruned"]: [p["ft"]], p["vocab"]: [p["base"]], p["other-ft"]: [p["other"]]}
    forest = json.loads((tmp_path / "tree.json").read_text())
    assert score_edges(forest, truth)["directions_right"] == 4
    assert (tmp_path / "tree.png").stat().st_size > 0
    assert len(list((tmp_path / "records").glob("*.json"))) == 15  # every pair through the pipeline


def test_the_cli_refuses_bad_model_lists_in_one_line(tmp_path, capsys):
    assert main(["--models", "only-one"]) == 2
    assert "two or more" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("models: [a, b]\n")
    assert main(["--models", str(tmp_path / "list.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a YAML list of model ids" in err[0]
