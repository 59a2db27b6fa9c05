"""Lung fields: the shipped segmenter on real masks, the lung rule, and heatmaps bound to the lungs on one scale."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pneunet.heatmap import display_map, evidence_cells, evidence_map
from pneunet.lungs import (LungConfig, LungFinder, dilate, lung_fields, lung_outline, lungs_path_for, model_view,
                           plausibility_problem, suppress_outside)
from pneunet.models import default_config
from pneunet.backends import DEFAULT_CHECKPOINT
from pneunet.predictor import Predictor
from pneunet.preprocessing import preprocess, to_unit
from tests.helpers import EXAMPLES, require_data

LUNGS_ONNX = lungs_path_for(DEFAULT_CHECKPOINT)
CONFIG = default_config("efficientnet_lite0")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def finder() -> LungFinder:
    return LungFinder.load(LUNGS_ONNX)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT_CHECKPOINT, gate=False)


def test_shipped_segmenter_matches_real_test_masks(finder):
    data = require_data()
    masks_dir = data.parent / "kermany224_lungs" / "test"
    names = sorted((masks_dir / "PNEUMONIA").glob("*.png"))[:6] + sorted((masks_dir / "NORMAL").glob("*.png"))[:6]
    scores = []
    for mask_file in names:
        image = data / "test" / mask_file.parent.name / (mask_file.stem + ".jpeg")
        fields = finder.find(to_unit(image, CONFIG))
        assert fields.plausible, f"{image.name}: {fields.reason}"
        scores.append(dice(fields.mask, np.asarray(Image.open(mask_file)) >= 128))
    assert min(scores) > 0.8 and np.mean(scores) > 0.9, scores


def test_no_plausible_lungs_falls_back_to_the_template_and_says_why(finder):
    fields = lung_fields(np.full((finder.config.input_size,) * 2, -10.0), (224, 224), finder.config)
    assert not fields.plausible and "cover 0%" in fields.reason
    assert 0.15 < fields.mask.mean() < 0.6  # the population template, not the whole image
    one_sided = np.zeros((224, 224), bool)
    one_sided[40:180, 20:100] = True
    assert "right half" in plausibility_problem(one_sided, finder.config)


def test_dilation_is_a_square_max_filter():
    mask = np.zeros((64, 64), bool)
    mask[10, 12] = mask[40:44, 30:50] = True
    pillow = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 0
    assert np.array_equal(dilate(mask, 3), pillow)


def test_suppress_outside_keeps_only_the_region_and_the_outline_is_the_border():
    unit = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    region = np.zeros((32, 32), np.float32)
    region[8:24, 4:12] = 1
    masked = suppress_outside(unit, region)
    assert np.array_equal(masked[region == 1], unit[region == 1]) and not masked[region == 0].any()
    outline = lung_outline(region > 0)
    assert outline[8, 4:12].all() and outline[23, 4:12].all() and not outline[12:20, 6:10].any()


def test_model_view_without_lungs_is_the_old_preprocessing():
    image = next(EXAMPLES.glob("*.jpeg"))
    model_input, fields = model_view(image, CONFIG, None)
    assert fields is None and np.array_equal(model_input, preprocess(image, CONFIG))


def test_evidence_cells_add_up_to_the_calibrated_logit():
    rng = np.random.default_rng(1)
    features, weight, bias, temperature = rng.random((16, 7, 7)), rng.normal(size=16), 0.3, 1.7
    logit = float(weight @ features.mean(axis=(1, 2)) + bias)
    assert evidence_cells(features, weight, temperature).sum() == pytest.approx((logit - bias) / temperature)
    assert evidence_map(features, weight, temperature, (224, 224)).shape == (224, 224)


def test_shipped_model_maps_have_no_mass_outside_the_lungs(predictor):
    assert predictor.lungs is not None and predictor.config.evidence_scale
    for path in sorted(EXAMPLES.glob("*.jpeg")):
        result = predictor.predict(path, heatmap=True, target=("pneumonia", "normal"), gate=False)
        for shown in result.heatmaps.values():
            assert shown.shape == result.lungs.mask.shape and not shown[~result.lungs.mask].any()
            assert 0 <= shown.min() and shown.max() <= 1
        assert result.evidence["pneumonia"].shape == (224, 224)
        assert np.allclose(display_map(result.evidence["pneumonia"], result.lungs.mask, predictor.config.evidence_scale),
                           result.heatmap)


def test_a_confident_normal_film_looks_cooler_than_a_confident_pneumonia(predictor):
    results = [predictor.predict(path, heatmap=True, gate=False) for path in sorted(EXAMPLES.glob("*.jpeg"))]
    normal = min(results, key=lambda r: r.pneumonia_probability)
    pneumonia = max(results, key=lambda r: r.pneumonia_probability)
    assert normal.label == "normal" and pneumonia.label == "pneumonia"
    assert normal.heatmap.max() < pneumonia.heatmap.max()
    assert normal.heatmap.mean() < 0.5 * pneumonia.heatmap.mean()


def test_app_cli_and_edge_share_one_segmenter_file(finder):
    from pneunet.backends import default_model

    edge_lungs = default_model().parent / LUNGS_ONNX.name  # python -m export copies it verbatim
    assert edge_lungs.read_bytes() == LUNGS_ONNX.read_bytes()


def test_lung_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown lung config fields"):
        LungConfig.from_dict({"input_size": 128, "colour": "red"})
