"""Fit the input gate of a checkpoint: PCA of pooled features of TRAIN X-rays, threshold on VALIDATION X-rays.

    python -m training.fit_gate --checkpoint pneunet/weights/pneunet.safetensors

Writes ``<checkpoint>.gate.safetensors`` (numpy-readable, no torch needed to use it). The test split is
never touched here; ``python -m training.gate_report`` measures the gate on it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneunet.checkpoint import sha256_of
from pneunet.gate import InputGate, PpcaDistance, colourfulness, gate_path_for, grey_spread, image_descriptor
from pneunet.preprocessing import decode
from pneunet.backends import default_checkpoint
from pneunet.predictor import Predictor
from pneunet.datasets import data_arguments, read_split, subsample


def pooled_features(predictor: Predictor, paths: list[Path], batch_size: int = 32, description: str = "features") -> np.ndarray:
    """(N, C) pooled features of image files, through the predictor's own preprocessing."""
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc=description, unit="batch"):
        inputs = np.stack([predictor.prepare(path).model_input for path in paths[start:start + batch_size]])
        chunks.append(np.stack([result.pooled_features for result in predictor.predict_inputs(inputs)]))
    return np.concatenate(chunks)


def image_statistics(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Colourfulness and grey spread of each decoded image (what ``InputGate.check_image`` looks at)."""
    decoded = [decode(path) for path in paths]
    return np.array([colourfulness(image) for image in decoded]), np.array([grey_spread(image) for image in decoded])


def descriptors(paths: list[Path], description: str = "appearance") -> np.ndarray:
    """(N, D) ``image_descriptor`` of each decoded image (the appearance check's input)."""
    return np.stack([image_descriptor(decode(path)) for path in tqdm(paths, desc=description, unit="image")])


def main(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    predictor = Predictor.load(checkpoint, gate=False)
    data_dir = Path(args.data_dir)
    train = subsample(read_split(Path(args.split_file), "train"), args.train_limit, args.seed)
    val = read_split(Path(args.split_file), "val")
    started = time.perf_counter()
    train_features = pooled_features(predictor, [data_dir / e.path for e in train], description="train")
    val_paths = [data_dir / e.path for e in val]
    val_features = pooled_features(predictor, val_paths, description="val")
    gate = InputGate.fit(train_features, dims=args.dims)
    gate.calibrate(val_features, quantile=args.quantile, margin=args.margin)
    train_descriptors = descriptors([data_dir / e.path for e in train], "train appearance")
    val_descriptors = descriptors(val_paths, "val appearance")
    gate.appearance = PpcaDistance.fit(train_descriptors, dims=args.appearance_dims)
    gate.appearance.calibrate(val_descriptors, quantile=args.quantile, margin=args.margin)
    colour, spread = image_statistics(val_paths)
    # The image-level limits must never refuse a validation X-ray; keep a wide margin above/below them.
    gate.max_colourfulness = float(max(gate.max_colourfulness, 2.0 * colour.max()))
    gate.min_grey_spread = float(min(gate.min_grey_spread, 0.5 * spread.min()))
    out = Path(args.out) if args.out else gate_path_for(checkpoint)
    val_distance = gate.distance(val_features)
    gate.save(out, metadata={
        "command": f"python -m training.fit_gate --checkpoint {checkpoint}",
        "checkpoint": checkpoint.name, "checkpoint_sha256": sha256_of(checkpoint), "train_images": len(train), "val_images": len(val), "dims": int(gate.components.shape[0]),
        "threshold_rule": f"{args.margin} x the {args.quantile} quantile of validation X-ray distances",
        "val_distance_median": float(np.median(val_distance)), "val_colourfulness_max": float(colour.max()),
        "val_grey_spread_min": float(spread.min()), "appearance_dims": int(gate.appearance.components.shape[0]),
        "appearance_threshold_rule": f"{args.margin} x the {args.quantile} quantile of validation X-ray appearance distances",
        "val_appearance_distance_median": float(np.median(gate.appearance.distance(val_descriptors))),
    })
    print(f"wrote {out}: {len(train)} train / {len(val)} val X-rays, {gate.components.shape[0]} dims, "
          f"threshold {gate.threshold:.3f} (val median {np.median(val_distance):.3f}), "
          f"colourfulness limit {gate.max_colourfulness:.1f} (val max {colour.max():.1f}), "
          f"grey spread floor {gate.min_grey_spread:.1f} (val min {spread.min():.1f}), "
          f"appearance threshold {gate.appearance.threshold:.3f} ({gate.appearance.components.shape[0]} dims); "
          f"{time.perf_counter() - started:.0f}s")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=None, out_help="gate file (default: <checkpoint>.gate.safetensors beside it)")], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model .safetensors (default: $PNEUNET_CHECKPOINT, else the shipped model)")
    parser.add_argument("--train-limit", type=int, default=None, help="fit on at most this many train images (default: all)")
    parser.add_argument("--dims", type=int, default=64, help="principal directions kept (default: %(default)s)")
    parser.add_argument("--appearance-dims", type=int, default=16, help="principal directions of the appearance check (default: %(default)s)")
    parser.add_argument("--quantile", type=float, default=0.995, help="validation quantile for the threshold (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=1.1, help="threshold = margin x that quantile (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
