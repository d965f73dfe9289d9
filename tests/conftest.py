"""Shared fixtures: tiny real models of every supported family, built offline once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (set before transformers loads)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from tracing import zoo

# One thread: tiny models gain nothing from more, and OpenMP spin-waiting on a shared 2-core CPU is slow.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """Checkpoint hashes are cached in a folder of this session, not the user's ~/.cache (subprocesses too)."""
    from tracing.digests import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("digest-cache"))
    yield
    os.environ.pop(CACHE_ENV) if old is None else os.environ.update({CACHE_ENV: old})


@pytest.fixture(scope="session")
def tokenizer():
    return zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)


@pytest.fixture(scope="session")
def text_ids(tokenizer) -> torch.Tensor:
    """1-D token ids of project-generated text (for fine-tuning and evaluation)."""
    return torch.tensor(tokenizer(zoo.synthetic_text(1500, seed=1))["input_ids"])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A saved tiny Llama with its tokenizer (read only): for tests that need a model on disk."""
    root = tmp_path_factory.mktemp("tiny")
    tok = zoo.build_tokenizer(zoo.synthetic_text(200, seed=0), vocab_size=128)
    model = zoo.tiny_model("llama", seed=0, hidden=16, layers=2, intermediate=32, vocab_size=len(tok))
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    return str(root / "m")


_SUMMARY = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def summary_lines(pytestconfig) -> list[str]:
    """Lines a test wants in the terminal summary even when it passes (e.g. proof that jobs ran on Slurm)."""
    return pytestconfig.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("evidence")
        for line in lines:
            terminalreporter.write_line(line)
