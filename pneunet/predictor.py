"""Predictor: image in, label + calibrated pneumonia probability (+ heatmap) out.

    from pneunet import load_predictor
    predictor = load_predictor()                 # the shipped model, loaded once
    result = predictor.predict("chest.jpeg", heatmap=True)
    result.label, result.pneumonia_probability, result.threshold, result.heatmap.shape

The checkpoint comes from one place: ``default_checkpoint()`` (``$PNEUNET_CHECKPOINT`` or the shipped
``pneunet/weights/pneunet.safetensors``). When ``<checkpoint>.gate.safetensors`` exists, ``predict``
refuses images that are not chest X-rays with ``NotAnXrayError`` (see ``pneunet.gate``).

A model trained on lung fields (``config.lungs`` set) loads its segmenter from ``<checkpoint>.lungs.onnx``
(``pneunet.lungs``): the classifier sees only the lung region, and the heatmap is the evidence map (each
region's contribution to the calibrated logit, ``pneunet.heatmap.evidence_map``) on the model's fixed
scale, shown inside the lung fields only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from pneunet.cam import GradCAM, cam_from_feature_map
from pneunet.checkpoint import load_checkpoint, sha256_of
from pneunet.config import ModelConfig
from pneunet.gate import GateFileError, InputGate, NotAnXrayError, gate_fitted_for, gate_path_for
from pneunet.heatmap import evidence_and_shown
from pneunet.integrity import sha256_of as file_sha256
from pneunet.lungs import LungFields, LungFileError, LungFinder, lungs_path_for, model_view
from pneunet.models import PneuNetModel
from pneunet.preprocessing import ImageSource, decode, load_grey

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "pneunet.safetensors"
CHECKPOINT_ENV = "PNEUNET_CHECKPOINT"


def default_checkpoint() -> Path:
    """The checkpoint everything loads by default: ``$PNEUNET_CHECKPOINT`` if set, else the shipped model."""
    return Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT)


@dataclass
class Prediction:
    label: str
    pneumonia_probability: float  # calibrated (temperature-scaled) probability
    threshold: float  # label is pneumonia when pneumonia_probability >= threshold
    logit: float  # raw model logit, before temperature
    heatmap: np.ndarray | None = None  # (image_size, image_size) in [0, 1], over the squashed input
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # every requested target -> map
    pooled_features: np.ndarray | None = None  # (C,) mean over H, W of model.features(x): the gate's input
    gate_distance: float | None = None  # input-gate distance (None without a gate)
    refusal: str | None = None  # why the input gate refuses this image, or None
    # The raw evidence map (calibrated-logit contribution, signed, before lung masking) per target.
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    lungs: LungFields | None = None  # the lung fields the classifier saw (None for a model without them)


class PreparedImage(NamedTuple):
    """A decoded upload that passed the image-level gate: grey at its own size, the model input, and the
    lung fields the model input was cut to (None for a model without them)."""

    grey: Image.Image
    model_input: np.ndarray  # (channels, size, size)
    lungs: LungFields | None = None


def load_lung_finder(checkpoint: Path, config: ModelConfig) -> LungFinder | None:
    """The segmenter a checkpoint was trained with (``config.lungs``), checked to be that very file."""
    if not config.lungs:
        return None
    path = lungs_path_for(checkpoint)
    finder = LungFinder.load(path)
    if file_sha256(path) != config.lungs.get("onnx_sha256"):
        raise LungFileError(f"{path}: not the lung-field segmenter {checkpoint.name} was trained with")
    return finder


class Predictor:
    def __init__(self, model: PneuNetModel, config: ModelConfig, gate: InputGate | None = None,
                 lungs: LungFinder | None = None):
        # channels_last: ~1.6x faster convolutions on CPU, same numbers.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.config = config
        self.gate = gate
        self.lungs = lungs
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str = "cpu", gate: bool = True) -> "Predictor":
        """Load a checkpoint (default: ``default_checkpoint()``) and, when ``gate`` and the file
        ``<checkpoint>.gate.safetensors`` exists, its input gate. Both are checked against the sha256
        recorded beside them (``CheckpointError`` / ``GateFileError`` naming the file when they differ)."""
        checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
        model, config = load_checkpoint(checkpoint, device=device)
        lungs = load_lung_finder(checkpoint, config)
        gate_file = gate_path_for(checkpoint)
        if not (gate and gate_file.is_file()):
            return cls(model, config, None, lungs)
        input_gate = InputGate.load(gate_file, verify=True)
        # A gate measures distances in one model's feature space: with another model it refuses X-rays.
        fitted_for = gate_fitted_for(gate_file)
        if fitted_for is not None and fitted_for != sha256_of(checkpoint):
            raise GateFileError(f"{gate_file}: fitted for another model (sha256 {fitted_for[:12]}...), not {checkpoint}; "
                                f"refit it with python -m training.fit_gate --checkpoint {checkpoint}")
        return cls(model, config, input_gate, lungs)

    def calibrated_probability(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / self.config.temperature))

    def _result(self, logit: float, maps: dict[str, np.ndarray], pooled: np.ndarray, evidence: dict[str, np.ndarray],
                lungs: LungFields | None) -> Prediction:
        probability = float(self.calibrated_probability(logit))
        label = self.config.labels[1] if probability >= self.config.threshold else self.config.labels[0]
        distance = refusal = None
        if self.gate is not None:
            distance = float(self.gate.distance(pooled)[0])
            refusal = self.gate.feature_refusal(distance)
        first = next(iter(maps.values())) if maps else None
        return Prediction(label, probability, float(self.config.threshold), float(logit), first, maps, pooled,
                          distance, refusal, evidence, lungs)

    def prepare(self, source: ImageSource) -> PreparedImage:
        """Decode, apply the image-level gate (colour, blank) and preprocess. Raises ``InvalidImageError``
        (``NotAnXrayError`` for a refused image) with a message for the person who gave the image."""
        decoded = decode(source)
        if self.gate is not None:
            self.gate.check_image(decoded)
        grey = load_grey(decoded)
        return PreparedImage(grey, *model_view(grey, self.config, self.lungs))

    def predict_inputs(self, inputs: np.ndarray, heatmap: bool = False, target: str | Sequence[str] = "pneumonia",
                       lungs: Sequence[LungFields | None] | None = None) -> list[Prediction]:
        """Predict on already-preprocessed inputs of shape (N, channels, size, size) (``model_view``), with
        the lung fields each was cut to (their masks bound the shown heatmaps). Never raises for the
        feature-level gate: a refused image has ``refusal`` set."""
        targets = [target] if isinstance(target, str) else list(target)
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        batch = batch.to(self.device, memory_format=torch.channels_last)
        size = tuple(batch.shape[-2:])
        maps: dict[str, torch.Tensor] = {}
        lungs = list(lungs) if lungs is not None else [None] * len(batch)
        evidence: dict[str, np.ndarray] = {}
        if not heatmap or self.model.pooled_linear:
            # One pass through the trunk gives the logits, the pooled features and the gradient-free CAM.
            with torch.inference_mode():
                features = self.model.features(batch)
                logits = self.model.head(features).squeeze(-1)
                if heatmap and self.config.evidence_scale:
                    evidence, maps_np = self._evidence_maps(features, targets, lungs)
                elif heatmap:
                    maps = {t: cam_from_feature_map(self.model, features, size, t) for t in targets}
        else:
            with GradCAM(self.model) as grad_cam:
                for t in targets:
                    maps[t], logits = grad_cam(batch, t)
                features = grad_cam.features
        pooled = features.float().mean(dim=(2, 3)).cpu().numpy()
        logits_np = logits.float().cpu().numpy().reshape(-1)
        if not evidence:
            maps_np = {t: m.float().cpu().numpy() for t, m in maps.items()}
        return [self._result(logit, {t: m[i] for t, m in maps_np.items()}, pooled[i],
                             {t: e[i] for t, e in evidence.items()}, lungs[i])
                for i, logit in enumerate(logits_np)]

    def _evidence_maps(self, features: torch.Tensor, targets: list[str],
                       lungs: list[LungFields | None]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(raw evidence maps, shown maps) per target, in numpy with the same functions as the edge runner."""
        weight = self.model.head[-1].weight.detach().float().cpu().numpy()[0]
        feature_maps = features.float().cpu().numpy()
        evidence, shown = {}, {}
        for t in targets:
            pairs = [evidence_and_shown(f, weight, self.config, t, None if l is None else l.mask)
                     for f, l in zip(feature_maps, lungs)]
            evidence[t], shown[t] = np.stack([e for e, _ in pairs]), np.stack([m for _, m in pairs])
        return evidence, shown

    def predict(self, source: ImageSource, heatmap: bool = False, target: str | Sequence[str] = "pneumonia",
                gate: bool = True) -> Prediction:
        """One image (path, bytes, PIL image or array). Raises ``InvalidImageError`` for bad input and,
        when ``gate`` and a gate is loaded, ``NotAnXrayError`` for an image that is not a chest X-ray."""
        if gate:
            prepared = self.prepare(source)
            model_input, lungs = prepared.model_input, prepared.lungs
        else:
            model_input, lungs = model_view(source, self.config, self.lungs)
        result = self.predict_inputs(model_input[None], heatmap, target, [lungs])[0]
        if gate and result.refusal:
            raise NotAnXrayError(result.refusal)
        return result
