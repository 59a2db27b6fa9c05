"""Serving benchmark: the torch-free core on the export against the PyTorch checkpoint, side by side in one run.

    python -m tests.benchmarks.bench_serving            # writes docs/serving_benchmark.md (a few minutes on 2 cores)
    python -m tests.benchmarks.bench_serving --install  # also times a fresh serving install (PyPI, ~2 min)

Measured for each way of serving (``--backend torch`` = PyTorch on pneunet/weights/pneunet.safetensors, as
before the core; the default = the committed export through ``pneunet.predictor``):
- predict + heatmap: median ms per image on 2 threads, in-process, on prepared inputs (lung fields timed
  apart, they are the same ONNX segmenter for both);
- CLI cold start: wall time of ``python -m pneunet predict ONE_IMAGE`` in a fresh interpreter (median of 5);
- app cold start: from starting ``python app.py`` to the first ``/predict`` answer with a heatmap
  (``gradio_client``; median of 2);
- with ``--install``: seconds and MB of ``pip install -r requirements.txt`` into a new venv without pip's cache.
Medians and ratios of one run: the machine is shared. Not collected by pytest (name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from tests.helpers import free_port, start_app

REPO = Path(__file__).resolve().parents[2]
XRAY = REPO / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"
WAYS = {"PyTorch checkpoint (--backend torch)": {"PNEUNET_BACKEND": "torch"}, "export through the core (default)": {}}
OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def in_process_ms(env: dict, repeats: int) -> dict:
    """Median ms of predict + heatmap (and of the lung fields) on 2 threads, in a fresh interpreter."""
    code = f"""
import json, statistics, time, numpy as np
from pneunet.predictor import Predictor
predictor = Predictor.load(threads=2, gate=False)
if predictor.runtime == "torch":
    import torch; torch.set_num_threads(2)
prepared = predictor.prepare({str(XRAY)!r})
lung_times, times = [], []
for i in range({repeats} + 3):
    start = time.perf_counter(); predictor.prepare({str(XRAY)!r}); lung_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    predictor.predict_inputs(prepared.model_input[None], heatmap=True, lungs=[prepared.lungs])
    times.append(time.perf_counter() - start)
print(json.dumps({{"runtime": predictor.runtime, "predict_heatmap_ms": 1000 * statistics.median(times[3:]),
                  "prepare_ms": 1000 * statistics.median(lung_times[3:])}}))
"""
    import json

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **OFFLINE, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_cold_s(env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pneunet", "predict", str(XRAY)], cwd=REPO, env={**os.environ, **env},
                       capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def app_cold_s(env: dict, repeats: int, work: Path) -> float:
    from gradio_client import Client, handle_file

    times = []
    for attempt in range(repeats):
        port = free_port()
        start = time.perf_counter()
        process = start_app(port, work / f"app-{attempt}.log", **env)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            client.predict(handle_file(str(XRAY)), "pneumonia", api_name="/predict")
            times.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return statistics.median(times)


def install(work: Path) -> dict:
    venv = work / "serving-venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", "-r", str(REPO / "requirements.txt")],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    megabytes = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20
    torch_present = (venv / "lib").glob("python*/site-packages/torch")
    return {"seconds": seconds, "megabytes": megabytes, "torch": any(True for _ in torch_present)}


def main(args: argparse.Namespace) -> None:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pneunet-bench-") as folder:
        work = Path(folder)
        for name, env in WAYS.items():
            print(f"measuring {name} ...", file=sys.stderr)
            rows[name] = {**in_process_ms(env, args.repeats), "cli_s": cli_cold_s(env, args.cli_repeats),
                          "app_s": app_cold_s(env, args.app_repeats, work)}
        installed = install(work) if args.install else None
    before, after = rows.values()
    lines = ["# Serving benchmark: PyTorch checkpoint vs the torch-free core on the export", "",
             f"`python -m tests.benchmarks.bench_serving{' --install' if args.install else ''}` on {platform.machine()}, "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; one image "
             f"({XRAY.name}); medians of one run (predict: {args.repeats} repeats, CLI: {args.cli_repeats}, app: "
             f"{args.app_repeats}).", "",
             "| | " + " | ".join(rows) + " | ratio |", "|---|---|---|---|"]

    def row(label: str, key: str, unit: str, digits: int) -> None:
        values = [r[key] for r in (before, after)]
        lines.append(f"| {label} | " + " | ".join(f"{v:.{digits}f} {unit}" for v in values)
                     + f" | {values[0] / values[1]:.1f}× |")

    lines.append("| runtime | " + " | ".join(f"`{r['runtime']}`" for r in (before, after)) + " | |")
    row("predict + heatmap, 2 threads (median)", "predict_heatmap_ms", "ms", 1)
    row("decode + lung fields + preprocessing (median)", "prepare_ms", "ms", 1)
    row("CLI, one image from a cold start", "cli_s", "s", 2)
    row("app: start to first answer with a heatmap", "app_s", "s", 1)
    if installed:
        lines += ["", f"Fresh serving install (`pip install -r requirements.txt` into a new venv, no pip cache, from "
                      f"PyPI): **{installed['seconds']:.0f} s, {installed['megabytes']:.0f} MB** on disk; torch "
                      f"{'present' if installed['torch'] else 'absent'}."]
    lines += ["", "Targets (issue 11): app install ≤ 600 MB / ≤ 2 min; app cold start to first answer ≤ 8 s; predict + "
                  "heatmap ≤ 20 ms on 2 cores through the core; CLI one image ≤ 2 s cold."]
    out = REPO / "docs" / "serving_benchmark.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="in-process predictions per way (default: %(default)s)")
    parser.add_argument("--cli-repeats", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--app-repeats", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--install", action="store_true", help="also time a fresh serving install from PyPI")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
