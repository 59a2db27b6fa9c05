"""``python -m export --checkpoint CKPT --out DIR``: ONNX + TFLite, fp32 + int8, sidecar, parity gate.

    python -m export --checkpoint pneunet/weights/pneunet.safetensors --out edge/models

Writes model_fp32.onnx, model_int8.onnx, model_fp32.tflite, model_int8.tflite, pneunet_edge.json
(everything the edge runner needs), the input gate if the checkpoint has one, the lung-field segmenter
if the model was trained on lung fields (``<stem>.lungs.onnx`` + .json copied verbatim as
pneunet.lungs.onnx + pneunet.lungs.json, so app and runner cut every image to the same mask), parity.json,
and the parity report (docs/export_parity.md for a full run). int8 calibration and parity feed what the
classifier sees (``pneunet.lungs.model_view``: lung-suppressed). Every model's gate result is recorded in
parity.json, the report and the sidecar ("parity_gate"). Exits 1 if an ONNX export (the edge runner's
default is the ONNX int8 one) fails its parity gate; a failing TFLite export is reported loudly but does
not fail the command unless ``--require-tflite`` (TFLite is the optional second format).
TFLite conversion runs in the converter environment (export/requirements-tflite.txt) and takes minutes;
without that environment (and without an explicit ``--tflite-python`` or ``--require-tflite``) the
command says so and exports ONNX only, as ``--skip-tflite`` does. ``--reuse-tflite`` keeps .tflite files
already converted from the same checkpoint (tflite_facts.json records its sha256). Files of an earlier
export that this one does not write (.tflite files of another checkpoint, a gate or segmenter the model
no longer has) are removed from DIR, so the folder holds exactly what its sidecar lists.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pneunet.backends import SIDECAR_FORMAT, SIDECAR_NAME
from pneunet.integrity import sha256_of
from export import parity
from export.calibration import DEFAULT_CALIBRATION_IMAGES, calibration_inputs
from export.graph import FEATURES_NAME, INPUT_NAME, LOGIT_NAME, classifier_for_sidecar, edge_graph
from export.onnx_export import OPSET, export_onnx_fp32, quantize_onnx_int8
from pneunet.checkpoint import load_checkpoint
from pneunet.lungs import lungs_path_for
from pneunet.predictor import load_lung_finder
from pneunet.datasets import REPO_ROOT

DEFAULT_TFLITE_PYTHON = REPO_ROOT / ".venv-tflite" / "bin" / "python"
TFLITE_FACTS = "tflite_facts.json"
TFLITE_SETUP = "python3.11 -m venv .venv-tflite && .venv-tflite/bin/pip install -r export/requirements-tflite.txt"
GATE_FILE = "pneunet.gate.safetensors"
LUNGS_FILE, LUNGS_CONFIG_FILE = "pneunet.lungs.onnx", "pneunet.lungs.json"  # LungFinder reads <file>.json beside <file>
# What an export may write besides the ONNX files (which are always rewritten); see _remove_stale.
OPTIONAL_FILES = ("model_fp32.tflite", "model_int8.tflite", TFLITE_FACTS, GATE_FILE, LUNGS_FILE, LUNGS_CONFIG_FILE)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _onnx_entry(path: Path, config, precision: str, quantization: dict | None) -> dict:
    size = config.image_size
    return {
        "format": "onnx", "precision": precision, "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", config.channels, size, size], "layout": "NCHW", "dtype": "float32"},
        "outputs": {"pneumonia_logit": {"name": LOGIT_NAME, "shape": ["batch"]},
                    "features": {"name": FEATURES_NAME, "layout": "NCHW"}},
        "quantization": quantization,
    }


def _tflite_entry(path: Path, precision: str, quantization: dict | None) -> dict:
    """Read input/output details from the converted file itself (names get mangled by the converter)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    model_input = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()
    logit = [d for d in outputs if len(d["shape"]) == 1]
    features = [d for d in outputs if len(d["shape"]) == 4]
    if len(logit) != 1 or len(features) != 1:
        raise RuntimeError(f"{path}: expected one rank-1 logit and one rank-4 feature output, got "
                           f"{[(d['name'], d['shape'].tolist()) for d in outputs]}")
    scale, zero_point = model_input["quantization"]
    return {
        "format": "tflite", "precision": precision,
        "input": {"name": model_input["name"], "shape": model_input["shape"].tolist(), "layout": "NHWC",
                  "dtype": model_input["dtype"].__name__, "scale": scale, "zero_point": zero_point},
        "outputs": {
            "pneumonia_logit": {"name": logit[0]["name"], "shape": logit[0]["shape"].tolist(),
                                "dtype": logit[0]["dtype"].__name__, "scale": logit[0]["quantization"][0],
                                "zero_point": logit[0]["quantization"][1]},
            "features": {"name": features[0]["name"], "shape": features[0]["shape"].tolist(), "layout": "NHWC",
                         "dtype": features[0]["dtype"].__name__, "scale": features[0]["quantization"][0],
                         "zero_point": features[0]["quantization"][1]},
        },
        "quantization": quantization,
    }


def _reusable_tflite(out: Path, checkpoint: Path) -> dict | None:
    """The converter's facts if ``out`` holds both .tflite files converted from ``checkpoint``, else None."""
    facts_file = out / TFLITE_FACTS
    if not (facts_file.is_file() and (out / "model_fp32.tflite").is_file() and (out / "model_int8.tflite").is_file()):
        return None
    facts = json.loads(facts_file.read_text())
    return facts if facts.get("source_checkpoint_sha256") == sha256_of(checkpoint) else None


def _remove_stale(out: Path, written: set[str]) -> None:
    """Remove files an earlier export left in ``out`` that this one did not write (a .tflite of another
    checkpoint, a gate or segmenter the model no longer has): the sidecar would not list them, and a
    runner asked for one would refuse it."""
    for name in OPTIONAL_FILES:
        if name not in written and (out / name).is_file():
            (out / name).unlink()
            print(f"removed {out / name}: left by an earlier export, not part of this one", file=sys.stderr)


def _lungs_entry(checkpoint: Path, out: Path) -> dict:
    """Copy the checkpoint's segmenter (ONNX + its .json, byte for byte) into ``out``; the sidecar entry."""
    source = lungs_path_for(checkpoint)
    shutil.copyfile(source, out / LUNGS_FILE)
    shutil.copyfile(source.with_suffix(".json"), out / LUNGS_CONFIG_FILE)
    return {"file": LUNGS_FILE, "sha256": sha256_of(out / LUNGS_FILE), "bytes": (out / LUNGS_FILE).stat().st_size,
            "config_file": LUNGS_CONFIG_FILE, "config_sha256": sha256_of(out / LUNGS_CONFIG_FILE),
            "source": source.name, "runtime": "onnxruntime, fp32, for every classifier format (pneunet.lungs.LungFinder)",
            "note": "the lung-field segmenter the classifier was trained with (config.lungs), copied verbatim from "
                    "beside the checkpoint: app and runner get identical masks"}


def export_all(checkpoint: Path, out: Path, calibration_images: int, tflite_python: Path | None,
               reuse_tflite: bool = False) -> dict:
    """Every export + sidecar; returns the sidecar."""
    out.mkdir(parents=True, exist_ok=True)
    model, config = load_checkpoint(checkpoint)
    lungs = load_lung_finder(checkpoint, config)  # the checkpoint's own segmenter, sha256-checked (None: no lungs)
    graph = edge_graph(model, config)
    print("ONNX fp32 ...", file=sys.stderr)
    export_onnx_fp32(graph, config.image_size, config.channels, out / "model_fp32.onnx")
    print(f"ONNX int8 (calibrating on {calibration_images} training images{', lung-suppressed' if lungs else ''}) ...",
          file=sys.stderr)
    calibration, calibration_paths = calibration_inputs(config, calibration_images, lungs=lungs)
    onnx_quantization = quantize_onnx_int8(out / "model_fp32.onnx", out / "model_int8.onnx", calibration)
    onnx_quantization.update(calibration_images=len(calibration_paths), calibration_split="train", calibration_seed=0,
                             calibration_inputs="pneunet.lungs.model_view" + (" (lung-suppressed)" if lungs else ""))
    models = {
        "model_fp32.onnx": _onnx_entry(out / "model_fp32.onnx", config, "fp32", None),
        "model_int8.onnx": _onnx_entry(out / "model_int8.onnx", config, "int8", onnx_quantization),
    }
    converter = None
    facts = _reusable_tflite(out, checkpoint) if reuse_tflite else None
    if facts is not None:
        print(f"TFLite: reusing {out}/model_*.tflite, converted from this checkpoint ({TFLITE_FACTS})", file=sys.stderr)
    elif tflite_python is not None:
        print(f"TFLite fp32 + int8 with {tflite_python} (litert-torch; a few minutes) ...", file=sys.stderr)
        subprocess.run([str(tflite_python), "-m", "export.tflite_export", "--checkpoint", str(checkpoint),
                        "--out", str(out), "--calibration-images", str(calibration_images)], check=True, cwd=REPO_ROOT)
        # A hand-over from the converter process, folded into the sidecar below (kept for --reuse-tflite).
        facts = json.loads((out / TFLITE_FACTS).read_text())
    if facts is not None:
        converter = facts["converter"]
        models["model_fp32.tflite"] = _tflite_entry(out / "model_fp32.tflite", "fp32", None)
        models["model_int8.tflite"] = _tflite_entry(out / "model_int8.tflite", "int8", facts["quantization"])
    for name, entry in models.items():
        entry["sha256"] = sha256_of(out / name)
        entry["bytes"] = (out / name).stat().st_size
    sidecar = {
        "format": SIDECAR_FORMAT,
        "config": json.loads(config.to_json()),  # ModelConfig.from_dict(sidecar["config"]) rebuilds it
        "preprocessing": "pneunet.lungs.model_view: pneunet.preprocessing.to_unit (grey, squash to image_size, "
                         "equalize if set, [0, 1]), "
                         + ("the lung fields of the segmenter in \"lungs\" (LungFinder.find) with everything outside "
                            "their region dark (suppress_outside), " if lungs else "")
                         + "then normalize ((unit - mean) / std), input float32",
        "labels": list(config.labels),
        "decision": "pneumonia if sigmoid(logit / temperature) >= threshold",
        "outputs": {"pneumonia_logit": "raw logit, before temperature",
                    "features": ("last feature map; evidence = pneunet.heatmap.evidence_map(features, classifier.weight, "
                                 "temperature, (image_size, image_size)): each region's contribution to the calibrated "
                                 "logit, signed, before lung masking; heatmap shown = pneunet.heatmap.display_map(evidence, "
                                 "lung mask, config.evidence_scale)" if config.evidence_scale else
                                 "last feature map; heatmap = pneunet.heatmap.heatmap_from_features(features, "
                                 "classifier.weight): ReLU(weight . features), bilinear upsample, scaled to [0, 1]")},
        "classifier": classifier_for_sidecar(model),
        "source_checkpoint": {"file": checkpoint.name, "sha256": sha256_of(checkpoint)},
        "calibration_images": calibration_paths,
        "models": models,
        "created_with": {"python": platform.python_version(), "torch": _version("torch"), "onnx": _version("onnx"),
                         "onnxruntime": _version("onnxruntime"), "tflite_converter": converter},
    }
    gate_file = checkpoint.with_suffix(".gate.safetensors")  # pneunet.gate.gate_path_for
    if gate_file.is_file():
        shutil.copyfile(gate_file, out / GATE_FILE)
        sidecar["gate"] = {"file": GATE_FILE, "sha256": sha256_of(out / GATE_FILE),
                           "note": "fitted on PyTorch fp32 pooled features; the runner applies it to the export's"}
    if lungs is not None:
        sidecar["lungs"] = _lungs_entry(checkpoint, out)
    written = set(models) | ({TFLITE_FACTS} if facts is not None else set())
    written |= {sidecar[key][name] for key, name in (("gate", "file"), ("lungs", "file"), ("lungs", "config_file")) if key in sidecar}
    _remove_stale(out, written)
    (out / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model .safetensors (with its .json sidecar)")
    parser.add_argument("--out", required=True, help="output folder, e.g. edge/models")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                        help="training images for int8 calibration (default: %(default)s)")
    parser.add_argument("--tflite-python", default=None,
                        help=f"python of the converter environment (default: {DEFAULT_TFLITE_PYTHON.relative_to(REPO_ROOT)} "
                             f"if it exists, else ONNX only; set up with: {TFLITE_SETUP})")
    parser.add_argument("--skip-tflite", action="store_true", help="export ONNX only")
    parser.add_argument("--reuse-tflite", action="store_true",
                        help="keep model_*.tflite in DIR if they were converted from this checkpoint (skips minutes of conversion)")
    parser.add_argument("--require-tflite", action="store_true",
                        help="exit 1 when a TFLite export fails its parity gate too (default: reported, not blocking)")
    parser.add_argument("--parity-limit", type=int, default=None,
                        help="parity on N class-balanced images of each split only (quick check; default: all)")
    parser.add_argument("--report", default=None,
                        help="parity report (default: docs/export_parity.md for a full run, else DIR/parity.md)")
    return parser


def main(args: argparse.Namespace) -> int:
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    tflite_python = None
    if not args.skip_tflite:
        tflite_python = Path(args.tflite_python or DEFAULT_TFLITE_PYTHON)
        if not tflite_python.is_file():
            if args.tflite_python or args.require_tflite:  # asked for TFLite explicitly: do not quietly drop it
                print(f"error: no converter environment at {tflite_python}; set it up with: {TFLITE_SETUP} "
                      "(or pass --skip-tflite for ONNX only)", file=sys.stderr)
                return 2
            print(f"note: no TFLite converter environment at {tflite_python}: exporting ONNX only "
                  f"(set it up with: {TFLITE_SETUP}; --reuse-tflite keeps .tflite files of this checkpoint)", file=sys.stderr)
            tflite_python = None
    export_all(checkpoint, out, args.calibration_images, tflite_python, args.reuse_tflite)
    print("parity against PyTorch fp32 ...", file=sys.stderr)
    report = parity.run_parity(checkpoint, out, args.parity_limit)
    report_path = Path(args.report) if args.report else (
        REPO_ROOT / "docs" / "export_parity.md" if args.parity_limit is None else out / "parity.md")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m export --checkpoint {args.checkpoint} --out {args.out}"
    if args.parity_limit is not None:
        command += f" --parity-limit {args.parity_limit}"
    report_path.write_text(parity.markdown(report, command))
    sidecar_file = out / SIDECAR_NAME  # record each model's verdict beside its sha256 (the runner warns on "fail")
    sidecar = json.loads(sidecar_file.read_text())
    for name, row in report["models"].items():
        sidecar["models"][name]["parity_gate"] = {
            "result": "fail" if row["gate_failures"] else "pass", "failures": row["gate_failures"],
            "images": report["images"], "limit": report["limit"], "report": report["file"]}
    if report["lungs"]:
        sidecar["lungs"]["parity"] = {key: report["lungs"][key] for key in ("images", "masks_identical", "inputs_identical")}
    sidecar_file.write_text(json.dumps(sidecar, indent=2) + "\n")
    failed = {name: row["gate_failures"] for name, row in report["models"].items() if row["gate_failures"]}
    blocking = {name for name in failed if name.endswith(".onnx") or args.require_tflite}
    for name, failures in failed.items():
        note = "" if name in blocking else " (optional TFLite export: recorded, not blocking; --require-tflite makes it fatal)"
        print(f"PARITY GATE FAILED for {name}: {'; '.join(failures)}{note}", file=sys.stderr)
    print(f"wrote {out}/ and {report_path}", file=sys.stderr)
    return 1 if blocking else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
