"""The lung-field segmenter's report: test Dice / IoU (bootstrap CIs), how often plausible lungs are found
on Kermany and on adult films from another hospital, speed, and contact sheets a person looks at.

    python -m training.lung_report --weights pneunet/weights/pneunet.lungs.safetensors --out pneunet/weights/lungs_report

Evaluating on the Kermany test masks is logged in docs/test_evaluations.csv like every test evaluation.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import time
from pathlib import Path

import numpy as np

from pneunet.integrity import sha256_of
from pneunet.lungs import LungFinder
from pneunet.models import default_config
from pneunet.preprocessing import to_unit
from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_NIH_DIR, DEFAULT_SPLIT_FILE, REPO_ROOT, read_nih
from training.localisation import bootstrap_mean_ci
from training.train_lungs import DEFAULT_LUNGS_DIR, contact_sheet, load_masked_examples, overlap_scores

TEST_LOG = REPO_ROOT / "docs" / "test_evaluations.csv"


def _summary(values: np.ndarray) -> dict:
    low, high = bootstrap_mean_ci(values)
    return {"mean": float(values.mean()), "ci95": [low, high], "median": float(np.median(values)),
            "p5": float(np.percentile(values, 5)), "min": float(values.min())}


def milliseconds_per_image(finder: LungFinder, unit: np.ndarray, repeats: int = 50) -> float:
    """Median wall time of ``finder.find`` on one image (ONNX on ``finder.threads`` threads + the numpy rule)."""
    finder.find(unit)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        finder.find(unit)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def write_lung_report(weights: Path, out: Path, data_dir: Path = DEFAULT_DATA_DIR, lungs_dir: Path = DEFAULT_LUNGS_DIR,
                      split_file: Path = DEFAULT_SPLIT_FILE, nih_dir: Path = DEFAULT_NIH_DIR) -> dict:
    weights = Path(weights)
    out.mkdir(parents=True, exist_ok=True)
    finder = LungFinder.load(weights.with_suffix(".onnx"), threads=2)
    config = finder.config
    results: dict = {"weights": str(weights), "weights_sha256": sha256_of(weights),
                     "onnx_sha256": sha256_of(weights.with_suffix(".onnx")), "provenance": config.provenance,
                     "evaluated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for split in ("val", "test"):
        units, masks, paths = load_masked_examples(split, data_dir, lungs_dir, split_file)
        fields = finder.find_batch(units)
        scores = np.array([overlap_scores(f.mask, m) for f, m in zip(fields, masks)])
        results[split] = {"images": len(units), "dice": _summary(scores[:, 0]), "iou": _summary(scores[:, 1]),
                          "plausible": float(np.mean([f.plausible for f in fields]))}
        if split == "test":
            worst = np.argsort(scores[:, 0])[:12]
            contact_sheet([units[i] for i in worst], [fields[i] for i in worst],
                          [f"{Path(paths[i]).stem} {scores[i, 0]:.2f}" for i in worst], out / "kermany_test_worst.png")
    nih = read_nih(nih_dir, "test")
    model_config = default_config("efficientnet_lite0")
    nih_units = np.stack([to_unit(nih_dir / e.path, model_config) for e in nih])
    nih_fields = finder.find_batch(nih_units)
    results["nih_test"] = {"images": len(nih), "plausible": float(np.mean([f.plausible for f in nih_fields])),
                           "area_share_median": float(np.median([f.area_share for f in nih_fields])),
                           "not_plausible": [{"path": e.path, "reason": f.reason} for e, f in zip(nih, nih_fields) if not f.plausible]}
    chosen = np.random.default_rng(0).choice(len(nih), size=min(24, len(nih)), replace=False)
    contact_sheet([nih_units[i] for i in chosen], [nih_fields[i] for i in chosen],
                  [f"{Path(nih[i].path).parent.name[:4]} {Path(nih[i].path).stem}" for i in chosen], out / "nih_test_sheet.png")
    results["ms_per_image_2_threads"] = milliseconds_per_image(finder, nih_units[0])
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    test = results["test"]
    TEST_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(TEST_LOG, "a", newline="") as handle:
        csv.writer(handle).writerow([results["evaluated_at"], f"{weights} (lung segmenter, Dice)", results["weights_sha256"],
                                     str(out), f"{test['dice']['mean']:.4f}"])
    size_kb = weights.with_suffix(".onnx").stat().st_size / 1e3
    p = config.provenance
    lines = [
        "# Lung-field segmenter",
        "",
        f"A U-Net ({p.get('parameters', 0):,} parameters, {config.base_channels} channels at {config.input_size} px, "
        f"depth {config.depth}; fp32 ONNX {size_kb:.0f} kB) trained on the V7 lung masks of `kermany224_lungs` with the "
        f"classifier's patient-grouped split. Trained with `{p.get('command')}` (commit `{p.get('git_commit')}`, seed "
        f"{p.get('seed')}, {p.get('epochs_run')} epochs, best epoch {p.get('best_epoch')} by validation Dice, "
        f"{p.get('hardware')}, {p.get('seconds_per_epoch_median', 0):.0f} s/epoch). Report: `python -m training.lung_report "
        f"--weights {weights} --out {out}` ({results['evaluated_at']}).",
        "",
        "Masks are compared at 224 px through `pneunet.lungs.lung_fields`, the rule every front serves "
        "(sigmoid >= 0.5; when no plausible pair of lungs is found, the population template is used and counted here).",
        "",
        "| split | images | Dice mean (95 % CI) | Dice median / p5 / min | IoU mean (95 % CI) | plausible lungs |",
        "|---|---|---|---|---|---|",
    ]
    for split in ("val", "test"):
        r = results[split]
        d, i = r["dice"], r["iou"]
        lines.append(f"| Kermany {split} | {r['images']} | {d['mean']:.4f} ({d['ci95'][0]:.4f}–{d['ci95'][1]:.4f}) | "
                     f"{d['median']:.4f} / {d['p5']:.4f} / {d['min']:.4f} | {i['mean']:.4f} ({i['ci95'][0]:.4f}–{i['ci95'][1]:.4f}) | "
                     f"{r['plausible']:.1%} |")
    n = results["nih_test"]
    lines += [
        "",
        f"On `nih_adult224` test (adults, another hospital, no masks): plausible lungs found on {n['plausible']:.1%} of "
        f"{n['images']} images (median lung area share {n['area_share_median']:.2f}); the sheet below shows 24 of them "
        "(green: the segmenter's outline; red: the template fallback).",
        "",
        f"Speed: {results['ms_per_image_2_threads']:.1f} ms per image (median, ONNX fp32 on 2 threads + the numpy rule, "
        "one run on a shared machine).",
        "",
        "![nih test](nih_test_sheet.png)",
        "",
        "The 12 Kermany test images with the lowest Dice:",
        "",
        "![worst](kermany_test_worst.png)",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"lungs: test Dice {test['dice']['mean']:.4f} [{test['dice']['ci95'][0]:.4f}, {test['dice']['ci95'][1]:.4f}], "
          f"NIH plausible {n['plausible']:.1%}, {results['ms_per_image_2_threads']:.1f} ms -> {out}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="segmenter .safetensors (with its .onnx and .json beside it)")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    write_lung_report(Path(args.weights), Path(args.out))
