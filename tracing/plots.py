"""Every figure in one place (matplotlib, Agg backend, PNG files). Each function writes one file and returns its path."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ---- activation statistics (match_all) ----
def match_all_heatmap(log10p, path: str, layers_base=None, layers_ft=None, mapping=None) -> str:
    """Heatmap of -log10 p for every (layer of A, layer of B); the inferred mapping is marked with dots."""
    import numpy as np

    m = -np.asarray(log10p, dtype=float)  # (L_A, L_B), larger = stronger evidence of derivation
    layers_base = list(range(m.shape[0])) if layers_base is None else list(layers_base)
    layers_ft = list(range(m.shape[1])) if layers_ft is None else list(layers_ft)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * m.shape[1], 1.0 + 0.35 * m.shape[0]), dpi=100)
    im = ax.imshow(m, cmap="viridis", aspect="auto", origin="upper")
    fig.colorbar(im, ax=ax, label="-log10 p (match)")
    for j, i in enumerate(mapping or []):
        if i is not None:
            ax.plot(j, layers_base.index(i), "r.", markersize=6)
    ax.set_xlabel("layer of B (fine-tuned / derived)")
    ax.set_ylabel("layer of A (base)")
    step_b = max(1, len(layers_ft) // 16)
    step_a = max(1, len(layers_base) // 16)
    ax.set_xticks(range(0, len(layers_ft), step_b), [str(x) for x in layers_ft[::step_b]])
    ax.set_yticks(range(0, len(layers_base), step_a), [str(x) for x in layers_base[::step_a]])
    ax.set_title("match_all: localized testing")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- aggregation (heatmaps, loss-vs-alpha) ----

# ---- fine-tuning diff report ----
