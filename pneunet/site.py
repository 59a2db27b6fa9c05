"""Site calibration (numpy only): refit the probability and the operating threshold on a site's own
labelled X-rays, as WHO's guidance for computer-aided detection advises.

    profile = fit_site_profile(logits, labels, model_sha256, target_sensitivity=0.95)
    profile.save("site.json"); profile = SiteProfile.load("site.json", model_sha256)
    probability = profile.probability(logit)            # sigmoid(a * logit + b): Platt scaling
    label = "pneumonia" if probability >= profile.threshold else "normal"

Two parameters (Platt 1999: a * logit + b) rather than the temperature alone: a site's scanner and
population move the logits' centre as well as their spread, and a temperature cannot shift a centre
(re-fitting it alone left ECE at 0.10 in issue 12's measurements). The threshold is the highest one that
keeps the target sensitivity on the site's pneumonia films. A profile only changes the probability and the
threshold, never the heatmap (that is the model's evidence, on the model's own scale).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneunet.decision import sigmoid
from pneunet.integrity import ModelFileError

PROFILE_FORMAT = "pneunet-site/1"
# At least this many films of EACH class. With n pneumonia films the sensitivity can only be measured in steps
# of 1/n: below 20, the threshold for 95 % sensitivity would rest on the single lowest-scored pneumonia, and
# the two calibration parameters on too few normals to place the centre (issue 12's k = 20 draws still
# spread sensitivity from about 0.8 to 1.0).
MIN_PER_CLASS = 20


class SiteProfileError(ModelFileError):
    """A site profile cannot be fitted (too few images) or used (another model, damaged file)."""


def fit_platt(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """(a, b) maximising the likelihood of sigmoid(a * logit + b) (Newton's method on the 2-parameter logistic
    regression), with Platt's target smoothing so that a separable site set does not push a to infinity."""
    x, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    positives, negatives = y.sum(), len(y) - y.sum()
    targets = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    a, b = 1.0, 0.0
    design = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(iterations):
        p = sigmoid(a * x + b)
        gradient = design.T @ (p - targets)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these films is at least ``target``."""
    positives = np.sort(np.asarray(probabilities, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    return float(positives[int(np.ceil(target * len(positives))) - 1])


def sensitivity_specificity(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> tuple[float, float]:
    labels, called = np.asarray(labels) == 1, np.asarray(probabilities) >= threshold
    return float(called[labels].mean()), float((~called[~labels]).mean())


def check_counts(labels: np.ndarray) -> None:
    pneumonia = int(np.sum(np.asarray(labels) == 1))
    normal = len(labels) - pneumonia
    if min(pneumonia, normal) < MIN_PER_CLASS:
        raise SiteProfileError(
            f"{normal} normal and {pneumonia} pneumonia images: a site profile needs at least {MIN_PER_CLASS} of "
            f"each. With fewer, the threshold for the target sensitivity rests on one or two pneumonia films and "
            "the calibration on too few normals; label more films of the missing class first.")


@dataclass
class SiteProfile:
    """A site's operating point for one model: calibration sigmoid(slope * logit + intercept) and threshold."""

    model_sha256: str  # the model the logits came from; another model's logits mean something else
    slope: float
    intercept: float
    threshold: float
    target_sensitivity: float
    images: dict  # {"normal": n, "pneumonia": n}
    fitted_on: str  # ISO date
    measured: dict  # sensitivity/specificity on the site's films, with bootstrap 95 % intervals (out of bag)
    name: str = "site"
    format: str = PROFILE_FORMAT

    @property
    def count(self) -> int:
        return int(self.images["normal"] + self.images["pneumonia"])

    def probability(self, logits) -> np.ndarray:
        return sigmoid(self.slope * np.asarray(logits, dtype=np.float64) + self.intercept)

    def describe(self) -> str:
        """How a page or a CSV names the operating point in force."""
        return f"{self.name} profile fitted on {self.count} images ({self.fitted_on})"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, model_sha256: str) -> "SiteProfile":
        """Read a profile and refuse it unless it was fitted for the model with ``model_sha256``."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
            if values.get("format") != PROFILE_FORMAT:
                raise ValueError(f"format {values.get('format')!r}, expected {PROFILE_FORMAT!r}")
            profile = cls(**values)
        except (OSError, ValueError, TypeError) as error:
            raise SiteProfileError(f"{path}: not a readable site profile ({error})") from error
        if profile.model_sha256 != model_sha256:
            raise SiteProfileError(f"{path}: fitted for another model (sha256 {profile.model_sha256[:12]}...), not this "
                                   f"one ({model_sha256[:12]}...); refit it with python -m pneunet calibrate")
        return profile


def fit_site_profile(logits, labels, model_sha256: str, target_sensitivity: float = 0.95, name: str = "site",
                     resamples: int = 1000, seed: int = 0, today: str | None = None) -> SiteProfile:
    """Fit calibration and threshold on a site's films; ``measured`` holds bootstrap 95 % intervals of the
    sensitivity and specificity the procedure gives on films it was NOT fitted on (refit on each resample,
    scored on the images left out of it), so they say what to expect on the site's next films."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels).astype(int)
    check_counts(labels)
    slope, intercept = fit_platt(logits, labels)
    threshold = threshold_for_sensitivity(labels, sigmoid(slope * logits + intercept), target_sensitivity)
    rng = np.random.default_rng(seed)
    outcomes = []
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    for _ in range(resamples):  # stratified, so each resample has both classes
        chosen = np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        left_out = np.setdiff1d(np.arange(len(labels)), chosen)
        if len(np.unique(labels[left_out])) < 2:
            continue
        a, b = fit_platt(logits[chosen], labels[chosen])
        t = threshold_for_sensitivity(labels[chosen], sigmoid(a * logits[chosen] + b), target_sensitivity)
        outcomes.append(sensitivity_specificity(labels[left_out], sigmoid(a * logits[left_out] + b), t))
    outcomes = np.asarray(outcomes)
    sensitivity, specificity = sensitivity_specificity(labels, sigmoid(slope * logits + intercept), threshold)
    measured = {"sensitivity_on_fitted_films": sensitivity, "specificity_on_fitted_films": specificity,
                "sensitivity_ci95": np.percentile(outcomes[:, 0], [2.5, 97.5]).tolist(),
                "specificity_ci95": np.percentile(outcomes[:, 1], [2.5, 97.5]).tolist(),
                "bootstrap": f"{len(outcomes)} stratified resamples, refitted, scored out of bag"}
    return SiteProfile(model_sha256, slope, intercept, threshold, target_sensitivity,
                       {"normal": int((labels == 0).sum()), "pneumonia": int((labels == 1).sum())},
                       today or datetime.date.today().isoformat(), measured, name)


def operating_curve_image(logits, labels, profile: SiteProfile, size: int = 480):
    """The site's ROC curve (sensitivity against 1 - specificity over every threshold) with the profile's
    operating point marked: a PNG-ready PIL image drawn with Pillow (serving installs no plotting library)."""
    from PIL import Image, ImageDraw

    probabilities = profile.probability(logits)
    labels = np.asarray(labels) == 1
    thresholds = np.concatenate([[np.inf], np.sort(np.unique(probabilities))[::-1], [-np.inf]])
    points = [((probabilities[~labels] >= t).mean(), (probabilities[labels] >= t).mean()) for t in thresholds]
    margin, top, side = 56, 48, size - 110
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def xy(false_positive_rate: float, sensitivity: float) -> tuple[float, float]:
        return margin + false_positive_rate * side, top + (1 - sensitivity) * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(190, 190, 190))
    draw.line([xy(*p) for p in points], fill=(30, 90, 200), width=2)
    sensitivity, specificity = sensitivity_specificity(labels.astype(int), probabilities, profile.threshold)
    x, y = xy(1 - specificity, sensitivity)
    draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(200, 30, 30), width=3)
    draw.text((margin, 8), f"{profile.describe()}", fill="black")
    draw.text((margin, 22), f"threshold {profile.threshold:.3f}: sensitivity {sensitivity:.2f}, specificity {specificity:.2f} "
                            "(on the fitted films)", fill=(200, 30, 30))
    draw.text((margin, top + side + 8), "1 - specificity (false alarms among normals)", fill="black")
    draw.text((4, top + side // 2), "sens.", fill="black")
    return image
