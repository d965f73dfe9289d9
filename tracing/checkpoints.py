"""One checkpoint, resolved once: where a model lives and what it is.

    ckpt = resolve("org/model@v1.0")       # located, its config read, its architecture checked: once per run
    ckpt.kind, ckpt.path, ckpt.revision    # "hub" | "dir" | "adapter" | "gguf"; local path or repo id; @revision
    ckpt.config, ckpt.spec                 # transformers config (an adapter: its base's), ArchSpec
    ckpt.adapter, ckpt.base                # a PEFT adapter's adapter_config.json and its base Checkpoint
    ckpt.weight_files()                    # the files holding its weights (a hub checkpoint: once in the cache)
    ckpt.content_hash                      # what its weights are (below), computed on first use
    ckpt.identity()                        # what a result record stores: name, kind, revision, commit, hash
    tok = load_tokenizer(ckpt)             # its tokenizer (an adapter: its own, else its base's), or None

Loading (`models.load_model`), tensor sources (`sources.open_source`) and the opened pair (`pair.OpenedPair`)
take a Checkpoint, so a name is located and its config read once per run; given a name, each resolves it here.
An unsupported architecture, an unreachable or broken config, an adapter whose base cannot be found are one-line
TracingErrors from `resolve`, before any weight is read.

Content hash (sha256, hex; `tracing.digests`): over the kind of checkpoint, its config.json without the keys
that name the saving library, and the sha256 of each weight file by name (the same digest as `sha256sum` and
the hub's LFS id); a GGUF file: its sha256 (its config is inside it); an adapter: its adapter_config.json (the
recorded base path left out), its weight files and its base's content hash. Equal hashes: the same config and
byte-identical weight files, so equal weights (saved twice the same way, or a hub snapshot and its local copy,
hash equal; re-sharded, re-typed or merged, they do not). The first hash reads each weight file once (~1 GB/s
per core), later ones come from a cache (docs/checkpoints.md).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import transformers

from tracing.access import ADAPTER_CONFIG, Location, guard, locate, read_adapter_config, read_config
from tracing.arch import ArchSpec, get_spec
from tracing.digests import combine, config_digest, file_digests, json_digest
from tracing.errors import TracingError

log = logging.getLogger(__name__)

# what a tokenizer is made of: downloaded with a hub checkpoint, and how a local directory shows it has one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHARD = re.compile(r"(.*)-(\d+)-of-(\d+)\.safetensors$")
REFETCH = "download or save the checkpoint again"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A resolved model name: where it is (`location`), its config and ArchSpec, and for a PEFT adapter its
    adapter config and base. Holds no token and nothing loaded."""

    name: str  # as the user gave it
    location: Location
    config: Any  # transformers config (an adapter: its base's)
    spec: ArchSpec
    adapter: dict | None = None  # adapter_config.json, for an adapter
    base: Checkpoint | None = None  # the checkpoint an adapter applies to

    @property
    def kind(self) -> str:
        return self.location.kind

    @property
    def path(self) -> str:
        return self.location.path

    @property
    def revision(self) -> str | None:
        return self.location.revision

    @property
    def gguf_file(self) -> str | None:
        return self.location.gguf_file

    @property
    def stored_dtype(self) -> Any:
        """The dtype its config says the weights are stored in (None when unknown; a GGUF file's blocks: None)."""
        config = self.config
        return None if self.gguf_file else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)

    @property
    def from_hub(self) -> bool:
        return self.kind == "hub" or (self.kind == "gguf" and not Path(self.path).is_dir())

    @functools.cached_property
    def commit(self) -> str | None:
        """The hub commit its files come from (from the local cache; None for a local checkpoint)."""
        if not self.from_hub:
            return None
        first = self.gguf_file or (ADAPTER_CONFIG if self.adapter else "config.json")
        cached = huggingface_hub.try_to_load_from_cache(self.path, first, revision=self.revision)
        return Path(cached).parent.name if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots" \
            else None

    def local_dir(self) -> Path:
        """The folder holding its files: the local path, or the hub snapshot in the cache."""
        if not self.from_hub:
            return Path(self.path)
        try:
            return Path(huggingface_hub.snapshot_download(self.path, revision=self.revision, local_files_only=True))
        except Exception:  # any hub client failure means the same here
            raise TracingError(f"{self.name}: its files are not in the Hugging Face cache") from None

    def weight_files(self) -> list[Path]:
        """The files holding its own weights (not an adapter's base): safetensors (or .bin) files, the .gguf file,
        the adapter's weight file. TracingError when they are incomplete."""
        folder = self.local_dir()
        if self.gguf_file:
            return [folder / self.gguf_file]
        if self.adapter is not None:
            return [folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()][:1]
        if has_safetensors(folder):
            return weight_files(folder)[0]
        return sorted(folder.glob("*.bin"))

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 (hex) of what this checkpoint is (module docstring); reads the weight files the first time."""
        files = self.weight_files()
        if not files:
            raise TracingError(f"{self.name}: no weight files to hash")
        digests = list(zip((f.name for f in files), file_digests(files)))
        if self.gguf_file:
            return combine("gguf", digests)
        if self.adapter is not None:
            kept = {k: v for k, v in self.adapter.items() if k not in ("base_model_name_or_path", "revision")}
            return combine("adapter", [("adapter_config", json_digest(kept)), *digests,
                                       ("base", self.base.content_hash)])
        return combine("checkpoint", [("config", config_digest(self.local_dir() / "config.json")), *digests])

    def identity(self) -> dict:
        """What a record stores: name, kind, model type, revision, hub commit, content hash (None when its
        files cannot be hashed), and an adapter's base."""
        try:
            digest = self.content_hash
        except (TracingError, OSError) as e:
            log.warning("cannot hash %s: %s", self.name, e)
            digest = None
        out = {"name": self.name, "kind": self.kind, "model_type": self.spec.model_type, "revision": self.revision,
               "commit": self.commit, "content_hash": digest}
        if self.base is not None:
            out["base"] = self.base.identity()
        return out

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {self.kind}, {self.spec.model_type})"

def hash_files(ckpts: list[Checkpoint]) -> None:
    """Hash the weight files of `ckpts` (and of adapters' bases) together, in parallel threads, so that their
    content hashes read no file afterwards."""
    files = []
    for ckpt in ckpts:
        for c in (ckpt, ckpt.base) if ckpt.base is not None else (ckpt,):
            try:
                files += c.weight_files()
            except (TracingError, OSError):
                pass  # content_hash says why
    file_digests(sorted(set(files)))


# ---------------------------------------------------------------------- resolving a name
def resolve(name: str, *, revision: str | None = None, token: str | None = None, trust_remote_code: bool = False,
            adapter_base: str | None = None, progress: bool = True) -> Checkpoint:
    """Locate `name` (hub id[@revision], local dir, PEFT adapter dir, .gguf file), read its config (an adapter:
    its adapter config, then its base: the recorded one if reachable, else `adapter_base`) and check that its
    architecture is supported. Nothing but configs is read."""
    token = token or os.environ.get("HF_TOKEN") or None
    with guard(token, progress):
        return _resolve(str(name), locate(name, revision), token=token, trust_remote_code=trust_remote_code,
                        adapter_base=adapter_base)


def _resolve(name: str, loc: Location, *, token, trust_remote_code: bool, adapter_base: str | None,
             config: Any = None) -> Checkpoint:
    adapter = read_adapter_config(loc, name, token) if loc.kind in ("adapter", "hub") else {}
    if adapter:
        base = _adapter_base(name, adapter, adapter_base, token=token, trust_remote_code=trust_remote_code)
        return Checkpoint(name, loc, base.config, base.spec, adapter, base)
    if config is None:
        config = read_config(loc, name, token=token, trust_remote_code=trust_remote_code)
    return Checkpoint(name, loc, config, get_spec(config))  # unsupported architecture: stops here


def _adapter_base(name: str, adapter: dict, adapter_base: str | None, *, token, trust_remote_code) -> Checkpoint:
    """The base an adapter applies to: its recorded base if reachable, else `adapter_base` (--adapter_base)."""
    recorded = adapter.get("base_model_name_or_path")
    found = None
    for candidate in (recorded, adapter_base):
        if not candidate:
            continue
        try:
            loc = locate(candidate)  # reachable means: located, and for a hub id its config read (no weights)
            config = read_config(loc, candidate, token=token, trust_remote_code=trust_remote_code) \
                if loc.kind == "hub" else None
            found = candidate, loc, config
            break
        except TracingError as e:
            if "gated" in str(e):
                raise
    if found is None:
        raise TracingError(f"adapter {name} needs base {recorded or '(none recorded)'} which cannot be found: "
                           f"pass --adapter_base PATH")
    base_name, loc, config = found
    if loc.kind == "adapter":
        raise TracingError(f"adapter {name}: its base {base_name} is itself an adapter: pass the "
                           f"full base model with --adapter_base PATH")
    if recorded and base_name != recorded:
        log.warning("adapter %s: recorded base %s is not reachable; using %s", name, recorded, base_name)
    return _resolve(base_name, loc, token=token, trust_remote_code=trust_remote_code, adapter_base=None,
                    config=config)


# ---------------------------------------------------------------------- its files
def has_safetensors(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / INDEX).is_file() or (d / SINGLE).is_file() or any(d.glob("*.safetensors"))


def weight_files(directory: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """(the safetensors files of a checkpoint directory, the index's key -> file map or None).

    Raises TracingError for an index naming a file that is absent, or an incomplete set of shards.
    """
    d = Path(directory)
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise TracingError(f"{d / INDEX} is not a safetensors index ({type(e).__name__}): {REFETCH}") from None
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not (d / n).is_file()]
        if absent:
            raise TracingError(f"{d / INDEX} names {absent[0]}, which is not in {d}"
                               f"{f' ({len(absent)} files missing)' if len(absent) > 1 else ''}: "
                               "download the missing shard(s), or the whole checkpoint again")
        return [d / n for n in names], weight_map
    if (d / SINGLE).is_file():
        return [d / SINGLE], None
    files = sorted(d.glob("*.safetensors"))
    shards = [m for f in files if (m := _SHARD.match(f.name))]
    if shards:  # shards without their index: at least check that none is missing
        stem, total = shards[0].group(1), int(shards[0].group(3))
        have = {int(m.group(2)) for m in shards if m.group(1) == stem}
        missing = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in have]
        if missing:
            raise TracingError(f"{d / missing[0]} is missing (shard {len(have)} of {total} present): "
                               "download it, or the whole checkpoint again")
    if not files:
        raise TracingError(f"{d} has no .safetensors file: save the model with save_pretrained "
                           f"(safe_serialization) or pass another checkpoint")
    return files, None


def load_tokenizer(ckpt: Checkpoint, *, token: str | None = None, trust_remote_code: bool = False,
                   quiet: bool = False):
    """The checkpoint's tokenizer (an adapter: its own, else its base's), or None with a warning (unless
    `quiet`): weight statistics need none, and statistics that need text ask for one."""
    kw = dict(revision=ckpt.revision, token=token, trust_remote_code=trust_remote_code)
    if ckpt.gguf_file:
        kw["gguf_file"] = ckpt.gguf_file
    local = Path(ckpt.path)
    why = None
    if local.is_dir() and not ckpt.gguf_file and not any((local / f).is_file() for f in TOKENIZER_FILES):
        why = "no tokenizer files"
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(ckpt.path, **kw)
            if len(tok) > 0:  # transformers may build an empty tokenizer from nothing
                return tok
            why = "empty vocabulary"
        except Exception as e:  # a missing tokenizer is not fatal: weight statistics do not need one
            why = type(e).__name__
    if ckpt.base is not None:
        return load_tokenizer(ckpt.base, token=token, trust_remote_code=trust_remote_code, quiet=quiet)
    if not quiet:
        log.warning("no tokenizer found with %s (%s); statistics that need text will ask for one", ckpt.path, why)
    return None
