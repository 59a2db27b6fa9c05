"""The About tab's model card (pneunet.model_card): the loaded model's own figures with confidence
intervals, or none; no internal paths."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pneunet.config import ModelConfig
from pneunet.integrity import sha256_of
from pneunet.model_card import (SHIPPED_WEIGHTS, model_card, operating_point, own_report, report_matching,
                                served_as, wilson_interval)

SHIPPED_CHECKPOINT = SHIPPED_WEIGHTS / "pneunet.safetensors"


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((SHIPPED_WEIGHTS / "metrics.json").read_text())


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_dict(json.loads((SHIPPED_WEIGHTS / "pneunet.json").read_text())["config"])


@pytest.fixture(scope="module")
def report(metrics) -> dict:
    own = report_matching(metrics, metrics["evaluation_test"]["checkpoint_sha256"])
    assert own is not None
    return own


def exported(sha256: str | None, precision: str = "fp32", parity: str = "pass"):
    """An object shaped like pneunet.backends.ExportedModel, as far as the card reads it."""
    return SimpleNamespace(path=Path("edge/models/model.onnx"), sidecar={"source_checkpoint": {"sha256": sha256}},
                           entry={"format": "onnx", "precision": precision, "parity_gate": {"result": parity, "failures": []}})


def internal_paths(text: str) -> list[str]:
    """Absolute paths, training-machine folders and internal files a user has no use for."""
    patterns = [r"(?<![\w.])/(?:work|home|root|tmp|Users|mnt|data)\b", r"\.carry", r"\bruns/", r"\.safetensors",
                r"\.onnx\b", r"metrics\.json", r"REPORT\.md", r"\]\((?!https?://)"]
    return [match.group(0) for pattern in patterns for match in re.finditer(pattern, text)]


def test_the_shipped_model_shows_its_figures_with_intervals_on_every_evaluated_set(report, config, metrics):
    card = model_card(report, config, served_as(exported(metrics["evaluation_test"]["checkpoint_sha256"])))
    kermany, adults = metrics["evaluation_test"]["metrics"], metrics["evaluation_test"]["external"]["nih_adult224"]["metrics"]
    for name, values in (("Kermany test", kermany), ("nih_adult224 test", adults),
                         ("Kermany validation", metrics["evaluation_val"]["metrics"])):
        row = next(line for line in card.splitlines() if line.startswith(f"| {name}"))
        low, high = values["auc_ci95"]
        assert f"{values['auc']:.3f} ({low:.3f}–{high:.3f})" in row, row
        assert f"{100 * values['sensitivity']:.1f} % (" in row and f"{100 * values['specificity']:.1f} % (" in row, row
        assert f"{values['ece']:.3f}" in row
    assert "95 % confidence intervals" in card
    assert "Not a medical device" in card and "paediatric (1–5 years)" in card and "one hospital" in card
    assert "How to read the heatmap" in card and "not a finding" in card
    assert f"{100 * kermany['specificity']:.1f} %" in card.split("## Known limits")[1]
    assert "Calibration holds on validation only" in card and "Adults" in card and "not a reliable pointer" in card
    assert internal_paths(card) == [], internal_paths(card)


def test_the_card_is_generated_from_the_report_not_typed_in(report, config):
    changed = copy.deepcopy(report)
    test = changed["evaluation_test"]["metrics"]
    test.update(auc=0.5123, auc_ci95=[0.4011, 0.6022], specificity=0.9, ece=0.01,
                confusion_matrix={"tp": 90, "fn": 10, "tn": 90, "fp": 10})
    card = model_card(changed, config)
    assert "0.512 (0.401–0.602)" in card and "90.0 % (82.6–94.5)" in card
    assert "False alarms" not in card  # specificity 0.9 meets its target


def test_a_model_without_its_own_report_shows_no_figures(config, report):
    card = model_card(None, config, "the PyTorch checkpoint itself")
    assert "no evaluation report of its own" in card
    assert "| evaluated set" not in card and "AUC" not in card and "95 %" not in card
    shipped = [value for metrics in (report["evaluation_test"]["metrics"], report["evaluation_val"]["metrics"])
               for value in (f"{metrics['auc']:.3f}", f"{100 * metrics['sensitivity']:.1f} %",
                             f"{100 * metrics['specificity']:.1f} %", f"{metrics['ece']:.3f}")]
    assert [value for value in shipped if value in card] == []
    assert "Not a medical device" in card and internal_paths(card) == []
    assert "no sensitivity or specificity" in operating_point(None, config)


def test_figures_at_another_threshold_are_not_passed_off_as_this_models(report, config):
    other = dataclasses.replace(config, threshold=0.5)
    card = model_card(report, other)
    assert "not at this threshold" in card
    assert "no sensitivity or specificity" in operating_point(report, other)


def test_only_the_report_naming_the_loaded_checkpoint_is_used(metrics, tmp_path):
    shipped_sha = metrics["evaluation_test"]["checkpoint_sha256"]
    assert own_report(exported(shipped_sha)) is not None
    assert own_report(exported("0" * 64)) is None  # another model's export: none of the shipped figures
    assert own_report(exported(None)) is None
    assert own_report(SimpleNamespace(path=SHIPPED_CHECKPOINT)) is not None  # --backend torch on the shipped checkpoint

    other = tmp_path / "model.safetensors"
    other.write_bytes(b"another checkpoint")
    assert own_report(SimpleNamespace(path=other)) is None, "a checkpoint without a report got the shipped figures"
    beside = {"evaluation_test": {**metrics["evaluation_test"], "checkpoint_sha256": sha256_of(other)}}
    (tmp_path / "metrics.json").write_text(json.dumps(beside))
    assert own_report(SimpleNamespace(path=other))["evaluation_test"]["checkpoint_sha256"] == sha256_of(other)
    assert "evaluation_val" not in own_report(SimpleNamespace(path=other))


def test_served_as_names_the_export_and_its_parity_check():
    assert served_as(exported("x", "int8", "fail")) == "an int8 ONNX export of its checkpoint (parity check against the checkpoint failed)"
    assert served_as(SimpleNamespace(path=SHIPPED_CHECKPOINT)) == "the PyTorch checkpoint itself"


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
