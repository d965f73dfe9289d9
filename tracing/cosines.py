"""Cosine similarities of bf16 rows on a CPU at the precision the matching needs, never less.

    with bf16_products(): c = a.float() @ b.float().T     # bf16 values: exact inputs, float32 accumulation
    sim = LazyCosine(rows_a, rows_b)                      # bf16 weights (a checkpoint read as stored)
    pairs = sim.certified_best()                          # rows' best columns, certified, or None
    c = sim.coarse()                                      # (n, m) from the product with bf16 results
    s = sim.exact()                                       # == tracing.matching.cosine_matrix(rows_a, rows_b)

Related layers (a derivative against its base) have a clear best partner for every unit: cosine ~1 against
~0.05. Finding it needs no float32 product: a product with bf16 *results* (AMX writes half the bytes: half the
time) is within a relative 2^-8 of each value, plus the float32 summation error both products share, and where
every unit's best beats its second best by more than twice that bound, the float32 matrix has the same strict,
distinct best partners: the pairs `solvers.distinct_best` would find in `exact()`, so the matching, and every
p-value from it, is the same. Rows are certified a block at a time, and the first block that fails ends it: an
unrelated layer does not pay for the whole certificate, and a related one makes no (n, m) matrix. Where the bound
cannot certify them (unrelated layers, ties), "fast" matches greedily on `coarse()` itself: an elementwise function
of the float32 matrix, so the matching stays equivariant and its p-value exact under H0 (tracing.matching), at a
quarter of the float32 product's cost (a 7B layer: 1.5 s against 3.8 s on a core, and no process-wide lock); "exact"
and the optimal assignment use `exact()`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch

_PRECISION_LOCK = threading.Lock()
BF16_ROUNDING = 2.0 ** -8  # unit roundoff of a bf16 result: |fl(x) - x| <= 2^-8 |x|
FP32_UNIT = 2.0 ** -24  # of a float32 operation: the summations' error is below d * 2^-24 * |a| |b|
FIRST_ROWS = 128  # units certified first: an unrelated layer's certificate fails within them
ROW_BLOCK = 1024  # rows per step of coarse() (bf16 results of 1024 x m)


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
    """1 / |row| of x (rows, d) as float32 (norms in float64). One operation: many small ones in a worker thread
    would each wait for the GIL while another thread runs Python."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).clamp_min(1e-30).reciprocal().float()


def row_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """a[rows[t]] . b[cols[t]] (k,) float32 for index vectors rows, cols (k,) into a (n, d), b (m, d)."""
    return torch.cat([(a.index_select(0, r).float() * b.index_select(0, c).float()).sum(dim=1)
                      for r, c in zip(rows.split(ROW_BLOCK), cols.split(ROW_BLOCK))])


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
    """cosine_matrix(a, b) of bf16 rows a (n, d), b (m, d) on a CPU, computed only as precisely as needed.

    `exact`, when given, makes the matrix exact() stands for: the same cosines, computed otherwise (in float64
    from float32 sums of the same products: tracing.grams). certified_best() still decides for it (its bound
    covers both products' summation errors); where it does not, tracing.matching matches on exact() itself."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor | None = None,
                 inv_b: torch.Tensor | None = None, exact: Callable[[], torch.Tensor] | None = None):
        self.a, self.b = a, b
        self.shape = (a.shape[0], b.shape[0])
        self.device = a.device
        self._inv = [inv_a, inv_b]
        self.given_exact = exact
        self._exact: torch.Tensor | None = None
        self._coarse: torch.Tensor | None = None

    @property
    def inv_a(self) -> torch.Tensor:
        if self._inv[0] is None:
            self._inv[0] = inv_norms(self.a)  # (n,)
        return self._inv[0]

    @property
    def inv_b(self) -> torch.Tensor:
        if self._inv[1] is None:
            self._inv[1] = inv_norms(self.b)  # (m,)
        return self._inv[1]

    def permuted(self, pa: torch.Tensor, pb: torch.Tensor) -> LazyCosine:
        """The cosines of a[pa] and b[pb]: this matrix with its rows and columns in another order (nothing
        computed yet; the inverse norms, when known, reordered)."""
        if self.given_exact is not None:
            raise ValueError("a LazyCosine with a given exact() matrix cannot be reordered")
        inv = [None if v is None else v[p] for v, p in zip(self._inv, (pa, pb))]
        return LazyCosine(self.a.index_select(0, pa), self.b.index_select(0, pb), *inv)

    def exact(self) -> torch.Tensor:
        """The cosine matrix (n, m): float32 (or what `exact` gives), computed once."""
        if self._exact is None:
            make = self.given_exact or (lambda: exact_bf16_cosines(self.a, self.b, self.inv_a, self.inv_b))
            self._exact = make()
        return self._exact

    def coarse(self) -> torch.Tensor:
        """The cosine matrix (n, m) float32 from the product with bf16 results: within the bound of the module
        docstring of exact(), and an elementwise function of it (the same for any order of the rows), computed
        once. "fast" matches unrelated layers greedily on it (tracing.matching: still exact under H0)."""
        if self._coarse is None:
            out = torch.empty(self.shape, dtype=torch.float32)
            for s in range(0, self.shape[0], ROW_BLOCK):
                e = min(s + ROW_BLOCK, self.shape[0])
                _coarse_block(self.a[s:e], self.b, self.inv_a[s:e], self.inv_b, out=out[s:e])
            self._coarse = out
        return self._coarse

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cosines (k,) float32 at index = (rows, cols), (k,) each, as exact()[rows, cols] gives them."""
        if self._exact is not None or self.given_exact is not None:
            return self.exact()[index]
        rows, cols = index
        return row_dots(self.a, self.b, rows, cols).mul_(self.inv_a[rows]).mul_(self.inv_b[cols])

    def bounded(self) -> bool:
        """Every row finite and no product can overflow (|a_i . b_j| <= |a_i| |b_j| < 1e38): then every cosine,
        coarse or exact, is finite, as pair_units needs to use every unit."""
        inv_a, inv_b = self.inv_a, self.inv_b
        if not all(bool(torch.isfinite(v).all()) and bool((v > 0).all()) for v in (inv_a, inv_b)):
            return False
        return float(inv_a.min().double().reciprocal() * inv_b.min().double().reciprocal()) < 1e38

    def certified_best(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, cols) pairing every unit of the narrower side with its best partner, when the bf16 product
        certifies that each best is strict and all are distinct in exact() too (module docstring); else None.
        The narrower side's units are certified a block at a time against the whole other side (FIRST_ROWS, then
        ROW_BLOCK at a time), and the first block that fails ends the attempt (an unrelated layer pays for
        FIRST_ROWS units); no (n, m) matrix is made."""
        if self._exact is not None or not self.bounded():
            return None
        a_narrow = self.shape[0] <= self.shape[1]
        (narrow, inv_n), (wide, inv_w) = ((self.a, self.inv_a), (self.b, self.inv_b))[::1 if a_narrow else -1]
        best = []
        starts = [0, *range(FIRST_ROWS, narrow.shape[0], ROW_BLOCK)]  # a small first block, then ROW_BLOCK rows
        for s, e in zip(starts, [*starts[1:], narrow.shape[0]]):
            block = _coarse_block(narrow[s:e], wide, inv_n[s:e], inv_w)  # (rows, wide)
            found = _certified(block.topk(2, dim=1), narrow.shape[1])
            if found is None:
                return None
            best.append(found)
        best = torch.cat(best)  # (narrow units,): each one's partner on the wide side
        if torch.unique(best).numel() != best.numel():
            return None
        own = torch.arange(best.numel())
        return (own, best) if a_narrow else (best, own)


def _coarse_block(rows: torch.Tensor, wide: torch.Tensor, inv_rows: torch.Tensor, inv_w: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Coarse cosines (r, m) float32 of `rows` (r, d) with `wide` (m, d), from their inverse norms (r,), (m,): the
    product with bf16 results, scaled (into `out` when given)."""
    with torch.autocast("cpu", enabled=False):
        raw = rows @ wide.T  # (r, m) bf16 results, float32 accumulation inside
    out = torch.empty(raw.shape, dtype=torch.float32) if out is None else out
    return out.copy_(raw).mul_(inv_w[None, :]).mul_(inv_rows[:, None])


def _certified(top2: tuple[torch.Tensor, torch.Tensor], d: int) -> torch.Tensor | None:
    """The best partner (r,) of each unit from its two best coarse cosines and their indices (r, 2) each, when
    each best is certified strict in the float32 matrix too (rows of length d); else None."""
    top, idx = top2
    # |coarse - float32| <= rounding of the result + both products' summation error (cosine scale: |a||b| = 1),
    # with 1% to spare for the float32 scalings
    err = 1.01 * (BF16_ROUNDING / (1 - BF16_ROUNDING) * top.abs() + 2 * d * FP32_UNIT)
    if not bool((top[:, 0] - err[:, 0] > top[:, 1] + err[:, 1]).all()):
        return None
    return idx[:, 0]
