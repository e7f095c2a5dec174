"""Held-out metrics of an exported model: scikit-learn's ROC AUC, NaN where it is undefined."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC (scikit-learn's); NaN when the labels hold one class only (AUC is undefined then)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, s))
