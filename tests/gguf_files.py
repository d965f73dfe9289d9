"""GGUF files of tiny models for tests, written as llama.cpp's converter writes them (names, layouts, tokenizer).

    write_gguf(model, tokenizer, "tiny.gguf")   # llama, qwen2, qwen3_moe or gpt2; float32 tensors

MoE experts are written as llama.cpp writes them: one (experts, ...) tensor per projection (ffn_gate_exps,
ffn_up_exps, ffn_down_exps), which transformers fuses back into gate_up_proj on load.
"""

import json

import numpy as np


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows with the rotary halves interleaved; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model):
    """(module path, suffix, array) of every tensor, stacked expert tensors split per projection."""
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        a = tensor.float().numpy()
        if suffix == "gate_up_proj":  # (experts, 2 I, hidden): gate rows, then up rows
            yield f"{key[:-len('_up_proj')]}_proj", "weight", a[:, :a.shape[1] // 2]
            yield f"{key[:-len('gate_up_proj')]}up_proj", "weight", a[:, a.shape[1] // 2:]
        elif suffix == "down_proj":  # (experts, hidden, I)
            yield key, "weight", a
        else:
            yield module, suffix, a


def write_gguf(model, tokenizer, path) -> None:
    """A float32 GGUF file of a llama, qwen2, qwen3_moe or gpt2 model (llama.cpp's names and layouts, via gguf's
    name map)."""
    import gguf

    cfg, arch = model.config, model.config.model_type
    arch = {"qwen3_moe": "qwen3moe"}.get(arch, arch)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_feed_forward_length(cfg.n_inner)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3moe":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
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
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for module, suffix, a in _tensors(model):
        if module == "lm_head" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(module)
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            a = _interleave(a, cfg.num_attention_heads if name.endswith("q") else cfg.num_key_value_heads)
        elif arch == "gpt2" and suffix == "weight" and name.endswith(("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            a = a.T  # GPT-2's Conv1D weights are stored (out, in) in GGUF
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
