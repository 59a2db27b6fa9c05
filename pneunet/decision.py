"""The one decision rule: calibrated probability = sigmoid(logit / temperature); pneumonia when it is at
least the threshold. Everything that turns a logit into a verdict (app, CLI, edge, evaluation, export
checks) calls these two functions.

    probability = calibrated_probability(logits, config.temperature)
    label = decide(probability, config.threshold, config.labels)
"""

from __future__ import annotations

import numpy as np


def sigmoid(values) -> np.ndarray:
    """Logistic function in float64; exp of non-positive numbers only, so no overflow at either end."""
    values = np.asarray(values, dtype=np.float64)
    small = np.exp(-np.abs(values))
    return np.where(values >= 0, 1.0 / (1.0 + small), small / (1.0 + small))


def calibrated_probability(logits, temperature: float) -> np.ndarray:
    """sigmoid(logit / temperature): the probability every front shows."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / float(temperature))


def is_pneumonia(probabilities, threshold: float) -> np.ndarray:
    """Bool array: the calibrated probability reaches the operating threshold."""
    return np.asarray(probabilities, dtype=np.float64) >= float(threshold)


def decide(probability: float, threshold: float, labels: tuple[str, str]) -> str:
    """The label (labels = (normal, pneumonia)) for one calibrated probability at the operating threshold
    (the model's, or a site profile's)."""
    return labels[1] if bool(is_pneumonia(probability, threshold)) else labels[0]


def format_probability(probability: float) -> str:
    """A probability for people, the same on the page, in the batch table, the CSV and the CLI: one
    decimal of a percent, and never a flat 0 % or 100 %, which a calibrated model does not claim
    ("> 99.9 %", "< 0.1 %"). JSON keeps the float."""
    if probability >= 0.999:
        return "> 99.9 %"
    if probability <= 0.001:
        return "< 0.1 %"
    return f"{100 * probability:.1f} %"
