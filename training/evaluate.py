"""Evaluate a checkpoint on a split and write what a clinician needs, and where its evidence sits.

    python -m training.evaluate --checkpoint pneunet/weights/pneunet.safetensors --split test --out DIR

The model is scored on what it is served: a checkpoint trained on lung fields brings its segmenter
(``<stem>.lungs.onnx``) and every image goes through ``pneunet.lungs.model_view`` with it; an older model
sees the whole image. Writes into DIR:

- metrics.json ``metrics``: AUC with 95 % bootstrap CI, accuracy, sensitivity, specificity, precision, F1,
  ECE, Brier, confusion matrix, at the stored threshold and at 0.5; roc.png, pr.png, confusion_matrix.png,
  reliability.png, predictions.csv.
- ``external`` (unless ``--no-external``): the same on nih_adult224's split of the same name (adults,
  another hospital) at the stored threshold, and how many of its images got no plausible lung fields;
  nih_predictions.csv.
- ``localisation``: on the RAW evidence map (``training.evidence``; pneumonia target, ReLU'd, before any lung
  masking): energy in the lungs vs a uniform map, pointing game and central-fifth peaks on the split's Kermany
  pneumonia images with a reviewed lung mask; pointing game and energy in nih_adult224's 41 radiologist
  pneumonia boxes (on their own images whatever the split; also for the 13 on val/test images alone, since
  the 28 on train images may have been trained on with image-level labels).
- ``probe``: the shortcut probe (pasted "R", text stamps, erased corners) per data set: flip rate, |Δp|.
- overlays.png (24 random images of the split as the app shows them) and nih_overlays.png (the boxed NIH
  images, radiologist box in green); report.md with all of it.

``--shift-proxy`` (validation only) adds metrics under acquisition changes never used in training, a
test-free stand-in for the train -> test shift. ``--limit N`` scores a class-balanced N images per data set
(smoke runs). Every evaluation on the test split is appended to docs/test_evaluations.csv (one row per
data set), so the number of looks at test is on record.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from pneunet.checkpoint import load_checkpoint, sha256_of
from pneunet.decision import calibrated_probability
from pneunet.predictor import load_lung_finder
from pneunet import metrics
from training import evidence
from pneunet.datasets import DEFAULT_DATA_DIR, Example, REPO_ROOT, data_arguments, read_nih, read_split, subsample
from training.data import XrayDataset, load_images
from training.localisation import summarise_boxes, summarise_lungs
from training.shortcuts import ProbeResult, probe_table
from training.train import predict_logits

TEST_LOG = REPO_ROOT / "docs" / "test_evaluations.csv"
DEFAULT_LUNG_MASKS_DIR = DEFAULT_DATA_DIR.parent / "kermany224_lungs"
NIH_NAME = "nih_adult224"
OVERLAY_COUNT = 24


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(buffer).convert("L")
    return apply


def _border(fraction: float) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        inner = image.resize((round(image.width * (1 - fraction)), round(image.height * (1 - fraction))), Image.Resampling.BICUBIC)
        canvas = Image.new("L", image.size, 0)
        canvas.paste(inner, ((image.width - inner.width) // 2, (image.height - inner.height) // 2))
        return canvas
    return apply


# Acquisition changes that training never applies (or applies far more weakly).
SHIFT_PROXY: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg_quality_10": _jpeg(10),
    "low_resolution_4x": lambda im: im.resize((im.width // 4, im.height // 4), Image.Resampling.BICUBIC).resize(im.size, Image.Resampling.BICUBIC),
    "unsharp_mask": lambda im: im.filter(ImageFilter.UnsharpMask(radius=4, percent=250, threshold=0)),
    "gamma_0.4": lambda im: im.point([round(255 * (v / 255) ** 0.4) for v in range(256)]),
    "black_border_20pct": _border(0.2),
    "rotate_20deg": lambda im: im.rotate(20, resample=Image.Resampling.BICUBIC),
}


def _probabilities(model, config, images, labels, device, lungs=None) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(XrayDataset(images, labels, config, lungs=lungs), batch_size=64)
    logits, labels_np = predict_logits(model, loader, device)
    return calibrated_probability(logits, config.temperature), labels_np


def plot_all(labels: np.ndarray, probabilities: np.ndarray, threshold: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    RocCurveDisplay.from_predictions(labels, probabilities, ax=axis, name="PneuNet", plot_chance_level=True)
    predictions = probabilities >= threshold
    sensitivity = predictions[labels == 1].mean()
    specificity = 1 - predictions[labels == 0].mean()
    axis.plot([1 - specificity], [sensitivity], "o", color="crimson", label=f"threshold {threshold:.2f}")
    axis.legend(loc="lower right")
    axis.set_title(f"ROC — {title}")
    figure.tight_layout()
    figure.savefig(out / "roc.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    PrecisionRecallDisplay.from_predictions(labels, probabilities, ax=axis, name="PneuNet", plot_chance_level=True)
    axis.set_title(f"Precision-recall — {title}")
    figure.tight_layout()
    figure.savefig(out / "pr.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    ConfusionMatrixDisplay.from_predictions(labels, predictions.astype(int), display_labels=["normal", "pneumonia"], ax=axis,
                                            colorbar=False, cmap="Blues")
    axis.set_title(f"threshold {threshold:.2f} — {title}")
    figure.tight_layout()
    figure.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    observed, predicted = calibration_curve(labels, probabilities, n_bins=10, strategy="quantile")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    axis.plot(predicted, observed, "o-", label="PneuNet (temperature-scaled)")
    axis.set_xlabel("predicted pneumonia probability")
    axis.set_ylabel("observed pneumonia fraction")
    axis.legend(loc="upper left")
    axis.set_title(f"Reliability — {title}")
    figure.tight_layout()
    figure.savefig(out / "reliability.png", dpi=110)
    plt.close(figure)


def _finite(value):
    """nan -> None, recursively, so metrics.json stays strict JSON (an empty set of images has no mean)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _fmt(value, digits: int = 2, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.0f} %" if percent else f"{value:.{digits}f}"


def _ci(pair, digits: int = 2) -> str:
    return f"{_fmt(pair[0], digits)}–{_fmt(pair[1], digits)}" if pair else "–"


def kermany_localisation(scored: evidence.Scored, examples: list, masks_dir: Path, size: int) -> dict:
    """Energy in the reviewed lung mask, pointing game and central-fifth peaks, on the pneumonia images."""
    maps, masks, missing = [], [], 0
    for example, heat in zip(examples, scored.maps):
        if example.label != 1:
            continue
        mask = evidence.kermany_mask(masks_dir, example, size)
        if mask is None:
            missing += 1
            continue
        maps.append(np.maximum(heat, 0.0))
        masks.append(mask)
    return {**summarise_lungs(maps, masks), "pneumonia_images_without_mask": missing}


def box_localisation(model, config, lungs, device, nih_dir: Path) -> tuple[dict, dict]:
    """Pointing game and energy against nih_adult224's radiologist pneumonia boxes, on every boxed image
    (whatever the split) and on the val/test ones alone; also returns what the NIH contact sheet needs."""
    boxes = evidence.read_pneumonia_boxes(nih_dir, config.image_size)
    split_of = {e.path: e.split for e in read_nih(nih_dir)}
    paths = sorted(boxes, key=lambda p: (["train", "val", "test"].index(split_of[p]), p))
    images = load_images([Example(p, 1, "", split_of[p]) for p in paths], nih_dir)
    scored = evidence.score_images(model, config, images, lungs, device, with_maps=True)
    cell_px = round(config.image_size / scored.feature_side)
    maps, per_image = evidence.positive(scored.maps), [boxes[p] for p in paths]
    held_out = [i for i, p in enumerate(paths) if split_of[p] in ("val", "test")]
    result = {
        "boxes": int(sum(len(b) for b in per_image)), "cell_px": cell_px, "feature_side": scored.feature_side,
        "images_per_split": dict(Counter(split_of[p] for p in paths)),
        "all": summarise_boxes(maps, per_image, cell_px),
        "val_test": summarise_boxes([maps[i] for i in held_out], [per_image[i] for i in held_out], cell_px),
        "note": "boxes are scored on their own images whatever --split; the train-split images may have been "
                "trained on (image-level labels only), so val_test is the held-out figure",
    }
    return result, {"paths": paths, "images": images, "boxes": per_image, "splits": [split_of[p] for p in paths]}


def write_overlays(model, config, lungs, device, examples, images, probabilities, out: Path, title: str) -> list[str]:
    """overlays.png: ``OVERLAY_COUNT`` random images of the split (numpy default_rng(0)) as the app shows them."""
    count = min(OVERLAY_COUNT, len(images))
    chosen = [int(i) for i in np.random.default_rng(0).choice(len(images), count, replace=False)]
    panels = evidence.overlay_panels(model, config, [images[i] for i in chosen], lungs, device)
    captions, wrong = [], []
    for i, panel in zip(chosen, panels):
        label = examples[i].label
        note = "" if panel.lungs is None or panel.lungs.plausible else " (template lungs)"
        captions.append(f"{config.labels[label]} · p {panel.probability:.3f}{note}\n{Path(examples[i].path).stem[:28]}")
        wrong.append((panel.probability >= config.threshold) != bool(label))
    evidence.contact_sheet(panels, captions, out / "overlays.png", title, columns=6, wrong=wrong)
    return [examples[i].path for i in chosen]


def _map_legend(config) -> str:
    if config.evidence_scale:
        return f"Colour: pneumonia evidence on the model's fixed scale (saturates at {config.evidence_scale:.3g}), inside the lung fields"
    return "Colour: per-image scaled CAM (legacy map: every image's hottest spot is red)"


def write_report(result: dict, out: Path) -> None:
    m, half = result["metrics"], result["metrics"]["at_0.5"]
    cm = m["confusion_matrix"]
    lines = [
        f"# Evaluation: {result['split']} split ({m['n']} images, {m['n_pneumonia']} pneumonia)",
        "",
        f"Checkpoint `{result['checkpoint']}` (sha256 `{result['checkpoint_sha256'][:16]}…`), "
        f"evaluated {result['evaluated_at']} with `{result['command']}`.",
        "",
        f"Input: {result['input']}.",
        "",
        f"- AUC **{m['auc']:.4f}** (95 % bootstrap CI {m['auc_ci95'][0]:.4f}–{m['auc_ci95'][1]:.4f}), "
        f"average precision {m['average_precision']:.4f}",
        f"- Calibration: ECE {m['ece']:.4f}, Brier {m['brier']:.4f}, log loss {m['log_loss']:.4f} "
        f"(temperature {result['temperature']:.3f}, fitted on validation)",
        "",
        "| operating point | accuracy | sensitivity | specificity | precision | F1 |",
        "|---|---|---|---|---|---|",
        f"| stored threshold {m['threshold']:.3f} (validation rule) | {m['accuracy']:.4f} | {m['sensitivity']:.4f} | "
        f"{m['specificity']:.4f} | {m['precision']:.4f} | {m['f1']:.4f} |",
        f"| 0.5 | {half['accuracy']:.4f} | {half['sensitivity']:.4f} | {half['specificity']:.4f} | "
        f"{half['precision']:.4f} | {half['f1']:.4f} |",
        "",
        f"Confusion matrix at the stored threshold: TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}.",
        "",
        "![ROC](roc.png) ![PR](pr.png) ![confusion](confusion_matrix.png) ![reliability](reliability.png)",
    ]
    if result.get("lung_fields"):
        lf = result["lung_fields"]
        lines += ["", f"Lung fields: {lf['implausible']} of {lf['images']} images had no plausible lung fields "
                      f"(scored on the population template instead)."]
    if "shift_proxy" in result:
        lines += ["", "## Shift proxy (validation images under acquisition changes never used in training)", "",
                  "| transform | AUC | sensitivity | specificity | ECE |", "|---|---|---|---|---|"]
        for name, row in result["shift_proxy"].items():
            lines.append(f"| {name} | {row['auc']:.4f} | {row['sensitivity']:.4f} | {row['specificity']:.4f} | {row['ece']:.4f} |")
    if NIH_NAME in result.get("external", {}):
        ext = result["external"][NIH_NAME]
        e = ext["metrics"]
        lines += ["", f"## External check: {NIH_NAME} {ext['split']} ({e['n']} adult films from another hospital, "
                      f"{e['n_pneumonia']} pneumonia; labels mined from reports, noisy)", "",
                  "| AUC (95 % CI) | sensitivity | specificity | ECE | threshold |", "|---|---|---|---|---|",
                  f"| {e['auc']:.4f} ({e['auc_ci95'][0]:.4f}–{e['auc_ci95'][1]:.4f}) | {e['sensitivity']:.4f} | "
                  f"{e['specificity']:.4f} | {e['ece']:.4f} | {e['threshold']:.3f} (stored) |"]
        if ext["lung_fields"] is not None:
            lf = ext["lung_fields"]
            lines += ["", f"{lf['implausible']} of {lf['images']} NIH images had no plausible lung fields"
                      + (": " + "; ".join(f"{n}× {reason}" for reason, n in lf["reasons"].items()) if lf["reasons"] else ".")]
    loc = result["localisation"]
    k = loc["kermany"]
    lines += ["", "## Where the evidence sits", "",
              f"Map: {loc['map']}. Scores are ratios, so the map's scale does not matter; a masked map would score "
              "100 % in the lungs by construction, which is why the raw map is read.", "",
              f"**Kermany {result['split']} pneumonia images with a reviewed lung mask** ({k['images']} images; "
              f"{k['pneumonia_images_without_mask']} without a mask left out; {k['empty_maps']} empty maps):", "",
              "| energy in lungs (95 % CI) | uniform map | pointing (peak in lungs, 95 % CI) | peak in central fifth |",
              "|---|---|---|---|",
              f"| {_fmt(k['energy_in_lungs'])} ({_ci(k['energy_in_lungs_ci'])}) | {_fmt(k['uniform_energy'])} | "
              f"{_fmt(k['pointing'])} ({_ci(k['pointing_ci'])}) | {_fmt(k['peak_in_central_fifth'], percent=True)} |"]
    if "nih_boxes" in loc:
        b = loc["nih_boxes"]
        lines += ["", f"**{NIH_NAME} radiologist pneumonia boxes** ({b['boxes']} boxes; images per split "
                      f"{', '.join(f'{s} {n}' for s, n in b['images_per_split'].items())}; scored on their own images "
                      f"whatever `--split`, one cell = {b['cell_px']} px):", "",
                  "| images | pointing (peak in box, 95 % CI) | within one cell | energy in box (95 % CI) | box area share |",
                  "|---|---|---|---|---|"]
        for name, row in (("all boxed", b["all"]), ("val + test only", b["val_test"])):
            lines.append(f"| {name} ({row['images']}) | {_fmt(row['pointing'])} ({_ci(row['pointing_ci'])}) | "
                         f"{_fmt(row['pointing_within_one_cell'])} | {_fmt(row['energy_in_box'])} ({_ci(row['energy_in_box_ci'])}) | "
                         f"{_fmt(row['box_area_share'])} |")
        lines += ["", f"The {b['images_per_split'].get('train', 0)} train-split boxed images may have been seen in training "
                      "(image-level labels, never the boxes): the val + test row is the held-out one."]
    lines += ["", "## Shortcut probe", "",
              "Pasting a laterality \"R\", a text stamp, or erasing the corners; flipped = the verdict at the stored "
              "threshold changes. A model that reads the lungs should barely move.", ""]
    for name, rows in result["probe"].items():
        lines += [f"**{name}**", "", probe_table([ProbeResult(variant, **row) for variant, row in rows.items()]), ""]
    lines += ["## Overlays", "", f"{len(result['overlays']['images'])} random {result['split']} images (numpy default_rng(0)) "
              "as the app shows them; "
              f"caption: true label, calibrated pneumonia probability (red: wrong at the stored threshold). "
              f"{result['overlays']['legend']}.", "", "![overlays](overlays.png)"]
    if (out / "nih_overlays.png").is_file():
        lines += ["", f"{NIH_NAME}'s boxed pneumonia images, radiologist box in green:", "", "![NIH overlays](nih_overlays.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _log_test(evaluated_at: str, checkpoint, sha256: str, out: str, auc: float) -> None:
    TEST_LOG.parent.mkdir(parents=True, exist_ok=True)
    new = not TEST_LOG.exists()
    with open(TEST_LOG, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["evaluated_at", "checkpoint", "checkpoint_sha256", "out", "auc"])
        writer.writerow([evaluated_at, checkpoint, sha256, out, f"{auc:.4f}"])


def main(args: argparse.Namespace) -> dict:
    if args.shift_proxy and args.split != "val":
        raise SystemExit("--shift-proxy is a validation tool: use it with --split val, never on test")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_checkpoint(args.checkpoint, device)
    model.to(memory_format=torch.channels_last)
    lungs = load_lung_finder(Path(args.checkpoint), config)
    examples = subsample(read_split(Path(args.split_file), args.split), args.limit)
    images = load_images(examples, Path(args.data_dir))
    labels = [e.label for e in examples]
    labels_np = np.asarray(labels)
    scored = evidence.score_images(model, config, images, lungs, device, with_maps=True)
    probabilities = scored.probabilities
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m training.evaluate --checkpoint {args.checkpoint} --split {args.split} --out {args.out}"
    command += (" --shift-proxy" if args.shift_proxy else "") + (" --no-external" if args.no_external else "")
    command += f" --limit {args.limit}" if args.limit else ""
    result = {
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": sha256_of(args.checkpoint),
        "command": command,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "temperature": config.temperature,
        "input": ("lung fields only (segmenter " + str(lungs.onnx_path) + ")") if lungs else "whole image (no lung fields)",
        "metrics": metrics.summary(labels_np, probabilities, config.threshold),
    }
    if lungs is not None:
        result["lung_fields"] = evidence.lung_field_check(images, config, lungs)
    if args.shift_proxy:
        result["shift_proxy"] = {}
        for name, transform in SHIFT_PROXY.items():
            shifted, _ = _probabilities(model, config, [transform(im) for im in images], labels, device, lungs)
            result["shift_proxy"][name] = metrics.summary(labels_np, shifted, config.threshold, ci_resamples=0)
        result["shift_proxy_mean_auc"] = float(np.mean([row["auc"] for row in result["shift_proxy"].values()]))

    result["localisation"] = {"map": scored.map_kind,
                              "kermany": kermany_localisation(scored, examples, Path(args.lung_masks), config.image_size)}
    result["probe"] = {"kermany": evidence.probe_rows(model, config, images, lungs, device, probabilities)}
    result["external"] = {}
    nih_dir = Path(args.nih_dir)
    if not args.no_external:
        nih_examples = subsample(read_nih(nih_dir, args.split), args.limit)
        nih_images = load_images(nih_examples, nih_dir)
        nih_scored = evidence.score_images(model, config, nih_images, lungs, device)
        result["external"][NIH_NAME] = {
            "split": args.split, "data_dir": str(nih_dir),
            "metrics": metrics.summary(np.asarray([e.label for e in nih_examples]), nih_scored.probabilities, config.threshold),
            "lung_fields": evidence.lung_field_check(nih_images, config, lungs) if lungs is not None else None,
        }
        result["probe"][NIH_NAME] = evidence.probe_rows(model, config, nih_images, lungs, device, nih_scored.probabilities)
        result["localisation"]["nih_boxes"], boxed = box_localisation(model, config, lungs, device, nih_dir)
        (out / "nih_predictions.csv").write_text(
            "path,label,pneumonia_probability\n"
            + "".join(f"{e.path},{e.label},{p:.6f}\n" for e, p in zip(nih_examples, nih_scored.probabilities)))

    name = Path(args.checkpoint).name
    legend = _map_legend(config)
    shown = write_overlays(model, config, lungs, device, examples, images, probabilities, out,
                           f"{name} on Kermany {args.split}: {min(OVERLAY_COUNT, len(images))} random images (seed 0); "
                           f"true label · calibrated p (red: wrong at threshold {config.threshold:.2f})\n{legend}")
    result["overlays"] = {"file": "overlays.png", "images": shown, "legend": legend}
    if not args.no_external:
        panels = evidence.overlay_panels(model, config, boxed["images"], lungs, device, boxes=boxed["boxes"])
        captions = [f"{split} · p {panel.probability:.3f}\n{Path(path).stem}"
                    for split, panel, path in zip(boxed["splits"], panels, boxed["paths"])]
        evidence.contact_sheet(panels, captions, out / "nih_overlays.png",
                               f"{name} on {NIH_NAME}'s {len(panels)} images with a radiologist pneumonia box (green); "
                               f"split · calibrated p (red: called normal at {config.threshold:.2f})\n{legend}",
                               columns=7, wrong=[panel.probability < config.threshold for panel in panels])

    result = _finite(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "predictions.csv").write_text(
        "path,label,pneumonia_probability\n"
        + "".join(f"{e.path},{e.label},{p:.6f}\n" for e, p in zip(examples, probabilities))
    )
    plot_all(labels_np, probabilities, config.threshold, out, f"{args.split} (n={len(labels)})")
    write_report(result, out)
    if args.split == "test":
        _log_test(result["evaluated_at"], args.checkpoint, result["checkpoint_sha256"], args.out, result["metrics"]["auc"])
        if NIH_NAME in result["external"]:
            _log_test(result["evaluated_at"], args.checkpoint, result["checkpoint_sha256"], f"{args.out} ({NIH_NAME})",
                      result["external"][NIH_NAME]["metrics"]["auc"])
    m = result["metrics"]
    print(f"{args.split}: n={m['n']} AUC {m['auc']:.4f} [{m['auc_ci95'][0]:.4f}, {m['auc_ci95'][1]:.4f}] "
          f"acc {m['accuracy']:.4f} sens {m['sensitivity']:.4f} spec {m['specificity']:.4f} ECE {m['ece']:.4f} "
          f"(threshold {m['threshold']:.3f}) -> {out}")
    if args.shift_proxy:
        print(f"shift proxy mean AUC {result['shift_proxy_mean_auc']:.4f}: "
              + ", ".join(f"{k} {v['auc']:.4f}" for k, v in result["shift_proxy"].items()))
    if NIH_NAME in result["external"]:
        e = result["external"][NIH_NAME]["metrics"]
        lf = result["external"][NIH_NAME]["lung_fields"]
        print(f"{NIH_NAME} {args.split}: n={e['n']} AUC {e['auc']:.4f} [{e['auc_ci95'][0]:.4f}, {e['auc_ci95'][1]:.4f}] "
              f"sens {e['sensitivity']:.4f} spec {e['specificity']:.4f} ECE {e['ece']:.4f}"
              + (f"; {lf['implausible']}/{lf['images']} without plausible lung fields" if lf else ""))
    k = result["localisation"]["kermany"]
    print(f"localisation (Kermany {args.split} pneumonia, n={k['images']}): energy in lungs {_fmt(k['energy_in_lungs'])} "
          f"(uniform {_fmt(k['uniform_energy'])}), pointing {_fmt(k['pointing'])}, "
          f"peak in central fifth {_fmt(k['peak_in_central_fifth'], percent=True)}")
    if "nih_boxes" in result["localisation"]:
        b = result["localisation"]["nih_boxes"]
        print(f"NIH boxes: pointing {_fmt(b['all']['pointing'])} (all {b['all']['images']}), "
              f"{_fmt(b['val_test']['pointing'])} (val+test {b['val_test']['images']}); "
              f"energy in box {_fmt(b['all']['energy_in_box'])} vs area {_fmt(b['all']['box_area_share'])}")
    for data_set, rows in result["probe"].items():
        print(f"probe {data_set}: " + ", ".join(f"{v} flips {_fmt(r['flip_rate'], percent=True)} |dp| {r['mean_abs_delta']:.3f}"
                                                 for v, r in rows.items()))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out="required", nih=True)], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model .safetensors (with its .json sidecar)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="(default: %(default)s)")
    parser.add_argument("--lung-masks", default=str(DEFAULT_LUNG_MASKS_DIR),
                        help="reviewed Kermany lung masks, for localisation (default: %(default)s)")
    parser.add_argument("--no-external", action="store_true",
                        help="skip nih_adult224 (external metrics, its probe and its boxes; default: include it)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score at most N class-balanced images per data set, for smoke runs (default: all); "
                             "the 41 boxed NIH images are always all scored")
    parser.add_argument("--shift-proxy", action="store_true", help="also score validation under held-out acquisition changes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
