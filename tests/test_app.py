"""The live app: ``python app.py`` on 127.0.0.1, driven by gradio_client and by headless Chromium; its
handlers (verdict words, lung-field note, overlays, batch table, refusals) called in this process on
``app.AppService``; and what importing ``app`` does (nothing).

Chromium is Debian's (``apt-get install -y chromium``), driven by Playwright without ``playwright install``.
Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneunet.decision import format_probability
from pneunet.predictor import Predictor
from tests.helpers import CHROMIUM, free_port, launch_chromium, require_data, start_app

REPO = Path(__file__).resolve().parent.parent
XRAY = REPO / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"
NOT_AN_IMAGE = REPO / "README.md"
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
        # A refusal stays in the result area (a toast would vanish), and the previous images are cleared.
        page.locator("#upload button[aria-label=Clear]").click()
        page.locator("#upload input[type=file]").set_input_files(str(NOT_AN_IMAGE))
        page.locator("#verdict").get_by_text("Not analysed").wait_for(timeout=60_000)
        page.wait_for_function("() => !document.querySelector('.pending')", timeout=30_000)
        refusal = page.locator("#verdict").inner_text()
        heatmaps_left = page.locator("#heatmap img").count()
        page.screenshot(path=str(ARTIFACTS / "app_refusal.png"), full_page=True)
        browser.close()
    assert "Pneumonia suspected" in verdict or "No pneumonia found" in verdict
    assert "could not be read as an image" in refusal and "not a recognised image" in refusal
    assert heatmaps_left == 0, "the previous image's heatmap is still shown beside the refusal"
    assert outside == [], f"the page fetched from outside 127.0.0.1: {outside[:5]}"


# ------------------------------------------------------------------------------ handlers, in process


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``app.AppService`` around the served model, with the page built around it (nothing launched). The
    privacy variables building the page sets are put back afterwards."""
    saved = dict(os.environ)
    import app

    predictor = Predictor.load()
    service = app.AppService(predictor, tmp_path_factory.mktemp("uploads"), grace_s=1)
    app.build_demo(predictor, service)
    yield service
    service.close()
    os.environ.clear()
    os.environ.update(saved)


def lung_fields(plausible: bool):
    from pneunet.lungs import LungFields, region_from_mask

    mask = np.zeros((224, 224), dtype=bool)
    mask[40:180, 40:100] = mask[40:180, 124:184] = True
    reason = None if plausible else "no lung field was found in the left half of the image"
    return LungFields(mask, region_from_mask(mask, 8), mask.astype(np.float32), plausible, reason)


def prediction(service, label: str, lungs=None, probability: float | None = None):
    from pneunet.predictor import Prediction

    if probability is None:
        probability = 0.9 if label == service.pneumonia_label else 0.05
    return Prediction(label, probability, service.config.threshold, 0.0, lungs=lungs)


def test_importing_app_does_nothing(tmp_path):
    """No model, no thread, no folder, no environment change, neither torch nor gradio: a Space (or a
    test) decides when to build and launch."""
    code = """if True:
        import gc, json, os, sys, threading
        before = dict(os.environ)
        import app
        from pneunet.predictor import Predictor
        print(json.dumps({
            "modules": sorted(m for m in ("torch", "gradio", "onnxruntime", "huggingface_hub", "pneunet.torch_backend")
                              if m in sys.modules),
            "predictors": sum(isinstance(o, Predictor) for o in gc.get_objects()),
            "threads": [t.name for t in threading.enumerate()],
            "environ_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
            "entry_points": callable(app.build_demo) and callable(app.main)}))
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout)
    assert facts["modules"] == [], "importing app imported " + ", ".join(facts["modules"])
    assert facts["predictors"] == 0 and facts["threads"] == ["MainThread"] and facts["environ_changed"] == []
    assert facts["entry_points"]
    assert list(tmp_path.iterdir()) == [], "importing app created files in the temp folder"


def test_gradio_is_imported_with_the_privacy_settings_in_force():
    code = """if True:
        import os, app
        for name in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
            os.environ.pop(name, None)
        gr = app.import_gradio()
        import huggingface_hub.constants as hub
        print(gr.analytics.analytics_enabled(), hub.HF_HUB_OFFLINE, hub.HF_HUB_DISABLE_TELEMETRY)
    """
    env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True"]


@pytest.mark.parametrize("scale", ["fixed", "relative"])
def test_a_normal_verdict_says_there_is_no_focal_evidence(service, monkeypatch, scale):
    monkeypatch.setattr(service, "heatmap_scale", scale)
    normal = service.verdict_markdown(prediction(service, service.normal_label))
    assert "No pneumonia found" in normal and "no focal evidence for pneumonia" in normal.lower()
    assert "not a finding" in normal
    pneumonia = service.verdict_markdown(prediction(service, service.pneumonia_label))
    assert "Pneumonia suspected" in pneumonia and "no focal evidence" not in pneumonia.lower()
    if scale == "fixed":
        assert "inside the lung fields" in pneumonia and "fixed scale" in pneumonia and "fixed scale" in normal
    else:
        assert "own strongest region" in pneumonia and "own strongest region" in normal


@pytest.mark.parametrize("label", ["normal", "pneumonia"])
def test_lung_fields_not_found_are_told_and_never_called_not_an_xray(service, label):
    result = prediction(service, label, lung_fields(plausible=False))
    verdict = service.verdict_markdown(result)
    assert "could not find both lung fields" in verdict and "no lung field was found in the left half" in verdict
    assert "standard lung outline" in verdict and "less reliable" in verdict
    assert "not a chest x-ray" not in verdict.lower() and "not an x-ray" not in verdict.lower()
    values = service.result_json(result, "pneumonia")
    assert values["lung_fields_found"] is False and "could not find both lung fields" in values["note"]
    assert values["label"] == label and {"pneumonia_probability", "threshold", "heatmap_target"} <= set(values)

    found = prediction(service, label, lung_fields(plausible=True))
    assert "could not find" not in service.verdict_markdown(found)
    assert service.result_json(found, "pneumonia")["lung_fields_found"] is True
    assert "note" not in service.result_json(found, "pneumonia")
    old_model = service.result_json(prediction(service, label), "pneumonia")
    assert old_model["lung_fields_found"] is None and "note" not in old_model


@pytest.mark.parametrize("probability", [0.0004, 0.3456, 0.99995])
def test_the_page_shows_probabilities_in_the_one_format_and_the_json_keeps_the_float(service, probability):
    label = service.pneumonia_label if probability >= service.config.threshold else service.normal_label
    result = prediction(service, label, probability=probability)
    verdict = service.verdict_markdown(result)
    assert f"probability: **{format_probability(probability)}**" in verdict
    assert f"(threshold {format_probability(service.config.threshold)})" in verdict
    assert service.result_json(result, "pneumonia")["pneumonia_probability"] == round(probability, 4)


def test_the_page_shows_overlays_with_a_colour_bar_and_the_api_without(service):
    verdict, original, heat_pneumonia, heat_normal, values = service.analyse_upload(str(XRAY))
    assert "Calibrated pneumonia probability" in verdict
    assert original.size == Image.open(XRAY).size
    for overlay in (heat_pneumonia, heat_normal):
        assert overlay.height == original.height and overlay.width > original.width  # the panel adds width
        panel = np.asarray(overlay.crop((original.width, 0, overlay.width, overlay.height)), dtype=np.int16)
        assert np.mean(panel.max(axis=2) - panel.min(axis=2) > 30) > 0.01, "no colour ramp in the panel"
    assert (values["lung_fields_found"] is None) == (service.predictor.lungs is None)
    assert isinstance(values["pneumonia_probability"], float)
    _, api_overlay = service.predict(str(XRAY), "normal")
    assert api_overlay.size == original.size


def test_a_refusal_stays_in_the_result_area_and_is_logged_as_one_line(service, tmp_path, caplog):
    import gradio as gr

    private = tmp_path / "Canary_Jane_scan.jpeg"
    private.write_bytes(XRAY.read_bytes()[:2000])
    with caplog.at_level(logging.INFO, logger="pneunet"):
        verdict, *cleared = service.analyse_upload(str(private))
    assert verdict.startswith("## Not analysed") and "could not be read as an image" in verdict and "truncated" in verdict
    assert cleared == [None, None, None, None], "the images and JSON of a refused upload are not cleared"
    assert [record.getMessage() for record in caplog.records] == ["upload not analysed: not readable as an image"]
    assert not [record for record in caplog.records if record.exc_info], "a refusal was logged with a traceback"

    with pytest.raises(gr.Error) as raised:  # the API keeps raising, with the message and no traceback printed
        service.predict(str(private), "pneumonia")
    assert "truncated" in raised.value.message and raised.value.print_exception is False
    verdict, *_ = service.analyse_upload(None)
    assert "Please upload a chest X-ray" in verdict


def test_the_batch_table_and_csv_have_a_lung_fields_column(service, tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(XRAY.read_bytes()[:2000])
    table, csv_path = service.analyse_batch([str(XRAY), str(broken)])
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "label", "pneumonia_probability", "threshold", "lung_fields", "error",
                             "operating_point", "warning"]
    assert rows[0]["operating_point"] == "shipped"
    good, bad = rows
    assert good["label"] in ("normal", "pneumonia") and good["error"] == ""
    if service.predictor.lungs is None:
        assert good["lung_fields"] == ""
    else:
        assert good["lung_fields"] == "found" or good["lung_fields"].startswith("not found (")
    assert bad["label"] == "" and bad["lung_fields"] == "" and "truncated" in bad["error"]
    assert list(table.headers) == list(rows[0])
    # the one probability format for people, in the table and the CSV alike
    expected = format_probability(service.predictor.predict(XRAY).pneumonia_probability)
    assert good["pneumonia_probability"] == expected and table.value["data"][0][2] == expected
    assert good["threshold"] == format_probability(service.config.threshold)
    assert Path(csv_path).resolve().is_relative_to(service.upload_folder.resolve())


def test_the_about_tab_is_the_loaded_models_own_card(service, tmp_path):
    import app

    card = service.about_markdown()
    assert service.report is not None, "the shipped export did not find the shipped model's report"
    assert "| Kermany test" in card and "| nih_adult224 test" in card and "Not a medical device" in card
    assert "/work" not in card and ".carry" not in card and "runs/" not in card

    # Another model (its export names another source checkpoint): no figures, and the page says so.
    backend = SimpleNamespace(sidecar={"source_checkpoint": {"sha256": "0" * 64}}, entry={"format": "onnx", "precision": "fp32"},
                              path=tmp_path / "other.onnx")
    other = app.AppService(SimpleNamespace(config=service.config, backend=backend), tmp_path)
    assert other.report is None
    assert "| evaluated set" not in other.about_markdown() and "no evaluation report" in other.about_markdown()
    verdict = other.verdict_markdown(prediction(other, other.pneumonia_label))
    assert "no sensitivity or specificity" in verdict and "sensitivity)" not in verdict
