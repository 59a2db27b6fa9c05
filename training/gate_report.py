"""Measure the input gate: refusals of real chest X-rays (Kermany test, nih_adult224 test), refusals of ~100
non-X-ray images, and how often real X-rays are flagged as unlike the training population.

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

from pneunet.gate import colourfulness, gate_path_for, grey_spread, image_descriptor
from pneunet.lungs import model_view
from pneunet.preprocessing import decode
from pneunet.backends import default_checkpoint
from pneunet.predictor import Predictor
from pneunet.datasets import REPO_ROOT, data_arguments, read_nih, read_split
from pneunet.non_xrays import non_xray_images


def gate_verdict(predictor: Predictor, source) -> tuple[bool, str, float | None, float | None, bool]:
    """(refused, stage, appearance distance, feature distance): stage is the first check that refuses,
    'image' (colour / blank), 'appearance' or 'features', or '' when accepted. Both distances are
    computed for every image, so each check can also be judged on its own. Last: flagged as unlike the
    training population (the warning an accepted X-ray gets)."""
    gate = predictor.gate
    decoded = decode(source)
    simple = colourfulness(decoded) > gate.max_colourfulness or grey_spread(decoded) < gate.min_grey_spread
    appearance = gate.appearance_ratio(image_descriptor(decoded)) if gate.appearance is not None else None
    model_input, lungs = model_view(decoded, predictor.config, predictor.lungs)
    result = predictor.predict_inputs(model_input[None], lungs=[lungs])[0]
    stage = ("image" if simple else "appearance" if appearance is not None and appearance > 1.0
             else "features" if result.refusal else "")
    return bool(stage), stage, appearance, result.gate_distance, gate.population_warning(decoded) is not None


def main(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    predictor = Predictor.load(checkpoint)
    if predictor.gate is None:
        raise SystemExit(f"{gate_path_for(checkpoint)} missing: run python -m training.fit_gate --checkpoint {checkpoint}")
    data_dir = Path(args.data_dir)
    started = time.perf_counter()

    nih_dir = Path(args.nih_dir)
    xray_sets = {"Kermany test": [(e.path, data_dir / e.path) for e in read_split(Path(args.split_file), "test")],
                 "nih_adult224 test": [(e.path, nih_dir / e.path) for e in read_nih(nih_dir, "test")]}
    measured = {}
    for name, files in xray_sets.items():
        refusals, flagged, appearance_distances, feature_distances = [], 0, [], []
        for relative, path in tqdm(files, desc=name, unit="image"):
            refused, stage, appearance, distance, flag = gate_verdict(predictor, path)
            appearance_distances.append(appearance if appearance is not None else np.nan)
            feature_distances.append(distance)
            flagged += int(flag and not refused)
            if refused:
                refusals.append((relative, stage, appearance, distance))
        measured[name] = {"images": len(files), "refusals": refusals, "flagged": flagged,
                          "appearance": appearance_distances, "features": feature_distances}
    full_size = sorted((data_dir / "val_original").rglob("*.jpeg"))
    full_size_refused = [p.relative_to(data_dir).as_posix() for p in full_size if gate_verdict(predictor, p)[0]]

    by_category: dict[str, list[tuple[str, bool, str, float | None, float]]] = defaultdict(list)
    for category, name, image in tqdm(list(non_xray_images()), desc="non-X-rays", unit="image"):
        by_category[category].append((name, *gate_verdict(predictor, image)))
    rows_all = [row for rows in by_category.values() for row in rows]
    non_xray_total = len(rows_all)
    non_xray_refused = sum(row[1] for row in rows_all)
    gate = predictor.gate
    appearance_alone = sum(row[3] is not None and row[3] > 1.0 for row in rows_all)
    features_alone = sum(row[4] > gate.threshold for row in rows_all)

    def spread(values) -> str:
        return (f"median {np.nanmedian(values):.3f}, 99th percentile {np.nanpercentile(values, 99):.3f}, "
                f"max {np.nanmax(values):.3f}")

    lines = [
        "# Input gate: measured",
        "",
        f"Written by `python -m training.gate_report --checkpoint {checkpoint.name}` "
        f"({time.perf_counter() - started:.0f} s). The gate refuses an upload that is not a chest X-ray with "
        "three checks (see `pneunet/gate.py`): an image check (colourfulness, blank frame); an *appearance* "
        "check, a probabilistic-PCA Mahalanobis distance of a model-free image descriptor (8 x 8 layout of "
        "the equalised image, grey-level histogram, edge and fine-detail statistics, left-right symmetry; "
        f"{gate.appearance.components.shape[0]} principal directions) to the training X-rays; and a feature "
        "check, the same kind of distance on the model's pooled features "
        f"({gate.components.shape[0]} principal directions). Both distances are fitted on the train X-rays of "
        "Kermany and nih_adult224 (every kind of chest X-ray PneuNet has), their thresholds are 1.1 x the 99.5th "
        "percentile of each set's validation X-rays (the appearance check keeps one distance per population and refuses only what is far from both; the feature check takes the larger threshold); no test image and no non-X-ray image set a "
        "threshold. A real chest X-ray unlike the children the model mostly learned from is not refused: it is "
        "scored and flagged with a warning (feature distance to Kermany train alone, above the 99th percentile of "
        "Kermany validation).",
        "",
        f"- Gate file: `{gate_path_for(checkpoint).name}`; appearance thresholds **{gate.appearance.threshold:.3f}** (children) "
        f"and **{gate.appearance_adult.threshold if gate.appearance_adult else float('nan'):.3f}** (adults; appearance "
        "figures below are distance / limit to the nearer population, refused above 1), "
        f"feature threshold **{gate.threshold:.3f}**, colourfulness limit {gate.max_colourfulness:.1f}, "
        f"blank if grey spread < {gate.min_grey_spread:.1f}.",
        *[f"- **{name}: {len(m['refusals']) / m['images']:.2%} of {m['images']} real chest X-rays refused** "
          f"({len(m['refusals'])}; target <= 1 %); **{m['flagged'] / m['images']:.1%} flagged as unlike the training "
          f"population** ({m['flagged']}). Appearance distances: {spread(m['appearance'])}; feature distances: "
          f"{spread(m['features'])}." for name, m in measured.items()],
        f"- Full-resolution X-rays (`val_original`, {len(full_size)} images): {len(full_size_refused)} refused.",
        f"- **Reject rate on {non_xray_total} non-X-ray images: {non_xray_refused / non_xray_total:.2%}** "
        f"({non_xray_refused} refused; target >= 99 %). Each check on its own: appearance "
        f"{appearance_alone / non_xray_total:.2%}, features {features_alone / non_xray_total:.2%}.",
        "",
        "| non-X-ray category | images | refused | by image check | by appearance | by feature check | "
        "feature check alone | accepted (appearance, feature distance) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for category, rows in by_category.items():
        accepted = [f"{name} ({a:.2f}, {d:.2f})" for name, refused, _, a, d, _ in rows if not refused]
        lines.append(
            f"| {category} | {len(rows)} | {sum(r[1] for r in rows)} | {sum(r[2] == 'image' for r in rows)} | "
            f"{sum(r[2] == 'appearance' for r in rows)} | {sum(r[2] == 'features' for r in rows)} | "
            f"{sum(r[4] > gate.threshold for r in rows)} | {', '.join(accepted) or '-'} |")
    for name, m in measured.items():
        if m["refusals"]:
            lines += ["", f"{name} X-rays refused: " + ", ".join(
                f"`{path}` ({stage}, appearance {a:.2f}, features {d:.2f})" for path, stage, a, d in m["refusals"]) + "."]
    if full_size_refused:
        lines += ["", "Full-resolution X-rays refused: " + ", ".join(f"`{p}`" for p in full_size_refused) + "."]
    lines += ["", "The non-X-ray images come from `pneunet/non_xrays.py` (scikit-image sample images, LFW faces, "
              "rendered text, synthetic scenes, UI mock-ups, noise, blank frames). The descriptor's design was "
              "compared during development on a separate set, `non_xray_fitting_images` (other seed, other "
              "faces and sizes, gratings and line drawings, no scikit-image photo). With one appearance distance per "
              "population (issue 12), its size was picked on that set alone: 8, 16 and 32 principal directions let 1, "
              "2 and 0 of its 68 images through, so 32 (the X-ray splits refused none with any of the three). Earlier "
              "(one population) the 16-direction variant had been picked among six. "
              "The feature check refuses none of these non-X-rays with this model (whose features see only the lung "
              "fields) and 1 of the 68 development ones; it is kept as a second line, and a real X-ray it refuses "
              "above is the open question for the next gate. "
              "No non-X-ray image and no test image sets a threshold. The gate knows paediatric AP chest X-rays from one "
              "centre and adult AP/PA films from NIH; lateral films, CT slices, other body parts and other modalities "
              "are not in the non-X-ray set, and an X-ray of another body part may well pass.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[6:10]))
    print(f"wrote {out}")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=str(REPO_ROOT / "docs" / "gate_report.md"), out_help="report", nih=True)], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model .safetensors (default: $PNEUNET_CHECKPOINT, else the shipped model)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
