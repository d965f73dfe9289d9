"""model-tracing: was model B derived from model A? Statistics and p-values from weights and activations."""

import os

__version__ = "0.6.0"

# Large CPU tensors on transparent huge pages (torch reads this once, at its first allocation, so before torch is
# imported): a fresh (11008, 11008) product or a float32 copy of a 7B layer then costs 1/512 of the page faults,
# which matter most once the page cache is full of checkpoint files (benchmarks/laptop.py: a 7B csu layer 2-4x
# faster). Set THP_MEM_ALLOC_ENABLE=0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
