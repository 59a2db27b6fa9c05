"""Shared test helpers: where the real data is, and small real images."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneunet.datasets import DEFAULT_DATA_DIR, REPO_ROOT

EXAMPLES = REPO_ROOT / "pneunet" / "examples"
DATA_DIR = DEFAULT_DATA_DIR  # ../shared/data/kermany224, or $PNEUNET_DATA


def require_data() -> Path:
    """The Kermany folder; tests that need it fail loudly in CI (where it must exist) and skip elsewhere."""
    import os

    if DATA_DIR.is_dir():
        return DATA_DIR
    if os.environ.get("CI"):
        pytest.fail(f"{DATA_DIR} is missing: CI must run beside ../shared/data (or set PNEUNET_DATA)")
    pytest.skip(f"{DATA_DIR} not present")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(port: int, log: Path, timeout_s: float = 180, **env: str):
    """``python app.py`` on 127.0.0.1:``port``, offline, stdout+stderr into ``log``; returns the process once
    the page answers (``RuntimeError`` with the log's tail if it exits or does not answer in time)."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    child_env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                     PYTHONUNBUFFERED="1", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), **env)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=child_env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}: {Path(log).read_text()[-2000:]}")
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer within {timeout_s:.0f} s: {Path(log).read_text()[-2000:]}")


CHROMIUM = "/usr/bin/chromium"  # Debian's package, driven by Playwright without `playwright install`


def launch_chromium(playwright, profile_dir: Path):
    """Headless Debian Chromium with a fresh profile (Playwright wants it as user_data_dir, not a flag),
    nothing phoning home: no sync, updates or background networking."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"])
