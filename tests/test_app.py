"""The live app: ``python app.py`` on 127.0.0.1, driven by gradio_client and by headless Chromium.

Chromium is Debian's (``apt-get install -y chromium``), driven by Playwright without ``playwright install``.
Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import time
from pathlib import Path

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
    assert Image.open(heatmap).size == Image.open(XRAY).size
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
