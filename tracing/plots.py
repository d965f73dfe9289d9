"""Every figure in one place (matplotlib, Agg backend, PNG files).

Each function writes one file and returns its path. matplotlib (~0.5 s to import) is imported on the first
figure, so runs that draw nothing never pay for it.
"""

from __future__ import annotations

import numpy as np


def _subplots(figsize: tuple[float, float]):
    """(figure, axes) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=100)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- activation statistics (match_all) ----
def match_all_heatmap(log10p, path: str, layers_base=None, layers_ft=None, mapping=None,
                      stat: str = "match_all") -> str:
    """Heatmap of -log10 p for every (layer of A, layer of B) of a localized test (match_all, csu_all, ...);
    the inferred mapping is marked with dots, untested pairs stay blank."""
    m = -np.asarray(log10p, dtype=float)  # (L_A, L_B), larger = stronger evidence of derivation
    layers_base = list(range(m.shape[0])) if layers_base is None else list(layers_base)
    layers_ft = list(range(m.shape[1])) if layers_ft is None else list(layers_ft)
    fig, ax = _subplots((max(4.5, 2.0 + 0.3 * m.shape[1]), max(3.5, 1.2 + 0.3 * m.shape[0])))
    im = ax.imshow(m, cmap="viridis", aspect="auto", origin="upper")
    fig.colorbar(im, ax=ax, label=f"-log10 p ({stat})")
    for j, i in enumerate(mapping or []):
        if i is not None:
            ax.plot(j, layers_base.index(i), "r.", markersize=6)
    ax.set_xlabel("layer of B (fine-tuned / derived)")
    ax.set_ylabel("layer of A (base)")
    step_b = max(1, len(layers_ft) // 16)
    step_a = max(1, len(layers_base) // 16)
    ax.set_xticks(range(0, len(layers_ft), step_b), [str(x) for x in layers_ft[::step_b]])
    ax.set_yticks(range(0, len(layers_base), step_a), [str(x) for x in layers_base[::step_a]])
    ax.set_title(f"{stat}: localized testing")
    return _save(fig, path)


# ---- aggregation (heatmaps, loss-vs-alpha) ----
def short_names(model_ids, max_len: int = 28) -> dict[str, str]:
    """Distinct labels for model ids: the last path component, with as many parent components as it takes to
    tell two ids apart ('runs/a/base' and 'runs/b/base' -> 'a/base', 'b/base')."""
    ids = list(dict.fromkeys(model_ids))
    parts = {m: [p for p in str(m).rstrip("/").split("/") if p] or [str(m)] for m in ids}
    depth = dict.fromkeys(ids, 1)
    while True:
        label = {m: "/".join(parts[m][-depth[m]:]) for m in ids}
        clash = [m for m in ids if list(label.values()).count(label[m]) > 1 and depth[m] < len(parts[m])]
        if not clash:
            break
        for m in clash:
            depth[m] += 1
    return {m: (v if len(v) <= max_len else "…" + v[-(max_len - 1):]) for m, v in label.items()}


def threshold_scale(values, threshold: float) -> dict:
    """imshow's cmap and norm for log10 p: diverging, white at `threshold`, red below (significant), blue above."""
    import matplotlib  # loads matplotlib.colors

    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    lo = min(float(finite.min()) if finite.size else threshold, threshold - 1.0)
    hi = max(float(finite.max()) if finite.size else 0.0, threshold + 1.0, 0.0)
    return {"cmap": "RdBu", "norm": matplotlib.colors.TwoSlopeNorm(vmin=lo, vcenter=threshold, vmax=hi)}


def pair_heatmap(cells, path: str, title: str, label: str = "log10 p", threshold: float | None = None) -> str:
    """Model x model heatmap from (base, ft, value) cells; each pair is drawn in both triangles.

    With a `threshold` (log10 p heatmaps) the colour scale is diverging and centred on it: white at the
    threshold, red for significant cells (below it), blue for the rest, so no insignificant cell looks related."""
    models = sorted({m for b, f, _ in cells for m in (b, f)})
    index = {m: i for i, m in enumerate(models)}
    m = np.full((len(models), len(models)), np.nan)  # (n_models, n_models)
    for b, f, v in cells:
        m[index[b], index[f]] = v
        if np.isnan(m[index[f], index[b]]):
            m[index[f], index[b]] = v
    names = short_names(models)
    size = 2.5 + 0.45 * len(models)
    fig, ax = _subplots((size + 1.5, size))
    if threshold is None:
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="equal")
    else:
        im = ax.imshow(np.ma.masked_invalid(m), aspect="equal", **threshold_scale(m, threshold))
        label = f"{label} (related below {threshold:g})"
    fig.colorbar(im, ax=ax, label=label)
    if len(models) <= 12:
        for (r, c), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if threshold is not None else "white")
    ax.set_xticks(range(len(models)), [names[x] for x in models], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(models)), [names[x] for x in models], fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def loss_vs_alpha(curves, path: str) -> str:
    """Mode connectivity: one line per curve, (name, alphas, losses, aligned); aligned curves are dashed in the
    colour of their pair. A bump in the middle is a loss barrier."""
    fig, ax = _subplots((6, 3.6))
    colours: dict[str, str] = {}
    for name, alphas, losses, aligned in curves:
        line, = ax.plot(alphas, losses, marker="o", markersize=3, color=colours.get(name),
                        linestyle="--" if aligned else "-", label=(name + (" (aligned)" if aligned else ""))[:70])
        colours.setdefault(name, line.get_color())
    ax.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
    ax.set_ylabel("loss of (1 - alpha) base + alpha ft")
    ax.set_title("mode connectivity")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---- fine-tuning diff report ----
def report_grid(values, path: str, rows, cols, title: str, label: str, xlabel: str = "module",
                ylabel: str = "layer", integer: bool = False) -> str:
    """Heatmap of a rows x cols table (None = absent cell, drawn blank), each cell annotated with its value."""
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    fig, ax = _subplots((2.0 + 0.7 * m.shape[1], max(2.8, 1.6 + 0.4 * m.shape[0])))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="magma", aspect="auto", origin="upper")
    fig.colorbar(im, ax=ax, label=label)
    if m.size <= 400:
        for (r, c), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(c, r, f"{int(v)}" if integer else f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmax(m) * 0.6 else "black")
    step = max(1, m.shape[0] // 24)
    ax.set_xticks(range(m.shape[1]), [str(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(0, m.shape[0], step), [str(r) for r in list(rows)[::step]])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def report_token_similarity(sim, tokens, path: str, title: str) -> str:
    """Heatmap layers x tokens of cosine similarity between base and ft hidden states (row 0 = embeddings)."""
    m = np.asarray(sim, dtype=float)  # (L+1, T)
    fig, ax = _subplots((2.0 + 0.45 * m.shape[1], max(2.8, 1.6 + 0.3 * m.shape[0])))
    im = ax.imshow(m, cmap="viridis", aspect="auto", origin="upper", vmin=min(0.0, float(m.min())), vmax=1.0)
    fig.colorbar(im, ax=ax, label="cos(base, ft)")
    ax.set_xticks(range(m.shape[1]), [repr(t)[1:-1] for t in tokens], rotation=60, ha="right", fontsize=7)
    step = max(1, m.shape[0] // 24)
    ax.set_yticks(range(0, m.shape[0], step), ["emb" if i == 0 else f"L{i - 1}" for i in range(0, m.shape[0], step)])
    ax.set_ylabel("hidden state")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def report_layer_curves(curves: dict, path: str, title: str, ylabel: str) -> str:
    """One line per named curve over hidden-state index (0 = embeddings, i+1 = after layer i)."""
    fig, ax = _subplots((5.5, 3.2))
    n = 0
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=name)
        n = max(n, len(ys))
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step), ["emb" if i == 0 else f"L{i - 1}" for i in range(0, n, step)])
    ax.set_xlabel("hidden state (emb, then the output of layer Li)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def roc_curves(curves: dict, path: str) -> str:
    """ROC curves: statistic -> (scores of related pairs, scores of unrelated pairs), higher = more related."""
    fig, ax = _subplots((5.5, 5))
    for name, (pos, neg) in curves.items():
        cuts = sorted({*pos, *neg}, reverse=True)
        tpr = [0.0] + [sum(p >= c for p in pos) / len(pos) for c in cuts]
        fpr = [0.0] + [sum(n >= c for n in neg) / len(neg) for c in cuts]
        ax.plot(fpr, tpr, drawstyle="steps-post", label=name, lw=2.2 if name == "auto" else 1.0)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate (nulls)")
    ax.set_ylabel("true positive rate (derived kinds)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


# ---- merge attribution and family trees ----
def attribution_bars(layers, path: str, title: str = "merge attribution") -> str:
    """One stacked bar per block of the suspect: each source's share (negative shares, e.g. the base's in task
    arithmetic, below zero), one colour per model; a source's own block is written on its segment when it is
    not the same block (passthrough, up-scaling)."""
    models = list(dict.fromkeys(s["model"] for lay in layers for s in lay["sources"]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    fig, ax = _subplots((max(4.5, 1.5 + 0.45 * len(layers)), 3.6))
    for lay in layers:
        up = down = 0.0
        for s in lay["sources"]:
            bottom = up if s["share"] >= 0 else down
            ax.bar(lay["layer"], s["share"], bottom=bottom, color=colours[s["model"]], edgecolor="white", width=0.8)
            if s["layer"] != lay["layer"]:
                ax.text(lay["layer"], bottom + s["share"] / 2, str(s["layer"]), ha="center", va="center", fontsize=7)
            up, down = (up + s["share"], down) if s["share"] >= 0 else (up, down + s["share"])
    for m in models:
        ax.bar(0, 0, color=colours[m], label=m)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("block of the suspect")
    ax.set_ylabel("share (least squares)")
    ax.set_xticks([lay["layer"] for lay in layers])
    ax.set_title(title[:90], fontsize=8)
    if models:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _lay(node: str, depth: int, kids: dict, placed: dict, slot: list) -> None:
    """Place `node` above its children (leaves left to right from slot[0])."""
    for k in kids.get(node, []):
        _lay(k, depth + 1, kids, placed, slot)
    xs = [placed[k][0] for k in kids.get(node, [])]
    placed[node] = ((min(xs) + max(xs)) / 2 if xs else slot[0], -depth)
    slot[0] += 0 if xs else 1.0


def family_trees(families, path: str) -> str:
    """Each family's tree side by side, generations top to bottom: an arrow from parent to child (dashed, with
    the share, into a merge), the edge's evidence in small print."""
    placed: dict[str, tuple[float, float]] = {}
    slot = [0.0]
    for fam in families:
        kids: dict[str, list[str]] = {}
        for e in fam["edges"]:
            if not e.get("merge"):
                kids.setdefault(e["parent"], []).append(e["child"])
        _lay(fam["root"], 0, kids, placed, slot)
        for m in dict.fromkeys(e["child"] for e in fam["edges"] if e.get("merge")):
            ups = [placed[e["parent"]] for e in fam["edges"] if e["child"] == m and e["parent"] in placed]
            placed[m] = (slot[0], min(y for _, y in ups) - 1 if ups else 0.0)
            slot[0] += 1.0
        slot[0] += 0.6
    low = min([y for _, y in placed.values()] or [0.0])
    names = short_names(list(placed))
    fig, ax = _subplots((max(5.0, 1.4 * slot[0]), 1.6 + 1.3 * (1 - low)))
    for fam in families:
        for e in fam["edges"]:
            (x1, y1), (x2, y2) = placed[e["parent"]], placed[e["child"]]
            ax.annotate("", xy=(x2, y2 + 0.12), xytext=(x1, y1 - 0.12),
                        arrowprops={"arrowstyle": "->", "lw": 1.0, "ls": "--" if e.get("merge") else "-",
                                    "color": "C3" if e.get("merge") else "0.3"})
            ax.text(x1 + 0.65 * (x2 - x1), y1 + 0.65 * (y2 - y1), (e.get("label") or e.get("why", ""))[:24],
                    fontsize=6, color="C3" if e.get("merge") else "0.35", ha="center",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    for node, (x, y) in placed.items():
        ax.text(x, y, names[node], ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"})
    ax.set_xlim(-0.8, max(slot[0] - 0.2, 1.0))
    ax.set_ylim(low - 0.6, 0.6)
    ax.axis("off")
    ax.set_title("families: parent above child (dashed: merged into)", fontsize=8)
    return _save(fig, path)
