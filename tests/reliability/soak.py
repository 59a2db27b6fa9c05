"""Load and soak: the live app under many concurrent clients, and the CLI over thousands of images.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.reliability.soak --clients 32 --seconds 180 --cli-images 5000

prints one JSON object (``{"app": ..., "cli": ...}``); exit code 0 when both pass. From Python (as
``python -m tests.reliability`` does): ``soak_app(...)`` and ``soak_cli(...)`` return dicts.

- ``soak_app``: starts ``python app.py`` on a free 127.0.0.1 port (its own temp folder, output kept in a
  log), warms it up with the same number of clients, takes the server's RSS, then ``clients``
  gradio_client clients send real Kermany test X-rays one request after another for ``seconds`` (and at
  most ``max_requests`` in all; every request has a timeout), and the RSS is taken again. Pass: 0 failed
  requests and RSS growth <= 10 %. Failed requests are kept with their messages, and the server's log
  is searched for tracebacks.
- ``soak_cli``: a folder of N images (the 624 test X-rays repeated under distinct names, as symlinks),
  ``python -m pneunet predict FOLDER --csv out.csv`` in a subprocess, its RSS sampled against the number
  of images done (read from the progress bar). Pass: the CSV has N rows, no traceback, and the RSS slope
  from 10 % to 100 % of the run is <= 5 MB per 1000 images (no growth per image). Files the input gate
  refuses are counted (``failed_rows``, ``failure_kinds``) but are the gate's business, not a soak failure.

Not collected by pytest (the file name does not start with test_); needs the real data for realistic
figures (falls back to the bundled examples).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tests.helpers import DATA_DIR, free_port, start_app

REPO = Path(__file__).resolve().parents[2]
TEST_DATA = DATA_DIR / "test"
MAX_RSS_GROWTH_PCT = 10.0
MAX_CLI_GROWTH_MB_PER_1000 = 5.0
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
# the last line of a logged traceback: "module.ExceptionType: message" (or the bare type)
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Disconnect))(?::|$)", re.M)
EXPECTED_SERVER_EXCEPTIONS = {"gradio.exceptions.Error"}  # gr.Error: a refusal shown to the user, logged by gradio


def failure_kind(message: str) -> str:
    """A failed request's message -> a short category for the report."""
    if "does not look like a chest X-ray" in message or "not analysed" in message:
        return "refused by the input gate"
    if "no longer on the server" in message:
        return "upload deleted before use (janitor)"
    if "could not be read as an image" in message:
        return "unreadable"
    if message.startswith(("TimeoutError", "concurrent.futures")) or "timed out" in message.lower():
        return "timeout"
    if "queue" in message.lower() and "full" in message.lower():
        return "queue full"
    return "other"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for the app / CLI subprocesses: offline, no analytics, one BLAS thread unless set."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def real_test_images() -> list[Path]:
    """The 624 Kermany test X-rays (normal and pneumonia interleaved), else the bundled examples."""
    normal = sorted((TEST_DATA / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((TEST_DATA / "PNEUMONIA").glob("*.jpeg"))
    images = [p for pair in zip(normal, pneumonia) for p in pair] + normal[len(pneumonia):] + pneumonia[len(normal):]
    return images or sorted((REPO / "pneunet" / "examples").glob("*.jpeg"))


# ------------------------------------------------------------------------------ memory


def _proc_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of a process (and its children) in MiB: psutil if installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            processes = [process] + (process.children(recursive=True) if children else [])
            return sum(p.memory_info().rss for p in processes) / 2**20
        except psutil.Error:
            return float("nan")
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text().splitlines()
        except OSError:
            status = []
        rss = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")]
        if not rss and current == pid:  # gone, or a zombie (no VmRSS line): no figure rather than 0
            return float("nan")
        total += sum(rss)
        if children:
            pending += _proc_children(current)
    return total / 2**20


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread, with a caller-given progress value."""

    def __init__(self, pid: int, interval: float = 0.5, progress=lambda: None):
        self.pid, self.interval, self.progress = pid, interval, progress
        self.samples: list[tuple[float, object, float]] = []  # (seconds since start, progress, MiB)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value == value:  # not NaN: the process still exists
                self.samples.append((time.monotonic() - self._started, self.progress(), value))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, object, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


# ------------------------------------------------------------------------------ app


def stop_app(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _files_in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _files_by_kind(folder: Path) -> dict[str, int]:
    """Files left in the server's temp folder: empty ones, else by suffix (uploads keep theirs; results are .png)."""
    kinds = collections.Counter()
    for path in folder.rglob("*") if folder.is_dir() else []:
        try:
            if path.is_file():
                kinds["empty" if path.stat().st_size == 0 else (path.suffix.lower() or "no suffix")] += 1
        except OSError:  # deleted while we looked
            pass
    return dict(kinds)


def _check_answer(answer, with_cam: bool) -> str | None:
    """None if the API answer has the documented shape, else what is wrong with it."""
    if with_cam:
        if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
            return f"unexpected answer {answer!r:.200}"
        result, heatmap = answer
        if not isinstance(result, dict) or result.get("label") not in ("normal", "pneumonia"):
            return f"unexpected result {result!r:.200}"
        if not (0.0 <= float(result.get("pneumonia_probability", -1)) <= 1.0):
            return f"probability out of range in {result!r:.200}"
        if not heatmap or (isinstance(heatmap, str) and not Path(heatmap).is_file()):
            return f"no heatmap ({heatmap!r:.200})"
        return None
    table = answer[0] if isinstance(answer, (tuple, list)) else answer
    rows = table.get("data") if isinstance(table, dict) else None
    if not rows or rows[0][1] not in ("normal", "pneumonia") or rows[0][4]:
        return f"unexpected batch answer {answer!r:.200}"
    return None


def soak_app(clients: int = 32, seconds: float = 180, with_cam: bool = True, max_requests: int | None = None,
             warmup_requests_per_client: int = 2, request_timeout_s: float = 180, work: str | Path | None = None) -> dict:
    """Start the app, warm it up, run ``clients`` concurrent gradio_client clients for ``seconds``; figures.

    Each client sends real test X-rays (its own rotation through the 624, so different clients also
    send the same file at the same time, which shares one upload on the server) one request after
    another until ``seconds`` have passed or ``max_requests`` (default: 40 per second of soak) have been
    sent in all. ``with_cam``: ``/predict`` (verdict + heatmap); else ``/predict_batch`` with one file."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from gradio_client import Client, handle_file

    images = real_test_images()
    max_requests = max_requests or int(seconds * 40)
    own_work = work is None
    base = Path(tempfile.mkdtemp(prefix="pneunet-soak-")) if own_work else Path(work) / "soak-app"
    server_tmp, client_tmp = base / "server-tmp", base / "client-downloads"
    for folder in (server_tmp, client_tmp):
        folder.mkdir(parents=True, exist_ok=True)
    log = base / "app.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start_app(port, log, timeout_s=240, TMPDIR=str(server_tmp))
    counter_lock = threading.Lock()
    sent = [0]
    try:
        pool = [Client(url, verbose=False, download_files=str(client_tmp), analytics_enabled=False) for _ in range(clients)]

        def one(client, image: Path, target: str) -> tuple[float, str | None]:
            started = time.perf_counter()
            try:
                if with_cam:
                    job = client.submit(handle_file(str(image)), target, api_name="/predict")
                else:
                    job = client.submit([handle_file(str(image))], api_name="/predict_batch")
                problem = _check_answer(job.result(timeout=request_timeout_s), with_cam)
            except Exception as error:  # a failed request: kept with its message
                problem = f"{type(error).__name__}: {str(error)[:300]}"
            return time.perf_counter() - started, problem

        def work_loop(index: int, deadline: float | None, count: int | None) -> list[tuple[float, float, str | None, str]]:
            client, done, out = pool[index], 0, []
            position = index * 7
            while True:
                if count is not None and done >= count:
                    break
                if deadline is not None:
                    if time.monotonic() >= deadline:
                        break
                    with counter_lock:
                        if sent[0] >= max_requests:
                            break
                        sent[0] += 1
                image = images[position % len(images)]
                position += 1
                target = "pneumonia" if position % 2 else "normal"
                seconds_taken, problem = one(client, image, target)
                out.append((time.monotonic(), seconds_taken, problem, image.name))
                done += 1
            return out

        # warm-up at the same concurrency, so that thread pools and allocator arenas are at their steady size
        with ThreadPoolExecutor(clients) as executor:
            warm = [r for chunk in executor.map(lambda i: work_loop(i, None, warmup_requests_per_client), range(clients))
                    for r in chunk]
        time.sleep(2)
        rss_warm = rss_mb(process.pid)
        sampler = RssSampler(process.pid, interval=1.0)
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as executor:
            results = [r for chunk in executor.map(lambda i: work_loop(i, started + seconds, None), range(clients))
                       for r in chunk]
        wall = time.monotonic() - started
        samples = sampler.stop()
        rss_soak = rss_mb(process.pid)
        alive_right_after = process.poll() is None
        files_right_after = _files_in(server_tmp)
        grace = float(os.environ.get("PNEUNET_UPLOAD_GRACE_S", "30"))
        time.sleep(grace + 5)
        files_after_grace = _files_by_kind(server_tmp)
        rss_idle = rss_mb(process.pid)
        alive = process.poll() is None
    finally:
        stop_app(process)
    figures_left = _files_in(server_tmp)
    log_text = log.read_text(errors="replace")
    latencies = np.array([s for _, s, problem, _ in results if problem is None]) * 1000
    failures = [(name, problem) for _, _, problem, name in results if problem is not None]
    growth = (rss_soak - rss_warm) / rss_warm * 100
    figures = {
        "clients": clients, "seconds": round(wall, 1), "with_cam": with_cam,
        "checkpoint": os.environ.get("PNEUNET_CHECKPOINT", "shipped (pneunet/weights/pneunet.safetensors)"),
        "endpoint": "/predict" if with_cam else "/predict_batch",
        "requests": len(results), "failures": len(failures),
        "failure_kinds": dict(collections.Counter(failure_kind(problem) for _, problem in failures)),
        "failure_messages": dict(collections.Counter(re.sub(r"\d+\.\d+", "#", problem)
                                                     for _, problem in failures).most_common(8)),
        "failed_images": sorted({name for name, _ in failures})[:20],
        "warmup_requests": len(warm), "warmup_failures": sum(problem is not None for _, _, problem, _ in warm),
        "warmup_failure_messages": dict(collections.Counter(re.sub(r"\d+\.\d+", "#", problem)
                                                            for _, _, problem, _ in warm if problem).most_common(5)),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 1) if len(latencies) else None,
        "max_ms": round(float(latencies.max()), 1) if len(latencies) else None,
        "throughput_rps": round(len(results) / wall, 2),
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_after_soak_mb": round(rss_soak, 1),
        "rss_max_during_soak_mb": round(max((m for *_, m in samples), default=float("nan")), 1),
        "rss_growth_pct": round(growth, 2),
        "rss_after_idle_mb": round(rss_idle, 1),
        "rss_timeline_mb": [round(m, 1) for _, _, m in samples[:: max(1, len(samples) // 12)]],
        "server_alive_right_after_soak": alive_right_after,
        "server_alive_after_soak": alive,
        "server_exit_code_if_dead": None if alive else process.returncode,  # negative: killed by that signal
        "server_tracebacks": len(TRACEBACK.findall(log_text)),
        "server_exceptions": dict(collections.Counter(EXCEPTION_LINE.findall(log_text))),
        "server_files_right_after_soak": files_right_after,
        f"server_files_{grace + 5:.0f}s_after_soak": files_after_grace,
        "server_folder_left_after_stop": None,  # filled in below
        "server_log": str(log) if not own_work else None,
        "criterion": f"0 failed requests and RSS growth <= {MAX_RSS_GROWTH_PCT:.0f} % (after warm-up -> after soak)",
    }
    # the app promises to remove its upload folder when it stops; it was stopped with SIGTERM
    figures["server_folder_left_after_stop"] = figures_left
    if len(samples) >= 3:
        minutes = np.array([t for t, _, _ in samples]) / 60
        figures["rss_slope_mb_per_min"] = round(float(np.polyfit(minutes, [m for *_, m in samples], 1)[0]), 2)
    figures["passed"] = len(failures) == 0 and growth <= MAX_RSS_GROWTH_PCT and alive
    unexpected = {k: v for k, v in figures["server_exceptions"].items() if k not in EXPECTED_SERVER_EXCEPTIONS}
    figures["server_unexpected_exceptions"] = sum(unexpected.values())
    if unexpected:
        figures["server_log_tail"] = log_text[-3000:]
    if own_work:
        shutil.rmtree(base, ignore_errors=True)
    return figures


# ------------------------------------------------------------------------------ CLI


def build_folder(folder: Path, count: int) -> Path:
    """``count`` real test X-rays under distinct names (symlinks; copies where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = real_test_images()
    for index in range(count):
        source = sources[index % len(sources)]
        target = folder / f"{index:05d}_{source.name}"
        if target.exists() or target.is_symlink():
            continue
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def soak_cli(images: int | str | Path = 5000, work: str | Path | None = None) -> dict:
    """``python -m pneunet predict FOLDER --csv out.csv`` over ``images`` images (a count, for which a folder
    of repeated test X-rays is built, or an existing folder), its RSS sampled against images done."""
    own_work = work is None
    base = Path(tempfile.mkdtemp(prefix="pneunet-soak-cli-")) if own_work else Path(work) / "soak-cli"
    base.mkdir(parents=True, exist_ok=True)
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
    else:
        folder = build_folder(base / "images", int(images))
    from pneunet.cli import IMAGE_SUFFIXES

    count = sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out = base / "out.csv"
    done = [0]
    stderr_tail = collections.deque(maxlen=50)
    progress = re.compile(rb"(\d+)/(\d+) \[")

    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pneunet", "predict", str(folder), "--csv", str(out)], cwd=REPO,
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def read_progress() -> None:  # tqdm writes "\r 12%|##   | 600/5000 [..]" to stderr
        buffer = b""
        while True:
            chunk = process.stderr.read1(4096)
            if not chunk:
                break
            buffer += chunk
            *pieces, buffer = re.split(rb"[\r\n]", buffer)
            for piece in pieces:
                match = progress.search(piece)
                if match:
                    done[0] = int(match.group(1))
                elif piece.strip():
                    stderr_tail.append(piece.decode(errors="replace"))
        if buffer.strip():
            stderr_tail.append(buffer.decode(errors="replace"))

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    sampler = RssSampler(process.pid, interval=0.5, progress=lambda: done[0])
    first_progress = None
    while process.poll() is None:
        if first_progress is None and done[0] > 0:
            first_progress = (time.monotonic(), done[0])
        time.sleep(0.2)
    seconds = time.monotonic() - started
    samples = sampler.stop()
    reader.join(timeout=10)
    rows = []
    if out.is_file():
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
    failed = [row for row in rows if row.get("error")]

    def rss_at(fraction: float) -> tuple[int, float] | None:
        for _, images_done, mib in samples:
            if images_done is not None and images_done >= fraction * count:
                return images_done, mib
        return None

    at10 = rss_at(0.10)
    # at 100 %: the last sample while the process still ran (the progress bar reads count by then)
    last = next(((n, m) for _, n, m in reversed(samples) if n is not None and n >= 0.99 * count), None)
    per_1000 = slope = None
    if at10 and last and last[0] > at10[0]:
        per_1000 = (last[1] - at10[1]) / ((last[0] - at10[0]) / 1000)
    # RSS swings by ~100 MB within a batch, so two samples are noisy: the criterion uses the least-squares
    # slope of every sample from 10 % to 100 % of the run instead.
    window = [(n, m) for _, n, m in samples if n is not None and n >= 0.10 * count]
    if len(window) >= 3 and window[-1][0] > window[0][0]:
        slope = float(np.polyfit([n / 1000 for n, _ in window], [m for _, m in window], 1)[0])
    steady = None
    if first_progress is not None:
        steady = (count - first_progress[1]) / max(1e-9, started + seconds - first_progress[0])
    figures = {
        "images": count, "seconds": round(seconds, 1),
        "checkpoint": os.environ.get("PNEUNET_CHECKPOINT", "shipped (pneunet/weights/pneunet.safetensors)"), "images_per_s": round(count / seconds, 1),
        "images_per_s_after_start": round(steady, 1) if steady else None,
        "exit_code": process.returncode, "csv_rows": len(rows), "failed_rows": len(failed),
        "failure_kinds": dict(collections.Counter(failure_kind(r["error"]) for r in failed)),
        "failed_examples": [f"{r['path']}: {r['error']}" for r in failed[:3]],
        "rss_at_10pct_mb": round(at10[1], 1) if at10 else None,
        "rss_at_100pct_mb": round(last[1], 1) if last else None,
        "rss_max_mb": round(max((m for *_, m in samples), default=float("nan")), 1),
        "rss_growth_mb_per_1000_images": round(per_1000, 2) if per_1000 is not None else None,
        "rss_slope_mb_per_1000_images": round(slope, 2) if slope is not None else None,
        "rss_timeline_mb": [(n, round(m, 1)) for _, n, m in samples[:: max(1, len(samples) // 12)]],
        "stderr_tail": list(stderr_tail)[-5:],
        "tracebacks": sum(bool(TRACEBACK.search(line)) for line in stderr_tail),
        "criterion": f"CSV has one row per image, no traceback, exit code 0 or 1 (1: some files refused, counted in "
                     f"failed_rows), RSS slope <= {MAX_CLI_GROWTH_MB_PER_1000:.0f} MB per 1000 images from 10 % to 100 % of the run",
    }
    figures["passed"] = (len(rows) == count and figures["tracebacks"] == 0 and process.returncode in (0, 1)
                         and slope is not None and slope <= MAX_CLI_GROWTH_MB_PER_1000)
    if own_work:
        shutil.rmtree(base, ignore_errors=True)
    return figures


# ------------------------------------------------------------------------------ command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=180.0, help="soak length (default: %(default)s)")
    parser.add_argument("--no-cam", action="store_true", help="/predict_batch (no heatmap) instead of /predict")
    parser.add_argument("--max-requests", type=int, default=None, help="cap on app requests (default: 40 per second)")
    parser.add_argument("--cli-images", type=int, default=5000, help="images for the CLI soak; 0 skips it")
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--work", default=None, help="keep logs and files here (default: a temp folder, removed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    report = {}
    if not args.skip_app:
        report["app"] = soak_app(args.clients, args.seconds, not args.no_cam, args.max_requests, work=args.work)
        print(json.dumps({"app": report["app"]}), file=sys.stderr, flush=True)
    if args.cli_images:
        report["cli"] = soak_cli(args.cli_images, work=args.work)
    print(json.dumps(report, indent=2))
    return 0 if all(part.get("passed") for part in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
