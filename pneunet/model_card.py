"""The model card for users (the app's About tab): what the model is for, how to read its answer, its own
figures with 95 % confidence intervals on every evaluated set, and its known limits.

    from pneunet.model_card import model_card, own_report
    report = own_report(predictor.backend)        # the loaded model's own evaluation, or None
    markdown = model_card(report, predictor.config, served_as(predictor.backend))

Figures come from ``metrics.json`` (written by ``python -m training.ship``) and only when its evaluation
names, by sha256, the very checkpoint the loaded model is (an export by the checkpoint it was made from):
a model without its own report gets a card without figures, never another model's. Pure functions over
dicts, torch- and gradio-free; tested by ``tests/test_model_card.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pneunet.config import ModelConfig
from pneunet.decision import format_probability
from pneunet.integrity import sha256_of

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
EVALUATIONS = ("evaluation_test", "evaluation_val")  # the blocks of metrics.json that name their checkpoint
# Targets the figures are read against: the test-set targets in the shipped REPORT.md (AUC, sensitivity,
# specificity, ECE) and the heatmap targets of the lung-fields work (issue 10).
TARGETS = {"auc": 0.985, "sensitivity": 0.95, "specificity": 0.85, "ece": 0.03, "energy_in_lungs": 0.85,
           "pointing": 0.95, "box_pointing": 0.60, "probe_flips": 0.01}
DATASETS = {
    "kermany": "paediatric (1–5 years) anterior-posterior chest X-rays from one hospital, Guangzhou Women and "
               "Children's Medical Center (Kermany et al. 2018, CC BY 4.0)",
    "nih_adult224": "adult frontal chest X-rays from the NIH ChestX-ray14 collection, labels mined from radiology "
                    "reports (so some are wrong)",
}
NOT_A_DEVICE = "**Not a medical device; not for diagnosis.**"


# ------------------------------------------------------------------------------ which report is the model's own


def checkpoint_sha256_of(backend: Any) -> str | None:
    """The sha256 of the checkpoint a loaded backend is: an export's recorded source checkpoint, or a
    ``.safetensors`` checkpoint's own file; None when unknown."""
    sidecar = getattr(backend, "sidecar", None)
    if isinstance(sidecar, dict):
        return (sidecar.get("source_checkpoint") or {}).get("sha256")
    path = getattr(backend, "path", None)
    if path is not None and Path(path).suffix == ".safetensors" and Path(path).is_file():
        return sha256_of(path)
    return None


def report_matching(metrics: dict, checkpoint_sha256: str | None) -> dict | None:
    """Only the evaluation blocks of ``metrics`` that name ``checkpoint_sha256`` (None when none does)."""
    if not checkpoint_sha256:
        return None
    own = {key: metrics[key] for key in EVALUATIONS
           if isinstance(metrics.get(key), dict) and metrics[key].get("checkpoint_sha256") == checkpoint_sha256}
    return own if "evaluation_test" in own else None


def own_report(backend: Any, folders: tuple[Path, ...] = (SHIPPED_WEIGHTS,)) -> dict | None:
    """The loaded model's own evaluation: ``metrics.json`` beside its checkpoint or in one of ``folders``,
    kept only when it names the model's checkpoint by sha256."""
    sha = checkpoint_sha256_of(backend)
    candidates = list(folders)
    path = getattr(backend, "path", None)
    if path is not None and getattr(backend, "sidecar", None) is None:
        candidates.insert(0, Path(path).parent)  # a checkpoint shipped with its own report beside it
    for folder in candidates:
        try:
            metrics = json.loads((Path(folder) / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        report = report_matching(metrics, sha) if isinstance(metrics, dict) else None
        if report is not None:
            return report
    return None


def served_as(backend: Any) -> str:
    """How the loaded model runs, in words (an export's precision and parity check)."""
    entry = getattr(backend, "entry", None)
    if isinstance(entry, dict):
        parity = entry.get("parity_gate") or {}
        verdict = {"pass": "passed", "fail": "failed"}.get(parity.get("result"), "not recorded")
        why = f" ({'; '.join(parity['failures'])})" if parity.get("failures") else ""
        kind = " ".join(part for part in (entry.get("precision"), str(entry.get("format", "")).upper()) if part)
        return f"an {kind} export of its checkpoint (parity check against the checkpoint {verdict}{why})"
    return "the PyTorch checkpoint itself"


# ------------------------------------------------------------------------------ numbers in words


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 %, 100 % and small counts)."""
    if total <= 0:
        return (0.0, 1.0)
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(value: float) -> str:
    return f"{100 * value:.1f} %"


def rate_with_ci(value: float, interval: tuple[float, float] | list[float] | None) -> str:
    if not interval:
        return rate(value)
    return f"{rate(value)} ({100 * interval[0]:.1f}–{100 * interval[1]:.1f})"


def auc_with_ci(metrics: dict) -> str:
    interval = metrics.get("auc_ci95")
    text = f"{metrics['auc']:.3f}"
    return f"{text} ({interval[0]:.3f}–{interval[1]:.3f})" if interval else text


def sensitivity_ci(metrics: dict) -> tuple[float, float] | None:
    matrix = metrics.get("confusion_matrix") or {}
    if "tp" not in matrix or "fn" not in matrix:
        return None
    return wilson_interval(matrix["tp"], matrix["tp"] + matrix["fn"])


def specificity_ci(metrics: dict) -> tuple[float, float] | None:
    matrix = metrics.get("confusion_matrix") or {}
    if "tn" not in matrix or "fp" not in matrix:
        return None
    return wilson_interval(matrix["tn"], matrix["tn"] + matrix["fp"])


def evaluated_sets(report: dict) -> list[tuple[str, str, dict]]:
    """(data set, split, metrics) of every evaluated set in a report: Kermany and the external sets, test
    first, then validation."""
    sets = []
    for key in EVALUATIONS:
        evaluation = report.get(key)
        if not evaluation:
            continue
        split = "test" if key == "evaluation_test" else "validation"
        if evaluation.get("metrics"):
            sets.append(("kermany", split, evaluation["metrics"]))
        for name, external in sorted((evaluation.get("external") or {}).items()):
            if external.get("metrics"):
                sets.append((name, split, external["metrics"]))
    return sets


def set_name(dataset: str, split: str) -> str:
    return f"{'Kermany' if dataset == 'kermany' else dataset} {split}"


def at_threshold(metrics: dict, config: ModelConfig) -> bool:
    """Whether a set's sensitivity and specificity were measured at the model's own threshold."""
    return "threshold" in metrics and abs(float(metrics["threshold"]) - float(config.threshold)) < 1e-6


def _find(report: dict | None, dataset: str, split: str = "test") -> dict | None:
    for name, where, metrics in evaluated_sets(report or {}):
        if (name, where) == (dataset, split):
            return metrics
    return None


# ------------------------------------------------------------------------------ the texts


def operating_point(report: dict | None, config: ModelConfig) -> str:
    """One sentence for the verdict: what the threshold means on the held-out test sets, from the model's
    own report; without one, says that there are no figures."""
    threshold = f"The model says *pneumonia* when the probability is at least **{format_probability(config.threshold)}**."
    kermany = _find(report, "kermany")
    if kermany is None or not at_threshold(kermany, config):
        return f"{threshold} This model has no evaluation report of its own, so no sensitivity or specificity is shown."
    text = (f"{threshold} On the held-out Kermany test set ({kermany['n']} children's X-rays) that threshold found "
            f"**{rate(kermany['sensitivity'])}** of the pneumonias (sensitivity) and cleared **{rate(kermany['specificity'])}** "
            "of the normal films (specificity)")
    adults = _find(report, "nih_adult224")
    if adults is not None and at_threshold(adults, config):
        text += (f"; on adults (nih_adult224 test, {adults['n']} X-rays) {rate(adults['sensitivity'])} and "
                 f"{rate(adults['specificity'])}")
    return text + ". It is set to miss few pneumonias, at the price of false alarms (see *About the model*)."


def _population(config: ModelConfig) -> str:
    provenance = config.provenance or {}
    adults = int(provenance.get("nih_train_images") or 0)
    children = provenance.get("train_images")
    kermany = f"{int(children) - adults:,} " if isinstance(children, (int, float)) else ""
    text = f"Trained on {kermany}{DATASETS['kermany']}"
    if adults:
        text += f", and {adults:,} {DATASETS['nih_adult224']}"
    return text + "."


def _figures(report: dict, config: ModelConfig) -> list[str]:
    lines = ["## Figures", "",
             "Measured on this model (95 % confidence intervals in brackets: bootstrap for AUC, Wilson for "
             f"sensitivity and specificity), at its threshold of {format_probability(config.threshold)}.", "",
             "| evaluated set | X-rays (pneumonia) | AUC | sensitivity | specificity | calibration error (ECE) |",
             "|---|---|---|---|---|---|"]
    for dataset, split, metrics in evaluated_sets(report):
        if at_threshold(metrics, config):
            sensitivity = rate_with_ci(metrics["sensitivity"], sensitivity_ci(metrics))
            specificity = rate_with_ci(metrics["specificity"], specificity_ci(metrics))
        else:
            sensitivity = specificity = "not at this threshold"
        marker = "" if split == "test" else " *"
        lines.append(f"| {set_name(dataset, split)}{marker} | {metrics['n']} ({metrics.get('n_pneumonia', '?')}) | "
                     f"{auc_with_ci(metrics)} | {sensitivity} | {specificity} | {metrics['ece']:.3f} |")
    lines += ["", "AUC: how well the probability ranks pneumonia above normal (1 = always, 0.5 = chance). Sensitivity: "
              "the share of pneumonias called pneumonia; specificity: the share of normal films called normal. ECE: "
              "the average gap between the stated probability and how often pneumonia was really there (0 = exact).",
              "", "\\* Validation chose the training epoch, the threshold and the calibration, so its figures are "
              "optimistic; the test sets were used for nothing but these figures."]
    localisation = (report.get("evaluation_test") or {}).get("localisation") or {}
    kermany, boxes = localisation.get("kermany"), localisation.get("nih_boxes") or {}
    # Box images of the train split may have been trained on (image-level labels): prefer the held-out ones.
    held_out = "val_test" in boxes
    boxes = boxes.get("val_test") or boxes.get("all")
    if kermany or boxes:
        lines += ["", "**Where the heatmap points** (test set, on the map before it is cut to the lung fields):", ""]
        if kermany:
            in_lungs = rate_with_ci(kermany["energy_in_lungs"], kermany.get("energy_in_lungs_ci"))
            lines.append(f"- Kermany pneumonia films ({kermany['images']}): {in_lungs} of the map's weight lies in the "
                         f"lung fields (a uniform map would put {rate(kermany['uniform_energy'])} there); its peak is "
                         f"inside a lung field on {rate_with_ci(kermany['pointing'], kermany.get('pointing_ci'))}.")
        if boxes:
            which = "held-out images" if held_out else "images, some of them seen in training"
            lines.append(f"- Adult films with a radiologist's pneumonia box ({boxes['images']} {which}): the peak "
                         f"is inside the box on {rate_with_ci(boxes['pointing'], boxes.get('pointing_ci'))}.")
    return lines


def _limits(report: dict | None, config: ModelConfig) -> list[str]:
    limits = []
    kermany, adults = _find(report, "kermany"), _find(report, "nih_adult224")
    if kermany is not None and at_threshold(kermany, config) and kermany["specificity"] < TARGETS["specificity"]:
        false_alarm = 1 - kermany["specificity"]
        limits.append(f"**False alarms.** On the Kermany test set specificity is "
                      f"{rate_with_ci(kermany['specificity'], specificity_ci(kermany))} (target {rate(TARGETS['specificity'])}): "
                      f"about 1 normal film in {round(1 / false_alarm)} is called pneumonia.")
    validation = _find(report, "kermany", "validation")
    off = [(name, metrics) for name, split, metrics in evaluated_sets(report or {})
           if split == "test" and metrics["ece"] > TARGETS["ece"]]
    if off:
        where = ", ".join(f"{set_name(name, 'test')} {metrics['ece']:.3f}" for name, metrics in off)
        fitted = f" (ECE {validation['ece']:.3f} there)" if validation else ""
        limits.append(f"**Calibration holds on validation only.** The probability was calibrated on validation{fitted}; "
                      f"on the test sets its error is larger ({where}; target ≤ {TARGETS['ece']:.2f}). Read it as a score "
                      "that ranks films, not as an exact chance.")
    if adults is not None:
        sensitivity = (f"; at the threshold it finds {rate(adults['sensitivity'])} of their pneumonias and clears "
                       f"{rate(adults['specificity'])} of their normal films" if at_threshold(adults, config) else "")
        limits.append(f"**Adults.** It was made mainly for children's films. On adults (nih_adult224 test) its AUC is "
                      f"{auc_with_ci(adults)}{sensitivity}: clearly weaker than on children.")
    else:
        limits.append("**Adults.** It was made mainly for children's films and has no evaluation on adults.")
    localisation = ((report or {}).get("evaluation_test") or {}).get("localisation") or {}
    kermany_maps = localisation.get("kermany") or {}
    boxes = (localisation.get("nih_boxes") or {}).get("val_test") or {}
    short = []
    if "pointing" in kermany_maps and kermany_maps["pointing"] < TARGETS["pointing"]:
        short.append(f"in a lung field on {rate(kermany_maps['pointing'])} of children's pneumonia films (target "
                     f"{rate(TARGETS['pointing'])})")
    if "pointing" in boxes and boxes["pointing"] < TARGETS["box_pointing"]:
        short.append(f"inside the radiologist's box on {rate(boxes['pointing'])} of adult ones (target "
                     f"{rate(TARGETS['box_pointing'])})")
    if short:
        limits.append(f"**The heatmap is not a reliable pointer yet.** Its peak lies {' and '.join(short)}: use it to "
                      "see what the model weighed, never to locate disease.")
    probe = (((report or {}).get("evaluation_test") or {}).get("probe") or {}).get("kermany", {}).get("all")
    if probe and probe.get("flip_rate", 0) > TARGETS["probe_flips"]:
        interval = wilson_interval(probe["flipped"], probe["images"])
        limits.append(f"**Markers can sway it.** Pasting an \"R\" marker or a text stamp, or erasing the corners, changed "
                      f"the verdict on {rate_with_ci(probe['flip_rate'], interval)} of Kermany test films (target ≤ "
                      f"{rate(TARGETS['probe_flips'])}).")
    limits += ["**Other hospitals, machines and views.** It learnt from one children's hospital and one adult collection; "
               "expect it to do worse on other sites' machines, lateral views, portable films or post-processed images.",
               "**Only pneumonia.** It answers normal vs pneumonia; other findings (tuberculosis, tumours, fractures, "
               "tubes and lines) are not looked for, and a film with one of them may be called either."]
    if config.lungs:
        limits.append("**Lung fields.** It looks only inside the lung fields its segmenter finds; when they are not found "
                      "the page says so and the result, computed on a standard lung outline, is less reliable.")
    return limits


def model_card(report: dict | None, config: ModelConfig, served: str | None = None) -> str:
    """The About tab in Markdown. ``report``: the model's own evaluation (``own_report``) or None, which
    leaves every figure out and says so; ``served``: how the model runs (``served_as``)."""
    fixed = bool(config.evidence_scale)
    lines = ["# About the model", "", NOT_A_DEVICE + " PneuNet is a research and screening aid. It never replaces a "
             "clinician reading the film, and a *No pneumonia found* does not rule pneumonia out.", "",
             "## Intended use and population", "",
             "A second look at frontal chest X-rays for signs of pneumonia, to help decide which films a clinician "
             "reads first. " + _population(config) + " It is meant for children's frontal films like these; "
             "adults, other hospitals and other views are outside what it was made for (see *Known limits*).", "",
             f"Model: {config.architecture}, {config.image_size} × {config.image_size} px grey input"
             + (", cut to the lung fields" if config.lungs else "") + (f"; running as {served}." if served else "."), "",
             "## How to read the verdict", "",
             f"- **Pneumonia suspected** when the calibrated pneumonia probability is at least "
             f"{format_probability(config.threshold)} (the threshold), **No pneumonia found** below it."
             + (f" The threshold was chosen on validation ({config.provenance['threshold_rule']}): it is set to miss "
                "few pneumonias, at the price of false alarms." if (config.provenance or {}).get("threshold_rule") else ""),
             "- The probability is *calibrated*: fitted on validation films so that, there, about 30 % of films given "
             "30 % had pneumonia. Extremes are shown as \"> 99.9 %\" and \"< 0.1 %\": the model never claims certainty.",
             "- Some uploads are not analysed: files that cannot be read, and images the input check finds are not "
             "chest X-rays (colour photos, blank images). The page then says why.", "",
             "## How to read the heatmap", ""]
    if fixed:
        lines += ["- The *pneumonia* map shows where inside the lung fields (green outline) the evidence for pneumonia "
                  "sits, on one fixed scale for every image: red is evidence as strong as the strongest region of a typical "
                  "pneumonia, blue or no colour is little or none. The *normal* map shows the evidence for normal.",
                  "- For a *No pneumonia found* verdict the pneumonia map stays cool; faint colour there is weaker than "
                  "what the model calls pneumonia and is **not a finding**."]
    else:
        lines += ["- The map shows where in the image the evidence came from, scaled to that image's own strongest region, "
                  "so every map has a red spot, even on a normal film: for a *No pneumonia found* verdict its hottest spot "
                  "is **not a finding**."]
    lines += ["- It is the model's evidence, not an outline of disease: it can be wrong while the verdict is right, and "
              "the other way round.", ""]
    if report is None:
        lines += ["## Figures", "", "This model has no evaluation report of its own in this copy of the app, so no "
                  "figures are shown: figures measured on another model would not describe this one.", ""]
    else:
        lines += _figures(report, config) + [""]
    lines += ["## Known limits", ""] + [f"- {limit}" for limit in _limits(report, config)]
    lines += ["", NOT_A_DEVICE]
    return "\n".join(lines) + "\n"
