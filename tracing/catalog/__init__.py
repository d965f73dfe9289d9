"""A catalogue of fingerprints: which known base, if any, is a model built on? (docs/catalog.md)

    python -m tracing.catalog add --catalog DIR MODEL...          # one streaming read per model
    python -m tracing.catalog identify --catalog DIR SUSPECT --json FILE

sketch.py (the fixed random basis, anchor tokens, norm gains) -> fingerprint.py (one read of a checkpoint ->
a compact fingerprint, one safetensors file) -> compare.py (the screen and the exact tests on two fingerprints)
-> store.py (the folder: index.json written last, atomic files, a lock) -> add.py (fingerprint models, in this
process or one submitit job each) -> verdict.py (per candidate: planned tests, Bonferroni, Holm over candidates,
derivation line, the layers' sources) -> identify.py (the query; the exact test from the files when the
fingerprints are not decisive) -> cli.py.
"""

from tracing.catalog.add import add_models
from tracing.catalog.fingerprint import Fingerprint, build
from tracing.catalog.identify import identify
from tracing.catalog.sketch import Settings
from tracing.catalog.store import Catalog
from tracing.catalog.verdict import layer_sources

__all__ = ["Catalog", "Fingerprint", "Settings", "add_models", "build", "identify", "layer_sources"]
