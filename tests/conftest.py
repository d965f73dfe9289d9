"""Shared fixtures: tiny real models of every supported family, built offline once per session."""

import pytest
import torch

from tracing import zoo

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)


@pytest.fixture(scope="session")
def text_ids(tokenizer) -> torch.Tensor:
    """1-D token ids of project-generated text (for fine-tuning and evaluation)."""
    return torch.tensor(tokenizer(zoo.synthetic_text(1500, seed=1))["input_ids"])
