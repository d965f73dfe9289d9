"""tracing.models: every kind of checkpoint loads to the same function; every bad input is one clear line.

All checkpoints are written to tmp dirs from tiny zoo models; the hub is offline (conftest).
"""

import io
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from gguf_files import write_gguf

from tracing import zoo
from tracing.access import locate, split_revision
from tracing.devices import resolve_device, resolve_dtype
from tracing.errors import TracingError
from tracing.models import load_model

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once at import; make sure no test here can reach the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A tiny llama saved with its tokenizer, as save_pretrained writes it."""
    d = tmp_path_factory.mktemp("llama")
    model = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, vocab)


@pytest.fixture(scope="session")
def ids(text_ids) -> torch.Tensor:
    return text_ids[:48].view(2, 24)


# ---------------------------------------------------------------------- device and dtype
def test_device_and_dtype_defaults(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)  # e.g. a V100
    assert resolve_dtype(None, "cuda:1") == torch.float16
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(TracingError, match="float32, bfloat16"):
        resolve_dtype("int3", "cpu")
    with pytest.raises(TracingError, match="auto, cpu, cuda"):
        resolve_device("tpu9")


def test_cpu_default_dtype_follows_the_checkpoints(monkeypatch, llama_dir, tmp_path):
    """On a CPU with bf16 units, a pair stored in bf16 runs in bf16 (no weight changes); anything else in fp32."""
    from tracing import devices
    from tracing.checkpoints import resolve

    bf16, fp32 = torch.bfloat16, torch.float32
    zoo.tiny_model("llama", seed=0).to(bf16).save_pretrained(tmp_path / "bf16")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_dtype(None, "cpu", (bf16, "bfloat16")) == bf16
    assert resolve_dtype(None, "cpu", (bf16, fp32)) == resolve_dtype(None, "cpu", (bf16, None)) == fp32
    assert resolve_dtype("float32", "cpu", (bf16, bf16)) == fp32  # --dtype decides
    ckpt_bf16, ckpt_fp32 = resolve(str(tmp_path / "bf16")), resolve(str(llama_dir))
    assert str(ckpt_bf16.stored_dtype).endswith("bfloat16") and str(ckpt_fp32.stored_dtype).endswith("float32")
    assert resolve_dtype(None, "cpu", (ckpt_bf16.stored_dtype, ckpt_bf16.stored_dtype)) == bf16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)  # no bf16 units: bf16 would be emulated
    assert resolve_dtype(None, "cpu", (bf16, bf16)) == fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_gpu_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TracingError, match="no CUDA device.*--device cpu"):
        resolve_device("cuda:1")


# ---------------------------------------------------------------------- names
def test_revision_is_split_off_hub_ids_only(tmp_path):
    assert split_revision("org/model@v1.0") == ("org/model", "v1.0")
    assert split_revision("org/model") == ("org/model", None)
    at_dir = tmp_path / "run@3"
    at_dir.mkdir()
    assert split_revision(str(at_dir)) == (str(at_dir), None)  # an existing path keeps its '@'
    src = locate("org/model@abc123")
    assert (src.kind, src.path, src.revision) == ("hub", "org/model", "abc123")
    with pytest.raises(TracingError, match="keep one"):
        locate("org/model@v1", revision="v2")


def test_offline_hub_id_is_a_clear_error():
    with pytest.raises(TracingError, match=r"org-that-is-not/cached-model@v2 is neither a local directory.*"
                                           r"nor in the Hugging Face cache; HF_HUB_OFFLINE=1 is set: pass a local "
                                           r"path, or unset HF_HUB_OFFLINE to download"):
        load_model("org-that-is-not/cached-model@v2", progress=False)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(TracingError, match="neither a local directory"):
        load_model(str(tmp_path / "nowhere" / "model"), progress=False)
    with pytest.raises(TracingError, match="neither a local directory"):
        load_model(str(tmp_path / "missing.gguf"), progress=False)
    with pytest.raises(TracingError, match="has no config.json"):
        load_model(str(tmp_path), progress=False)


# ---------------------------------------------------------------------- local directory
def test_local_dir_round_trip(llama_dir, llama, ids, tokenizer):
    model, tok = load_model(str(llama_dir), device="cpu", progress=False)
    assert not model.training and model.dtype == torch.float32
    torch.testing.assert_close(_logits(model, ids), _logits(llama, ids), rtol=0, atol=0)
    text = "Ada visits the old river in Paris."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_dtype_is_applied(llama_dir):
    model, _ = load_model(str(llama_dir), dtype="bf16", progress=False)
    assert model.dtype == torch.bfloat16


def test_missing_tokenizer_gives_none_with_a_warning(tmp_path, caplog):
    zoo.tiny_model("gpt2", seed=1).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tracing.models"):
        model, tok = load_model(str(tmp_path), progress=False)
    assert tok is None and model.config.model_type == "gpt2"
    assert "no tokenizer" in caplog.text


def test_unsupported_architecture_fails_from_the_config_alone(tmp_path):
    # only config.json: reaching the weights would be a different error
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(TracingError, match=r"unsupported architecture 'bert'; supported model types: llama.*gpt2"):
        load_model(str(tmp_path), progress=False)


# ---------------------------------------------------------------------- PEFT adapters
@pytest.fixture(scope="session")
def adapter(llama_dir, llama, tmp_path_factory):
    """A LoRA adapter on the tiny llama with nonzero B, saved; returns (dir, expected merged state dict)."""
    import copy

    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)  # records llama_dir as its base
    lora = peft.get_peft_model(base, cfg)
    expected = copy.deepcopy(llama.state_dict())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in lora.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                B, A = module.lora_B["default"].weight, module.lora_A["default"].weight  # (out, r), (r, in)
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)
                key = name.removeprefix("base_model.model.") + ".weight"
                expected[key] = expected[key] + (8 / 4) * B @ A
    d = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(d)
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir)
    return d, expected


def test_adapter_with_missing_weights_is_an_error_naming_them(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken_adapter"
    shutil.copytree(adapter[0], d)
    weights = load_file(d / "adapter_model.safetensors")
    lost = sorted(k for k in weights if "layers.0.mlp.up_proj.lora_B" in k)
    save_file({k: v for k, v in weights.items() if k not in lost}, d / "adapter_model.safetensors")
    with pytest.raises(TracingError, match=r"adapter .*broken_adapter is not what its adapter_config.json says: "
                                           r"1 weights missing .*layers\.0\.mlp\.up_proj\.lora_B"):
        load_model(str(d), progress=False)  # the LoRA update of that module would silently be a no-op
    notes: list = []
    load_model(str(d), progress=False, allow_keys=["*up_proj.lora_B*"], notes=notes)
    assert len(notes) == 1 and "allowed by --allow_keys" in notes[0]


def test_adapter_is_merged_into_its_base(adapter, tokenizer):
    d, expected = adapter
    model, tok = load_model(str(d), progress=False)
    sd = model.state_dict()
    assert set(sd) == set(expected)  # merged and unloaded: no lora_* keys left
    for k in expected:
        torch.testing.assert_close(sd[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"],
                           expected["model.layers.0.mlp.gate_proj.weight"])
    assert tok is not None and len(tok) == len(tokenizer)  # the base's tokenizer


def test_adapter_with_missing_base_needs_adapter_base(adapter, llama_dir, tmp_path):
    d, expected = adapter
    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in d.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base-that-moved")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TracingError, match=r"adapter .* needs base .*base-that-moved which cannot be found: "
                                           r"pass --adapter_base PATH"):
        load_model(str(moved), progress=False)
    model, _ = load_model(str(moved), adapter_base=str(llama_dir), progress=False)
    torch.testing.assert_close(model.state_dict()["model.layers.1.self_attn.v_proj.weight"],
                               expected["model.layers.1.self_attn.v_proj.weight"])


# ---------------------------------------------------------------------- GGUF
def test_gguf_file_loads_with_the_same_logits_and_tokenizer(llama, tokenizer, ids, tmp_path, capfd):
    path = tmp_path / "tiny.f32.gguf"
    write_gguf(llama, tokenizer, path)
    model, tok = load_model(str(path), progress=False)
    assert "it/s" not in capfd.readouterr().err  # no dequantization bar with progress=False
    assert model.config.model_type == "llama"
    torch.testing.assert_close(_logits(model, ids), _logits(llama, ids), rtol=0, atol=1e-5)
    text = "The mother tongue of Hana is Swahili."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


# ---------------------------------------------------------------------- the token stays secret
def test_token_never_appears_in_errors_or_logs(caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(TracingError) as err:
            load_model("org-that-is-not/cached-model", token=FAKE_TOKEN, progress=False)
    out = capsys.readouterr()
    for text in (str(err.value), caplog.text, out.out, out.err):
        assert FAKE_TOKEN not in text


def test_token_is_scrubbed_from_library_failures(monkeypatch, caplog):
    """Even a library that echoes the token into its exception or its log is cleaned up."""
    def leaky(*args, token=None, **kw):
        logging.getLogger("transformers.leaky").error("request with Authorization: Bearer %s", token)  # stderr
        logging.getLogger("urllib3.leaky").error("request with Authorization: Bearer %s", token)  # root
        try:
            raise ConnectionError(f"refused: Bearer {token}")
        except ConnectionError:
            logging.getLogger("urllib3.leaky").warning("retrying", exc_info=True)  # the token in a traceback
        raise ValueError(f"server said: bad header Authorization: Bearer {token}")

    seen = io.StringIO()  # transformers' own loggers do not propagate: watch them through their handler
    handler = logging.StreamHandler(seen)
    logging.getLogger("transformers").addHandler(handler)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", leaky)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Exception) as err:
            load_model("org/model", progress=False)
    assert "bad header" in str(err.value) and FAKE_TOKEN not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "Bearer ***" in caplog.text and "refused: Bearer ***" in caplog.text and FAKE_TOKEN not in caplog.text
    logging.getLogger("transformers").removeHandler(handler)
    assert "Bearer ***" in seen.getvalue() and FAKE_TOKEN not in seen.getvalue()


def test_quiet_loading_of_other_checkpoints_never_imports_the_gguf_code(llama_dir):
    """Silencing GGUF's progress bar happens where GGUF files are read: --no_progress costs other runs nothing."""
    code = (f"from tracing.models import load_model; load_model({str(llama_dir)!r}, progress=False); import sys; "
            "print('transformers.modeling_gguf_pytorch_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
