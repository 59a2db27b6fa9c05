"""The edge runner: chest X-ray files or folders in, label + calibrated pneumonia probability out, with
the same lung fields and heatmap as the app, on numpy + Pillow + one inference runtime (never torch).

    python -m edge.run IMAGE_OR_FOLDER... [--model PATH] [--csv out.csv] [--cam OUT_DIR] [--heatmaps OUT_DIR] [--threads N]

Without ``--model`` it runs the committed int8 export of the shipped model (edge/models/model_int8.onnx,
or model_int8.tflite where only a TFLite runtime is installed: ``edge.runtime.default_model``; both pass
the parity gate, edge/README.md). A model trained on lung fields also needs the lung-field segmenter
shipped beside it (``pneunet.lungs.onnx``, the app's very file), which runs on onnxruntime whatever the
classifier's format. One line per image on stdout; an unreadable file, or one the input gate refuses,
gets a one-line reason on stderr, the rest still run, and the exit code is 1 if any file failed (as
``python -m pneunet predict``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from edge.runtime import INT8_KERNELS, SIDECAR_NAME, EdgeModel, EdgeModelError, sha256_of
from pneunet.cli import expand_paths, predict_files  # torch-free: torch is imported inside its commands
from pneunet.heatmap import evidence_and_shown, heatmap_from_features, target_sign
from pneunet.lungs import LungFields, LungFileError, LungFinder, model_view
from pneunet.preprocessing import ImageSource, decode, load_grey


@dataclass
class EdgeOptions:
    """What ``python -m edge.run`` was asked to do."""

    paths: list[str]
    model: Path | None = None  # default: edge.runtime.default_model()
    sidecar: Path | None = None  # default: pneunet_edge.json beside the model
    csv: Path | None = None
    cam: Path | None = None  # folder for heatmap overlays (PNG)
    heatmaps: Path | None = None  # folder for the raw evidence maps (.npy), as python -m pneunet predict --heatmaps
    threads: int | None = None  # runtime threads (default: the runtime's own choice)
    gate: bool = True  # use the input gate when the export ships one
    int8_kernels: str = "auto"  # int8 ONNX: "auto", "fused" or "reference" (edge.runtime.onnx_session)


@dataclass
class EdgePrediction:
    label: str
    pneumonia_probability: float  # calibrated (temperature-scaled)
    threshold: float
    logit: float
    # What is shown, (size, size) in [0, 1] over the squashed model input: with ``config.evidence_scale`` the
    # positive evidence inside the lung fields on the model's fixed scale, else the legacy per-image CAM.
    heatmap: np.ndarray | None
    pooled_features: np.ndarray  # (C,) mean over h, w of the feature map: the input gate's input
    refusal: str | None = None  # why the input gate refuses the image, or None
    # The raw evidence map (calibrated-logit contribution, signed, before lung masking), keyed by target;
    # empty without heatmaps or for a model without an evidence scale (as ``Prediction.evidence``).
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    lungs: LungFields | None = None  # the lung fields the classifier saw (None for a model without them)


class EdgeImage(NamedTuple):
    """A decoded image that passed the image-level gate: grey at its own size, the model input, and the
    lung fields the model input was cut to (None for a model without them); ``pneunet.predictor.PreparedImage``."""

    grey: Image.Image
    model_input: np.ndarray  # (channels, size, size)
    lungs: LungFields | None = None


class EdgePredictor:
    """``EdgeModel`` + lung fields + preprocessing + heatmap + (optional) input gate: the edge twin of ``Predictor``."""

    def __init__(self, model: EdgeModel, gate=None, lungs: LungFinder | None = None):
        self.model, self.config, self.gate, self.lungs = model, model.config, gate, lungs

    @classmethod
    def load(cls, model_path: str | Path | None = None, sidecar_path: str | Path | None = None,
             num_threads: int | None = None, gate: bool = True, int8_kernels: str = "auto") -> "EdgePredictor":
        model = EdgeModel.load(model_path, sidecar_path, num_threads, int8_kernels)
        return cls(model, _load_gate(model) if gate else None, load_lungs(model, num_threads))

    def prepare(self, source: ImageSource) -> EdgeImage:
        """Decode (+ image-level gate) -> (grey image at its own size, model input (channels, H, W), lung
        fields) through ``pneunet.lungs.model_view``, as the app. Raises ``InvalidImageError`` with a
        message for the person who gave the image."""
        if self.gate is not None:
            decoded = decode(source)
            self.gate.check_image(decoded)
            grey = load_grey(decoded)
        else:
            grey = load_grey(source)
        return EdgeImage(grey, *model_view(grey, self.config, self.lungs))

    def predict_inputs(self, inputs: np.ndarray, heatmap: bool = False, target: str = "pneumonia",
                       lungs: Sequence[LungFields | None] | None = None) -> list[EdgePrediction]:
        """(N, channels, H, W) inputs from ``prepare`` (their lung fields in ``lungs``: the masks bound the
        shown heatmaps) -> predictions (a gate refusal is set, not raised)."""
        target_sign(target)  # an unknown target fails before the model runs
        logits, features = self.model.run(inputs)
        probabilities = self.model.pneumonia_probability(logits)
        lungs = list(lungs) if lungs is not None else [None] * len(logits)
        if len(lungs) != len(logits):
            raise ValueError(f"{len(logits)} inputs but {len(lungs)} lung fields")
        results = []
        for logit, probability, feature_map, fields in zip(logits, probabilities, features, lungs):
            pooled = feature_map.mean(axis=(1, 2))
            refusal = self.gate.feature_refusal(float(self.gate.distance(pooled)[0])) if self.gate is not None else None
            label = self.config.labels[1] if probability >= self.config.threshold else self.config.labels[0]
            heat, evidence = self._maps(feature_map, target, fields) if heatmap else (None, {})
            results.append(EdgePrediction(label, float(probability), float(self.config.threshold), float(logit),
                                          heat, pooled, refusal, evidence, fields))
        return results

    def _maps(self, feature_map: np.ndarray, target: str, fields: LungFields | None) -> tuple[np.ndarray, dict]:
        """(shown map, {target: raw evidence map}) for one (C, h, w) feature map, with the same numpy
        functions as ``Predictor._evidence_maps`` (legacy per-image CAM without an evidence scale)."""
        weight = self.model.classifier_weight
        if not self.config.evidence_scale:
            size = (self.config.image_size, self.config.image_size)
            return heatmap_from_features(feature_map, weight, size, target_sign(target)), {}
        evidence, shown = evidence_and_shown(feature_map, weight, self.config, target, None if fields is None else fields.mask)
        return shown, {target: evidence}

    def predict(self, source: ImageSource, heatmap: bool = False, target: str = "pneumonia") -> EdgePrediction:
        """One image; raises ``InvalidImageError`` for bad input (``NotAnXrayError`` when the gate refuses)."""
        prepared = self.prepare(source)
        result = self.predict_inputs(prepared.model_input[None], heatmap, target, [prepared.lungs])[0]
        if result.refusal:
            from pneunet.gate import NotAnXrayError

            raise NotAnXrayError(result.refusal)
        return result


def _load_gate(model: EdgeModel):
    """The input gate shipped beside the export (sidecar key "gate"), or None when the export has none."""
    gate_entry = model.sidecar.get("gate")
    if not gate_entry:
        return None
    from pneunet.gate import InputGate

    path = model.path.parent / gate_entry["file"]
    if not path.is_file() or sha256_of(path) != gate_entry["sha256"]:
        raise EdgeModelError(f"{path}: input gate missing or changed (sha256 differs from the sidecar); "
                             "re-export, or run with --no-gate")
    return InputGate.load(path)


def load_lungs(model: EdgeModel, num_threads: int | None = None) -> LungFinder | None:
    """The lung-field segmenter shipped beside the export (sidecar key "lungs": a verbatim copy of the
    checkpoint's ``<stem>.lungs.onnx`` and its .json), checked to be the one the classifier was trained with
    (``config.lungs``); None for a model without lung fields. It runs on onnxruntime (fp32) for every
    classifier format, so app and runner cut every image to the same mask."""
    entry, trained_with = model.sidecar.get("lungs"), model.config.lungs
    if not trained_with and not entry:
        return None
    if not entry or not trained_with:
        problem = ("was trained on lung fields but the export ships no lung-field segmenter" if trained_with else
                   "was trained without lung fields but the export ships a lung-field segmenter")
        raise EdgeModelError(f"{model.path.parent / SIDECAR_NAME}: the model {problem}; "
                             "re-export with python -m export --checkpoint CKPT --out DIR")
    path = model.path.parent / entry["file"]
    if entry["sha256"] != trained_with.get("onnx_sha256"):
        raise EdgeModelError(f"{path}: the sidecar's segmenter (sha256 {entry['sha256'][:12]}...) is not the one the "
                             f"model was trained with ({str(trained_with.get('onnx_sha256'))[:12]}...); re-export")
    for name, digest in ((entry["file"], entry["sha256"]), (entry["config_file"], entry["config_sha256"])):
        if not (model.path.parent / name).is_file() or sha256_of(model.path.parent / name) != digest:
            raise EdgeModelError(f"{model.path.parent / name}: lung-field segmenter file missing or changed (sha256 "
                                 "differs from the sidecar); re-copy the export folder or re-export with python -m export")
    if importlib.util.find_spec("onnxruntime") is None:
        raise EdgeModelError(f"{model.path}: this model needs onnxruntime for its lung-field segmenter ({entry['file']}); "
                             "a TFLite runtime alone cannot run it: pip install onnxruntime (edge/requirements.txt)")
    try:
        return LungFinder.load(path, threads=num_threads or 1)
    except LungFileError as error:
        raise EdgeModelError(str(error)) from error


def run(options: EdgeOptions) -> int:
    try:
        predictor = EdgePredictor.load(options.model, options.sidecar, options.threads, options.gate, options.int8_kernels)
    except EdgeModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    verdict = predictor.model.entry.get("parity_gate") or {}
    if verdict.get("result") == "fail":
        print(f"warning: {predictor.model.path} failed its parity gate against PyTorch at export "
              f"({'; '.join(verdict.get('failures', []))}); see parity.json beside it", file=sys.stderr)
    files, _ = expand_paths(options.paths)
    if not files:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    return predict_files(files, predictor.prepare, predictor.predict_inputs, options.csv, options.cam,
                         heatmaps_dir=options.heatmaps)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM, ...) or folders")
    parser.add_argument("--model", type=Path, default=None,
                        help=".onnx or .tflite export (default: the committed int8 export, edge/models/model_int8.onnx, "
                             "or model_int8.tflite where only a TFLite runtime is installed)")
    parser.add_argument("--sidecar", type=Path, default=None, help="sidecar JSON (default: pneunet_edge.json beside the model)")
    parser.add_argument("--csv", type=Path, default=None, help="write results to this CSV instead of stdout")
    parser.add_argument("--cam", type=Path, default=None, help="write heatmap overlays (PNG) into this folder")
    parser.add_argument("--heatmaps", type=Path, default=None,
                        help="save each image's raw evidence map (before lung masking; calibrated-logit units) as .npy "
                             "at the image's own size into this folder (as python -m pneunet predict --heatmaps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: the runtime's choice for the classifier, 1 for the lung-field segmenter)")
    parser.add_argument("--no-gate", action="store_true", help="skip the input gate (not-an-X-ray check)")
    parser.add_argument("--int8-kernels", choices=INT8_KERNELS, default="auto",
                        help="int8 ONNX only: fused integer kernels, or reference arithmetic (Q/DQ unfused); auto "
                             "(default) uses reference on x86 CPUs without VNNI, where the fused ones saturate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run(EdgeOptions(args.paths, args.model, args.sidecar, args.csv, args.cam, args.heatmaps, args.threads,
                           not args.no_gate, args.int8_kernels))


if __name__ == "__main__":
    sys.exit(main())
