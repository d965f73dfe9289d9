"""Linear assignment on similarity matrices (float64), shared by alignment and the matching statistics."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (n, d) with every row of `b` (m, d): (n, m), float64."""
    a = a.double()
    b = b.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return a @ b.T


def match(sim: torch.Tensor | np.ndarray) -> np.ndarray:
    """Maximum-similarity assignment. For sim (n, m) with n <= m returns `cols` (n,): row i <-> column cols[i].

    For n > m the roles flip: returns `rows` (m,) such that column j <-> row rows[j].
    """
    s = sim.detach().cpu().double().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim, np.float64)
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=-1.0, posinf=1.0, neginf=-1.0)
    if s.shape[0] <= s.shape[1]:
        _, cols = linear_sum_assignment(s, maximize=True)
        return cols
    rows, _ = linear_sum_assignment(s.T, maximize=True)
    return rows
