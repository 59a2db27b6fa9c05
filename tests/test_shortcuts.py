"""Counterfactual markers change only what they draw, the augmentation is seedable, and the shortcut probe
finds a predictor that reads a corner (and none that ignores the image)."""

import numpy as np
import pytest
import torch
from PIL import Image

from training.shortcuts import (
    CounterfactualAugment, erase_corner_markers, occlude_border, paste_corner_mark, paste_marker,
    paste_text_stamp, probe_table, shortcut_probe, text_extent,
)
from tests.helpers import require_data


def chest_like(size: int = 224, seed: int = 0) -> Image.Image:
    """A grey film: dark surround, brighter mediastinum, two darker lung fields, a little noise."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    pixels = 40 + 120 * np.exp(-((cols - 0.5) / 0.25) ** 2) * (rows > 0.1)
    for centre in (0.3, 0.7):
        pixels -= 60 * (((cols - centre) / 0.16) ** 2 + ((rows - 0.5) / 0.3) ** 2 < 1)
    pixels += np.random.default_rng(seed).normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def changed_box(before: Image.Image, after: Image.Image) -> tuple[int, int, int, int]:
    """(first row, last row, first col, last col) of the changed pixels."""
    rows, cols = np.nonzero(np.asarray(before) != np.asarray(after))
    assert rows.size, "nothing changed"
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize("height", [8, 16, 28])
def test_marker_changes_only_pixels_under_the_letter(height):
    image = chest_like()
    original = np.array(image)
    center = (150, 60)
    marked = paste_marker(image, "R", center, height)
    assert np.array_equal(np.asarray(image), original)  # input untouched
    row0, row1, col0, col1 = changed_box(image, marked)
    assert center[1] - height / 2 - 1 <= row0 and row1 <= center[1] + height / 2 + 1
    assert center[0] - height / 2 - 1 <= col0 and col1 <= center[0] + height / 2 + 1
    assert abs((row1 - row0 + 1) - height) <= max(2, height // 8)  # about `height` tall
    assert np.asarray(marked)[row0:row1 + 1, col0:col1 + 1].max() == 255  # white, like a burnt-in letter
    changed = np.asarray(marked) != original
    assert (np.asarray(marked)[changed] > original[changed]).all()  # only brightened


def test_marker_near_an_edge_is_clipped_not_wrapped():
    image = chest_like(64)
    marked = paste_marker(image, "L", (0, 0), 16)
    _, row1, _, col1 = changed_box(image, marked)  # only the part of the letter inside the image
    assert row1 <= 9 and col1 <= 9


def test_text_stamp_starts_at_top_left_and_stays_in_its_extent():
    image = chest_like()
    text, top_left, height = "AP SUPINE", (30, 190), 10
    stamped = paste_text_stamp(image, text, top_left, height)
    width, ink_height = text_extent(text, height)
    row0, row1, col0, col1 = changed_box(image, stamped)
    assert top_left[1] <= row0 <= top_left[1] + 1 and row1 < top_left[1] + ink_height
    assert top_left[0] <= col0 <= top_left[0] + 2 and col1 < top_left[0] + width
    assert width > 4 * height  # a line of text, not a letter


@pytest.mark.parametrize("corner, expected", [("tl", (0, 9, 0, 19)), ("tr", (0, 9, 204, 223)),
                                              ("bl", (214, 223, 0, 19)), ("br", (214, 223, 204, 223))])
def test_corner_mark_fills_exactly_its_rectangle(corner, expected):
    image = chest_like()
    marked = paste_corner_mark(image, corner, (20, 10))
    assert changed_box(image, marked) == expected
    row0, row1, col0, col1 = expected
    assert (np.asarray(marked)[row0:row1 + 1, col0:col1 + 1] == 255).all()
    with pytest.raises(ValueError, match="corner must be one of"):
        paste_corner_mark(image, "middle", 5)


def test_erase_corner_markers_removes_a_bright_corner_and_keeps_the_centre():
    image = paste_text_stamp(paste_marker(chest_like(), "R", (16, 16), 16), "PORTABLE", (170, 210), 8)
    erased = np.asarray(erase_corner_markers(image, fraction=0.15))
    before = np.asarray(image)
    side = round(0.15 * 224)
    centre = np.ones(before.shape, dtype=bool)
    for rows in (slice(0, side), slice(224 - side, 224)):
        for cols in (slice(0, side), slice(224 - side, 224)):
            centre[rows, cols] = False
    assert np.array_equal(erased[centre], before[centre])  # nothing outside the corner squares changes
    assert before[:side, :side].max() == 255 and erased[:side, :side].max() < 100  # the "R" is gone
    assert len(np.unique(erased[:side, :side])) == 1  # one flat border grey
    assert abs(int(erased[0, 0]) - 40) <= 5  # the surround's grey, not the letter's white


def test_erase_corner_markers_on_a_real_film():
    path = sorted((require_data() / "test" / "NORMAL").glob("*.jpeg"))[0]
    image = Image.open(path).convert("L")
    erased = np.asarray(erase_corner_markers(image))
    side = round(0.15 * min(image.size))
    h, w = erased.shape
    assert np.array_equal(erased[side:h - side], np.asarray(image)[side:h - side])
    assert len(np.unique(erased[:side, :side])) == 1


def test_occlude_border_blacks_out_a_strip_or_a_corner_touching_the_edge():
    image = Image.fromarray(np.full((100, 120), 128, dtype=np.uint8))
    rng = np.random.default_rng(0)
    for _ in range(40):
        occluded = np.asarray(occlude_border(image, rng))
        black = occluded == 0
        assert black.any() and (occluded[~black] == 128).all()
        rows, cols = np.nonzero(black)
        full_rows, full_cols = black.all(axis=1).any(), black.all(axis=0).any()
        if full_rows:  # a top or bottom strip
            assert rows.max() - rows.min() + 1 <= 12 and (rows.min() == 0 or rows.max() == 99)
        elif full_cols:  # a left or right strip
            assert cols.max() - cols.min() + 1 <= round(0.12 * 120) and (cols.min() == 0 or cols.max() == 119)
        else:  # a corner square
            side = rows.max() - rows.min() + 1
            assert side == cols.max() - cols.min() + 1 <= 15 and black.sum() == side ** 2
            assert (rows.min() == 0 or rows.max() == 99) and (cols.min() == 0 or cols.max() == 119)


def test_augment_is_reproducible_under_torch_seed_and_keeps_the_image_format():
    augment = CounterfactualAugment(p=1.0)
    images = [chest_like(224, seed) for seed in range(6)]

    def run(seed):
        torch.manual_seed(seed)
        return [np.asarray(augment(image)) for image in images]

    first, again, other = run(3), run(3), run(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert all(not np.array_equal(out, np.asarray(image)) for out, image in zip(first, images))
    out = augment(chest_like(320))
    assert out.mode == "L" and out.size == (320, 320)


def test_augment_with_p_zero_is_the_identity():
    image = chest_like()
    assert CounterfactualAugment(p=0.0)(image) is image


def corner_reader(images):
    """A shortcut model: pneumonia probability = brightness of the top-left 16 x 16 corner."""
    return np.array([np.asarray(image)[:16, :16].mean() / 255 for image in images])


def test_probe_catches_a_corner_reading_predictor():
    images = [paste_corner_mark(chest_like(seed=seed), "tl", 20) for seed in range(5)]
    results = {r.variant: r for r in shortcut_probe(corner_reader, images, threshold=0.5)}
    assert set(results) == {"R_marker", "text_stamp", "erase_corners", "all"}
    erased = results["erase_corners"]
    assert erased.images == 5 and erased.flipped == 5 and erased.flip_rate == 1.0
    assert erased.mean_abs_delta > 0.6 and erased.max_abs_delta >= erased.mean_abs_delta
    assert results["all"].mean_abs_delta > 0.3


def test_probe_never_flips_a_predictor_that_ignores_the_image():
    images = [chest_like(seed=seed) for seed in range(4)]
    results = shortcut_probe(lambda batch: np.full(len(batch), 0.7), images, threshold=0.5)
    assert all(r.flipped == 0 and r.max_abs_delta == 0 for r in results)
    table = probe_table(results)
    assert table.count("\n") == 1 + len(results) and "| erase_corners | 4 | 0 | 0.0 % |" in table


def test_probe_is_deterministic_given_the_seed():
    images = [chest_like(seed=seed) for seed in range(3)]

    def mean_brightness(batch):
        return np.array([np.asarray(image).mean() / 255 for image in batch])

    first = shortcut_probe(mean_brightness, images, 0.3, seed=1)
    assert first == shortcut_probe(mean_brightness, images, 0.3, seed=1)
    assert first != shortcut_probe(mean_brightness, images, 0.3, seed=2)
