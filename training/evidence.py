"""Where a model's evidence sits, measured on what the model is served (``pneunet.lungs.model_view``).

``training.evaluate`` runs all of it for every model, old (whole image) and new (lung fields only):

    scored = score_images(model, config, images, lungs, device, with_maps=True)    # probabilities + maps
    summarise_lungs(positive(scored.maps), masks); summarise_boxes(positive(maps), boxes, cell_px)
    probe_rows(model, config, images, lungs, device, scored.probabilities)          # shortcut probe
    contact_sheet(panels, "overlays.png")                                           # what a person sees

The maps measured are the RAW evidence maps (``pneunet.heatmap.evidence_map``: each feature cell's
contribution to the calibrated pneumonia logit, upsampled, before any lung masking — a masked map would
score 100 % in the lungs by construction), ReLU'd. A model whose head is not pooling + linear has no such
map; it is measured on its Grad-CAM map (``pneunet.cam.GradCAM``), and ``Scored.map_kind`` says so.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from pneunet.cam import GradCAM
from pneunet.config import ModelConfig
from pneunet.decision import calibrated_probability
from pneunet.heatmap import evidence_map
from pneunet.lungs import LungFields, LungFinder, model_view
from pneunet.models import PneuNetModel
from pneunet.predictor import Predictor
from pneunet.torch_backend import TorchBackend
from pneunet.overlay import overlay_heatmap
from pneunet.datasets import Example
from training.data import XrayDataset
from training.localisation import Box
from training.shortcuts import shortcut_probe

EVIDENCE_MAP = "raw evidence (pneumonia target, calibrated-logit contribution per cell), ReLU'd, before lung masking"
GRAD_CAM_MAP = "Grad-CAM (pneumonia target; the head is not pooling + linear, so no evidence map), before lung masking"


@dataclass
class Scored:
    """A model's answers on a list of images, through the path it is served."""

    probabilities: np.ndarray  # (N,) calibrated pneumonia probability
    maps: np.ndarray | None  # (N, size, size) float32: signed raw evidence (or Grad-CAM), None when not asked
    map_kind: str  # EVIDENCE_MAP or GRAD_CAM_MAP
    feature_side: int  # side of the last feature map (7 for 224 px), one cell = image_size / feature_side px


def _classifier_weight(model: PneuNetModel) -> np.ndarray:
    return model.head[-1].weight.detach().float().cpu().numpy()[0]


def _batch_maps(model: PneuNetModel, config: ModelConfig, batch: torch.Tensor,
                with_maps: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(logits (N,), raw maps (N, H, W) or None, feature side) of one batch."""
    size = tuple(batch.shape[-2:])
    if model.pooled_linear or not with_maps:
        with torch.inference_mode():
            features = model.features(batch)
            logits = model.head(features).squeeze(-1)
        side = int(features.shape[-1])
        if not with_maps:
            return logits.float().cpu().numpy().reshape(-1), None, side
        feature_maps = features.float().cpu().numpy()
        weight = _classifier_weight(model)
        maps = np.stack([evidence_map(f, weight, config.temperature, size) for f in feature_maps])
        return logits.float().cpu().numpy().reshape(-1), maps, side
    with GradCAM(model) as grad_cam:
        maps, logits = grad_cam(batch, "pneumonia")
        side = int(grad_cam.features.shape[-1])
    return logits.float().cpu().numpy().reshape(-1), maps.float().cpu().numpy(), side


def score_images(model: PneuNetModel, config: ModelConfig, images: Sequence[Image.Image], lungs: LungFinder | None,
                 device: torch.device, with_maps: bool = False, batch_size: int = 32) -> Scored:
    """Calibrated probabilities (and, with ``with_maps``, the raw maps) of grey PIL images, through
    ``XrayDataset`` with the model's lung finder: what the model is served."""
    loader = DataLoader(XrayDataset(list(images), [0] * len(images), config, lungs=lungs), batch_size=batch_size)
    logits, maps, side = [], [], 0
    for batch, _ in loader:
        batch_logits, batch_maps, side = _batch_maps(model, config, batch.to(device, memory_format=torch.channels_last),
                                                        with_maps)
        logits.append(batch_logits)
        if batch_maps is not None:
            maps.append(batch_maps.astype(np.float32))
    probabilities = calibrated_probability(np.concatenate(logits), config.temperature)
    return Scored(probabilities, np.concatenate(maps) if with_maps else None,
                  EVIDENCE_MAP if model.pooled_linear else GRAD_CAM_MAP, side)


def positive(maps: np.ndarray) -> list[np.ndarray]:
    """The ReLU'd maps, as ``training.localisation`` wants them."""
    return [np.maximum(m, 0.0) for m in maps]


# ------------------------------------------------------------------ reference masks and boxes


def kermany_mask(masks_dir: Path, example: Example, size: int) -> np.ndarray | None:
    """The human-reviewed lung mask of a Kermany image (``kermany224_lungs/<path>.png``, 255 = lung) at the
    model's input size, or None when the image has none. Validation images are carved from train, so their
    masks are under train/ too — exactly their image paths."""
    path = Path(masks_dir) / Path(example.path).with_suffix(".png")
    if not path.is_file():
        return None
    mask = Image.open(path).convert("L")
    if mask.size != (size, size):  # squashed like the image, so a plain resize keeps the correspondence
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(mask) >= 128


def read_pneumonia_boxes(nih_dir: Path, image_size: int) -> dict[str, list[Box]]:
    """nih_adult224's radiologist "Pneumonia" boxes per image path (relative to ``nih_dir``), scaled from
    224 px to ``image_size`` (the images are squashed to a square, so both axes scale alike)."""
    scale = image_size / 224
    boxes: dict[str, list[Box]] = {}
    with open(Path(nih_dir) / "boxes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["finding"] == "Pneumonia":
                boxes.setdefault(row["path"], []).append(
                    tuple(float(row[k]) * scale for k in ("x", "y", "w", "h")))  # type: ignore[arg-type]
    return boxes


def lung_field_check(images: Sequence[Image.Image], config: ModelConfig, lungs: LungFinder) -> dict:
    """How many images got no plausible lung fields (``LungFields.plausible`` False: the classifier then
    saw the population template), and why, through ``model_view`` like every front."""
    fields = [model_view(image, config, lungs)[1] for image in images]
    reasons = Counter(f.reason for f in fields if not f.plausible)
    implausible = sum(reasons.values())
    return {"images": len(fields), "implausible": implausible, "implausible_share": implausible / max(1, len(fields)),
            "reasons": dict(reasons.most_common()),
            "mean_lung_area_share": float(np.mean([f.area_share for f in fields])) if fields else None}


# ------------------------------------------------------------------ shortcut probe


def probe_rows(model: PneuNetModel, config: ModelConfig, images: list[Image.Image], lungs: LungFinder | None,
               device: torch.device, probabilities: np.ndarray | None = None, seed: int = 0) -> dict[str, dict]:
    """``training.shortcuts.shortcut_probe`` with the model's own path (lung fields, temperature, stored
    threshold): variant -> {images, flipped, flip_rate, mean_abs_delta, max_abs_delta}. ``probabilities``,
    when given, are the unmodified images' (from the same path), reused instead of recomputed."""
    def predict(batch: list[Image.Image]) -> np.ndarray:
        if batch is images and probabilities is not None:
            return probabilities
        return score_images(model, config, batch, lungs, device).probabilities

    results = shortcut_probe(predict, images, config.threshold, seed)
    return {r.variant: {k: v for k, v in dataclasses.asdict(r).items() if k != "variant"} for r in results}


# ------------------------------------------------------------------ what a person sees


@dataclass
class Panel:
    overlay: Image.Image  # overlay_heatmap's output
    probability: float
    lungs: LungFields | None


def overlay_panels(model: PneuNetModel, config: ModelConfig, images: Sequence[Image.Image], lungs: LungFinder | None,
                   device: torch.device, boxes: Sequence[Sequence[Box]] | None = None) -> list[Panel]:
    """Each image as the app shows it: the app's own ``Predictor`` (lung fields, the shown map on the
    model's scale) -> ``overlay_heatmap``. With ``boxes`` (in model-input px), each image's boxes are drawn first."""
    predictor = Predictor(TorchBackend(model, config), None, lungs)
    size = (config.image_size, config.image_size)
    panels = []
    for index, image in enumerate(images):
        if model.pooled_linear:
            result = predictor.predict(image, heatmap=True, gate=False)
            heat = result.heatmap
        else:  # no class activation map from the feature map: Grad-CAM on the same model input
            result = predictor.predict(image, gate=False)
            model_input, _ = model_view(image, config, lungs)
            with GradCAM(model) as grad_cam:
                maps, _ = grad_cam(torch.from_numpy(model_input[None]).to(device), "pneumonia")
            heat = maps[0].detach().float().cpu().numpy()
        base = image.convert("RGB")
        if boxes is not None:
            base = draw_boxes(base, boxes[index], size)
        overlay = overlay_heatmap(base, heat, result.lungs, scale="fixed" if config.evidence_scale else "relative")
        panels.append(Panel(overlay, result.pneumonia_probability, result.lungs))
    return panels


def draw_boxes(image: Image.Image, boxes: Sequence[Box], model_size: tuple[int, int]) -> Image.Image:
    """A copy of ``image`` with ``boxes`` (x, y, w, h in model-input px) outlined in green at the image's size."""
    out = image.convert("RGB")
    sx, sy = image.width / model_size[1], image.height / model_size[0]
    draw = ImageDraw.Draw(out)
    for x, y, w, h in boxes:
        draw.rectangle([x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1], outline=(60, 255, 60),
                       width=max(1, round(min(image.size) / 160)))
    return out


def contact_sheet(panels: Sequence[Panel], captions: Sequence[str], path: Path, title: str, columns: int = 6,
                  wrong: Sequence[bool] | None = None) -> None:
    """A grid of overlays with a caption under each (red when ``wrong``), saved as ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(panels) // columns))
    aspect = panels[0].overlay.width / panels[0].overlay.height if panels else 1.0  # wider with a colour bar
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * aspect * columns, 2.55 * rows + 0.5), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for index, (panel, caption) in enumerate(zip(panels, captions)):
        axis = axes.ravel()[index]
        axis.imshow(np.asarray(panel.overlay))
        axis.set_title(caption, fontsize=7, color="crimson" if wrong is not None and wrong[index] else "black")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
