"""The heatmap overlay: lung outline where the mask's border is, colour only where the map is warm, and a
colour-bar panel beside (never over) the image, which keeps its own size.

    python -m pytest -q tests/test_overlay.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneunet.lungs import LungFields, region_from_mask
from pneunet.overlay import colour_bar_panel, outline_mask, overlay_heatmap

XRAY = Path(__file__).resolve().parent.parent / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"
# Two "lungs" on the 224 model grid: rows 40-179, columns 40-99 and 124-183.
ROWS, LEFT, RIGHT = (40, 180), (40, 100), (124, 184)


def two_lungs(plausible: bool = True) -> LungFields:
    mask = np.zeros((224, 224), dtype=bool)
    mask[ROWS[0]:ROWS[1], LEFT[0]:LEFT[1]] = True
    mask[ROWS[0]:ROWS[1], RIGHT[0]:RIGHT[1]] = True
    return LungFields(mask, region_from_mask(mask, 8), mask.astype(np.float32), plausible,
                      None if plausible else "no lung field was found in the left half of the image")


def flat_grey(size=(448, 336), value=100) -> Image.Image:
    return Image.new("L", size, value)


def changed(overlay: Image.Image, grey: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels of the image part that differ from the grey original."""
    part = np.asarray(overlay.crop((0, 0, *grey.size)), dtype=np.int16)
    return np.any(part != np.asarray(grey.convert("RGB"), dtype=np.int16), axis=2)


def test_the_outline_is_drawn_where_the_stretched_mask_border_is():
    grey = flat_grey()  # 2x wide, 1.5x tall: the mask is stretched like the map
    drawn = changed(overlay_heatmap(grey, np.zeros((224, 224)), two_lungs(), colour_bar=False), grey)
    sx, sy = grey.width / 224, grey.height / 224
    expected = np.zeros_like(drawn)
    for columns in (LEFT, RIGHT):
        top, bottom = round(ROWS[0] * sy), round(ROWS[1] * sy) - 1
        left, right = round(columns[0] * sx), round(columns[1] * sx) - 1
        expected[top:bottom + 1, [left, right]] = True
        expected[[top, bottom], left:right + 1] = True
    rows, cols = np.nonzero(drawn)
    border_rows, border_cols = np.nonzero(expected)
    # every drawn pixel lies on (within 2 px of) the border, and every border pixel has a drawn one that near
    distance_to_border = np.min(np.abs(rows[:, None] - border_rows[None]) + np.abs(cols[:, None] - border_cols[None]), axis=1)
    assert distance_to_border.max() <= 2
    distance_to_drawn = np.min(np.abs(border_rows[:, None] - rows[None]) + np.abs(border_cols[:, None] - cols[None]), axis=1)
    assert distance_to_drawn.max() <= 2
    # inside the lungs and outside them the image is untouched
    assert not drawn[round(110 * sy), round(70 * sx)] and not drawn[5, 5] and not drawn[round(110 * sy), grey.width // 2]
    outline_colour = np.asarray(overlay_heatmap(grey, np.zeros((224, 224)), two_lungs(), colour_bar=False))[drawn]
    assert np.all(outline_colour[:, 1] > outline_colour[:, 0] + 60)  # green, not a heat colour or grey


def test_the_standard_outline_is_dashed_when_the_lungs_were_not_found():
    grey = flat_grey()
    solid = changed(overlay_heatmap(grey, np.zeros((224, 224)), two_lungs(True), colour_bar=False), grey)
    dashed = changed(overlay_heatmap(grey, np.zeros((224, 224)), two_lungs(False), colour_bar=False), grey)
    assert np.all(solid[dashed]), "the dashes lie on the solid outline"
    assert 0.3 < dashed.sum() / solid.sum() < 0.7


def test_the_colour_bar_is_a_panel_beside_the_image_which_keeps_its_size():
    grey = Image.open(XRAY).convert("L")
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[100:140, 50:90] = 1.0
    plain = overlay_heatmap(grey, heat, two_lungs(), colour_bar=False)
    with_bar = overlay_heatmap(grey, heat, two_lungs())
    assert plain.size == grey.size and plain.mode == "RGB"
    assert with_bar.height == grey.height and with_bar.width > grey.width
    assert np.array_equal(np.asarray(with_bar.crop((0, 0, *grey.size))), np.asarray(plain))
    panel = np.asarray(with_bar.crop((grey.width, 0, with_bar.width, with_bar.height)), dtype=np.int16)
    assert np.array_equal(panel, np.asarray(colour_bar_panel(grey.height, "fixed", "pneumonia", lungs=two_lungs()), dtype=np.int16))
    chroma = panel.max(axis=2) - panel.min(axis=2)
    assert np.mean(chroma > 30) > 0.01, "the panel shows the colour ramp"
    assert np.mean(panel.min(axis=2) > 200) > 0.002, "the panel has (light) words on it"
    assert 0.1 < (with_bar.width - grey.width) / grey.height < 0.6


def test_the_bar_says_which_scale_the_map_is_on():
    fixed, relative = (np.asarray(colour_bar_panel(600, scale)) for scale in ("fixed", "relative"))
    assert fixed.shape[0] == relative.shape[0] == 600
    assert fixed.shape != relative.shape or not np.array_equal(fixed, relative)
    with pytest.raises(ValueError, match="unknown heatmap scale"):
        overlay_heatmap(flat_grey(), np.zeros((224, 224)), scale="per-image")


def test_a_zero_map_leaves_the_image_unchanged_except_the_outline():
    grey = Image.open(XRAY).convert("L")
    zero = np.zeros((224, 224), dtype=np.float32)
    assert not changed(overlay_heatmap(grey, zero), grey).any()
    drawn = changed(overlay_heatmap(grey, zero, two_lungs()), grey)
    outline = outline_mask(two_lungs(), grey.size)
    assert drawn.any() and not drawn[~outline].any()


def test_colour_only_where_the_map_is_warm():
    grey = flat_grey()
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[100:140, 50:90] = 1.0
    rgb = np.asarray(overlay_heatmap(grey, heat, colour_bar=False), dtype=np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    assert chroma[round(120 * 1.5), round(70 * 2)] > 40
    assert chroma[round(30 * 1.5), round(180 * 2)] == 0


@pytest.mark.parametrize("size", [(32, 32), (224, 224), (4000, 40), (40, 2000)])
def test_any_image_size_gets_an_overlay_of_its_own_height(size):
    grey = flat_grey(size)
    overlay = overlay_heatmap(grey, np.full((224, 224), 0.5), two_lungs(False))
    assert overlay.height == size[1] and overlay.width > size[0]
    assert overlay_heatmap(grey, np.full((224, 224), 0.5), two_lungs(False), colour_bar=False).size == size
