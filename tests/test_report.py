"""The fine-tuning diff report: weight change, hidden-state similarity, prediction change, report files."""

import copy
import json

import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.errors import TracingError
from tracing.report import read_prompts, write_report
from tracing.report.hidden import (
    compare_words,
    find_word,
    forward,
    token_similarity,
    word_position,
)
from tracing.report.predict import (
    continuation_ids,
    continuation_logprob,
    next_token_change,
    perplexity,
    score_targets,
    token_entropy,
)
from tracing.report.weights import effective_rank, weight_diff

FAMILIES = ("llama", "gpt2")
SHAPE = dict(hidden=32, layers=3, intermediate=64)


@pytest.fixture(scope="module")
def models(tokenizer):
    """family -> (base, spec), tiny random models sharing the session tokenizer."""
    out = {}
    for fam in FAMILIES:
        m = zoo.tiny_model(fam, seed=0, vocab_size=len(tokenizer), **SHAPE)
        out[fam] = (m, get_spec(m.config))
    return out


@torch.no_grad()
def plant_low_rank(model, keys, rank=2, scale=0.5, seed=0):
    """Add a random rank-`rank` matrix u vᵀ to each weight in `keys`."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k in keys:
        w = sd[k]  # (m, n)
        u, v = torch.randn(w.shape[0], rank, generator=g), torch.randn(w.shape[1], rank, generator=g)
        delta = u @ v.T
        w += scale * delta * w.norm() / delta.norm()


def planted_keys(spec):
    """Exactly three matrices in two of the three layers: an MLP input, an attention input, an output."""
    return [spec.layers[0].up, spec.layers[2].attn_in[0], spec.layers[2].down]


@pytest.fixture(scope="module")
def planted(models):
    out = {}
    for fam, (base, spec) in models.items():
        ft = copy.deepcopy(base)
        plant_low_rank(ft, planted_keys(spec))
        out[fam] = ft
    return out


def test_effective_rank_counts_singular_values_up_to_the_energy_fraction():
    d = torch.diag(torch.tensor([3.0, 1.0, 0.1]))  # energies 9, 1, 0.01: top-1 holds 0.899, top-2 0.999
    assert effective_rank(d, 0.85) == 1
    assert effective_rank(d, 0.9) == 2
    assert effective_rank(d, 1.0) == 3
    assert effective_rank(torch.zeros(4, 5)) == 0


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_chunked_gram_energies_equal_singular_values(shape, monkeypatch):
    from tracing.report import weights as report_weights

    monkeypatch.setattr(report_weights, "CHUNK", 7)  # several chunks along the long axis
    d = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def part(start, stop, axis):
        return d.narrow(axis, start, min(stop, d.shape[axis]) - start)

    e, frob2 = report_weights._sq_singular_values(part, shape)
    torch.testing.assert_close(e, torch.linalg.svdvals(d) ** 2)
    assert frob2 == pytest.approx(float(d.pow(2).sum()))


@pytest.mark.parametrize("fam", FAMILIES)
def test_planted_low_rank_update_shows_in_exactly_the_modified_modules(fam, models, planted):
    base, spec = models[fam]
    diff = weight_diff(base, planted[fam], spec, progress=False)
    touched = set(planted_keys(spec))
    rows = {r["key"]: r for r in diff["per_key"]}
    assert touched <= set(rows)
    for key, r in rows.items():
        if key in touched:
            assert 1 <= r["eff_rank"] <= 2, key
            assert r["rel_change"] == pytest.approx(0.5, rel=1e-4), key
        else:
            assert r["rel_change"] == 0.0 and r["eff_rank"] in (0, None), key
    # the layer x module grid puts the change in the right cells and nowhere else
    changed_cells = {(i, diff["modules"][j]) for i, row in enumerate(diff["rel_change"])
                     for j, v in enumerate(row) if v}
    assert changed_cells == {(rows[k]["layer"], rows[k]["module"]) for k in touched}


@pytest.mark.parametrize("fam", zoo.FAMILIES)
def test_every_weight_of_every_family_gets_its_own_layer_module_cell(fam):
    base = zoo.tiny_model(fam, seed=0, vocab_size=64, hidden=16, layers=2, intermediate=32, heads=2, kv_heads=1)
    spec = get_spec(base.config)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        buffers = [b for k, b in ft.named_buffers() if k in spec.axes]  # e.g. DeepSeek-V3's expert score bias
        for p in [*ft.parameters(), *buffers]:
            p.add_(0.01)
    diff = weight_diff(base, ft, spec, progress=False)
    cells = [(r["layer"], r["module"]) for r in diff["per_key"]]
    assert len(cells) == len(set(cells))  # no two weights share a cell
    assert {r["layer"] for r in diff["per_key"]} == {None, 0, 1}
    assert all(r["abs_change"] > 0 for r in diff["per_key"])
    n_cells = sum(v is not None for row in diff["abs_change"] for v in row)
    assert n_cells == len(diff["per_key"]) - len(diff["globals"])


def test_a_merged_peft_lora_is_low_rank_in_its_target_modules(models, tmp_path):
    peft = pytest.importorskip("peft")
    from tracing.models import load_model

    base, spec = models["llama"]
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(base), cfg)
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "lora" / "adapter_config.json").read_text()),
         "base_model_name_or_path": str(tmp_path / "base")}))
    ft, _ = load_model(str(tmp_path / "lora"), device="cpu", progress=False)
    diff = weight_diff(base, ft, spec, progress=False)
    for r in diff["per_key"]:
        if r["module"] in ("q", "v"):
            assert 1 <= r["eff_rank"] <= 2 and r["rel_change"] > 0, r["key"]
        else:
            assert r["rel_change"] == 0.0, r["key"]


def test_weight_report_refuses_models_of_different_shapes(models, tokenizer):
    base, spec = models["llama"]
    wider = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), hidden=32, layers=3, intermediate=96)
    with pytest.raises(TracingError, match="same architecture and shape"):
        weight_diff(base, wider, spec, progress=False)


@pytest.mark.parametrize("fam", FAMILIES)
def test_identical_models_have_zero_change_and_similarity_one(fam, models, tokenizer):
    base, spec = models[fam]
    twin = copy.deepcopy(base)
    diff = weight_diff(base, twin, spec, progress=False)
    assert all(r["rel_change"] == 0.0 and r["eff_rank"] in (0, None) for r in diff["per_key"])
    ids = tokenizer("The mother tongue of Ada is English.")["input_ids"]
    sim = token_similarity(forward(base, ids)[0], forward(twin, ids)[0])
    assert sim.shape == (spec.n_layers + 1, len(ids))
    torch.testing.assert_close(sim, torch.ones_like(sim), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_changing_only_layer_k_moves_hidden_states_from_its_output_on(fam, k, models, tokenizer):
    base, spec = models[fam]
    ft = copy.deepcopy(base)
    plant_low_rank(ft, [spec.layers[k].down], scale=1.0)
    ids = tokenizer("Every old bridge near Oslo is quiet, says Ada.")["input_ids"]
    sim = token_similarity(forward(base, ids)[0], forward(ft, ids)[0])  # (L+1, T)
    # hidden_states[0] is the embedding output, hidden_states[i+1] the output of layer i
    torch.testing.assert_close(sim[:k + 1], torch.ones_like(sim[:k + 1]), rtol=0, atol=1e-12)
    assert (sim[k + 1:].min(dim=1).values < 0.999).all()


def test_find_word_points_at_the_last_sub_token_of_the_first_occurrence(tokenizer):
    ids = tokenizer("Ada visits Paris and Paris again")["input_ids"]
    word = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    pos = find_word(tokenizer, ids, "Paris")
    assert ids[pos - len(word) + 1:pos + 1] == word
    assert pos < len(ids) - 2  # the first of the two occurrences
    assert find_word(tokenizer, ids, "Lagos") is None


def test_word_position_follows_characters_not_the_first_matching_token(tokenizer):
    text = "Ada went from Paris to Lima and Paris"
    ids = tokenizer(text)["input_ids"]
    assert word_position(tokenizer, text, "Paris") == find_word(tokenizer, ids, "Paris")
    assert word_position(tokenizer, text, "Lima") == find_word(tokenizer, ids, "Lima")
    assert word_position(tokenizer, text, "Par") is None  # whole words only


def test_compare_reads_the_substituted_word_even_if_it_occurs_earlier(models, tokenizer):
    base, _ = models["llama"]
    template = "Ada went from Paris to Lima"  # Lima -> Paris: the state is read at the second Paris
    c = compare_words(base, base, tokenizer, "Lima", "Paris", [template])
    ha, _ = forward(base, tokenizer(template)["input_ids"])
    hb, _ = forward(base, tokenizer("Ada went from Paris to Paris")["input_ids"])
    expected = [float(torch.nn.functional.cosine_similarity(a[-1].double(), b[-1].double(), dim=0))
                for a, b in zip(ha, hb)]
    assert c["base_vs_base"] == pytest.approx(expected, abs=1e-12)


def test_compare_for_an_unchanged_model_equals_the_base_curve(models, tokenizer):
    base, _ = models["llama"]
    c = compare_words(base, copy.deepcopy(base), tokenizer, "Lima", "Paris", ["Ada visits the old bridge in Lima."])
    assert c["templates"] == ["Ada visits the old bridge in Lima."]
    assert c["ft_vs_base"] == pytest.approx(c["base_vs_base"], abs=1e-12)
    assert max(c["base_vs_base"]) < 1.0  # different words, different states


def test_target_logprob_equals_a_direct_computation(models, planted, tokenizer):
    base, _ = models["gpt2"]
    prompt = "The mother tongue of Ada is"
    p_ids, c_ids = continuation_ids(tokenizer, prompt, "Portuguese")
    assert len(c_ids) >= 2  # a multi-token continuation: every token counts
    ids = torch.tensor([p_ids + c_ids])
    labels = ids.clone()
    labels[0, :len(p_ids)] = -100  # score only the continuation
    with torch.no_grad():
        direct = -base(input_ids=ids, labels=labels).loss.item() * len(c_ids)
    assert continuation_logprob(base, p_ids, c_ids) == pytest.approx(direct, rel=1e-5)
    rows = score_targets(base, planted["gpt2"], tokenizer, prompt, ["English", "Portuguese"])
    assert [r["target"] for r in rows] == ["English", "Portuguese"]
    assert rows[1]["logp_base"] == pytest.approx(direct, rel=1e-5)
    assert rows[1]["delta"] == pytest.approx(rows[1]["logp_ft"] - rows[1]["logp_base"])


def test_prediction_tables_and_perplexity(models, planted, tokenizer):
    base, _ = models["llama"]
    ids = tokenizer("In Paris there are 3 old towers")["input_ids"]
    _, lb = forward(base, ids)
    same = next_token_change(lb[-1], lb[-1].clone(), tokenizer, top_k=4)
    assert same["top_base"] == same["top_ft"] and len(same["top_base"]) == 4
    assert all(m["delta"] == 0.0 for m in same["moved"])
    _, lf = forward(planted["llama"], ids)
    moved = next_token_change(lb[-1], lf[-1], tokenizer, top_k=4)["moved"]
    assert abs(moved[0]["delta"]) >= abs(moved[-1]["delta"]) > 0
    with torch.no_grad():
        loss = base(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert perplexity(lb, ids) == pytest.approx(float(torch.tensor(loss).exp()), rel=1e-5)


def test_masked_logits_give_finite_entropy_and_moves(tokenizer):
    """A logit of -inf (a masked token) has probability 0: it adds 0 to the entropy and, masked in both
    models, has not moved; neither may turn into nan."""
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, -inf, -inf], [0.0, 1.0, 2.0, 3.0]])  # (T, V)
    ent = token_entropy(logits)
    assert ent[0] == pytest.approx(float(torch.tensor(2.0).log()))
    assert ent[1] == pytest.approx(token_entropy(logits[1:])[0]) and all(e == e for e in ent)
    change = next_token_change(logits[0], torch.tensor([1.0, 0.0, -inf, 0.0]), tokenizer, top_k=4)
    deltas = {m["id"]: m["delta"] for m in change["moved"]}
    assert deltas[2] == 0.0 and deltas[3] == inf and all(d == d for d in deltas.values())


def test_a_zero_weight_that_changed_does_not_make_its_layer_untouched(models, tokenizer, tmp_path):
    base, spec = models["llama"]
    base, ft = copy.deepcopy(base), copy.deepcopy(base)
    key = spec.layers[1].pre_mlp_norm
    with torch.no_grad():
        base.state_dict()[key].zero_()  # W = 0, so ‖ΔW‖/‖W‖ is undefined (None)
    res = write_report(base, ft, tokenizer, tokenizer, spec, tmp_path, prompts=["Ada visits Lima."],
                       progress=False)
    assert [r["rel_change"] for r in res["weights"]["per_key"] if r["key"] == key] == [None]
    untouched = next(line for line in (tmp_path / "report.md").read_text().splitlines()
                     if line.startswith("Layers with no weight change"))
    assert "`model.layers.0`" in untouched and "`model.layers.2`" in untouched
    assert "`model.layers.1`" not in untouched


@pytest.fixture(scope="module")
def report(models, planted, tokenizer, tmp_path_factory):
    base, spec = models["llama"]
    out = tmp_path_factory.mktemp("report")
    prompts = ["The capital of France is foo.", "The mother tongue of Ada is"]
    res = write_report(base, planted["llama"], tokenizer, tokenizer, spec, out, prompts=prompts,
                       focus_token="foo", compare=("foo", "Paris"), targets=["English", "French"], top_k=3,
                       progress=False)
    return out, res, spec


def test_report_files_exist_and_name_the_changed_modules(report):
    out, res, spec = report
    text = (out / "report.md").read_text()
    for key in planted_keys(spec):
        assert f"`{key}`" in text
    assert "model.layers.1" in text  # the untouched layer is named too
    assert len(res["figures"]) == 6  # 2 weight grids, 2 prompts, focus token, compare
    for name in res["figures"]:
        assert (out / name).stat().st_size > 1000, name


def test_report_numbers_are_plain_data_and_consistent(report):
    _, res, spec = report
    json.dumps(res, allow_nan=False)  # plain data only: no tensors, numpy scalars or NaN
    first = res["prompts_detail"][0]
    assert [f["prompt"] for f in res["focus"]] == ["The capital of France is foo."]
    pos = res["focus"][0]["position"]
    assert res["focus"][0]["similarity"] == [row[pos] for row in first["similarity"]]
    assert len(res["compare"]["ft_vs_base"]) == spec.n_layers + 1
    assert [t["target"] for t in first["targets"]] == ["English", "French"]
    assert first["first_changed_state"] == 1  # layer 0's up_proj is the first changed weight


def test_report_input_errors(models, tokenizer, tmp_path):
    base, spec = models["llama"]
    with pytest.raises(TracingError, match="occurs in none of the prompts"):
        write_report(base, base, tokenizer, tokenizer, spec, tmp_path, prompts=["Ada visits Lima."],
                     focus_token="Kyoto", progress=False)
    with pytest.raises(TracingError, match="foo=Paris"):
        write_report(base, base, tokenizer, tokenizer, spec, tmp_path, compare=("foo",), progress=False)


def test_read_prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("The capital of France is\n\n  The mother tongue of Ada is  \n")
    assert read_prompts(p) == ["The capital of France is", "The mother tongue of Ada is"]
    p.write_text("\n \n")
    with pytest.raises(TracingError, match="one prompt per line"):
        read_prompts(p)
    with pytest.raises(TracingError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
