"""Command line: ``python -m pneunet predict PATH... [--csv OUT.csv] [--cam OUT_DIR] [--heatmaps OUT_DIR]``.

Files and folders (searched recursively for images). One line per image on stdout; an unreadable file,
or one the input gate refuses as not a chest X-ray, gets a one-line reason on stderr, the rest still run,
and the exit code is 1 if any file failed.

``python -m pneunet predict --ray [ADDRESS] SOURCE... --out results.parquet`` scores the same way on a Ray
cluster (pneunet.cluster), for archives too large for one machine.
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
CSV_FIELDS = ["path", "label", "pneumonia_probability", "threshold", "lung_fields", "error", "probability_value",
              "operating_point", "warning"]


def lung_fields_note(lungs) -> str:
    """The CSV's lung_fields column: found, or why not (then the population template was used)."""
    if lungs is None:
        return ""
    return "found" if lungs.plausible else f"not found ({lungs.reason}); scored on a template"


def error_row(path: str | Path, reason: str) -> dict:
    """The CSV row of a file that was not scored: unreadable, or refused by the input gate (``reason``)."""
    return {**dict.fromkeys(CSV_FIELDS, ""), "path": str(path), "error": reason}


def result_row(path: str | Path, result) -> dict:
    """The CSV row of one ``Prediction``; one the feature-level gate refused is an ``error_row`` with the
    refusal as its reason. ``python -m pneunet predict`` and its ``--ray`` path (pneunet.cluster) both write
    these, so their columns cannot drift apart."""
    from pneunet.decision import format_probability

    if result.refusal:
        return error_row(path, result.refusal)
    return {"path": str(path), "label": result.label, "pneumonia_probability": format_probability(result.pneumonia_probability),
            "threshold": format_probability(result.threshold), "lung_fields": lung_fields_note(result.lungs), "error": "",
            "probability_value": f"{result.pneumonia_probability:.6f}", "operating_point": result.operating_point,
            "warning": result.warning or ""}


def save_evidence(path: Path, evidence, size: tuple[int, int]) -> None:
    """The raw evidence map (before lung masking) stretched back to the original image's (width, height),
    as float32 .npy, for audit."""
    import numpy as np
    from PIL import Image

    stretched = Image.fromarray(np.asarray(evidence, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    np.save(path, np.asarray(stretched, dtype=np.float32))


def predict_files(files: list[Path], prepare: Callable, predict_prepared: Callable, csv_path: str | Path | None = None,
                  cam_dir: Path | None = None, progress: bool = False, heatmaps_dir: Path | None = None) -> int:
    """The batch loop shared by ``python -m pneunet predict`` and ``python -m edge.run`` (torch-free).

    ``prepare(path)`` -> ``PreparedImage`` raises ``InvalidImageError`` for a bad or refused file;
    ``predict_prepared(images, heatmap) -> results`` (``Predictor.predict_prepared``). One line per image on stdout (or
    rows in ``csv_path``), one reason per failed file on stderr; ``cam_dir`` gets overlay PNGs,
    ``heatmaps_dir`` the raw evidence maps as .npy; returns the exit code: 1 if any file failed."""
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
        rows[index] = error_row(path, reason)

    for start in range(0, len(files), BATCH_SIZE):
        batch = files[start:start + BATCH_SIZE]
        prepared = []
        for index, path in enumerate(batch, start):
            try:
                prepared.append((index, path, prepare(path)))  # decode + image-level input gate
            except InvalidImageError as error:  # unreadable, or refused as not a chest X-ray
                fail(index, path, str(error))
        if prepared:
            results = predict_prepared([image for _, _, image in prepared], want_maps)
            for (index, path, image), result in zip(prepared, results):
                grey = image.grey
                if result.refusal:  # feature-level input gate
                    fail(index, path, result.refusal)
                    continue
                rows[index] = result_row(path, result)
                if not csv_path:
                    say(f"{path}\t{result.label}\t{format_probability(result.pneumonia_probability)}"
                        + ("" if result.lungs is None or result.lungs.plausible else "\tlung fields not found")
                        + ("\tunlike the training population: treat with caution" if result.warning else ""))
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
                                   int8_kernels=args.int8_kernels, site=args.site)
    except ModelFileError as error:  # missing, truncated or tampered model / gate / segmenter file
        print(f"error: {error}", file=sys.stderr)
        return None
    verdict = getattr(predictor.backend, "entry", {}).get("parity_gate") or {}
    if verdict.get("result") == "fail":
        print(f"warning: {predictor.backend.path} failed its parity gate against PyTorch at export "
              f"({'; '.join(verdict.get('failures', []))}); see parity.json beside it", file=sys.stderr)
    if predictor.site is not None:
        print(f"operating point: {predictor.operating_point} (threshold {predictor.threshold:.4f})", file=sys.stderr)
    return predictor


LABEL_WORDS = {"0": 0, "normal": 0, "1": 1, "pneumonia": 1}


def labelled_files(source: Path) -> list[tuple[Path, int]]:
    """A site's labelled images: a folder with NORMAL/ and PNEUMONIA/ inside (any case), or a CSV of
    path,label (label normal/pneumonia or 0/1; paths relative to the CSV's folder)."""
    if source.is_dir():
        pairs = []
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            label = LABEL_WORDS.get(folder.name.lower())
            if label is not None:
                pairs += [(path, label) for path in expand_paths([str(folder)])[0]]
        if not pairs:
            raise ValueError(f"{source}: no NORMAL/ or PNEUMONIA/ folder with images inside")
        return pairs
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    pairs = []
    for number, row in enumerate(rows, 1):
        label = LABEL_WORDS.get(row[1].strip().lower()) if len(row) >= 2 else None
        if label is None:
            raise ValueError(f"{source}, row {number}: expected path,label with label normal/pneumonia or 0/1")
        path = Path(row[0])
        pairs.append((path if path.is_absolute() else source.parent / path, label))
    return pairs


def run_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from pneunet.preprocessing import InvalidImageError
    from pneunet.site import SiteProfileError, fit_site_profile

    source = Path(args.source)
    if not source.exists():
        print(f"error: {source}: no such folder or CSV", file=sys.stderr)
        return 2
    try:
        pairs = labelled_files(source)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.site = None  # a profile is fitted on the model's own logits
    predictor = load_for_cli(args)
    if predictor is None:
        return 2
    logits, labels, skipped = [], [], 0
    for path, label in pairs:
        try:
            result = predictor.predict_prepared([predictor.prepare(path)])[0]
        except InvalidImageError as error:
            print(f"{path}: {error} (left out)", file=sys.stderr)
            skipped += 1
            continue
        if result.refusal:
            print(f"{path}: {result.refusal} (left out)", file=sys.stderr)
            skipped += 1
            continue
        logits.append(result.logit)
        labels.append(label)
    try:
        profile = fit_site_profile(np.array(logits), np.array(labels), predictor.backend.sha256, args.target_sensitivity,
                                   name=args.name)
    except SiteProfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    profile.save(args.out)
    measured = profile.measured
    sens, spec = measured["sensitivity_ci95"], measured["specificity_ci95"]
    print(f"{args.out}: {profile.describe()} ({profile.images['normal']} normal, {profile.images['pneumonia']} pneumonia; "
          f"{skipped} left out) for {Path(getattr(predictor.backend, 'path', '')).name or 'the model'}\n"
          f"  probability = sigmoid({profile.slope:.3f} * logit {profile.intercept:+.3f}); threshold {profile.threshold:.4f} "
          f"for sensitivity >= {profile.target_sensitivity}\n"
          f"  expected on this site's next films (bootstrap 95 % intervals): sensitivity {sens[0]:.2f}-{sens[1]:.2f}, "
          f"specificity {spec[0]:.2f}-{spec[1]:.2f}")
    if args.plot:
        from pneunet.site import operating_curve_image

        operating_curve_image(np.array(logits), np.array(labels), profile).save(args.plot)
        print(f"  operating curve: {args.plot}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None) is not None:  # python -m edge.run has no --ray
        from pneunet.cluster import run_cluster_predict  # ray is imported there, and only then

        return run_cluster_predict(args)
    if getattr(args, "out", None) or getattr(args, "actors", None) or getattr(args, "batch_size", None):
        print("error: --out, --actors and --batch-size go with --ray; on one machine write a CSV with --csv", file=sys.stderr)
        return 2
    files, any_folder = expand_paths(args.paths)
    if not files:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    predictor = load_for_cli(args)
    if predictor is None:
        return 2
    return predict_files(files, predictor.prepare, predictor.predict_prepared, args.csv,
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
    parser.add_argument("--site", default=None,
                        help="site profile (python -m pneunet calibrate): its calibration and threshold replace the shipped ones")
    parser.add_argument("--no-gate", action="store_true",
                        help="do not refuse images that do not look like chest X-rays (default: refuse them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def ray_address(value: str) -> str:
    """``--ray``'s value: local, auto, HOST:PORT or ray://HOST:PORT; anything else is most likely an image
    that argparse handed to the option, so say how to write it."""
    import re

    if value in ("local", "auto") or re.fullmatch(r"(ray://)?[\w.\-]+:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a Ray address (local, auto, HOST:PORT or ray://HOST:PORT); "
                                     "write the address right after --ray, or put --ray after the images")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m pneunet predict --ray``: the same scoring on a Ray cluster (pneunet.cluster)."""
    cluster = parser.add_argument_group("archive scoring on a Ray cluster (training/requirements-cluster.txt)")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                         help="score with Ray Data: 'local' (the default when given bare) starts Ray on this machine, on "
                              "the loopback interface only; 'auto' joins the cluster this node belongs to (ray start); "
                              "HOST:PORT or ray://HOST:PORT a given one. SOURCE may also be a .txt file listing one path "
                              "or URI (s3://, gs://, file://) per line, or a folder URI")
    cluster.add_argument("--out", default=None,
                         help="with --ray: results.parquet or results.csv, one row per file in input order, the columns of --csv")
    cluster.add_argument("--actors", type=int, default=None,
                         help="with --ray: scoring actors, each loading the model once (default: the cluster's CPUs / --threads)")
    cluster.add_argument("--batch-size", type=int, default=None,
                         help=f"with --ray: images per map_batches call (default: {BATCH_SIZE}, as on one machine); "
                              "--threads is then per actor (default there: 1)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pneunet", description="PneuNet pneumonia screening (not for diagnosis)")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify chest X-ray images")
    add_predict_arguments(predict)
    add_cluster_arguments(predict)
    predict.set_defaults(run=run_predict)
    calibrate = commands.add_parser("calibrate", help="fit a site profile (calibration + threshold) on a site's labelled images")
    calibrate.add_argument("source", help="folder with NORMAL/ and PNEUMONIA/ inside, or a CSV of path,label")
    calibrate.add_argument("--target-sensitivity", type=float, default=0.95, help="(default: %(default)s)")
    calibrate.add_argument("--out", required=True, help="the profile to write, e.g. site.json")
    calibrate.add_argument("--plot", default=None, help="also draw the operating curve (PNG)")
    calibrate.add_argument("--name", default="site", help="the site's name, shown with the results (default: %(default)s)")
    for option in ("--model", "--backend", "--threads", "--int8-kernels", "--no-gate"):  # as for predict
        action = next(a for a in predict._actions if option in a.option_strings)
        calibrate._add_action(action)
    calibrate.set_defaults(run=run_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return args.run(args)
