"""tracing.pair: two checkpoints opened once; statistics run one after another on one OpenedPair, the models loaded
at most once and only when a statistic runs them; permute / rotate / align give the same weights as views over
the files and in place on the loaded models."""

import collections
import copy

import pytest
import torch

import tracing.pair
from tracing import zoo
from tracing.checkpoints import resolve
from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.pair import OpenedPair
from tracing.sources import ModuleSource, SafetensorsSource
from tracing.statistics import StatContext, get_stat


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer, text_ids):
    root = tmp_path_factory.mktemp("pair")
    base = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    for name, model in (("base", base), ("derived", zoo.finetune(copy.deepcopy(base), text_ids, steps=3)),
                        ("gpt2", zoo.tiny_model("gpt2", seed=0, vocab_size=len(tokenizer)))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: str(root / name) for name in ("base", "derived", "gpt2")}


@pytest.fixture
def loads(monkeypatch):
    """Counts the models loaded (tracing.pair's load_model calls), by checkpoint name."""
    count = collections.Counter()
    real = tracing.pair.load_model

    def counting(ckpt, **kw):
        count[ckpt.name] += 1
        return real(ckpt, **kw)

    monkeypatch.setattr(tracing.pair, "load_model", counting)
    return count


def _open(dirs, ft="derived") -> OpenedPair:
    return OpenedPair.open(resolve(dirs["base"]), resolve(dirs[ft]))


def _state(source) -> dict[str, torch.Tensor]:
    return {k: source.get(k) for k in source.keys()}


def test_weight_statistics_stream_and_load_nothing(dirs, loads):
    pair = _open(dirs)
    assert pair.base is None and pair.ft is None and not pair.loaded and pair.headers_known
    assert isinstance(pair.source_base, SafetensorsSource)
    cfg = RunConfig(base_model_id=dirs["base"], ft_model_id=dirs["derived"], no_progress=True)
    values = [get_stat(s).fn(StatContext.for_pair(cfg, pair)).log10_pvalue for s in ("csu", "l2", "cos", "emb")]
    assert values[0] < -6 and not loads  # four statistics, no model


def test_activation_statistics_load_each_model_once(dirs, loads, text_ids):
    pair = _open(dirs)
    cfg = RunConfig(base_model_id=dirs["base"], ft_model_id=dirs["derived"], no_progress=True)
    streamed = get_stat("csu").fn(StatContext.for_pair(cfg, pair))
    pair.load()
    blocks = text_ids[:128].view(4, 32)
    for stat in ("csh", "match", "csu", "l2"):
        res = get_stat(stat).fn(StatContext.for_pair(cfg, pair, blocks=blocks))
        assert res.log10_pvalue is None or res.log10_pvalue < -3, stat
        if stat == "csu":  # the loaded model's tensors: the files' values bit for bit
            assert res.log10_pvalue == streamed.log10_pvalue
            assert [r["rho"] for r in res.per_layer] == [r["rho"] for r in streamed.per_layer]
    assert isinstance(pair.source_ft, ModuleSource) and pair.ft is pair.source_ft.model
    assert loads == {dirs["base"]: 1, dirs["derived"]: 1}  # four statistics, two models loaded once


@pytest.mark.parametrize("loaded", [False, True])
def test_transforms_are_views_or_in_place_with_the_same_values(dirs, loaded):
    streamed = _open(dirs)
    pair = _open(dirs).load() if loaded else _open(dirs)
    for p, q in ((streamed.permute(3), pair.permute(3)), (streamed.permute(3).rotate(4), pair.permute(3).rotate(4)),
                 (streamed.rotate(4).align(seed=1), pair.rotate(4).align(seed=1))):
        a, b = _state(p.source_ft), _state(q.source_ft)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert p.spec_ft.tied == q.spec_ft.tied


def test_each_pair_gets_the_loaded_ft_as_it_has_it(dirs, loads):
    """The loaded ft holds one pair's transforms at a time: permutations are undone exactly, a rotation by
    loading again."""
    pair = _open(dirs).load()
    plain = {k: v.clone() for k, v in pair.ft.state_dict().items()}
    permuted = pair.permute(7)
    perm_state = {k: v.clone() for k, v in permuted.ft.state_dict().items()}
    assert not torch.equal(perm_state["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(v, plain[k]) for k, v in pair.ft.state_dict().items())  # undone, bit for bit
    rotated = permuted.rotate(8)
    assert rotated.ft.config.tie_word_embeddings is False
    assert loads[dirs["derived"]] == 1
    assert all(torch.equal(v, perm_state[k]) for k, v in permuted.ft.state_dict().items())  # loaded again
    assert loads[dirs["derived"]] == 2 and loads[dirs["base"]] == 1


def test_a_rotation_is_refused_from_the_spec_before_anything_is_read(dirs, loads):
    pair = _open(dirs, ft="gpt2")
    with pytest.raises(TracingError, match="not function-preserving for gpt2"):
        pair.rotate(1)
    assert pair.read_stats() == (0.0, 0) and not loads
