"""The app's upload lifecycle (pneunet.uploads): private folder, janitor, timed workers — without gradio."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneunet.preprocessing import InvalidImageError
from pneunet.uploads import InternalError, RequestTimeout, TimedWorkers, UploadJanitor, private_upload_folder

REPO = Path(__file__).resolve().parent.parent
GRACE_S = 0.2


def upload(folder: Path, name: str = "xray.jpeg", data: bytes = b"pixels") -> Path:
    """A file laid out the way gradio stores an upload: <folder>/<sha256-like name>/<file name>."""
    path = folder / "0f3a9c" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def age(path: Path, seconds: float) -> None:
    """Pretend the file was uploaded ``seconds`` ago (the janitor reads its mtime)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_private_folder_is_only_ours_and_removed_at_exit(tmp_path):
    code = ("from pneunet.uploads import private_upload_folder; folder = private_upload_folder(); "
            "(folder / 'upload.dcm').write_bytes(b'patient'); print(folder)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=60, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("pneunet-app-")
    assert not folder.exists(), "the upload folder outlived the process"

    here = private_upload_folder(parent=tmp_path)
    assert stat.S_IMODE(here.stat().st_mode) == 0o700


def test_an_upload_is_deleted_after_the_grace_once_no_request_uses_it(tmp_path):
    janitor = UploadJanitor(tmp_path, GRACE_S)
    path = upload(tmp_path)
    with janitor.using(str(path)):
        age(path, 10 * GRACE_S)
        time.sleep(1.5 * GRACE_S)
        janitor.sweep()
        assert path.is_file(), "deleted while a request was using it"
    janitor.sweep()
    assert path.is_file(), "deleted before the grace period ran out"
    time.sleep(1.5 * GRACE_S)
    janitor.sweep()
    assert not path.exists() and not path.parent.exists()


def test_a_shared_upload_waits_for_its_last_user(tmp_path):
    """Identical uploads share one file: the first request ending must not delete the second's."""
    janitor = UploadJanitor(tmp_path, GRACE_S)
    path = upload(tmp_path)
    age(path, 10 * GRACE_S)
    with janitor.using(path):
        with janitor.using(path):
            pass
        time.sleep(1.5 * GRACE_S)
        janitor.sweep()
        assert path.is_file() and janitor.in_use(path)
    assert not janitor.in_use(path)
    time.sleep(1.5 * GRACE_S)
    janitor.sweep()
    assert not path.exists()


def test_an_upload_sent_again_during_its_grace_is_kept_for_the_queued_request(tmp_path):
    janitor = UploadJanitor(tmp_path, GRACE_S)
    path = upload(tmp_path)
    with janitor.using(path):
        pass
    time.sleep(1.5 * GRACE_S)
    path.write_bytes(b"pixels")  # gradio renames the same bytes into place again: a fresh mtime
    janitor.sweep()
    assert path.is_file()
    time.sleep(1.5 * GRACE_S)
    janitor.sweep()
    assert not path.exists()


def test_files_outside_the_folder_are_never_touched(tmp_path):
    folder, outside = tmp_path / "uploads", tmp_path / "examples"
    folder.mkdir()
    example = upload(outside, "normal.jpeg")
    age(example, 10 * GRACE_S)
    janitor = UploadJanitor(folder, GRACE_S)
    with janitor.using(str(example), str(folder), None):
        pass
    time.sleep(1.5 * GRACE_S)
    janitor.sweep()
    janitor.sweep_empty_leftovers()
    assert example.is_file() and folder.is_dir()


def test_the_background_janitor_deletes_uploads_and_empty_leftovers(tmp_path):
    janitor = UploadJanitor(tmp_path, GRACE_S)
    path, leftover, kept = upload(tmp_path), tmp_path / "tmpab12cd34", tmp_path / "tmp-not-empty"
    leftover.write_bytes(b"")
    kept.write_bytes(b"data")
    for file in (path, leftover, kept):
        age(file, 10 * GRACE_S)
    with janitor.using(path):
        pass
    janitor.start()
    try:
        deadline = time.monotonic() + 5
        while (path.exists() or leftover.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        janitor.stop()
    assert not path.exists() and not leftover.exists()
    assert kept.is_file(), "a non-empty file nobody registered was deleted"


def test_a_timeout_returns_in_time_and_the_workers_stay_usable():
    workers = TimedWorkers(max_workers=2, timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as raised:
        workers.run(time.sleep, 2.0)
    assert time.monotonic() - started < 1.5
    assert raised.value.timeout_s == 0.2
    assert workers.run(lambda x: x + 1, 41) == 42
    workers.close()


def test_work_queued_past_its_timeout_never_starts():
    workers = TimedWorkers(max_workers=1, timeout_s=0.2)
    ran = threading.Event()
    with pytest.raises(RequestTimeout):
        workers.run(time.sleep, 0.6)  # holds the only worker
    with pytest.raises(RequestTimeout):
        workers.run(ran.set)  # queued behind it, given up on
    time.sleep(0.8)
    assert not ran.is_set()
    assert workers.run(lambda: "still serving") == "still serving"
    workers.close()


def test_internal_errors_log_only_their_type(caplog):
    workers = TimedWorkers(max_workers=1, timeout_s=5, passthrough=(InvalidImageError,))

    def broken():
        raise KeyError("secret pixel values 12 34 56 of Canary_Jane_scan.dcm")

    with caplog.at_level(logging.INFO, logger="pneunet"):
        with pytest.raises(InternalError) as raised:
            workers.run(broken)
    assert raised.value.error_type == "KeyError" and "secret" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert [record.getMessage() for record in caplog.records] == ["internal error KeyError while analysing an upload"]

    def times_out_itself():
        raise TimeoutError("a socket inside the work")

    with pytest.raises(InternalError):  # the work's own TimeoutError is a bug, not the request running out of time
        workers.run(times_out_itself)
    workers.close()


def test_expected_refusals_pass_through_unchanged():
    workers = TimedWorkers(max_workers=1, timeout_s=5, passthrough=(InvalidImageError,))

    def bad():
        raise InvalidImageError("file is empty (0 bytes)")

    with pytest.raises(InvalidImageError, match="empty"):
        workers.run(bad)
    workers.close()


def test_building_workers_or_a_janitor_starts_no_thread(tmp_path):
    before = threading.active_count()
    TimedWorkers(max_workers=4, timeout_s=1)
    UploadJanitor(tmp_path, 1.0)
    assert threading.active_count() == before
