"""Heatmaps in numpy, no torch: the gradient-free class activation map from a last feature map,
upsampled to the input size and scaled to [0, 1].

This is what the edge runner computes from an exported model's feature map; ``pneunet.cam`` computes
the same map in torch (``class_activation_map``) and the tests pin the two together.

    heat = heatmap_from_features(features, weight, size=(224, 224))   # features (C, h, w), weight (C,)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def cam_from_features(features: np.ndarray, weight: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """Gradient-free CAM on one (C, h, w) feature map, before upsampling: ReLU(sum_c sign * w_c * F_c).
    ``sign`` = -1 explains the normal class."""
    return np.maximum(np.tensordot(sign * np.asarray(weight), np.asarray(features), axes=(0, 0)), 0.0)


@lru_cache(maxsize=32)  # a few fixed sizes (7 -> 224, 128 -> 224, ...): build each matrix once
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) interpolation weights with torch's ``F.interpolate(mode="bilinear", align_corners=False)``
    rule (half-pixel centres, clamped at the border, no antialiasing), so edge and app maps agree."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    fraction = source - low
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - fraction)
    np.add.at(matrix, (np.arange(out_size), high), fraction)
    matrix.flags.writeable = False
    return matrix


def upsample_bilinear(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> ``size`` (H, W), bilinear as in torch with ``align_corners=False``."""
    rows = _bilinear_matrix(cam.shape[0], size[0])
    columns = _bilinear_matrix(cam.shape[1], size[1])
    return rows @ np.asarray(cam, dtype=np.float64) @ columns.T


def normalise_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ReLU, upsample an (h, w) map to ``size`` and scale it to [0, 1] (all zeros stays all zeros)."""
    heat = upsample_bilinear(np.maximum(cam, 0.0), size)
    return (heat / max(float(heat.max()), 1e-12)).astype(np.float32)


def heatmap_from_features(features: np.ndarray, weight: np.ndarray, size: tuple[int, int], sign: float = 1.0) -> np.ndarray:
    """(C, h, w) feature map + classifier weight (C,) -> (H, W) heatmap in [0, 1] over the model input."""
    return normalise_map(cam_from_features(features, weight, sign), size)


# ------------------------------------------------------------------ absolute evidence maps (one scale for every image)


def evidence_cells(features: np.ndarray, weight: np.ndarray, temperature: float, sign: float = 1.0) -> np.ndarray:
    """Each feature-map cell's contribution to the calibrated logit: for a global-average-pooling + linear
    head, logit / T = bias / T + sum over cells of (w . F[:, i, j]) / (h * w * T). (C, h, w) -> (h, w),
    signed (negative cells speak for the other class); ``sign`` = -1 explains the normal class."""
    features = np.asarray(features, dtype=np.float64)
    cells = features.shape[1] * features.shape[2]
    return sign * np.tensordot(np.asarray(weight, dtype=np.float64), features, axes=(0, 0)) / (cells * float(temperature))


def evidence_map(features: np.ndarray, weight: np.ndarray, temperature: float, size: tuple[int, int],
                 sign: float = 1.0) -> np.ndarray:
    """The raw evidence map over the model input: ``evidence_cells`` upsampled bilinearly to ``size``, before
    any lung masking (what localisation metrics and ``--heatmaps`` audits read). float32, signed."""
    return upsample_bilinear(evidence_cells(features, weight, temperature, sign), size).astype(np.float32)


def target_sign(target: str) -> float:
    """+1 explains the pneumonia class, -1 the normal class."""
    if target not in ("pneumonia", "normal"):
        raise ValueError(f"unknown CAM target {target!r}; use 'pneumonia' or 'normal'")
    return 1.0 if target == "pneumonia" else -1.0


def evidence_and_shown(features: np.ndarray, weight: np.ndarray, config, target: str,
                       lung_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(raw evidence map, shown map) of one (C, h, w) feature map for ``target``, on ``config``'s temperature
    and evidence scale: what the app, the CLI and the edge runner all compute."""
    size = (config.image_size, config.image_size)
    evidence = evidence_map(features, weight, config.temperature, size, target_sign(target))
    return evidence, display_map(evidence, lung_mask, config.evidence_scale)


def display_map(evidence: np.ndarray, lung_mask: np.ndarray | None, scale: float) -> np.ndarray:
    """What a person sees: positive evidence inside the lung fields on the model's fixed scale, [0, 1]
    (1 = ``scale`` or more). A normal film's map stays cool instead of stretching its hottest speck to red."""
    heat = np.clip(np.asarray(evidence, dtype=np.float32) / np.float32(scale), 0.0, 1.0)
    return heat * lung_mask if lung_mask is not None else heat
