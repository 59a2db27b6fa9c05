"""Metrics agree with scikit-learn; calibration and threshold rules do what they say."""

import numpy as np
import pytest
from sklearn import metrics as skm

from pneunet import metrics
from pneunet.decision import sigmoid
from training.losses import FocalLoss


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    logits = rng.normal(0, 1, 500) + 2.0 * (labels - 0.5) * 2
    return labels, sigmoid(logits), logits


def test_summary_matches_scikit_learn(scores):
    labels, probabilities, _ = scores
    result = metrics.summary(labels, probabilities, threshold=0.3, ci_resamples=200)
    predictions = probabilities >= 0.3
    assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities))
    assert result["sensitivity"] == pytest.approx(skm.recall_score(labels, predictions))
    assert result["specificity"] == pytest.approx(skm.recall_score(1 - labels, ~predictions))
    assert result["precision"] == pytest.approx(skm.precision_score(labels, predictions))
    assert result["f1"] == pytest.approx(skm.f1_score(labels, predictions))
    assert result["brier"] == pytest.approx(skm.brier_score_loss(labels, probabilities))
    tn, fp, fn, tp = skm.confusion_matrix(labels, predictions).ravel()
    assert result["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    low, high = result["auc_ci95"]
    assert low < result["auc"] < high
    assert result["at_0.5"]["threshold"] == 0.5


def test_ece_is_small_for_calibrated_and_large_for_overconfident_scores():
    rng = np.random.default_rng(1)
    probabilities = rng.uniform(0, 1, 20000)
    labels = (rng.uniform(0, 1, 20000) < probabilities).astype(int)
    assert metrics.expected_calibration_error(labels, probabilities) < 0.02
    overconfident = np.where(probabilities > 0.5, 0.99, 0.01)
    assert metrics.expected_calibration_error(labels, overconfident) > 0.2


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0, 2, 20000)
    labels = (rng.uniform(0, 1, 20000) < sigmoid(true_logits)).astype(int)
    assert metrics.fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.05)


def test_high_sensitivity_threshold_keeps_the_promised_sensitivity(scores):
    labels, probabilities, _ = scores
    threshold = metrics.high_sensitivity_threshold(labels, probabilities, 0.97)
    sensitivity = (probabilities[labels == 1] >= threshold).mean()
    assert sensitivity >= 0.97
    # highest such threshold: nudging it up loses the guarantee
    assert (probabilities[labels == 1] >= threshold + 1e-9).mean() < 0.97


def test_focal_loss_reduces_to_weighted_bce_at_gamma_zero():
    import torch

    logits, targets = torch.randn(64), torch.randint(0, 2, (64,)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert FocalLoss(alpha=0.5, gamma=0.0)(logits, targets).item() == pytest.approx(0.5 * bce.item(), rel=1e-5)
    assert FocalLoss(alpha=0.5, gamma=2.0)(logits, targets).item() < 0.5 * bce.item()
