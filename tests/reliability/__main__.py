"""``python -m tests.reliability``: every corpus case through every interface; writes docs/reliability.md.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.reliability [--out docs/reliability.md] [--no-browser]
        [--no-edge] [--no-soak] [--soak-clients 32] [--soak-seconds 150] [--soak-cli-images 5000]

1. CLI: ``python -m pneunet predict`` on all cases at once (CSV out), then stderr checked for tracebacks.
2. Edge: ``python -m edge.run`` the same way (torch-free runner).
3. API: ``python app.py`` on 127.0.0.1 (its own temp folder, output captured), each case through
   gradio_client ``/predict``, and after EVERY case a good X-ray whose answer is checked. The batch
   endpoint gets all cases in one call.
4. Browser: a few cases uploaded in headless Chromium (Playwright, Debian's chromium); the verdict or
   the verdict area (a refusal: "Not analysed" and the reason) is what the person saw.
5. Privacy: the server's stdout/stderr and every answer are searched for the DICOM patient fields; the
   server's temp folder is searched for the uploads after their requests.
6. Limits: a second server with a 0.75 s request timeout gets a slow (59 MP) image, then a good one.
7. Load/soak: ``tests/reliability/soak.py`` (``soak_app``, ``soak_cli``) when that module exists.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import CHROMIUM, DATA_DIR, free_port, launch_chromium, start_app
from tests.reliability.corpus import GOOD_IMAGE, PATIENT_ID, PATIENT_NAME, REPO, Case, build_corpus, real_xrays

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
INTERFACES = ("cli", "edge", "api", "batch", "browser")
LABELS = ("normal", "pneumonia")


@dataclass
class Outcome:
    status: str  # "analysed", "refused", "crash", "skipped"
    text: str  # the verdict, or the exact message the person saw
    seconds: float = 0.0
    traceback: bool = False

    def cell(self) -> str:
        text = self.text.replace("|", "\\|").replace("\n", " ")
        if len(text) > 220:
            text = text[:217] + "..."
        return f"**{self.status}**: {text}" if text else f"**{self.status}**"


@dataclass
class Report:
    cases: list[Case]
    results: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    good_after_bad: list[str] = field(default_factory=list)  # failures
    good_after_bad_checks: int = 0
    privacy: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, passed, detail)
    limits: list[tuple[str, bool, str]] = field(default_factory=list)
    soak: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, case: str, interface: str, outcome: Outcome) -> None:
        outcome.traceback = outcome.traceback or bool(TRACEBACK.search(outcome.text))
        self.results.setdefault(case, {})[interface] = outcome


def env_for_children(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **extra)


# ------------------------------------------------------------------------------------------ CLI, edge


def run_batch_command(command: list[str], cases: list[Case], work: Path, interface: str, report: Report) -> None:
    """One process over every case (CSV out); per-file outcome from the CSV, tracebacks from stderr."""
    out = work / f"{interface}.csv"
    started = time.monotonic()
    done = subprocess.run([*command, *[str(case.path) for case in cases], "--csv", str(out)], cwd=REPO,
                          env=env_for_children(), capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    (work / f"{interface}.stderr.txt").write_text(done.stderr)
    crashed = done.returncode not in (0, 1) or bool(TRACEBACK.search(done.stderr)) or not out.is_file()
    rows = {}
    if out.is_file():
        with open(out, newline="") as handle:
            rows = {row["path"]: row for row in csv.DictReader(handle)}
    for case in cases:
        row = rows.get(str(case.path))
        if row is None:
            report.put(case.name, interface, Outcome("crash", f"no result (exit code {done.returncode}): "
                                                      f"{done.stderr.strip().splitlines()[-1:] or ''}", traceback=crashed))
        elif row["error"]:
            report.put(case.name, interface, Outcome("refused", row["error"]))
        else:
            report.put(case.name, interface, Outcome("analysed", f"{row['label']} {float(row['probability_value']):.3f}"))
    if crashed:
        report.notes.append(f"{interface}: exit code {done.returncode}; last stderr lines: {done.stderr.strip()[-500:]}")
    report.notes.append(f"{interface}: one process over {len(cases)} files, exit code {done.returncode} "
                        f"(1 = some files refused), {seconds:.1f} s including start-up")


# ------------------------------------------------------------------------------------------ app server


class AppServer:
    """``python app.py`` on 127.0.0.1 with its own TMPDIR; stdout+stderr captured in ``log``."""

    def __init__(self, work: Path, name: str, **env: str):
        self.root = work / name
        self.temp = self.root / "tmp"
        self.temp.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.extra_env = dict(TMPDIR=str(self.temp), PNEUNET_UPLOAD_GRACE_S="1", **env)

    def __enter__(self) -> "AppServer":
        self.process = start_app(self.port, self.log, **self.extra_env)
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=str(self.root / "downloads"))

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def api_predict(client, path: Path) -> Outcome:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    started = time.monotonic()
    try:
        result, _ = client.predict(handle_file(str(path)), "pneumonia", api_name="/predict")
        return Outcome("analysed", f"{result['label']} {result['pneumonia_probability']:.3f}", time.monotonic() - started)
    except AppError as error:
        return Outcome("refused", str(error), time.monotonic() - started)
    except Exception as error:  # what a program using the API sees, e.g. an HTTP status for a refused upload
        return Outcome("refused", f"{type(error).__name__}: {error}", time.monotonic() - started)


def good_answer_ok(client) -> tuple[bool, str]:
    outcome = api_predict(client, GOOD_IMAGE)
    return outcome.status == "analysed" and outcome.text.split()[0] in LABELS, outcome.text


def run_api(server: AppServer, cases: list[Case], report: Report) -> None:
    client = server.client()
    for case in cases:
        outcome = api_predict(client, case.path)
        if not server.alive():
            outcome = Outcome("crash", f"server died (exit code {server.process.returncode})")
        report.put(case.name, "api", outcome)
        report.good_after_bad_checks += 1
        ok, text = good_answer_ok(client) if server.alive() else (False, "server down")
        if not ok:
            report.good_after_bad.append(f"after {case.name}: {text}")


def table_rows(table) -> list[list]:
    """Rows of a Dataframe as gradio_client returns it (a dict with "data" or "value", or a list)."""
    if isinstance(table, dict):
        for key in ("data", "value"):
            if key in table:
                return table_rows(table[key])
        raise ValueError(f"unexpected table: {str(table)[:200]}")
    return list(table)


def stage(report: Report, name: str, function, *args) -> None:
    """Run one stage; a failure of the harness itself is noted, and the other stages still run."""
    try:
        function(*args)
    except Exception as error:
        report.notes.append(f"HARNESS ERROR in {name}: {type(error).__name__}: {error}")
    print(f"{name} done", flush=True)


def run_batch_api(server: AppServer, cases: list[Case], report: Report) -> None:
    """All cases in one call of the batch endpoint (the Batch tab). Gradio refuses a whole batch holding
    a file type the upload box does not list, so those cases (and the over-limit upload) go alone."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    allowed = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")  # app.UPLOAD_TYPES
    client = server.client()
    batch = []
    for case in cases:
        if case.path.suffix.lower() in allowed and case.name != "oversize_file":
            batch.append(case)
            continue
        try:
            table, _ = client.predict([handle_file(str(case.path))], api_name="/predict_batch")
            _, label, probability, _, _, error, *_ = table_rows(table)[0]
            outcome = Outcome("refused", error) if error else Outcome("analysed", f"{label} {probability}")
        except Exception as error:
            outcome = Outcome("refused", f"(sent alone) {type(error).__name__}: {error}")
        report.put(case.name, "batch", outcome)
    try:
        table, _ = client.predict([handle_file(str(case.path)) for case in batch], api_name="/predict_batch")
    except (AppError, Exception) as error:
        for case in batch:
            report.put(case.name, "batch", Outcome("refused", f"whole batch refused: {type(error).__name__}: {error}"))
        return
    rows = table_rows(table)
    for case, row in zip(batch, rows):
        _, label, probability, _, _, error, *_ = row  # file, label, probability (as shown), threshold, lung fields, error
        if error:
            report.put(case.name, "batch", Outcome("refused", error))
        else:
            report.put(case.name, "batch", Outcome("analysed", f"{label} {probability}"))
    report.good_after_bad_checks += 1
    ok, text = good_answer_ok(client)
    if not ok:
        report.good_after_bad.append(f"after the batch call: {text}")


def run_browser(server: AppServer, cases: list[Case], report: Report, shots: Path) -> None:
    from playwright.sync_api import sync_playwright

    client = server.client()
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, server.root / "chromium-profile")
        page = browser.new_page()
        for case in cases:
            started = time.monotonic()
            page.goto(server.url, wait_until="networkidle")
            page.locator("#upload input[type=file]").set_input_files(str(case.path))
            verdict = page.locator("#verdict").get_by_text("Calibrated pneumonia probability")
            refusal = page.locator("#verdict").get_by_text("Not analysed")  # the reason stays in the result area
            deadline = time.monotonic() + 90
            outcome = None
            while time.monotonic() < deadline and outcome is None:
                if verdict.count():
                    text = page.locator("#verdict").inner_text()
                    outcome = Outcome("analysed", text.split("\n")[0] + " / " + re.sub(r"\s+", " ", text.split("\n")[2])[:80])
                elif refusal.count():
                    outcome = Outcome("refused", re.sub(r"\s+", " ", page.locator("#verdict").inner_text()).strip())
                else:
                    page.wait_for_timeout(250)
            if outcome is None:
                outcome = Outcome("crash", "neither a verdict nor an error within 90 s")
            outcome.seconds = time.monotonic() - started
            page.screenshot(path=str(shots / f"{case.name}.png"))
            report.put(case.name, "browser", outcome)
            report.good_after_bad_checks += 1
            ok, text = good_answer_ok(client)
            if not ok:
                report.good_after_bad.append(f"after {case.name} (browser): {text}")
        browser.close()


# ------------------------------------------------------------------------------------------ privacy, limits


def check_privacy(server: AppServer, report: Report, work: Path) -> None:
    time.sleep(3)  # the upload grace is 1 s here
    log = server.log.read_text(errors="replace")
    fields = (PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID, "Canary Hospital")
    leaked = [f for f in fields if f in log]
    report.privacy.append(("server stdout/stderr never contain the DICOM patient fields", not leaked,
                           f"{len(log.splitlines())} log lines searched; found: {leaked or 'none'}"))
    answers = " ".join(o.text for r in report.results.values() for o in r.values())
    leaked = [f for f in fields if f in answers]
    report.privacy.append(("no answer (CLI, edge, API, batch, page) shows the DICOM patient fields", not leaked,
                           f"found: {leaked or 'none'}"))
    names = {case.path.name for case in report.cases}
    left = sorted(str(p.relative_to(server.temp)) for p in server.temp.rglob("*") if p.is_file() and p.name in names)
    report.privacy.append(("no upload left in the server's temp folder (GRADIO_TEMP_DIR) after its request", not left,
                           f"left: {left[:5] or 'none'}"))
    other = sorted(p for p in server.temp.rglob("*") if p.is_file() and p.name not in names)
    report.privacy.append(("other files in the temp folder right after the run (results shown in the page, swept "
                           "after 10 min)", True, f"{len(other)} files: {sorted({p.suffix for p in other})}"))
    pixel_words = re.findall(r"\[\s*\d+(?:,\s*\d+){20,}", log)
    report.privacy.append(("no pixel arrays in the server log", not pixel_words, f"{len(pixel_words)} found"))


def check_limits(work: Path, report: Report) -> None:
    """A 0.75 s request timeout: a slow but legal 59 MP image gets the timeout message, the next good one works."""
    from PIL import Image

    slow = work / "slow_59mp.png"
    Image.open(real_xrays()[0]).convert("L").resize((7600, 7600), Image.Resampling.BILINEAR).save(slow, compress_level=1)
    with AppServer(work, "server-timeout", PNEUNET_REQUEST_TIMEOUT_S="0.75") as server:
        client = server.client()
        outcome = api_predict(client, slow)
        ok = outcome.status == "refused" and "limit" in outcome.text and "took longer" in outcome.text
        report.limits.append(("request timeout (PNEUNET_REQUEST_TIMEOUT_S=0.75): slow but legal 59 MP PNG (~1.4 s)", ok,
                              f"{outcome.text} ({outcome.seconds:.1f} s)"))
        time.sleep(5)  # let the abandoned work finish
        good_ok, text = good_answer_ok(client)
        report.limits.append(("the same server answers a good X-ray right after the timeout", good_ok and server.alive(), text))
        report.good_after_bad_checks += 1
        if not good_ok:
            report.good_after_bad.append(f"after the timeout: {text}")


# ------------------------------------------------------------------------------------------ soak hook


def _call_with_known(function, **candidates):
    """Call ``function`` with those of ``candidates`` its signature names (soak.py is another agent's)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return function(**candidates)
    return function(**{k: v for k, v in candidates.items() if k in parameters})


def run_soak(work: Path, server: AppServer | None, args, report: Report) -> None:
    """LOAD / SOAK HOOK: figures from tests/reliability/soak.py (``soak_app``, ``soak_cli``) when it exists."""
    try:
        from tests.reliability import soak
    except ImportError:
        report.soak["status"] = "tests/reliability/soak.py not present: no load/soak figures in this run"
        return
    images = work / "soak-images"
    if not images.is_dir():
        sources = [p for label in ("NORMAL", "PNEUMONIA") for p in sorted((DATA_DIR / "test" / label).glob("*.jpeg"))] or [GOOD_IMAGE]
        images.mkdir()
        for index in range(args.soak_cli_images):
            (images / f"{index:05d}_{sources[index % len(sources)].name}").symlink_to(sources[index % len(sources)])
    common = dict(image=GOOD_IMAGE, images=images, folder=images, work=work, out=work / "soak")
    for name, candidates in (
            ("soak_app", dict(url=server.url if server else None, server_url=server.url if server else None,
                              clients=args.soak_clients, duration_s=args.soak_seconds, seconds=args.soak_seconds)),
            ("soak_cli", dict(n_images=args.soak_cli_images, count=args.soak_cli_images))):
        function = getattr(soak, name, None)
        if function is None:
            report.soak[name] = "not defined in soak.py"
            continue
        started = time.monotonic()
        try:
            report.soak[name] = _call_with_known(function, **common, **candidates)
        except Exception as error:  # report it, do not lose the rest of the run
            report.soak[name] = f"failed: {type(error).__name__}: {error}"
        report.notes.append(f"{name}: {time.monotonic() - started:.0f} s")


# ------------------------------------------------------------------------------------------ report


def write_report(report: Report, out: Path, args, started: float) -> dict:
    interfaces = [i for i in INTERFACES if any(i in r for r in report.results.values())]
    crashes = sum(o.status == "crash" for r in report.results.values() for o in r.values())
    tracebacks = sum(o.traceback for r in report.results.values() for o in r.values())
    mismatches = []
    for case in report.cases:
        for interface, outcome in report.results.get(case.name, {}).items():
            if case.expect != "either" and outcome.status in ("analysed", "refused") and \
                    outcome.status != {"analyse": "analysed", "refuse": "refused"}[case.expect]:
                mismatches.append(f"`{case.name}` via {interface}: expected {case.expect}, got {outcome.status} ({outcome.text[:80]})")
    figures = {"cases": len(report.cases), "interfaces": interfaces,
               "case_interface_runs": sum(len(r) for r in report.results.values()),
               "tracebacks_shown": tracebacks, "crashes": crashes,
               "good_after_bad_checks": report.good_after_bad_checks,
               "good_after_bad_failures": len(report.good_after_bad),
               "unexpected_outcomes": len(mismatches),
               "privacy_failures": sum(not ok for _, ok, _ in report.privacy),
               "limit_failures": sum(not ok for _, ok, _ in report.limits)}
    lines = [
        "# Reliability: bad inputs through every interface",
        "",
        "<!-- written by `python -m tests.reliability`; do not edit by hand -->",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} "
        f"({os.cpu_count()} CPUs, OMP_NUM_THREADS=1), {time.monotonic() - started:.0f} s, model "
        f"`{os.environ.get('PNEUNET_CHECKPOINT') or 'pneunet/weights/pneunet.safetensors'}` "
        f"(sha256 `{_model_sha()[:16]}…`). Command: `OMP_NUM_THREADS=1 .venv/bin/python -m tests.reliability`.",
        "",
        "## Summary",
        "",
        "| figure | value |",
        "|---|---|",
        f"| cases (generated by `tests/reliability/corpus.py`) | {figures['cases']} |",
        f"| interfaces | {', '.join(interfaces)} |",
        f"| case x interface runs | {figures['case_interface_runs']} |",
        f"| **tracebacks shown to a person** | **{tracebacks}** |",
        f"| **crashes** (process died, no answer, server down) | **{crashes}** |",
        f"| **good-after-bad failures** (good X-ray sent to the server after every bad case) | "
        f"**{len(report.good_after_bad)}** of {report.good_after_bad_checks} |",
        f"| outcomes other than expected (analysed where refusal expected or the reverse) | {len(mismatches)} |",
        f"| privacy checks failed | {figures['privacy_failures']} of {len(report.privacy)} |",
        f"| limit checks failed | {figures['limit_failures']} of {len(report.limits)} |",
        "",
        "*analysed* = a verdict (label and calibrated pneumonia probability); *refused* = the exact message the "
        "person (or program) saw. The CLI and edge messages are the stderr lines (`path: reason`), shown "
        "without the path. API = gradio_client `/predict`; batch = `/predict_batch` (one call, all cases); "
        "browser = the verdict area (a verdict, or 'Not analysed' with the reason) in headless Chromium.",
        "",
    ]
    if report.good_after_bad:
        lines += ["Good-after-bad failures:", ""] + [f"- {item}" for item in report.good_after_bad] + [""]
    if mismatches:
        lines += ["### Outcomes other than expected", ""] + [f"- {item}" for item in mismatches] + [""]
    lines += ["## Cases", "", "| case | file | expected |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {c.what} (`{c.path.name}`, {c.path.stat().st_size:,} B) | {c.expect} |" for c in report.cases]
    for interface in interfaces:
        lines += ["", f"## {interface}", "", "| case | result | s |", "|---|---|---|"]
        for case in report.cases:
            outcome = report.results.get(case.name, {}).get(interface)
            if outcome is not None:
                seconds = f"{outcome.seconds:.2f}" if outcome.seconds else ""
                lines.append(f"| `{case.name}` | {outcome.cell()} | {seconds} |")
    lines += ["", "## Privacy", "", "| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**NO**'} | {detail} |" for name, ok, detail in report.privacy]
    lines += ["", "## Limits", "",
              "- Upload size: 64 MB (`PNEUNET_MAX_UPLOAD_MB`), enforced by Gradio (`max_file_size`) before the file is "
              "stored, and again by `pneunet.preprocessing.MAX_FILE_BYTES` for the CLI, edge and Python API.",
              "- Pixels: 60 MP (`MAX_PIXELS`), checked from the header before pixels are decoded (decompression bombs "
              "never allocate); at least 32 px a side.",
              "- Time: `PNEUNET_REQUEST_TIMEOUT_S` (default 60 s) per image; after it the person gets a clear message "
              "and the server keeps serving (the abandoned work runs on to its end, bounded by the limits above).",
              "", "| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**NO**'} | {detail} |" for name, ok, detail in report.limits]
    lines += ["", "## Load and soak", "",
              "<!-- soak:start (figures from tests/reliability/soak.py: soak_app, soak_cli) -->"]
    for name, value in report.soak.items():
        if isinstance(value, dict):
            lines += ["", f"### {name}", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in value.items()]
        else:
            lines += ["", f"- {name}: {value}"]
    lines += ["", "<!-- soak:end -->", "", "## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return figures


def _model_sha() -> str:
    sidecar = Path(os.environ.get("PNEUNET_CHECKPOINT") or REPO / "pneunet" / "weights" / "pneunet.safetensors")
    try:
        return json.loads(sidecar.with_suffix(".json").read_text())["sha256"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one, removed)")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-edge", action="store_true")
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument("--soak-clients", type=int, default=32)
    parser.add_argument("--soak-seconds", type=float, default=150.0)
    parser.add_argument("--soak-cli-images", type=int, default=5000)
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="pneunet-reliability-"))
    cases = build_corpus(work / "corpus")
    report = Report(cases)
    print(f"{len(cases)} cases in {work / 'corpus'}", flush=True)
    try:
        stage(report, "cli", run_batch_command, [sys.executable, "-m", "pneunet", "predict", "--quiet"], cases, work,
              "cli", report)
        if not args.no_edge:
            stage(report, "edge", run_batch_command, [sys.executable, "-m", "edge.run"], cases, work, "edge", report)
        with AppServer(work, "server") as server:
            stage(report, "api", run_api, server, cases, report)
            stage(report, "batch", run_batch_api, server, cases, report)
            if not args.no_browser:
                if Path(CHROMIUM).is_file():
                    stage(report, "browser", run_browser, server, [c for c in cases if c.browser], report,
                          work / "screenshots")
                    shots = REPO / "test-artifacts" / "reliability"
                    if (work / "screenshots").is_dir():
                        shutil.copytree(work / "screenshots", shots, dirs_exist_ok=True)
                        report.notes.append(f"browser screenshots: {shots.relative_to(REPO)}/ (git-ignored)")
                else:
                    report.notes.append(f"browser skipped: {CHROMIUM} missing")
            stage(report, "privacy", check_privacy, server, report, work)
            if not server.alive():
                report.notes.append("the server died during the run")
        if not args.no_limits:
            stage(report, "limits", check_limits, work, report)
        if not args.no_soak:  # after our own servers have stopped: soak_app starts its own
            stage(report, "soak", run_soak, work, None, args, report)
    finally:
        figures = write_report(report, args.out, args, started)
        print(json.dumps(figures, indent=2))
        print(f"wrote {args.out}")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = any(note.startswith("HARNESS ERROR") for note in report.notes) or figures["tracebacks_shown"] or figures["crashes"] or figures["good_after_bad_failures"] or \
        figures["privacy_failures"] or figures["limit_failures"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
