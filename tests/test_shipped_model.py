"""The committed model is the one its report describes, and still predicts what was recorded."""

import json

import pytest

from pneunet.checkpoint import read_sidecar, sha256_of
from pneunet.backends import DEFAULT_CHECKPOINT
from pneunet.predictor import Predictor
from tests.helpers import EXAMPLES

WEIGHTS = DEFAULT_CHECKPOINT.parent


def test_shipped_checkpoint_matches_its_sidecar_and_report():
    digest = sha256_of(DEFAULT_CHECKPOINT)
    assert read_sidecar(DEFAULT_CHECKPOINT)["sha256"] == digest
    report = (WEIGHTS / "REPORT.md").read_text()
    assert digest in report
    provenance = read_sidecar(DEFAULT_CHECKPOINT)["config"]["provenance"]
    assert provenance["command"].startswith("python -m training.")
    assert provenance["split_file"] == "training/splits/kermany224.csv"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 2**20


def test_shipped_model_predicts_the_bundled_examples_as_recorded():
    recorded = json.loads((WEIGHTS / "examples.json").read_text())
    assert {row["file"] for row in recorded} == {path.name for path in EXAMPLES.glob("*.jpeg")}
    predictor = Predictor.load(DEFAULT_CHECKPOINT)
    for row in recorded:
        result = predictor.predict(EXAMPLES / row["file"], gate=False)
        assert result.label == row["label"], row["file"]
        assert result.pneumonia_probability == pytest.approx(row["pneumonia_probability"], abs=1e-4), row["file"]


def test_shipped_metrics_are_the_reported_test_evaluation():
    metrics = json.loads((WEIGHTS / "metrics.json").read_text())
    assert metrics["test"]["n"] == 624 and metrics["val"]["n"] == 652
    config = read_sidecar(DEFAULT_CHECKPOINT)["config"]
    assert metrics["test"]["threshold"] == pytest.approx(config["threshold"])
