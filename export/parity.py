"""Parity gate: every exported model against PyTorch fp32 on all validation and test images.

    python -m export.parity --checkpoint CKPT --models DIR [--report docs/export_parity.md]

Run by ``python -m export`` after exporting; exits non-zero if a gate fails. Test images are used for
reporting only: nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from edge.runtime import SIDECAR_NAME, EdgeModel
from pneunet.cam import class_activation_map
from pneunet.checkpoint import load_checkpoint
from pneunet.gate import InputGate
from pneunet.heatmap import heatmap_from_features
from pneunet.preprocessing import preprocess
from training.data import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split, subsample
from training.metrics import binary_metrics

BATCH = 16


@dataclass(frozen=True)
class Gate:
    """Thresholds an export must meet against PyTorch fp32 (on val + test together)."""

    max_probability_diff: float | None = None
    min_label_agreement: float | None = None
    max_accuracy_drop: float | None = None  # absolute, in [0, 1]
    max_auc_drop: float | None = None
    min_heatmap_r: float = 0.0  # mean per-image Pearson r of the [0, 1] heatmaps


FP32_GATE = Gate(max_probability_diff=1e-4, min_heatmap_r=0.999)
INT8_GATE = Gate(min_label_agreement=0.99, max_accuracy_drop=0.005, max_auc_drop=0.005, min_heatmap_r=0.95)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def reference(checkpoint: Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch fp32 logits, heatmaps exactly as the app computes them (gradient-free CAM), and pooled
    features (what the input gate's feature check reads)."""
    model, _ = load_checkpoint(checkpoint)
    logits, maps, pooled = [], [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), BATCH):
            batch = torch.from_numpy(inputs[start:start + BATCH])
            logits.append(model(batch).numpy())
            maps.append(class_activation_map(model, batch).numpy())
            pooled.append(model.features(batch).mean(dim=(2, 3)).numpy())
    return np.concatenate(logits), np.concatenate(maps), np.concatenate(pooled)


def _metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    at = binary_metrics(labels, probabilities, threshold)
    return {"auc": float(roc_auc_score(labels, probabilities)), "accuracy": at["accuracy"],
            "sensitivity": at["sensitivity"], "specificity": at["specificity"]}


def compare(model: EdgeModel, inputs: np.ndarray, labels: np.ndarray, splits: np.ndarray,
            ref_logits: np.ndarray, ref_maps: np.ndarray, ref_pooled: np.ndarray, gate=None) -> dict:
    """Metrics of one exported model and its differences from the reference, per split and overall;
    with ``gate`` (the input gate), also how often its feature check refuses these X-rays either way."""
    logits, correlations, pooled = [], [], []
    size = (model.config.image_size, model.config.image_size)
    for start in range(0, len(inputs), BATCH):
        batch_logits, batch_features = model.run(inputs[start:start + BATCH])
        logits.append(batch_logits)
        pooled.append(batch_features.mean(axis=(2, 3)))
        for offset, features in enumerate(batch_features):
            heat = heatmap_from_features(features, model.classifier_weight, size)
            correlations.append(pearson(heat, ref_maps[start + offset]))
    logits, correlations = np.concatenate(logits), np.asarray(correlations)
    if gate is not None:
        refused = gate.features_refused(np.concatenate(pooled))
        ref_refused = gate.features_refused(ref_pooled)
    probabilities = model.pneumonia_probability(logits)
    ref_probabilities = model.pneumonia_probability(ref_logits)
    threshold = model.config.threshold
    result = {}
    for split in ("val", "test", "all"):
        chosen = splits == split if split != "all" else np.ones(len(splits), dtype=bool)
        valid = chosen & np.isfinite(correlations)
        exported = _metrics(labels[chosen], probabilities[chosen], threshold)
        torch_fp32 = _metrics(labels[chosen], ref_probabilities[chosen], threshold)
        difference = np.abs(probabilities[chosen] - ref_probabilities[chosen])
        result[split] = {
            "images": int(chosen.sum()),
            "exported": exported,
            "pytorch_fp32": torch_fp32,
            "label_agreement": float(np.mean((probabilities[chosen] >= threshold) == (ref_probabilities[chosen] >= threshold))),
            "accuracy_drop": torch_fp32["accuracy"] - exported["accuracy"],
            "auc_drop": torch_fp32["auc"] - exported["auc"],
            "max_probability_diff": float(difference.max()),
            "mean_probability_diff": float(difference.mean()),
            "max_logit_diff": float(np.abs(logits[chosen] - ref_logits[chosen]).max()),
            "heatmap_r_mean": float(correlations[valid].mean()),
            "heatmap_r_p5": float(np.percentile(correlations[valid], 5)),
            "heatmap_r_min": float(correlations[valid].min()),
            "heatmap_r_undefined": int((chosen & ~np.isfinite(correlations)).sum()),  # a flat (all-zero) map
        }
        if gate is not None:
            result[split]["gate_refusals"] = {"exported": int(refused[chosen].sum()), "pytorch_fp32": int(ref_refused[chosen].sum()),
                                              "disagreements": int((refused != ref_refused)[chosen].sum())}
    return result


def check_gate(row: dict, gate: Gate) -> list[str]:
    """Failed gate lines for one model's overall (val + test) row; empty when it passes."""
    failures = []
    if gate.max_probability_diff is not None and row["max_probability_diff"] > gate.max_probability_diff:
        failures.append(f"max probability diff {row['max_probability_diff']:.2e} > {gate.max_probability_diff:.0e}")
    if gate.min_label_agreement is not None and row["label_agreement"] < gate.min_label_agreement:
        failures.append(f"label agreement {row['label_agreement']:.4f} < {gate.min_label_agreement}")
    if gate.max_accuracy_drop is not None and row["accuracy_drop"] > gate.max_accuracy_drop:
        failures.append(f"accuracy drop {100 * row['accuracy_drop']:.2f} pt > {100 * gate.max_accuracy_drop:.1f} pt")
    if gate.max_auc_drop is not None and row["auc_drop"] > gate.max_auc_drop:
        failures.append(f"AUC drop {row['auc_drop']:.4f} > {gate.max_auc_drop}")
    if row["heatmap_r_mean"] < gate.min_heatmap_r:
        failures.append(f"mean heatmap r {row['heatmap_r_mean']:.4f} < {gate.min_heatmap_r}")
    return failures


def load_examples(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """All val and test images (or ``limit`` of each, class-balanced, for quick checks)."""
    examples = [example for split in ("val", "test") for example in subsample(read_split(DEFAULT_SPLIT_FILE, split), limit)]
    return (np.array([e.label for e in examples]), np.array([e.split for e in examples]),
            [DEFAULT_DATA_DIR / e.path for e in examples], [e.path for e in examples])


def parity_file_name(limit: int | None) -> str:
    return "parity.json" if limit is None else "parity_quick.json"


def run_parity(checkpoint: Path, models_dir: Path, limit: int | None = None) -> dict:
    """Parity of every model listed in ``models_dir``'s sidecar; writes ``models_dir/parity.json`` (a quick
    ``limit`` run writes ``parity_quick.json``, so it never replaces the full record)."""
    sidecar = json.loads((models_dir / SIDECAR_NAME).read_text())
    labels, splits, files, _ = load_examples(limit)
    model_config = EdgeModel.load(models_dir / next(iter(sidecar["models"]))).config
    inputs = np.stack([preprocess(path, model_config) for path in files]).astype(np.float32)
    ref_logits, ref_maps, ref_pooled = reference(checkpoint, inputs)
    gate_file = models_dir / sidecar["gate"]["file"] if sidecar.get("gate") else None
    gate = InputGate.load(gate_file) if gate_file is not None and gate_file.is_file() else None
    if gate is not None:  # the feature check on images that are not X-rays (training.non_xrays), export vs PyTorch
        from training.non_xrays import non_xray_images

        others = np.stack([preprocess(image, model_config) for _, _, image in non_xray_images()]).astype(np.float32)
        other_refused = gate.features_refused(reference(checkpoint, others)[2])
    report = {"checkpoint_sha256": sidecar["source_checkpoint"]["sha256"], "images": {
        "val": int((splits == "val").sum()), "test": int((splits == "test").sum())}, "limit": limit,
        "gates": {"fp32": FP32_GATE.__dict__, "int8": INT8_GATE.__dict__}, "models": {}}
    for name, entry in sidecar["models"].items():
        path = models_dir / name
        if not path.is_file():
            continue
        edge_model = EdgeModel.load(path, num_threads=2)
        row = compare(edge_model, inputs, labels, splits, ref_logits, ref_maps, ref_pooled, gate)
        row["runtime"] = edge_model.runtime
        row["bytes"] = entry.get("bytes")
        row["quantization"] = entry.get("quantization")
        row["gate_failures"] = check_gate(row["all"], INT8_GATE if entry["precision"] == "int8" else FP32_GATE)
        if gate is not None:
            refused = gate.features_refused(edge_model.run(others)[1].mean(axis=(2, 3)))
            row["non_xray_feature_refusals"] = {"images": len(others), "exported": int(refused.sum()),
                                                "pytorch_fp32": int(other_refused.sum()),
                                                "disagreements": int((refused != other_refused).sum())}
        report["models"][name] = row
        print(f"{name}: agreement {row['all']['label_agreement']:.4f}, AUC {row['all']['exported']['auc']:.4f} "
              f"(torch {row['all']['pytorch_fp32']['auc']:.4f}), max prob diff {row['all']['max_probability_diff']:.2e}, "
              f"heatmap r {row['all']['heatmap_r_mean']:.4f} -> {'FAIL: ' + '; '.join(row['gate_failures']) if row['gate_failures'] else 'pass'}",
              file=sys.stderr)
    report["file"] = parity_file_name(limit)
    (models_dir / report["file"]).write_text(json.dumps(report, indent=2) + "\n")
    return report


def markdown(report: dict, command: str) -> str:
    """The parity report as a Markdown page."""
    lines = [
        "# Edge export parity", "",
        f"Every exported model against PyTorch fp32 on {report['images']['val']} validation and "
        f"{report['images']['test']} test images (test is reported, never tuned on). Regenerate with:", "",
        f"    {command}", "",
        f"Source checkpoint sha256 `{report['checkpoint_sha256']}`. Metrics at the stored threshold on the calibrated "
        "(temperature-scaled) pneumonia probability. Heatmap r: per-image Pearson correlation of the [0, 1] "
        "heatmaps (224 x 224) with the app's gradient-free CAM; the gate uses the mean. Gates on val + test together: "
        "fp32 max probability diff <= 1e-4 and heatmap r >= 0.999; int8 label agreement >= 99 %, accuracy within "
        "0.5 pt, AUC within 0.005, heatmap r >= 0.95.", "",
        "| model | runtime | split | agreement | AUC (torch) | accuracy (torch) | sensitivity | specificity | max / mean prob diff | heatmap r mean / p5 / min | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["models"].items():
        verdict = "FAIL: " + "; ".join(row["gate_failures"]) if row["gate_failures"] else "pass"
        if row["gate_failures"] and name.endswith(".tflite"):
            verdict += " (optional TFLite export: recorded, does not fail `python -m export`)"
        for split in ("all", "val", "test"):
            r = row[split]
            e, t = r["exported"], r["pytorch_fp32"]
            lines.append(
                f"| {name} | {row['runtime']} | {split} ({r['images']}) | {100 * r['label_agreement']:.2f} % | "
                f"{e['auc']:.4f} ({t['auc']:.4f}) | {100 * e['accuracy']:.2f} % ({100 * t['accuracy']:.2f} %) | "
                f"{100 * e['sensitivity']:.2f} % | {100 * e['specificity']:.2f} % | "
                f"{r['max_probability_diff']:.2e} / {r['mean_probability_diff']:.2e} | "
                f"{r['heatmap_r_mean']:.4f} / {r['heatmap_r_p5']:.4f} / {r['heatmap_r_min']:.4f} | "
                f"{verdict if split == 'all' else ''} |")
    gate_lines = [f"- `{name}`: X-rays refused {row['all']['gate_refusals']['exported']} (PyTorch: "
                  f"{row['all']['gate_refusals']['pytorch_fp32']}), {row['all']['gate_refusals']['disagreements']} disagreements; "
                  f"non-X-rays refused {row['non_xray_feature_refusals']['exported']} of {row['non_xray_feature_refusals']['images']} "
                  f"(PyTorch: {row['non_xray_feature_refusals']['pytorch_fp32']}), "
                  f"{row['non_xray_feature_refusals']['disagreements']} disagreements"
                  for name, row in report["models"].items() if "non_xray_feature_refusals" in row]
    if gate_lines:
        lines += ["", f"Input gate, feature check alone (the export's pooled features vs PyTorch's): on these "
                  f"{report['images']['val'] + report['images']['test']} X-rays, which it should all accept, and on the "
                  "non-X-ray images of `training/non_xrays.py`, which it should refuse. The app and the runner refuse all of "
                  "those anyway, before the model runs, by the model-independent appearance check (docs/gate_report.md); "
                  "the feature check is the second line:", ""] + gate_lines
    notes = []
    for name, row in report["models"].items():
        quantization = row.get("quantization")
        if quantization:
            notes.append(f"- `{name}`: {quantization.get('tool')}; activations {quantization.get('activations')}; weights "
                         f"{quantization.get('weights')}; calibration {quantization.get('calibration_method', 'histogram observer')} "
                         f"on {quantization.get('calibration_images')} training images. Kept float: "
                         f"{quantization.get('float_nodes', 'nothing')}.")
    if notes:
        lines += ["", "What the int8 exports keep in float (from the sidecar, `pneunet_edge.json`):", ""] + notes
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint the models were exported from")
    parser.add_argument("--models", required=True, help="export folder with pneunet_edge.json")
    parser.add_argument("--report", default=None, help="also write the Markdown report here (default: DIR/parity.md)")
    parser.add_argument("--limit", type=int, default=None, help="N class-balanced images of each split only (quick check; default: all)")
    return parser


def main(args: argparse.Namespace) -> int:
    report = run_parity(Path(args.checkpoint), Path(args.models), args.limit)
    command = f"python -m export.parity --checkpoint {args.checkpoint} --models {args.models}"
    Path(args.report or Path(args.models) / "parity.md").write_text(markdown(report, command))
    return 1 if any(row["gate_failures"] for row in report["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
