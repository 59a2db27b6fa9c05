"""What people upload: DICOM variants give the JPEG's prediction; broken files get clear errors.

Uses the shipped model, or the checkpoint in $PNEUNET_CHECKPOINT.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneunet.gate import NotAnXrayError
from pneunet.predictor import Predictor
from pneunet.preprocessing import InvalidImageError
from tests.reliability.corpus import write_dicom

EXAMPLES = Path(__file__).resolve().parent.parent / "pneunet" / "examples"
XRAY = EXAMPLES / "pneumonia_person1_virus_6.jpeg"


@pytest.fixture(scope="module")
def predictor(served_predictor) -> Predictor:
    return served_predictor


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_dicom_variants_give_the_jpeg_prediction(predictor, tmp_path, photometric, bits):
    grey = np.asarray(Image.open(XRAY).convert("L"))
    dicom = write_dicom(tmp_path / "xray.dcm", grey, photometric, bits)
    from_jpeg = predictor.predict(XRAY)
    from_dicom = predictor.predict(dicom)
    assert from_dicom.label == from_jpeg.label
    assert from_dicom.pneumonia_probability == pytest.approx(from_jpeg.pneumonia_probability, abs=0.02)
    # the same lung fields (or none, for a model without them), so the same note and outline in the app
    assert (from_dicom.lungs is None) == (from_jpeg.lungs is None)
    if from_jpeg.lungs is not None:
        assert from_dicom.lungs.plausible == from_jpeg.lungs.plausible
        assert np.mean(from_dicom.lungs.mask != from_jpeg.lungs.mask) < 0.01


def test_sixteen_bit_png_gives_the_jpeg_prediction(predictor, tmp_path):
    grey = np.asarray(Image.open(XRAY).convert("L")).astype(np.uint16) * 257
    path = tmp_path / "xray16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    assert predictor.predict(path).pneumonia_probability == pytest.approx(
        predictor.predict(XRAY).pneumonia_probability, abs=0.02)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words its error message must contain)."""
    good = XRAY.read_bytes()
    files: dict[str, tuple[bytes, str, str]] = {
        "truncated": (good[: len(good) // 3], ".jpeg", "truncated"),
        "zero_byte": (b"", ".png", "empty"),
        "text_as_image": (b"this is not an image, it is a note\n" * 20, ".jpeg", "not a recognised image"),
    }
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 MP that compress to a few kB
    files["decompression_bomb"] = (buffer.getvalue(), ".png", "megapixel limit")
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    files["one_pixel"] = (buffer.getvalue(), ".png", "too small")
    files["huge_file"] = (good + b"\0" * (65 * 2**20), ".jpeg", "limit")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    pixelless = tmp_path / "no_pixels.dcm"
    write_dicom(pixelless, np.zeros((40, 40), np.uint8), "MONOCHROME2", 8)
    import pydicom

    dataset = pydicom.dcmread(pixelless)
    del dataset.PixelData
    dataset.save_as(pixelless)
    files["dicom_without_pixels"] = (pixelless.read_bytes(), ".dcm", "no pixel data")
    paths = {}
    for name, (data, suffix, words) in files.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        paths[name] = (path, words)
    return paths


def test_bad_inputs_get_clear_errors(predictor, tmp_path):
    for name, (path, words) in bad_inputs(tmp_path).items():
        with pytest.raises(InvalidImageError) as raised:
            predictor.predict(path)
        assert words in str(raised.value), f"{name}: {raised.value}"
    assert predictor.predict(XRAY).label in predictor.config.labels  # still works afterwards


def test_cmyk_xray_is_read_and_cmyk_colour_photo_is_refused(predictor, tmp_path):
    """CMYK is only a colour space: a grey X-ray saved as CMYK is analysed as usual; a colour photo in
    CMYK is refused by the input gate like any colour photo."""
    cmyk_xray = tmp_path / "xray_cmyk.jpeg"
    Image.open(XRAY).convert("RGB").convert("CMYK").save(cmyk_xray, quality=95)
    assert predictor.predict(cmyk_xray).pneumonia_probability == pytest.approx(
        predictor.predict(XRAY).pneumonia_probability, abs=0.05)
    if predictor.gate is None:
        pytest.fail("no input gate beside the checkpoint: run python -m training.fit_gate --checkpoint CKPT")
    import skimage.data

    photo = tmp_path / "photo_cmyk.jpeg"
    Image.fromarray(skimage.data.astronaut()).convert("CMYK").save(photo)
    with pytest.raises(NotAnXrayError, match="colour picture"):
        predictor.predict(photo)
