"""Benchmark the live app: 1, 8 and 32 concurrent gradio_client clients, with and without CAM.

    python -m tests.benchmarks.bench_app     # writes docs/app_benchmark.md (a few minutes on 2 cores)

Starts ``python app.py`` on 127.0.0.1 (a free port), sends a bounded number of requests per level and
stops by itself. "With CAM" is ``/predict`` (verdict + pneumonia heatmap overlay); "without CAM" is
``/predict_batch`` with one file (verdict only). Model time per image is measured in-process on the same
checkpoint. Not collected by pytest (file name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tests.helpers import free_port, start_app

REPO = Path(__file__).resolve().parents[2]
XRAY = REPO / "pneunet" / "examples" / "pneumonia_person1_virus_6.jpeg"


def one_request(client, with_cam: bool) -> tuple[float, str | None]:
    """(seconds, error): error is None on success, else the exception's type and message."""
    from gradio_client import handle_file

    started = time.perf_counter()
    try:
        if with_cam:
            client.predict(handle_file(str(XRAY)), "pneumonia", api_name="/predict")
        else:
            client.predict([handle_file(str(XRAY))], api_name="/predict_batch")
        return time.perf_counter() - started, None
    except Exception as error:  # counted (and named) in the report
        return time.perf_counter() - started, f"{type(error).__name__}: {str(error)[:200]}"


def run_level(url: str, clients: int, requests_per_client: int, with_cam: bool) -> dict:
    from gradio_client import Client

    pool = [Client(url, verbose=False) for _ in range(clients)]

    def work(client) -> list[tuple[float, str | None]]:
        return [one_request(client, with_cam) for _ in range(requests_per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        results = [item for chunk in executor.map(work, pool) for item in chunk]
    wall = time.perf_counter() - started
    latencies = np.array([seconds for seconds, error in results if error is None]) * 1000
    messages = sorted({error for _, error in results if error is not None})
    return {"clients": clients, "cam": with_cam, "requests": len(results),
            "errors": sum(error is not None for _, error in results), "messages": messages,
            "p50": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p95": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
            "throughput": len(results) / wall}


def model_time_ms(repeats: int = 30) -> dict[str, float]:
    """Median in-process model time for one image: preprocessing + forward (+ CAM, + overlay)."""
    from pneunet.overlay import overlay_heatmap
    from pneunet.predictor import Predictor

    predictor = Predictor.load()
    timings: dict[str, list[float]] = {"forward": [], "forward + CAM": [], "decode + forward + CAM + overlay": []}
    for _ in range(repeats):
        prepared = predictor.prepare(XRAY)
        batch = prepared.model_input[None]
        started = time.perf_counter()
        predictor.predict_inputs(batch)
        timings["forward"].append(time.perf_counter() - started)
        started = time.perf_counter()
        predictor.predict_inputs(batch, heatmap=True)
        timings["forward + CAM"].append(time.perf_counter() - started)
        started = time.perf_counter()
        prepared = predictor.prepare(XRAY)
        result = predictor.predict_inputs(prepared.model_input[None], heatmap=True)[0]
        overlay_heatmap(prepared.grey, result.heatmap)
        timings["decode + forward + CAM + overlay"].append(time.perf_counter() - started)
    return {name: float(np.median(values[3:]) * 1000) for name, values in timings.items()}


def main(args: argparse.Namespace) -> None:
    import torch

    port = free_port()
    load_before = os.getloadavg()[0]
    process = start_app(port, Path(tempfile.gettempdir()) / f"pneunet-bench-app-{port}.log")
    url = f"http://127.0.0.1:{port}/"
    rows = []
    try:
        run_level(url, 1, 3, True)  # warm-up
        for clients in (1, 8, 32):
            per_client = max(1, args.requests // clients)
            for with_cam in (True, False):
                rows.append(run_level(url, clients, per_client, with_cam))
                print(rows[-1], flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    model = model_time_ms()
    load_after = os.getloadavg()[0]
    lines = [
        "# App benchmark",
        "",
        f"Written by `python -m tests.benchmarks.bench_app` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), checkpoint "
        f"`{os.environ.get('PNEUNET_CHECKPOINT', 'pneunet/weights/pneunet.safetensors')}`. Live `python app.py` on "
        "127.0.0.1 driven by gradio_client; every client sends its requests one after another. With CAM = `/predict` "
        "(verdict + pneumonia heatmap overlay); without CAM = `/predict_batch` with one file. Latency is what the "
        "client sees (upload, queue, model, download). Load average (1 min) "
        f"{load_before:.1f} before and {load_after:.1f} after the run: anything above 0 means other jobs shared "
        "the cores and every figure here is inflated by them.",
        "",
        "| clients | CAM | requests | errors | p50 latency (ms) | p95 latency (ms) | throughput (requests/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['clients']} | {'yes' if r['cam'] else 'no'} | {r['requests']} | {r['errors']} | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['throughput']:.1f} |" for r in rows]
    failures = [f"- {r['clients']} clients, CAM {'yes' if r['cam'] else 'no'}: " + "; ".join(f"`{m}`" for m in r["messages"])
                for r in rows if r["messages"]]
    if failures:
        lines += ["", "Errors seen:", "", *failures]
    lines += ["", "Model time per image (in-process, median of 27 runs, one 224 px test X-ray):", ""]
    lines += [f"- {name}: {milliseconds:.1f} ms" for name, milliseconds in model.items()]
    lines += ["", "Target (issue 3): median predict + CAM <= 50 ms of model time per image on 2 CPU cores; errors = 0.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per level and mode, split over the clients (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "docs" / "app_benchmark.md"), help="report (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
