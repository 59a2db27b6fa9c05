"""The one decision rule and the one probability format."""

import numpy as np

from pneunet.config import ModelConfig
from pneunet.decision import calibrated_probability, decide, format_probability, is_pneumonia, sigmoid


def test_calibrated_probability_is_the_tempered_sigmoid_and_stable_at_the_ends():
    logits = np.array([-2000.0, -3.0, 0.0, 1.5, 2000.0])
    expected = 1 / (1 + np.exp(-np.clip(logits, -300, 300) / 0.5))  # clipped: the reference itself must not overflow
    np.testing.assert_allclose(calibrated_probability(logits, 0.5), expected, rtol=1e-12, atol=1e-250)
    assert np.all(np.isfinite(sigmoid(logits)))


def test_the_threshold_itself_counts_as_pneumonia():
    config = ModelConfig(architecture="efficientnet_lite0", image_size=224, threshold=0.4)
    assert decide(0.4, config.threshold, config.labels) == "pneumonia"
    assert decide(0.3999, config.threshold, config.labels) == "normal"
    assert is_pneumonia([0.39, 0.4, 0.9], 0.4).tolist() == [False, True, True]


def test_people_never_see_a_flat_zero_or_hundred_percent():
    assert format_probability(0.345) == "34.5 %"
    assert format_probability(1.0) == "> 99.9 %" and format_probability(0.9995) == "> 99.9 %"
    assert format_probability(0.0) == "< 0.1 %" and format_probability(0.0004) == "< 0.1 %"
