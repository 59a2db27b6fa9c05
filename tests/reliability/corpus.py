"""The bad-input corpus: files people could upload, generated on the fly (nothing binary is committed).

    cases = build_corpus(Path("/tmp/corpus"))   # list[Case], files written into the folder

Valid-looking cases are made from real chest X-rays of the Kermany test split (../shared/data/kermany224,
CC BY 4.0), else from the bundled examples. ``expect`` says what a correct system does with each file:
``refuse`` (a clear one-line reason), ``analyse`` (a verdict), or ``either`` (both are defensible, e.g.
an X-ray with its lungs made transparent). DICOM files carry fake patient fields (``PATIENT_NAME``,
``PATIENT_ID``) so the privacy checks can look for them in logs and output.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tests.helpers import DATA_DIR

REPO = Path(__file__).resolve().parents[2]
DATA_TEST = DATA_DIR / "test"
EXAMPLES = REPO / "pneunet" / "examples"
GOOD_IMAGE = EXAMPLES / "pneumonia_person1_virus_6.jpeg"  # sent after every bad case
PATIENT_NAME = "Canary^Jane^PrivacyCheck"
PATIENT_ID = "PID-CANARY-7319"


@dataclass
class Case:
    name: str
    path: Path
    expect: str  # "refuse", "analyse" or "either"
    what: str  # one line for the report
    browser: bool = False  # also driven through the web page


def real_xrays(count: int = 4) -> list[Path]:
    """A few real chest X-rays: the Kermany test split (NORMAL and PNEUMONIA) else the bundled examples."""
    found = []
    for label in ("NORMAL", "PNEUMONIA"):
        found += sorted((DATA_TEST / label).glob("*.jpeg"))[: count // 2]
    return found or sorted(EXAMPLES.glob("*.jpeg"))[:count]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` 8-bit grey pixels (gigapixel bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)  # far fewer rows than the header promises
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header (SOF0/SOF2) patched to claim another size."""
    data = bytearray(data)
    position = 2
    while position < len(data) - 9:
        if data[position] != 0xFF:
            raise ValueError("not a JPEG marker stream")
        marker, length = data[position + 1], struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[position + 5:position + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        position += 2 + length
    raise ValueError("no frame header found")


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8,
                transfer_syntax=None, encapsulated: bytes | None = None, with_pixels: bool = True) -> Path:
    """A secondary-capture DICOM with fake patient fields; ``pixels`` uint8 (bone bright) or uint16."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    dataset.PatientBirthDate, dataset.InstitutionName = "20200101", "Canary Hospital"
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 8 if bits == 8 else 16
    dataset.BitsStored, dataset.HighBit = bits, bits - 1
    dataset.PixelRepresentation = 0
    if encapsulated is not None:
        from pydicom.encaps import encapsulate

        dataset.PixelData = encapsulate([encapsulated])
        dataset["PixelData"].is_undefined_length = True
        dataset["PixelData"].VR = "OB"
    elif with_pixels:
        peak = 2**bits - 1
        values = np.round(pixels.astype(np.float64) * peak / 255.0)
        if photometric == "MONOCHROME1":
            values = peak - values
        dataset.PixelData = values.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def build_corpus(folder: Path) -> list[Case]:
    """Write every case into ``folder`` (created) and return them in the order they are run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xrays = real_xrays()
    xray = Image.open(xrays[-1]).convert("L")  # a pneumonia X-ray where there is one
    xray_bytes = xrays[-1].read_bytes()
    grey = np.asarray(xray)
    big = xray.resize((1600, 1400), Image.Resampling.BICUBIC)  # full-size-like X-ray
    cases: list[Case] = []

    def add(name: str, filename: str, data: bytes | Path, expect: str, what: str, browser: bool = False) -> None:
        path = folder / filename
        if isinstance(data, (bytes, bytearray)):
            path.write_bytes(bytes(data))
        cases.append(Case(name, path, expect, what, browser))

    def png(image: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **options)
        return buffer.getvalue()

    # ---------------------------------------------------------------- broken or not images at all
    add("zero_byte", "zero_byte.jpg", b"", "refuse", "empty file (0 bytes)", browser=True)
    add("truncated_jpeg", "truncated.jpeg", xray_bytes[: len(xray_bytes) // 3], "refuse", "real X-ray JPEG cut to a third")
    add("truncated_png", "truncated.png", png(big)[: len(png(big)) // 2], "refuse", "real X-ray PNG cut in half")
    add("text_as_jpg", "notes.jpg", b"Patient notes: this is not an image.\n" * 40, "refuse", "plain text renamed .jpg",
        browser=True)
    add("html_as_png", "page.png", b"<!doctype html><html><body><img src=x onerror=alert(1)><script>alert('x')</script>"
        b"</body></html>\n", "refuse", "an HTML page (with script) renamed .png")
    add("random_bytes", "random.jpg", np.random.default_rng(0).bytes(50_000), "refuse", "50 kB of random bytes named .jpg")
    add("jpeg_magic_only", "magic.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 200, "refuse", "JPEG signature followed by zeros")
    # ---------------------------------------------------------------- sizes
    add("bomb_png_header", "bomb.png", png_bomb(60_000, 60_000), "refuse",
        "120-byte PNG claiming 60000x60000 (3.6 gigapixel) decompression bomb", browser=True)
    add("bomb_jpeg_header", "bomb.jpeg", jpeg_with_size(xray_bytes, 65_000, 65_000), "refuse",
        "real JPEG with its header patched to 65000x65000")
    add("bomb_png_100mp", "bomb_100mp.png", png(Image.new("1", (10_000, 10_000))), "refuse",
        "1-bit 10000x10000 PNG (100 MP) that compresses to a few kB")
    add("one_pixel", "one_pixel.png", png(Image.new("L", (1, 1), 128)), "refuse", "1x1 image")
    add("tiny_16px", "tiny.png", png(xray.resize((16, 16))), "refuse", "16x16 X-ray thumbnail")
    add("huge_20000", "huge_20000.png", png(Image.new("1", (20_000, 20_000), 1)), "refuse",
        "20000x20000 (400 MP) real PNG")
    add("thin_strip", "strip.png", png(xray.resize((4000, 40))), "either", "X-ray squashed to a 4000x40 strip")
    add("large_legal", "large_7000x5600.jpeg", None or b"", "either", "")  # placeholder, replaced below
    cases.pop()
    large = xray.resize((7000, 5600), Image.Resampling.BILINEAR)
    _save(large, folder / "large_7000x5600.jpeg", quality=90)
    cases.append(Case("large_legal", folder / "large_7000x5600.jpeg", "analyse",
                      "real X-ray upscaled to 7000x5600 (39 MP, under the 60 MP limit)"))
    over = folder / "oversize_65mb.jpeg"
    over.write_bytes(xray_bytes + b"\0" * (65 * 2**20))
    cases.append(Case("oversize_file", over, "refuse", "real JPEG padded to 65 MB (over the 64 MB upload limit)",
                      browser=True))
    # ---------------------------------------------------------------- pixel formats of real X-rays
    add("xray_jpeg", "xray.jpeg", xray_bytes, "analyse", "real X-ray, plain JPEG (control)", browser=True)
    add("png16", "xray16.png", png(Image.fromarray(grey.astype(np.uint16) * 257)), "analyse", "16-bit grey PNG")
    _save(Image.fromarray(grey.astype(np.float32) / 255.0), folder / "xray_float32.tif")
    cases.append(Case("tiff_float32", folder / "xray_float32.tif", "analyse", "32-bit float TIFF (values 0..1)"))
    nan = grey.astype(np.float32)
    nan[10:20, 10:20] = np.nan
    _save(Image.fromarray(nan), folder / "xray_nan.tif")
    cases.append(Case("tiff_float_nan", folder / "xray_nan.tif", "refuse", "32-bit float TIFF with NaN pixels"))
    rgba = xray.convert("RGBA")
    alpha = np.full(grey.shape, 255, np.uint8)
    h, w = grey.shape
    alpha[h // 5: 4 * h // 5, w // 8: 7 * w // 8] = 0  # both lungs transparent
    rgba.putalpha(Image.fromarray(alpha))
    add("rgba_transparent_lungs", "transparent_lungs.png", png(rgba), "either", "RGBA X-ray with the lungs fully transparent")
    buffer = io.BytesIO()
    xray.convert("RGB").convert("CMYK").save(buffer, format="JPEG", quality=95)
    add("cmyk_jpeg", "xray_cmyk.jpg", buffer.getvalue(), "analyse", "X-ray saved as a CMYK JPEG")
    add("palette_png", "xray_palette.png", png(xray.convert("P")), "analyse", "palette (P mode) PNG")
    add("grey_alpha_png", "xray_la.png", png(xray.convert("LA")), "analyse", "grey + alpha (LA) PNG, opaque")
    frames = [Image.open(path).convert("L").resize(xray.size) for path in xrays[:3]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    add("animated_gif", "xray_animated.gif", buffer.getvalue(), "either", "animated GIF of 3 X-rays (first frame counts)")
    rotated = xray.rotate(90, expand=True)  # stored turned 90 degrees anticlockwise; EXIF orientation 6 turns it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    add("exif_rotated", "xray_exif_rotated.jpg", buffer.getvalue(), "analyse", "JPEG stored sideways with EXIF orientation 6")
    buffer = io.BytesIO()
    xray.save(buffer, format="BMP")
    add("bmp", "xray.bmp", buffer.getvalue(), "analyse", "BMP X-ray")
    add("png_named_jpg", "xray_really_png.jpg", png(xray), "analyse", "PNG X-ray with a .jpg name")
    add("unicode_name", "röntgen thorax ü 雪 (1).jpeg", xray_bytes, "analyse", "X-ray with a non-ASCII name with spaces")
    # ---------------------------------------------------------------- DICOM
    write_dicom(folder / "mono1.dcm", grey, "MONOCHROME1", 12)
    cases.append(Case("dicom_monochrome1", folder / "mono1.dcm", "analyse",
                      "12-bit DICOM MONOCHROME1 (with fake patient name and ID)", browser=True))
    write_dicom(folder / "mono2_16.dcm", grey, "MONOCHROME2", 16)
    cases.append(Case("dicom_monochrome2_16bit", folder / "mono2_16.dcm", "analyse", "16-bit DICOM MONOCHROME2"))
    write_dicom(folder / "no_pixels.dcm", grey, with_pixels=False)
    cases.append(Case("dicom_no_pixels", folder / "no_pixels.dcm", "refuse", "DICOM header without pixel data"))
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    xray.save(buffer, format="JPEG", quality=95)  # one grey channel, as the header says
    write_dicom(folder / "jpeg_compressed.dcm", grey, transfer_syntax=JPEGBaseline8Bit, encapsulated=buffer.getvalue())
    cases.append(Case("dicom_jpeg_compressed", folder / "jpeg_compressed.dcm", "either",
                      "DICOM, JPEG Baseline transfer syntax (needs a codec)"))
    from pydicom.uid import JPEGLSLossless

    write_dicom(folder / "jpegls_garbage.dcm", grey, transfer_syntax=JPEGLSLossless,
                encapsulated=b"\xff\xd8\xff\xf7" + np.random.default_rng(3).bytes(4000))
    cases.append(Case("dicom_jpegls_no_codec", folder / "jpegls_garbage.dcm", "refuse",
                      "DICOM, JPEG-LS transfer syntax with a damaged payload (no codec installed)"))
    full = (folder / "mono2_16.dcm").read_bytes()
    add("dicom_truncated", "truncated.dcm", full[: len(full) // 2], "refuse", "16-bit DICOM cut in half")
    add("dicom_magic_garbage", "garbage.dcm", b"\0" * 128 + b"DICM" + np.random.default_rng(1).bytes(3000), "refuse",
        "DICM signature followed by random bytes")
    # ---------------------------------------------------------------- not chest X-rays
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=90)
    add("colour_photo", "photo.jpg", buffer.getvalue(), "refuse", "colour photograph (astronaut)", browser=True)
    add("grey_photo", "camera.png", png(Image.fromarray(skimage.data.camera())), "refuse", "greyscale photograph (cameraman)")
    screenshot = Image.new("RGB", (1280, 800), "white")
    draw = ImageDraw.Draw(screenshot)
    for line in range(30):
        draw.text((40, 20 + 25 * line), f"Line {line}: Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 2,
                  fill=(20, 20, 20))
    add("screenshot_text", "screenshot.png", png(screenshot), "refuse", "screenshot of black text on white")
    noise = np.random.default_rng(2).integers(0, 256, (512, 512), dtype=np.uint8)
    add("pure_noise", "noise.png", png(Image.fromarray(noise)), "refuse", "uniform grey noise 512x512")
    add("all_black", "black.png", png(Image.new("L", (1024, 1024), 0)), "refuse", "all-black frame")
    add("all_white", "white.png", png(Image.new("L", (1024, 1024), 255)), "refuse", "all-white frame")
    return cases
