"""Metrics a clinician needs, calibration and the operating point (scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE of the pneumonia probability, equal-width bins (weighted mean |accuracy - confidence|)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(labels[members].mean() - probabilities[members].mean())
    return float(error)


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Metrics at one threshold (pneumonia if probability >= threshold)."""
    labels = np.asarray(labels).astype(int)
    predictions = (np.asarray(probabilities) >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "sensitivity": float(skm.recall_score(labels, predictions, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "precision": float(skm.precision_score(labels, predictions, zero_division=0)),
        "f1": float(skm.f1_score(labels, predictions, zero_division=0)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def bootstrap_auc_ci(labels: np.ndarray, probabilities: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the ROC AUC (resampling images)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():
            continue
        aucs.append(skm.roc_auc_score(labels[index], probabilities[index]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def summary(labels: np.ndarray, probabilities: np.ndarray, threshold: float, ci_resamples: int = 2000) -> dict:
    """Everything ``training.evaluate`` reports: AUC with CI, calibration, and metrics at the stored
    threshold and at 0.5."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    result = {
        "n": int(len(labels)),
        "n_pneumonia": int(labels.sum()),
        "auc": float(skm.roc_auc_score(labels, probabilities)),
        "average_precision": float(skm.average_precision_score(labels, probabilities)),
        "ece": expected_calibration_error(labels, probabilities),
        "brier": float(skm.brier_score_loss(labels, probabilities)),
        "log_loss": float(skm.log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }
    if ci_resamples:
        result["auc_ci95"] = list(bootstrap_auc_ci(labels, probabilities, ci_resamples))
    result.update(binary_metrics(labels, probabilities, threshold))
    result["at_0.5"] = binary_metrics(labels, probabilities, 0.5)
    return result


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the negative log-likelihood of sigmoid(logit / T) (Guo et al. 2017).

    A 1-D problem: a log-spaced grid, then golden-section refinement."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)

    def nll(temperature: float) -> float:
        z = logits / temperature
        # log(1 + exp(-|z|)) form: stable for large |z|
        return float(np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    low, high = best / 1.05, best * 1.05
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float((low + high) / 2)


def high_sensitivity_threshold(labels: np.ndarray, probabilities: np.ndarray, min_sensitivity: float = 0.97) -> float:
    """The highest threshold whose sensitivity is still >= ``min_sensitivity``: a screening tool should
    miss few pneumonias, and among such thresholds the highest keeps the most specificity."""
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)
    positives = np.sort(probabilities[labels == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive examples to choose a threshold from")
    needed = int(np.ceil(min_sensitivity * len(positives)))
    return float(positives[needed - 1])
