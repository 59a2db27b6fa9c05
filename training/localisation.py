"""Where a heatmap's evidence sits: share of mass inside the lung fields or boxes, and the pointing game.

Maps are non-negative float arrays (H, W): the ReLU'd raw evidence, BEFORE any lung masking (a masked
map would score 100 % by construction). Masks are bool (H, W); boxes are (x, y, w, h) in pixels, top-left
origin, as in a CSV of radiologist boxes. Numpy only:

    summary = summarise_lungs(maps, masks); boxes = summarise_boxes(maps, boxes_per_image, cell_px=32)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # x, y, w, h


def _check(heat: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2:
        raise ValueError(f"a heatmap must be (H, W), got shape {heat.shape}")
    if shape is not None and heat.shape != tuple(shape):
        raise ValueError(f"heatmap shape {heat.shape} differs from the mask's {tuple(shape)}")
    if heat.size and heat.min() < 0:
        raise ValueError(f"heatmap has negative values (min {heat.min():.3g}): pass the ReLU'd evidence map")
    return heat


def _peak(heat: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the maximum (first on ties), or None for an all-zero map."""
    if not heat.size or heat.max() <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


def energy_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass inside ``mask`` (nan for an all-zero map); a uniform map scores
    ``mask.mean()``."""
    mask = np.asarray(mask, dtype=bool)
    heat = _check(heat, mask.shape)
    total = heat.sum()
    return float(heat[mask].sum() / total) if total > 0 else math.nan


def points_into(heat: np.ndarray, mask: np.ndarray) -> bool:
    """The map's peak lies inside ``mask`` (an all-zero map is a miss)."""
    mask = np.asarray(mask, dtype=bool)
    peak = _peak(_check(heat, mask.shape))
    return peak is not None and bool(mask[peak])


def _box_pixels(box: Box) -> tuple[int, int, int, int]:
    """Inclusive (first row, last row, first col, last col) of the pixels whose centres fall in the box."""
    x, y, w, h = box
    return math.ceil(y - 0.5), math.ceil(y + h - 0.5) - 1, math.ceil(x - 0.5), math.ceil(x + w - 0.5) - 1


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Bool (H, W): pixels whose centres fall inside the box (clipped to the image)."""
    mask = np.zeros(shape, dtype=bool)
    row0, row1, col0, col1 = _box_pixels(box)
    mask[max(row0, 0):max(row1 + 1, 0), max(col0, 0):max(col1 + 1, 0)] = True
    return mask


def points_near_box(heat: np.ndarray, box: Box, tolerance_px: int) -> bool:
    """The map's peak is within ``tolerance_px`` pixels (Chebyshev) of the box's pixels; 0 = inside."""
    peak = _peak(_check(heat))
    row0, row1, col0, col1 = _box_pixels(box)
    if peak is None or row1 < row0 or col1 < col0:
        return False
    row, col = peak
    distance = max(row0 - row, row - row1, col0 - col, col - col1, 0)
    return distance <= tolerance_px


def bootstrap_mean_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (resampling images); nan for no values."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return math.nan, math.nan
    means = values[np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@dataclass(frozen=True)
class LocalisationSummary:
    """Lung-field localisation over a set of maps; ``summarise_lungs`` returns it as a dict."""

    images: int
    empty_maps: int  # all-zero maps: no energy (excluded from the energy means), a miss for pointing
    energy_in_lungs: float  # mean share of map mass inside the lung mask
    energy_in_lungs_ci: tuple[float, float]
    uniform_energy: float  # what a uniform map would score: the mean lung area share (same images)
    pointing: float  # share of peaks inside the lungs
    pointing_ci: tuple[float, float]
    peak_in_central_fifth: float  # share of peaks (non-empty maps) in the central fifth of the width


def _central_fifth(peak: tuple[int, int], width: int) -> bool:
    centre = peak[1] + 0.5
    return 2 * width / 5 <= centre < 3 * width / 5


def summarise_lungs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict:
    """Energy in the lung fields (vs a uniform map's), pointing game and central-peak share."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    energies, areas, hits, central = [], [], [], []
    for heat, mask in zip(maps, masks):
        mask = np.asarray(mask, dtype=bool)
        heat = _check(heat, mask.shape)
        peak = _peak(heat)
        hits.append(peak is not None and bool(mask[peak]))
        if peak is not None:
            energies.append(energy_in_mask(heat, mask))
            areas.append(float(mask.mean()))
            central.append(_central_fifth(peak, heat.shape[1]))
    summary = LocalisationSummary(
        images=len(maps), empty_maps=len(maps) - len(energies),
        energy_in_lungs=_mean(energies), energy_in_lungs_ci=bootstrap_mean_ci(np.array(energies)),
        uniform_energy=_mean(areas), pointing=_mean(hits), pointing_ci=bootstrap_mean_ci(np.array(hits, dtype=float)),
        peak_in_central_fifth=_mean(central),
    )
    return asdict(summary)


def summarise_boxes(maps: Sequence[np.ndarray], boxes_per_image: Sequence[Sequence[Box]], cell_px: int) -> dict:
    """Pointing game against radiologist boxes (the union of each image's boxes): peak inside a box,
    peak within ``cell_px`` (one feature-map cell) of a box, energy in the boxes and their area share."""
    if len(maps) != len(boxes_per_image):
        raise ValueError(f"{len(maps)} maps but {len(boxes_per_image)} box lists")
    hits, near, energies, areas = [], [], [], []
    for index, (heat, boxes) in enumerate(zip(maps, boxes_per_image)):
        if not boxes:
            raise ValueError(f"image {index} has no boxes: pass only images with at least one box")
        heat = _check(heat)
        union = np.logical_or.reduce([box_mask(heat.shape, box) for box in boxes])
        hits.append(any(points_near_box(heat, box, 0) for box in boxes))
        near.append(any(points_near_box(heat, box, cell_px) for box in boxes))
        if _peak(heat) is not None:
            energies.append(energy_in_mask(heat, union))
            areas.append(float(union.mean()))
    return {
        "images": len(maps), "empty_maps": len(maps) - len(energies),
        "pointing": _mean(hits), "pointing_ci": bootstrap_mean_ci(np.array(hits, dtype=float)),
        "pointing_within_one_cell": _mean(near),
        "energy_in_box": _mean(energies), "energy_in_box_ci": bootstrap_mean_ci(np.array(energies)),
        "box_area_share": _mean(areas),
    }
