"""Measure the input gate: false rejects on the 624 test X-rays, rejects on ~100 non-X-ray images.

    python -m training.gate_report --checkpoint pneunet/weights/pneunet.safetensors   # writes docs/gate_report.md

Needs the gate fitted first (``python -m training.fit_gate``) and scikit-image for its sample images.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneunet.gate import NotAnXrayError, gate_path_for
from pneunet.predictor import Predictor, default_checkpoint
from training.data import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, REPO_ROOT, read_split
from training.non_xrays import non_xray_images


def gate_verdict(predictor: Predictor, source) -> tuple[bool, str, float | None]:
    """(refused, stage, distance): stage is 'image' (colour/blank), 'features' or '' when accepted."""
    try:
        prepared = predictor.prepare(source)
    except NotAnXrayError:
        return True, "image", None
    result = predictor.predict_inputs(prepared.model_input[None])[0]
    return bool(result.refusal), "features" if result.refusal else "", result.gate_distance


def main(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    predictor = Predictor.load(checkpoint)
    if predictor.gate is None:
        raise SystemExit(f"{gate_path_for(checkpoint)} missing: run python -m training.fit_gate --checkpoint {checkpoint}")
    data_dir = Path(args.data_dir)
    started = time.perf_counter()

    test = read_split(Path(args.split_file), "test")
    xray_refusals, xray_distances = [], []
    for example in tqdm(test, desc="test X-rays", unit="image"):
        refused, stage, distance = gate_verdict(predictor, data_dir / example.path)
        xray_distances.append(distance if distance is not None else np.nan)
        if refused:
            xray_refusals.append((example.path, stage, distance))
    full_size = sorted((data_dir / "val_original").rglob("*.jpeg"))
    full_size_refused = [p.relative_to(data_dir).as_posix() for p in full_size if gate_verdict(predictor, p)[0]]

    by_category: dict[str, list[tuple[str, bool, str, float | None]]] = defaultdict(list)
    for category, name, image in tqdm(list(non_xray_images()), desc="non-X-rays", unit="image"):
        by_category[category].append((name, *gate_verdict(predictor, image)))
    non_xray_total = sum(len(rows) for rows in by_category.values())
    non_xray_refused = sum(refused for rows in by_category.values() for _, refused, _, _ in rows)

    gate = predictor.gate
    lines = [
        "# Input gate: measured",
        "",
        f"Written by `python -m training.gate_report --checkpoint {checkpoint.name}` "
        f"({time.perf_counter() - started:.0f} s). The gate refuses an upload that is not a chest X-ray: "
        "an image-level check (colourfulness, blank frame) and a feature-level check (probabilistic-PCA "
        "Mahalanobis distance of the model's pooled features to the training X-rays; "
        f"{gate.components.shape[0]} principal directions, fitted on train, threshold on validation). "
        "See `pneunet/gate.py`.",
        "",
        f"- Gate file: `{gate_path_for(checkpoint).name}`; feature threshold **{gate.threshold:.3f}**, "
        f"colourfulness limit {gate.max_colourfulness:.1f}, blank if grey spread < {gate.min_grey_spread:.1f}.",
        f"- **False-reject rate on the {len(test)} test X-rays: {len(xray_refusals) / len(test):.2%}** "
        f"({len(xray_refusals)} refused; target <= 1 %). Test distances: median "
        f"{np.nanmedian(xray_distances):.3f}, 99th percentile {np.nanpercentile(xray_distances, 99):.3f}, "
        f"max {np.nanmax(xray_distances):.3f}.",
        f"- Full-resolution X-rays (`val_original`, {len(full_size)} images): {len(full_size_refused)} refused.",
        f"- **Reject rate on {non_xray_total} non-X-ray images: {non_xray_refused / non_xray_total:.2%}** "
        f"({non_xray_refused} refused; target >= 95 %).",
        "",
        "| non-X-ray category | images | refused | by image check | by feature check | accepted (distance) |",
        "|---|---|---|---|---|---|",
    ]
    for category, rows in by_category.items():
        accepted = [f"{name} ({distance:.2f})" for name, refused, _, distance in rows if not refused]
        lines.append(
            f"| {category} | {len(rows)} | {sum(r[1] for r in rows)} | {sum(r[2] == 'image' for r in rows)} | "
            f"{sum(r[2] == 'features' for r in rows)} | {', '.join(accepted) or '-'} |")
    if xray_refusals:
        lines += ["", "Test X-rays refused: " + ", ".join(
            f"`{path}` ({stage}{f', {d:.2f}' if d is not None else ''})" for path, stage, d in xray_refusals) + "."]
    if full_size_refused:
        lines += ["", "Full-resolution X-rays refused: " + ", ".join(f"`{p}`" for p in full_size_refused) + "."]
    lines += ["", "The non-X-ray images come from `training/non_xrays.py` (scikit-image sample images, LFW faces, "
              "rendered text, synthetic scenes, UI mock-ups, noise, blank frames). The gate only knows "
              "paediatric AP chest X-rays from one centre: adult or lateral films, other body parts and "
              "other modalities were not measured here.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[6:10]))
    print(f"wrote {out}")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model .safetensors (default: $PNEUNET_CHECKPOINT, else the shipped model)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="Kermany 224 folder (default: %(default)s)")
    parser.add_argument("--split-file", default=str(DEFAULT_SPLIT_FILE), help="split CSV (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "gate_report.md"), help="report (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
