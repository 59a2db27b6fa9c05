"""Privacy of the live app: an upload leaves nothing on disk after its request, and neither the server's
output nor any answer carries image content, the file's name or DICOM patient fields; a refused upload is
one log line, never a traceback."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.corpus import GOOD_IMAGE, PATIENT_ID, PATIENT_NAME, write_dicom
from tests.helpers import free_port, start_app

REPO = Path(__file__).resolve().parent.parent
SECRETS = (PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID, "Canary Hospital", "20200101", "Canary_Jane_scan")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(client, temp root, log path) of a running ``python app.py``; the log is complete after the module."""
    port, root = free_port(), tmp_path_factory.mktemp("privacy")
    temp_root, log_path = root / "tmp", root / "server.log"
    temp_root.mkdir()
    process = start_app(port, log_path, TMPDIR=str(temp_root), PNEUNET_UPLOAD_GRACE_S="1")
    url = f"http://127.0.0.1:{port}/"
    from gradio_client import Client

    yield Client(url, verbose=False, download_files=str(root / "downloads")), temp_root, log_path, process
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


def copies_left(temp_root: Path, data: bytes, wait_s: float = 8.0) -> list[Path]:
    """Files under the server's temp root with exactly these bytes, after waiting out the upload grace."""
    digest, deadline = hashlib.sha256(data).hexdigest(), time.monotonic() + wait_s
    while True:
        left = [p for p in temp_root.rglob("*") if p.is_file() and p.stat().st_size == len(data)
                and hashlib.sha256(p.read_bytes()).hexdigest() == digest]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="module")
def patient_dicoms(tmp_path_factory) -> tuple[Path, Path]:
    """(readable DICOM, DICOM without pixel data), both with fake patient fields and a name that is PHI-like."""
    folder = tmp_path_factory.mktemp("dicoms")
    grey = np.asarray(Image.open(GOOD_IMAGE).convert("L"))
    good = write_dicom(folder / "Canary_Jane_scan.dcm", grey, "MONOCHROME1", 12)
    empty = write_dicom(folder / "Canary_Jane_scan_empty.dcm", grey, with_pixels=False)
    return good, empty


def test_upload_leaves_nothing_on_disk(app, patient_dicoms):
    from gradio_client import handle_file

    client, temp_root, _, _ = app
    result, _ = client.predict(handle_file(str(patient_dicoms[0])), "pneumonia", api_name="/predict")
    assert result["label"] in ("normal", "pneumonia")
    assert copies_left(temp_root, patient_dicoms[0].read_bytes()) == []
    assert [p for p in temp_root.rglob("*.dcm")] == []


def test_answers_and_logs_carry_no_patient_fields(app, patient_dicoms):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, temp_root, log_path, process = app
    result, _ = client.predict(handle_file(str(patient_dicoms[0])), "normal", api_name="/predict")
    answers = [str(result)]
    with pytest.raises(AppError) as raised:
        client.predict(handle_file(str(patient_dicoms[1])), "pneumonia", api_name="/predict")
    answers.append(str(raised.value))
    assert "no pixel data" in answers[-1]
    table, _ = client.predict([handle_file(str(p)) for p in patient_dicoms], api_name="/predict_batch")
    answers.append(str(table))
    shown = " ".join(answers)
    assert not [s for s in SECRETS[:5] if s in shown], shown
    assert copies_left(temp_root, patient_dicoms[1].read_bytes()) == []
    process.terminate()  # the log is complete only once the server has stopped
    process.wait(timeout=30)
    log = log_path.read_text(errors="replace")
    assert not [s for s in SECRETS if s in log], log[-2000:]
    # the refused DICOM (alone, then in the batch): one line each, saying why in general terms only
    assert log.count("upload not analysed: not readable as an image") == 2, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
