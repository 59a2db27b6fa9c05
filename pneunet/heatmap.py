"""Heatmaps in numpy, no torch: the gradient-free class activation map from a last feature map,
upsampled to the input size and scaled to [0, 1].

This is what the edge runner computes from an exported model's feature map; ``pneunet.cam`` computes
the same map in torch (``class_activation_map``) and the tests pin the two together.

    heat = heatmap_from_features(features, weight, size=(224, 224))   # features (C, h, w), weight (C,)
"""

from __future__ import annotations

import numpy as np


def cam_from_features(features: np.ndarray, weight: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """Gradient-free CAM on one (C, h, w) feature map, before upsampling: ReLU(sum_c sign * w_c * F_c).
    ``sign`` = -1 explains the normal class."""
    return np.maximum(np.tensordot(sign * np.asarray(weight), np.asarray(features), axes=(0, 0)), 0.0)


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
