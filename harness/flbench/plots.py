"""Benchmark figures: per-clinic AUC by method (auc.png)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on the hub or in CI
import matplotlib.pyplot as plt
import numpy as np


def plot_auc(results: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: every clinic and the unseen clinic on x, one bar per method, sd over seeds."""
    methods = results["methods"]
    clinics: list[str] = next(iter(methods.values()))["clinic_names"] if methods else []
    groups = [*clinics, "unseen"]
    names = list(methods)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(9.0, 1.3 * len(groups) + 0.25 * len(names) + 1.5), 4.5))
    x = np.arange(len(groups))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(names):
        s = methods[m]
        stats = [s["clinics"][c]["auc"] for c in clinics] + [s["unseen"]["auc"]]
        means = [st["mean"] for st in stats]
        sds = [st["sd"] for st in stats]
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            means,
            width,
            yerr=sds,
            label=m,
            color=cmap(i % 20),
            capsize=1.5,
        )
    meta = results["meta"]
    ax.set_xticks(x, groups)
    ax.set_ylabel("AUC")
    low = min(
        min(s["clinics"][c]["auc"]["mean"] for c in clinics for s in methods.values()),
        min(s["unseen"]["auc"]["mean"] for s in methods.values()),
    )
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_title(f"bench fl: {meta['task']} ({meta['skew']} skew), seeds {meta['seeds']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars stay visible
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
