"""GGUF files of tiny models for tests: the package's writer (llama.cpp's names, layouts and tokenizer).

    write_gguf(model, tokenizer, "tiny.gguf")   # llama, qwen2 or gpt2; float32 tensors
"""

from tracing.derivations.gguf_writer import write_gguf

__all__ = ["write_gguf"]
