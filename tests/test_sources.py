"""Tensor sources read exactly what from_pretrained loads, views equal the in-place transforms, and a streamed
run gives the loaded run's p-values bit for bit: every family, single and sharded safetensors, GGUF, LoRA.

The "loaded" run is the same RunConfig with --eval on a few random tokens: that path loads both models with
from_pretrained (GGUF dequantized by transformers, adapters merged by peft) and transforms them in place.
"""

import copy

import numpy as np
import pytest
import torch
import transformers
from gguf_files import write_gguf

from tracing import zoo
from tracing.align import align_weights
from tracing.arch import get_spec
from tracing.config import RunConfig
from tracing.models import load_model
from tracing.perm import apply_perm, invert, permuted, random_perm
from tracing.pipeline import run_pair
from tracing.sources import ModuleSource, open_source
from tracing.statistics import StatContext, get_stat
from tracing.transforms import RotatedSource, rotate_residual

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def _derived(model: transformers.PreTrainedModel, seed: int = 1) -> transformers.PreTrainedModel:
    """A fine-tuning stand-in: every weight moved by noise of 5% of its std."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="session")
def saved(tmp_path_factory, tokenizer) -> dict[str, dict[str, str]]:
    """family -> {"base": single-file dir, "derived": sharded dir (several files + index)}."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family in zoo.FAMILIES:
        base = zoo.tiny_model(family, seed=0, vocab_size=len(tokenizer))
        paths = {"base": root / family / "base", "derived": root / family / "derived"}
        base.save_pretrained(paths["base"])
        _derived(base).save_pretrained(paths["derived"], max_shard_size="60KB")
        for p in paths.values():
            tokenizer.save_pretrained(p)
        out[family] = {k: str(v) for k, v in paths.items()}
    return out


def _run(base: str, ft: str, tmp_path, loaded: bool = False, **options) -> dict:
    cfg = RunConfig(base_model_id=base, ft_model_id=ft, save=str(tmp_path / ("loaded" if loaded else "streamed")),
                    no_progress=True, **options)
    if loaded:
        cfg = cfg.replace(eval=True, dataset="random", block_size=8, max_blocks=1)
    record = run_pair(cfg)
    assert record["status"] == "ok", record["error"]
    assert record["streamed"] is not loaded
    return record


def _without_timings(value):
    """A record's numbers without the seconds it measured (those differ from run to run)."""
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("_seconds")}
    return value


def _same_statistics(streamed: dict, loaded: dict) -> None:
    for key in ("value", "log10_pvalue", "per_layer", "aligned_value", "aligned_log10_pvalue", "aligned_per_layer"):
        assert _without_timings(streamed.get(key)) == _without_timings(loaded.get(key)), key  # bit for bit
    assert streamed["extras"].get("null") == loaded["extras"].get("null")


# ---------------------------------------------------------------------- what a source reads
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_a_source_reads_what_from_pretrained_loads(saved, family):
    for form in ("base", "derived"):  # single file, sharded with an index
        model = transformers.AutoModelForCausalLM.from_pretrained(saved[family][form])
        src = open_source(saved[family][form], progress=False)
        sd = model.state_dict()
        assert list(src.keys()) == list(get_spec(model.config).axes) and set(src.keys()) == set(sd)
        assert src.read_bytes == 0  # opening reads headers only
        assert all(src.shape(k) == tuple(v.shape) and torch.equal(src.get(k), v) for k, v in sd.items())
        emb = get_spec(model.config).embed
        assert torch.equal(src.get(emb, slice(5, 9)), sd[emb][5:9])


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_streamed_p_values_equal_loaded_ones_bit_for_bit(saved, family, tmp_path):
    base, ft = saved[family]["base"], saved[family]["derived"]
    for options in (dict(stat="csu", permute=True, align=True),
                    dict(stat="l2", num_perm=4, rotate=family in ROTATABLE, permute=family not in ROTATABLE)):
        streamed, loaded = _run(base, ft, tmp_path, **options), _run(base, ft, tmp_path, loaded=True, **options)
        _same_statistics(streamed, loaded)
    assert streamed["extras"]["num_perm"] == 4
    csu = _run(base, ft, tmp_path, stat="csu", permute=True, align=True)
    assert csu["log10_pvalue"] > -3 and csu["aligned_log10_pvalue"] < -6  # the relation is found through the view


def test_csu_reads_only_the_up_projections(saved):
    base, ft = (open_source(saved["llama"][k], progress=False) for k in ("base", "derived"))
    res = get_stat("csu").fn(StatContext(source_base=base, source_ft=ft, progress=False))
    ups = [roles.up for roles in base.spec.layers]
    expected = sum(np.prod(base.shape(k)) * 4 for k in ups)  # float32 on disk
    assert res.log10_pvalue < -6 and base.read_bytes == ft.read_bytes == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_statistics_and_alignment_never_write_to_what_they_read(family):
    """Sources hand out the models' own tensors (and read-only file mappings): reading must not modify them."""
    base, ft = zoo.tiny_model(family, seed=0), _derived(zoo.tiny_model(family, seed=0))
    before = [copy.deepcopy(m.state_dict()) for m in (base, ft)]
    for stat in ("l2", "cos", "emb", "csu", "csu_all"):
        get_stat(stat).fn(StatContext(base=base, ft=ft, progress=False))
    align_weights(base, ft, get_spec(base.config), progress=False)
    for model, saved in zip((base, ft), before):
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- views
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_permuted_view_equals_apply_perm(family):
    model = zoo.tiny_model(family, seed=3)
    original = copy.deepcopy(model).state_dict()
    spec = get_spec(model.config)
    perm = random_perm(spec, ModuleSource(model).shapes(), seed=5)
    view = permuted(ModuleSource(copy.deepcopy(model)), perm)
    apply_perm(model, spec, perm)
    for key, tensor in model.state_dict().items():
        assert torch.equal(view.get(key), tensor), key
        assert torch.equal(view.get(key, slice(1, 3)), tensor[1:3]), key  # rows of a permuted axis too
    back = permuted(view, invert(perm))  # composed into one permutation: one gather per read
    assert isinstance(back.inner, ModuleSource)
    assert all(torch.equal(back.get(k), v) for k, v in original.items())


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotated_view_equals_rotate_residual(family):
    model = zoo.tiny_model(family, seed=4)
    with torch.no_grad():  # non-trivial norm gains, so that folding them is tested
        for key, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))))
    view = RotatedSource(ModuleSource(copy.deepcopy(model)), seed=2)
    assert not view.spec.tied
    rotate_residual(model, get_spec(model.config), seed=2)
    for key, tensor in model.state_dict().items():
        assert torch.equal(view.get(key), tensor), key


# ---------------------------------------------------------------------- GGUF
# GGUF's defaults (transformers reads no expert width from a GGUF: Qwen3-MoE's default, 768)
GGUF_SHAPES = {"llama": {}, "qwen2": {}, "gpt2": dict(intermediate=256, max_positions=1024),
               "qwen3_moe": dict(intermediate=768)}


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory, tokenizer) -> dict[str, tuple[str, str]]:
    """family -> (base .gguf, derived .gguf) for the four GGUF tensor processors (q/k un-interleave, none,
    Conv1D transposes, MoE experts fused)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, shape in GGUF_SHAPES.items():
        base = zoo.tiny_model(family, seed=0, vocab_size=len(tokenizer), **shape)
        paths = (root / family / "base.gguf", root / family / "derived.gguf")
        for model, path in zip((base, _derived(base)), paths):
            path.parent.mkdir(exist_ok=True)
            write_gguf(model, tokenizer, path)
        out[family] = tuple(map(str, paths))
    return out


@pytest.mark.parametrize("family", GGUF_SHAPES)
def test_gguf_source_equals_transformers_gguf_loading_bit_for_bit(ggufs, family, tmp_path):
    base, ft = ggufs[family]
    model, tok = load_model(ft, progress=False)
    src = open_source(ft, progress=False)
    assert set(src.keys()) == set(model.state_dict())
    assert all(src.shape(k) == v.shape and torch.equal(src.get(k), v) for k, v in model.state_dict().items())
    text = "The mother tongue of Hana is Swahili."
    assert src.tokenizer(text)["input_ids"] == tok(text)["input_ids"]  # the GGUF's own tokenizer
    options = dict(stat="csu", permute=True, align=True)
    streamed = _run(base, ft, tmp_path, **options)
    _same_statistics(streamed, _run(base, ft, tmp_path, loaded=True, **options))
    assert streamed["aligned_log10_pvalue"] < -6


# ---------------------------------------------------------------------- LoRA adapters
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "embed_tokens"], "gpt2": ["c_fc", "c_attn"]}


@pytest.fixture(scope="session")
def adapters(saved, tmp_path_factory) -> dict[str, str]:
    """family -> a saved LoRA adapter dir (nonzero B) on the family's base; llama's also targets the embedding
    (lora_embedding_A/B) and saves lm_head whole (modules_to_save), gpt2's is fan_in_fan_out (Conv1D)."""
    import peft

    out = {}
    for family, targets in LORA_TARGETS.items():
        base = transformers.AutoModelForCausalLM.from_pretrained(saved[family]["base"])
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                              modules_to_save=["lm_head"] if family == "llama" else None,
                              alpha_pattern={"v_proj": 16} if family == "llama" else {},
                              fan_in_fan_out=family == "gpt2")
        lora = peft.get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        d = tmp_path_factory.mktemp(f"lora-{family}")
        lora.save_pretrained(d)
        out[family] = str(d)
    return out


@pytest.mark.parametrize("family", LORA_TARGETS)
def test_lora_source_equals_the_peft_merge_bit_for_bit(saved, adapters, family, tmp_path):
    merged, _ = load_model(adapters[family], progress=False)  # peft's merge_and_unload
    src = open_source(adapters[family], progress=False)
    assert type(src).__name__ == "LoraSource" and src.tokenizer is not None  # the base's tokenizer
    changed = 0
    for key, tensor in merged.state_dict().items():
        assert torch.equal(src.get(key), tensor), key
        changed += not torch.equal(tensor, src.base.get(key))
    assert changed == (7 if family == "llama" else 4)  # q, v, up x 2 layers + embed; lm_head whole / c_fc, c_attn
    options = dict(stat="csu", permute=True, align=True)
    streamed = _run(saved[family]["base"], adapters[family], tmp_path, **options)
    _same_statistics(streamed, _run(saved[family]["base"], adapters[family], tmp_path, loaded=True, **options))
    assert streamed["aligned_log10_pvalue"] < -6
