"""`python -m tracing.catalog`: add, list, remove, identify (docs/catalog.md).

    python -m tracing.catalog add --catalog DIR MODEL...              # in this process, one model after another
    python -m tracing.catalog add --catalog DIR --config LIST.yaml --cluster slurm   # one job per model
    python -m tracing.catalog list --catalog DIR
    python -m tracing.catalog remove --catalog DIR NAME...
    python -m tracing.catalog identify --catalog DIR SUSPECT --json FILE
    python -m tracing.catalog tree --catalog DIR --out DIR            # families and directed trees (tracing.trees)

Bad input (no catalogue, a corrupt or newer file, a suspect of a family not catalogued, an unknown name) is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tracing.catalog.add import add_models
from tracing.catalog.identify import CONFIRM, identify, reachable
from tracing.catalog.sketch import Settings
from tracing.catalog.store import Catalog
from tracing.devices import resolve_device, threads
from tracing.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, TracingError, exit_on_error
from tracing.model_lists import SLURM_KEYS, load_models
from tracing.results import atomic_write
from tracing.trees import build_trees

SHOWN = 10  # candidates printed (the JSON holds all)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracing.catalog", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="fingerprint models into the catalogue (each model read once)")
    add.add_argument("models", nargs="*", metavar="MODEL", help="hub id[@revision], local dir, .gguf, adapter dir")
    add.add_argument("--config", help="a model-list YAML (launch.py's forms; names_1/names_2 name the models)")
    add.add_argument("--names", help="comma-separated names to add the MODELs under (default: as given)")
    add.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                     help="one submitit job per model (default: in this process, one after another)")
    add.add_argument("--max_wait", type=float, default=None, metavar="SECONDS", help="with --cluster: stop waiting")
    for key in ("sketch_dims", "anchors", "sample_rows"):
        add.add_argument(f"--{key}", type=int, default=None, help="fingerprint setting of a new catalogue "
                         f"(default {getattr(Settings(), key)})")
    g = add.add_argument_group("job resources (override the YAML's slurm: block)")
    for key, typ in (("partition", str), ("gpus_per_node", int), ("cpus_per_task", int), ("mem_gb", float),
                     ("timeout_min", int), ("account", str), ("qos", str), ("constraint", str),
                     ("array_parallelism", int)):
        g.add_argument(f"--{key}", type=typ, default=None)
    lst = sub.add_parser("list", help="the catalogued models")
    rm = sub.add_parser("remove", help="remove models (by the name they were added under)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    ident = sub.add_parser("identify", help="which catalogued model is the suspect built on?")
    ident.add_argument("suspect", metavar="SUSPECT")
    ident.add_argument("--confirm", type=int, default=CONFIRM,
                       help="candidates the exact test (auto, from the files) may confirm when the fingerprints are "
                            f"not decisive (default {CONFIRM}; 0: fingerprints only)")
    ident.add_argument("--device", default="cpu", help="where the comparisons run: cpu, cuda, auto (default cpu)")
    ident.add_argument("--save", default=None, help="keep the exact tests' records in this folder")
    ident.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    tree = sub.add_parser("tree", help="families and directed trees of the catalogued models (every pair tested)")
    tree.add_argument("--out", required=True, metavar="DIR", help="tree.yaml (aggregate --truth reads it), tree.json, "
                      "tree.png and the pair records")
    tree.add_argument("--evidence", default="auto", choices=("auto", "weights"), help="the pair test (weights: "
                      "csu_all where it fits)")
    tree.add_argument("--alpha", type=float, default=0.01, help="family-wise level over all pairs (default 0.01)")
    tree.add_argument("--no_merges", action="store_true", help="skip merge attribution")
    for sp in (add, lst, rm, ident, tree):
        sp.add_argument("--catalog", required=True, metavar="DIR", help="the catalogue folder")
    for sp in (lst, ident):
        sp.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_on_error(lambda: {"add": _add, "list": _list, "remove": _remove, "identify": _identify,
                                  "tree": _tree}[args.command](args))


def _add(args) -> int:
    models = [(m, m) for m in args.models]
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(models):
            raise TracingError(f"--names gives {len(names)} names for {len(models)} MODEL(s): one name per model")
        models = [(m, n) for (m, _), n in zip(models, names)]
    slurm = {}
    if args.config:
        listed = load_models(args.config)
        models += listed.models
        slurm = listed.slurm
    if not models:
        raise TracingError("add needs models: MODEL arguments or --config LIST.yaml")
    if args.max_wait is not None and (args.max_wait <= 0 or args.cluster is None):
        raise TracingError("--max_wait takes a positive number of seconds and goes with --cluster")
    given = {k: getattr(args, k) for k in ("sketch_dims", "anchors", "sample_rows") if getattr(args, k) is not None}
    settings = Settings(**given) if given else None
    overrides = {k: getattr(args, k) for k in SLURM_KEYS if getattr(args, k, None) is not None}
    with threads(None):
        out = add_models(args.catalog, models, settings=settings, cluster=args.cluster, slurm=slurm,
                         overrides=overrides, max_wait=args.max_wait)
    print(f"{len(out['added'])} added, {len(out['present'])} already catalogued, {len(out['failed'])} failed "
          f"({args.catalog})")
    if out["failed"]:
        return EXIT_BAD_INPUT if all(kind == "input" for *_, kind in out["failed"]) else EXIT_FAILED
    return EXIT_OK


def _list(args) -> int:
    cat = Catalog.open(args.catalog)
    print(f"{len(cat.entries)} model(s) in {cat.root} (settings {cat.settings.to_dict()})")
    for e in cat.entries:
        share = f"{100 * e['fingerprint_bytes'] / e['weight_bytes']:.2f}%" if e["weight_bytes"] else "-"
        print(f"  {e['name']:40} {e['model_type']:10} {e['layers']:3} layers  hidden {e['hidden']:5}  "
              f"fingerprint {e['fingerprint_bytes'] / 1024:8.0f} KiB ({share} of its weights)  "
              f"{e['content_hash'][:12]}")
    if args.json:
        _write_json(args.json, {"catalog": str(cat.root), "settings": cat.settings.to_dict(), "models": cat.entries})
    return EXIT_OK


def _remove(args) -> int:
    cat = Catalog.open(args.catalog)
    for name in args.names:
        cat.entry(name)  # every name known before anything changes
    cat.update(remove=args.names)
    print(f"removed {', '.join(args.names)} from {cat.root} ({len(cat.entries)} model(s) left)")
    return EXIT_OK


def _identify(args) -> int:
    device = str(resolve_device(args.device))
    with threads(args.threads):
        result = identify(args.catalog, args.suspect, confirm=args.confirm, device=device, save=args.save)
    print(table(result))
    if args.json:
        _write_json(args.json, result)
    return EXIT_OK


def _tree(args) -> int:
    cat = Catalog.open(args.catalog)
    cat.require_models()
    gone = [e["name"] for e in cat.entries if not reachable(e["location"])]
    if gone:
        raise TracingError(f"a tree tests every pair from the files, and {', '.join(gone)} is no longer at its "
                           f"location: add it again from where it is, or remove it")
    if len(cat.entries) < 2:
        raise TracingError(f"a tree needs two or more catalogued models; {cat.root} holds {len(cat.entries)}")
    with threads(None):
        build_trees({e["name"]: e["location"] for e in cat.entries}, Path(args.out), args.evidence, args.alpha,
                    merges=not args.no_merges)
    return EXIT_OK


def _write_json(path: str, data: dict) -> None:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, (json.dumps(data, indent=1) + "\n").encode())
    except OSError as e:
        raise TracingError(f"cannot write --json {path}: {e.strerror or e}") from None


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(result: dict) -> str:
    """identify's answer for the terminal: the suspect, the best candidates, the verdict, the layer sources."""
    s, sec = result["suspect"], result["seconds"]
    lines = [f"suspect {s['name']} ({s['model_type']}, {s['layers']} layers, hidden {s['hidden']}): fingerprint in "
             f"{sec['fingerprint']:.1f} s; {result['compared']} catalogued model(s) of its family compared in "
             f"{sec['total'] - sec['fingerprint']:.1f} s ({result['correction']})",
             f"  {'model':36} {'log10 p':>9}  related  {'decided by':28} derivation"]
    for c in result["candidates"][:SHOWN]:
        lines.append(f"  {c['model'][-36:]:36} {_p(c['log10_pvalue']):>9}  {'yes' if c['related'] else 'no':7}  "
                     f"{(c['decided_by'] or '-'):28} {c['derivation'] or ''}")
    if len(result["candidates"]) > SHOWN:
        rest = result["candidates"][SHOWN:]
        lines.append(f"  ... and {len(rest)} more ({sum(c['related'] for c in rest)} related; the JSON lists all)")
    lines.append(f"verdict: {result['verdict']}")
    if (merge := result.get("merge")) is not None:
        lines.append(f"attribution: {merge.get('summary') or merge.get('error')}")
    mapped = [f"{x['layer']}<-" + "+".join(f"{s['model']}:{s['layer']}" + ("" if s["share"] == 1.0 else
                                          f"({s['share']:.2f})") for s in x["sources"])
              for x in result["layers"] if x["sources"]]
    if mapped and result["related"]:
        lines.append("layers: " + " ".join(mapped))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
