"""The one path from an image to model input, shared by training, evaluation, app, export and edge.

numpy + Pillow only (pydicom, when installed, for DICOM): the edge runner imports this without torch.

    unit = to_unit(source, config)          # grey, squashed to a square, equalised, float32 in [0, 1]
    model_input = normalize(unit, config)   # float32 (channels, size, size), what the network eats

``source`` may be a file path, raw bytes, a PIL image or a numpy array (grey, RGB or RGBA; any integer
or float dtype). Every way an input can be wrong ends in one exception type, ``InvalidImageError``,
whose message is written for the person who supplied the image.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneunet.config import ModelConfig

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

# Real radiographs are at most ~4300 x 3500 px (15 MP) and a few tens of MB; anything far above that is
# a mistake or a decompression bomb, refused before its pixels are decoded.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 60_000_000
MIN_SIDE = 32


class InvalidImageError(ValueError):
    """The input cannot be turned into a chest X-ray model input; the message says why."""


def _read_bytes(source: Union[str, os.PathLike]) -> bytes:
    path = Path(source)
    try:
        if not path.is_file():
            raise InvalidImageError("no such file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidImageError(
                f"file is {size / 2**20:.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MB limit"
            )
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # bounded, also if the file grew after stat
    except FileNotFoundError as error:  # deleted between the check and the read
        raise InvalidImageError("no such file") from error
    except OSError as error:  # name too long, permission denied, I/O error, ...
        raise InvalidImageError(f"file could not be read ({error.strerror or error})") from error
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImageError(f"file is larger than the {MAX_FILE_BYTES // 2**20} MB limit")
    return data


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map any numeric array to 0..255 by its own min and max (used for 16-bit, float and DICOM data)."""
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise InvalidImageError("image contains NaN or infinite pixel values")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    if not np.isfinite(high - low):  # a range wider than float64 can hold (e.g. -1e308..1e308): halve it first
        values, low, high = values / 2, low / 2, high / 2
    scale = 255.0 / (high - low)
    if not np.isfinite(scale):  # a subnormal range (e.g. -5e-324..0): divide instead, 255 / range overflows
        return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)
    return np.round((values - low) * scale).astype(np.uint8)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"array of shape {array.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if array.size == 0:
        raise InvalidImageError("image has no pixels")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and array.min() >= 0 and array.max() <= 1:
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype.kind in "iuf":  # not timedelta64, which numpy counts as an integer
        array = _stretch_to_uint8(array)
    else:
        raise InvalidImageError(f"array of dtype {array.dtype} is not an image")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 (H, W[, 3|4]) -> L, RGB or RGBA


def _decode_dicom(data: bytes) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError as error:
        raise InvalidImageError("this is a DICOM file; reading DICOM needs the pydicom package") from error
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # pydicom raises many types for damaged files
        raise InvalidImageError(f"DICOM file could not be read ({error})") from error
    if "PixelData" not in dataset:
        raise InvalidImageError("DICOM file holds no image (no pixel data)")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # missing codec, truncated pixel data, ...
        raise InvalidImageError(
            f"DICOM pixel data could not be decoded ({error}); compressed DICOM needs its codec installed"
        ) from error
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        pixels = apply_voi_lut(pixels, dataset).astype(np.float64)
        if photometric == "MONOCHROME1":  # MONOCHROME1 stores bone dark: invert to the usual look
            pixels = pixels.max() - pixels
        return Image.fromarray(_stretch_to_uint8(pixels))
    return _array_to_pil(pixels)


def _decode_bytes(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise InvalidImageError("file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImageError(f"file is larger than the {MAX_FILE_BYTES // 2**20} MB limit")
    if _is_dicom(data):
        return _decode_dicom(data)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between ~89 and ~179 megapixels; all of that is above our own limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise InvalidImageError("not a recognised image file (expected JPEG, PNG, TIFF, BMP or DICOM)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError(f"image is larger than the {MAX_PIXELS // 1_000_000} megapixel limit") from error
    except Exception as error:
        raise InvalidImageError(f"image could not be opened ({error})") from error
    _check_size(image.size)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # truncated or corrupt data surfaces here, as OSError or SyntaxError
        raise InvalidImageError(f"image data is damaged or truncated ({error})") from error
    return image


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"image is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixel limit"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(
            f"image is {width}x{height} pixels, too small for a chest X-ray (at least {MIN_SIDE} px a side)"
        )


def _pil_to_grey(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grey ("L"). Transparency is composited over black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)))
    if image.mode == "L":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L")


def decode(source: ImageSource) -> Image.Image:
    """Decode any supported source to a PIL image at its own size and in its own mode (colour kept),
    with size limits checked. DICOM comes back grey, already windowed."""
    if isinstance(source, (str, os.PathLike)):
        image = _decode_bytes(_read_bytes(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode_bytes(bytes(source))
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_pil(source)
    else:
        raise InvalidImageError(f"cannot read an image from a {type(source).__name__}")
    _check_size(image.size)
    return image


def load_grey(source: ImageSource) -> Image.Image:
    """Decode any supported source to an 8-bit grey PIL image at its own size."""
    image = decode(source)
    try:
        return _pil_to_grey(image)
    except InvalidImageError:
        raise
    except Exception as error:
        raise InvalidImageError(f"image could not be converted to greyscale ({error})") from error


def to_unit(source: ImageSource, config: ModelConfig) -> np.ndarray:
    """Grey, squashed to ``config.image_size`` square (no crop, as the data set was made), histogram
    equalised if the config says so, as float32 in [0, 1] with shape (size, size)."""
    grey = load_grey(source)
    size = (config.image_size, config.image_size)
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BICUBIC)
    if config.equalize:
        # Global histogram equalisation removes exposure and contrast differences between machines;
        # it is monotone-invariant, so training, app, export and edge see the same intensities.
        grey = ImageOps.equalize(grey)
    return np.asarray(grey, dtype=np.float32) / 255.0


def normalize(unit: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Unit image(s) (..., H, W) -> normalised float32 (..., channels, H, W)."""
    normalised = (np.asarray(unit, dtype=np.float32) - np.float32(config.mean)) / np.float32(config.std)
    return np.repeat(normalised[..., None, :, :], config.channels, axis=-3)


def preprocess(source: ImageSource, config: ModelConfig) -> np.ndarray:
    """``normalize(to_unit(source, config), config)``: one model input of shape (channels, H, W)."""
    return normalize(to_unit(source, config), config)
