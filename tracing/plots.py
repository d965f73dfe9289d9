"""Every figure in one place (matplotlib, Agg backend, PNG files). Each function writes one file and returns its path."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ---- activation statistics (match_all) ----

# ---- aggregation (heatmaps, loss-vs-alpha) ----

# ---- fine-tuning diff report ----
