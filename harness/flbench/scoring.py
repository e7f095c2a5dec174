"""Scores of a trained model on a clinic: threshold chosen on validation, metrics read on test once.

A binary model gives one logit per image (N,); a K-class model gives K logits (N, K), scored by macro
one-vs-rest AUC on the softmax probabilities, balanced accuracy (macro recall) at the argmax, and the
sensitivity/specificity of "any finding" (a class above 0 predicted for a class above 0 label, and class 0
for class 0): a multi-class prediction has no threshold to choose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.special import softmax
from sklearn.metrics import roc_curve

from export.metrics import class_aucs, macro_auc, macro_recall
from hub.training.supervised import binary_auc

#: A trained model as the bench scores it: images in [0, 1], (N, 1, H, W) → logits, (N,) or (N, K).
Predictor = Callable[[torch.Tensor], np.ndarray]

#: Metric keys every scored clinic reports.
METRICS: tuple[str, ...] = ("auc", "bacc", "sens", "spec")


def validation_threshold(labels: np.ndarray, logits: np.ndarray) -> float:
    """The logit threshold maximising Youden's J (sensitivity + specificity − 1) on validation data.

    With no validation data, or only one class in it, there is nothing to choose from: logit 0
    (probability 0.5).
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if np.ndim(logits) == 2:
        return math.nan  # K classes: the argmax decides
    if len(y) == 0 or len(np.unique(y)) < 2 or not np.all(np.isfinite(logits)):
        return 0.0
    fpr, tpr, thresholds = roc_curve(y, logits)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (nothing positive); a finite choice always exists after it.
    return float(thresholds[best]) if math.isfinite(thresholds[best]) else float(np.max(logits))


def threshold_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and balanced accuracy, sensitivity and specificity at ``threshold`` (positive: logit ≥ it).

    For (N, K) logits: macro AUC, per-class AUC (``auc_c<k>``), macro recall, "any finding" sensitivity and
    specificity at the argmax; ``threshold`` is not used.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if not np.all(np.isfinite(logits)):
        return dict.fromkeys(METRICS, math.nan)
    if np.ndim(logits) == 2:
        return multiclass_metrics(y, logits)
    pred = logits >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return {"auc": binary_auc(y, logits), "bacc": (sens + spec) / 2, "sens": sens, "spec": spec}


def multiclass_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Scores of (N, K) class logits: macro/per-class one-vs-rest AUC, macro recall, any-finding sens/spec."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    k = int(np.shape(logits)[1])
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=1) if len(y) else np.zeros((0, k))
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    finding, called = y > 0, pred > 0
    out = {
        "auc": macro_auc(y, probs),
        "bacc": macro_recall(y, pred, k),
        "sens": float(called[finding].mean()) if finding.any() else math.nan,
        "spec": float((~called[~finding]).mean()) if (~finding).any() else math.nan,
    }
    out.update({f"auc_c{c}": a for c, a in enumerate(class_aucs(y, probs))})
    return out


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (a clinic without a validation split gives NaN); NaN if none."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    return float(arr.mean()) if len(arr) else math.nan


def selection_key(small_val_auc: float, all_val_auc: float) -> tuple[float, float]:
    """How anything chosen on validation is ranked: the small clinics' validation AUC, a tie going to the
    validation AUC over all clinics. Compared to 1e-9, so that a float's last digit decides no tie (the
    small clinics' 6–10 validation images often give AUC 1.0 to every candidate); NaN ranks last."""

    def rounded(v: float) -> float:
        return round(v, 9) if math.isfinite(v) else -math.inf

    return rounded(small_val_auc), rounded(all_val_auc)
