"""Shortcut features of chest films: paste and erase burnt-in markers, and probe whether a model reads them.

The Kermany paediatric films often carry a white "R" laterality letter near the top-left corner and text
in the corners. ``CounterfactualAugment`` (training only) pastes such features on both classes so they
carry no label information; ``shortcut_probe`` measures how often pasting or erasing them flips a verdict:

    probe = shortcut_probe(predictor_fn, images, threshold); print(probe_table(probe))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

STAMP_TEXTS = ("PORTABLE", "AP SUPINE", "PA ERECT", "12/03/2019", "SUPINE", "L LAT")
CORNERS = ("tl", "tr", "bl", "br")
_CAP_HEIGHT = 0.70  # cap height / font size of Pillow's default (Aileron) font
_REFERENCE_SIDE = 224  # sizes below are quoted at 224 px and scaled with the shorter side


def _font_for(height: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """A font and stroke width whose capital letters, stroke included, are about ``height`` px tall."""
    stroke = max(1, round(0.08 * height))
    size = max(4, round((height - 2 * stroke) / _CAP_HEIGHT))
    return ImageFont.load_default(size=size), stroke


def text_extent(text: str, height: int) -> tuple[int, int]:
    """(width, height) in px of the ink of ``text`` drawn at ``height`` by the functions below."""
    font, stroke = _font_for(height)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    return right - left, bottom - top


def _draw_text(image: Image.Image, text: str, top_left: tuple[int, int], height: int, value: int) -> Image.Image:
    """Blend ``text`` (ink top-left at ``top_left``) into a copy of the grey image, through its own alpha,
    so only pixels under the ink change."""
    font, stroke = _font_for(height)
    left, top, _, _ = font.getbbox(text, stroke_width=stroke)
    alpha = Image.new("L", image.size, 0)
    origin = (top_left[0] - left, top_left[1] - top)
    ImageDraw.Draw(alpha).text(origin, text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return Image.composite(Image.new("L", image.size, value), image.convert("L"), alpha)


def paste_marker(
    image: Image.Image, text: str = "R", center: tuple[int, int] = (24, 24), height: int = 16, value: int = 255
) -> Image.Image:
    """A bold laterality letter like a film's burnt-in marker, centred at ``center`` (x, y), ``height`` px tall."""
    width, ink_height = text_extent(text, height)
    return _draw_text(image, text, (center[0] - width // 2, center[1] - ink_height // 2), height, value)


def paste_text_stamp(
    image: Image.Image, text: str, top_left: tuple[int, int], height: int, value: int = 255
) -> Image.Image:
    """A short line of white text (e.g. "PORTABLE") whose ink starts at ``top_left`` (x, y)."""
    return _draw_text(image, text, top_left, height, value)


def paste_corner_mark(image: Image.Image, corner: str, size: int | tuple[int, int], value: int = 255) -> Image.Image:
    """A filled bright rectangle, ``size`` px (side, or (width, height)), in one corner: tl, tr, bl or br."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    mark_w, mark_h = (size, size) if isinstance(size, int) else size
    width, height = image.size
    x0 = 0 if corner[1] == "l" else width - mark_w
    y0 = 0 if corner[0] == "t" else height - mark_h
    out = image.convert("L")  # a copy, even when already grey
    out.paste(value, (max(x0, 0), max(y0, 0), x0 + mark_w, y0 + mark_h))
    return out


def _border_median(pixels: np.ndarray, strip: int) -> int:
    border = [pixels[:strip], pixels[-strip:], pixels[:, :strip], pixels[:, -strip:]]
    return int(np.median(np.concatenate([part.ravel() for part in border])))


def erase_corner_markers(image: Image.Image, fraction: float = 0.15) -> Image.Image:
    """Fill the four corner squares (side ``fraction`` of the shorter side) with the median grey of the
    outer border strip, removing burnt-in corner markers and text."""
    pixels = np.array(image.convert("L"))
    height, width = pixels.shape
    side = max(1, round(fraction * min(height, width)))
    fill = _border_median(pixels, strip=max(2, min(height, width) // 56))
    for rows in (slice(0, side), slice(height - side, height)):
        for cols in (slice(0, side), slice(width - side, width)):
            pixels[rows, cols] = fill
    return Image.fromarray(pixels)


def occlude_border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Black out a random border strip (up to 12 % of the side) or a random corner square (up to 15 %)."""
    pixels = np.array(image.convert("L"))
    height, width = pixels.shape
    if rng.random() < 0.5:
        side = ("top", "bottom", "left", "right")[rng.integers(4)]
        extent = height if side in ("top", "bottom") else width
        strip = int(rng.integers(1, max(1, round(0.12 * extent)) + 1))
        target = {"top": (slice(0, strip), slice(None)), "bottom": (slice(height - strip, height), slice(None)),
                  "left": (slice(None), slice(0, strip)), "right": (slice(None), slice(width - strip, width))}[side]
        pixels[target] = 0
        return Image.fromarray(pixels)
    square = int(rng.integers(1, max(1, round(0.15 * min(height, width))) + 1))
    return paste_corner_mark(Image.fromarray(pixels), CORNERS[rng.integers(4)], square, value=0)


def _random_marker(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = min(image.size) / _REFERENCE_SIDE
    height = max(4, round(rng.integers(8, 29) * scale))
    center = (int(rng.integers(image.width)), int(rng.integers(image.height)))
    return paste_marker(image, "RL"[rng.integers(2)], center, height, value=int(rng.integers(200, 256)))


def _random_stamp(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    height = max(4, round(rng.integers(6, 15) * min(image.size) / _REFERENCE_SIDE))
    top_left = (int(rng.integers(image.width)), int(rng.integers(image.height)))
    return paste_text_stamp(image, STAMP_TEXTS[rng.integers(len(STAMP_TEXTS))], top_left, height)


def _random_corner_mark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = min(image.size) / _REFERENCE_SIDE
    size = (max(2, round(rng.integers(6, 25) * scale)), max(2, round(rng.integers(6, 25) * scale)))
    return paste_corner_mark(image, CORNERS[rng.integers(4)], size, value=int(rng.integers(200, 256)))


_COUNTERFACTUALS = (_random_marker, _random_stamp, _random_corner_mark, occlude_border)


class CounterfactualAugment(torch.nn.Module):
    """With probability ``p``, 1-3 random counterfactuals (an R/L letter anywhere, a text stamp, a corner
    mark, border or corner occlusion). Applied to both classes, so these features carry no label."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return image
        # One draw from torch's global RNG seeds the rest, so DataLoader worker seeding controls it all.
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
        count = int(rng.integers(1, 4))
        for index in rng.permutation(len(_COUNTERFACTUALS))[:count]:
            image = _COUNTERFACTUALS[index](image, rng)
        return image


@dataclass(frozen=True)
class ProbeResult:
    variant: str
    images: int
    flipped: int  # verdicts (probability >= threshold) that differ from the unmodified image's
    flip_rate: float
    mean_abs_delta: float  # mean |change in pneumonia probability|
    max_abs_delta: float


def _probe_variants(images: list[Image.Image], seed: int) -> dict[str, list[Image.Image]]:
    """The counterfactual images, one random position per image; "all" reuses the same positions."""
    rng = np.random.default_rng(seed)
    marked, stamped, erased, combined = [], [], [], []
    for image in images:
        image = image.convert("L")
        height = max(4, round(16 * min(image.size) / _REFERENCE_SIDE))  # a Kermany-style "R"
        stamp_height = max(4, round(10 * min(image.size) / _REFERENCE_SIDE))
        center = (int(rng.integers(height, max(height + 1, image.width - height))),
                  int(rng.integers(height, max(height + 1, image.height - height))))
        text = STAMP_TEXTS[rng.integers(len(STAMP_TEXTS))]
        stamp_w, stamp_h = text_extent(text, stamp_height)
        top_left = (int(rng.integers(max(1, image.width - stamp_w))), int(rng.integers(max(1, image.height - stamp_h))))
        marked.append(paste_marker(image, "R", center, height))
        stamped.append(paste_text_stamp(image, text, top_left, stamp_height))
        erased.append(erase_corner_markers(image))
        combined.append(paste_text_stamp(paste_marker(erased[-1], "R", center, height), text, top_left, stamp_height))
    return {"R_marker": marked, "text_stamp": stamped, "erase_corners": erased, "all": combined}


def shortcut_probe(
    predict: Callable[[list[Image.Image]], np.ndarray], images: list[Image.Image], threshold: float, seed: int = 0
) -> list[ProbeResult]:
    """How often pasting an "R", a text stamp, or erasing the corners flips the verdict. ``predict`` maps
    grey PIL images to calibrated pneumonia probabilities."""
    if not images:
        raise ValueError("shortcut_probe needs at least one image")
    base = np.asarray(predict(images), dtype=np.float64)
    results = []
    for variant, changed in _probe_variants(images, seed).items():
        probability = np.asarray(predict(changed), dtype=np.float64)
        delta = np.abs(probability - base)
        flipped = int(np.sum((probability >= threshold) != (base >= threshold)))
        results.append(
            ProbeResult(variant, len(images), flipped, flipped / len(images), float(delta.mean()), float(delta.max()))
        )
    return results


def probe_table(results: list[ProbeResult]) -> str:
    """A markdown table of probe results."""
    lines = [
        "| variant | images | flipped | flip rate | mean \\|Δp\\| | max \\|Δp\\| |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.images} | {r.flipped} | {100 * r.flip_rate:.1f} % "
            f"| {r.mean_abs_delta:.4f} | {r.max_abs_delta:.4f} |"
        )
    return "\n".join(lines)
