"""Images that are not chest X-rays, made offline, for measuring the input gate.

    from pneunet.non_xrays import non_xray_images
    for category, name, image in non_xray_images(): ...

Categories: scikit-image's bundled sample images (photos, microscopy, astronomy, text scans; each in
colour where it has colour and also converted to grey, which only the feature check can refuse), faces
(LFW subset bundled with scikit-image), rendered text documents, synthetic scenes (colour and grey),
screenshot-like UI mock-ups, noise, blank frames and gradients. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = ("patient report chest radiograph lung opacity normal findings the of and to in left right lobe "
         "invoice total amount date payment account meeting agenda project summary results table figure").split()


def _skimage_samples() -> Iterator[tuple[str, Image.Image]]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".gif") and path.stat().st_size > 0:
            image = Image.open(path)
            image.load()
            yield path.stem, image


def _text_document(rng: np.random.Generator, dark: bool, size: tuple[int, int]) -> Image.Image:
    background, ink = ((20, 20, 20), (235, 235, 235)) if dark else ((250, 250, 248), (15, 15, 15))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(12, 22)))
    y = 10
    while y < size[1] - 20:
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 10))))
        draw.text((12, y), line, fill=ink, font=font)
        y += int(rng.integers(18, 30))
    return image


def _scene(rng: np.random.Generator, colour: bool, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 14))):
        x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        x1, y1 = x0 + int(rng.integers(10, size[0] // 2)), y0 + int(rng.integers(10, size[1] // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2))))
    return image if colour else image.convert("L")


def _screenshot(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (245, 246, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0], 36), fill=tuple(int(v) for v in rng.integers(30, 120, 3)))
    font = ImageFont.load_default(size=14)
    for row in range(6):
        y = 50 + row * 40
        draw.rectangle((16, y, size[0] - 16, y + 30), outline=(200, 200, 210), fill=(255, 255, 255))
        draw.text((24, y + 8), " ".join(rng.choice(WORDS, 4)), fill=(40, 40, 40), font=font)
    return image.convert("L") if rng.random() < 0.5 else image


def _noise(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> Image.Image:
    height, width = size[1], size[0]
    if kind == "uniform":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if kind == "gaussian":
        return Image.fromarray(np.clip(rng.normal(128, 50, (height, width)), 0, 255).astype(np.uint8))
    if kind == "salt_pepper":
        return Image.fromarray(np.where(rng.random((height, width)) < 0.5, 0, 255).astype(np.uint8))
    if kind == "smooth":  # blurred noise: blobs of every grey, the closest noise gets to soft tissue
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16), dtype=np.uint8))
        return coarse.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    if kind == "colour":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    raise ValueError(kind)


def _blank(kind: str, size: tuple[int, int]) -> Image.Image:
    width, height = size
    if kind in ("black", "white", "grey"):
        return Image.new("L", size, {"black": 0, "white": 255, "grey": 128}[kind])
    if kind == "nearly_black":  # a failed exposure: a few grey levels of sensor noise
        return Image.fromarray((np.random.default_rng(0).random((height, width)) * 3).astype(np.uint8))
    ramp = np.linspace(0, 255, width if kind == "horizontal_gradient" else height)
    array = np.tile(ramp, (height, 1)) if kind == "horizontal_gradient" else np.tile(ramp[:, None], (1, width))
    return Image.fromarray(array.astype(np.uint8))


def non_xray_images(seed: int = 0) -> Iterator[tuple[str, str, Image.Image]]:
    """(category, name, image) for every non-X-ray test image (about 130)."""
    rng = np.random.default_rng(seed)
    for name, image in _skimage_samples():
        if min(image.size) < 32:
            continue
        yield "sample_photo", name, image
        if image.mode not in ("L", "1", "I", "I;16", "F"):
            yield "sample_photo_grey", f"{name}_grey", image.convert("L")
    import skimage.data

    faces = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]
    for index in range(0, 200, 20):
        face = Image.fromarray((faces[index] * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC)
        yield "face", f"lfw_{index}", face
    for index in range(12):
        yield "text", f"text_{index}", _text_document(rng, dark=index % 3 == 0, size=(int(rng.integers(300, 700)), int(rng.integers(300, 900))))
    for index in range(16):
        yield "scene", f"scene_{index}", _scene(rng, colour=index % 2 == 0, size=(int(rng.integers(200, 640)), int(rng.integers(200, 640))))
    for index in range(8):
        yield "screenshot", f"screenshot_{index}", _screenshot(rng, size=(480, 320))
    for kind in ("uniform", "gaussian", "salt_pepper", "smooth", "colour"):
        for index in range(3):
            yield "noise", f"noise_{kind}_{index}", _noise(rng, kind, size=(256, 256))
    for kind in ("black", "white", "grey", "nearly_black", "horizontal_gradient", "vertical_gradient"):
        yield "blank", f"blank_{kind}", _blank(kind, size=(256, 256))


def _grating(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A sinusoidal grating or checkerboard at a random angle and period."""
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float64)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 60)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    if rng.random() < 0.5:
        wave = np.sign(wave * np.sin((-xx * np.sin(angle) + yy * np.cos(angle)) * 2 * np.pi / period))
    return Image.fromarray((127.5 + 127.5 * wave).astype(np.uint8))


def _strokes(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Line drawing / sketch: random polylines on a light or dark ground, grey."""
    dark = rng.random() < 0.5
    image = Image.new("L", size, 20 if dark else 235)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        points = [tuple(int(v) for v in rng.integers(0, size)) for _ in range(int(rng.integers(2, 6)))]
        draw.line(points, fill=int(rng.integers(0, 256)), width=int(rng.integers(1, 6)))
    return image


def non_xray_fitting_images(seed: int = 1) -> Iterator[tuple[str, str, Image.Image]]:
    """A development set of non-X-rays kept apart from ``non_xray_images`` (the evaluation set): other
    generator seed, other LFW faces (odd indices), other sizes, and kinds the evaluation set does not have
    (gratings, checkerboards, line drawings); no scikit-image sample photo. Used only to compare gate
    designs during development, never to set a threshold."""
    rng = np.random.default_rng(seed)
    import skimage.data

    faces = skimage.data.lfw_subset()
    for index in range(5, 200, 20):
        face = Image.fromarray((faces[index] * 255).astype(np.uint8)).resize((160, 220), Image.Resampling.BICUBIC)
        yield "face", f"fit_lfw_{index}", face
    for index in range(12):
        yield "text", f"fit_text_{index}", _text_document(rng, dark=index % 4 == 1, size=(int(rng.integers(250, 900)), int(rng.integers(250, 700))))
    for index in range(12):
        yield "scene", f"fit_scene_{index}", _scene(rng, colour=index % 3 == 0, size=(int(rng.integers(150, 800)), int(rng.integers(150, 800))))
    for index in range(6):
        yield "screenshot", f"fit_screenshot_{index}", _screenshot(rng, size=(int(rng.integers(320, 800)), int(rng.integers(240, 600))))
    for kind in ("uniform", "gaussian", "salt_pepper", "smooth"):
        for index in range(3):
            yield "noise", f"fit_noise_{kind}_{index}", _noise(rng, kind, size=(320, 320))
    for index in range(8):
        yield "pattern", f"fit_grating_{index}", _grating(rng, size=(int(rng.integers(200, 500)), int(rng.integers(200, 500))))
    for index in range(8):
        yield "drawing", f"fit_strokes_{index}", _strokes(rng, size=(int(rng.integers(200, 600)), int(rng.integers(200, 600))))
