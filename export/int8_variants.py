"""Which int8 recipe to ship, chosen on validation images only: ``python -m export.int8_variants``.

    python -m export.int8_variants --checkpoint pneunet/weights/pneunet.safetensors

Quantises the fp32 ONNX export of CHECKPOINT with each recipe in VARIANTS (``export.onnx_export``),
runs every validation image through it with onnxruntime's fused int8 kernels and with reference
arithmetic (Q/DQ unfused), and compares with fp32: label agreement, logit RMSE and bias, heatmap r,
size, and median ms per image on this CPU. Rule: the lowest logit RMSE under reference arithmetic among
files of at most 5 MB. Writes docs/int8_variants.md. Test images are never read here.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pneunet.backends import int8_kernels_saturate, onnx_session
from export.calibration import DEFAULT_CALIBRATION_IMAGES, calibration_inputs
from export.graph import INPUT_NAME, edge_graph
from export.onnx_export import INT8_RECIPE, Int8Recipe, export_onnx_fp32, quantize_onnx_int8
from export.parity import BATCH, pearson
from pneunet.cam import classifier_weights
from pneunet.checkpoint import load_checkpoint
from pneunet.decision import calibrated_probability, is_pneumonia
from pneunet.heatmap import heatmap_from_features
from pneunet.lungs import model_view
from pneunet.predictor import load_lung_finder
from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split
from pneunet.datasets import REPO_ROOT

MAX_BYTES = 5_000_000
CONV_HEAD = "/features/conv_head/"
VARIANTS = (
    Int8Recipe(weights="uint8", calibration="percentile", float_prefixes=(CONV_HEAD,)),  # the previous export
    Int8Recipe(weights="int8", calibration="minmax", float_prefixes=(CONV_HEAD,)),
    Int8Recipe(weights="int8", calibration="minmax"),
    Int8Recipe(weights="int8", calibration="percentile", float_prefixes=(CONV_HEAD,)),
    Int8Recipe(weights="int8", calibration="percentile"),
)


def _run(session, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, features = [], []
    for start in range(0, len(inputs), BATCH):
        batch_logits, batch_features = session.run(None, {INPUT_NAME: inputs[start:start + BATCH]})
        logits.append(batch_logits)
        features.append(batch_features)
    return np.concatenate(logits), np.concatenate(features)


def _median_ms(session, one: np.ndarray, repeats: int = 20) -> float:
    for _ in range(3):
        session.run(None, {INPUT_NAME: one})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: one})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def compare(logits, features, ref_logits, ref_features, weight, config) -> dict:
    """Agreement, logit error and heatmap r of one run against fp32."""
    size = (config.image_size, config.image_size)
    labels = is_pneumonia(calibrated_probability(logits, config.temperature), config.threshold)
    ref_labels = is_pneumonia(calibrated_probability(ref_logits, config.temperature), config.threshold)
    r = [pearson(heatmap_from_features(a, weight, size), heatmap_from_features(b, weight, size))
         for a, b in zip(features, ref_features)]
    difference = logits - ref_logits
    return {"agreement": float(np.mean(labels == ref_labels)), "flips": int((labels != ref_labels).sum()),
            "rmse": float(np.sqrt(np.mean(difference ** 2))), "bias": float(difference.mean()),
            "heatmap_r": float(np.nanmean(r))}


def study(checkpoint: Path, calibration_images: int) -> dict:
    model, config = load_checkpoint(checkpoint)
    lungs = load_lung_finder(checkpoint, config)  # what the classifier sees: lung-suppressed inputs (model_view)
    weight = classifier_weights(model)[0].float().numpy()
    val = read_split(Path(DEFAULT_SPLIT_FILE), "val")
    inputs = np.stack([model_view(Path(DEFAULT_DATA_DIR) / example.path, config, lungs)[0] for example in val]).astype(np.float32)
    calibration, _ = calibration_inputs(config, calibration_images, lungs=lungs)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / "model_fp32.onnx"
        export_onnx_fp32(edge_graph(model, config), config.image_size, config.channels, fp32)
        fp32_session, _ = onnx_session(fp32, num_threads=1)
        ref_logits, ref_features = _run(fp32_session, inputs)
        fp32_ms = _median_ms(fp32_session, inputs[:1])
        for index, recipe in enumerate(VARIANTS):
            int8 = Path(scratch) / f"model_int8_{index}.onnx"
            print(f"[{index + 1}/{len(VARIANTS)}] {recipe.label} ...", file=sys.stderr)
            quantize_onnx_int8(fp32, int8, calibration, recipe)
            for kernels in ("reference", "fused"):
                session, _ = onnx_session(int8, num_threads=1, int8_kernels=kernels)
                logits, features = _run(session, inputs)
                rows.append({"recipe": recipe, "kernels": kernels, "bytes": int8.stat().st_size,
                             "ms": _median_ms(session, inputs[:1]),
                             **compare(logits, features, ref_logits, ref_features, weight, config)})
    eligible = [row for row in rows if row["kernels"] == "reference" and row["bytes"] <= MAX_BYTES]
    chosen = min(eligible, key=lambda row: (round(row["rmse"], 3), row["bytes"]))
    return {"rows": rows, "chosen": chosen["recipe"], "images": len(inputs), "fp32_ms": fp32_ms,
            "calibration_images": len(calibration)}


def markdown(result: dict, command: str) -> str:
    lines = [
        "# int8 recipe study (validation only)", "",
        f"Command: `{command}`. {result['images']} validation images, never test; calibration: "
        f"{result['calibration_images']} training images. Compared with the fp32 ONNX export (= PyTorch). "
        f"CPU: {platform.machine()}, {'no VNNI' if int8_kernels_saturate() else 'VNNI or not x86'}; "
        f"ms = median of 20 single-image runs on 1 thread (fp32: {result['fp32_ms']:.1f} ms), taken with load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: a rough guide; docs/edge_benchmark.md times the "
        "shipped files on a quiet machine.", "",
        "| recipe | kernels | size | agreement | flips | logit RMSE | logit bias | heatmap r | ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        mark = " **(shipped)**" if row["recipe"] == INT8_RECIPE and row["kernels"] == "reference" else ""
        lines.append(f"| {row['recipe'].label}{mark} | {row['kernels']} | {row['bytes'] / 1e6:.2f} MB | "
                     f"{100 * row['agreement']:.2f} % | {row['flips']} | {row['rmse']:.3f} | {row['bias']:+.3f} | "
                     f"{row['heatmap_r']:.4f} | {row['ms']:.1f} |")
    chosen = result["chosen"]
    lines += [
        "",
        f"Rule: lowest logit RMSE with reference arithmetic, file at most {MAX_BYTES / 1e6:.0f} MB. "
        f"It picks **{chosen.label}**; `export.onnx_export.INT8_RECIPE` is "
        f"{'the same' if chosen == INT8_RECIPE else 'DIFFERENT: update it'}.",
        "",
        "- **fused** = onnxruntime's integer kernels. On x86 without VNNI they multiply uint8 activations by "
        "int8 weights with VPMADDUBSW, which adds pairs of products into a saturating int16 (255 x 127 x 2 > "
        "32767): large logit errors and broken heatmaps here. uint8 weights use uint8 x uint8 kernels that "
        "do not saturate but took 10x longer here. ARM and VNNI CPUs accumulate in int32.",
        "- **reference** = the same quantised model with Q/DQ left unfused (`session.disable_quant_qdq`): "
        "what the quantisation itself costs. The edge runner uses it on x86 without VNNI "
        "(`pneunet.backends.int8_kernels_saturate`) and the fused kernels elsewhere.",
        "- uint8 weights also skip onnxruntime's int32 bias fix (it widens a weight scale when the bias would "
        "overflow int32), so some biases are clipped: the systematic logit shift in the first row.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m export.int8_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="pneunet/weights/pneunet.safetensors")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    parser.add_argument("--report", default=str(REPO_ROOT / "docs" / "int8_variants.md"))
    args = parser.parse_args()
    result = study(Path(args.checkpoint), args.calibration_images)
    command = f"python -m export.int8_variants --checkpoint {args.checkpoint}"
    Path(args.report).write_text(markdown(result, command))
    print(f"wrote {args.report}; rule picks: {result['chosen'].label}", file=sys.stderr)
    return 0 if result["chosen"] == INT8_RECIPE else 1


if __name__ == "__main__":
    sys.exit(main())
