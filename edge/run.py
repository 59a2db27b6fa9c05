"""The edge runner: chest X-ray files or folders in, label + calibrated pneumonia probability out, with
the same heatmap as the app, on numpy + Pillow + one inference runtime (never torch).

    python -m edge.run IMAGE_OR_FOLDER... [--model PATH] [--csv out.csv] [--cam OUT_DIR] [--threads N]

Without ``--model`` it runs the committed int8 export of the shipped model (edge/models/model_int8.onnx,
or model_int8.tflite where only a TFLite runtime is installed: ``edge.runtime.default_model``; both pass
the parity gate, edge/README.md). One line per
image on stdout; an unreadable file, or one the input gate refuses, gets a one-line reason on stderr,
the rest still run, and the exit code is 1 if any file failed (as ``python -m pneunet predict``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge.runtime import INT8_KERNELS, EdgeModel, EdgeModelError
from pneunet.cli import expand_paths, predict_files  # torch-free: torch is imported inside its commands
from pneunet.heatmap import heatmap_from_features
from pneunet.preprocessing import ImageSource, decode, load_grey, normalize, to_unit



@dataclass
class EdgeOptions:
    """What ``python -m edge.run`` was asked to do."""

    paths: list[str]
    model: Path | None = None  # default: edge.runtime.default_model()
    sidecar: Path | None = None  # default: pneunet_edge.json beside the model
    csv: Path | None = None
    cam: Path | None = None  # folder for heatmap overlays (PNG)
    threads: int | None = None  # runtime threads (default: the runtime's own choice)
    gate: bool = True  # use the input gate when the export ships one
    int8_kernels: str = "auto"  # int8 ONNX: "auto", "fused" or "reference" (edge.runtime.onnx_session)


@dataclass
class EdgePrediction:
    label: str
    pneumonia_probability: float  # calibrated (temperature-scaled)
    threshold: float
    logit: float
    heatmap: np.ndarray | None  # (size, size) in [0, 1] over the squashed model input
    pooled_features: np.ndarray  # (C,) mean over h, w of the feature map: the input gate's input
    refusal: str | None = None  # why the input gate refuses the image, or None


class EdgePredictor:
    """``EdgeModel`` + preprocessing + heatmap + (optional) input gate: the edge twin of ``Predictor``."""

    def __init__(self, model: EdgeModel, gate=None):
        self.model, self.config, self.gate = model, model.config, gate

    @classmethod
    def load(cls, model_path: str | Path | None = None, sidecar_path: str | Path | None = None,
             num_threads: int | None = None, gate: bool = True, int8_kernels: str = "auto") -> "EdgePredictor":
        model = EdgeModel.load(model_path, sidecar_path, num_threads, int8_kernels)
        return cls(model, _load_gate(model) if gate else None)

    def prepare(self, source: ImageSource) -> tuple[Image.Image, np.ndarray]:
        """Decode (+ image-level gate) -> (grey image at its own size, model input (channels, H, W)).
        Raises ``InvalidImageError`` with a message for the person who gave the image."""
        if self.gate is not None:
            decoded = decode(source)
            self.gate.check_image(decoded)
            grey = load_grey(decoded)
        else:
            grey = load_grey(source)
        return grey, normalize(to_unit(grey, self.config), self.config)

    def predict_inputs(self, inputs: np.ndarray, heatmap: bool = False, target: str = "pneumonia") -> list[EdgePrediction]:
        """(N, channels, H, W) preprocessed inputs -> predictions (a gate refusal is set, not raised)."""
        logits, features = self.model.run(inputs)
        probabilities = self.model.pneumonia_probability(logits)
        sign = 1.0 if target == "pneumonia" else -1.0
        size = (self.config.image_size, self.config.image_size)
        results = []
        for logit, probability, feature_map in zip(logits, probabilities, features):
            pooled = feature_map.mean(axis=(1, 2))
            refusal = self.gate.feature_refusal(float(self.gate.distance(pooled)[0])) if self.gate is not None else None
            label = self.config.labels[1] if probability >= self.config.threshold else self.config.labels[0]
            heat = heatmap_from_features(feature_map, self.model.classifier_weight, size, sign) if heatmap else None
            results.append(EdgePrediction(label, float(probability), float(self.config.threshold), float(logit),
                                          heat, pooled, refusal))
        return results

    def predict(self, source: ImageSource, heatmap: bool = False) -> EdgePrediction:
        """One image; raises ``InvalidImageError`` for bad input (``NotAnXrayError`` when the gate refuses)."""
        result = self.predict_inputs(self.prepare(source)[1][None], heatmap)[0]
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

    from edge.runtime import sha256_of

    path = model.path.parent / gate_entry["file"]
    if not path.is_file() or sha256_of(path) != gate_entry["sha256"]:
        raise EdgeModelError(f"{path}: input gate missing or changed (sha256 differs from the sidecar); "
                             "re-export, or run with --no-gate")
    return InputGate.load(path)


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
    return predict_files(files, predictor.prepare, predictor.predict_inputs, options.csv, options.cam)


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
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's choice)")
    parser.add_argument("--no-gate", action="store_true", help="skip the input gate (not-an-X-ray check)")
    parser.add_argument("--int8-kernels", choices=INT8_KERNELS, default="auto",
                        help="int8 ONNX only: fused integer kernels, or reference arithmetic (Q/DQ unfused); auto "
                             "(default) uses reference on x86 CPUs without VNNI, where the fused ones saturate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run(EdgeOptions(args.paths, args.model, args.sidecar, args.csv, args.cam, args.threads, not args.no_gate,
                           args.int8_kernels))


if __name__ == "__main__":
    sys.exit(main())
