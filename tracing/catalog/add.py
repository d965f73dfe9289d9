"""`add`: fingerprint models into a catalogue, each model read once; many models as one job each (submitit).

    out = add_models("DIR", [("org/a", "org/a"), ("path/b", "b")])                    # in this process
    out = add_models("DIR", models, cluster="local", slurm={"cpus_per_task": 2})      # one job per model
    out["added"], out["present"], out["failed"]

Per model: the name is resolved (`checkpoints.resolve`), its content hash taken (sha256 of its weight files, cached
per file: a second add of the same files reads nothing), and if that hash is catalogued already the model is not
read again ("already catalogued as ..."). Otherwise one streaming read builds its fingerprint (fingerprint.py),
written under its hash; the index is written after the fingerprints, by this process (jobs never write it), under
the catalogue's lock. In this process the index is updated after every model, so an interrupted add keeps every
model finished before it; with jobs, a fingerprint written before an interruption is reused by the next add.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from submitit.helpers import Checkpointable

from tracing import naming
from tracing.catalog.fingerprint import build
from tracing.catalog.sketch import Settings
from tracing.catalog.store import Catalog, new_entry
from tracing.checkpoints import resolve
from tracing.cluster import executor_parameters, preflight, submit_array, wait_for
from tracing.errors import TracingError
from tracing.results import error_line
from tracing.sources import open_source

# what a fingerprint job asks for unless the YAML's slurm: block or the flags say otherwise: no GPU, one
# layer's MLP matrices in memory (a 70B layer in float32: 3 x 0.9 GiB)
CATALOG_SLURM = {"gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": 16, "timeout_min": 60}


def location_of(model: str) -> str:
    """What a later exact test opens: a local path made absolute, else the hub id (with its @revision)."""
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.exists(path) else model


def fingerprint_model(root: str | Path, model: str, name: str) -> dict:
    """Fingerprint one model into the catalogue at `root` (not its index): {"status": "added" | "reused" |
    "present", "name", "model", "entry" (added, reused), "as" (present), "seconds", "read_bytes"}."""
    t0 = time.perf_counter()
    cat = Catalog.open(root)
    ckpt = resolve(model, progress=False)
    out = {"name": name, "model": model, "read_bytes": 0}
    src = open_source(ckpt, progress=False) if ckpt.from_hub else None  # a hub model's files come first: the hash
    try:
        digest = ckpt.content_hash
        if (present := cat.by_hash(digest)) is not None:
            return {**out, "status": "present", "as": present["name"], "seconds": time.perf_counter() - t0}
        taken = next((e for e in cat.entries if e["name"] == name), None)
        if taken is not None:
            raise TracingError(f"{name} is catalogued as another model (content hash {taken['content_hash'][:12]}, "
                               f"this one {digest[:12]}): remove it first (python -m tracing.catalog remove "
                               f"--catalog {root} {name}) or add this one under another name")
        fp, status = cat.orphan(digest), "reused"
        if fp is None:
            src = src or open_source(ckpt, progress=False)
            weight_bytes = sum(f.stat().st_size for f in ckpt.weight_files())
            fp = build(src, cat.settings, name=name, content_hash=digest, weight_bytes=weight_bytes)
            out["read_bytes"] = src.read_bytes
            status = "added"
    finally:
        if src is not None:
            src.close()
    fp.meta["name"] = name
    nbytes = cat.write_fingerprint(fp) if status == "added" else cat.fingerprint_path(digest).stat().st_size
    return {**out, "status": status, "entry": new_entry(fp, location_of(model), nbytes),
            "seconds": time.perf_counter() - t0}


def _one(item: dict) -> dict:
    """fingerprint_model on one {"root", "model", "name"}; bad input as {"status": "failed", "error": ...}."""
    try:
        return fingerprint_model(item["root"], item["model"], item["name"])
    except TracingError as e:
        return {"name": item["name"], "model": item["model"], "status": "failed", "error": str(e), "kind": "input"}


class FingerprintJob(Checkpointable):
    """Job function of a fan-out: one model (`_one`), with a line in the job's log before and after."""

    def __call__(self, item: dict) -> dict:
        print(f"model-tracing catalogue job: {item['model']} -> {item['root']}", flush=True)
        out = _one(item)
        print(f"model-tracing catalogue job: {out['status']}", flush=True)
        return out


def open_or_create(root: str | Path, settings: Settings | None) -> Catalog:
    """The catalogue at `root`, created with `settings` (default Settings()) if there is none; settings that
    differ from an existing catalogue's are refused (its fingerprints must share them)."""
    if not (Path(root) / naming.CATALOG_INDEX).exists():
        return Catalog.create(root, settings or Settings())
    cat = Catalog.open(root)
    if settings is not None and settings != cat.settings:
        raise TracingError(f"catalogue {root} was made with {cat.settings.to_dict()}; every fingerprint in it "
                           "shares them: drop the settings flags, or start another catalogue")
    return cat


def add_models(root: str | Path, models: list[tuple[str, str]], *, settings: Settings | None = None,
               cluster: str | None = None, slurm: dict | None = None, overrides: dict | None = None,
               max_wait: float | None = None, out: TextIO | None = None) -> dict:
    """Add (model, name) pairs (module docstring); `cluster` None: one after another in this process, else one
    submitit job per model ("slurm", "local", "debug"), waited for. Returns {"added", "present", "failed"}."""
    out = out or sys.stdout
    names = [n for _, n in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TracingError(f"name {twice[0]} is given to several models: give each model its own name")
    cat = open_or_create(root, settings)
    items = [{"root": str(cat.root.resolve()), "model": m, "name": n} for m, n in models]
    summary: dict = {"added": [], "present": [], "failed": []}
    if cluster is None:
        for item in items:
            _record(cat, _one(item), summary, out)
        return summary
    params = executor_parameters({**CATALOG_SLURM, **(slurm or {})}, overrides or {}, cluster, "tracing-catalog")
    if cluster == "slurm":
        preflight(params, out)
    jobs = submit_array(FingerprintJob(), items, cat.root / naming.SUBMITIT_SUBDIR, cluster, params)
    print(f"submitted {len(jobs)} fingerprint job(s) on {cluster}, logs in {cat.root / naming.SUBMITIT_SUBDIR}",
          file=out, flush=True)
    still = set(wait_for(jobs, cluster, max_wait, out))
    results = []
    for k, (item, job) in enumerate(zip(items, jobs)):
        if k in still:
            results.append({**item, "status": "failed", "error": "still running when --max_wait ran out (its "
                            "fingerprint is reused by the next add)", "kind": "internal"})
            continue
        try:
            results.append(job.result())
        except Exception as e:
            results.append({**item, "status": "failed", "error": error_line(e), "kind": "internal"})
    done = [r for r in results if r["status"] in ("added", "reused")]
    skipped = {id(e) for e in cat.update(add=[r["entry"] for r in done])}
    for r in results:
        if r in done and id(r["entry"]) in skipped:  # the same model twice in this add, or added meanwhile
            r = {**r, "status": "present", "as": (cat.by_hash(r["entry"]["content_hash"]) or {}).get("name", "?")}
        _report(r, summary, out)
    return summary


def _record(cat: Catalog, result: dict, summary: dict, out: TextIO) -> None:
    """In-process add: index the model now (an interruption keeps it), then report it."""
    if result["status"] in ("added", "reused") and cat.update(add=[result["entry"]]):
        held = cat.by_hash(result["entry"]["content_hash"])
        result = {**result, "status": "present", "as": held["name"] if held else "?"}
    _report(result, summary, out)


def _report(r: dict, summary: dict, out: TextIO) -> None:
    if r["status"] == "failed":
        summary["failed"].append((r["name"], r["error"], r.get("kind", "internal")))
        print(f"failed   {r['name']}: {r['error']}", file=out, flush=True)
    elif r["status"] == "present":
        summary["present"].append((r["name"], r["as"]))
        print(f"present  {r['name']} is already catalogued as {r['as']} (same content hash): nothing to do",
              file=out, flush=True)
    else:
        e = r["entry"]
        share = f", {100 * e['fingerprint_bytes'] / e['weight_bytes']:.2f}% of its weights" if e["weight_bytes"] else ""
        how = "fingerprint reused" if r["status"] == "reused" else f"read in {r['seconds']:.1f} s"
        summary["added"].append(r["name"])
        print(f"added    {r['name']} ({e['model_type']}, {e['layers']} layers; fingerprint "
              f"{e['fingerprint_bytes'] / 1024:.0f} KiB{share}; {how})", file=out, flush=True)
