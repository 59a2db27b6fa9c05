"""Input gate: refuse images that are not chest X-rays before giving a verdict (numpy + Pillow only).

Two checks, both cheap and both usable by the torch-free edge runner:

1. ``check_image``: on the decoded image, before the grey conversion. Colour photos, screenshots with
   colour and blank frames are refused here.
2. ``check_features``: on the model's pooled features (mean over H, W of ``model.features(x)``), a
   probabilistic-PCA Mahalanobis distance to the training X-rays (Tipping & Bishop 1999): the first
   ``k`` principal directions are scaled by their own variance, the rest by the average left-over
   variance. Documents, natural scenes, noise and the like land far away.

    gate = InputGate.load("pneunet/weights/pneunet.gate.safetensors")
    gate.check_image(decoded_image)            # raises NotAnXrayError
    gate.check_features(pooled)                # pooled: (C,) or (N, C); raises NotAnXrayError

Parameters are fitted by ``python -m training.fit_gate --checkpoint CKPT`` (train features; threshold on
validation X-rays) and measured by ``python -m training.gate_report`` (writes docs/gate_report.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pneunet.preprocessing import InvalidImageError

REFUSAL_ADVICE = "Please upload a frontal chest X-ray (JPEG, PNG or DICOM)."


class NotAnXrayError(InvalidImageError):
    """The image decoded fine but does not look like a chest X-ray; the message says why."""


def gate_path_for(checkpoint: str | Path) -> Path:
    """Where a checkpoint's gate lives: ``pneunet.safetensors`` -> ``pneunet.gate.safetensors``."""
    return Path(checkpoint).with_suffix(".gate.safetensors")


def colourfulness(image: Image.Image | np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an image on its 128 px thumbnail: 0 for grey, ~15 for
    muted photos, 50+ for vivid ones. JPEG chroma noise on a grey X-ray stays below ~2."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image)) if image.dtype == np.uint8 else None
        if image is None:
            return 0.0  # non-8-bit arrays are grey by construction in preprocessing
    if image.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return 0.0  # L, LA, I;16, F, 1: grey modes carry no colour
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((128, 128))
    rgb = np.asarray(thumbnail, dtype=np.float32)
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.hypot(red_green.std(), yellow_blue.std())
    offset = np.hypot(red_green.mean(), yellow_blue.mean())
    return float(spread + 0.3 * offset)


def grey_spread(image: Image.Image) -> float:
    """Standard deviation of the grey levels (0..255) of a 128 px thumbnail: ~0 for a blank frame."""
    thumbnail = image.convert("L")
    thumbnail.thumbnail((128, 128))
    return float(np.asarray(thumbnail, dtype=np.float32).std())


@dataclass
class InputGate:
    """Fitted gate parameters; ``threshold`` applies to ``distance`` (larger = less like an X-ray)."""

    mean: np.ndarray  # (C,) mean pooled feature of the training X-rays
    components: np.ndarray  # (k, C) principal directions
    variances: np.ndarray  # (k,) variance along each direction
    residual_variance: float  # average variance of the C - k directions left out
    threshold: float  # distance above which an image is refused
    max_colourfulness: float = 12.0
    min_grey_spread: float = 4.0

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        """Per-image PPCA Mahalanobis distance, divided by sqrt(C) so typical X-rays score ~1."""
        pooled = np.atleast_2d(np.asarray(pooled, dtype=np.float64))
        centred = pooled - self.mean
        projected = centred @ self.components.T
        residual = np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1)
        squared = np.sum(projected**2 / self.variances, axis=1) + np.maximum(residual, 0) / self.residual_variance
        return np.sqrt(squared / pooled.shape[1])

    def image_refusal(self, image: Image.Image) -> str | None:
        """Why the decoded image is refused before the model runs, or None."""
        colour = colourfulness(image)
        if colour > self.max_colourfulness:
            return f"this looks like a colour picture (colourfulness {colour:.0f}), not a chest X-ray. {REFUSAL_ADVICE}"
        spread = grey_spread(image)
        if spread < self.min_grey_spread:
            return f"the image is blank (almost one grey level), not a chest X-ray. {REFUSAL_ADVICE}"
        return None

    def feature_refusal(self, distance: float) -> str | None:
        """Why an image with this feature distance is refused, or None."""
        if distance > self.threshold:
            return (f"this does not look like a chest X-ray to the model (distance {distance:.2f} from the training "
                    f"X-rays, limit {self.threshold:.2f}). {REFUSAL_ADVICE}")
        return None

    def check_image(self, image: Image.Image) -> None:
        reason = self.image_refusal(image)
        if reason:
            raise NotAnXrayError(reason)

    def check_features(self, pooled: np.ndarray) -> None:
        for distance in self.distance(pooled):
            reason = self.feature_refusal(float(distance))
            if reason:
                raise NotAnXrayError(reason)

    # ------------------------------------------------------------------------------------ storage

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """safetensors (numpy, no pickle): float32 arrays; scalars and provenance in the header."""
        from safetensors.numpy import save_file

        scalars = {"residual_variance": self.residual_variance, "threshold": self.threshold,
                   "max_colourfulness": self.max_colourfulness, "min_grey_spread": self.min_grey_spread}
        header = {"gate": json.dumps(scalars), "provenance": json.dumps(metadata or {})}
        arrays = {"mean": self.mean, "components": self.components, "variances": self.variances}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "InputGate":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no input gate; fit one with python -m training.fit_gate --checkpoint CKPT")
        with safe_open(str(path), framework="numpy") as handle:
            scalars = json.loads(handle.metadata()["gate"])
            arrays = {key: handle.get_tensor(key).astype(np.float64) for key in ("mean", "components", "variances")}
        return cls(**arrays, **scalars)

    @classmethod
    def fit(cls, pooled: np.ndarray, dims: int = 64) -> "InputGate":
        """PCA of (N, C) training features; ``threshold`` is left at infinity for ``calibrate``."""
        pooled = np.asarray(pooled, dtype=np.float64)
        mean = pooled.mean(axis=0)
        _, singular, vt = np.linalg.svd(pooled - mean, full_matrices=False)
        eigenvalues = singular**2 / (len(pooled) - 1)
        dims = min(dims, len(eigenvalues) - 1)
        left_over = eigenvalues[dims:].sum() / max(pooled.shape[1] - dims, 1)
        floor = 1e-6 * eigenvalues[0]  # keeps the distance finite for directions with (almost) no spread
        return cls(mean, vt[:dims], np.maximum(eigenvalues[:dims], floor), float(max(left_over, floor)), float("inf"))

    def calibrate(self, pooled_xrays: np.ndarray, quantile: float = 0.995, margin: float = 1.1) -> float:
        """Set ``threshold`` to ``margin`` x the ``quantile`` of held-out X-rays' distances; returns it."""
        self.threshold = float(margin * np.quantile(self.distance(pooled_xrays), quantile))
        return self.threshold
