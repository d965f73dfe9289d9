"""The catalogue: a folder of plain files.

    DIR/index.json                          schema, fingerprint settings, one entry per model (written last)
    DIR/fingerprints/<content hash>.safetensors   one fingerprint per model (tracing/catalog/fingerprint.py)

    cat = Catalog.open("DIR")               # the index read and checked (bad files: one-line errors)
    cat.entries, cat.settings, cat.entry("name")
    fp = cat.load(entry)                    # its fingerprint
    cat.write_fingerprint(fp)               # atomic; what an `add` job writes
    cat.update(add=[entry], remove=["name"])   # under the folder's lock: re-read, change, write the index

Every file is written whole (a temp file renamed over it) and the index after the fingerprints it names, so an
interrupted `add` or `remove` leaves a valid catalogue: at worst a fingerprint no entry names, which the next `add`
of that model reuses instead of reading the model again.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from tracing import naming
from tracing.catalog.fingerprint import Fingerprint, check_schema, from_bytes, to_bytes
from tracing.catalog.sketch import Settings
from tracing.errors import TracingError
from tracing.results import atomic_write

INDEX_SCHEMA = 1
ENTRY_KEYS = ("name", "content_hash", "location", "model_type", "family", "layers", "hidden", "weight_bytes",
              "fingerprint_bytes", "added")
ADD_HINT = "python -m tracing.catalog add --catalog {root} MODEL..."


class Catalog:
    """One catalogue folder: its settings and entries (plain dicts with ENTRY_KEYS), as last read."""

    def __init__(self, root: Path, settings: Settings, entries: list[dict]):
        self.root, self.settings, self.entries = Path(root), settings, entries

    # ------------------------------------------------------------------ reading
    @property
    def index_path(self) -> Path:
        return self.root / naming.CATALOG_INDEX

    @classmethod
    def open(cls, root: str | Path) -> Catalog:
        """The catalogue at `root`; TracingError when there is none or its index is not readable."""
        root = Path(root)
        path = root / naming.CATALOG_INDEX
        if not path.is_file():
            raise TracingError(f"no catalogue at {root} (no {naming.CATALOG_INDEX}): build one with "
                               f"{ADD_HINT.format(root=root)}")
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise TracingError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise TracingError(f"{path} is corrupt (not JSON: {e.msg} at line {e.lineno}): restore it, or rebuild "
                               f"the catalogue with add (its fingerprints are reused)") from None
        if not isinstance(doc, dict):
            raise TracingError(f"{path} is not a catalogue index (a JSON object with schema, settings, models)")
        check_schema(doc.get("schema"), INDEX_SCHEMA, str(path), "catalogue")
        models = doc.get("models")
        bad = not isinstance(models, list) or any(not isinstance(e, dict) or set(ENTRY_KEYS) - set(e) for e in models)
        if bad:
            raise TracingError(f"{path} is corrupt (its models are not entries with {', '.join(ENTRY_KEYS)}): "
                               "restore it, or rebuild the catalogue with add (its fingerprints are reused)")
        return cls(root, Settings.from_dict(doc.get("settings"), str(path)), models)

    @classmethod
    def create(cls, root: str | Path, settings: Settings) -> Catalog:
        """A new, empty catalogue at `root` (its index written now)."""
        cat = cls(Path(root), settings, [])
        try:
            (cat.root / naming.FINGERPRINTS_SUBDIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TracingError(f"cannot create the catalogue {root}: {e.strerror or e}") from None
        with cat.locked():
            if not cat.index_path.exists():
                cat._write()
        return cls.open(root)

    def require_models(self) -> None:
        if not self.entries:
            raise TracingError(f"catalogue {self.root} has no models: add some with {ADD_HINT.format(root=self.root)}")

    def entry(self, name: str) -> dict:
        """The entry added under `name`; a TracingError naming the catalogued ones otherwise."""
        for e in self.entries:
            if e["name"] == name:
                return e
        names = [e["name"] for e in self.entries]
        near = difflib.get_close_matches(name, names, n=1)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise TracingError(f"{name} is not in catalogue {self.root}" + (f" (did you mean {near[0]}?)" if near else "")
                           + (f"; catalogued: {shown}" if names else "; it has no models"))

    def by_hash(self, content_hash: str) -> dict | None:
        return next((e for e in self.entries if e["content_hash"] == content_hash), None)

    def fingerprint_path(self, content_hash: str) -> Path:
        return self.root / naming.FINGERPRINTS_SUBDIR / naming.fingerprint_file(content_hash)

    def load(self, entry: dict) -> Fingerprint:
        """The fingerprint of a catalogued model."""
        path = self.fingerprint_path(entry["content_hash"])
        fix = f"remove {entry['name']} and add it again"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TracingError(f"catalogue {self.root}: the fingerprint of {entry['name']} ({path.name}) is missing: "
                               f"{fix}") from None
        try:
            fp = from_bytes(data, f"catalogue {self.root}: {naming.FINGERPRINTS_SUBDIR}/{path.name}")
        except TracingError as e:
            raise TracingError(f"{e}: {fix}") from None
        if fp.meta.get("content_hash") != entry["content_hash"]:
            raise TracingError(f"catalogue {self.root}: {path.name} holds another model's fingerprint: {fix}")
        fp.meta["name"] = entry["name"]  # the name it was added under (a reused fingerprint may carry another)
        return fp

    def orphan(self, content_hash: str) -> Fingerprint | None:
        """A readable fingerprint file for `content_hash` that no entry names (an interrupted add), or None."""
        path = self.fingerprint_path(content_hash)
        try:
            fp = from_bytes(path.read_bytes(), str(path))
        except (OSError, TracingError):
            return None
        return fp if fp.meta.get("content_hash") == content_hash and fp.meta.get(
            "settings") == self.settings.to_dict() else None

    # ------------------------------------------------------------------ writing
    def write_fingerprint(self, fp: Fingerprint) -> int:
        """Write `fp` (atomic) under its content hash; returns the file's size in bytes."""
        data = to_bytes(fp)
        path = self.fingerprint_path(fp.meta["content_hash"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        return len(data)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The catalogue's lock (fcntl.flock on DIR/.lock): one writer of the index at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / naming.CATALOG_LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def update(self, add: list[dict] = (), remove: list[str] = ()) -> list[dict]:
        """Under the lock: re-read the index, drop the entries named in `remove`, append those of `add` (their
        fingerprints already written) whose content hash and name are not catalogued yet, write the index; then
        delete the removed models' fingerprint files. Returns the entries of `add` left out (already there)."""
        with self.locked():
            now = Catalog.open(self.root)
            gone = [now.entry(name) for name in remove]
            self.settings, self.entries = now.settings, [e for e in now.entries if e not in gone]
            skipped = []
            for e in add:
                if self.by_hash(e["content_hash"]) is not None or any(x["name"] == e["name"] for x in self.entries):
                    skipped.append(e)
                else:
                    self.entries.append(dict(e))
            self._write()
            for e in gone:
                if self.by_hash(e["content_hash"]) is None:
                    self.fingerprint_path(e["content_hash"]).unlink(missing_ok=True)
        return skipped

    def _write(self) -> None:
        doc = {"schema": INDEX_SCHEMA, "kind": "model-tracing catalogue", "settings": self.settings.to_dict(),
               "models": self.entries}
        atomic_write(self.index_path, (json.dumps(doc, indent=1) + "\n").encode())


def new_entry(fp: Fingerprint, location: str, fingerprint_bytes: int) -> dict:
    """The index entry of a fingerprint written to the catalogue."""
    m = fp.meta
    return {"name": m["name"], "content_hash": m["content_hash"], "location": location,
            "model_type": m["model_type"], "family": m["family"], "layers": m["layers"], "hidden": m["hidden"],
            "weight_bytes": m["weight_bytes"], "fingerprint_bytes": fingerprint_bytes,
            "added": datetime.now(timezone.utc).isoformat(timespec="seconds")}
