"""How many labelled films does a site need? Re-runnable study of site calibration (issue 12):

    python -m training.site_study                 # writes docs/site_calibration.md (+ .json); ~2 min on 2 cores

For the served model (``pneunet.predictor.Predictor.load()``: the committed export of the shipped model), on
Kermany test and nih_adult224 test: draw k labelled films (k = 20, 40, 80, 160; stratified; 300 draws), fit
the site profile on them (``pneunet.site``: Platt calibration + the highest threshold keeping sensitivity
0.95 on the drawn pneumonias), and score the films NOT drawn. Reported: mean and 5-95 % spread of
sensitivity, specificity and ECE, beside the shipped operating point on the same films. The test splits
play "a new site" here: nothing is chosen on them for the model; each set read is logged in
docs/test_evaluations.csv as every test evaluation is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pneunet import metrics
from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_NIH_DIR, REPO_ROOT, read_nih, read_split
from pneunet.decision import calibrated_probability, sigmoid
from pneunet.predictor import Predictor
from pneunet.site import fit_platt, sensitivity_specificity, threshold_for_sensitivity
from training.evaluate import _log_test

KS = (20, 40, 80, 160)
TARGET = 0.95


def logits_of(predictor: Predictor, paths: list[Path]) -> np.ndarray:
    values = []
    for path in paths:
        values.append(predictor.predict_prepared([predictor.prepare(path)])[0].logit)
    return np.asarray(values)


def draw(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices, stratified by class (at least one of each)."""
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k_pos = min(max(1, round(k * len(positives) / len(labels))), k - 1)
    return np.concatenate([rng.choice(positives, k_pos, replace=False), rng.choice(negatives, k - k_pos, replace=False)])


def study(logits: np.ndarray, labels: np.ndarray, temperature: float, threshold: float, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shipped_p = calibrated_probability(logits, temperature)
    sens, spec = sensitivity_specificity(labels, shipped_p, threshold)
    result = {"images": int(len(labels)), "pneumonia": int(labels.sum()),
              "shipped": {"sensitivity": sens, "specificity": spec,
                          "ece": metrics.expected_calibration_error(labels, shipped_p)}, "k": {}}
    for k in KS:
        rows = []
        for _ in range(draws):
            chosen = draw(labels, k, rng)
            rest = np.setdiff1d(np.arange(len(labels)), chosen)
            a, b = fit_platt(logits[chosen], labels[chosen])
            t = threshold_for_sensitivity(labels[chosen], sigmoid(a * logits[chosen] + b), TARGET)
            p = sigmoid(a * logits[rest] + b)
            rows.append((*sensitivity_specificity(labels[rest], p, t), metrics.expected_calibration_error(labels[rest], p)))
        rows = np.asarray(rows)
        result["k"][k] = {name: {"mean": float(rows[:, i].mean()), "p5": float(np.percentile(rows[:, i], 5)),
                                 "p95": float(np.percentile(rows[:, i], 95))}
                          for i, name in enumerate(("sensitivity", "specificity", "ece"))}
    return result


def markdown(results: dict, model: str, draws: int) -> str:
    lines = ["# Site calibration: how many labelled films a site needs", "",
             f"`python -m training.site_study` on {time.strftime('%Y-%m-%d')}; model `{model}`. For each k: {draws} "
             f"stratified draws of k labelled films, a site profile fitted on them (Platt a·logit + b, then the "
             f"highest threshold keeping sensitivity {TARGET} on the drawn pneumonias: `pneunet.site`), scored on "
             "the films not drawn. Mean (5–95 % of draws).", ""]
    for name, result in results.items():
        shipped = result["shipped"]
        lines += [f"## {name} ({result['images']} films, {result['pneumonia']} pneumonia)", "",
                  "| operating point | sensitivity | specificity | ECE |", "|---|---|---|---|",
                  f"| shipped (validation-fitted temperature and threshold) | {shipped['sensitivity']:.3f} | "
                  f"{shipped['specificity']:.3f} | {shipped['ece']:.3f} |"]
        for k, row in result["k"].items():
            cells = " | ".join(f"{row[m]['mean']:.3f} ({row[m]['p5']:.2f}–{row[m]['p95']:.2f})"
                               for m in ("sensitivity", "specificity", "ece"))
            lines.append(f"| site profile, k = {k} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    predictor = Predictor.load(gate=False)  # the served model; the gate's refusals are the gate's question, not this one's
    config = predictor.config
    sets = {"Kermany test": [(DEFAULT_DATA_DIR / e.path, e.label) for e in read_split(split="test")],
            "nih_adult224 test": [(DEFAULT_NIH_DIR / e.path, e.label) for e in read_nih(DEFAULT_NIH_DIR, "test")]}
    results = {}
    for name, pairs in sets.items():
        logits = logits_of(predictor, [p for p, _ in pairs])
        labels = np.array([label for _, label in pairs])
        results[name] = study(logits, labels, config.temperature, config.threshold, args.draws, args.seed)
        from sklearn.metrics import roc_auc_score

        _log_test(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"{predictor.backend.path} (site_study, {name})",
                  predictor.backend.sha256, str(args.out), float(roc_auc_score(labels, logits)))
    out = Path(args.out)
    out.write_text(markdown(results, Path(predictor.backend.path).name, args.draws) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(out.read_text())
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=300, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "site_calibration.md"), help="(default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
