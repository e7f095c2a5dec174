"""Held-out metrics of an exported model: scikit-learn's ROC AUC, NaN where it is undefined; for K-class
outputs the macro one-vs-rest AUC and accuracy on the softmax probabilities."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import softmax
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


def class_aucs(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC of each class (column k of (N, K) probabilities); NaN for a class that is absent
    from the labels or that every label holds (its AUC is undefined there)."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"labels {y.shape} and class probabilities {p.shape} do not match as (N,) and (N, K)"
        )
    return [roc_auc((y == k).astype(np.int64), p[:, k]) for k in range(p.shape[1])]


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC: the unweighted mean of the defined per-class AUCs (NaN if none is).

    Classes missing from a small split are left out rather than failing, so a clinic whose label mix
    lacks a grade is still scored on the grades it has.
    """
    defined = [a for a in class_aucs(labels, probabilities) if math.isfinite(a)]
    return float(np.mean(defined)) if defined else math.nan


def macro_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Balanced accuracy of class predictions: the mean recall over the classes present in the labels."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    pred = np.asarray(predicted).astype(np.int64).reshape(-1)
    recalls = [float((pred[y == k] == k).mean()) for k in range(num_classes) if np.any(y == k)]
    return float(np.mean(recalls)) if recalls else math.nan


def output_auc(labels: np.ndarray, logits: np.ndarray) -> float:
    """The AUC of a model's prediction output (N, K): binary AUC of the one logit (K = 1), else macro AUC."""
    out = np.asarray(logits, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"expected a prediction output (N, K), got shape {out.shape}")
    if out.shape[1] == 1:
        return roc_auc(labels, out[:, 0])
    return macro_auc(labels, softmax(out, axis=1))


def output_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Top-1 accuracy of a prediction output (N, K): logit ≥ 0 for one logit, the argmax for K classes."""
    out = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) == 0:
        return math.nan
    pred = (out[:, 0] >= 0).astype(np.int64) if out.shape[1] == 1 else out.argmax(axis=1)
    return float((pred == y).mean())
