"""Scores of a trained model on a clinic: threshold chosen on validation, metrics read on test once."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_curve

from hub.training.supervised import binary_auc

#: Metric keys every scored clinic reports.
METRICS: tuple[str, ...] = ("auc", "bacc", "sens", "spec")


def validation_threshold(labels: np.ndarray, logits: np.ndarray) -> float:
    """The logit threshold maximising Youden's J (sensitivity + specificity − 1) on validation data.

    With no validation data, or only one class in it, there is nothing to choose from: logit 0
    (probability 0.5).
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) == 0 or len(np.unique(y)) < 2 or not np.all(np.isfinite(logits)):
        return 0.0
    fpr, tpr, thresholds = roc_curve(y, logits)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (nothing positive); a finite choice always exists after it.
    return float(thresholds[best]) if math.isfinite(thresholds[best]) else float(np.max(logits))


def threshold_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and balanced accuracy, sensitivity and specificity at ``threshold`` (positive: logit ≥ it)."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if not np.all(np.isfinite(logits)):
        return dict.fromkeys(METRICS, math.nan)
    pred = logits >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return {"auc": binary_auc(y, logits), "bacc": (sens + spec) / 2, "sens": sens, "spec": spec}
