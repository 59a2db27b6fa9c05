"""The inference core (torch-free): image in, label + calibrated pneumonia probability + heatmap out.

    from pneunet.predictor import Predictor
    predictor = Predictor.load()                 # the served export (pneunet.backends.default_model)
    result = predictor.predict("chest.jpeg", heatmap=True)
    result.label, result.pneumonia_probability, result.threshold, result.heatmap.shape

The app, the CLI, the edge runner, the parity gate and evaluation all run this one class, over a backend
(``pneunet.backends``) that turns a model input into (logits, feature map): onnxruntime or a TFLite runtime
for an export, PyTorch for a ``.safetensors`` checkpoint (development, training, parity). Around it, the
same numpy code for everything else: decoding and the input gate (``pneunet.gate``), the lung fields and
the one preprocessing path (``pneunet.lungs.model_view``), the decision rule (``pneunet.decision``) and
the heatmap (``pneunet.heatmap``: each region's contribution to the calibrated logit on the model's fixed
scale, shown inside the lung fields only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from pneunet.backends import Backend, ExportedModel, ModelFileError, load_backend
from pneunet.config import ModelConfig
from pneunet.decision import calibrated_probability, decide
from pneunet.gate import GateFileError, InputGate, NotAnXrayError, gate_fitted_for, gate_path_for
from pneunet.heatmap import evidence_and_shown, heatmap_from_features, target_sign
from pneunet.integrity import sha256_of
from pneunet.lungs import LungFields, LungFileError, LungFinder, lungs_path_for, model_view
from pneunet.preprocessing import ImageSource, decode, load_grey
from pneunet.site import SiteProfile


@dataclass
class Prediction:
    label: str
    pneumonia_probability: float  # calibrated (temperature-scaled) probability
    threshold: float  # label is pneumonia when pneumonia_probability >= threshold
    logit: float  # raw model logit, before temperature
    heatmap: np.ndarray | None = None  # (image_size, image_size) in [0, 1], over the squashed input
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # every requested target -> shown map
    pooled_features: np.ndarray | None = None  # (C,) mean over H, W of the feature map: the gate's input
    gate_distance: float | None = None  # input-gate distance (None without a gate)
    refusal: str | None = None  # why the input gate refuses this image, or None
    # The raw evidence map (calibrated-logit contribution, signed, before lung masking) per target.
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    lungs: LungFields | None = None  # the lung fields the classifier saw (None for a model without them)
    operating_point: str = "shipped"  # "shipped", or the site profile in force (pneunet.site.SiteProfile.describe)
    warning: str | None = None  # a chest X-ray unlike the training population (scored, flagged: pneunet.gate)


class PreparedImage(NamedTuple):
    """A decoded upload that passed the image-level gate: grey at its own size, the model input, and the
    lung fields the model input was cut to (None for a model without them)."""

    grey: Image.Image
    model_input: np.ndarray  # (channels, size, size)
    lungs: LungFields | None = None
    warning: str | None = None  # unlike the training population (pneunet.gate: scored, flagged)


def load_lung_finder(checkpoint: Path, config: ModelConfig, threads: int | None = None) -> LungFinder | None:
    """The segmenter a checkpoint was trained with (``config.lungs``, ``<stem>.lungs.onnx`` beside it),
    checked to be that very file."""
    if not config.lungs:
        return None
    path = lungs_path_for(checkpoint)
    finder = LungFinder.load(path, threads=threads or 1)
    if sha256_of(path) != config.lungs.get("onnx_sha256"):
        raise LungFileError(f"{path}: not the lung-field segmenter {checkpoint.name} was trained with")
    return finder


def load_export_lungs(model: ExportedModel, threads: int | None = None) -> LungFinder | None:
    """The lung-field segmenter shipped beside an export (sidecar key "lungs": a verbatim copy of the
    checkpoint's ``<stem>.lungs.onnx`` and its .json), checked to be the one the classifier was trained
    with (``config.lungs``). It runs on onnxruntime (fp32) for every classifier format, so every front cuts
    an image to the same mask."""
    entry, trained_with = model.sidecar.get("lungs"), model.config.lungs
    if not trained_with and not entry:
        return None
    if not entry or not trained_with:
        problem = ("was trained on lung fields but the export ships no lung-field segmenter" if trained_with else
                   "was trained without lung fields but the export ships a lung-field segmenter")
        raise ModelFileError(f"{model.path.parent}: the model {problem}; re-export with python -m export --checkpoint CKPT --out DIR")
    path = model.path.parent / entry["file"]
    if entry["sha256"] != trained_with.get("onnx_sha256"):
        raise ModelFileError(f"{path}: the sidecar's segmenter (sha256 {entry['sha256'][:12]}...) is not the one the "
                             f"model was trained with ({str(trained_with.get('onnx_sha256'))[:12]}...); re-export")
    for name, digest in ((entry["file"], entry["sha256"]), (entry["config_file"], entry["config_sha256"])):
        if not (model.path.parent / name).is_file() or sha256_of(model.path.parent / name) != digest:
            raise ModelFileError(f"{model.path.parent / name}: lung-field segmenter file missing or changed (sha256 "
                                 "differs from the sidecar); re-copy the export folder or re-export with python -m export")
    from pneunet.backends import installed

    if not installed("onnxruntime"):
        raise ModelFileError(f"{model.path}: this model needs onnxruntime for its lung-field segmenter ({entry['file']}); "
                             "a TFLite runtime alone cannot run it: pip install onnxruntime (edge/requirements.txt)")
    return LungFinder.load(path, threads=threads or 1)


def _checkpoint_gate(checkpoint: Path) -> InputGate | None:
    """``<checkpoint>.gate.safetensors`` when it exists, refused when fitted for another model."""
    gate_file = gate_path_for(checkpoint)
    if not gate_file.is_file():
        return None
    gate = InputGate.load(gate_file, verify=True)
    # A gate measures distances in one model's feature space: with another model it refuses X-rays.
    fitted_for = gate_fitted_for(gate_file)
    if fitted_for is not None and fitted_for != sha256_of(checkpoint):
        raise GateFileError(f"{gate_file}: fitted for another model (sha256 {fitted_for[:12]}...), not {checkpoint}; "
                            f"refit it with python -m training.fit_gate --checkpoint {checkpoint}")
    return gate


class Predictor:
    """A backend + its config + (optional) input gate + (optional) lung-field segmenter + (optional) site
    profile, which replaces the shipped calibration and threshold (never the heatmap)."""

    def __init__(self, backend: Backend, gate: InputGate | None = None, lungs: LungFinder | None = None,
                 site: SiteProfile | None = None):
        self.backend, self.config, self.gate, self.lungs, self.site = backend, backend.config, gate, lungs, site

    @property
    def threshold(self) -> float:
        return float(self.site.threshold if self.site is not None else self.config.threshold)

    @property
    def operating_point(self) -> str:
        return self.site.describe() if self.site is not None else "shipped"

    def probability(self, logits) -> np.ndarray:
        """The calibrated probability: the shipped temperature, or the site profile's calibration."""
        if self.site is not None:
            return self.site.probability(logits)
        return calibrated_probability(logits, self.config.temperature)

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "auto", gate: bool = True,
             threads: int | None = None, int8_kernels: str = "auto", site: str | Path | None = None) -> "Predictor":
        """Load ``model`` (an export ``.onnx`` / ``.tflite``, or a ``.safetensors`` checkpoint; default:
        ``pneunet.backends.default_model()``, or the shipped checkpoint with ``backend="torch"``) with the
        lung-field segmenter it was trained with and, when ``gate``, its input gate. Every file is checked
        against the sha256 recorded beside it (``ModelFileError`` naming the file otherwise). ``site``: a site
        profile (``python -m pneunet calibrate``), refused unless fitted for this model file."""
        loaded = load_backend(model, backend, threads, int8_kernels)
        profile = SiteProfile.load(site, loaded.sha256) if site else None
        if isinstance(loaded, ExportedModel):
            gate_file = loaded.file_beside("gate") if gate else None
            input_gate = InputGate.load(gate_file) if gate_file else None
            return cls(loaded, input_gate, load_export_lungs(loaded, threads), profile)
        return cls(loaded, _checkpoint_gate(loaded.path) if gate else None,
                   load_lung_finder(loaded.path, loaded.config, threads), profile)

    @property
    def runtime(self) -> str:
        return self.backend.name

    def prepare(self, source: ImageSource) -> PreparedImage:
        """Decode, apply the image-level gate (colour, blank) and preprocess. Raises ``InvalidImageError``
        (``NotAnXrayError`` for a refused image) with a message for the person who gave the image."""
        decoded = decode(source)
        warning = None
        if self.gate is not None:
            self.gate.check_image(decoded)
            warning = self.gate.population_warning(decoded)
        grey = load_grey(decoded)
        return PreparedImage(grey, *model_view(grey, self.config, self.lungs), warning)

    def predict_prepared(self, images: Sequence[PreparedImage], heatmap: bool = False,
                         target: str | Sequence[str] = "pneumonia") -> list[Prediction]:
        """``predict_inputs`` on images from ``prepare``, keeping their lung fields and population warnings."""
        results = self.predict_inputs(np.stack([image.model_input for image in images]), heatmap, target,
                                      [image.lungs for image in images])
        for result, image in zip(results, images):
            result.warning = image.warning
        return results

    def predict_inputs(self, inputs: np.ndarray, heatmap: bool = False, target: str | Sequence[str] = "pneumonia",
                       lungs: Sequence[LungFields | None] | None = None) -> list[Prediction]:
        """Predict on already-preprocessed inputs of shape (N, channels, size, size) (``model_view``), with
        the lung fields each was cut to (their masks bound the shown heatmaps). Never raises for the
        feature-level gate: a refused image has ``refusal`` set."""
        targets = [target] if isinstance(target, str) else list(target)
        for t in targets:
            target_sign(t)  # an unknown target fails before the model runs
        if heatmap and self.backend.classifier_weight is None:
            raise ValueError(f"{self.config.architecture} has no pooling + linear head, so no class activation map; "
                             "use pneunet.cam.GradCAM on the PyTorch model")
        logits, features = self.backend.run(inputs)
        lungs = list(lungs) if lungs is not None else [None] * len(logits)
        if len(lungs) != len(logits):
            raise ValueError(f"{len(logits)} inputs but {len(lungs)} lung fields")
        probabilities = self.probability(logits)
        results = []
        for logit, probability, feature_map, fields in zip(logits, probabilities, features, lungs):
            pooled = feature_map.mean(axis=(1, 2))
            distance = refusal = None
            if self.gate is not None:
                distance = float(self.gate.distance(pooled)[0])
                refusal = self.gate.feature_refusal(distance)
            shown, evidence = self._maps(feature_map, targets, fields) if heatmap else ({}, {})
            results.append(Prediction(decide(probability, self.threshold, self.config.labels), float(probability), self.threshold, float(logit),
                                      next(iter(shown.values()), None), shown, pooled, distance, refusal, evidence, fields,
                                      self.operating_point))
        return results

    def _maps(self, feature_map: np.ndarray, targets: list[str], fields: LungFields | None) -> tuple[dict, dict]:
        """({target: shown map}, {target: raw evidence map}) for one (C, h, w) feature map; a model without
        an evidence scale gets the legacy per-image CAM and no evidence maps."""
        weight = self.backend.classifier_weight
        shown, evidence = {}, {}
        for t in targets:
            if self.config.evidence_scale:
                evidence[t], shown[t] = evidence_and_shown(feature_map, weight, self.config, t,
                                                           None if fields is None else fields.mask)
            else:
                size = (self.config.image_size, self.config.image_size)
                shown[t] = heatmap_from_features(feature_map, weight, size, target_sign(t))
        return shown, evidence

    def predict(self, source: ImageSource, heatmap: bool = False, target: str | Sequence[str] = "pneumonia",
                gate: bool = True) -> Prediction:
        """One image (path, bytes, PIL image or array). Raises ``InvalidImageError`` for bad input and,
        when ``gate`` and a gate is loaded, ``NotAnXrayError`` for an image that is not a chest X-ray."""
        if gate:
            result = self.predict_prepared([self.prepare(source)], heatmap, target)[0]
        else:
            model_input, lungs = model_view(source, self.config, self.lungs)
            result = self.predict_inputs(model_input[None], heatmap, target, [lungs])[0]
        if gate and result.refusal:
            raise NotAnXrayError(result.refusal)
        return result
