"""Edge benchmark: file size, latency at 1 and 2 threads, batch throughput and runner peak memory for
PyTorch fp32 and every export, and for a model trained on lung fields the lung-field segmenter's time
per image (network + mask post-processing, ``LungFinder.find``) and segmenter + classifier together.
Writes docs/edge_benchmark.md.

    python -m export.benchmark [--models edge/models] [--checkpoint pneunet/weights/pneunet.safetensors]

Each measurement runs in its own subprocess, so thread settings and memory do not leak between models.
Run it on an idle machine: numbers taken while something else uses the CPU are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pneunet.datasets import REPO_ROOT

# "edge" runs a model as the runner would (int8 kernels "auto"); "edge-fused" forces the fused int8 kernels,
# which saturate on x86 without VNNI (pneunet.backends.int8_kernels_saturate): timed only, never used there.
KINDS = [("PyTorch fp32", "torch", None), ("ONNX fp32", "edge", "model_fp32.onnx"), ("ONNX int8", "edge", "model_int8.onnx"),
         ("ONNX int8, fused kernels", "edge-fused", "model_int8.onnx"),
         ("TFLite fp32", "edge", "model_fp32.tflite"), ("TFLite int8", "edge", "model_int8.tflite")]
BATCH = 8


SEGMENTER_BUDGET_MS = 10.0  # what the lung-field segmenter may add per image on 2 cores


def _units(count: int, config) -> np.ndarray:
    """Unit images (grey, [0, 1]) of ``count`` test X-rays spread over the split."""
    from pneunet.preprocessing import to_unit
    from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split

    examples = read_split(DEFAULT_SPLIT_FILE, "test")[::max(1, 624 // count)][:count]
    return np.stack([to_unit(DEFAULT_DATA_DIR / e.path, config) for e in examples]).astype(np.float32)


def worker(kind: str, path: str, threads: int, repeats: int) -> dict:
    """Median single-image latency and batch throughput of one model, and with a lung-field segmenter its
    median time per image and that of segmenter + classifier (runs in a subprocess)."""
    from pneunet.lungs import suppress_outside
    from pneunet.preprocessing import normalize

    if kind == "torch":
        import torch

        from pneunet.checkpoint import load_checkpoint
        from pneunet.predictor import load_lung_finder

        torch.set_num_threads(threads)
        runtime = f"torch {torch.__version__}"
        model, config = load_checkpoint(path)
        lungs = load_lung_finder(Path(path), config)
        if lungs is not None:
            lungs.threads = threads
        model = model.eval().to(memory_format=torch.channels_last)  # as pneunet.predictor runs it

        def run(batch: np.ndarray) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(batch).to(memory_format=torch.channels_last))
    else:
        from pneunet.backends import ExportedModel
        from pneunet.predictor import load_export_lungs

        edge_model = ExportedModel.load(path, num_threads=threads, int8_kernels="fused" if kind == "edge-fused" else "auto")
        config, runtime = edge_model.config, edge_model.name
        lungs = load_export_lungs(edge_model, threads)
        run = edge_model.run
    units = _units(max(repeats, BATCH), config)
    fields = [lungs.find(unit) for unit in units] if lungs is not None else [None] * len(units)
    # pneunet.lungs.model_view, split so that the segmenter and the classifier are timed apart
    inputs = np.stack([normalize(unit if f is None else suppress_outside(unit, f.region), config)
                       for unit, f in zip(units, fields)]).astype(np.float32)
    for warm_up in inputs[:3]:
        run(warm_up[None])
    latencies, segmenter, together = [], [], []
    for unit, model_input in zip(units[:repeats], inputs[:repeats]):
        start = time.perf_counter()
        if lungs is not None:
            lungs.find(unit)
        found = time.perf_counter()
        run(model_input[None])
        done = time.perf_counter()
        segmenter.append(1000 * (found - start))
        latencies.append(1000 * (done - found))
        together.append(1000 * (done - start))
    start = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        run(inputs[:BATCH])
    throughput = rounds * BATCH / (time.perf_counter() - start)
    result = {"median_ms": float(np.median(latencies)), "images_per_s_batch": float(throughput), "runtime": runtime}
    if lungs is not None:
        result.update(segmenter_ms=float(np.median(segmenter)), with_segmenter_ms=float(np.median(together)),
                      segmenter_mb=lungs.onnx_path.stat().st_size / 1e6)
    return result


def _subprocess_json(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "export.benchmark", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident memory of ``command`` (the real runner on real images), measured from outside."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.strip()) / 1024  # Linux reports KiB


def _cpu() -> str:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    except OSError:
        pass
    features = [name for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {name}" in flags]
    return f"{model}; {', '.join(features) or 'no AVX2/AVX-512'}"


def main(args: argparse.Namespace) -> int:
    if args.worker:
        kind, path, threads = args.worker
        print(json.dumps(worker(kind, path, int(threads), args.repeats)))
        return 0
    models, checkpoint = Path(args.models), Path(args.checkpoint)
    image_dir = REPO_ROOT / "pneunet" / "examples"
    load_before = os.getloadavg()[0]
    rows = []
    for label, kind, name in KINDS:
        path = checkpoint if kind == "torch" else models / name
        if not path.is_file():
            print(f"skipping {label}: {path} not found (python -m export writes it)", file=sys.stderr)
            continue
        print(f"{label} ...", file=sys.stderr)
        timings = {threads: _subprocess_json(["--worker", kind, str(path), str(threads), "--repeats", str(args.repeats)])
                   for threads in (1, 2)}
        if kind == "torch":
            runner = [sys.executable, "-m", "pneunet", "predict", str(image_dir), "--checkpoint", str(path), "--quiet"]
        else:
            runner = [sys.executable, "-m", "edge.run", str(image_dir), "--model", str(path)]
            if kind == "edge-fused":
                runner += ["--int8-kernels", "fused"]
        rows.append({"model": label, "runtime": timings[1]["runtime"], "file": str(path), "mb": path.stat().st_size / 1e6,
                     "ms_1": timings[1]["median_ms"], "ms_2": timings[2]["median_ms"],
                     "batch_2": timings[2]["images_per_s_batch"], "rss_mb": peak_rss_mb(runner),
                     "segmenter": {threads: timings[threads].get("segmenter_ms") for threads in (1, 2)},
                     "total": {threads: timings[threads].get("with_segmenter_ms") for threads in (1, 2)},
                     "segmenter_mb": timings[1].get("segmenter_mb")})
    lines = [
        "# Edge benchmark", "",
        f"Measured by `python -m export.benchmark` on {_cpu()}, Python {platform.python_version()}. Latency: median of "
        f"{args.repeats} single test images after warm-up (preprocessing excluded). Batch: images/s on batches of {BATCH} at "
        "2 threads (the TFLite exports have a fixed batch of 1, so they loop). Peak RSS: the whole runner process "
        "(`python -m edge.run`, or `python -m pneunet predict` for PyTorch) on the six bundled example images, with "
        "heatmaps off; for a model trained on lung fields it includes the segmenter. System load average (1 min) "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run on {os.cpu_count()} logical CPUs: other "
        "processes share this machine, so compare rows with each other rather than with other reports.", "",
        "| model | runs on | file MB | ms/image, 1 thread | ms/image, 2 threads | + segmenter, 1 thread | + segmenter, 2 threads | batch images/s (2 threads) | runner peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    for row in rows:
        lines.append(f"| {row['model']} | {row['runtime']} | {row['mb']:.1f} | {row['ms_1']:.1f} | {row['ms_2']:.1f} | "
                     f"{ms(row['total'][1])} | {ms(row['total'][2])} | {row['batch_2']:.1f} | {row['rss_mb']:.0f} |")
    timed = [row for row in rows if row["segmenter"][2] is not None]
    if timed:
        seg_1 = float(np.median([row["segmenter"][1] for row in timed]))
        seg_2 = float(np.median([row["segmenter"][2] for row in timed]))
        verdict = "within" if seg_2 <= SEGMENTER_BUDGET_MS else "OVER"
        lines += ["", f"Lung-field segmenter (`pneunet.lungs.onnx`, {timed[0]['segmenter_mb']:.1f} MB, onnxruntime fp32 for every "
                  f"classifier format): median {seg_1:.1f} ms/image on 1 thread, {seg_2:.1f} ms on 2 (over the {len(timed)} "
                  "rows' runs; network plus mask post-processing, `LungFinder.find`), "
                  f"**{verdict} the {SEGMENTER_BUDGET_MS:.0f} ms budget on 2 threads**. \"+ segmenter\" columns: median per image of "
                  "segmenter + classifier, timed together."]
    else:
        lines += ["", "This model has no lung-field segmenter (trained on whole images): the \"+ segmenter\" columns are empty."]
    cpu = _cpu()
    vnni = "vnni" in cpu
    by_label = {row["model"]: row for row in rows}
    summary = []
    for fp32, int8 in (("ONNX fp32", "ONNX int8"), ("TFLite fp32", "TFLite int8")):
        if fp32 in by_label and int8 in by_label:
            a, b = by_label[fp32], by_label[int8]
            ratio = b["ms_1"] / a["ms_1"]
            speed = "about as fast" if abs(ratio - 1) < 0.05 else ("faster" if ratio < 1 else "slower")
            summary.append(f"{int8} is {a['mb'] / b['mb']:.1f}x smaller than {fp32} and {speed} on 1 thread "
                           f"({b['ms_1']:.1f} vs {a['ms_1']:.1f} ms/image)")
    lines += ["", f"**This CPU ({cpu}) has {'VNNI' if vnni else 'AVX2 but no VNNI'}: int8 is smaller here, "
              f"{'and may be faster' if vnni else 'not faster'}.** " + ("; ".join(summary) + "." if summary else "")]
    lines += ["", "Why int8 is not faster here: x86 CPUs without AVX-512 VNNI (or AVX-VNNI) have no instruction "
              "for 8-bit dot products that accumulates in 32 bits. onnxruntime's fused uint8 x int8 kernels use "
              "VPMADDUBSW, which adds pairs of products into a saturating int16: fast (the \"fused kernels\" row) but "
              "wrong for this model (docs/int8_variants.md). So on such CPUs the runner keeps Q/DQ unfused and computes "
              "the same quantised model in float32 (the \"ONNX int8\" row): exact, a third of the size, slower than "
              "fp32. ARM cores (Raspberry Pi) and VNNI x86 CPUs accumulate in int32 and run the fused kernels.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(REPO_ROOT / "edge" / "models"), help="export folder (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "pneunet" / "weights" / "pneunet.safetensors"),
                        help="PyTorch checkpoint (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="single-image runs per setting (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "edge_benchmark.md"), help="report (default: %(default)s)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "THREADS"), help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
