"""GGUF files of small models, written as llama.cpp's converter writes them (names, layouts, tokenizer), in
float32 or quantized to Q8_0 / Q4_0 with the `gguf` package (what transformers' GGUF loader dequantizes).

    write_gguf(model, tokenizer, "tiny.gguf")                 # llama, qwen2 or gpt2; float32 tensors
    write_gguf(model, tokenizer, "tiny.Q4_0.gguf", "Q4_0")    # 2-D tensors quantized (rows a multiple of 32)
    state = round_trip(model, "Q4_0")                         # the values that file loads as, by state-dict key
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tracing.arch import get_spec

GGUF_TYPES = ("llama", "qwen2", "gpt2")  # what this writer writes (and transformers' GGUF loader reads)
QTYPES = ("Q8_0", "Q4_0")


def gguf_refusal(config: Any) -> str | None:
    """Why a GGUF file of this config would not load back as the same model (None: it would)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = config.model_type.removesuffix("_text")
    if arch not in GGUF_TYPES:
        if arch in GGUF_SUPPORTED_ARCHITECTURES:
            return f"transformers reads {arch} GGUF files, but this writer writes only {', '.join(GGUF_TYPES)} ones"
        return f"transformers cannot read {arch} GGUF files (this writer writes {', '.join(GGUF_TYPES)} ones)"
    if arch == "gpt2" and (config.n_inner not in (None, 4 * config.n_embd) or config.n_positions != 1024):
        return (f"transformers reads a gpt2 GGUF file with an MLP of 4 x hidden and 1024 positions, this model has "
                f"{config.n_inner} and {config.n_positions}: build it with intermediate={4 * config.n_embd}, "
                f"max_positions=1024")
    return None


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows with the rotary halves interleaved; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _deinterleave(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model) -> Iterator[tuple[str, str, np.ndarray, Any]]:
    """(state-dict key, GGUF name, array in GGUF layout, inverse layout) for every tensor the file holds."""
    import gguf

    cfg, arch = model.config, model.config.model_type
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, suffix = key.rsplit(".", 1)
        name = names.get_name(module)
        a, back = tensor.detach().float().numpy(), (lambda x: x)
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            heads = cfg.num_attention_heads if name.endswith("q") else cfg.num_key_value_heads
            a, back = _interleave(a, heads), (lambda x, h=heads: _deinterleave(x, h))
        elif arch == "gpt2" and suffix == "weight" and name.endswith(("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            a, back = a.T, (lambda x: x.T)  # GPT-2's Conv1D weights are stored (out, in) in GGUF
        yield key, f"{name}.{suffix}", np.ascontiguousarray(a), back


def _quantizable(a: np.ndarray, qtype) -> bool:
    import gguf

    return a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def round_trip(model, qtype: str) -> dict[str, torch.Tensor]:
    """model's state dict as the `qtype` GGUF file loads it back: quantized tensors dequantized, others exact."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    sd, spec = model.state_dict(), get_spec(model.config)
    state = {}
    for key, _, a, back in _tensors(model):
        if _quantizable(a, q):
            a = gguf.quants.dequantize(gguf.quants.quantize(a, q), q)
            state[key] = torch.from_numpy(np.ascontiguousarray(back(a))).to(model.dtype)
        else:
            state[key] = sd[key].detach().clone()
    if spec.tied and spec.lm_head in sd:
        state[spec.lm_head] = state[spec.embed]  # the file holds the embedding once
    return state


def write_gguf(model, tokenizer, path, qtype: str | None = None) -> None:
    """A GGUF file of a llama, qwen2 or gpt2 model (llama.cpp's names and layouts, via gguf's name map); with
    `qtype` ("Q8_0", "Q4_0") every 2-D tensor whose rows are a multiple of the block size is quantized."""
    import gguf

    cfg, arch = model.config, model.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        w.add_vocab_size(cfg.vocab_size)
    if qtype:
        w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])  # 3: control
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    q = gguf.GGMLQuantizationType[qtype] if qtype else None
    for _, name, a, _ in _tensors(model):
        if q is not None and _quantizable(a, q):
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
