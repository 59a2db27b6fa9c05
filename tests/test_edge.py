"""The edge runner: never imports torch; runs the committed export (ONNX int8) on files,
folders and bad inputs like the CLI; its results match the shipped PyTorch model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from edge.run import EdgePredictor, main
from edge import runtime
from edge.runtime import (DEFAULT_MODEL, DEFAULT_TFLITE_MODEL, SIDECAR_NAME, EdgeModel, EdgeModelError, default_model,
                          int8_kernels_saturate, sha256_of)
from tests.helpers import EXAMPLES, REPO_ROOT

MODELS = DEFAULT_MODEL.parent
SHIPPED = REPO_ROOT / "pneunet" / "weights" / "pneunet.safetensors"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.jpeg"))


def require_committed_export() -> None:
    if not DEFAULT_MODEL.is_file():
        pytest.fail(f"{DEFAULT_MODEL} missing: regenerate with python -m export --checkpoint {SHIPPED.relative_to(REPO_ROOT)} --out edge/models")


def test_runner_never_imports_torch():
    code = "import sys, edge.run, edge.runtime, pneunet.heatmap, pneunet.overlay; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_committed_export_belongs_to_shipped_model():
    require_committed_export()
    sidecar = json.loads((MODELS / SIDECAR_NAME).read_text())
    if SHIPPED.is_file():
        assert sidecar["source_checkpoint"]["sha256"] == sha256_of(SHIPPED), "edge/models is stale: re-export"
    # Committed: both ONNX exports and the int8 TFLite one (the fp32 TFLite file is 13 MB; python -m export).
    parity = json.loads((MODELS / "parity.json").read_text())
    assert parity["limit"] is None and parity["images"] == {"val": 652, "test": 624}  # the full gate, not a quick run
    for name in ("model_fp32.onnx", "model_int8.onnx", "model_int8.tflite"):
        assert sidecar["models"][name]["sha256"] == sha256_of(MODELS / name)
        assert parity["models"][name]["gate_failures"] == [], f"{name} failed its parity gate"
    for name in ("model_int8.onnx", "model_int8.tflite"):
        assert (MODELS / name).stat().st_size <= 5_000_000  # a few MB: fits an SD card and a git repo


def test_cli_on_files_folder_and_bad_inputs(tmp_path, capsys):
    require_committed_export()
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out_csv = tmp_path / "out.csv"
    code = main([str(EXAMPLE_FILES[0]), str(EXAMPLES), str(broken), str(empty), str(tmp_path / "missing.png"),
                 "--csv", str(out_csv), "--cam", str(tmp_path / "cams")])
    assert code == 1  # some files failed, the rest still ran
    rows = list(csv.DictReader(out_csv.open()))
    good = [row for row in rows if not row["error"]]
    assert len(good) == 1 + len(EXAMPLE_FILES)
    assert {row["label"] for row in good} <= {"normal", "pneumonia"}
    errors = {row["path"].rsplit("/", 1)[-1]: row["error"] for row in rows if row["error"]}
    assert "not a recognised image" in errors["broken.jpeg"]
    assert "empty" in errors["empty.png"]
    assert "no such file" in errors["missing.png"]
    assert len(list((tmp_path / "cams").glob("*_cam.png"))) == len(EXAMPLE_FILES)
    stderr = capsys.readouterr().err
    assert "broken.jpeg: not a recognised image" in stderr


def test_cli_prints_one_line_per_image(capsys):
    require_committed_export()
    assert main([str(path) for path in EXAMPLE_FILES[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in EXAMPLE_FILES[:2]]
    assert all(0.0 <= float(line.split("\t")[2]) <= 1.0 for line in lines)


def test_missing_or_changed_model_says_what_to_do(tmp_path):
    with pytest.raises(EdgeModelError, match="python -m export"):
        EdgeModel.load(tmp_path / "model_int8.onnx")
    require_committed_export()
    copy = tmp_path / DEFAULT_MODEL.name
    copy.write_bytes(DEFAULT_MODEL.read_bytes()[:-10])
    (tmp_path / SIDECAR_NAME).write_text((MODELS / SIDECAR_NAME).read_text())
    with pytest.raises(EdgeModelError, match="sha256"):
        EdgeModel.load(copy)


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_runtime_refuses_a_model_whose_sha256_differs_from_the_sidecar(tmp_path, capsys, damage):
    """A truncated copy, or one with a single byte changed (same size), is refused before any runtime sees
    it, by EdgeModel.load and by the runner, with a message that names the file."""
    require_committed_export()
    data = bytearray(DEFAULT_MODEL.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    copy = tmp_path / DEFAULT_MODEL.name
    copy.write_bytes(bytes(data))
    (tmp_path / SIDECAR_NAME).write_text((MODELS / SIDECAR_NAME).read_text())
    with pytest.raises(EdgeModelError) as error:
        EdgeModel.load(copy)
    assert str(copy) in str(error.value) and "sha256" in str(error.value) and "refusing" in str(error.value)
    assert main([str(EXAMPLE_FILES[0]), "--model", str(copy)]) == 2
    assert str(copy) in capsys.readouterr().err
    # the untouched committed file still loads
    EdgeModel.load(DEFAULT_MODEL)


def test_sidecar_lists_every_exported_file_with_sha256():
    require_committed_export()
    sidecar = json.loads((MODELS / SIDECAR_NAME).read_text())
    listed = set(sidecar["models"]) | ({sidecar["gate"]["file"]} if sidecar.get("gate") else set())
    present = {path.name for path in MODELS.iterdir() if path.suffix in (".onnx", ".tflite", ".safetensors")}
    assert present <= listed, f"exported files missing from {SIDECAR_NAME}: {sorted(present - listed)}"
    for name, entry in sidecar["models"].items():
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
        if (MODELS / name).is_file():
            assert sha256_of(MODELS / name) == entry["sha256"], f"{name} differs from the sidecar"


def test_committed_default_export_matches_shipped_pytorch_model():
    """Labels and heatmaps of the runner's default export against the app's PyTorch path on the examples."""
    require_committed_export()
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not present")
    import torch

    from pneunet.cam import class_activation_map
    from pneunet.checkpoint import load_checkpoint

    model, config = load_checkpoint(SHIPPED)
    edge = EdgePredictor.load(gate=False)
    inputs = np.stack([edge.prepare(path)[1] for path in EXAMPLE_FILES])
    with torch.inference_mode():
        logits = model(torch.from_numpy(inputs)).numpy()
        maps = class_activation_map(model, torch.from_numpy(inputs)).numpy()
    torch_probabilities = 1 / (1 + np.exp(-logits / config.temperature))
    correlations = []
    for result, probability, torch_map in zip(edge.predict_inputs(inputs, heatmap=True), torch_probabilities, maps):
        assert (result.pneumonia_probability >= config.threshold) == (probability >= config.threshold)
        if torch_map.max() > 0:  # a flat map (no evidence for pneumonia anywhere) has no correlation
            correlations.append(np.corrcoef(result.heatmap.ravel(), torch_map.ravel())[0, 1])
    assert len(correlations) >= 3
    # The default is int8: its maps follow PyTorch's closely on average (parity gate: mean r 0.976 over
    # 1,276 images, docs/export_parity.md) but a borderline image's diffuse map can differ more (0.74 here).
    assert np.mean(correlations) >= 0.9 and min(correlations) >= 0.6, correlations


@pytest.mark.parametrize("machine, flags, saturate", [
    ("x86_64", "fpu sse2 avx avx2 fma", True),  # AVX2 only: VPMADDUBSW int16 pair sums saturate
    ("x86_64", "avx2 avx512f avx512_vnni", False),
    ("AMD64", "avx2 avx_vnni", False),
    ("aarch64", "fp asimd", False),  # ARM kernels accumulate in int32
])
def test_int8_kernels_are_chosen_by_cpu(tmp_path, monkeypatch, machine, flags, saturate):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    assert int8_kernels_saturate(cpuinfo) is saturate
    if machine == "x86_64":
        assert int8_kernels_saturate(tmp_path / "absent") is True  # unknown x86 CPU: the safe choice


def test_int8_model_runs_with_reference_arithmetic_where_fused_kernels_saturate():
    """On this machine's CPU kind the runner must not use saturating kernels: "auto" equals "reference"."""
    require_committed_export()
    inputs = np.stack([EdgePredictor.load(gate=False).prepare(path)[1] for path in EXAMPLE_FILES])
    auto = EdgeModel.load(DEFAULT_MODEL)
    reference = EdgeModel.load(DEFAULT_MODEL, int8_kernels="reference")
    fused = EdgeModel.load(DEFAULT_MODEL, int8_kernels="fused")
    assert "reference" in reference.runtime and "fused" in fused.runtime
    assert ("reference" in auto.runtime) is int8_kernels_saturate()
    expected = (reference if int8_kernels_saturate() else fused).run(inputs)[0]
    np.testing.assert_allclose(auto.run(inputs)[0], expected, atol=1e-5)
    with pytest.raises(EdgeModelError, match="choose one of"):
        EdgeModel.load(DEFAULT_MODEL, int8_kernels="fast")


def test_default_model_follows_the_installed_runtime(monkeypatch):
    assert default_model() == DEFAULT_MODEL  # onnxruntime is installed here
    real_find_spec = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    assert default_model() == DEFAULT_TFLITE_MODEL  # a Pi with only ai-edge-litert gets the int8 TFLite file


def test_int8_tflite_export_agrees_with_int8_onnx_export():
    """The two committed int8 files give the same labels and close probabilities and heatmaps."""
    require_committed_export()
    onnx = EdgePredictor.load(DEFAULT_MODEL, gate=False)
    tflite = EdgePredictor.load(DEFAULT_TFLITE_MODEL, gate=False)
    assert tflite.model.runtime in ("ai-edge-litert", "tflite-runtime")
    inputs = np.stack([onnx.prepare(path)[1] for path in EXAMPLE_FILES])
    pairs = list(zip(onnx.predict_inputs(inputs, heatmap=True), tflite.predict_inputs(inputs, heatmap=True)))
    threshold = onnx.config.threshold
    for a, b in pairs:
        assert abs(a.pneumonia_probability - b.pneumonia_probability) < 0.05
        # a borderline image (PyTorch 0.678, ONNX int8 0.666, TFLite int8 0.633 at threshold 0.649) may flip
        if min(abs(a.pneumonia_probability - threshold), abs(b.pneumonia_probability - threshold)) > 0.05:
            assert a.label == b.label
    assert sum(a.label == b.label for a, b in pairs) >= len(pairs) - 1
    assert np.mean([np.corrcoef(a.heatmap.ravel(), b.heatmap.ravel())[0, 1] for a, b in pairs]) >= 0.95
