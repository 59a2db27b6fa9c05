"""The one preprocessing path: golden values and every input kind."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pneunet.config import ModelConfig
from pneunet.models import default_config
from pneunet.preprocessing import InvalidImageError, load_grey, normalize, preprocess, to_unit
from tests.helpers import EXAMPLES, require_data

NORMAL = EXAMPLES / "normal_IM-0001-0001.jpeg"
LITE = default_config("efficientnet_lite0")


def test_golden_values_of_a_bundled_example():
    unit = to_unit(NORMAL, LITE)
    assert unit.shape == (224, 224) and unit.dtype == np.float32
    assert unit.min() >= 0 and unit.max() <= 1
    assert unit[0, 0] == pytest.approx(0.078431375, abs=1e-6)
    assert unit[112, 112] == pytest.approx(0.9411765, abs=1e-6)
    assert unit[50, 170] == pytest.approx(0.77254903, abs=1e-6)
    assert unit[200, 30] == pytest.approx(0.13725491, abs=1e-6)
    assert float(unit.mean()) == pytest.approx(0.49913749, abs=1e-6)  # equalised: mean ~0.5


def test_golden_values_at_another_input_size():
    unit = to_unit(EXAMPLES / "pneumonia_person1_virus_6.jpeg", default_config("cnn64"))
    assert unit.shape == (64, 64)
    assert unit[32, 32] == pytest.approx(0.83137256, abs=1e-6)


def test_normalize_uses_config_mean_std_and_channels():
    unit = to_unit(NORMAL, LITE)
    model_input = normalize(unit, LITE)
    assert model_input.shape == (1, 224, 224) and model_input.dtype == np.float32
    np.testing.assert_allclose(model_input[0], (unit - LITE.mean) / LITE.std, rtol=1e-6)
    three = ModelConfig("x", 224, channels=3, mean=0.5, std=0.25)
    out = normalize(unit, three)
    assert out.shape == (3, 224, 224) and np.array_equal(out[0], out[2])
    batch = normalize(np.stack([unit, unit]), LITE)
    assert batch.shape == (2, 1, 224, 224)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_input_kind_gives_the_same_unit_image():
    reference = to_unit(NORMAL, LITE)
    grey = Image.open(NORMAL).convert("L")
    grey_array = np.asarray(grey)
    rgba = np.dstack([grey_array] * 3 + [np.full_like(grey_array, 255)])
    same = {
        "bytes": NORMAL.read_bytes(),
        "str path": str(NORMAL),
        "PIL RGB": Image.open(NORMAL).convert("RGB"),
        "PIL L": grey,
        "uint8 array": grey_array,
        "(H, W, 1) array": grey_array[:, :, None],
        "RGB array": np.dstack([grey_array] * 3),
        "opaque RGBA array": rgba,
        "PNG bytes": _png_bytes(grey),
        "float array in [0, 1]": grey_array / 255.0,
    }
    for kind, source in same.items():
        np.testing.assert_allclose(to_unit(source, LITE), reference, atol=1e-6, err_msg=kind)


def test_16_bit_and_float_inputs_match_8_bit_after_equalisation():
    reference = to_unit(NORMAL, LITE)
    grey_array = np.asarray(Image.open(NORMAL).convert("L")).astype(np.uint16)
    sixteen = Image.fromarray(grey_array * 257 + 3)  # 16-bit PNG with an offset
    assert sixteen.mode.startswith("I")
    unit16 = to_unit(_png_bytes(sixteen), LITE)
    assert np.abs(unit16 - reference).mean() < 0.01
    unit_float = to_unit(grey_array.astype(np.float32) * 40.0 - 100.0, LITE)
    assert np.abs(unit_float - reference).mean() < 0.01


def test_full_resolution_upload_is_squashed_like_the_data_set():
    data_dir = require_data()
    original = sorted((data_dir / "val_original" / "PNEUMONIA").glob("*.jpeg"))[0]
    grey = load_grey(original)
    assert grey.size != (224, 224)
    unit = to_unit(original, LITE)
    assert unit.shape == (224, 224)
    squashed = np.asarray(grey.resize((224, 224), Image.Resampling.BICUBIC))
    # equalisation preserves the order of intensities: rank correlation with the plain squash is high
    assert np.corrcoef(unit.ravel(), squashed.ravel())[0, 1] > 0.95


def test_transparent_pixels_composite_over_black():
    array = np.zeros((64, 64, 4), dtype=np.uint8)
    array[..., :3] = 200
    array[:, :32, 3] = 255  # left half opaque grey, right half transparent
    grey = np.asarray(load_grey(array))
    assert grey[:, :32].min() == 200 and grey[:, 32:].max() == 0


def _huge_png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("source, message", [
    (b"", "empty"),
    (b"this is text, not an image", "not a recognised image"),
    (_huge_png_header(100_000, 100_000), "megapixel limit"),
    (_huge_png_header(10_000, 10_000), "megapixel limit"),  # where Pillow only warns
    (np.zeros((1, 1), dtype=np.uint8), "too small"),
    (np.zeros((3, 224, 224), dtype=np.float32), "not an image"),
    (np.full((64, 64), np.nan), "NaN"),
    (12345, "cannot read an image"),
])
def test_bad_inputs_raise_one_documented_error(source, message):
    with pytest.raises(InvalidImageError, match=message):
        preprocess(source, LITE)


def test_truncated_jpeg_is_refused():
    data = NORMAL.read_bytes()
    with pytest.raises(InvalidImageError, match="damaged or truncated"):
        preprocess(data[: len(data) // 2], LITE)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        preprocess(tmp_path / "absent.png", LITE)
