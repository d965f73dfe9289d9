"""The catalogue: `identify` finds the base of every kind of derivative the pair runs (`auto`) find, calls no null
related, maps layers where depths differ; `add` reads each model once, is a no-op for a model already there and
leaves a valid catalogue when interrupted; fingerprints are small and their tests calibrated."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from tracing import zoo
from tracing.catalog import Catalog, Settings, add_models, build, identify
from tracing.catalog.compare import _pair_test, shared_anchors
from tracing.catalog.fingerprint import SCHEMA, to_bytes
from tracing.catalog.store import INDEX_SCHEMA
from tracing.config import RunConfig
from tracing.derivations import derive, pretrain, save
from tracing.pipeline import run_pair
from tracing.results import atomic_write
from tracing.sources import open_source
from tracing.sources.base import ModuleSource

# cheap exact tests (auto with few random token blocks), the same for the pair runs and identify's confirmation
EXACT = {"max_blocks": 2, "block_size": 64, "device": "cpu", "threads": 1}
LLAMA_FAMILY = ("llama-0", "llama-0-ft", "llama-1", "qwen2-0")
# suspect -> (recipe, its base in the catalogue, recipe options); None: a null
SUSPECTS = {
    "finetune": ("finetune", "llama-0", {"steps": 5}),
    "depth-upscale": ("depth-upscale", "llama-0", {"steps": 0}),
    "layer-prune": ("layer-prune", "llama-0", {}),
    "width-prune-mlp": ("width-prune-mlp", "llama-0", {}),
    "vocab-extend": ("vocab-extend", "llama-0", {"steps": 3}),
    "merge-linear": ("merge-linear", "llama-0", {"steps": 3}),
    "permute": ("permute", "llama-0", {}),
    "independent": ("independent", None, {"seed": 7, "steps": 20}),
    "gpt2-permute": ("permute", "gpt2-0", {}),
    "gpt2-independent": ("independent", None, {"seed": 9, "steps": 0}),
}


@pytest.fixture(scope="module")
def zoo_catalog(tokenizer, text_ids, tmp_path_factory) -> dict:
    """Ten catalogued models of three families (llama-0 and a fine-tune of it, llama-1, qwen2-0, three gpt2, three
    gpt_neox) and the suspects of SUSPECTS, saved as checkpoints."""
    root = tmp_path_factory.mktemp("catalog-zoo")
    models = {}
    for name, family, seed, steps in (("llama-0", "llama", 0, 20), ("llama-1", "llama", 1, 20),
                                      ("qwen2-0", "qwen2", 2, 0), ("gpt2-0", "gpt2", 0, 5), ("gpt2-1", "gpt2", 1, 0),
                                      ("gpt2-2", "gpt2", 2, 0), ("gpt_neox-0", "gpt_neox", 0, 0),
                                      ("gpt_neox-1", "gpt_neox", 1, 0), ("gpt_neox-2", "gpt_neox", 2, 0)):
        models[name] = pretrain(zoo.tiny_config(family, vocab_size=len(tokenizer), layers=4), text_ids, seed=seed,
                                steps=steps)
    models["llama-0-ft"] = derive("finetune", models["llama-0"], tokenizer, text_ids, steps=5, seed=3).model
    paths = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    truths = {}
    for name, (kind, parent, options) in SUSPECTS.items():
        d = derive(kind, models[parent or ("gpt2-0" if name.startswith("gpt2") else "llama-0")], tokenizer,
                   text_ids, **options)
        paths[name] = str(save(d, root / "suspects" / name))
        truths[name] = d.truth
    catalog = root / "cat"
    out = add_models(catalog, [(paths[n], n) for n in models])
    assert sorted(out["added"]) == sorted(models) and not out["failed"]
    return {"root": root, "catalog": catalog, "paths": paths, "truths": truths, "models": models}


def pair_verdicts(z: dict, suspect: str, candidates) -> dict[str, bool]:
    """auto on (candidate, suspect) through main.py's pipeline: candidate -> related."""
    out = {}
    for name in candidates:
        cfg = RunConfig(base_model_id=z["paths"][name], ft_model_id=z["paths"][suspect], stat="auto",
                        save=str(z["root"] / "records"), no_progress=True, **EXACT)
        out[name] = run_pair(cfg)["extras"]["related"]
    return out


@pytest.mark.parametrize("suspect", list(SUSPECTS))
def test_identify_agrees_with_the_pair_runs(zoo_catalog, suspect):
    z = zoo_catalog
    result = identify(z["catalog"], z["paths"][suspect], exact_options=EXACT)
    family = LLAMA_FAMILY if not suspect.startswith("gpt2") else ("gpt2-0", "gpt2-1", "gpt2-2")
    assert sorted(c["model"] for c in result["candidates"]) == sorted(family)  # its family, nothing else
    found = {c["model"]: c["related"] for c in result["candidates"]}
    assert found == pair_verdicts(z, suspect, family), result["candidates"]
    parent = SUSPECTS[suspect][1]
    if parent is None:  # a null: no catalogued base, and the exact test had its say
        assert result["related"] == [] and result["verdict"] == "no catalogued base"
        assert sum(c["confirmed"] for c in result["candidates"]) == 2
    else:  # its base, and the catalogued fine-tune of that base (the same ancestry), nothing else
        assert sorted(result["related"]) == sorted({parent, f"{parent}-ft"} & set(family))
        assert result["candidates"][0]["log10_pvalue"] < -6 and result["candidates"][0]["derivation"]


def test_layers_follow_the_depth_change(zoo_catalog):
    z = zoo_catalog
    for suspect in ("depth-upscale", "layer-prune"):
        result = identify(z["catalog"], z["paths"][suspect], confirm=0)
        truth = [layer for _, layer in z["truths"][suspect]["layer_map"]]
        assert [x["sources"][0]["layer"] for x in result["layers"]] == truth
        assert all(x["sources"][0]["model"] in ("llama-0", "llama-0-ft") and x["sources"][0]["share"] == 1.0
                   for x in result["layers"])
    assert "depth up-scaled" in identify(z["catalog"], z["paths"]["depth-upscale"], confirm=0)["candidates"][0][
        "derivation"]


def test_cli_identify_writes_the_json(zoo_catalog, tmp_path, capsys):
    from tracing.catalog.cli import main

    z = zoo_catalog
    out = tmp_path / "id.json"
    assert main(["identify", "--catalog", str(z["catalog"]), z["paths"]["permute"], "--json", str(out),
                 "--confirm", "0", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: related: llama-0" in printed and "hidden units re-based" in printed
    doc = json.loads(out.read_text())
    assert doc["suspect"]["name"] == z["paths"]["permute"]
    assert {"model", "log10_pvalue", "related"} <= set(doc["candidates"][0])
    assert all({"layer", "sources"} <= set(x) for x in doc["layers"]) and len(doc["layers"]) == 4
    assert {"model", "layer", "share"} <= set(doc["layers"][0]["sources"][0])
    assert main(["list", "--catalog", str(z["catalog"])]) == 0 and "10 model(s)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["merge-linear", "passthrough"])
def test_a_merge_of_two_catalogued_models_gets_its_shares_per_layer(zoo_catalog, tokenizer, text_ids, tmp_path,
                                                                     kind):
    """Two catalogued parents: a 70/30 linear merge gets its shares back in every layer, a frankenmerge each
    layer's source model and layer; the JSON's layers carry them and the terminal says what was merged."""
    from tracing.catalog.cli import table

    z = zoo_catalog
    a, b = z["models"]["llama-0"], z["models"]["llama-1"]
    if kind == "merge-linear":
        d = derive(kind, a, tokenizer, text_ids, weights=(0.7, 0.3), models=(a, b))
        truth = [{"llama-0": 0.7, "llama-1": 0.3}] * 4
    else:
        d = derive(kind, a, tokenizer, text_ids, other=b, split=2)
        truth = [{"llama-0": 1.0}] * 2 + [{"llama-1": 1.0}] * 2
    result = identify(z["catalog"], str(save(d, tmp_path / kind)), confirm=0)
    assert {"llama-0", "llama-1"} <= set(result["related"])
    merge = result["merge"]
    assert merge["merge"] and merge["kind"] == ("linear" if kind == "merge-linear" else "passthrough"), merge
    for j, (layer, want) in enumerate(zip(result["layers"], truth)):
        got = {s["model"]: s for s in layer["sources"]}
        assert set(got) == set(want), layer
        for name, share in want.items():
            assert got[name]["share"] == pytest.approx(share, abs=0.05) and got[name]["layer"] == j
            assert got[name]["log10_pvalue"] < -6
    assert "attribution: " in table(result) and ("merge of" in merge["summary"] or "passthrough" in merge["summary"])


def test_a_derivative_of_one_base_keeps_the_fingerprint_layer_map(zoo_catalog):
    """llama-0 and its catalogued fine-tune are both related to a fine-tune of llama-0: least squares between
    relatives is no merge, and the layers stay the fingerprints' (share 1.0)."""
    z = zoo_catalog
    result = identify(z["catalog"], z["paths"]["finetune"], confirm=0)
    assert result["merge"] is not None and not result["merge"]["merge"], result["merge"]
    assert all(x["sources"][0]["share"] == 1.0 for x in result["layers"])


def test_tree_of_a_catalogue(zoo_catalog, tmp_path, capsys):
    """`tree` tests every catalogued pair and groups the catalogue into families: llama-0, its fine-tune and its
    layer-pruned copy are one family, llama-0 the parent of the pruned model (shapes say the direction; the 5-step
    fine-tune is too close for the weights' direction vote to be asked of it here); independent models are families
    of their own; the lineage YAML is written."""
    from tracing.catalog.cli import main

    z = zoo_catalog
    cat = tmp_path / "cat"
    add_models(cat, [(z["paths"][n], n) for n in ("llama-0", "llama-0-ft", "layer-prune", "llama-1", "gpt2-0",
                                                  "gpt2-1")])
    out = tmp_path / "tree"
    assert main(["tree", "--catalog", str(cat), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama-0 -> layer-prune" in printed, printed
    forest = json.loads((out / "tree.json").read_text())
    fams = sorted(sorted(f["members"]) for f in forest["families"])
    assert ["layer-prune", "llama-0", "llama-0-ft"] in fams
    assert not any("llama-1" in f or "gpt2-0" in f for f in fams if len(f) > 1)
    assert (out / "tree.yaml").read_text().strip() and (out / "tree.png").stat().st_size > 0


def test_add_twice_is_a_no_op(zoo_catalog, tmp_path, capsys):
    from tracing.catalog.cli import main

    z = zoo_catalog
    before = (z["catalog"] / "index.json").read_bytes()
    copy_dir = tmp_path / "same-weights"  # the same files elsewhere: the same content hash
    copy_dir.mkdir()
    for f in Path(z["paths"]["llama-1"]).iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    assert main(["add", "--catalog", str(z["catalog"]), z["paths"]["llama-1"], str(copy_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("is already catalogued as llama-1 (same content hash): nothing to do") == 2
    assert (z["catalog"] / "index.json").read_bytes() == before


def test_an_interrupted_add_leaves_a_valid_catalogue(zoo_catalog, tmp_path, monkeypatch):
    z = zoo_catalog
    cat_dir = tmp_path / "cat"
    add_models(cat_dir, [(z["paths"]["llama-0"], "llama-0")])
    before = (cat_dir / "index.json").read_bytes()

    def interrupted(path, data):  # the fingerprint is written, then Ctrl-C before the index
        if path.name == "index.json":
            raise KeyboardInterrupt
        atomic_write(path, data)

    monkeypatch.setattr("tracing.catalog.store.atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_models(cat_dir, [(z["paths"]["llama-1"], "llama-1")])
    monkeypatch.undo()
    assert (cat_dir / "index.json").read_bytes() == before  # the old index, whole
    assert [e["name"] for e in Catalog.open(cat_dir).entries] == ["llama-0"]
    assert not list(cat_dir.rglob("*.tmp"))
    out = add_models(cat_dir, [(z["paths"]["llama-1"], "llama-1")])  # the fingerprint written before is reused
    assert out["added"] == ["llama-1"]
    assert [e["name"] for e in Catalog.open(cat_dir).entries] == ["llama-0", "llama-1"]


def test_add_fans_out_as_jobs(zoo_catalog, tmp_path):
    z = zoo_catalog
    yaml = tmp_path / "models.yaml"
    yaml.write_text("models_1: [%s, %s]\nnames_1: [a, b]\n" % (z["paths"]["gpt2-1"], z["paths"]["gpt2-2"]))
    from tracing.model_lists import load_models

    out = add_models(tmp_path / "cat", load_models(yaml).models, cluster="debug")
    assert sorted(out["added"]) == ["a", "b"] and not out["failed"]
    assert sorted(e["name"] for e in Catalog.open(tmp_path / "cat").entries) == ["a", "b"]


def test_a_fingerprint_is_one_streaming_read_of_part_of_the_weights(zoo_catalog):
    z = zoo_catalog
    src = open_source(z["paths"]["llama-0"], progress=False)
    fp = build(src, Settings(), name="llama-0")
    total = sum(math.prod(src.shape(k)) * 4 for k in src.keys())  # float32 checkpoint
    assert src.read_bytes < 0.6 * total  # MLP up and gate/down rows, norm gains, anchor rows: not attention
    assert fp.meta["anchors"][:3] == ["a", "b", "c"] and len(fp.meta["anchors"]) == 48
    assert set(fp.arrays) >= {"csu.0", "in.0", "mate.0", "idx.0", "emb"}
    assert len(to_bytes(fp)) < fp.nbytes + 16_384


def test_sampled_units_keep_power_and_level(tokenizer):
    """With fewer kept units than MLP neurons (sample_rows < width) a derivative is still found, and the tests of
    independent models stay at their level."""
    settings = Settings(sample_rows=48)
    fps = [build(ModuleSource(zoo.tiny_model("llama", seed=s, vocab_size=len(tokenizer), layers=2,
                                             intermediate=160), tokenizer=tokenizer), settings, name=str(s))
           for s in range(8)]
    related = copy.deepcopy(zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), layers=2, intermediate=160))
    with torch.no_grad():
        for p in related.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    fp_r = build(ModuleSource(related, tokenizer=tokenizer), settings, name="r")
    null = []
    for test in ("fingerprint csu", "fingerprint match"):
        cols = shared_anchors(fps[0], fp_r) if test == "fingerprint match" else (None, None)
        assert _pair_test(test, fps[0], fp_r, 1, 1, cols, "fast", 0, None) < -20
        for a in range(0, 8, 2):
            for b in range(1, 8, 2):
                cols = shared_anchors(fps[a], fps[b]) if test == "fingerprint match" else (None, None)
                null += [_pair_test(test, fps[a], fps[b], i, i, cols, "fast", 0, None) for i in range(2)]
    assert sum(p < math.log10(0.01) for p in null) <= 2, null  # 64 null tests at the 1% level


# ---------------------------------------------------------------------- bad input: one line, exit 2
def run_cli(capsys, *argv) -> tuple[int, str]:
    from tracing.catalog.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert all(n in err for n in needles), err


@pytest.fixture
def small_catalog(zoo_catalog, tmp_path) -> Path:
    """A copy-free catalogue of two llama models (its own folder: tests damage it)."""
    z = zoo_catalog
    add_models(tmp_path / "small", [(z["paths"]["llama-0"], "llama-0"), (z["paths"]["llama-1"], "llama-1")])
    return tmp_path / "small"


def test_a_corrupt_index_is_one_line(small_catalog, zoo_catalog, capsys):
    (small_catalog / "index.json").write_text('{"schema": 1, "models": [')
    code, err = run_cli(capsys, "identify", "--catalog", str(small_catalog), zoo_catalog["paths"]["finetune"])
    assert code == 2
    assert_one_line(err, "index.json is corrupt", "rebuild the catalogue with add")


def test_a_corrupt_fingerprint_is_one_line(small_catalog, zoo_catalog, capsys):
    entry = Catalog.open(small_catalog).entry("llama-1")
    path = small_catalog / "fingerprints" / f"{entry['content_hash']}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    code, err = run_cli(capsys, "identify", "--catalog", str(small_catalog), zoo_catalog["paths"]["finetune"])
    assert code == 2
    assert_one_line(err, "is not a readable fingerprint", "remove llama-1 and add it again")


def test_a_newer_schema_is_one_line(small_catalog, zoo_catalog, capsys):
    index = json.loads((small_catalog / "index.json").read_text())
    (small_catalog / "index.json").write_text(json.dumps({**index, "schema": INDEX_SCHEMA + 1}))
    code, err = run_cli(capsys, "list", "--catalog", str(small_catalog))
    assert code == 2
    assert_one_line(err, f"catalogue schema {INDEX_SCHEMA + 1}", "upgrade model-tracing")
    (small_catalog / "index.json").write_text(json.dumps(index))
    cat = Catalog.open(small_catalog)
    fp = cat.load(cat.entry("llama-0"))
    fp.meta["schema"] = SCHEMA + 1
    cat.write_fingerprint(fp)
    code, err = run_cli(capsys, "identify", "--catalog", str(small_catalog), zoo_catalog["paths"]["finetune"])
    assert code == 2
    assert_one_line(err, f"fingerprint schema {SCHEMA + 1}", "upgrade model-tracing")


def test_a_suspect_of_another_architecture_is_one_line(small_catalog, zoo_catalog, capsys):
    code, err = run_cli(capsys, "identify", "--catalog", str(small_catalog), zoo_catalog["paths"]["gpt2-permute"])
    assert code == 2
    assert_one_line(err, "no catalogued model is of the gpt2 family", "llama (2)", "add a base of its family")


def test_a_mixture_of_experts_is_one_line(small_catalog, tmp_path, capsys):
    from tracing.catalog.cli import main

    zoo.tiny_model("mixtral", seed=0).save_pretrained(tmp_path / "moe")
    capsys.readouterr()
    assert main(["add", "--catalog", str(small_catalog), str(tmp_path / "moe")]) == 2
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "mixture of experts (mixtral)" in failed[0] and "pair by pair" in failed[0]


def test_removing_an_unknown_name_is_one_line(small_catalog, capsys):
    code, err = run_cli(capsys, "remove", "--catalog", str(small_catalog), "llama-7")
    assert code == 2
    assert_one_line(err, "llama-7 is not in catalogue", "did you mean llama-1", "catalogued: llama-0, llama-1")
    assert run_cli(capsys, "remove", "--catalog", str(small_catalog), "llama-1")[0] == 0
    assert [e["name"] for e in Catalog.open(small_catalog).entries] == ["llama-0"]
    assert len(list((small_catalog / "fingerprints").iterdir())) == 1  # its fingerprint went with it


def test_an_empty_or_missing_catalogue_is_one_line(zoo_catalog, tmp_path, capsys):
    code, err = run_cli(capsys, "identify", "--catalog", str(tmp_path / "none"), zoo_catalog["paths"]["finetune"])
    assert code == 2
    assert_one_line(err, "no catalogue at", "python -m tracing.catalog add --catalog")
    Catalog.create(tmp_path / "empty", Settings())
    code, err = run_cli(capsys, "identify", "--catalog", str(tmp_path / "empty"), zoo_catalog["paths"]["finetune"])
    assert code == 2
    assert_one_line(err, "has no models", "python -m tracing.catalog add --catalog")


def test_other_settings_for_an_existing_catalogue_are_one_line(small_catalog, zoo_catalog, capsys):
    code, err = run_cli(capsys, "add", "--catalog", str(small_catalog), "--sketch_dims", "16",
                        zoo_catalog["paths"]["gpt2-0"])
    assert code == 2
    assert_one_line(err, "was made with", "start another catalogue")
