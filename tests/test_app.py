"""The live app: ``python app.py`` on 127.0.0.1, driven by gradio_client and by headless Chromium; and
its page functions (verdict words, lung-field note, overlays, batch table) called in this process.

Chromium is Debian's (``apt-get install -y chromium``), driven by Playwright without ``playwright install``.
Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CHROMIUM, free_port, launch_chromium, require_data, start_app

REPO = Path(__file__).resolve().parent.parent
XRAY = REPO / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, private temp root) of a running ``python app.py``; stopped after the module."""
    port, temp_root = free_port(), tmp_path_factory.mktemp("app-tmp")
    process = start_app(port, temp_root.parent / "app.log", TMPDIR=str(temp_root), PNEUNET_UPLOAD_GRACE_S="1")
    url = f"http://127.0.0.1:{port}/"
    yield url, temp_root
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(server[1].parent / "downloads"))


def uploads_left(temp_root: Path, name: str, wait_s: float = 6.0) -> list[Path]:
    """Copies of an upload still in the server's temp folder after the grace period (1 s here)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [path for path in temp_root.rglob(name) if path.is_file()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_predict_round_trip(client, server):
    from gradio_client import handle_file

    result, heatmap = client.predict(handle_file(str(XRAY)), "pneumonia", api_name="/predict")
    assert result["label"] in ("normal", "pneumonia")
    assert 0.0 <= result["pneumonia_probability"] <= 1.0 and 0.0 < result["threshold"] < 1.0
    assert (result["pneumonia_probability"] >= result["threshold"]) == (result["label"] == "pneumonia")
    assert result["heatmap_target"] == "pneumonia" and result["heatmap_scale"] in ("fixed", "relative")
    # null for a model that does not look for lung fields; a note only when they were not found
    assert result["lung_fields_found"] in (True, False, None)
    assert ("note" in result) == (result["lung_fields_found"] is False)
    assert Image.open(heatmap).size == Image.open(XRAY).size  # no colour-bar panel on the API's overlay
    assert uploads_left(server[1], XRAY.name) == [], "the upload was kept after the request"


def test_heatmap_keeps_the_uploads_aspect_ratio(client):
    from gradio_client import handle_file

    full_size_xray = sorted((require_data() / "val_original" / "NORMAL").glob("*.jpeg"))[0]
    source = Image.open(full_size_xray)
    _, heatmap = client.predict(handle_file(str(full_size_xray)), "normal", api_name="/predict")
    width, height = Image.open(heatmap).size
    assert max(width, height) <= 1024
    assert width / height == pytest.approx(source.width / source.height, rel=0.01)


def test_bad_inputs_get_errors_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from tests.test_app_inputs import bad_inputs

    import skimage.data

    corpus = {name: path for name, (path, _) in bad_inputs(tmp_path).items() if name != "huge_file"}
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "photo.png")
    corpus["colour_photo"] = tmp_path / "photo.png"
    for name, path in corpus.items():
        with pytest.raises(AppError) as raised:
            client.predict(handle_file(str(path)), "pneumonia", api_name="/predict")
        message = str(raised.value)
        assert "could not be read" in message or "not analysed" in message, f"{name}: {message}"
    result, _ = client.predict(handle_file(str(XRAY)), "pneumonia", api_name="/predict")
    assert result["label"] in ("normal", "pneumonia")


def test_browser_upload_shows_verdict_and_heatmap(server):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: apt-get update && apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    url, temp_root = server
    ARTIFACTS.mkdir(exist_ok=True)
    outside = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, temp_root.parent / "chromium-profile")
        page = browser.new_page()
        page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        page.goto(url, wait_until="networkidle")
        page.locator("#upload input[type=file]").set_input_files(str(XRAY))
        page.locator("#verdict").get_by_text("Calibrated pneumonia probability").wait_for(timeout=60_000)
        page.locator("#heatmap img").wait_for(timeout=30_000)
        # Gradio dims the outputs while an event runs: screenshot the finished page, not the fade.
        page.wait_for_function("() => !document.querySelector('.pending')", timeout=30_000)
        page.wait_for_load_state("networkidle")
        verdict = page.locator("#verdict").inner_text()
        page.screenshot(path=str(ARTIFACTS / "app_single_image.png"), full_page=True)
        browser.close()
    assert "Pneumonia suspected" in verdict or "No pneumonia found" in verdict
    assert outside == [], f"the page fetched from outside 127.0.0.1: {outside[:5]}"


# ------------------------------------------------------------------------------ page functions, in process


@pytest.fixture(scope="module")
def app_module():
    """``app`` imported here (it loads the model and builds the page; it launches nothing). The environment
    variables it sets at import are put back afterwards."""
    saved = dict(os.environ)
    import app

    yield app
    os.environ.clear()
    os.environ.update(saved)


def lung_fields(plausible: bool):
    from pneunet.lungs import LungFields, region_from_mask

    mask = np.zeros((224, 224), dtype=bool)
    mask[40:180, 40:100] = mask[40:180, 124:184] = True
    reason = None if plausible else "no lung field was found in the left half of the image"
    return LungFields(mask, region_from_mask(mask, 8), mask.astype(np.float32), plausible, reason)


def prediction(app_module, label: str, lungs=None):
    from pneunet.predictor import Prediction

    probability = 0.9 if label == app_module.PNEUMONIA_LABEL else 0.05
    return Prediction(label, probability, app_module.PREDICTOR.config.threshold, 0.0, lungs=lungs)


@pytest.mark.parametrize("scale", ["fixed", "relative"])
def test_a_normal_verdict_says_there_is_no_focal_evidence(app_module, monkeypatch, scale):
    monkeypatch.setattr(app_module, "HEATMAP_SCALE", scale)
    normal = app_module.verdict_markdown(prediction(app_module, app_module.NORMAL_LABEL))
    assert "No pneumonia found" in normal and "no focal evidence for pneumonia" in normal.lower()
    assert "not a finding" in normal
    pneumonia = app_module.verdict_markdown(prediction(app_module, app_module.PNEUMONIA_LABEL))
    assert "Pneumonia suspected" in pneumonia and "no focal evidence" not in pneumonia.lower()
    if scale == "fixed":
        assert "inside the lung fields" in pneumonia and "fixed scale" in pneumonia and "fixed scale" in normal
    else:
        assert "own strongest region" in pneumonia and "own strongest region" in normal


@pytest.mark.parametrize("label", ["normal", "pneumonia"])
def test_lung_fields_not_found_are_told_and_never_called_not_an_xray(app_module, label):
    result = prediction(app_module, label, lung_fields(plausible=False))
    verdict = app_module.verdict_markdown(result)
    assert "could not find both lung fields" in verdict and "no lung field was found in the left half" in verdict
    assert "standard lung outline" in verdict and "less reliable" in verdict
    assert "not a chest x-ray" not in verdict.lower() and "not an x-ray" not in verdict.lower()
    values = app_module.result_json(result, "pneumonia")
    assert values["lung_fields_found"] is False and "could not find both lung fields" in values["note"]
    assert values["label"] == label and {"pneumonia_probability", "threshold", "heatmap_target"} <= set(values)

    found = prediction(app_module, label, lung_fields(plausible=True))
    assert "could not find" not in app_module.verdict_markdown(found)
    assert app_module.result_json(found, "pneumonia")["lung_fields_found"] is True
    assert "note" not in app_module.result_json(found, "pneumonia")
    old_model = app_module.result_json(prediction(app_module, label), "pneumonia")
    assert old_model["lung_fields_found"] is None and "note" not in old_model


def test_the_page_shows_overlays_with_a_colour_bar_and_the_api_without(app_module):
    verdict, original, heat_pneumonia, heat_normal, values = app_module.analyse_upload(str(XRAY))
    assert "Calibrated pneumonia probability" in verdict
    assert original.size == Image.open(XRAY).size
    for overlay in (heat_pneumonia, heat_normal):
        assert overlay.height == original.height and overlay.width > original.width  # the panel adds width
        panel = np.asarray(overlay.crop((original.width, 0, overlay.width, overlay.height)), dtype=np.int16)
        assert np.mean(panel.max(axis=2) - panel.min(axis=2) > 30) > 0.01, "no colour ramp in the panel"
    assert (values["lung_fields_found"] is None) == (app_module.PREDICTOR.lungs is None)
    _, api_overlay = app_module.predict(str(XRAY), "normal")
    assert api_overlay.size == original.size


def test_the_batch_table_and_csv_have_a_lung_fields_column(app_module, tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(XRAY.read_bytes()[:2000])
    table, csv_path = app_module.analyse_batch([str(XRAY), str(broken)])
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "label", "pneumonia_probability", "threshold", "lung_fields", "error"]
    good, bad = rows
    assert good["label"] in ("normal", "pneumonia") and good["error"] == ""
    if app_module.PREDICTOR.lungs is None:
        assert good["lung_fields"] == ""
    else:
        assert good["lung_fields"] == "found" or good["lung_fields"].startswith("not found (")
    assert bad["label"] == "" and bad["lung_fields"] == "" and "truncated" in bad["error"]
    assert list(table.headers) == list(rows[0])
