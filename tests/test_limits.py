"""Limits of the app: a request that takes too long gets a clear error (the worker stays usable), an
unexpected error becomes a message without a traceback, and the upload limit is configured."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def app():
    import app as app_module  # loads the shipped model once; sets the app's private temp folder

    return app_module


def test_slow_request_gets_a_clear_timeout_and_the_next_one_works(app, monkeypatch):
    import gradio as gr

    monkeypatch.setattr(app, "REQUEST_TIMEOUT_S", 0.2)
    started = time.monotonic()
    with pytest.raises(gr.Error) as raised:
        app._with_timeout(time.sleep, 2.0)
    assert time.monotonic() - started < 1.5
    assert "took longer than" in raised.value.message and "not analysed" in raised.value.message
    assert app._with_timeout(lambda x: x + 1, 41) == 42


def test_unexpected_error_becomes_a_message_without_traceback(app, capsys):
    import gradio as gr

    def broken():
        raise KeyError("secret pixel values 12 34 56")

    with pytest.raises(gr.Error) as raised:
        app._with_timeout(broken)
    assert raised.value.message == app.INTERNAL_MESSAGE
    logged = capsys.readouterr().out
    assert "KeyError" in logged and "secret" not in logged  # the type is logged, never the content


def test_invalid_image_passes_through_unchanged(app):
    from pneunet.preprocessing import InvalidImageError

    def bad():
        raise InvalidImageError("file is empty (0 bytes)")

    with pytest.raises(InvalidImageError, match="empty"):
        app._with_timeout(bad)


def test_upload_limit_is_set(app):
    from pneunet.preprocessing import MAX_FILE_BYTES

    assert app.LAUNCH_OPTIONS["max_file_size"] == f"{app.MAX_UPLOAD_MB}mb"
    assert app.MAX_UPLOAD_MB * 2**20 <= MAX_FILE_BYTES
