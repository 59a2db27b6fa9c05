"""The Hugging Face Space installs requirements.txt only: a fresh venv from that file alone (no torch) starts
the app, which answers a prediction with a heatmap through gradio_client. Slow (a pip install: ~2 min
without pip's cache, well under a minute with it), so marked; CI runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import EXAMPLES, REPO_ROOT, free_port

pytestmark = pytest.mark.slow


def test_a_venv_from_requirements_alone_serves_a_prediction_with_a_heatmap(tmp_path):
    from gradio_client import Client, handle_file

    venv = tmp_path / "space-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(REPO_ROOT / "requirements.txt")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                          capture_output=True, text=True, check=True)
    assert site.stdout.strip() == "None", "requirements.txt pulled in torch"

    port, log = free_port(), tmp_path / "app.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PNEUNET_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), PYTHONUNBUFFERED="1")
    with open(log, "wb") as handle:
        process = subprocess.Popen([str(venv / "bin" / "python"), "app.py"], cwd=REPO_ROOT, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert process.poll() is None, f"app.py exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"app.py did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        xray = sorted(EXAMPLES.glob("pneumonia_*.jpeg"))[0]
        values, overlay = client.predict(handle_file(str(xray)), "pneumonia", api_name="/predict")
        assert values["label"] == "pneumonia" and 0.0 <= values["pneumonia_probability"] <= 1.0
        assert values["heatmap_scale"] == "fixed"
        from PIL import Image

        with Image.open(overlay) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    finally:
        process.terminate()
        process.wait(timeout=30)
