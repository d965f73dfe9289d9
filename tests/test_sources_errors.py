"""Broken checkpoints are one-line errors naming the file and the fix (exit 2, found in the headers before any
model is loaded: nothing written); checkpoints the sources cannot stream are loaded whole; the hub source
downloads only what it reads."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import record_path

from tracing import zoo
from tracing.cli import main
from tracing.errors import TracingError
from tracing.models import load_model
from tracing.sources import ModuleSource, SafetensorsSource, open_source
from tracing.sources.hub import hub_patterns


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny llama saved single-file ("base") and sharded ("sharded"), and a tiny gpt2 ("gpt2")."""
    root = tmp_path_factory.mktemp("broken")
    llama = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    llama.save_pretrained(root / "base")
    llama.save_pretrained(root / "sharded", max_shard_size="60KB")
    zoo.tiny_model("gpt2", seed=0, vocab_size=len(tokenizer)).save_pretrained(root / "gpt2")
    return {name: str(root / name) for name in ("base", "sharded", "gpt2")}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _fails(capsys, base: str, ft: str, save, *needles: str, extra=()) -> None:
    """Run main.py on the pair; it must exit 2 with one error line holding `needles`, and write nothing in
    `save` (found before any model was loaded)."""
    argv = ["--base_model_id", base, "--ft_model_id", ft, "--save", str(save), "--no_progress", *extra]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: "), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    assert list(save.iterdir()) == [] and not record_path(argv).exists()


# ---------------------------------------------------------------------- bad input
def test_a_missing_shard(dirs, tmp_path, capsys):
    broken = _copy(dirs["sharded"], tmp_path / "ckpt")
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(capsys, dirs["base"], broken, tmp_path / "out", f"names {shard.name}, which is not in",
           "download the missing shard")
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()  # no index either: the shard names tell
    _fails(capsys, dirs["base"], broken, tmp_path / "out2", f"{shard.name} is missing", "download it")


def test_an_index_naming_a_file_that_is_absent(dirs, tmp_path, capsys):
    broken = _copy(dirs["sharded"], tmp_path / "ckpt")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = "model-extra.safetensors"
    index.write_text(json.dumps(doc))
    _fails(capsys, broken, dirs["base"], tmp_path / "out", "model.safetensors.index.json names "
           "model-extra.safetensors", "download the missing shard")


def test_a_truncated_safetensors_file(dirs, tmp_path, capsys):
    broken = _copy(dirs["base"], tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(capsys, dirs["base"], broken, tmp_path / "out", str(f), "truncated or corrupt",
           "download or save the checkpoint again")


def test_a_gguf_tensor_type_that_cannot_be_dequantized(dirs, tmp_path, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "int8.gguf"), "llama")
    llama = transformers.AutoModelForCausalLM.from_pretrained(dirs["base"])
    cfg = llama.config
    for add, value in ((w.add_block_count, 2), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_vocab_size, cfg.vocab_size)):
        add(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key, t in llama.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        a = t.numpy()
        if key == "model.layers.1.mlp.up_proj.weight":
            a = (a * 100).astype(np.int8)  # an integer tensor: gguf has no dequantization for I8
        w.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(capsys, dirs["base"], str(tmp_path / "int8.gguf"), tmp_path / "out", "int8.gguf", "blk.1.ffn_up.weight",
           "I8", "convert the file")


def test_an_adapter_for_modules_the_base_does_not_have(dirs, tmp_path, capsys):
    import peft

    lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(dirs["base"]),
                               peft.LoraConfig(r=2, target_modules=["up_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = dirs["gpt2"]  # a base without up_proj
    cfg_file.write_text(json.dumps(cfg))
    _fails(capsys, dirs["base"], str(tmp_path / "adapter"), tmp_path / "out", "adapts model.layers.0.mlp.up_proj",
           "--adapter_base")


# ---------------------------------------------------------------------- what is not streamed is loaded
def test_pytorch_bin_weights_are_loaded_whole(dirs, tmp_path, caplog):
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["base"])
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    src = open_source(str(tmp_path / "bin"), progress=False)
    assert isinstance(src, ModuleSource) and "loading it whole" in caplog.text
    assert all(torch.equal(src.get(k), v) for k, v in model.state_dict().items())


def test_a_dora_adapter_is_merged_through_peft(dirs, tmp_path, caplog):
    import peft

    lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(dirs["base"]),
                               peft.LoraConfig(r=2, target_modules=["up_proj"], use_dora=True))
    lora.save_pretrained(tmp_path / "dora")
    src = open_source(str(tmp_path / "dora"), progress=False)
    merged, _ = load_model(str(tmp_path / "dora"), progress=False)
    assert isinstance(src, ModuleSource) and "DoRA" in caplog.text
    assert all(torch.equal(src.get(k), v) for k, v in merged.state_dict().items())


# ---------------------------------------------------------------------- the hub source (offline)
INDEX = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                        "lm_head.weight": "model-00002-of-00002.safetensors"}}
REPO = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model-00003-of-00003.safetensors",  # a stale shard of an older upload: not in the index
        "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "original/consolidated.00.pth",
        "model.Q8_0.gguf"]


def test_hub_patterns_choose_config_tokenizer_index_and_its_shards_only():
    assert hub_patterns(REPO, INDEX) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hub_patterns(["config.json", "model.safetensors", "pytorch_model.bin"]) == ["config.json",
                                                                                       "model.safetensors"]
    assert hub_patterns(["adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"]) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert hub_patterns(["config.json", "pytorch_model.bin"]) is None  # nothing to stream: loaded whole
    with pytest.raises(ValueError, match="content"):
        hub_patterns(REPO)


def _hub_cache(cache, repo_id: str, revision: str, files: dict) -> str:
    """A Hugging Face cache holding `files` (name -> source path) of `repo_id` at `revision`, as the hub client
    leaves it after downloading them; returns the commit."""
    commit = "c0ffee" * 6 + "c0ff"  # 40 hex digits
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, repo / "snapshots" / commit / name)
    return commit


def test_a_hub_id_downloads_the_chosen_files_and_streams_them(dirs, tmp_path, monkeypatch):
    """huggingface_hub is replaced by a local 'repository' (the sharded dir) and a cache holding its config (what
    resolving the name reads); what was asked for is checked."""
    import huggingface_hub

    from tracing.checkpoints import resolve

    repo = _copy(dirs["sharded"], tmp_path / "repo")
    torch.save({}, tmp_path / "repo" / "pytorch_model.bin")  # present in the repo, never downloaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    commit = _hub_cache(tmp_path / "cache", "org/tiny-llama", "v1", {"config.json": f"{repo}/config.json"})
    asked = {}

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, local_files_only=False):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        out = tmp_path / "snapshot"
        out.mkdir(exist_ok=True)
        for name in allow_patterns:
            shutil.copy(tmp_path / "repo" / name, out / name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None, token=None:
                        sorted(p.name for p in (tmp_path / "repo").iterdir()))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, revision=None, token=None:
                        str(tmp_path / "repo" / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ckpt = resolve("org/tiny-llama@v1", progress=False)
    assert (ckpt.kind, ckpt.path, ckpt.revision, ckpt.commit) == ("hub", "org/tiny-llama", "v1", commit)
    src = open_source(ckpt, progress=False)
    assert isinstance(src, SafetensorsSource) and asked["repo_id"] == "org/tiny-llama" and asked["revision"] == "v1"
    shards = sorted(p.name for p in (tmp_path / "repo").glob("model-*.safetensors"))
    assert sorted(asked["allow_patterns"]) == sorted(["config.json", "generation_config.json",
                                                       "model.safetensors.index.json", *shards])
    local = open_source(repo, progress=False)
    assert all(torch.equal(src.get(k), local.get(k)) for k in local.keys())


def test_a_hub_snapshot_hashes_as_its_local_copy_does(dirs, tmp_path, monkeypatch):
    """The content hash is over file contents: the hub's cached snapshot and a copy of it on disk hash equal."""
    import huggingface_hub

    from tracing.checkpoints import resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    files = {p.name: p for p in Path(dirs["sharded"]).iterdir()}
    _hub_cache(tmp_path / "cache", "org/tiny-llama", "main", files)
    hub, local = resolve("org/tiny-llama", progress=False), resolve(dirs["sharded"], progress=False)
    assert hub.identity()["content_hash"] == local.identity()["content_hash"] is not None
    assert hub.identity()["commit"] is not None and local.identity()["commit"] is None


def test_an_unreachable_hub_id_is_the_loaders_error():
    with pytest.raises(TracingError, match="org-that-is-not/cached-model is neither a local directory"):
        open_source("org-that-is-not/cached-model", progress=False)


def test_an_adapter_missing_a_lora_matrix_is_refused_unless_allowed(dirs, tmp_path, capsys):
    """As load_model: a targeted module without its LoRA matrices would silently keep its base weight."""
    import peft
    from safetensors.torch import load_file, save_file

    lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(dirs["base"]),
                               peft.LoraConfig(r=2, target_modules=["up_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "layers.0.mlp.up_proj.lora_B" not in k}, f)
    _fails(capsys, dirs["base"], str(tmp_path / "adapter"), tmp_path / "out", "is not what its adapter_config.json "
           "says", "layers.0.mlp.up_proj.lora_B", "--allow_keys")
    notes: list = []
    src = open_source(str(tmp_path / "adapter"), progress=False, allow_keys=["*up_proj.lora_B*"], notes=notes)
    assert "model.layers.0.mlp.up_proj.weight" not in src.lora and len(notes) == 1  # that module keeps its base
