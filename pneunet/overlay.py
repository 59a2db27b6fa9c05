"""Heatmap overlays as images (numpy + Pillow only, shared by the CLI, the app and the edge runner)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered "turbo"-like ramp: dark blue -> cyan -> yellow -> red.
_RAMP = np.array([[48, 18, 59], [40, 120, 240], [30, 210, 200], [160, 250, 60], [250, 190, 40], [220, 60, 20], [122, 4, 3]],
                 dtype=np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    position = np.clip(heatmap, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def overlay_heatmap(grey: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """Blend a square model-input heatmap over the original grey image at the image's own size and
    aspect ratio (the model saw it squashed to a square, so the map is stretched back the same way).
    Colour shows only where the map is warm, so the anatomy stays readable elsewhere."""
    width, height = grey.size
    heat = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR),
                      dtype=np.float32) / 255.0
    base = np.asarray(grey.convert("RGB"), dtype=np.float32)
    alpha = (opacity * np.clip(heat * 1.5, 0, 1))[..., None]
    blended = base * (1 - alpha) + colorize(heat).astype(np.float32) * alpha
    return Image.fromarray(blended.round().astype(np.uint8))
