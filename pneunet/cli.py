"""Command line: ``python -m pneunet predict PATH... [--csv OUT.csv] [--cam OUT_DIR] [--heatmaps OUT_DIR]``.

Files and folders (searched recursively for images). One line per image on stdout; an unreadable file,
or one the input gate refuses as not a chest X-ray, gets a one-line reason on stderr, the rest still run,
and the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
BATCH_SIZE = 16


def expand_paths(paths: list[str]) -> tuple[list[Path], bool]:
    """Files as given, folders expanded to the images inside; also whether any folder was given."""
    files, any_folder = [], False
    for given in paths:
        path = Path(given)
        if path.is_dir():
            any_folder = True
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files, any_folder


# pneumonia_probability and threshold as people read them (pneunet.decision.format_probability, as on the
# page); probability_value keeps the float for scripts.
CSV_FIELDS = ["path", "label", "pneumonia_probability", "threshold", "lung_fields", "error", "probability_value"]


def lung_fields_note(lungs) -> str:
    """The CSV's lung_fields column: found, or why not (then the population template was used)."""
    if lungs is None:
        return ""
    return "found" if lungs.plausible else f"not found ({lungs.reason}); scored on a template"


def save_evidence(path: Path, evidence, size: tuple[int, int]) -> None:
    """The raw evidence map (before lung masking) stretched back to the original image's (width, height),
    as float32 .npy, for audit."""
    import numpy as np
    from PIL import Image

    stretched = Image.fromarray(np.asarray(evidence, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    np.save(path, np.asarray(stretched, dtype=np.float32))


def predict_files(files: list[Path], prepare: Callable, predict_inputs: Callable, csv_path: str | Path | None = None,
                  cam_dir: Path | None = None, progress: bool = False, heatmaps_dir: Path | None = None) -> int:
    """The batch loop shared by ``python -m pneunet predict`` and ``python -m edge.run`` (torch-free).

    ``prepare(path)`` -> (grey image, model input, lung fields or None) raises ``InvalidImageError`` for a
    bad or refused file; ``predict_inputs(batch, heatmap, lungs=[...]) -> results`` (label,
    pneumonia_probability, threshold, heatmap, evidence, lungs, refusal). One line per image on stdout (or
    rows in ``csv_path``), one reason per failed file on stderr; ``cam_dir`` gets overlay PNGs,
    ``heatmaps_dir`` the raw evidence maps as .npy; returns the exit code: 1 if any file failed."""
    import numpy as np

    from pneunet.decision import format_probability
    from pneunet.overlay import overlay_heatmap
    from pneunet.preprocessing import InvalidImageError

    bar = None
    if progress:
        try:  # a progress bar (on stderr) where tqdm is installed; an edge device may do without
            from tqdm import tqdm
        except ImportError:
            progress = False
        else:
            bar = tqdm(total=len(files), unit="image", file=sys.stderr)
    say = bar.write if bar is not None else print
    for folder in (cam_dir, heatmaps_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    want_maps = cam_dir is not None or heatmaps_dir is not None
    rows: dict[int, dict] = {}  # by position in ``files``, so the CSV keeps the input order

    def fail(index: int, path: Path, reason: str) -> None:
        say(f"{path}: {reason}", file=sys.stderr)
        rows[index] = {"path": str(path), "label": "", "pneumonia_probability": "", "threshold": "", "lung_fields": "",
                       "error": reason, "probability_value": ""}

    for start in range(0, len(files), BATCH_SIZE):
        batch = files[start:start + BATCH_SIZE]
        prepared = []
        for index, path in enumerate(batch, start):
            try:
                prepared.append((index, path, *prepare(path)))  # decode + image-level input gate
            except InvalidImageError as error:  # unreadable, or refused as not a chest X-ray
                fail(index, path, str(error))
        if prepared:
            results = predict_inputs(np.stack([model_input for _, _, _, model_input, _ in prepared]), want_maps,
                                     lungs=[lungs for *_, lungs in prepared])
            for (index, path, grey, _, _), result in zip(prepared, results):
                if result.refusal:  # feature-level input gate
                    fail(index, path, result.refusal)
                    continue
                rows[index] = {"path": str(path), "label": result.label,
                               "pneumonia_probability": format_probability(result.pneumonia_probability),
                               "threshold": format_probability(result.threshold), "lung_fields": lung_fields_note(result.lungs),
                               "error": "", "probability_value": f"{result.pneumonia_probability:.6f}"}
                if not csv_path:
                    say(f"{path}\t{result.label}\t{format_probability(result.pneumonia_probability)}"
                        + ("" if result.lungs is None or result.lungs.plausible else "\tlung fields not found"))
                if cam_dir is not None:
                    scale = "fixed" if result.evidence else "relative"  # evidence maps come with a fixed scale
                    overlay_heatmap(grey, result.heatmap, result.lungs, scale=scale).save(cam_dir / f"{path.stem}_cam.png")
                if heatmaps_dir is not None and result.evidence:
                    save_evidence(heatmaps_dir / f"{path.stem}_evidence.npy", result.evidence["pneumonia"], grey.size)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    failures = sum(1 for row in rows.values() if row["error"])
    if csv_path:
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows[index] for index in sorted(rows))
        print(f"wrote {len(rows)} rows to {csv_path} ({failures} failed)", file=sys.stderr)
    return 1 if failures else 0


def load_for_cli(args: argparse.Namespace):
    """The predictor a command asked for, or None after printing why it cannot be loaded."""
    from pneunet.integrity import ModelFileError
    from pneunet.predictor import Predictor

    try:
        predictor = Predictor.load(args.model, args.backend, gate=not args.no_gate, threads=args.threads,
                                   int8_kernels=args.int8_kernels)
    except ModelFileError as error:  # missing, truncated or tampered model / gate / segmenter file
        print(f"error: {error}", file=sys.stderr)
        return None
    verdict = getattr(predictor.backend, "entry", {}).get("parity_gate") or {}
    if verdict.get("result") == "fail":
        print(f"warning: {predictor.backend.path} failed its parity gate against PyTorch at export "
              f"({'; '.join(verdict.get('failures', []))}); see parity.json beside it", file=sys.stderr)
    return predictor


def run_predict(args: argparse.Namespace) -> int:
    files, any_folder = expand_paths(args.paths)
    if not files:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    predictor = load_for_cli(args)
    if predictor is None:
        return 2
    return predict_files(files, predictor.prepare, predictor.predict_inputs, args.csv,
                         Path(args.cam) if args.cam else None, progress=any_folder and not args.quiet,
                         heatmaps_dir=Path(args.heatmaps) if args.heatmaps else None)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m pneunet predict`` (and of ``python -m edge.run``, the same command)."""
    parser.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM, ...) or folders")
    parser.add_argument("--csv", default=None, help="write results to this CSV instead of stdout")
    parser.add_argument("--cam", default=None, help="write heatmap overlays (PNG) into this folder")
    parser.add_argument("--heatmaps", default=None,
                        help="save each image's raw evidence map (before lung masking; calibrated-logit units) "
                             "as .npy at the image's own size into this folder")
    parser.add_argument("--model", "--checkpoint", dest="model", default=None,
                        help="model file: an export (.onnx, .tflite) or a PyTorch checkpoint (.safetensors). Default: "
                             "$PNEUNET_MODEL, else the committed export (int8 ONNX where it passed its parity gate, "
                             "else fp32; int8 TFLite where only a TFLite runtime is installed)")
    parser.add_argument("--backend", choices=["auto", "onnx", "tflite", "torch"], default="auto",
                        help="auto (default, or $PNEUNET_BACKEND): by the model file; torch without --model serves the "
                             "shipped checkpoint on PyTorch (development; needs requirements-dev.txt)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: the runtime's choice for the classifier, 1 for the lung-field segmenter)")
    parser.add_argument("--int8-kernels", choices=["auto", "fused", "reference"], default="auto",
                        help="int8 ONNX only: fused integer kernels, or reference arithmetic (Q/DQ unfused); auto "
                             "(default) uses reference on x86 CPUs without VNNI, where the fused ones saturate")
    parser.add_argument("--no-gate", action="store_true",
                        help="do not refuse images that do not look like chest X-rays (default: refuse them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pneunet", description="PneuNet pneumonia screening (not for diagnosis)")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify chest X-ray images")
    add_predict_arguments(predict)
    predict.set_defaults(run=run_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return args.run(args)
