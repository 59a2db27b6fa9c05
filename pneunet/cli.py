"""Command line: ``python -m pneunet predict PATH... [--csv OUT.csv] [--cam OUT_DIR]``.

Files and folders (searched recursively for images). One line per image on stdout; an unreadable file,
or one the input gate refuses as not a chest X-ray, gets a one-line reason on stderr, the rest still run,
and the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

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


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from pneunet.overlay import overlay_heatmap
    from pneunet.predictor import Predictor
    from pneunet.preprocessing import InvalidImageError

    predictor = Predictor.load(args.checkpoint, gate=not args.no_gate)
    files, any_folder = expand_paths(args.paths)
    if not files:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    cam_dir = Path(args.cam) if args.cam else None
    if cam_dir:
        cam_dir.mkdir(parents=True, exist_ok=True)
    rows, failures = [], 0

    def fail(path: Path, reason: str) -> None:
        nonlocal failures
        failures += 1
        tqdm.write(f"{path}: {reason}", file=sys.stderr)
        rows.append({"path": str(path), "label": "", "pneumonia_probability": "", "threshold": "", "error": reason})

    progress = tqdm(total=len(files), unit="image", disable=not any_folder or args.quiet, file=sys.stderr)
    for start in range(0, len(files), BATCH_SIZE):
        batch_files, batch_prepared = [], []
        for path in files[start:start + BATCH_SIZE]:
            try:
                batch_prepared.append(predictor.prepare(path))  # decode + image-level input gate
                batch_files.append(path)
            except InvalidImageError as error:  # unreadable, or refused as not a chest X-ray
                fail(path, str(error))
        if batch_prepared:
            inputs = np.stack([prepared.model_input for prepared in batch_prepared])
            results = predictor.predict_inputs(inputs, heatmap=cam_dir is not None)
            for path, prepared, result in zip(batch_files, batch_prepared, results):
                if result.refusal:  # feature-level input gate
                    fail(path, result.refusal)
                    continue
                rows.append({"path": str(path), "label": result.label,
                             "pneumonia_probability": f"{result.pneumonia_probability:.4f}",
                             "threshold": f"{result.threshold:.4f}", "error": ""})
                if not args.csv:
                    tqdm.write(f"{path}\t{result.label}\t{result.pneumonia_probability:.4f}")
                if cam_dir is not None:
                    overlay_heatmap(prepared.grey, result.heatmap).save(cam_dir / f"{path.stem}_cam.png")
        progress.update(len(files[start:start + BATCH_SIZE]))
    progress.close()
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "pneumonia_probability", "threshold", "error"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.csv} ({failures} failed)", file=sys.stderr)
    return 1 if failures else 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pneunet", description="PneuNet pneumonia screening (not for diagnosis)")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify chest X-ray images")
    predict.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM, ...) or folders")
    predict.add_argument("--csv", default=None, help="write results to this CSV instead of stdout")
    predict.add_argument("--cam", default=None, help="write heatmap overlays (PNG) into this folder")
    predict.add_argument("--checkpoint", default=None,
                         help="model .safetensors (default: $PNEUNET_CHECKPOINT, else the shipped model)")
    predict.add_argument("--no-gate", action="store_true",
                         help="do not refuse images that do not look like chest X-rays (default: refuse them)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(run=run_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return args.run(args)
