"""Cosine similarities of bf16 rows on a CPU at the precision the matching needs, never less.

    with bf16_products(): c = a.float() @ b.float().T     # bf16 values: exact inputs, float32 accumulation
    sim = LazyCosine(rows_a, rows_b)                      # bf16 weights (a checkpoint read as stored)
    pairs = sim.certified_best()                          # rows' best columns, certified, or None
    s = sim.exact()                                       # == tracing.matching.cosine_matrix(rows_a, rows_b)

Related layers (a derivative against its base) have a clear best partner for every unit: cosine ~1 against
~0.05. Finding it needs no float32 product: a product with bf16 *results* (AMX writes half the bytes: half the
time) is within a relative 2^-8 of each value, plus the float32 summation error both products share, and where
every unit's best beats its second best by more than twice that bound, the float32 matrix has the same strict,
distinct best partners: the pairs `solvers.distinct_best` would find in `exact()`, so the matching, and every
p-value from it, is the same. Where the bound cannot certify them (unrelated layers, ties), `exact()` computes the
float32 matrix. A sample of rows is tried first, so an unrelated layer costs ~1% more, not 50%.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

_PRECISION_LOCK = threading.Lock()
BF16_ROUNDING = 2.0 ** -8  # unit roundoff of a bf16 result: |fl(x) - x| <= 2^-8 |x|
FP32_UNIT = 2.0 ** -24  # of a float32 operation: the summations' error is below d * 2^-24 * |a| |b|
SAMPLE_ROWS = 256  # rows tried first: if any is not certified, the layer goes straight to exact()
ROW_BLOCK = 2048  # rows per step of the certification (float32 copies of 2048 x m)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AMX-BF16 or AVX512-BF16, from /proc/cpuinfo); elsewhere
    False (bf16 is then emulated: slower than float32, and LazyCosine is not used)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@contextlib.contextmanager
def bf16_products() -> Iterator[None]:
    """float32 matrix products on the CPU inside this block round their inputs to bf16 and accumulate in float32
    (oneDNN on AMX / AVX512-BF16). Exact for inputs that hold bf16 values (a bf16 checkpoint's weights, a bf16
    model's activations): only use it for those. The setting is process-wide, so blocks run one at a time;
    a torch without it computes plain float32 products (the same numbers, slower)."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision"):
        yield
        return
    with _PRECISION_LOCK:
        before = mm.fp32_precision
        mm.fp32_precision = "bf16"
        try:
            yield
        finally:
            mm.fp32_precision = before


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / |row| of x (rows, d) as float32 (float64 sums; squares of bf16 values are exact in float32)."""
    return x.float().square().sum(dim=1, dtype=torch.float64).sqrt().clamp_min(1e-30).reciprocal().float()


def exact_bf16_cosines(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor | None = None,
                       inv_b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines (n, m) float32 of bf16 rows a (n, d), b (m, d): the product of the stored values on the bf16 units
    with float32 accumulation and results, scaled by the inverse norms (inv_norms of a and b, when known)."""
    af, bf = a.float(), b.float()  # exact: every bf16 value is a float32 value
    with bf16_products():
        sim = af @ bf.T  # (n, m)
    inv_a = inv_norms(a) if inv_a is None else inv_a
    inv_b = inv_norms(b) if inv_b is None else inv_b
    return sim.mul_(inv_a[:, None]).mul_(inv_b[None, :])


class LazyCosine:
    """cosine_matrix(a, b) of bf16 rows a (n, d), b (m, d) on a CPU, computed only as precisely as needed."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self.shape = (a.shape[0], b.shape[0])
        self.device = a.device
        self._exact: torch.Tensor | None = None

    @functools.cached_property
    def inv_a(self) -> torch.Tensor:
        return inv_norms(self.a)  # (n,)

    @functools.cached_property
    def inv_b(self) -> torch.Tensor:
        return inv_norms(self.b)  # (m,)

    def exact(self) -> torch.Tensor:
        """The float32 cosine matrix (n, m), computed once."""
        if self._exact is None:
            self._exact = exact_bf16_cosines(self.a, self.b, self.inv_a, self.inv_b)
        return self._exact

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cosines (k,) float32 at index = (rows, cols), (k,) each, as exact()[rows, cols] gives them."""
        if self._exact is not None:
            return self._exact[index]
        rows, cols = index
        a, b = self.a.index_select(0, rows).float(), self.b.index_select(0, cols).float()  # (k, d) each
        return (a * b).sum(dim=1).mul_(self.inv_a[rows]).mul_(self.inv_b[cols])

    def _bounded(self) -> bool:
        """Every row finite and no product can overflow (|a_i . b_j| <= |a_i| |b_j| < 1e38): then every cosine,
        coarse or exact, is finite, as pair_units needs to use every unit."""
        inv_a, inv_b = self.inv_a, self.inv_b
        if not all(bool(torch.isfinite(v).all()) and bool((v > 0).all()) for v in (inv_a, inv_b)):
            return False
        return float(inv_a.min().double().reciprocal() * inv_b.min().double().reciprocal()) < 1e38

    def certified_best(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, cols) pairing every unit of the narrower side with its best partner, when the bf16 product
        certifies that each best is strict and all are distinct in exact() too (module docstring); else None."""
        if self._exact is not None:
            return None
        if not self._bounded():
            return None
        a_narrow = self.shape[0] <= self.shape[1]
        narrow, wide = (self.a, self.b) if a_narrow else (self.b, self.a)
        inv_w = self.inv_b if a_narrow else self.inv_a
        best = []
        for s in [0, *range(min(SAMPLE_ROWS, narrow.shape[0]), narrow.shape[0], ROW_BLOCK)]:
            e = min(SAMPLE_ROWS, narrow.shape[0]) if s == 0 else min(s + ROW_BLOCK, narrow.shape[0])
            inv_n = inv_norms(narrow[s:e]) if s == 0 else (self.inv_a if a_narrow else self.inv_b)[s:e]
            got = _certified_block(narrow[s:e], inv_n, wide, inv_w)
            if got is None:
                return None
            best.append(got)
        cols = torch.cat(best)
        if torch.unique(cols).numel() != cols.numel():
            return None
        own = torch.arange(cols.numel())
        return (own, cols) if self.shape[0] <= self.shape[1] else (cols, own)


def _certified_block(rows: torch.Tensor, inv_rows: torch.Tensor, wide: torch.Tensor,
                     inv_w: torch.Tensor) -> torch.Tensor | None:
    """Best column (r,) of each row of `rows` (r, d) among `wide` (m, d) by cosine, if certified; else None.
    inv_rows (r,), inv_w (m,): their inverse norms (finite and no product overflowing: LazyCosine._bounded)."""
    with torch.autocast("cpu", enabled=False):
        raw = rows @ wide.T  # (r, m) bf16 results, float32 accumulation inside
    cos = raw.float().mul_(inv_rows[:, None]).mul_(inv_w[None, :])
    top, idx = cos.topk(2, dim=1)  # (r, 2)
    # |coarse - float32| <= rounding of the result + both products' summation error (cosine scale: |a||b| = 1),
    # with 1% to spare for the float32 scalings
    err = 1.01 * (BF16_ROUNDING / (1 - BF16_ROUNDING) * top.abs() + 2 * rows.shape[1] * FP32_UNIT)
    if not bool((top[:, 0] - err[:, 0] > top[:, 1] + err[:, 1]).all()):
        return None
    return idx[:, 0]
