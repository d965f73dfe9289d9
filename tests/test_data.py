"""tracing.data: every dataset kind becomes the same (n_blocks, block_size) token blocks; bad data is one clear line."""

import json

import pandas as pd
import pytest
import torch

from tracing import zoo
from tracing.data import load_blocks, load_texts
from tracing.errors import TracingError
from tracing.naming import generated_path

DOCS = [zoo.synthetic_text(40, seed=s) for s in range(3)]


@pytest.fixture(autouse=True)
def datasets_offline(monkeypatch):
    """datasets and huggingface_hub read their offline switches at import; pin them for every test here."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _expected_ids(tokenizer, docs) -> list[int]:
    """Documents tokenized one by one without special tokens, eos between them."""
    out: list[int] = []
    for k, d in enumerate(docs):
        if k:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    return out


def test_txt_is_one_document(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text(DOCS[0])
    assert load_texts(str(path)) == [DOCS[0]]
    blocks = load_blocks(str(path), tokenizer, 32)
    ids = _expected_ids(tokenizer, DOCS[:1])
    assert blocks.dtype == torch.long and blocks.shape == (len(ids) // 32, 32)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]


def test_jsonl_and_parquet_give_the_same_blocks(tmp_path, tokenizer):
    jsonl, parquet = tmp_path / "d.jsonl", tmp_path / "d.parquet"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    pd.DataFrame({"text": DOCS, "id": range(3)}).to_parquet(parquet)
    assert load_texts(str(jsonl)) == load_texts(str(parquet)) == DOCS
    a, b = load_blocks(str(jsonl), tokenizer, 16), load_blocks(str(parquet), tokenizer, 16)
    assert torch.equal(a, b)
    ids = _expected_ids(tokenizer, DOCS)
    assert a.flatten().tolist() == ids[: a.numel()] and len(ids) - a.numel() < 16  # only the tail dropped
    assert tokenizer.eos_token_id in a  # documents are separated


def test_max_blocks_keeps_the_first_blocks(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    everything = load_blocks(str(path), tokenizer, 16)
    assert torch.equal(load_blocks(str(path), tokenizer, 16, max_blocks=3), everything[:3])


def test_too_short_and_empty_datasets_are_clear_errors(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("Ada visits the old river in Paris.")
    n = len(tokenizer(short.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(TracingError, match=rf"has {n} tokens, fewer than one block of 512: use a smaller --block_size"):
        load_blocks(str(short), tokenizer, 512)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(TracingError, match="is empty"):
        load_blocks(str(empty), tokenizer, 8)


def test_malformed_local_files_name_the_fix(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(TracingError, match=r"bad.jsonl:2: no string field 'text'"):
        load_texts(str(bad))
    pq = tmp_path / "bad.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(pq)
    with pytest.raises(TracingError, match=r"no 'text' column \(columns: body\)"):
        load_texts(str(pq))
    with pytest.raises(TracingError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(TracingError, match="unknown dataset 'wikitxt': use wikitext, random, generated"):
        load_texts("wikitxt")
    with pytest.raises(TracingError, match="needs a tokenizer"):
        load_blocks(str(bad), None, 8)


def test_random_is_seeded_uniform_and_needs_no_tokenizer():
    a = load_blocks("random", None, 64, max_blocks=50, seed=3, vocab_size=100)
    assert a.shape == (50, 64) and a.dtype == torch.long
    assert torch.equal(a, load_blocks("random", None, 64, max_blocks=50, seed=3, vocab_size=100))
    assert not torch.equal(a, load_blocks("random", None, 64, max_blocks=50, seed=4, vocab_size=100))
    assert a.min() >= 0 and a.max() < 100
    counts = torch.bincount(a.flatten(), minlength=100).float()  # 32 per id on average
    assert counts.min() > 8 and counts.max() < 64
    with pytest.raises(TracingError, match="vocabulary size"):
        load_blocks("random", None, 8)


def test_wikitext_offline_suggests_a_local_file():
    with pytest.raises(TracingError, match=r"cannot load WikiText-103.*pass a local .txt/.jsonl/.parquet file"):
        load_texts("wikitext")


def test_wikitext_rows_become_articles():
    from tracing.data import _wikitext_articles

    rows = ["", " = Alpha = \n", "", " The first . \n", " = = History = = \n", " More . \n",
            " = Beta = \n", " Second . \n"]
    assert _wikitext_articles(rows) == ["= Alpha = \n\n The first . \n = = History = = \n More .",
                                        "= Beta = \n Second ."]


def test_generated_reads_each_models_texts_interleaved(tmp_path, tokenizer):
    for mid, texts in (("org/base", ["b0", "b1", "b2"]), ("./ckpt/ft@v1", ["f0"])):
        path = generated_path(tmp_path, mid)
        path.write_text(json.dumps({"model_id": mid, "seed": 0, "max_new_tokens": 32, "texts": texts}))
    assert load_texts("generated", model_ids=("org/base", "./ckpt/ft@v1"), generated_dir=tmp_path) == \
        ["b0", "f0", "b1", "b2"]
    hint = r"no generated texts for org/other .*python generate.py --model_id org/other"
    with pytest.raises(TracingError, match=hint):
        load_texts("generated", model_ids=("org/base", "org/other"), generated_dir=tmp_path)
    blocks = load_blocks("generated", tokenizer, 2, model_ids=("org/base",), generated_dir=tmp_path)
    assert blocks.flatten().tolist() == _expected_ids(tokenizer, ["b0", "b1", "b2"])[: blocks.numel()]
