"""Input gate: refuse images that are not chest X-rays before giving a verdict (numpy + Pillow only).

Three checks, all cheap and all usable by the torch-free edge runner:

1. ``check_image``, on the decoded image before the model runs: colour photos and colour screenshots
   (colourfulness), blank frames (grey spread), and the *appearance* check: a probabilistic-PCA
   Mahalanobis distance of ``image_descriptor`` (layout of the equalised image on an 8 x 8 grid,
   grey-level histogram, edge / fine-detail statistics, left-right symmetry; numpy + Pillow only) to the
   training X-rays. Grey photos, faces, documents, drawings, noise and gradients are refused here.
2. ``check_features``: on the model's pooled features (mean over H, W of ``model.features(x)``), the same
   kind of distance (Tipping & Bishop 1999: the first ``k`` principal directions scaled by their own
   variance, the rest by the average left-over variance) to the training X-rays' features.
3. ``population_warning``: never a refusal. On the image descriptor: the distance to the main training
   population alone (Kermany's children), and a linear score fitted to tell those films from the other
   chest X-rays PneuNet has (nih_adult224's adults); a real chest X-ray unlike that population (an adult's,
   another machine, a portable film) is scored and flagged with a plain warning. "Not a chest X-ray" is for checks 1 and 2, fitted on every
   kind of chest X-ray PneuNet has (Kermany and nih_adult224), so adults are never called non-X-rays.

Both distances are fitted on TRAIN X-rays and their thresholds set on VALIDATION X-rays (margin x a high
quantile); no non-X-ray image and no test image sets a threshold.

    gate = InputGate.load("pneunet/weights/pneunet.gate.safetensors")
    gate.check_image(decoded_image)            # raises NotAnXrayError
    gate.check_features(pooled)                # pooled: (C,) or (N, C); raises NotAnXrayError

Parameters are fitted by ``python -m training.fit_gate --checkpoint CKPT`` (train features; threshold on
validation X-rays) and measured by ``python -m training.gate_report`` (writes docs/gate_report.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pneunet.integrity import ModelFileError, sha256_of
from pneunet.preprocessing import InvalidImageError

REFUSAL_ADVICE = "Please upload a frontal chest X-ray (JPEG, PNG or DICOM)."
POPULATION_WARNING = ("This chest X-ray looks unlike the ones the model mostly learned from (children aged 1-5 in one "
                      "hospital): it may be an adult's, or from another kind of machine or setting. It was analysed, "
                      "but treat the result with extra caution.")


class NotAnXrayError(InvalidImageError):
    """The image decoded fine but does not look like a chest X-ray; the message says why."""


class GateFileError(ModelFileError):
    """A gate file is missing, unreadable, or does not match the sha256 recorded beside it."""


def gate_sidecar_path(gate_file: str | Path) -> Path:
    """The JSON recording a gate file's sha256: ``pneunet.gate.safetensors`` -> ``pneunet.gate.json``."""
    return Path(gate_file).with_suffix(".json")


def gate_fitted_for(path: str | Path) -> str | None:
    """The sha256 of the model checkpoint a gate file was fitted on (recorded by training.fit_gate), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {}).get("provenance", "{}")).get("checkpoint_sha256")
    except Exception as error:  # a damaged file: the same message as load()
        raise GateFileError(f"{path}: not a readable gate file ({error})") from error


def verify_gate_file(path: str | Path) -> None:
    """Refuse a gate file whose sha256 differs from the one in its sidecar JSON (truncated or changed)."""
    path = Path(path)
    sidecar = gate_sidecar_path(path)
    if not sidecar.is_file():
        raise GateFileError(f"{path}: no recorded sha256 ({sidecar.name} missing); refit the gate with "
                            "python -m training.fit_gate --checkpoint CKPT")
    try:
        expected = json.loads(sidecar.read_text()).get("sha256")
    except (json.JSONDecodeError, AttributeError) as error:
        raise GateFileError(f"{sidecar}: not a valid gate sidecar ({error})") from error
    actual = sha256_of(path)
    if actual != expected:
        raise GateFileError(f"{path}: sha256 {actual[:12]}... does not match {str(expected)[:12]}... recorded in "
                            f"{sidecar.name}; the file is damaged or was changed")


def gate_path_for(checkpoint: str | Path) -> Path:
    """Where a checkpoint's gate lives: ``pneunet.safetensors`` -> ``pneunet.gate.safetensors``."""
    return Path(checkpoint).with_suffix(".gate.safetensors")


def colourfulness(image: Image.Image | np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an image on its 128 px thumbnail: 0 for grey, ~15 for
    muted photos, 50+ for vivid ones. JPEG chroma noise on a grey X-ray stays below ~2."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image)) if image.dtype == np.uint8 else None
        if image is None:
            return 0.0  # non-8-bit arrays are grey by construction in preprocessing
    if image.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return 0.0  # L, LA, I;16, F, 1: grey modes carry no colour
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((128, 128))
    rgb = np.asarray(thumbnail, dtype=np.float32)
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.hypot(red_green.std(), yellow_blue.std())
    offset = np.hypot(red_green.mean(), yellow_blue.mean())
    return float(spread + 0.3 * offset)


def grey_spread(image: Image.Image) -> float:
    """Standard deviation of the grey levels (0..255) of a 128 px thumbnail: ~0 for a blank frame.
    16-bit, 32-bit and float images are first stretched to 8 bits as the model sees them (a plain
    ``convert("L")`` clips a float image in [0, 1] to one grey level)."""
    from pneunet.preprocessing import _pil_to_grey

    thumbnail = _pil_to_grey(image) if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") else image.convert("L")
    thumbnail.thumbnail((128, 128))
    return float(np.asarray(thumbnail, dtype=np.float32).std())


DESCRIPTOR_SIDE = 64  # the image descriptor works on a 64 x 64 squashed copy (as the model input is squashed)
LAYOUT_CELLS = 8  # 8 x 8 block means of the equalised image: where bright and dark regions lie
HISTOGRAM_BINS = 16


def image_descriptor(image: Image.Image) -> np.ndarray:
    """A (D,) description of an image's appearance that needs no model (numpy + Pillow only).

    On a grey copy squashed to 64 x 64 like the model input: the layout (8 x 8 block means of the
    histogram-equalised image, the two lungs, mediastinum and shoulders of a chest film), the shape of
    the grey-level histogram before equalisation, edge and fine-detail statistics (documents, UI and
    noise are full of sharp edges; radiographs are soft) and left-right symmetry."""
    from pneunet.preprocessing import _pil_to_grey

    grey = _pil_to_grey(image)
    small = grey.resize((DESCRIPTOR_SIDE, DESCRIPTOR_SIDE), Image.Resampling.BOX)
    raw = np.asarray(small, dtype=np.float64) / 255.0
    equalised = np.asarray(ImageOps.equalize(small), dtype=np.float64) / 255.0
    cell = DESCRIPTOR_SIDE // LAYOUT_CELLS
    layout = equalised.reshape(LAYOUT_CELLS, cell, LAYOUT_CELLS, cell).mean(axis=(1, 3)).ravel()
    histogram = np.histogram(raw, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / raw.size
    histogram = np.sqrt(histogram)  # Hellinger embedding: empty and full bins on a comparable scale
    spread = raw.std() + 1e-3
    dx, dy = np.diff(raw, axis=1) / spread, np.diff(raw, axis=0) / spread
    gradient = np.concatenate([np.abs(dx).ravel(), np.abs(dy).ravel()])
    laplacian = np.abs(raw[1:-1, 1:-1] * 4 - raw[:-2, 1:-1] - raw[2:, 1:-1] - raw[1:-1, :-2] - raw[1:-1, 2:]) / spread
    # fine detail at full resolution: noise and text are sharp at every scale, a squashed X-ray is not
    fine = np.asarray(grey.resize((256, 256), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    fine_spread = fine.std() + 1e-3
    fine_gradient = np.abs(np.diff(fine, axis=1)).mean() / fine_spread
    mirrored = equalised[:, ::-1]
    symmetry = np.corrcoef(equalised.ravel(), mirrored.ravel())[0, 1] if equalised.std() > 0 else 0.0
    statistics = np.array([
        np.log(gradient.mean() + 1e-3), np.log(np.quantile(gradient, 0.9) + 1e-3), np.mean(gradient > 1.0),
        np.log(laplacian.mean() + 1e-3), np.log(fine_gradient + 1e-3), np.log(spread),
        raw.mean(), np.nan_to_num(symmetry),
    ])
    return np.concatenate([layout, histogram, statistics])


@dataclass
class PpcaDistance:
    """Probabilistic-PCA Mahalanobis distance to a fitted sample (Tipping & Bishop 1999): the first ``k``
    principal directions scaled by their own variance, the rest by the average left-over variance."""

    mean: np.ndarray  # (C,)
    components: np.ndarray  # (k, C)
    variances: np.ndarray  # (k,)
    residual_variance: float
    scale: np.ndarray | None = None  # (C,) per-dimension scale applied first (standardisation), or None
    threshold: float = float("inf")

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        """Per-row distance, divided by sqrt(C) so typical training rows score ~1."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if self.scale is not None:
            vectors = vectors / self.scale
        centred = vectors - self.mean
        projected = centred @ self.components.T
        residual = np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1)
        squared = np.sum(projected**2 / self.variances, axis=1) + np.maximum(residual, 0) / self.residual_variance
        return np.sqrt(squared / vectors.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dims: int, standardise: bool = False) -> "PpcaDistance":
        vectors = np.asarray(vectors, dtype=np.float64)
        scale = vectors.std(axis=0) + 1e-6 * (vectors.std() + 1e-12) if standardise else None
        if scale is not None:
            vectors = vectors / scale
        mean = vectors.mean(axis=0)
        _, singular, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        eigenvalues = singular**2 / (len(vectors) - 1)
        dims = min(dims, len(eigenvalues) - 1)
        left_over = eigenvalues[dims:].sum() / max(vectors.shape[1] - dims, 1)
        floor = 1e-6 * eigenvalues[0]  # keeps the distance finite for directions with (almost) no spread
        return cls(mean, vt[:dims], np.maximum(eigenvalues[:dims], floor), float(max(left_over, floor)), scale)

    def calibrate(self, held_out: np.ndarray, quantile: float, margin: float) -> float:
        self.threshold = float(margin * np.quantile(self.distance(held_out), quantile))
        return self.threshold


@dataclass
class LinearScore:
    """A linear score on standardised vectors, ((v - mean) / scale) . weight + bias; above ``threshold`` flags."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    threshold: float = float("inf")

    def score(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        return ((vectors - self.mean) / self.scale) @ self.weight + self.bias


@dataclass
class InputGate:
    """Fitted gate parameters; ``threshold`` applies to ``distance`` (larger = less like an X-ray)."""

    mean: np.ndarray  # (C,) mean pooled feature of the training X-rays
    components: np.ndarray  # (k, C) principal directions
    variances: np.ndarray  # (k,) variance along each direction
    residual_variance: float  # average variance of the C - k directions left out
    threshold: float  # distance above which an image is refused
    max_colourfulness: float = 12.0
    min_grey_spread: float = 4.0
    appearance: PpcaDistance | None = None  # distance of ``image_descriptor`` to the training X-rays (Kermany's)
    # The same distance to the other chest X-rays PneuNet has (nih_adult224's adults): an image is refused
    # only when it is far from both populations, so an adult's film is never called "not a chest X-ray".
    appearance_adult: PpcaDistance | None = None
    # The training-population check, on ``image_descriptor`` (flag, never refuse): the distance to the main
    # training population (Kermany's children) alone, and a linear score separating it from other chest X-rays.
    population: PpcaDistance | None = None
    population_score: LinearScore | None = None

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        """Per-image PPCA Mahalanobis distance, divided by sqrt(C) so typical X-rays score ~1."""
        pooled = np.atleast_2d(np.asarray(pooled, dtype=np.float64))
        centred = pooled - self.mean
        projected = centred @ self.components.T
        residual = np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1)
        squared = np.sum(projected**2 / self.variances, axis=1) + np.maximum(residual, 0) / self.residual_variance
        return np.sqrt(squared / pooled.shape[1])

    def image_refusal(self, image: Image.Image) -> str | None:
        """Why the decoded image is refused before the model runs, or None."""
        colour = colourfulness(image)
        if colour > self.max_colourfulness:
            return f"this looks like a colour picture (colourfulness {colour:.0f}), not a chest X-ray. {REFUSAL_ADVICE}"
        spread = grey_spread(image)
        if spread < self.min_grey_spread:
            return f"the image is blank (almost one grey level), not a chest X-ray. {REFUSAL_ADVICE}"
        if self.appearance is not None:
            distance = self.appearance_ratio(image_descriptor(image))
            if distance > 1.0:
                return (f"this does not look like a chest X-ray (its layout, contrast and texture are {distance:.2f} times "
                        f"as far from the training X-rays as the limit). {REFUSAL_ADVICE}")
        return None

    def appearance_ratio(self, descriptors: np.ndarray) -> float | np.ndarray:
        """Appearance distance over its limit, to the nearer population (> 1: refused); a float for one image."""
        ratio = self.appearance.distance(descriptors) / self.appearance.threshold
        if self.appearance_adult is not None:
            ratio = np.minimum(ratio, self.appearance_adult.distance(descriptors) / self.appearance_adult.threshold)
        return float(ratio[0]) if np.ndim(descriptors) == 1 else ratio

    def features_refused(self, pooled: np.ndarray) -> np.ndarray:
        """Per image (rows of ``pooled``): whether the feature check refuses it."""
        return self.distance(pooled) > self.threshold

    def feature_refusal(self, distance: float) -> str | None:
        """Why an image with this feature distance is refused, or None."""
        if distance > self.threshold:
            return (f"this does not look like a chest X-ray to the model (distance {distance:.2f} from the training "
                    f"X-rays, limit {self.threshold:.2f}). {REFUSAL_ADVICE}")
        return None

    def population_warning(self, image: Image.Image) -> str | None:
        """The plain warning for a chest X-ray unlike the training population (None when it is alike, or for a
        gate without the population check). Such an image is still scored."""
        if self.population is None and self.population_score is None:
            return None
        descriptor = image_descriptor(image)
        far = self.population is not None and float(self.population.distance(descriptor)[0]) > self.population.threshold
        other = self.population_score is not None and float(self.population_score.score(descriptor)[0]) > self.population_score.threshold
        return POPULATION_WARNING if far or other else None

    def check_image(self, image: Image.Image) -> None:
        reason = self.image_refusal(image)
        if reason:
            raise NotAnXrayError(reason)

    def check_features(self, pooled: np.ndarray) -> None:
        for distance in self.distance(pooled):
            reason = self.feature_refusal(float(distance))
            if reason:
                raise NotAnXrayError(reason)

    # ------------------------------------------------------------------------------------ storage

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """safetensors (numpy, no pickle): float32 arrays; scalars and provenance in the header."""
        from safetensors.numpy import save_file

        scalars = {"residual_variance": self.residual_variance, "threshold": self.threshold,
                   "max_colourfulness": self.max_colourfulness, "min_grey_spread": self.min_grey_spread}
        arrays = {"mean": self.mean, "components": self.components, "variances": self.variances}
        if self.appearance is not None:
            scalars["appearance"] = {"residual_variance": self.appearance.residual_variance,
                                     "threshold": self.appearance.threshold}
            arrays.update({"appearance_mean": self.appearance.mean, "appearance_components": self.appearance.components,
                           "appearance_variances": self.appearance.variances})
            if self.appearance.scale is not None:
                arrays["appearance_scale"] = self.appearance.scale
        if self.appearance_adult is not None:
            scalars["appearance_adult"] = {"residual_variance": self.appearance_adult.residual_variance,
                                           "threshold": self.appearance_adult.threshold}
            arrays.update({"appearance_adult_mean": self.appearance_adult.mean,
                           "appearance_adult_components": self.appearance_adult.components,
                           "appearance_adult_variances": self.appearance_adult.variances})
        if self.population is not None:
            scalars["population"] = {"residual_variance": self.population.residual_variance,
                                     "threshold": self.population.threshold}
            arrays.update({"population_mean": self.population.mean, "population_components": self.population.components,
                           "population_variances": self.population.variances})
        if self.population_score is not None:
            scalars["population_score"] = {"bias": self.population_score.bias, "threshold": self.population_score.threshold}
            arrays.update({"population_score_mean": self.population_score.mean,
                           "population_score_scale": self.population_score.scale,
                           "population_score_weight": self.population_score.weight})
        header = {"gate": json.dumps(scalars), "provenance": json.dumps(metadata or {})}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path), metadata=header)
        record = {"format": "pneunet-gate/1", "file": Path(path).name, "sha256": sha256_of(Path(path))}
        gate_sidecar_path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, verify: bool = False) -> "InputGate":
        """Read a gate file (safetensors: no pickle). ``verify``: first check its sha256 against the
        sidecar JSON written by ``save`` (``GateFileError`` naming the file when it differs)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no input gate; fit one with python -m training.fit_gate --checkpoint CKPT")
        if verify:
            verify_gate_file(path)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                scalars = json.loads(handle.metadata()["gate"])
                arrays = {key: handle.get_tensor(key).astype(np.float64) for key in handle.keys()}
            appearance = scalars.pop("appearance", None)
            if appearance is not None:  # the image-level appearance check (gates fitted since issue 3)
                appearance = PpcaDistance(arrays.pop("appearance_mean"), arrays.pop("appearance_components"),
                                          arrays.pop("appearance_variances"), appearance["residual_variance"],
                                          arrays.pop("appearance_scale", None), appearance["threshold"])
            adult = scalars.pop("appearance_adult", None)
            if adult is not None:
                adult = PpcaDistance(arrays.pop("appearance_adult_mean"), arrays.pop("appearance_adult_components"),
                                     arrays.pop("appearance_adult_variances"), adult["residual_variance"], None,
                                     adult["threshold"])
            population = scalars.pop("population", None)
            if population is not None:  # the training-population check (gates fitted since issue 12)
                population = PpcaDistance(arrays.pop("population_mean"), arrays.pop("population_components"),
                                          arrays.pop("population_variances"), population["residual_variance"],
                                          None, population["threshold"])
            score = scalars.pop("population_score", None)
            if score is not None:
                score = LinearScore(arrays.pop("population_score_mean"), arrays.pop("population_score_scale"),
                                    arrays.pop("population_score_weight"), score["bias"], score["threshold"])
            gate = cls(**arrays, **scalars, appearance=appearance, appearance_adult=adult, population=population,
                       population_score=score)
        except Exception as error:  # SafetensorError, KeyError, JSONDecodeError, ... for a damaged file
            raise GateFileError(f"{path}: not a readable gate file ({error})") from error
        return gate

    @classmethod
    def fit(cls, pooled: np.ndarray, dims: int = 64) -> "InputGate":
        """PCA of (N, C) training features; ``threshold`` is left at infinity for ``calibrate``."""
        fitted = PpcaDistance.fit(pooled, dims)
        return cls(fitted.mean, fitted.components, fitted.variances, fitted.residual_variance, float("inf"))

    def calibrate(self, pooled_xrays: np.ndarray, quantile: float = 0.995, margin: float = 1.1) -> float:
        """Set ``threshold`` to ``margin`` x the ``quantile`` of held-out X-rays' distances; returns it."""
        self.threshold = float(margin * np.quantile(self.distance(pooled_xrays), quantile))
        return self.threshold
