"""Fit the input gate of a checkpoint: PCA of pooled features of TRAIN X-rays, threshold on VALIDATION X-rays.

The refusing checks (not a chest X-ray) are fitted on Kermany AND nih_adult224 train, thresholds set so that
each validation set passes at the quantile; the population check (flag: unlike the children the model
mostly learned from) on Kermany alone.

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
from pneunet.gate import InputGate, LinearScore, PpcaDistance, colourfulness, gate_path_for, grey_spread, image_descriptor
from pneunet.preprocessing import decode
from pneunet.backends import default_checkpoint
from pneunet.predictor import Predictor
from pneunet.datasets import data_arguments, read_nih, read_split, subsample


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


def fit_population_score(children: np.ndarray, others: np.ndarray) -> LinearScore:
    """Logistic regression (scikit-learn, L2, classes balanced) telling Kermany's descriptors (0) from the other
    chest X-rays' (1), stored as a numpy linear score."""
    from sklearn.linear_model import LogisticRegression

    vectors = np.concatenate([children, others])
    mean, scale = vectors.mean(axis=0), vectors.std(axis=0) + 1e-6
    model = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced")
    model.fit((vectors - mean) / scale, np.r_[np.zeros(len(children)), np.ones(len(others))])
    return LinearScore(mean, scale, model.coef_[0], float(model.intercept_[0]))


def flag_population(gate: InputGate, descriptors: np.ndarray) -> np.ndarray:
    """Per row: whether the population check flags it (what ``InputGate.population_warning`` does per image)."""
    far = gate.population.distance(descriptors) > gate.population.threshold
    if gate.population_score is None:
        return far
    return far | (gate.population_score.score(descriptors) > gate.population_score.threshold)


def main(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    predictor = Predictor.load(checkpoint, gate=False)
    data_dir, nih_dir = Path(args.data_dir), Path(args.nih_dir)
    train = subsample(read_split(Path(args.split_file), "train"), args.train_limit, args.seed)
    val = read_split(Path(args.split_file), "val")
    started = time.perf_counter()
    # Every kind of chest X-ray PneuNet has: "not a chest X-ray" must never be said of an adult's film.
    sets = {"kermany": ([data_dir / e.path for e in train], [data_dir / e.path for e in val])}
    if not args.kermany_only:
        sets["nih_adult224"] = ([nih_dir / e.path for e in read_nih(nih_dir, "train")],
                                [nih_dir / e.path for e in read_nih(nih_dir, "val")])
    features = {name: (pooled_features(predictor, fit, description=f"{name} train"),
                       pooled_features(predictor, held_out, description=f"{name} val")) for name, (fit, held_out) in sets.items()}
    looks = {name: (descriptors(fit, f"{name} train appearance"), descriptors(held_out, f"{name} val appearance"))
             for name, (fit, held_out) in sets.items()}
    gate = InputGate.fit(np.concatenate([f for f, _ in features.values()]), dims=args.dims)
    # Each validation set on its own passes at the quantile: the rarer adult films are not outvoted by children's.
    gate.threshold = max(args.margin * float(np.quantile(gate.distance(v), args.quantile)) for _, v in features.values())
    # Appearance: one distance per population (children, adults), each with its own validation threshold; an
    # image is refused only when far from both. One fit on the pooled sets let the rarer adults' spread widen
    # the children's limit, and let non-X-rays through (90.7 % refused instead of 100 %).
    gate.appearance = PpcaDistance.fit(looks["kermany"][0], dims=args.appearance_dims)
    gate.appearance.calibrate(looks["kermany"][1], quantile=args.quantile, margin=args.margin)
    if "nih_adult224" in looks:
        gate.appearance_adult = PpcaDistance.fit(looks["nih_adult224"][0], dims=args.appearance_dims)
        gate.appearance_adult.calibrate(looks["nih_adult224"][1], quantile=args.quantile, margin=args.margin)
    # The training population the model mostly learned from: Kermany's children. Flag, never refuse. On the
    # image descriptor: the model's own features (trained on both populations, lungs only) barely tell them apart.
    kermany_train, kermany_val = looks["kermany"]
    gate.population = PpcaDistance.fit(kermany_train, dims=args.appearance_dims)
    gate.population.calibrate(kermany_val, quantile=args.population_quantile, margin=1.0)
    if "nih_adult224" in looks:
        gate.population_score = fit_population_score(kermany_train, looks["nih_adult224"][0])
        gate.population_score.threshold = float(np.quantile(gate.population_score.score(kermany_val), args.population_quantile))
    all_val = [path for _, held_out in sets.values() for path in held_out]
    colour, spread = image_statistics(all_val)
    # The image-level limits must never refuse a validation X-ray; keep a wide margin above/below them.
    gate.max_colourfulness = float(max(gate.max_colourfulness, 2.0 * colour.max()))
    gate.min_grey_spread = float(min(gate.min_grey_spread, 0.5 * spread.min()))
    out = Path(args.out) if args.out else gate_path_for(checkpoint)
    val_distance = {name: gate.distance(v) for name, (_, v) in features.items()}
    flagged = {name: float(np.mean(flag_population(gate, v))) for name, (_, v) in looks.items()}
    gate.save(out, metadata={
        "command": f"python -m training.fit_gate --checkpoint {checkpoint}" + (" --kermany-only" if args.kermany_only else ""),
        "checkpoint": checkpoint.name, "checkpoint_sha256": sha256_of(checkpoint),
        "fitted_on": {name: {"train": len(fit), "val": len(held_out)} for name, (fit, held_out) in sets.items()},
        "dims": int(gate.components.shape[0]),
        "threshold_rule": f"{args.margin} x the {args.quantile} quantile of each validation set's X-ray distances, the larger",
        "val_distance_median": {name: float(np.median(d)) for name, d in val_distance.items()},
        "val_colourfulness_max": float(colour.max()), "val_grey_spread_min": float(spread.min()),
        "appearance_dims": int(gate.appearance.components.shape[0]),
        "appearance_threshold_rule": (f"per population (Kermany, nih_adult224): {args.margin} x the {args.quantile} quantile "
                                      "of its validation appearance distances; refused when beyond both"),
        "population": (f"image descriptors: PPCA distance to Kermany train, and a logistic score Kermany vs nih_adult224 "
                       f"train; flagged when either is above its {args.population_quantile} quantile on Kermany val"),
        "val_flagged_as_outside_population": flagged,
    })
    print(f"wrote {out}: " + ", ".join(f"{name} {len(fit)} train / {len(held_out)} val" for name, (fit, held_out) in sets.items())
          + f"; feature threshold {gate.threshold:.3f}, appearance thresholds {gate.appearance.threshold:.3f}"
          + (f" / adults {gate.appearance_adult.threshold:.3f}" if gate.appearance_adult else "") + ", "
          f"colourfulness limit {gate.max_colourfulness:.1f}, grey spread floor {gate.min_grey_spread:.1f}; "
          f"population threshold {gate.population.threshold:.3f}, val flagged {flagged}; "
          f"{time.perf_counter() - started:.0f}s")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=None, out_help="gate file (default: <checkpoint>.gate.safetensors beside it)", nih=True)], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model .safetensors (default: $PNEUNET_CHECKPOINT, else the shipped model)")
    parser.add_argument("--train-limit", type=int, default=None, help="fit on at most this many train images (default: all)")
    parser.add_argument("--dims", type=int, default=64, help="principal directions kept (default: %(default)s)")
    parser.add_argument("--appearance-dims", type=int, default=32, help="principal directions of the appearance check (default: %(default)s)")
    parser.add_argument("--quantile", type=float, default=0.995, help="validation quantile for the threshold (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=1.1, help="threshold = margin x that quantile (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed (default: %(default)s)")
    parser.add_argument("--population-quantile", type=float, default=0.99,
                        help="Kermany validation quantile above which an X-ray is flagged as unlike the training "
                             "population (default: %(default)s)")
    parser.add_argument("--kermany-only", action="store_true", help="fit the refusing checks on Kermany alone (before issue 12)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
