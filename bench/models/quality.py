"""Model-quality metrics for CTR predictions: AUC and log-loss (numpy/scipy, no torch)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, from the Mann-Whitney rank statistic (ties averaged)."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels: np.ndarray, probabilities: np.ndarray, epsilon: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities against 0/1 labels."""
    labels = np.asarray(labels, dtype=np.float64)
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), epsilon, 1 - epsilon)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of samples whose thresholded prediction equals the 0/1 label."""
    labels = np.asarray(labels, dtype=bool)
    return float(np.mean((np.asarray(probabilities, dtype=np.float64) > threshold) == labels))
