"""Parity gate: every exported model against PyTorch fp32 on all validation and test images.

    python -m export.parity --checkpoint CKPT --models DIR [--report docs/export_parity.md]

Run by ``python -m export`` after exporting; exits non-zero if a gate fails. Both sides run their own
front end to end: the app's ``Predictor`` (the checkpoint, its segmenter ``<stem>.lungs.onnx``) and the
edge runner's (the same ``Predictor`` on each exported model, the segmenter copied beside it), each preparing
every image itself (``model_view``). Compared: labels and probabilities, the shown heatmaps (lung-masked,
on the model's fixed evidence scale), the raw evidence maps, and the lung masks (the same ONNX file on
both sides, so they must be identical). Test images are used for reporting only: nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from pneunet.backends import SIDECAR_NAME, ExportedModel
from pneunet.decision import calibrated_probability
from pneunet.gate import InputGate
from pneunet.lungs import model_view
from pneunet.predictor import Predictor, load_export_lungs
from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split, subsample
from pneunet.metrics import binary_metrics

BATCH = 16


@dataclass(frozen=True)
class Gate:
    """Thresholds an export must meet against PyTorch fp32 (on val + test together)."""

    max_probability_diff: float | None = None
    min_label_agreement: float | None = None
    max_accuracy_drop: float | None = None  # absolute, in [0, 1]
    max_auc_drop: float | None = None
    min_heatmap_r: float = 0.0  # mean per-image Pearson r of the shown heatmaps
    min_evidence_r: float = 0.0  # mean per-image Pearson r of the raw evidence maps (models with an evidence scale)
    max_heatmap_diff: float | None = None  # largest |difference| of a shown heatmap pixel, colour-scale units [0, 1]


FP32_GATE = Gate(max_probability_diff=1e-4, min_heatmap_r=0.999, min_evidence_r=0.999, max_heatmap_diff=0.01)
INT8_GATE = Gate(min_label_agreement=0.99, max_accuracy_drop=0.005, max_auc_drop=0.005, min_heatmap_r=0.95,
                 min_evidence_r=0.95)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    at = binary_metrics(labels, probabilities, threshold)
    auc = float(roc_auc_score(labels, probabilities)) if len(set(labels.tolist())) == 2 else float("nan")
    return {"auc": auc, "accuracy": at["accuracy"], "sensitivity": at["sensitivity"], "specificity": at["specificity"]}


def _spread(values: np.ndarray, prefix: str) -> dict:
    """Mean, 5th percentile and minimum of the finite ``values`` (None when there are none) and how many
    were undefined (a flat map: all zero, e.g. a film with no positive evidence inside its lungs)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {f"{prefix}_mean": None, f"{prefix}_p5": None, f"{prefix}_min": None, f"{prefix}_undefined": int(len(values))}
    return {f"{prefix}_mean": float(finite.mean()), f"{prefix}_p5": float(np.percentile(finite, 5)),
            f"{prefix}_min": float(finite.min()), f"{prefix}_undefined": int(len(values) - len(finite))}


@dataclass
class Record:
    """Per-image results of one front (the app's PyTorch predictor or one exported model)."""

    logits: list
    pooled: list
    heatmap_r: list  # against the reference (unused for the reference itself)
    heatmap_diff: list  # per image: max |shown map - reference shown map|
    heatmap_mean_diff: list
    evidence_r: list

    @classmethod
    def empty(cls) -> "Record":
        return cls([], [], [], [], [], [])


def summarise(record: Record, reference: Record, labels: np.ndarray, splits: np.ndarray, model: ExportedModel,
              gate: InputGate | None = None) -> dict:
    """Metrics of one exported model and its differences from the reference, per split and overall;
    with ``gate`` (the input gate), also how often its feature check refuses these X-rays either way."""
    logits, ref_logits = np.asarray(record.logits), np.asarray(reference.logits)
    correlations, evidence_r = np.asarray(record.heatmap_r, dtype=float), np.asarray(record.evidence_r, dtype=float)
    heatmap_diff, heatmap_mean_diff = np.asarray(record.heatmap_diff), np.asarray(record.heatmap_mean_diff)
    if gate is not None:
        refused = gate.features_refused(np.stack(record.pooled))
        ref_refused = gate.features_refused(np.stack(reference.pooled))
    probabilities = calibrated_probability(logits, model.config.temperature)
    ref_probabilities = calibrated_probability(ref_logits, model.config.temperature)
    threshold = model.config.threshold
    result = {}
    for split in ("val", "test", "all"):
        chosen = splits == split if split != "all" else np.ones(len(splits), dtype=bool)
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
            **_spread(correlations[chosen], "heatmap_r"),
            "heatmap_max_diff": float(heatmap_diff[chosen].max()),
            "heatmap_mean_diff": float(heatmap_mean_diff[chosen].mean()),
            **(_spread(evidence_r[chosen], "evidence_r") if len(evidence_r) else
               {"evidence_r_mean": None, "evidence_r_p5": None, "evidence_r_min": None, "evidence_r_undefined": 0}),
        }
        if gate is not None:
            result[split]["gate_refusals"] = {"exported": int(refused[chosen].sum()), "pytorch_fp32": int(ref_refused[chosen].sum()),
                                              "disagreements": int((refused != ref_refused)[chosen].sum())}
    return result


def check_gate(row: dict, gate: Gate, lungs: dict | None = None) -> list[str]:
    """Failed gate lines for one model's overall (val + test) row; empty when it passes. ``lungs``: the
    lung-mask comparison of the report (any mask that differs from the app's fails every model)."""
    failures = []
    if gate.max_probability_diff is not None and row["max_probability_diff"] > gate.max_probability_diff:
        failures.append(f"max probability diff {row['max_probability_diff']:.2e} > {gate.max_probability_diff:.0e}")
    if gate.min_label_agreement is not None and row["label_agreement"] < gate.min_label_agreement:
        failures.append(f"label agreement {row['label_agreement']:.4f} < {gate.min_label_agreement}")
    if gate.max_accuracy_drop is not None and row["accuracy_drop"] > gate.max_accuracy_drop:
        failures.append(f"accuracy drop {100 * row['accuracy_drop']:.2f} pt > {100 * gate.max_accuracy_drop:.1f} pt")
    if gate.max_auc_drop is not None and row["auc_drop"] > gate.max_auc_drop:
        failures.append(f"AUC drop {row['auc_drop']:.4f} > {gate.max_auc_drop}")
    if row["heatmap_r_mean"] is None:
        failures.append(f"heatmap r undefined on all {row['images']} images (every shown map flat)")
    elif row["heatmap_r_mean"] < gate.min_heatmap_r:
        failures.append(f"mean heatmap r {row['heatmap_r_mean']:.4f} < {gate.min_heatmap_r}")
    if row["evidence_r_mean"] is not None and row["evidence_r_mean"] < gate.min_evidence_r:
        failures.append(f"mean evidence map r {row['evidence_r_mean']:.4f} < {gate.min_evidence_r}")
    if gate.max_heatmap_diff is not None and row["heatmap_max_diff"] > gate.max_heatmap_diff:
        failures.append(f"max heatmap pixel diff {row['heatmap_max_diff']:.2e} > {gate.max_heatmap_diff}")
    if lungs and lungs["masks_identical"] < lungs["images"]:
        failures.append(f"lung masks differ from the app's on {lungs['images'] - lungs['masks_identical']} of "
                        f"{lungs['images']} images")
    return failures


def load_examples(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[Path], list[str]]:
    """All val and test images (or ``limit`` of each, class-balanced, for quick checks)."""
    examples = [example for split in ("val", "test") for example in subsample(read_split(DEFAULT_SPLIT_FILE, split), limit)]
    return (np.array([e.label for e in examples]), np.array([e.split for e in examples]),
            [DEFAULT_DATA_DIR / e.path for e in examples], [e.path for e in examples])


def parity_file_name(limit: int | None) -> str:
    return "parity.json" if limit is None else "parity_quick.json"


def _record(record: Record, results, references) -> None:
    for result, ref in zip(results, references):
        record.logits.append(result.logit)
        record.pooled.append(result.pooled_features)
        if ref is None:
            continue
        record.heatmap_r.append(pearson(result.heatmap, ref.heatmap))
        difference = np.abs(result.heatmap.astype(np.float64) - ref.heatmap)
        record.heatmap_diff.append(float(difference.max()))
        record.heatmap_mean_diff.append(float(difference.mean()))
        if ref.evidence:
            record.evidence_r.append(pearson(result.evidence["pneumonia"], ref.evidence["pneumonia"]))


def run_parity(checkpoint: Path, models_dir: Path, limit: int | None = None) -> dict:
    """Parity of every model listed in ``models_dir``'s sidecar; writes ``models_dir/parity.json`` (a quick
    ``limit`` run writes ``parity_quick.json``, so it never replaces the full record)."""
    sidecar = json.loads((models_dir / SIDECAR_NAME).read_text())
    labels, splits, files, _ = load_examples(limit)
    app = Predictor.load(checkpoint, gate=False)  # the app's own path; the export's gate is applied to both below
    models = {name: ExportedModel.load(models_dir / name, num_threads=2) for name in sidecar["models"] if (models_dir / name).is_file()}
    first = next(iter(models.values()))
    edge_lungs = load_export_lungs(first)  # the runner's segmenter: the copy in the export folder, as the runner loads it
    runners = {name: Predictor(model, None, edge_lungs) for name, model in models.items()}
    prepare_edge = runners[next(iter(runners))].prepare
    reference, records = Record.empty(), {name: Record.empty() for name in runners}
    lungs = {"images": 0, "masks_identical": 0, "inputs_identical": 0, "not_plausible": 0}
    for start in range(0, len(files), BATCH):
        app_images = [app.prepare(path) for path in files[start:start + BATCH]]
        edge_images = [prepare_edge(path) for path in files[start:start + BATCH]]
        for a, e in zip(app_images, edge_images):
            lungs["inputs_identical"] += int(np.array_equal(a.model_input, e.model_input))
            if a.lungs is not None:
                lungs["images"] += 1
                lungs["masks_identical"] += int(e.lungs is not None and np.array_equal(a.lungs.mask, e.lungs.mask))
                lungs["not_plausible"] += int(not a.lungs.plausible)
        ref = app.predict_inputs(np.stack([a.model_input for a in app_images]), heatmap=True, lungs=[a.lungs for a in app_images])
        _record(reference, ref, [None] * len(ref))
        edge_inputs, edge_fields = np.stack([e.model_input for e in edge_images]), [e.lungs for e in edge_images]
        for name, runner in runners.items():
            _record(records[name], runner.predict_inputs(edge_inputs, heatmap=True, lungs=edge_fields), ref)
        if (start // BATCH) % 20 == 19:
            print(f"  parity: {start + BATCH} of {len(files)} images", file=sys.stderr)
    gate_file = models_dir / sidecar["gate"]["file"] if sidecar.get("gate") else None
    gate = InputGate.load(gate_file) if gate_file is not None and gate_file.is_file() else None
    if gate is not None:  # the feature check on images that are not X-rays (pneunet.non_xrays), export vs PyTorch
        from pneunet.non_xrays import non_xray_images

        others = np.stack([model_view(image, app.config, app.lungs)[0] for _, _, image in non_xray_images()]).astype(np.float32)
        other_refused = gate.features_refused(np.stack([p.pooled_features for start in range(0, len(others), BATCH)
                                                        for p in app.predict_inputs(others[start:start + BATCH])]))
    report = {"checkpoint_sha256": sidecar["source_checkpoint"]["sha256"], "images": {
        "val": int((splits == "val").sum()), "test": int((splits == "test").sum())}, "limit": limit,
        "evidence_scale": app.config.evidence_scale,
        "lungs": ({**lungs, "segmenter_sha256": sidecar["lungs"]["sha256"],
                   "app_segmenter": f"{checkpoint.stem}.lungs.onnx", "edge_segmenter": sidecar["lungs"]["file"]}
                  if app.lungs is not None else None),
        "gates": {"fp32": FP32_GATE.__dict__, "int8": INT8_GATE.__dict__}, "models": {}}
    for name, runner in runners.items():
        entry = sidecar["models"][name]
        row = summarise(records[name], reference, labels, splits, runner.backend, gate)
        row["runtime"] = runner.runtime
        row["bytes"] = entry.get("bytes")
        row["quantization"] = entry.get("quantization")
        row["gate_failures"] = check_gate(row["all"], INT8_GATE if entry["precision"] == "int8" else FP32_GATE, report["lungs"])
        if gate is not None:
            refused = gate.features_refused(runner.backend.run(others)[1].mean(axis=(2, 3)))
            row["non_xray_feature_refusals"] = {"images": len(others), "exported": int(refused.sum()),
                                                "pytorch_fp32": int(other_refused.sum()),
                                                "disagreements": int((refused != other_refused).sum())}
        report["models"][name] = row
        a = row["all"]
        print(f"{name}: agreement {a['label_agreement']:.4f}, AUC {a['exported']['auc']:.4f} "
              f"(torch {a['pytorch_fp32']['auc']:.4f}), max prob diff {a['max_probability_diff']:.2e}, "
              f"heatmap r {_number(a['heatmap_r_mean'])}, evidence r {_number(a['evidence_r_mean'])} -> "
              f"{'FAIL: ' + '; '.join(row['gate_failures']) if row['gate_failures'] else 'pass'}", file=sys.stderr)
    if report["lungs"]:
        print(f"lung masks: app and runner identical on {lungs['masks_identical']} of {lungs['images']} images", file=sys.stderr)
    report["file"] = parity_file_name(limit)
    (models_dir / report["file"]).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict, command: str) -> str:
    """The parity report as a Markdown page."""
    fixed = report.get("evidence_scale") is not None
    shown = ("the shown heatmaps (positive evidence inside the lung fields on the model's fixed scale, "
             f"{report['evidence_scale']:.3g} = full colour)" if fixed else "the [0, 1] heatmaps (per-image scaled CAM)")
    lines = [
        "# Edge export parity", "",
        f"Every exported model against PyTorch fp32 on {report['images']['val']} validation and "
        f"{report['images']['test']} test images (test is reported, never tuned on). Regenerate with:", "",
        f"    {command}", "",
        f"Source checkpoint sha256 `{report['checkpoint_sha256']}`. Each side runs its own front end to end: the app's "
        "`Predictor` on PyTorch and the same `Predictor` on each export, each preparing every image itself "
        "(`pneunet.lungs.model_view`). Metrics at the stored threshold on the calibrated (temperature-scaled) "
        f"pneumonia probability. Heatmap r: per-image Pearson correlation of {shown}, 224 x 224; heatmap diff: "
        "per-image largest and mean |difference| of those maps (colour-scale units); evidence r: Pearson r of the raw "
        "evidence maps (calibrated-logit contribution, signed, before lung masking). The gates use the means. Gates on "
        "val + test together: fp32 max probability diff <= 1e-4, heatmap and evidence r >= 0.999, heatmap pixel diff "
        "<= 0.01; int8 label agreement >= 99 %, accuracy within 0.5 pt, AUC within 0.005, heatmap and evidence r >= "
        "0.95; every model: lung masks identical to the app's.", "",
    ]
    lungs = report.get("lungs")
    if lungs:
        lines += [f"Lung fields: the app's segmenter (`{lungs['app_segmenter']}` beside the checkpoint) and the runner's "
                  f"(`{lungs['edge_segmenter']}` in the export folder, sha256 `{lungs['segmenter_sha256'][:12]}…`, a verbatim "
                  f"copy) gave identical masks on **{lungs['masks_identical']} of {lungs['images']}** images and identical "
                  f"model inputs on {lungs['inputs_identical']}; on {lungs['not_plausible']} the segmenter found no plausible "
                  "lungs and both used the population template.", ""]
    else:
        lines += ["Lung fields: this model has none (trained on whole images).", ""]
    lines += [
        "| model | runtime | split | agreement | AUC (torch) | accuracy (torch) | sensitivity | specificity | max / mean prob diff | heatmap r mean / p5 / min | heatmap diff max / mean | evidence r mean / p5 | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["models"].items():
        verdict = "FAIL: " + "; ".join(row["gate_failures"]) if row["gate_failures"] else "pass"
        if row["gate_failures"] and name.endswith(".tflite"):
            verdict += " (optional TFLite export: recorded, does not fail `python -m export`)"
        for split in ("all", "val", "test"):
            r = row[split]
            e, t = r["exported"], r["pytorch_fp32"]
            flat = f" ({r['heatmap_r_undefined']} flat)" if r["heatmap_r_undefined"] else ""
            lines.append(
                f"| {name} | {row['runtime']} | {split} ({r['images']}) | {100 * r['label_agreement']:.2f} % | "
                f"{e['auc']:.4f} ({t['auc']:.4f}) | {100 * e['accuracy']:.2f} % ({100 * t['accuracy']:.2f} %) | "
                f"{100 * e['sensitivity']:.2f} % | {100 * e['specificity']:.2f} % | "
                f"{r['max_probability_diff']:.2e} / {r['mean_probability_diff']:.2e} | "
                f"{_number(r['heatmap_r_mean'])} / {_number(r['heatmap_r_p5'])} / {_number(r['heatmap_r_min'])}{flat} | "
                f"{r['heatmap_max_diff']:.2e} / {r['heatmap_mean_diff']:.2e} | "
                f"{_number(r['evidence_r_mean'])} / {_number(r['evidence_r_p5'])} | "
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
                  "non-X-ray images of `pneunet/non_xrays.py`, which it should refuse. The app and the runner refuse all of "
                  "those anyway, before the model runs, by the model-independent appearance check (docs/gate_report.md); "
                  "the feature check is the second line:", ""] + gate_lines
    notes = []
    for name, row in report["models"].items():
        quantization = row.get("quantization")
        if quantization:
            notes.append(f"- `{name}`: {quantization.get('tool')}; activations {quantization.get('activations')}; weights "
                         f"{quantization.get('weights')}; calibration {quantization.get('calibration_method', 'histogram observer')} "
                         f"on {quantization.get('calibration_images')} training images"
                         f"{' (lung-suppressed, as the classifier sees them)' if lungs else ''}. Kept float: "
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
