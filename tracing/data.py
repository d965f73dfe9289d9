"""Text for activation statistics, `mode` and `--eval`: datasets -> documents -> fixed-size token blocks.

    blocks = load_blocks("wikitext", tokenizer, block_size=512, max_blocks=64)   # (64, 512) LongTensor
    blocks = load_blocks("notes.jsonl", tokenizer, 128)                          # local file
    blocks = load_blocks("random", None, 128, max_blocks=8, vocab_size=32000)   # no tokenizer needed

Datasets (`--dataset`):
  wikitext     WikiText-103 (raw) through `datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")`,
               one document per article; needs the hub or a datasets cache.
  PATH.txt     the whole file is one document.
  PATH.jsonl   one JSON object per line, its "text" field is a document.
  PATH.parquet one document per row of the "text" column.
  random       uniform token ids in [0, vocab_size), seeded (load_blocks only; no text, no tokenizer).
  generated    texts sampled from the models themselves by generate.py: for each model id (base and
               fine-tuned) the file `tracing.naming.generated_path(generated_dir, model_id)`:

                   {"model_id": str, "seed": int, "max_new_tokens": int, "texts": [str, ...]}

               The models' texts are interleaved (base 0, ft 0, base 1, ...) so that --max_blocks keeps both.

Blocks: documents are tokenized without special tokens, joined with the tokenizer's eos token between them,
and cut into consecutive `block_size` blocks; the incomplete tail is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tracing.errors import TracingError
from tracing.hub import offline_reason, set_by_user
from tracing.naming import GENERATED_DIR, generated_path

WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")
RANDOM_DEFAULT_BLOCKS = 32  # "random" with no --max_blocks
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_CHUNK_CHARS = 200_000  # longer documents are tokenized in newline-aligned pieces (progress, early stop)
_ARTICLE = re.compile(r"^ = [^=].* = \n?$")  # a WikiText top-level heading starts a new article


def _choices() -> str:
    return "wikitext, random, generated, or a local .txt/.jsonl/.parquet file"


# ---------------------------------------------------------------------- texts
def load_texts(dataset: str, *, split: str = "test", seed: int = 0, model_ids: Sequence[str] = (),
               generated_dir: str | Path = GENERATED_DIR) -> list[str]:
    """The documents of `dataset` (see the module docstring), in a fixed order.

    `seed` is accepted for symmetry with load_blocks; no text source here is sampled.
    """
    name = str(dataset).strip()
    if name == "random":
        raise TracingError("dataset 'random' has no text: it is made of token ids by load_blocks")
    if name == "wikitext":
        return _wikitext(split)
    if name == "generated":
        return _generated(model_ids, Path(generated_dir))
    path = Path(name).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return _local(path)
    raise TracingError(f"unknown dataset '{dataset}': use {_choices()}")


def _wikitext(split: str) -> list[str]:
    import datasets

    reason = offline_reason(datasets=True)  # no network: datasets goes offline at once instead of retrying for a minute
    try:
        rows = datasets.load_dataset(*WIKITEXT, split=split)["text"]
    except Exception as e:  # offline, no cache, hub down: all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = f"not in the datasets cache and {reason}" if reason else first
        user = set_by_user(datasets=True)
        unset = f", or unset {user.split('=')[0]} to download it" if reason and user else ""
        raise TracingError(f"cannot load WikiText-103 ({split} split): {why}: pass a local .txt/.jsonl/.parquet "
                           f"file with --dataset FILE, or --dataset random | generated{unset}") from None
    return _wikitext_articles(rows)


def _wikitext_articles(rows: Iterable[str]) -> list[str]:
    """WikiText rows (lines, many empty) -> one string per article, split at ' = Title = ' headings."""
    docs: list[list[str]] = []
    for row in rows:
        if _ARTICLE.match(row) or not docs:
            docs.append([])
        docs[-1].append(row or "\n")  # empty rows are the paragraph breaks
    return [d for d in ("".join(lines).strip() for lines in docs) if d]


def _local(path: Path) -> list[str]:
    if not path.is_file():
        raise TracingError(f"dataset file {path} does not exist: pass an existing .txt/.jsonl/.parquet path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if suffix == ".jsonl":
        return list(_jsonl_texts(path))
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow: ArrowInvalid, OSError, ... for a damaged or foreign file
            first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
            raise TracingError(f"cannot read {path} as parquet ({first}): pass a valid .parquet file with a 'text' "
                               f"column, or a .txt/.jsonl file") from None
        if "text" not in frame.columns:
            raise TracingError(f"{path} has no 'text' column (columns: {', '.join(map(str, frame.columns))}): "
                               f"rename the text column to 'text'")
        return [str(t) for t in frame["text"].tolist() if t is not None]
    raise TracingError(f"cannot read dataset file {path}: use a .txt, .jsonl or .parquet file")


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TracingError(f"{path}:{n}: not valid JSON ({e.msg}): write one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TracingError(f"{path}:{n}: no string field 'text': write one {{\"text\": ...}} object per line")
            yield record["text"]


def _generated(model_ids: Sequence[str], generated_dir: Path) -> list[str]:
    if not model_ids:
        raise TracingError("dataset 'generated' needs the model ids whose texts to read (base and fine-tuned)")
    per_model = []
    for mid in dict.fromkeys(model_ids):  # unique, in order
        path = generated_path(generated_dir, mid)
        if not path.is_file():
            raise TracingError(f"no generated texts for {mid} at {path}: run "
                               f"`python generate.py --model_id {mid}` first (or pass --generated_dir)")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            texts = record["texts"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TypeError("'texts' must be a list of strings")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TracingError(f"{path} is not a generate.py output ({type(e).__name__}: {e}): "
                               f"regenerate it with generate.py") from None
        per_model.append(texts)
    longest = max(len(t) for t in per_model)
    return [texts[i] for i in range(longest) for texts in per_model if i < len(texts)]


# ---------------------------------------------------------------------- blocks
def random_blocks(vocab_size: int, block_size: int, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """(n_blocks, block_size) uniform token ids in [0, vocab_size), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, block_size), generator=g, dtype=torch.long)


def _pieces(text: str) -> Iterator[str]:
    """Split a long document at newlines into pieces of about _CHUNK_CHARS (each keeps its newline)."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = text.rfind("\n", start, start + _CHUNK_CHARS)
        cut = start + _CHUNK_CHARS if cut <= start else cut + 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_documents(texts: Sequence[str], tokenizer, *, max_tokens: int | None = None,
                       progress: bool = True, batch_docs: int = 64) -> torch.Tensor:
    """1-D token ids of all documents, eos between documents; stops once `max_tokens` are collected."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    total = sum(len(t) for t in texts)
    bar = tqdm(total=total, desc="tokenize", unit="char", unit_scale=True,
               disable=not progress or total < 10 * _CHUNK_CHARS)
    batch: list[tuple[str, bool]] = []  # (piece, ends a document)

    def flush() -> None:
        enc = tokenizer([p for p, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (piece, last), piece_ids in zip(batch, enc):
            ids.extend(piece_ids)
            if last and eos is not None:
                ids.append(eos)
            bar.update(len(piece))
        batch.clear()

    with bar:
        for text in texts:
            if not text:
                continue
            pieces = list(_pieces(text))
            for k, piece in enumerate(pieces):
                batch.append((piece, k == len(pieces) - 1))
                if len(batch) >= batch_docs or sum(len(p) for p, _ in batch) >= 4 * _CHUNK_CHARS:
                    flush()
                    if max_tokens is not None and len(ids) >= max_tokens:
                        return torch.tensor(ids[:max_tokens], dtype=torch.long)
        if batch:
            flush()
    if ids and eos is not None and ids[-1] == eos:
        ids.pop()  # eos separates documents; none after the last one
    return torch.tensor(ids if max_tokens is None else ids[:max_tokens], dtype=torch.long)


def load_blocks(dataset: str, tokenizer, block_size: int, *, max_blocks: int | None = None, seed: int = 0,
                vocab_size: int | None = None, progress: bool = True, **kw) -> torch.Tensor:
    """(n_blocks, block_size) LongTensor of consecutive token blocks from `dataset`.

    `kw` goes to load_texts (split, model_ids, generated_dir). "random" needs `vocab_size` (or a tokenizer).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise TracingError(f"--block_size must be a positive integer, got {block_size!r}")
    if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 1):
        raise TracingError(f"--max_blocks must be a positive integer, got {max_blocks!r}")
    if str(dataset).strip() == "random":
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        if not vocab_size or vocab_size < 1:
            raise TracingError("dataset 'random' needs the vocabulary size: pass vocab_size (the model's)")
        return random_blocks(vocab_size, block_size, max_blocks or RANDOM_DEFAULT_BLOCKS, seed)

    if tokenizer is None:
        raise TracingError(f"dataset '{dataset}' needs a tokenizer but the model has none: save one next to "
                           f"the model, or use --dataset random")
    texts = load_texts(dataset, seed=seed, **kw)
    if not any(t.strip() for t in texts):
        raise TracingError(f"dataset '{dataset}' is empty (no text found): pass a file with text in it")
    max_tokens = None if max_blocks is None else max_blocks * block_size
    ids = tokenize_documents(texts, tokenizer, max_tokens=max_tokens, progress=progress)  # (n_tokens,)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise TracingError(f"dataset '{dataset}' has {len(ids)} tokens, fewer than one block of {block_size}: "
                           f"use a smaller --block_size or more text")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise TracingError(f"the tokenizer produces id {int(ids.max())} but the model has {vocab_size} "
                           f"embeddings: use the tokenizer that belongs to the model")
    return ids[: n_blocks * block_size].view(n_blocks, block_size)
