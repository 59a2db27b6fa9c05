"""Upload lifecycle for the web app, without gradio: the private upload folder, the janitor that deletes
uploads once no request uses them, and the workers that bound how long one request may take.

    folder = private_upload_folder()                    # mode 0700, removed when the process exits
    janitor = UploadJanitor(folder, grace_s=30).start()
    workers = TimedWorkers(max_workers=6, timeout_s=60, passthrough=(InvalidImageError,))
    with janitor.using(path):
        result = workers.run(analyse, path)              # RequestTimeout / InternalError otherwise

Uploads are patient data: nothing about an image (content, metadata, file name) is ever logged here; an
internal error logs its exception type only. Tested by ``tests/test_uploads.py``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def private_upload_folder(prefix: str = "pneunet-app-", parent: str | Path | None = None) -> Path:
    """A new folder only this user can read (``mkdtemp`` makes it mode 0700), under ``parent`` or the
    system temp folder, removed with everything in it when the process exits (normally, by Ctrl-C or, with
    the app's handler, SIGTERM)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class UploadJanitor:
    """Deletes copies of uploads in ``folder`` shortly after the last request using them ends.

    Gradio stores an upload under the sha256 of its content, so two requests with the same bytes share
    one file: deleting it the moment one request ends would break the other (still queued) one. Each
    file is therefore deleted ``grace_s`` seconds after its last user finished (never while in use);
    files outside the folder, such as the bundled examples, are never touched. ``start()`` runs the
    sweeps on a background thread; ``sweep()`` is one pass, for callers that drive it themselves."""

    def __init__(self, folder: str | Path, grace_s: float):
        self.folder, self.grace_s = Path(folder).resolve(), float(grace_s)
        self._users: dict[Path, int] = {}
        self._deadlines: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def owns(self, path: str | Path | None) -> Path | None:
        """``path`` resolved, when it is a file inside the folder (None otherwise: not ours to delete)."""
        if not path:
            return None
        resolved = Path(path).resolve()
        return resolved if resolved.is_relative_to(self.folder) and resolved != self.folder else None

    @contextmanager
    def using(self, *paths: str | Path | None) -> Iterator[None]:
        """Marks ``paths`` as in use for the duration of the block; their deletion clock starts at its end."""
        owned = [path for path in map(self.owns, paths) if path is not None]
        with self._lock:
            for path in owned:
                self._users[path] = self._users.get(path, 0) + 1
                self._deadlines.pop(path, None)
        try:
            yield
        finally:
            with self._lock:
                for path in owned:
                    self._users[path] -= 1
                    if self._users[path] == 0:
                        del self._users[path]
                        self._deadlines[path] = time.monotonic() + self.grace_s

    def in_use(self, path: str | Path) -> bool:
        owned = self.owns(path)
        with self._lock:
            return owned is not None and owned in self._users

    def sweep(self) -> None:
        """Delete every file whose grace period has run out (and its per-upload folder once empty)."""
        now = time.monotonic()
        with self._lock:
            expired = [path for path, deadline in self._deadlines.items() if deadline <= now]
            for path in expired:
                try:  # Gradio renames every upload into place, so the file's mtime is its latest upload
                    age = time.time() - path.stat().st_mtime
                except OSError:
                    age = float("inf")
                if age < self.grace_s:  # uploaded again since its last use ended: a queued request needs it
                    self._deadlines[path] = now + self.grace_s - age
                    continue
                del self._deadlines[path]
                try:
                    path.unlink(missing_ok=True)
                    if path.parent != self.folder and path.parent.is_dir() and not any(path.parent.iterdir()):
                        path.parent.rmdir()
                except OSError as error:  # e.g. a new upload landed in the folder meanwhile; never fatal
                    log.warning("could not delete an upload: %s", type(error).__name__)

    def sweep_empty_leftovers(self) -> None:
        """Gradio leaves one empty ``tmpXXXXXXXX`` file per upload in the folder; they hold no data but pile up."""
        cutoff = time.time() - self.grace_s
        for path in self.folder.glob("tmp*"):
            try:
                if path.is_file() and path.stat().st_size == 0 and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def start(self) -> "UploadJanitor":
        """Sweep every ``min(1 s, grace_s)`` on a daemon thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._sweep_until_stopped, name="upload-janitor", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sweep_until_stopped(self) -> None:
        while not self._stopped.wait(min(1.0, self.grace_s)):
            try:
                self.sweep()
                self.sweep_empty_leftovers()
            except Exception as error:  # keep sweeping: a dead janitor would leave every later upload on disk
                log.error("upload janitor: %s during a sweep", type(error).__name__)


class RequestTimeout(Exception):
    """The work took longer than the limit and was abandoned (it runs on to its end on its thread, bounded
    by the size limits, but nobody waits for it)."""

    def __init__(self, timeout_s: float):
        super().__init__(f"took longer than the {timeout_s:g} s limit")
        self.timeout_s = timeout_s


class InternalError(Exception):
    """The work failed in an unexpected way (a bug, or memory); ``error_type`` names the exception type,
    the only thing about it that is logged."""

    def __init__(self, error_type: str):
        super().__init__(f"internal error ({error_type})")
        self.error_type = error_type


class TimedWorkers:
    """Runs work on a small thread pool and gives up waiting after ``timeout_s``, so one slow image cannot
    hold a request (or the server) hostage.

    Exceptions of the ``passthrough`` types (expected refusals, e.g. ``InvalidImageError``) reach the caller
    unchanged; any other exception becomes ``InternalError`` without its message or traceback, which could
    carry image content. The pool is made on first use, so building one starts no thread."""

    def __init__(self, max_workers: int, timeout_s: float, passthrough: tuple[type[BaseException], ...] = ()):
        self.max_workers, self.timeout_s, self.passthrough = max_workers, float(timeout_s), tuple(passthrough)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="analyse")
            return self._pool

    def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on a worker thread; ``RequestTimeout`` after ``timeout_s``."""
        future: Future = self._executor().submit(work, *args)
        # wait() rather than result(timeout=...): a TimeoutError raised by the work itself is then an
        # internal error, not mistaken for the request running out of time.
        done, _ = wait([future], timeout=self.timeout_s)
        if not done:
            future.cancel()  # still queued behind other slow work: never start it
            raise RequestTimeout(self.timeout_s)
        error = future.exception()
        if error is None:
            return future.result()
        if isinstance(error, self.passthrough):
            raise error
        log.error("internal error %s while analysing an upload", type(error).__name__)
        raise InternalError(type(error).__name__) from None

    def close(self) -> None:
        """Stop accepting work; queued work is dropped, running work ends on its own."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
