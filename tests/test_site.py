"""Site calibration: the fit recovers known parameters, refuses too few images, a profile binds to one
model, and --site changes the threshold and probability (never the heatmap) in the CLI, the edge runner
and the app alike."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pneunet.decision import sigmoid
from pneunet.site import MIN_PER_CLASS, SiteProfile, SiteProfileError, fit_platt, fit_site_profile
from tests.helpers import EXAMPLES


def synthetic(n: int, a: float, b: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, n)
    labels = (rng.uniform(size=n) < sigmoid(a * logits + b)).astype(int)
    return logits, labels


def test_platt_fit_recovers_known_parameters():
    logits, labels = synthetic(40000, 0.6, -1.2)
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(0.6, abs=0.03) and b == pytest.approx(-1.2, abs=0.05)


def test_profile_keeps_the_target_sensitivity_and_reports_intervals():
    logits, labels = synthetic(400, 1.5, 0.5, seed=1)
    profile = fit_site_profile(logits, labels, "ab" * 32, target_sensitivity=0.95, resamples=200)
    called = profile.probability(logits) >= profile.threshold
    assert called[labels == 1].mean() >= 0.95
    low, high = profile.measured["sensitivity_ci95"]
    assert 0.0 <= low <= high <= 1.0 and profile.images == {"normal": int((labels == 0).sum()), "pneumonia": int(labels.sum())}


def test_too_few_images_of_a_class_are_refused_with_the_rule():
    logits = np.linspace(-3, 3, 100)
    labels = np.zeros(100, dtype=int)
    labels[:MIN_PER_CLASS - 1] = 1
    with pytest.raises(SiteProfileError, match=f"at least {MIN_PER_CLASS} of each"):
        fit_site_profile(logits, labels, "ab" * 32)


def test_a_profile_for_another_model_is_refused(tmp_path):
    logits, labels = synthetic(200, 1.0, 0.0)
    path = tmp_path / "site.json"
    fit_site_profile(logits, labels, "a" * 64, resamples=20).save(path)
    assert SiteProfile.load(path, "a" * 64).model_sha256 == "a" * 64
    with pytest.raises(SiteProfileError, match="another model"):
        SiteProfile.load(path, "b" * 64)
    from pneunet.predictor import Predictor

    with pytest.raises(SiteProfileError, match="another model"):
        Predictor.load(site=path)  # the served export has another sha256


def served_profile(tmp_path, threshold: float) -> tuple[object, object]:
    """A profile for the served model (slope 0.5, intercept 1: visibly another probability) with ``threshold``."""
    from pneunet.predictor import Predictor

    served = Predictor.load(gate=False)
    logits, labels = synthetic(200, 1.0, 0.0)
    profile = fit_site_profile(logits, labels, served.backend.sha256, resamples=20, name="test site")
    profile.slope, profile.intercept, profile.threshold = 0.5, 1.0, threshold
    path = tmp_path / "site.json"
    profile.save(path)
    return served, path


def test_site_changes_threshold_and_probability_in_cli_edge_and_app_but_not_the_heatmap(tmp_path, capsys):
    from edge.run import main as edge_main
    from pneunet.cli import main as cli_main
    from pneunet.predictor import Predictor

    served, path = served_profile(tmp_path, threshold=0.9)
    files = sorted(EXAMPLES.glob("*.jpeg"))
    rows = {}
    for name, main in (("cli", cli_main), ("edge", edge_main)):
        out = tmp_path / f"{name}.csv"
        argv = (["predict"] if name == "cli" else []) + [str(EXAMPLES), "--site", str(path), "--csv", str(out), "--quiet"]
        assert main(argv) == 0
        rows[name] = list(csv.DictReader(open(out)))
    assert rows["cli"] == rows["edge"]
    sited = Predictor.load(site=path)
    for row, file in zip(rows["cli"], files):
        logit = served.predict(file, gate=False).logit
        assert float(row["probability_value"]) == pytest.approx(sigmoid(0.5 * logit + 1.0), abs=1e-6)
        assert row["threshold"] == "90.0 %" and row["operating_point"].startswith("test site profile fitted on 200 images")
        plain, with_site = served.predict(file, heatmap=True, gate=False), sited.predict(file, heatmap=True, gate=False)
        np.testing.assert_array_equal(plain.heatmap, with_site.heatmap)  # the evidence is the model's

    import app

    service = app.AppService(sited)
    result = sited.predict(files[-1], gate=False)
    values = service.result_json(result, "pneumonia")
    assert values["threshold"] == 0.9 and values["operating_point"].startswith("test site profile")
    assert "test site profile" in service.verdict_markdown(result)
    assert json.loads(path.read_text())["format"] == "pneunet-site/1"
