"""One forward pass per model, streaming Gram accumulators: same matching as the full activation matrices."""

import copy

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tracing import grams, matching, zoo
from tracing.activations import sample_activations, sample_positions
from tracing.arch import get_spec
from tracing.cosines import LazyCosine, cpu_has_bf16
from tracing.errors import TracingError
from tracing.grams import layer_grams
from tracing.matching import euclid_similarity, pair_units


@pytest.fixture(scope="module", params=[48, 320], ids=["sums", "activations"])
def pair(request):
    """120 tokens: with 48 units a layer keeps its Gram sums (48² < 120·96 values), with 320 the activations."""
    a = zoo.tiny_model("llama", seed=0, vocab_size=256, hidden=32, layers=3, intermediate=request.param, heads=2,
                       kv_heads=1)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    blocks = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(2))  # (n_blocks, T)
    return a, b, get_spec(a.config), blocks


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_streaming_gram_equals_full_activation_matrices(pair):
    a, b, spec, blocks = pair
    full_a = sample_activations(a, spec, blocks, progress=False)  # (proj, layer) -> (tokens, width)
    full_b = sample_activations(b, spec, blocks, progress=False)
    for lg in layer_grams(a, b, spec, spec, blocks, batch_size=2, progress=False):
        for proj in ("gate", "up"):
            xa, xb = full_a[proj, lg.layer].double(), full_b[proj, lg.layer].double()
            torch.testing.assert_close(lg.gram[proj], xa.T @ xb, rtol=1e-5, atol=1e-4)
            cos = matching.cosine_matrix(xa.T, xb.T)  # neurons as rows
            torch.testing.assert_close(lg.cosine(proj), cos, rtol=1e-5, atol=1e-6)
            full_dist = torch.cdist(xa.T, xb.T).square()  # (width_A, width_B)
            torch.testing.assert_close(lg.sq_dist(proj), full_dist, rtol=1e-5, atol=1e-4)
            # B's neurons into A's, minimum total squared distance, straight from scipy on the full matrices
            expected = linear_sum_assignment(full_dist.T.numpy())[1]  # B unit j <-> A unit expected[j]
            got = pair_units(euclid_similarity(lg.gram[proj], lg.sq_base[proj], lg.sq_ft[proj]), solver="lap")
            assert dict(zip(got.b.tolist(), got.a.tolist())) == dict(enumerate(expected.tolist()))
            by_cos, by_full = (pair_units(c, solver="greedy") for c in (lg.cosine(proj), cos))
            assert set(zip(by_cos.a.tolist(), by_cos.b.tolist())) == set(zip(by_full.a.tolist(), by_full.b.tolist()))
            ok_a, ok_b = lg.usable(proj)
            assert ok_a.all() and ok_b.all()


def test_bf16_models_accumulate_exact_products_in_float32(pair):
    """Models run in bf16: their activations are bf16 values, the Gram products run on the bf16 units and still
    accumulate in float32 (no rounding of the sums to bf16)."""
    a, b, spec, blocks = pair
    a16, b16 = copy.deepcopy(a).bfloat16(), copy.deepcopy(b).bfloat16()
    full_a = sample_activations(a16, spec, blocks, progress=False)  # (proj, layer) -> (tokens, width)
    full_b = sample_activations(b16, spec, blocks, progress=False)
    for lg in layer_grams(a16, b16, spec, spec, blocks, batch_size=2, progress=False):
        xa, xb = full_a["up", lg.layer].double(), full_b["up", lg.layer].double()
        assert torch.equal(xa, xa.bfloat16().double())  # bf16 values
        torch.testing.assert_close(lg.gram["up"], xa.T @ xb, rtol=1e-5, atol=1e-4)


def test_screen_cosines_give_the_pairs_of_the_float64_cosines(pair, monkeypatch):
    """bf16 activations kept on a CPU with bf16 units: the greedy screen's cosines are a LazyCosine of them. A
    related layer's pairs are certified without a Gram matrix; an unrelated one is matched on the float64
    cosines; either way the pairs are those lg.cosine gives."""
    a, _, spec, blocks = pair
    a16, b16 = copy.deepcopy(a).bfloat16(), copy.deepcopy(a)
    with torch.no_grad():  # fine-tuned: weights moved by a tenth of their scale
        for p in b16.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    b16 = b16.bfloat16()
    other = zoo.tiny_model("llama", seed=9, vocab_size=256, hidden=32, layers=3,
                           intermediate=a.config.intermediate_size, heads=2, kv_heads=1).bfloat16()

    def pairs(lg, proj: str, screen: bool) -> tuple:
        ok_a, ok_b = lg.usable(proj)
        got = pair_units(lg.screen_cosine(proj) if screen else lg.cosine(proj), ok_a, ok_b, "greedy", lg.layer)
        return sorted(zip(got.a.tolist(), got.b.tolist())), got.immediate

    for ft, related in ((b16, True), (other, False)):
        want = {(lg.layer, p): pairs(lg, p, False) for lg in layer_grams(a16, ft, spec, spec, blocks, progress=False)
                for p in ("gate", "up")}
        assert all(w[1] == related for w in want.values())  # every best partner strict and distinct: related
        got = {(lg.layer, p): pairs(lg, p, True) for lg in layer_grams(a16, ft, spec, spec, blocks, progress=False)
               for p in ("gate", "up")}
        assert got == want
    kept = next(layer_grams(a16, b16, spec, spec, blocks, progress=False)).screen_cosine("up")
    assert isinstance(kept, LazyCosine) == (a.config.intermediate_size == 320 and cpu_has_bf16())
    if isinstance(kept, LazyCosine):
        monkeypatch.setattr(grams, "_product", lambda *args: pytest.fail("a Gram matrix was made"))
        for lg in layer_grams(a16, b16, spec, spec, blocks, progress=False):
            assert pairs(lg, "gate", True)[1] and pairs(lg, "up", True)[1]


def test_one_forward_pass_per_model_for_all_layers(pair):
    a, b, spec, blocks = pair
    calls_a, ha = _count_forwards(a)
    calls_b, hb = _count_forwards(b)
    counter: dict = {}
    try:
        grams = list(layer_grams(a, b, spec, spec, blocks, batch_size=5, counter=counter, progress=False))
    finally:
        ha.remove()
        hb.remove()
    assert [g.layer for g in grams] == [0, 1, 2]
    assert counter["forward_passes"] == 1 and len(calls_a) == len(calls_b) == 1  # one batch of 5 blocks
    assert grams[0].n_tokens == blocks.numel()


def test_chunking_over_layers_gives_the_same_accumulators(pair):
    a, b, spec, blocks = pair
    whole = {g.layer: g for g in layer_grams(a, b, spec, spec, blocks, progress=False)}
    counter: dict = {}
    chunked = list(layer_grams(a, b, spec, spec, blocks, budget_bytes=1, counter=counter, progress=False))
    assert counter["chunks"] == 3 and counter["forward_passes"] == 3  # one layer per chunk
    for g in chunked:
        torch.testing.assert_close(g.gram["up"], whole[g.layer].gram["up"])


def test_layer_subset_and_token_sample(pair):
    a, b, spec, blocks = pair
    assert [g.layer for g in layer_grams(a, b, spec, spec, blocks, layers=[2, 0], progress=False)] == [0, 2]
    pos = sample_positions(blocks.numel(), 50, seed=0)
    assert len(pos) == 50 and (pos.diff() > 0).all()
    torch.testing.assert_close(pos, sample_positions(blocks.numel(), 50, seed=0))
    acts = sample_activations(a, spec, blocks, layers=[1], positions=pos, batch_size=2, progress=False)
    full = sample_activations(a, spec, blocks, layers=[1], progress=False)
    assert set(acts) == {("gate", 1), ("up", 1)}
    torch.testing.assert_close(acts["up", 1], full["up", 1][pos])


@pytest.mark.parametrize("layers", [[3], [-1], []])
def test_layers_out_of_range_is_a_clear_error(pair, layers):
    a, b, spec, blocks = pair
    with pytest.raises(TracingError, match="--layers"):
        next(layer_grams(a, b, spec, spec, blocks, layers=layers, progress=False))


@pytest.mark.parametrize("blocks", [None, torch.zeros((0, 16), dtype=torch.long)])
def test_zero_tokens_is_a_clear_error(pair, blocks):
    a, b, spec, _ = pair
    with pytest.raises(TracingError, match="no tokens"):
        next(layer_grams(a, b, spec, spec, blocks, progress=False))
    with pytest.raises(TracingError, match="no tokens"):
        sample_activations(a, spec, blocks, progress=False)


def test_a_model_against_itself_matches_a_copy_of_itself(pair):
    a, _, spec, blocks = pair
    same = {g.layer: g for g in layer_grams(a, a, spec, spec, blocks, progress=False)}
    for g in layer_grams(a, copy.deepcopy(a), spec, spec, blocks, progress=False):
        torch.testing.assert_close(same[g.layer].gram["gate"], g.gram["gate"])
        torch.testing.assert_close(same[g.layer].sq_ft["up"], g.sq_ft["up"])


def test_degenerate_units_are_seen_in_one_pass(pair):
    """A pruned neuron (zero input weights: its pre-activation is 0 on every token) and a NaN one are not
    usable; the ranges come from the same pass as the Gram matrices."""
    a, b, spec, blocks = pair
    damaged = copy.deepcopy(b)
    with torch.no_grad():
        damaged.model.layers[1].mlp.gate_proj.weight[[3, 7]] = 0.0
        damaged.model.layers[1].mlp.up_proj.weight[5] = float("nan")
    lg = {g.layer: g for g in layer_grams(a, damaged, spec, spec, blocks, progress=False)}[1]
    ok_a, ok_b = lg.usable("gate", "up")
    assert ok_a.all() and (~ok_b).nonzero().flatten().tolist() == [3, 5, 7]
    assert lg.usable("up")[1].logical_not().nonzero().flatten().tolist() == [5]


def test_memory_budget_decides_the_passes(pair):
    a, b, spec, blocks = pair
    counter: dict = {}
    list(layer_grams(a, b, spec, spec, blocks, counter=counter, progress=False))  # default: from free RAM
    width = a.config.intermediate_size
    if width == 48:  # gate and up accumulators of one layer, float32
        assert counter["kept"] == "sums" and counter["layer_bytes"] == 2 * (width * width + 2 * width) * 4
    else:  # gate and up activations of both models over the 120 tokens, float32
        assert counter["kept"] == "activations" and counter["layer_bytes"] == 2 * blocks.numel() * 2 * width * 4
    assert counter["forward_passes"] == 1 and counter["budget_bytes"] > 3 * counter["layer_bytes"]
    per_layer = counter["layer_bytes"]
    list(layer_grams(a, b, spec, spec, blocks, budget_bytes=2 * per_layer, counter=counter, progress=False))
    assert counter["forward_passes"] == 2 and counter["budget_bytes"] == 2 * per_layer  # layers 0-1, then 2
