"""Heatmap overlays as images (numpy + Pillow only, shared by the CLI, the app and the edge runner).

    overlay = overlay_heatmap(grey, result.heatmap, result.lungs)            # image + colour-bar panel
    overlay.crop((0, 0, *grey.size))                                        # the image part alone
    overlay_heatmap(grey, result.heatmap, result.lungs, colour_bar=False)   # no panel: grey's own size

The image part is always the original image at its own size and aspect ratio, in the left ``grey.width``
columns; the colour-bar panel (when asked for) is appended to its right, never drawn over the X-ray.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneunet.lungs import LungFields, dilate, lung_outline

# Anchor colours of a perceptually ordered "turbo"-like ramp: dark blue -> cyan -> yellow -> red.
_RAMP = np.array([[48, 18, 59], [40, 120, 240], [30, 210, 200], [160, 250, 60], [250, 190, 40], [220, 60, 20], [122, 4, 3]],
                 dtype=np.float32)
# Lung outline: a light green that reads over dark lung and white bone, drawn nearly opaque.
OUTLINE_COLOUR = (90, 255, 150)
OUTLINE_OPACITY = 0.85
_PANEL_BACKGROUND, _PANEL_TEXT, _BAR_UNDERLAY = 24, (235, 235, 235), 110
SCALES = ("fixed", "relative")


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    position = np.clip(heatmap, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def _blend(base: np.ndarray, heat: np.ndarray, opacity: float) -> np.ndarray:
    """Colour over ``base`` (H, W, 3) float only where ``heat`` (H, W) in [0, 1] is warm: 0 leaves it as is."""
    alpha = (opacity * np.clip(heat * 1.5, 0, 1))[..., None]
    return base * (1 - alpha) + colorize(heat).astype(np.float32) * alpha


def outline_width(size: tuple[int, int]) -> int:
    """Outline thickness in pixels for an image of (width, height): ~2-3 px once shown at 1024 px."""
    return max(1, round(max(size) / 400))


def outline_mask(lungs: LungFields, size: tuple[int, int]) -> np.ndarray:
    """(height, width) bool: the border of the lung mask stretched to an image of ``size`` (width, height),
    the way the map is; dashed when the mask is the standard template (no plausible lungs were found)."""
    width, height = size
    stretched = Image.fromarray(np.asarray(lungs.mask, dtype=np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)
    outline = lung_outline(np.asarray(stretched) >= 128)
    thickness = outline_width(size)
    outline = dilate(outline, (thickness - 1) // 2)
    if not lungs.plausible:
        dash = 6 * thickness
        rows, columns = np.indices(outline.shape)
        outline &= (rows // dash + columns // dash) % 2 == 0  # a checkerboard dashes lines of any direction
    return outline


def overlay_heatmap(grey: Image.Image, heatmap: np.ndarray, lungs: LungFields | None = None, opacity: float = 0.45, *,
                    colour_bar: bool = True, scale: str = "fixed", target: str = "pneumonia") -> Image.Image:
    """Blend a square model-input heatmap over the original grey image at the image's own size and
    aspect ratio (the model saw it squashed to a square, so the map and the lung outline are stretched
    back the same way). Colour shows only where the map is warm, so the anatomy stays readable elsewhere.

    ``lungs``: draw the outline of the lung fields the model saw (dashed when they are the standard
    template). ``colour_bar``: append a panel to the right saying what the colours mean; ``scale`` says
    how the map was scaled: ``"fixed"`` (the model's evidence scale, 1 = a typical pneumonia's strongest
    region) or ``"relative"`` (a legacy model's map, scaled to this image's own maximum)."""
    if scale not in SCALES:
        raise ValueError(f"unknown heatmap scale {scale!r}; use one of {SCALES}")
    width, height = grey.size
    heat = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR),
                      dtype=np.float32) / 255.0
    blended = _blend(np.asarray(grey.convert("RGB"), dtype=np.float32), heat, opacity)
    if lungs is not None:
        outline = outline_mask(lungs, grey.size)
        blended[outline] = blended[outline] * (1 - OUTLINE_OPACITY) + np.float32(OUTLINE_COLOUR) * OUTLINE_OPACITY
        if not outline.any():  # a mask of the whole image has no border: no legend for a line not drawn
            lungs = None
    image = Image.fromarray(blended.round().astype(np.uint8))
    if not colour_bar:
        return image
    panel = colour_bar_panel(height, scale, target, opacity, lungs)
    combined = Image.new("RGB", (width + panel.width, height))
    combined.paste(image, (0, 0))
    combined.paste(panel, (width, 0))
    return combined


def _labels(scale: str, target: str) -> tuple[str, str, str]:
    """(caption, top label, bottom label) of the colour bar."""
    if scale == "relative":
        return f"evidence for\n{target}\n(relative: scaled\nto this image)", "this image's\nstrongest", "0"
    top = "typical pneumonia\nor stronger" if target == "pneumonia" else "as strong as a\ntypical pneumonia"
    return f"evidence for\n{target}\n(fixed scale)", top, "0 (none)"


def colour_bar_panel(height: int, scale: str = "fixed", target: str = "pneumonia", opacity: float = 0.45,
                     lungs: LungFields | None = None) -> Image.Image:
    """A (panel width, ``height``) RGB key: caption, the colour ramp as it looks over a grey film at
    ``opacity`` (bottom 0, top 1), its end labels, and the lung-outline legend when ``lungs`` is given."""
    caption, top_label, bottom_label = _labels(scale, target)
    font = ImageFont.load_default(size=max(6, round(height / 26)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font, spacing=2)
        return right, bottom

    margin = max(3, round(font.size * 0.6))
    bar_width = max(6, font.size)
    legend = None
    if lungs is not None:
        legend = "lung fields" if lungs.plausible else "standard lung\noutline (lungs\nnot found)"
    caption_box, top_box, bottom_box = box(caption), box(top_label), box(bottom_label)
    legend_box = box(legend) if legend else (0, 0)
    swatch = bar_width
    text_width = max(top_box[0], bottom_box[0])
    panel_width = margin + max(bar_width + margin + text_width, caption_box[0], swatch + margin + legend_box[0]) + margin
    # Drop the words (keeping the bar) where the panel is too short for them: a tiny image.
    needed = caption_box[1] + legend_box[1] + top_box[1] + bottom_box[1] + 5 * margin
    show_text = needed <= height
    if not show_text:
        panel_width, caption_box, legend_box = 2 * margin + bar_width, (0, 0), (0, 0)
    panel = Image.new("RGB", (panel_width, height), (_PANEL_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(panel)
    bar_top = margin + (caption_box[1] + margin if show_text else 0)
    bar_bottom = height - margin - (legend_box[1] + margin if show_text and legend else 0)
    bar_bottom = max(bar_bottom, bar_top + 1)
    values = np.linspace(1.0, 0.0, bar_bottom - bar_top, dtype=np.float32)[:, None].repeat(bar_width, axis=1)
    ramp = _blend(np.full((*values.shape, 3), _BAR_UNDERLAY, dtype=np.float32), values, opacity)
    panel.paste(Image.fromarray(ramp.round().astype(np.uint8)), (margin, bar_top))
    if show_text:
        draw.multiline_text((margin, margin), caption, font=font, fill=_PANEL_TEXT, spacing=2)
        label_x = margin + bar_width + margin
        draw.multiline_text((label_x, bar_top), top_label, font=font, fill=_PANEL_TEXT, spacing=2)
        draw.multiline_text((label_x, bar_bottom - bottom_box[1]), bottom_label, font=font, fill=_PANEL_TEXT, spacing=2)
        if legend:
            legend_top = height - margin - legend_box[1]
            y = legend_top + font.size // 2
            line = max(1, font.size // 6)
            if lungs.plausible:
                draw.line([(margin, y), (margin + swatch, y)], fill=OUTLINE_COLOUR, width=line)
            else:
                half = swatch // 2
                draw.line([(margin, y), (margin + half - 1, y)], fill=OUTLINE_COLOUR, width=line)
                draw.line([(margin + half + 2, y), (margin + swatch + 1, y)], fill=OUTLINE_COLOUR, width=line)
            draw.multiline_text((margin + swatch + margin, legend_top), legend, font=font, fill=_PANEL_TEXT, spacing=2)
    return panel
