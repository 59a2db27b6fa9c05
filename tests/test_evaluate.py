"""``python -m training.evaluate`` on a handful of real images: the model is scored on what it is served
(its lung fields), and the external check, localisation and shortcut probe land in metrics.json and report.md."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from pneunet.checkpoint import save_checkpoint
from pneunet.integrity import sha256_of
from pneunet.lung_model import build_lung_model, save_lung_checkpoint
from pneunet.lungs import LungConfig, lungs_path_for
from pneunet.models import build_model, default_config
from pneunet.predictor import Predictor
from training import evaluate, evidence
from pneunet.datasets import DEFAULT_NIH_DIR, Example, read_split
from tests.helpers import require_data

VARIANTS = {"R_marker", "text_stamp", "erase_corners", "all"}


def _template() -> list[list[int]]:
    """Two lung-like blocks on a 32 x 32 grid: what the classifier sees when the segmenter finds no lungs."""
    grid = np.zeros((32, 32), dtype=int)
    grid[5:28, 4:14] = grid[5:28, 18:28] = 1
    return grid.tolist()


def _lung_model_checkpoint(folder, architecture: str = "efficientnet_lite0"):
    """A random classifier trained "on lung fields", with a segmenter that marks every pixel as lung: never
    plausible, so every image falls back to the template and the classifier sees a masked image."""
    torch.manual_seed(0)
    lung_config = LungConfig(input_size=32, base_channels=4, depth=2, template=_template())
    segmenter = build_lung_model(lung_config)
    with torch.no_grad():
        segmenter.out.weight.zero_()
        segmenter.out.bias.fill_(10.0)
    save_lung_checkpoint(segmenter, lung_config, folder / "lungs.safetensors")
    config = default_config(architecture)
    config.lungs = {"onnx_sha256": sha256_of(folder / "lungs.onnx")}
    config.evidence_scale = 1e-3
    config.temperature, config.threshold = 1.5, 0.5
    checkpoint = folder / "model.safetensors"
    save_checkpoint(build_model(config), config, checkpoint)
    shutil.copyfile(folder / "lungs.onnx", lungs_path_for(checkpoint))
    shutil.copyfile(folder / "lungs.json", lungs_path_for(checkpoint).with_suffix(".json"))
    return checkpoint


def _old_model_checkpoint(folder, architecture: str):
    torch.manual_seed(1)
    config = default_config(architecture)
    checkpoint = folder / "model.safetensors"
    save_checkpoint(build_model(config), config, checkpoint)
    return checkpoint


def _run(checkpoint, out, limit: int, *extra: str) -> dict:
    data_dir = require_data()
    argv = ["--checkpoint", str(checkpoint), "--split", "val", "--out", str(out), "--data-dir", str(data_dir),
            "--limit", str(limit), "--device", "cpu", *extra]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def _check_probe(rows: dict, images: int) -> None:
    assert set(rows) == VARIANTS
    for row in rows.values():
        assert row["images"] == images and 0 <= row["flipped"] <= images
        assert 0.0 <= row["flip_rate"] <= 1.0 and row["flip_rate"] == pytest.approx(row["flipped"] / images)
        assert 0.0 <= row["mean_abs_delta"] <= row["max_abs_delta"] <= 1.0


def _check_lungs_summary(summary: dict) -> None:
    assert summary["images"] >= 1
    assert 0.0 <= summary["energy_in_lungs"] <= 1.0 and 0.0 < summary["uniform_energy"] < 1.0
    assert 0.0 <= summary["pointing"] <= 1.0 and 0.0 <= summary["peak_in_central_fifth"] <= 1.0
    low, high = summary["energy_in_lungs_ci"]
    assert low <= summary["energy_in_lungs"] <= high


def _check_boxes(boxes: dict) -> None:
    assert boxes["boxes"] == 41 and boxes["all"]["images"] == 41 and boxes["val_test"]["images"] == 13
    assert boxes["images_per_split"] == {"train": 28, "val": 8, "test": 5}
    for row in (boxes["all"], boxes["val_test"]):
        assert 0.0 <= row["pointing"] <= row["pointing_within_one_cell"] <= 1.0
        assert 0.0 <= row["energy_in_box"] <= 1.0 and 0.0 < row["box_area_share"] < 1.0


def test_a_lung_field_model_is_scored_on_its_lung_fields_with_evidence_probe_and_external(tmp_path):
    checkpoint = _lung_model_checkpoint(tmp_path)
    out = tmp_path / "eval"
    result = _run(checkpoint, out, 6)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"] and {"external", "localisation", "probe"} <= set(saved)
    assert result["metrics"]["n"] == 6 and "lung fields only" in result["input"]

    # What the evaluation scored is what the Predictor (the app's path) serves for the same files.
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    predictor = Predictor.load(checkpoint, gate=False)
    for row in rows[:3]:
        served = predictor.predict(require_data() / row["path"], gate=False).pneumonia_probability
        assert float(row["pneumonia_probability"]) == pytest.approx(served, abs=1e-5)

    # Every image fell back to the template (the segmenter marks everything as lung), and says so.
    assert result["lung_fields"]["implausible"] == 6
    nih = result["external"]["nih_adult224"]
    assert nih["split"] == "val" and nih["metrics"]["n"] == 6 and nih["lung_fields"]["implausible"] == 6
    assert "cover 100%" in next(iter(nih["lung_fields"]["reasons"]))
    assert 0.0 <= nih["metrics"]["auc"] <= 1.0 and 0.0 <= nih["metrics"]["ece"] <= 1.0
    assert {"sensitivity", "specificity", "auc_ci95"} <= set(nih["metrics"])

    localisation = result["localisation"]
    assert localisation["map"] == evidence.EVIDENCE_MAP
    _check_lungs_summary(localisation["kermany"])
    _check_boxes(localisation["nih_boxes"])
    assert localisation["nih_boxes"]["cell_px"] == 32 and localisation["nih_boxes"]["feature_side"] == 7  # 224 / 7
    _check_probe(result["probe"]["kermany"], 6)
    _check_probe(result["probe"]["nih_adult224"], 6)

    report = (out / "report.md").read_text()
    for heading in ("External check: nih_adult224 val", "Where the evidence sits", "Shortcut probe", "overlays.png",
                    "nih_overlays.png", "val + test only (13)"):
        assert heading in report
    for figure in ("overlays.png", "nih_overlays.png", "roc.png", "nih_predictions.csv"):
        assert (out / figure).stat().st_size > 0
    assert len(result["overlays"]["images"]) == 6


def test_a_model_without_lungs_or_a_pooled_linear_head_is_measured_too(tmp_path):
    """The old path (whole image) on cnn5: 150 px input, Grad-CAM instead of the evidence map."""
    checkpoint = _old_model_checkpoint(tmp_path, "cnn5")
    result = _run(checkpoint, tmp_path / "eval", 4)
    assert "whole image" in result["input"] and "lung_fields" not in result
    assert result["external"]["nih_adult224"]["lung_fields"] is None
    assert result["localisation"]["map"] == evidence.GRAD_CAM_MAP
    _check_lungs_summary(result["localisation"]["kermany"])
    _check_boxes(result["localisation"]["nih_boxes"])
    boxes = result["localisation"]["nih_boxes"]
    assert boxes["cell_px"] == round(150 / boxes["feature_side"]) and boxes["feature_side"] < 150 / 8
    _check_probe(result["probe"]["kermany"], 4)


def test_no_external_leaves_nih_out(tmp_path):
    checkpoint = _old_model_checkpoint(tmp_path, "cnn5")
    result = _run(checkpoint, tmp_path / "eval", 4, "--no-external")
    assert result["external"] == {} and set(result["probe"]) == {"kermany"}
    assert "nih_boxes" not in result["localisation"] and not (tmp_path / "eval" / "nih_overlays.png").exists()


def test_reference_masks_and_boxes_are_read_where_the_readme_says():
    data_dir = require_data()
    val = read_split(split="val")
    pneumonia = next(e for e in val if e.label == 1)
    assert pneumonia.path.startswith("train/")  # validation is carved from train, so are its masks
    mask = evidence.kermany_mask(evaluate.DEFAULT_LUNG_MASKS_DIR, pneumonia, 150)
    assert mask is not None and mask.shape == (150, 150) and 0.1 < mask.mean() < 0.7
    assert evidence.kermany_mask(evaluate.DEFAULT_LUNG_MASKS_DIR, Example("train/NORMAL/none.jpeg", 0, "", "val"), 224) is None
    assert data_dir.is_dir()
    boxes = evidence.read_pneumonia_boxes(DEFAULT_NIH_DIR, 224)
    assert len(boxes) == 41 and sum(len(b) for b in boxes.values()) == 41
    half = evidence.read_pneumonia_boxes(DEFAULT_NIH_DIR, 112)
    path = next(iter(boxes))
    assert half[path][0] == pytest.approx(tuple(v / 2 for v in boxes[path][0]))


def test_the_probe_reuses_the_unmodified_probabilities_without_changing_the_answer():
    data_dir = require_data()
    config = default_config("cnn5")
    torch.manual_seed(2)
    model = build_model(config).eval()
    from training.data import load_images

    images = load_images(read_split(split="val")[:3], data_dir)
    base = evidence.score_images(model, config, images, None, torch.device("cpu")).probabilities
    reused = evidence.probe_rows(model, config, images, None, torch.device("cpu"), base)
    recomputed = evidence.probe_rows(model, config, images, None, torch.device("cpu"))
    assert reused.keys() == recomputed.keys()
    for variant in reused:
        assert reused[variant]["mean_abs_delta"] == pytest.approx(recomputed[variant]["mean_abs_delta"], abs=1e-6)
