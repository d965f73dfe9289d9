"""Derivation recipes: every kind on every family it supports gives a checkpoint that loads (whole and streamed)
as the derived weights, with a ground truth that is plain data and right where it can be checked exactly."""

import copy
import inspect
import json

import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec, mlp
from tracing.derivations import KINDS, TRUTH_FIELDS, derive, save
from tracing.derivations.core import BASE
from tracing.derivations.merges import bernoulli, magnitude, slerp, task_vectors
from tracing.derivations.quant import absmax_round_trip
from tracing.derivations.width import _FUSED_QKV
from tracing.errors import TracingError
from tracing.models import load_model
from tracing.sources import open_source

FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2")
SHAPES = {"gpt2": dict(intermediate=256, max_positions=1024)}  # what transformers' GGUF reader assumes for gpt2
REFUSED = {"gpt_neox": {"rotate", "quant-gguf-q8_0", "quant-gguf-q4_0"}, "gpt2": {"rotate"}}
FAST = dict(steps=2)  # every option that trains: a couple of steps (steps=0 below where exactness is checked)


@pytest.fixture(scope="module")
def bases(tokenizer, text_ids) -> dict:
    """family -> a 4-block base, trained a few steps (norm gains and weights away from their init)."""
    out = {}
    for family in FAMILIES:
        model = zoo.tiny_model(family, seed=0, vocab_size=len(tokenizer), layers=4, **SHAPES.get(family, {}))
        out[family] = zoo.finetune(model, text_ids, steps=3, lr=1e-2)
    return out


@pytest.fixture(scope="module")
def base_dirs(bases, tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bases")
    for family, model in bases.items():
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return {f: str(root / f) for f in bases}


def _fast(kind: str, **options) -> dict:
    params = inspect.signature(KINDS[kind].fn).parameters
    return {**{k: v for k, v in FAST.items() if k in params}, **options}


def _blocks(model, layer: int) -> dict:
    spec = get_spec(model.config)
    return {spec.local_key(k): v for k, v in model.state_dict().items() if spec.layer_of.get(k) == layer}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[:64].view(1, -1)).logits


# ---------------------------------------------------------------------- every kind, every family
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_saves_a_checkpoint_that_loads_as_the_derived_weights(family, bases, base_dirs, tokenizer,
                                                                         text_ids, tmp_path):
    base = bases[family]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for kind, info in KINDS.items():
        if kind in REFUSED.get(family, ()):
            with pytest.raises(TracingError, match=f"{kind} is not possible for {family}"):
                derive(kind, base, tokenizer, text_ids, **_fast(kind))
            assert info.refusal(base.config)
            continue
        d = derive(kind, base, tokenizer, text_ids, **_fast(kind))
        path = save(d, tmp_path / kind, base_dir=base_dirs[family])
        truth = json.loads((tmp_path / kind / "truth.json").read_text())
        assert truth == d.truth and set(truth) == set(TRUTH_FIELDS), kind
        assert truth["kind"] == kind and truth["derived"] == info.derived
        assert truth["widths"]["layers"][0] == len(truth["layer_map"]) == get_spec(d.model.config).n_layers
        mine = d.model.state_dict()
        loaded, tok = load_model(str(path), progress=False)
        assert set(loaded.state_dict()) == set(mine), kind
        assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items()), kind
        src = open_source(str(path), progress=False)
        assert set(src.keys()) == set(mine) and all(torch.equal(src.get(k), mine[k]) for k in mine), kind
        text = "The mother tongue of Hana is Swahili."
        assert tok(text)["input_ids"] == d.tokenizer(text)["input_ids"], kind
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # no recipe touched the base


# ---------------------------------------------------------------------- truths checked exactly
def test_merge_linear_with_shares_one_and_zero_is_parent_a_bit_for_bit(bases, tokenizer, text_ids):
    base = bases["llama"]
    d = derive("merge-linear", base, tokenizer, text_ids, weights=(1.0, 0.0), steps=2)
    a = d.parents["ft-a"].state_dict()
    assert all(torch.equal(v, a[k]) for k, v in d.model.state_dict().items())
    assert d.truth["shares"] == [{"ft-a": 1.0, "ft-b": 0.0}] * 4 and d.truth["lineage"]["ft-b"]["from"] == [BASE]
    t0 = derive("merge-slerp", base, tokenizer, text_ids, t=0.0, models=(d.parents["ft-a"], d.parents["ft-b"]))
    assert all(torch.equal(v, a[k]) for k, v in t0.model.state_dict().items())
    ta = derive("merge-task-arithmetic", base, tokenizer, text_ids, weights=(0.0, 0.0), steps=2)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ta.model.state_dict().items())
    assert ta.truth["shares"][0] == {BASE: 1.0, "ft-a": 0.0, "ft-b": 0.0}


def test_merge_methods_compute_what_mergekit_computes():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, 1.0, 1.0, 0.0])
    # TIES: elected sign of the summed deltas (+, -, +, +); b agrees only on entry 2; divide by agreeing weights
    assert torch.equal(task_vectors(base, [a, b], (1.0, 1.0), None, True, True), torch.tensor([1.0, -2.0, 2.0, 0.5]))
    assert torch.equal(task_vectors(base, [a, b], (1.0, 1.0), None, False, False), a + b)  # task arithmetic
    assert torch.equal(magnitude(a, 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0]))  # the two largest |delta|
    dropped = bernoulli(torch.ones(10_000), 0.25, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0.0, 4.0} and abs(dropped.mean().item() - 1.0) < 0.05  # 1/density
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.5, v0, v1), torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))  # on the arc, not the chord


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_passthrough_blocks_are_their_sources(family, bases, tokenizer, text_ids):
    d = derive("passthrough", bases[family], tokenizer, text_ids, split=1, steps=2)
    models = {BASE: bases[family], **d.parents}
    assert [src for src, _ in d.truth["layer_map"]] == [BASE, "independent-1", "independent-1", "independent-1"]
    for layer, (src, i) in enumerate(d.truth["layer_map"]):
        mine, theirs = _blocks(d.model, layer), _blocks(models[src], i)
        assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert torch.equal(d.model.get_input_embeddings().weight, bases[family].get_input_embeddings().weight)


@pytest.mark.parametrize("kind, options, layers", [("layer-prune", {}, [0, 1, 3]),
                                                    ("layer-prune", {"drop": [0, 2]}, [1, 3]),
                                                    ("depth-upscale", {"steps": 0}, [0, 1, 2, 1, 2, 3])])
def test_unhealed_layer_surgery_keeps_each_block_bit_for_bit(kind, options, layers, bases, tokenizer, text_ids):
    for family in ("qwen2", "gpt_neox"):
        base = bases[family]
        d = derive(kind, base, tokenizer, text_ids, **options)
        assert d.truth["layer_map"] == [[BASE, i] for i in layers]
        for layer, i in enumerate(layers):
            mine, theirs = _blocks(d.model, layer), _blocks(base, i)
            assert all(torch.equal(v, theirs[k]) for k, v in mine.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_width_pruned_mlp_keeps_the_kept_neurons_bit_for_bit(family, bases, tokenizer, text_ids):
    base = bases[family]
    d = derive("width-prune-mlp", base, tokenizer, text_ids, keep=0.5)
    spec, new = get_spec(base.config), get_spec(d.model.config)
    for i, kept in enumerate(d.truth["kept"]["mlp"]):
        assert len(kept) == len(set(kept)) == d.truth["widths"]["mlp"][0] == d.truth["widths"]["mlp"][1] // 2
        for key in spec.keys_for(mlp(i)):
            want = base.state_dict()[key].index_select(spec.axis(key, mlp(i)), torch.tensor(kept))
            assert torch.equal(d.model.state_dict()[key], want), key
    assert new.n_layers == spec.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_width_pruned_hidden_keeps_the_kept_channels(family, bases, tokenizer, text_ids):
    base = bases[family]
    d = derive("width-prune-hidden", base, tokenizer, text_ids, keep=0.5, steps=0)
    kept = torch.tensor(d.truth["kept"]["hidden"])
    assert d.truth["widths"]["hidden"] == [32, 64] and len(kept) == 32
    spec = get_spec(base.config)
    want = base.state_dict()[spec.embed].index_select(1, kept)
    assert torch.equal(d.model.get_input_embeddings().weight, want)
    if family in _FUSED_QKV:  # attention width tied to the hidden size: whole heads go too
        assert d.truth["widths"]["heads"] == [2, 4] and all(len(h) == 2 for h in d.truth["kept"]["heads"])


@pytest.mark.parametrize("family", sorted(_FUSED_QKV))
def test_fused_qkv_layouts_are_the_models_own(family, bases, text_ids):
    """Reordering heads with the layout's indices (q/k/v rows and the output projection's inputs) keeps logits."""
    model = copy.deepcopy(bases[family])
    spec, n = get_spec(model.config), model.config.num_attention_heads
    hs = model.config.hidden_size // n
    before = _logits(model, text_ids)
    order = torch.tensor([2, 0, 3, 1])
    qkv = _FUSED_QKV[family](order, n, hs)
    per_head = torch.cat([h * hs + torch.arange(hs) for h in order.tolist()])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for roles in spec.layers:
            for key, index in ((roles.attn_in[0], qkv), (roles.attn_out, per_head)):
                axis = spec.axes[key].index(None)
                params[key].copy_(params[key].index_select(axis, index))
            params[roles.attn_in[0].removesuffix("weight") + "bias"].copy_(
                params[roles.attn_in[0].removesuffix("weight") + "bias"][qkv])
    assert torch.allclose(_logits(model, text_ids), before, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_permute_and_rotate_keep_the_logits(family, bases, tokenizer, text_ids):
    base = bases[family]
    want = _logits(base, text_ids)
    for kind in ("permute", "rotate"):
        if kind in REFUSED.get(family, ()):
            continue
        d = derive(kind, base, tokenizer, text_ids)
        assert d.truth["permuted" if kind == "permute" else "rotated"] is True
        assert not torch.equal(d.model.get_input_embeddings().weight, base.get_input_embeddings().weight)
        assert (_logits(d.model, text_ids) - want).abs().max() < 1e-4, kind


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantization_round_trips_stay_within_their_step(family, bases, tokenizer, text_ids):
    """Each value moves by at most half a step (step = absmax / (2^(bits-1) - 1) of its row or group of 32). GGUF
    keeps each block's scale in fp16 (off by up to 2^-11, times codes up to 127 for Q8_0); Q4_0's scale is
    absmax / 8 with codes -8..7, so the far end of a block moves by one of its steps (7/8 of ours)."""
    base = bases[family]
    spec, sd = get_spec(base.config), base.state_dict()
    for kind, bits, group, tol in (("quant-int8", 8, None, 0.5), ("quant-int4", 4, 32, 0.5),
                                   ("quant-gguf-q8_0", 8, 32, 0.5 + 127 * 2 ** -11),
                                   ("quant-gguf-q4_0", 4, 32, 7 / 8 * (1 + 16 * 2 ** -11))):
        d = derive(kind, base, tokenizer, text_ids)
        assert d.truth["quant"]["bits"] == bits and d.truth["quant"]["format"].startswith(("int", "gguf"))
        changed = 0
        for key, q in d.model.state_dict().items():
            w = sd[key]
            if torch.equal(q, w):  # int8/int4 quantize the block matrices only, GGUF every matrix
                assert q.dim() < 2 or (kind.startswith("quant-int") and key not in spec.layer_of), (kind, key)
                continue
            changed += 1
            a, aq = (w.T, q.T) if spec.conv1d and key in spec.layer_of else (w, q)  # quantized along its rows
            blocks = a.reshape(a.shape[0], -1, group or a.shape[1])  # (rows, groups, group)
            step = blocks.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
            assert ((aq - a).reshape(blocks.shape).abs() <= tol * step + 1e-7).all(), (kind, key)
        assert changed >= 4 * spec.n_layers, kind
    on_grid = torch.tensor([[7.0, -3.0, 1.0, 0.0]])  # int4, absmax 7: step 1
    assert torch.equal(absmax_round_trip(on_grid, 4), on_grid)
    assert torch.equal(absmax_round_trip(torch.tensor([[7.0, 0.4, -0.6]]), 4), torch.tensor([[7.0, 0.0, -1.0]]))


def test_vocab_extend_keeps_the_old_rows_and_adds_tokens(bases, tokenizer, text_ids):
    for family in ("llama", "gpt_neox", "gpt2"):
        base = bases[family]
        d = derive("vocab-extend", base, tokenizer, text_ids, new_tokens=16, steps=0)
        n = len(tokenizer)
        assert len(d.tokenizer) == n + 16 and d.truth["widths"]["vocab"] == [n + 16, n]
        assert d.truth["vocab"] == "extended"
        for mine, old in ((d.model.get_input_embeddings(), base.get_input_embeddings()),
                          (d.model.get_output_embeddings(), base.get_output_embeddings())):
            assert torch.equal(mine.weight[:n], old.weight)
        text = zoo.synthetic_text(20, seed=3)
        assert max(d.tokenizer(text)["input_ids"]) >= n  # the new tokens are used


def test_tokenizer_transplant_keeps_the_blocks_and_replaces_the_vocabulary(bases, tokenizer, text_ids):
    base = bases["llama"]
    d = derive("tokenizer-transplant", base, tokenizer, text_ids, steps=0)
    assert d.truth["vocab"] == "replaced" and len(d.tokenizer) != len(tokenizer)
    for layer in range(4):
        assert all(torch.equal(v, _blocks(base, layer)[k]) for k, v in _blocks(d.model, layer).items())
    shared = [t for t in tokenizer.get_vocab() if t in d.tokenizer.get_vocab()]
    assert sum(tokenizer.convert_tokens_to_ids(t) == d.tokenizer.convert_tokens_to_ids(t) for t in shared) < 20
    assert d.tokenizer.pad_token_id == tokenizer.pad_token_id and d.tokenizer.eos_token_id == tokenizer.eos_token_id


def test_lora_adapter_names_its_base_and_needs_it(bases, base_dirs, tokenizer, text_ids, tmp_path):
    d = derive("lora-adapter", bases["gpt2"], tokenizer, text_ids, rank=4, steps=2)
    assert d.truth["adapter"] == {"rank": 4, "alpha": 16, "targets": ["c_attn", "c_fc", "c_proj"], "merged": False}
    with pytest.raises(TracingError, match="pass base_dir="):
        save(d, tmp_path / "a")
    path = save(d, tmp_path / "b", base_dir=base_dirs["gpt2"])
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base_dirs["gpt2"] and cfg["r"] == 4


def test_nulls_are_not_derived_and_name_their_roots(bases, tokenizer, text_ids):
    base = bases["llama"]
    for kind in ("independent", "damaged-duplicated", "merge-of-independents"):
        d = derive(kind, base, tokenizer, text_ids, steps=2)
        assert d.truth["derived"] is False and KINDS[kind].derived is False
        assert all(src.startswith("independent-") for src, _ in d.truth["layer_map"])
        assert not any(torch.equal(v, base.state_dict()[k]) for k, v in d.model.state_dict().items() if v.dim() == 2)
    dup = derive("damaged-duplicated", base, tokenizer, text_ids, steps=2).model
    up = dup.state_dict()[get_spec(dup.config).layers[0].up]
    assert len(torch.unique(up, dim=0)) == up.shape[0] // 2  # half of the neurons are copies of the others


def test_recipes_are_deterministic(bases, tokenizer, text_ids):
    for kind in ("finetune", "merge-dare", "width-prune-hidden", "lora"):
        one, two = (derive(kind, bases["llama"], tokenizer, text_ids, **_fast(kind)) for _ in range(2))
        assert all(torch.equal(v, two.model.state_dict()[k]) for k, v in one.model.state_dict().items()), kind


# ---------------------------------------------------------------------- bad input: one line naming the fix
@pytest.mark.parametrize("kind, options, message", [
    ("merge-line", {}, "unknown derivation kind 'merge-line' \\(did you mean merge-linear\\?\\)"),
    ("layer-prune", {"drop": [0, 1, 2, 3]}, "must name between 1 and 3"),
    ("depth-upscale", {"front": 0}, "must satisfy 0 < front <= 4"),
    ("passthrough", {"split": 4}, "split=4 must be between 1 and 3"),
    ("vocab-extend", {"new_tokens": 100_000}, "ask for new_tokens="),
    ("quant-int4", {"group": 48}, "groups of 48 do not divide"),
])
def test_bad_options_are_one_line_errors(kind, options, message, bases, tokenizer, text_ids):
    with pytest.raises(TracingError, match=message):
        derive(kind, bases["llama"], tokenizer, text_ids, **options)


def test_gguf_refuses_a_gpt2_shape_transformers_would_read_wrong(tokenizer, text_ids):
    model = zoo.tiny_model("gpt2", vocab_size=len(tokenizer), layers=2)  # MLP 128, 256 positions
    with pytest.raises(TracingError, match="quant-gguf-q4_0 is not possible for gpt2: .*intermediate=256"):
        derive("quant-gguf-q4_0", model, tokenizer, text_ids)
