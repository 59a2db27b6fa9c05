"""Limits of the app: a request that takes too long gets a clear message (the workers stay usable), an
unexpected error becomes a message without a traceback, and the upload limit is configured. The timed
workers themselves are tested in tests/test_uploads.py; here, how the app's handlers use them."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from pneunet.predictor import Predictor

XRAY = Path(__file__).resolve().parent.parent / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"


@pytest.fixture(scope="module")
def app():
    import app as app_module  # imports nothing heavy and changes nothing (tests/test_app.py checks)

    return app_module


@pytest.fixture()
def service(app, tmp_path):
    """An AppService with a 0.2 s request limit; the privacy variables its gradio import sets are put back."""
    saved = dict(os.environ)
    service = app.AppService(Predictor.load(), tmp_path, grace_s=1, timeout_s=0.2)
    yield service
    service.close()
    os.environ.clear()
    os.environ.update(saved)


def test_slow_request_gets_a_clear_timeout_and_the_next_one_works(service, monkeypatch, caplog):
    prepare = service.predictor.prepare
    monkeypatch.setattr(service.predictor, "prepare", lambda path: (time.sleep(2.0), prepare(path))[1])
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="pneunet"):
        verdict, *cleared = service.analyse_upload(str(XRAY))
    assert time.monotonic() - started < 1.5
    assert "took longer than the 0.2 s limit" in verdict and "not analysed" in verdict and cleared == [None] * 4
    assert [record.getMessage() for record in caplog.records] == ["upload not analysed: over the 0.2 s time limit"]
    monkeypatch.undo()
    service.workers.timeout_s = 30
    assert "Calibrated pneumonia probability" in service.analyse_upload(str(XRAY))[0]


def test_unexpected_error_becomes_a_message_without_traceback(app, service, monkeypatch, caplog):
    def broken(path):
        raise KeyError("secret pixel values 12 34 56")

    monkeypatch.setattr(service.predictor, "prepare", broken)
    service.workers.timeout_s = 30
    with caplog.at_level(logging.INFO, logger="pneunet"):
        verdict, *_ = service.analyse_upload(str(XRAY))
        rows = service.batch_rows([str(XRAY)])
    assert app.INTERNAL_MESSAGE in verdict and rows[0][app.BATCH_HEADERS.index("error")] == app.INTERNAL_MESSAGE
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "KeyError" in logged and "secret" not in logged and XRAY.name not in logged
    assert len(caplog.records) == 2 and not [record for record in caplog.records if record.exc_info]


def test_upload_limit_is_set(app):
    from pneunet.preprocessing import MAX_FILE_BYTES

    assert app.LAUNCH_OPTIONS["max_file_size"] == f"{app.MAX_UPLOAD_MB}mb"
    assert app.MAX_UPLOAD_MB * 2**20 <= MAX_FILE_BYTES
    assert app.LAUNCH_OPTIONS["share"] is False and app.LAUNCH_OPTIONS["show_error"] is False
