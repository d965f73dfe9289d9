"""Hub checkpoints for streaming: download only the files a weight statistic reads, then read them locally.

    patterns = hub_patterns(repo_files, index)   # config, tokenizer, index and the shards it names
    folder = fetch(Location("hub", "org/model", "main"), token)   # a local snapshot folder, or None

The choice is made from the repository's file list (and its safetensors index): config and tokenizer files,
`model.safetensors.index.json` plus exactly the shards it names, or the single `model.safetensors`; an
adapter repository gets its adapter files. Never `*.bin`, `*.pth`, `original/` or GGUF copies beside them.
A repository without safetensors weights gives None: the caller loads the model the classic way.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as he

from tracing.access import Location, hub_error
from tracing.checkpoints import ADAPTER_CONFIG, INDEX, SINGLE, TOKENIZER_FILES
from tracing.sources.lora import ADAPTER_FILE

CONFIG_FILES = ("config.json", "generation_config.json")
_OFFLINE = (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError, ConnectionError, TimeoutError)


def hub_patterns(repo_files: list[str], index: dict | None = None) -> list[str] | None:
    """The files to download (allow_patterns) for streaming, from the repository's file list and, when it has
    one, the content of its safetensors index. None: no safetensors weights to stream."""
    files = set(repo_files)
    extra = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in files]
    if ADAPTER_CONFIG in files:
        return [ADAPTER_CONFIG, ADAPTER_FILE, *extra] if ADAPTER_FILE in files else None
    if INDEX in files:
        if index is None:
            raise ValueError(f"{INDEX} is in the repository: pass its content to choose the shards")
        shards = sorted(set(index["weight_map"].values()))
        return [*extra, INDEX, *shards]
    if SINGLE in files:
        return [*extra, SINGLE]
    return None


def fetch(src: Location, name: str, token: str | None) -> Path | None:
    """Download what `hub_patterns` chooses into the hub cache; the snapshot folder (None: nothing to stream).

    Offline, a snapshot already in the cache is used as it is."""
    try:
        try:
            files = huggingface_hub.list_repo_files(src.path, revision=src.revision, token=token)
        except _OFFLINE:
            folder = huggingface_hub.snapshot_download(src.path, revision=src.revision, token=token,
                                                       local_files_only=True)
            return Path(folder)
        index = None
        if INDEX in files and ADAPTER_CONFIG not in files:
            index_file = huggingface_hub.hf_hub_download(src.path, INDEX, revision=src.revision, token=token)
            index = json.loads(Path(index_file).read_text())
        patterns = hub_patterns(files, index)
        if patterns is None:
            return None
        return Path(huggingface_hub.snapshot_download(src.path, revision=src.revision, token=token,
                                                      allow_patterns=patterns))
    except (OSError, ValueError, he.HfHubHTTPError) as e:
        err = hub_error(e, src, name, token)
        if err is not None:
            raise err from None
        raise


def fetch_file(src: Location, name: str, filename: str, token: str | None) -> Path:
    """One file of a hub repository (e.g. a .gguf), from the cache or downloaded."""
    try:
        return Path(huggingface_hub.hf_hub_download(src.path, filename, revision=src.revision, token=token))
    except (OSError, ValueError, he.HfHubHTTPError) as e:
        err = hub_error(e, src, name, token)
        if err is not None:
            raise err from None
        raise
