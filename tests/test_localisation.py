"""Energy in a mask, pointing game against masks and boxes, and the summaries, on synthetic maps with known
answers."""

import math

import numpy as np
import pytest

from training.localisation import (
    bootstrap_mean_ci, box_mask, energy_in_mask, points_into, points_near_box, summarise_boxes, summarise_lungs,
)


def lungs(shape=(56, 56)) -> np.ndarray:
    """Two rectangular 'lung fields', left and right of the midline."""
    mask = np.zeros(shape, dtype=bool)
    mask[10:46, 6:22] = True
    mask[10:46, 34:50] = True
    return mask


def delta(shape, row, col, value=1.0) -> np.ndarray:
    heat = np.zeros(shape)
    heat[row, col] = value
    return heat


def test_a_delta_inside_and_outside_the_mask():
    mask = lungs()
    assert energy_in_mask(delta(mask.shape, 20, 10), mask) == 1.0
    assert points_into(delta(mask.shape, 20, 10), mask)
    assert energy_in_mask(delta(mask.shape, 20, 28), mask) == 0.0  # on the mediastinum
    assert not points_into(delta(mask.shape, 20, 28), mask)


def test_a_uniform_map_scores_the_mask_area_share():
    mask = lungs()
    assert energy_in_mask(np.full(mask.shape, 0.3), mask) == pytest.approx(mask.mean())


def test_energy_is_a_mass_share_and_the_peak_wins_over_the_mass():
    mask = lungs()
    heat = np.zeros(mask.shape)
    heat[mask] = 0.1  # most of the mass in the lungs ...
    heat[2, 28] = 1.0  # ... but the single peak outside
    assert energy_in_mask(heat, mask) == pytest.approx(0.1 * mask.sum() / (0.1 * mask.sum() + 1))
    assert not points_into(heat, mask)


def test_ties_take_the_first_peak():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 1] = True
    heat = np.zeros((4, 4))
    heat[0, 1] = heat[3, 3] = 2.0
    assert points_into(heat, mask)


def test_all_zero_map_is_a_miss_with_no_energy():
    mask = lungs()
    assert math.isnan(energy_in_mask(np.zeros(mask.shape), mask))
    assert not points_into(np.zeros(mask.shape), mask)
    assert not points_near_box(np.zeros(mask.shape), (0, 0, 56, 56), 100)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="ReLU"):
        energy_in_mask(-np.ones((4, 4)), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="differs from the mask"):
        points_into(np.ones((4, 5)), np.ones((4, 4), dtype=bool))


def test_box_mask_takes_pixels_whose_centres_fall_inside():
    mask = box_mask((10, 12), (2, 3, 4, 2))  # x, y, w, h
    assert mask.sum() == 8 and mask[3:5, 2:6].all()
    fractional = box_mask((10, 10), (1.6, 0.4, 1.0, 1.0))  # x 1.6-2.6, y 0.4-1.4: only the centre (2.5, 0.5)
    assert np.argwhere(fractional).tolist() == [[0, 2]]
    assert box_mask((10, 10), (8, 8, 5, 5)).sum() == 4  # clipped to the image
    assert not box_mask((10, 10), (20, 20, 5, 5)).any()


def test_a_peak_one_cell_away_from_a_box():
    box, cell = (16, 16, 8, 8), 8  # pixels 16..23
    assert points_near_box(delta((56, 56), 20, 20), box, 0)  # inside
    one_cell_right = delta((56, 56), 20, 23 + cell)
    assert not points_near_box(one_cell_right, box, 0)
    assert points_near_box(one_cell_right, box, cell)
    assert not points_near_box(delta((56, 56), 20, 24 + cell), box, cell)
    diagonal = delta((56, 56), 16 - cell, 16 - cell)  # Chebyshev: a diagonal cell is one cell away too
    assert points_near_box(diagonal, box, cell) and not points_near_box(diagonal, box, cell - 1)


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(1).uniform(size=200)
    low, high = bootstrap_mean_ci(values)
    assert low < values.mean() < high and high - low < 0.2
    assert bootstrap_mean_ci(np.full(5, 0.4)) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.array([])))


def test_summarise_lungs_on_known_maps():
    mask = lungs()
    maps = [
        delta(mask.shape, 20, 10),  # in a lung: energy 1, hit
        delta(mask.shape, 20, 28),  # central fifth (cols 22.4-33.6), on the mediastinum: energy 0, miss
        np.full(mask.shape, 1.0),  # uniform: energy = area share, peak (0, 0) a miss
        np.zeros(mask.shape),  # empty: excluded from energy, a miss
    ]
    summary = summarise_lungs(maps, [mask] * 4)
    assert summary["images"] == 4 and summary["empty_maps"] == 1
    assert summary["energy_in_lungs"] == pytest.approx((1 + 0 + mask.mean()) / 3)
    assert summary["uniform_energy"] == pytest.approx(mask.mean())
    assert summary["pointing"] == 0.25
    assert summary["peak_in_central_fifth"] == pytest.approx(1 / 3)
    low, high = summary["energy_in_lungs_ci"]
    assert 0 <= low <= summary["energy_in_lungs"] <= high <= 1
    assert summary["pointing_ci"][0] <= 0.25 <= summary["pointing_ci"][1]
    with pytest.raises(ValueError, match="4 maps but 1 masks"):
        summarise_lungs(maps, [mask])


def test_summarise_boxes_uses_the_union_of_each_image_s_boxes():
    shape, cell = (56, 56), 8
    boxes = [(4, 4, 8, 8), (40, 30, 8, 8)]  # two opacities
    maps = [
        delta(shape, 34, 44),  # inside the second box
        delta(shape, 19, 19),  # 8 px below-right of the first box (pixels 4..11): within one cell
        delta(shape, 50, 20),  # far from both
        np.zeros(shape),
    ]
    summary = summarise_boxes(maps, [boxes] * 4, cell_px=cell)
    assert summary["images"] == 4 and summary["empty_maps"] == 1
    assert summary["pointing"] == 0.25
    assert summary["pointing_within_one_cell"] == 0.5
    assert summary["energy_in_box"] == pytest.approx(1 / 3)
    assert summary["box_area_share"] == pytest.approx(128 / 56**2)
    with pytest.raises(ValueError, match="no boxes"):
        summarise_boxes([delta(shape, 1, 1)], [[]], cell_px=cell)
