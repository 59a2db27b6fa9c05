"""Fuzzing the one preprocessing path (hypothesis): whatever comes in, out comes a valid model input or
``InvalidImageError``, never another exception.

Sources: random bytes (bare and behind the magic numbers of every format we open), real JPEG / PNG /
16-bit PNG / RGBA PNG / GIF / BMP / TIFF / DICOM bytes cut short, bit-flipped, overwritten, spliced; and
numpy arrays of every dtype kind, 0-d to 4-d shapes with zero-size dims and 1-5 channels, with NaN,
infinities, negative, subnormal and huge values. A valid result means: ``decode`` / ``load_grey`` give an
image of legal size (grey for ``load_grey``); ``to_unit`` a finite float32 (size, size) array in [0, 1];
``preprocess`` a finite float32 (channels, size, size) array in the normalised range. Numerical garbage
(NaN silently cast to pixels) counts as a failure too.

Runs in a few seconds: bounded ``max_examples`` per test, small images, no deadline (shared CPU).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneunet.config import ModelConfig
from pneunet.preprocessing import (MAX_PIXELS, MIN_SIDE, InvalidImageError, decode, load_grey, preprocess,
                                   to_unit)
from tests.helpers import EXAMPLES
from tests.reliability.corpus import write_dicom

# The shipped architecture's input (pneunet.models.default_config("efficientnet_lite0"), without importing torch).
LITE = ModelConfig("efficientnet_lite0", 224, mean=127.0 / 255.0, std=128.0 / 255.0)
RGB3 = ModelConfig("x", 48, channels=3, mean=0.4, std=0.3, equalize=False)  # other size, channels, no equalisation
CONFIGS = [LITE, RGB3]
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUNCTIONS = ["decode", "load_grey", "to_unit", "preprocess"]


# ------------------------------------------------------------------------------ the property


def _check_image(image) -> None:
    assert isinstance(image, Image.Image)
    width, height = image.size
    assert min(width, height) >= MIN_SIDE and width * height <= MAX_PIXELS


def check_call(function: str, source, config: ModelConfig = LITE):
    """Call one public function; pass if it returns a valid result or raises InvalidImageError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if function == "decode":
                result = decode(source)
            elif function == "load_grey":
                result = load_grey(source)
            elif function == "to_unit":
                result = to_unit(source, config)
            else:
                result = preprocess(source, config)
        except InvalidImageError as error:
            assert str(error), "InvalidImageError without a message"
            result = None
    # NaN or overflow turned into pixels without an error is a silent wrong answer, not a valid input.
    if result is None:
        return None
    garbage = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
               and ("invalid value" in str(w.message) or "overflow" in str(w.message))]
    assert not garbage, f"{function}: numerical garbage: {garbage}"
    size = config.image_size
    if function == "decode":
        _check_image(result)
    elif function == "load_grey":
        _check_image(result)
        assert result.mode == "L"
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.float32
        assert np.all(np.isfinite(result))
        if function == "to_unit":
            assert result.shape == (size, size)
            assert result.min() >= 0.0 and result.max() <= 1.0
        else:
            assert result.shape == (config.channels, size, size)
            low, high = (0 - config.mean) / config.std, (1 - config.mean) / config.std
            assert result.min() >= low - 1e-5 and result.max() <= high + 1e-5
    return result


# ------------------------------------------------------------------------------ real encoded images


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dicom(grey: np.ndarray, bits: int, photometric: str = "MONOCHROME2") -> bytes:
    buffer = io.BytesIO()
    write_dicom(buffer, grey, photometric, bits)
    return buffer.getvalue()


def _real_files() -> dict[str, bytes]:
    xray = Image.open(EXAMPLES / "pneumonia_person1_virus_6.jpeg").convert("L")
    small = xray.resize((48, 40))  # small, so that a fuzzed decode is fast
    grey = np.asarray(small)
    files = {
        "jpeg (real file)": (EXAMPLES / "normal_IM-0001-0001.jpeg").read_bytes(),
        "jpeg": _encode(small, "JPEG", quality=80),
        "progressive jpeg": _encode(small.convert("RGB"), "JPEG", progressive=True),
        "png": _encode(small, "PNG"),
        "png 16-bit": _encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "png rgba": _encode(Image.fromarray(np.dstack([grey] * 3 + [grey[::-1]])), "PNG"),
        "png palette": _encode(small.convert("P"), "PNG"),
        "gif": _encode(small, "GIF"),
        "bmp": _encode(small.convert("RGB"), "BMP"),
        "tiff": _encode(small, "TIFF"),
        "tiff float": _encode(Image.fromarray(grey.astype(np.float32) * 3.5 - 7), "TIFF"),
        "webp": _encode(small, "WEBP"),
    }
    try:
        files["dicom 8-bit"] = _dicom(grey, 8)
        files["dicom 16-bit monochrome1"] = _dicom(grey, 16, "MONOCHROME1")
    except ImportError:  # pydicom is optional
        pass
    return files


REAL = _real_files()
NAMES = sorted(REAL)


def test_every_unmutated_real_file_gives_a_valid_input():
    for name in NAMES:
        for config in CONFIGS:
            assert check_call("preprocess", REAL[name], config) is not None, name


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(REAL[draw(st.sampled_from(NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "delete", "duplicate", "insert"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            data = data[:at]
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                position = draw(st.integers(0, len(data) - 1))
                data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff" * 4, b"\x00" * 4, b"\x7f\xff\xff\xff"]))
            data[at:at + len(chunk)] = chunk
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(FUZZ, max_examples=250)
@given(data=mutated_files(), function=st.sampled_from(FUNCTIONS))
def test_mutated_real_files(data, function):
    check_call(function, data)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM",
         b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\x00" * 128 + b"DICM", b"P5\n64 64\n255\n"]


@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=2048), function=st.sampled_from(FUNCTIONS),
       kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_random_bytes(prefix, body, function, kind):
    check_call(function, kind(prefix + body))


# ------------------------------------------------------------------------------ arrays

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "longdouble", ">f4", ">u2", "complex64", "complex128",
          "object", "U4", "S2", "V4", "datetime64[s]", "timedelta64[ms]"]
SIDES = [0, 1, 2, 31, 32, 33, 40, 57]


@st.composite
def shapes(draw) -> tuple[int, ...]:
    ndim = draw(st.sampled_from([0, 1, 2, 2, 3, 3, 3, 4]))
    side = st.sampled_from(SIDES) if draw(st.booleans()) else st.integers(0, 70)
    if ndim == 0:
        return ()
    if ndim == 1:
        return (draw(side),)
    shape = (draw(side), draw(side))
    if ndim == 3:
        shape += (draw(st.integers(0, 5)),)
    if ndim == 4:
        shape = (draw(st.integers(0, 3)),) + shape + (draw(st.integers(1, 4)),)
    return shape


SPECIAL = [0.0, 1.0, -1.0, 0.5, 255.0, 256.0, 65535.0, -0.0, 5e-324, -5e-324, 1e-310, 1e-300, 1e300, -1e300,
           1.7e308, -1.7e308, 3.4e38, -3.4e38, 65504.0, float("nan"), float("inf"), float("-inf")]


def _fill(dtype: np.dtype, shape: tuple, rng: np.random.Generator, low: float, high: float, specials: int) -> np.ndarray:
    kind = dtype.kind
    if kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if kind in "iu":
        info = np.iinfo(dtype)
        lo = max(int(info.min), min(int(info.max), int(low))) if np.isfinite(low) else int(info.min)
        hi = max(int(info.min), min(int(info.max), int(high))) if np.isfinite(high) else int(info.max)
        lo, hi = min(lo, hi), max(lo, hi)
        array = rng.integers(lo, hi, shape, dtype=dtype.newbyteorder("="), endpoint=True).astype(dtype)
        if specials and array.size:
            flat = array.reshape(-1)
            flat[rng.integers(0, flat.size, specials)] = rng.choice(np.array([info.min, info.max, 0], dtype=dtype), specials)
        return array
    if kind in "fc":
        with np.errstate(all="ignore"):
            lo, hi = (low, high) if low <= high else (high, low)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                lo, hi = -1.0, 1.0
            share = rng.uniform(0, 1, shape)
            array = lo * (1 - share) + hi * share  # never overflows, even from -1.7e308 to 1.7e308
            if array.size >= 2:
                array.reshape(-1)[:2] = lo, hi  # both ends of the range are present
            if kind == "c":
                array = array + 1j * rng.uniform(0, 1, shape)
            array = array.astype(dtype)  # may overflow to inf for small dtypes: that is part of the fuzz
            if specials and array.size:
                flat = array.reshape(-1)
                flat[rng.integers(0, flat.size, specials)] = rng.choice(SPECIAL, specials)
        return array
    if kind == "O":
        array = np.empty(shape, dtype=object)
        choices = [0, 1.5, None, "x", (1, 2), float("nan")]
        for index in np.ndindex(shape):
            array[index] = choices[int(rng.integers(0, len(choices)))]
        return array
    if kind in "mM":
        return rng.integers(-1000, 1000, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)  # strings, bytes, void


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low, high = draw(st.sampled_from(SPECIAL)), draw(st.sampled_from(SPECIAL))
    specials = draw(st.sampled_from([0, 0, 1, 5]))
    array = _fill(dtype, shape, rng, low, high, specials)
    layout = draw(st.sampled_from(["c", "fortran", "strided"]))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim >= 2:
        array = np.repeat(array, 2, axis=1)[:, ::2]  # same values, non-contiguous
    return array


@settings(FUZZ, max_examples=300)
@given(array=arrays(), function=st.sampled_from(FUNCTIONS), config=st.sampled_from(CONFIGS))
def test_random_arrays(array, function, config):
    check_call(function, array, config)


@FUZZ
@given(dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                              "float16", "float32", "float64", "longdouble"]),
       low=st.sampled_from([v for v in SPECIAL if np.isfinite(v)]), high=st.sampled_from([v for v in SPECIAL if np.isfinite(v)]),
       seed=st.integers(0, 2**32 - 1), channels=st.sampled_from([0, 1, 3, 4]))
@example(dtype="float64", low=-1.7e308, high=1.7e308, seed=0, channels=0)  # range wider than float64 can subtract
@example(dtype="float64", low=-5e-324, high=5e-324, seed=0, channels=0)  # subnormal range: 255 / range overflows
@example(dtype="float64", low=-5e-324, high=0.0, seed=0, channels=3)
@example(dtype="float32", low=-3.4e38, high=3.4e38, seed=0, channels=0)
@example(dtype="longdouble", low=-1.7e308, high=1.7e308, seed=0, channels=1)
def test_finite_arrays_are_stretched_to_the_full_grey_range(dtype, low, high, seed, channels):
    """A finite grey array with at least two values, other than uint8 / bool / floats in [0, 1], is mapped
    by its own min and max: its darkest pixel becomes 0 and its brightest 255, whatever the range (also
    ranges wider than float64 can subtract, and subnormal ones)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    array = _fill(dtype, (36, 40), rng, low, high, 0)
    with np.errstate(all="ignore"):
        finite = bool(np.all(np.isfinite(array.astype(np.float64)))) if dtype.kind == "f" else True
    distinct = np.unique(array).size >= 2
    unit_float = dtype.kind == "f" and finite and array.min() >= 0 and array.max() <= 1
    if not finite or not distinct or unit_float:
        return
    if channels == 1:
        array = array[:, :, None]
    elif channels in (3, 4):
        array = np.dstack([array] * channels)
        if channels == 4:
            # opaque alpha: the alpha channel stretches with the others, so use the max value
            array[..., 3] = array[..., :3].max()
    grey = check_call("load_grey", array)
    if grey is None:  # only a float beyond float64 (longdouble) may be refused
        assert dtype == np.longdouble
        return
    pixels = np.asarray(grey)
    if channels == 4:
        return  # composited over black: the range depends on the alpha stretch
    assert pixels.min() == 0 and pixels.max() == 255, (array.min(), array.max(), pixels.min(), pixels.max())


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "object", "U4", "S2", "V4", "datetime64[s]",
                                   "timedelta64[ms]"])
def test_non_numeric_dtypes_are_refused(dtype):
    array = np.zeros((64, 64), dtype=dtype) if dtype != "timedelta64[ms]" else np.arange(64 * 64).reshape(64, 64).astype(dtype)
    with pytest.raises(InvalidImageError, match="is not an image"):
        preprocess(array, LITE)


# ------------------------------------------------------------------------------ PIL images and other types


@FUZZ
@given(mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA",
                             "RGBX", "RGBa", "La", "I;16", "I;16B", "I;16L"]),
       width=st.sampled_from([0, 1, 31, 32, 45]), height=st.sampled_from([1, 32, 50]),
       seed=st.integers(0, 2**32 - 1), function=st.sampled_from(FUNCTIONS))
def test_pil_images_in_every_mode(mode, width, height, seed, function):
    rng = np.random.default_rng(seed)
    try:
        image = Image.frombytes(mode, (width, height), rng.bytes(width * height * 16))
    except Exception:  # a mode Pillow cannot build from raw bytes
        return
    check_call(function, image)


@settings(FUZZ, max_examples=80)
@given(name=st.text(max_size=64) | st.tuples(st.sampled_from(["", "/", "./", "/tmp/"]), st.integers(200, 5000),
                                              st.sampled_from(["", ".png", "/x.jpeg"])).map(lambda t: t[0] + "a" * t[1] + t[2]),
       as_path=st.booleans())
def test_random_paths(name, as_path):
    """Any string as a path: missing, a folder, unreadable, a name too long for the file system, NUL bytes."""
    from pathlib import Path

    check_call("preprocess", Path(name) if as_path else name)


@pytest.mark.parametrize("path", ["/proc/self/mem", "/", "/dev/null", "a" * 5000, "/" + "a" * 300 + "/x.png",
                                  "nul\x00byte.png"])
def test_unreadable_paths_are_refused(path):
    with pytest.raises(InvalidImageError):
        preprocess(path, LITE)


def test_file_deleted_between_check_and_read(tmp_path, monkeypatch):
    """What the app's upload janitor can do to a request: the file goes away after is_file()."""
    import builtins
    from pathlib import Path

    image = tmp_path / "x.jpeg"
    image.write_bytes(REAL["jpeg"])
    real_open = builtins.open

    def vanishing_open(file, *args, **kwargs):
        if Path(file) == image:
            image.unlink(missing_ok=True)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", vanishing_open)
    with pytest.raises(InvalidImageError, match="no such file"):
        preprocess(image, LITE)


@pytest.mark.parametrize("source", [None, 3.5, [[0, 1], [1, 0]], {"a": 1}, object(), "", "/nonexistent/x.png",
                                    b"\x00", np.float64(1.0)])
def test_other_python_objects(source):
    for function in FUNCTIONS:
        check_call(function, source)
