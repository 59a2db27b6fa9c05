"""Lung fields, torch-free (numpy + Pillow): the segmenter's input, its mask, and what the classifier sees.

Every front (training, evaluation, app, CLI, edge) runs the same steps on the unit image from
``pneunet.preprocessing.to_unit``:

    finder = LungFinder.load("pneunet/weights/pneunet.lungs.onnx")   # the segmenter's ONNX export
    fields = finder.find(unit)                      # LungFields: mask, region, probability, plausible
    masked = suppress_outside(unit, fields.region)  # markers, text, tubes beyond the thorax go dark

``LungFinder`` runs the segmenter's fp32 ONNX export on onnxruntime everywhere (training included), so
every front gets the same mask for the same image; ``segmenter_input`` and ``lung_fields`` are its two
halves for callers that run the network themselves (the torch model while it trains).

``lung_config`` is a ``LungConfig`` that travels with the segmenter's weights. When the segmenter finds
no plausible pair of lungs, ``lung_fields`` falls back to the population template recorded in the
config and says so (``plausible`` False, ``reason`` set): the image is still scored, never silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from pneunet.heatmap import upsample_bilinear
from pneunet.config import ModelConfig, check_known_fields
from pneunet.integrity import ModelFileError, sha256_of
from pneunet.preprocessing import ImageSource, normalize, to_unit


@dataclass
class LungConfig:
    """The lung-field segmenter's input size, architecture and the rule that turns its output into a region."""

    input_size: int = 128
    base_channels: int = 8
    depth: int = 4
    threshold: float = 0.5  # on the sigmoid of the segmenter's logit
    margin_px: int = 8  # the region kept for the classifier: lungs dilated by this many px at 224
    # Plausible lungs: total area share of the image, and each half of the image holding some lung.
    min_area_share: float = 0.08
    max_area_share: float = 0.70
    min_side_share: float = 0.015
    # Fallback when no plausible lungs are found: the mean training mask at 32x32, thresholded at 0.5.
    template: list[list[int]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LungConfig":
        check_known_fields(cls, values, "lung config")
        return cls(**values)


@dataclass
class LungFields:
    mask: np.ndarray  # (H, W) bool, the lungs as segmented (or the template when not plausible)
    region: np.ndarray  # (H, W) float32 in [0, 1]: lungs dilated by the margin, soft edge; 0 outside
    probability: np.ndarray  # (H, W) float32, the segmenter's lung probability
    plausible: bool
    reason: str | None = None  # why the lungs were not plausible (None when they were)

    @property
    def area_share(self) -> float:
        return float(self.mask.mean())


def _resize_float(values: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(values, dtype=np.float32)).resize((size, size), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def segmenter_input(unit: np.ndarray, config: LungConfig) -> np.ndarray:
    """Unit image (H, W) in [0, 1] -> (1, s, s) float32 segmenter input, centred at 0.5."""
    return (_resize_float(unit, config.input_size) - np.float32(0.5))[None] / np.float32(0.25)


def plausibility_problem(mask: np.ndarray, config: LungConfig) -> str | None:
    """Why ``mask`` is not a plausible pair of lungs on a frontal film, or None when it is."""
    share = float(mask.mean())
    if share < config.min_area_share:
        return f"the lung fields found cover {share:.0%} of the image (expected at least {config.min_area_share:.0%})"
    if share > config.max_area_share:
        return f"the lung fields found cover {share:.0%} of the image (expected at most {config.max_area_share:.0%})"
    half = mask.shape[1] // 2
    for side, part in (("left", mask[:, :half]), ("right", mask[:, half:])):
        if float(part.sum()) / mask.size < config.min_side_share:
            return f"no lung field was found in the {side} half of the image"
    return None


def template_mask(config: LungConfig, shape: tuple[int, int]) -> np.ndarray:
    template = np.asarray(config.template, dtype=np.float32)
    if template.size == 0:  # no template recorded: keep the whole image
        return np.ones(shape, dtype=bool)
    return upsample_bilinear(template, shape) >= 0.5


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a (H, W) bool mask by a (2r+1)-square: separable, each axis a window sum over a
    cumulative sum (O(pixels), whatever the radius)."""
    out = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return out.copy()
    for axis in (0, 1):
        length = out.shape[axis]
        cumulative = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis), dtype=np.int32),
                                     np.cumsum(out, axis=axis, dtype=np.int32)], axis=axis)
        index = np.arange(length)
        high = np.take(cumulative, np.minimum(index + radius + 1, length), axis=axis)
        low = np.take(cumulative, np.maximum(index - radius, 0), axis=axis)
        out = high > low
    return out


def region_from_mask(mask: np.ndarray, margin_px: int) -> np.ndarray:
    """Dilate a (H, W) bool mask by ``margin_px`` and soften its edge a little (Gaussian blur), so the
    lung borders (costophrenic angles, pleura) stay in view; float32 in [0, 1]."""
    image = Image.fromarray(dilate(mask, margin_px).astype(np.uint8) * 255)
    if margin_px > 0:
        image = image.filter(ImageFilter.GaussianBlur(margin_px / 3))
    return np.asarray(image, dtype=np.float32) / 255.0


def lung_fields(seg_logits: np.ndarray, shape: tuple[int, int], config: LungConfig) -> LungFields:
    """The segmenter's (s, s) logits -> ``LungFields`` over an image of ``shape`` (the unit image's)."""
    # Pillow's bilinear resize, not a BLAS product: tiny matrix products fight over the cores (measured 5x
    # slower on 2 busy cores), and the mask needs no bit-exact twin in torch.
    logits = Image.fromarray(np.asarray(seg_logits, dtype=np.float32).reshape(config.input_size, config.input_size))
    logits = np.asarray(logits.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    probability = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    mask = probability >= config.threshold
    problem = plausibility_problem(mask, config)
    if problem is not None:
        mask = template_mask(config, shape)
    return LungFields(mask, region_from_mask(mask, config.margin_px), probability, problem is None, problem)


def suppress_outside(unit: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The classifier's view: the unit image inside the lung region, black outside."""
    return (np.asarray(unit, dtype=np.float32) * region).astype(np.float32)


def lung_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the one-pixel border of a mask (for drawing the lung outline over an image)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def lungs_path_for(checkpoint: str | Path) -> Path:
    """Where a classifier checkpoint's lung-field segmenter lives: ``<stem>.lungs.onnx`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".lungs.onnx")


class LungFileError(ModelFileError):
    """The segmenter's ONNX file or its sidecar is missing or does not match its recorded sha256."""


class LungFinder:
    """The lung-field segmenter's ONNX export on onnxruntime (CPU): unit image(s) -> ``LungFields``.

    The sidecar ``<file>.json`` (written by ``training.train_lungs``) holds the ``LungConfig`` and the
    ONNX file's sha256, checked at load."""

    def __init__(self, onnx_path: str | Path, config: LungConfig, threads: int = 1):
        self.onnx_path, self.config, self.threads = Path(onnx_path), config, threads
        self._session, self._pid = None, None

    @classmethod
    def load(cls, onnx_path: str | Path, threads: int = 1) -> "LungFinder":
        onnx_path = Path(onnx_path)
        sidecar = onnx_path.with_suffix(".json")
        if not onnx_path.is_file() or not sidecar.is_file():
            raise LungFileError(f"{onnx_path}: lung-field segmenter missing (an .onnx file plus its .json sidecar)")
        values = json.loads(sidecar.read_text())
        recorded = values.get("onnx_sha256")
        if recorded != sha256_of(onnx_path):
            raise LungFileError(f"{onnx_path}: sha256 does not match the one recorded in {sidecar.name}; the file is damaged or was changed")
        return cls(onnx_path, LungConfig.from_dict(values["config"]), threads)

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        if self._session is None or self._pid != os.getpid():  # a forked data-loader worker opens its own
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = onnxruntime.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
            self._pid = os.getpid()
        return self._session.run(None, {self._session.get_inputs()[0].name: inputs})[0]

    def find_batch(self, units: np.ndarray) -> list[LungFields]:
        """(N, H, W) unit images -> their lung fields."""
        units = np.asarray(units, dtype=np.float32)
        logits = self._run(np.stack([segmenter_input(unit, self.config) for unit in units]).astype(np.float32))
        return [lung_fields(l, unit.shape, self.config) for l, unit in zip(logits, units)]

    def find(self, unit: np.ndarray) -> LungFields:
        return self.find_batch(np.asarray(unit)[None])[0]


def model_view(source: ImageSource, config: ModelConfig, lungs: LungFinder | None) -> tuple[np.ndarray, LungFields | None]:
    """The one path from an image to the classifier's input: ``to_unit``, the lung fields (when the model
    has a segmenter) with everything outside them dark, ``normalize``."""
    unit = to_unit(source, config)
    if lungs is None:
        return normalize(unit, config), None
    fields = lungs.find(unit)
    return normalize(suppress_outside(unit, fields.region), config), fields
