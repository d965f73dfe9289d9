"""tracing.checkpoints: a name resolved once into a Checkpoint, and a content hash that means equal weights.

Equal hashes: the same config and byte-identical weight files. The same weights saved twice hash equal; other
weights, another config or an adapter over another base do not; the library that saved the config does not
count. The first hash of a file is cached, so later runs do not read the weights again.
"""

import collections
import json
import shutil

import pytest
import torch
import transformers
from gguf_files import write_gguf

import tracing.digests
from tracing import zoo
from tracing.checkpoints import resolve
from tracing.errors import TracingError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny llama saved twice (two folders, same weights), a fine-tuned stand-in, a LoRA adapter, a GGUF."""
    import peft

    root = tmp_path_factory.mktemp("ckpt")
    model = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    for name in ("a", "again"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    other = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # one weight of one matrix
    other.save_pretrained(root / "other")
    lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "a"),
                               peft.LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    write_gguf(model, tokenizer, root / "m.gguf")
    return root


def test_a_name_is_resolved_into_what_the_checkpoint_is(saved):
    ckpt = resolve(str(saved / "a"))
    assert (ckpt.kind, ckpt.name, ckpt.revision, ckpt.commit) == ("dir", str(saved / "a"), None, None)
    assert ckpt.config.model_type == ckpt.spec.model_type == "llama"
    assert [f.name for f in ckpt.weight_files()] == ["model.safetensors"]
    adapter = resolve(str(saved / "adapter"))
    assert adapter.kind == "adapter" and adapter.adapter["r"] == 2 and adapter.base.name == str(saved / "a")
    assert adapter.spec is adapter.base.spec  # an adapter is read as its base's architecture
    identity = adapter.identity()
    assert set(identity) == {"name", "kind", "model_type", "revision", "commit", "content_hash", "base"}
    assert identity["base"]["content_hash"] == resolve(str(saved / "a")).content_hash
    assert resolve(str(saved / "m.gguf")).kind == "gguf"
    json.dumps(identity)  # plain data: a record stores it as it is


def test_equal_hash_means_equal_weights(saved, tmp_path):
    h = {name: resolve(str(saved / name)).content_hash for name in ("a", "again", "other")}
    assert h["a"] == h["again"]  # the same weights saved twice
    assert h["other"] != h["a"]  # one weight differs by 1e-3
    moved = shutil.copytree(saved / "a", tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config | {"transformers_version": "0.0.1"}, indent=4))
    assert resolve(str(moved)).content_hash == h["a"]  # who saved it (and where it lies) does not count
    (moved / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    assert resolve(str(moved)).content_hash != h["a"]  # what the config says does
    gguf = resolve(str(saved / "m.gguf")).content_hash
    assert gguf not in h.values()  # the same weights in another format: another identity


def test_an_adapters_hash_covers_its_base(saved, tmp_path):
    on_a = resolve(str(saved / "adapter")).content_hash
    on_other = resolve(str(saved / "adapter"), adapter_base=str(saved / "other"))  # recorded base found first
    assert on_other.content_hash == on_a
    moved = shutil.copytree(saved / "adapter", tmp_path / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tmp_path / "x")}))
    assert resolve(str(moved), adapter_base=str(saved / "again")).content_hash == on_a  # same base weights
    assert resolve(str(moved), adapter_base=str(saved / "other")).content_hash != on_a


def test_a_file_is_hashed_once_then_read_from_the_cache(saved, tmp_path, monkeypatch):
    monkeypatch.setenv(tracing.digests.CACHE_ENV, str(tmp_path / "cache"))
    read = collections.Counter()
    real = tracing.digests._sha256_file

    def counting(path):
        read[path.name] += 1
        return real(path)

    monkeypatch.setattr(tracing.digests, "_sha256_file", counting)
    first = resolve(str(saved / "again")).content_hash
    assert resolve(str(saved / "again")).content_hash == first and read == {"model.safetensors": 1}
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(tracing.digests.CACHE_ENV, str(tmp_path / "a-file" / "cache"))  # cannot be written
    assert resolve(str(saved / "again")).content_hash == first and read == {"model.safetensors": 2}


def test_resolving_reads_the_config_once_and_checks_the_architecture(saved, tmp_path, monkeypatch):
    calls = collections.Counter()
    real = transformers.AutoConfig.from_pretrained

    def counting(*a, **kw):
        calls["config"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", counting)
    resolve(str(saved / "adapter"))
    assert calls["config"] == 1  # the adapter's base, read once
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(TracingError, match="unsupported architecture 'bert'"):
        resolve(str(tmp_path / "bert"))


def test_the_record_stores_both_checkpoints_identities(saved, tmp_path):
    from tracing.config import RunConfig
    from tracing.pipeline import run_pair

    rec = run_pair(RunConfig(base_model_id=str(saved / "a"), ft_model_id=str(saved / "adapter"), stat="l2",
                             save=str(tmp_path), no_progress=True))
    assert rec["status"] == "ok"
    base, ft = rec["checkpoints"]["base"], rec["checkpoints"]["ft"]
    assert (base["kind"], base["content_hash"]) == ("dir", resolve(str(saved / "a")).content_hash)
    assert (ft["kind"], ft["base"]["name"]) == ("adapter", str(saved / "a"))
    assert ft["content_hash"] == resolve(str(saved / "adapter")).content_hash != base["content_hash"]
