"""Evaluate a checkpoint on a split and write what a clinician needs.

    python -m training.evaluate --checkpoint pneunet/weights/pneunet.safetensors --split test --out DIR

Writes DIR/metrics.json (AUC with 95 % bootstrap CI, accuracy, sensitivity, specificity, precision, F1,
ECE, Brier, confusion matrix, at the stored threshold and at 0.5), roc.png, pr.png,
confusion_matrix.png, reliability.png and report.md. ``--shift-proxy`` (validation only) adds metrics
under acquisition changes never used in training, a test-free stand-in for the train -> test shift.
Every evaluation on the test split is appended to docs/test_evaluations.csv, so the number of looks at
test is on record.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from pneunet.checkpoint import load_checkpoint, sha256_of
from training import metrics
from training.data import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, REPO_ROOT, XrayDataset, load_images, read_split
from training.train import predict_logits

TEST_LOG = REPO_ROOT / "docs" / "test_evaluations.csv"


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


def _probabilities(model, config, images, labels, device) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(XrayDataset(images, labels, config), batch_size=64)
    logits, labels_np = predict_logits(model, loader, device)
    return metrics.sigmoid(logits / config.temperature), labels_np


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


def write_report(result: dict, out: Path) -> None:
    m, half = result["metrics"], result["metrics"]["at_0.5"]
    cm = m["confusion_matrix"]
    lines = [
        f"# Evaluation: {result['split']} split ({m['n']} images, {m['n_pneumonia']} pneumonia)",
        "",
        f"Checkpoint `{result['checkpoint']}` (sha256 `{result['checkpoint_sha256'][:16]}…`), "
        f"evaluated {result['evaluated_at']} with `{result['command']}`.",
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
    if "shift_proxy" in result:
        lines += ["", "## Shift proxy (validation images under acquisition changes never used in training)", "",
                  "| transform | AUC | sensitivity | specificity | ECE |", "|---|---|---|---|---|"]
        for name, row in result["shift_proxy"].items():
            lines.append(f"| {name} | {row['auc']:.4f} | {row['sensitivity']:.4f} | {row['specificity']:.4f} | {row['ece']:.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> dict:
    if args.shift_proxy and args.split != "val":
        raise SystemExit("--shift-proxy is a validation tool: use it with --split val, never on test")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_checkpoint(args.checkpoint, device)
    model.to(memory_format=torch.channels_last)
    examples = read_split(Path(args.split_file), args.split)
    images = load_images(examples, Path(args.data_dir))
    labels = [e.label for e in examples]
    probabilities, labels_np = _probabilities(model, config, images, labels, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": sha256_of(args.checkpoint),
        "command": f"python -m training.evaluate --checkpoint {args.checkpoint} --split {args.split} --out {args.out}"
                   + (" --shift-proxy" if args.shift_proxy else ""),
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "temperature": config.temperature,
        "metrics": metrics.summary(labels_np, probabilities, config.threshold),
    }
    if args.shift_proxy:
        result["shift_proxy"] = {}
        for name, transform in SHIFT_PROXY.items():
            shifted, _ = _probabilities(model, config, [transform(im) for im in images], labels, device)
            result["shift_proxy"][name] = metrics.summary(labels_np, shifted, config.threshold, ci_resamples=0)
        result["shift_proxy_mean_auc"] = float(np.mean([row["auc"] for row in result["shift_proxy"].values()]))
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "predictions.csv").write_text(
        "path,label,pneumonia_probability\n"
        + "".join(f"{e.path},{e.label},{p:.6f}\n" for e, p in zip(examples, probabilities))
    )
    plot_all(labels_np, probabilities, config.threshold, out, f"{args.split} (n={len(labels)})")
    write_report(result, out)
    if args.split == "test":
        TEST_LOG.parent.mkdir(parents=True, exist_ok=True)
        new = not TEST_LOG.exists()
        with open(TEST_LOG, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["evaluated_at", "checkpoint", "checkpoint_sha256", "out", "auc"])
            writer.writerow([result["evaluated_at"], args.checkpoint, result["checkpoint_sha256"], args.out,
                             f"{result['metrics']['auc']:.4f}"])
    m = result["metrics"]
    print(f"{args.split}: n={m['n']} AUC {m['auc']:.4f} [{m['auc_ci95'][0]:.4f}, {m['auc_ci95'][1]:.4f}] "
          f"acc {m['accuracy']:.4f} sens {m['sensitivity']:.4f} spec {m['specificity']:.4f} ECE {m['ece']:.4f} "
          f"(threshold {m['threshold']:.3f}) -> {out}")
    if args.shift_proxy:
        print(f"shift proxy mean AUC {result['shift_proxy_mean_auc']:.4f}: "
              + ", ".join(f"{k} {v['auc']:.4f}" for k, v in result["shift_proxy"].items()))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model .safetensors (with its .json sidecar)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="(default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="Kermany 224 folder (default: %(default)s)")
    parser.add_argument("--split-file", default=str(DEFAULT_SPLIT_FILE), help="split CSV (default: %(default)s)")
    parser.add_argument("--shift-proxy", action="store_true", help="also score validation under held-out acquisition changes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
