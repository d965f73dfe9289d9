"""How often one run locates each checkpoint name and reads its config, adapter config and tokenizer (CPU, offline).

    python benchmarks/checkpoint_reads.py
    python benchmarks/checkpoint_reads.py --markdown docs/generated/checkpoint_reads.md

Builds a tiny Llama (base, a fine-tuned copy), a LoRA adapter over the base and a GGUF file of the base, then
runs one pair per row through `tracing.pipeline.run_pair`, each in a fresh process, counting:
- `locate`: calls of the function that classifies a model name (`tracing.checkpoints.locate`, wherever it is
  imported);
- `config.json`, `adapter_config.json`, `tokenizer_config.json`: files of that name opened (by transformers,
  peft or this package);
- `AutoConfig` and `AutoTokenizer`: calls of their `from_pretrained` (`AutoConfig` not counting the calls
  AutoTokenizer makes itself).
The hub id is `org/tiny-llama`, served offline from a Hugging Face cache holding the derived model's snapshot
(HF_HUB_OFFLINE=1, HF_HUB_CACHE in the build folder). Counts are for the whole run (both models), with a fresh
digest cache (MODEL_TRACING_CACHE in the build folder): content hashes are computed. About 30 s in all.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ROOT, publish, start

sys.path.insert(0, os.path.join(ROOT, "tests"))

ROWS = {  # name -> (base, ft, extra RunConfig fields)
    "dir vs dir, csu (streamed)": ("base", "derived", dict(stat="csu")),
    "dir vs dir, csu --eval (loaded)": ("base", "derived", dict(stat="csu", eval=True, dataset="random",
                                                                block_size=8, max_blocks=2)),
    "dir vs adapter, csu (streamed)": ("base", "adapter", dict(stat="csu")),
    "dir vs adapter, csu --eval (loaded)": ("base", "adapter", dict(stat="csu", eval=True, dataset="random",
                                                                    block_size=8, max_blocks=2)),
    "dir vs gguf, l2 (streamed)": ("base", "gguf", dict(stat="l2")),
    "dir vs hub id, csu (streamed)": ("base", "hub", dict(stat="csu")),
    "dir vs hub id, csu --eval (loaded)": ("base", "hub", dict(stat="csu", eval=True, dataset="random",
                                                               block_size=8, max_blocks=2)),
}
FILES = ("config.json", "adapter_config.json", "tokenizer_config.json")
COLUMNS = ("locate", *FILES, "AutoConfig", "AutoTokenizer")


def build(root: Path) -> dict[str, str]:
    import copy

    import peft
    import torch
    from gguf_files import write_gguf

    from tracing import zoo

    tok = zoo.build_tokenizer(zoo.synthetic_text(300, seed=0), vocab_size=128)
    base = zoo.tiny_model("llama", seed=0, vocab_size=len(tok))
    derived = copy.deepcopy(base)
    with torch.no_grad():
        for p in derived.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    for name, model in (("base", base), ("derived", derived)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["up_proj"]))
    lora.save_pretrained(root / "adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    write_gguf(base, tok, root / "base.gguf")
    snapshot = root / "hub" / "models--org--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.parent.parent.joinpath("refs").mkdir(parents=True)
    snapshot.parent.parent.joinpath("refs", "main").write_text("0" * 40)
    shutil.copytree(root / "derived", snapshot)
    return {"base": str(root / "base"), "derived": str(root / "derived"), "adapter": str(root / "adapter"),
            "gguf": str(root / "base.gguf"), "hub": "org/tiny-llama"}


def count(base: str, ft: str, options: dict, save: str) -> dict:
    """Child process: one run_pair with every counted function wrapped."""
    import transformers

    import tracing.pipeline
    from tracing.config import RunConfig

    counts: collections.Counter = collections.Counter()
    real_open = builtins.open

    def counting_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) in FILES:
            counts[os.path.basename(os.fspath(file))] += 1
        return real_open(file, *a, **kw)

    builtins.open = io.open = counting_open
    inside = []  # AutoTokenizer calls in progress: the AutoConfig calls they make are theirs
    for cls, col in ((transformers.AutoConfig, "AutoConfig"), (transformers.AutoTokenizer, "AutoTokenizer")):
        real = cls.from_pretrained

        def wrapped(*a, _real=real, _col=col, **kw):
            counts[_col] += not (inside and _col == "AutoConfig")
            inside.append(_col) if _col == "AutoTokenizer" else None
            try:
                return _real(*a, **kw)
            finally:
                inside.pop() if _col == "AutoTokenizer" else None
        cls.from_pretrained = staticmethod(wrapped)
    import tracing.checkpoints as where
    real_locate = getattr(where, "locate", None)
    if real_locate is None:  # after the refactor: the function lives in tracing.access
        import tracing.access as where
        real_locate = where.locate

    def locate(*a, **kw):
        counts["locate"] += 1
        return real_locate(*a, **kw)
    for name, module in list(sys.modules.items()):
        if name.startswith("tracing") and getattr(module, "locate", None) is real_locate:
            module.locate = locate
    record = tracing.pipeline.run_pair(RunConfig(base_model_id=base, ft_model_id=ft, save=save, no_progress=True,
                                                 **options))
    return {"status": record["status"], "error": record.get("error"), **{c: counts[c] for c in COLUMNS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # BASE FT OPTIONS_JSON SAVE
    if "--child" in sys.argv:
        args = ap.parse_args()
        print(json.dumps(count(args.child[0], args.child[1], json.loads(args.child[2]), args.child[3])))
        return
    args, head, t0 = start(ap)
    lines = ["| run | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        for row, (base, ft, options) in ROWS.items():
            cmd = [sys.executable, __file__, "--child", paths[base], paths[ft], json.dumps(options),
                   str(Path(tmp) / "out")]
            env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(Path(tmp) / "hub"),
                                "MODEL_TRACING_CACHE": tempfile.mkdtemp(dir=tmp)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if r["status"] != "ok":
                raise SystemExit(f"{row}: {r['error']}")
            lines.append(f"| {row} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
    publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
