"""The edge runner: never imports torch; runs the committed export (ONNX int8) on files,
folders and bad inputs like the CLI; its results (lung masks, labels, heatmaps) match the shipped
PyTorch model; it refuses a missing, changed or unrunnable lung-field segmenter."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from edge.run import main
from pneunet import backends, predictor as core
from pneunet.backends import (INT8_ONNX, INT8_TFLITE, SIDECAR_NAME, ExportedModel, ModelFileError, default_model,
                              int8_kernels_saturate)
from pneunet.integrity import sha256_of
from pneunet.predictor import Predictor
from pneunet.heatmap import display_map
from tests.helpers import EXAMPLES, REPO_ROOT

MODELS = INT8_ONNX.parent
SHIPPED = REPO_ROOT / "pneunet" / "weights" / "pneunet.safetensors"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.jpeg"))
REEXPORT = f"python -m export --checkpoint {SHIPPED.relative_to(REPO_ROOT)} --out edge/models"


def require_committed_export() -> None:
    if not INT8_ONNX.is_file():
        pytest.fail(f"{INT8_ONNX} missing: regenerate with {REEXPORT}")


def committed_sidecar() -> dict:
    return json.loads((MODELS / SIDECAR_NAME).read_text())


def shipped_lungs() -> dict:
    """config.lungs of the shipped checkpoint: the segmenter it was trained with ({} for a model without one)."""
    return json.loads(SHIPPED.with_suffix(".json").read_text())["config"].get("lungs") or {}


def require_export_of_shipped_model() -> None:
    """The committed export must be of the shipped checkpoint (lung fields included) before it is compared
    with it: a new shipped model needs a re-export (by the lead, with the real data)."""
    require_committed_export()
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not present")
    sidecar = committed_sidecar()
    if sidecar["source_checkpoint"]["sha256"] != sha256_of(SHIPPED):
        pytest.fail(f"edge/models is an export of another checkpoint than {SHIPPED.name}: re-export with {REEXPORT}")
    recorded = (sidecar.get("lungs") or {}).get("sha256")
    if recorded != shipped_lungs().get("onnx_sha256"):
        pytest.fail(f"edge/models ships segmenter {recorded}, the shipped model was trained with "
                    f"{shipped_lungs().get('onnx_sha256')}: re-export with {REEXPORT}")


def test_runner_never_imports_torch():
    code = ("import sys, edge.run, pneunet.predictor, pneunet.heatmap, pneunet.lungs, pneunet.overlay\n"
            "predictor = pneunet.predictor.Predictor.load()  # the default export, its segmenter and gate\n"
            f"predictor.predict({str(EXAMPLE_FILES[0])!r}, heatmap=True)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_committed_export_belongs_to_shipped_model():
    require_committed_export()
    sidecar = committed_sidecar()
    if SHIPPED.is_file():
        assert sidecar["source_checkpoint"]["sha256"] == sha256_of(SHIPPED), f"edge/models is stale: {REEXPORT}"
        # the segmenter the shipped model was trained with, byte for byte (or none for a model without lungs)
        assert sidecar["config"].get("lungs", {}) == shipped_lungs(), f"edge/models is stale: {REEXPORT}"
        if shipped_lungs():
            for name, source in ((sidecar["lungs"]["file"], "pneunet.lungs.onnx"), (sidecar["lungs"]["config_file"], "pneunet.lungs.json")):
                assert (MODELS / name).read_bytes() == (SHIPPED.parent / source).read_bytes(), f"{name} differs from the app's"
        else:
            assert "lungs" not in sidecar
    # Committed: both ONNX exports and, when the export was made with the converter environment, the int8
    # TFLite one (the fp32 TFLite file is 13 MB; python -m export).
    parity = json.loads((MODELS / "parity.json").read_text())
    assert parity["limit"] is None and parity["images"] == {"val": 652, "test": 624}  # the full gate, not a quick run
    names = ["model_fp32.onnx", "model_int8.onnx"] + (["model_int8.tflite"] if "model_int8.tflite" in sidecar["models"] else [])
    for name in names:
        assert sidecar["models"][name]["sha256"] == sha256_of(MODELS / name)
        failures = parity["models"][name]["gate_failures"]
        assert (failures == []) == (sidecar["models"][name]["parity_gate"]["result"] == "pass"), name
        # a failed gate is recorded loudly, and that export is never what the runner picks by default
        assert not failures or default_model().name != name, f"{name} failed its parity gate ({failures}) but is the default"
    for name in names[1:]:
        assert (MODELS / name).stat().st_size <= 5_000_000  # a few MB: fits an SD card and a git repo
    if sidecar.get("lungs"):
        assert parity["lungs"]["masks_identical"] == parity["lungs"]["images"] == 652 + 624


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
    # the probability as people read it (pneunet.decision.format_probability)
    assert all(re.fullmatch(r"(\d{1,2}\.\d|100\.0) %|> 99\.9 %|< 0\.1 %", line.split("\t")[2]) for line in lines), lines


def test_missing_or_changed_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelFileError, match="python -m export"):
        ExportedModel.load(tmp_path / "model_int8.onnx")
    require_committed_export()
    copy = tmp_path / INT8_ONNX.name
    copy.write_bytes(INT8_ONNX.read_bytes()[:-10])
    (tmp_path / SIDECAR_NAME).write_text((MODELS / SIDECAR_NAME).read_text())
    with pytest.raises(ModelFileError, match="sha256"):
        ExportedModel.load(copy)


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_runtime_refuses_a_model_whose_sha256_differs_from_the_sidecar(tmp_path, capsys, damage):
    """A truncated copy, or one with a single byte changed (same size), is refused before any runtime sees
    it, by ExportedModel.load and by the runner, with a message that names the file."""
    require_committed_export()
    data = bytearray(INT8_ONNX.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    copy = tmp_path / INT8_ONNX.name
    copy.write_bytes(bytes(data))
    (tmp_path / SIDECAR_NAME).write_text((MODELS / SIDECAR_NAME).read_text())
    with pytest.raises(ModelFileError) as error:
        ExportedModel.load(copy)
    assert str(copy) in str(error.value) and "sha256" in str(error.value) and "refusing" in str(error.value)
    assert main([str(EXAMPLE_FILES[0]), "--model", str(copy)]) == 2
    assert str(copy) in capsys.readouterr().err
    # the untouched committed file still loads
    ExportedModel.load(INT8_ONNX)


def test_sidecar_lists_every_exported_file_with_sha256():
    require_committed_export()
    sidecar = committed_sidecar()
    listed = set(sidecar["models"]) | ({sidecar["gate"]["file"]} if sidecar.get("gate") else set())
    if sidecar.get("lungs"):
        listed |= {sidecar["lungs"]["file"], sidecar["lungs"]["config_file"]}
        for key in ("file", "config_file"):
            name, digest = sidecar["lungs"][key], sidecar["lungs"]["sha256" if key == "file" else "config_sha256"]
            assert sha256_of(MODELS / name) == digest, f"{name} differs from the sidecar"
    present = {path.name for path in MODELS.iterdir() if path.suffix in (".onnx", ".tflite", ".safetensors")}
    assert present <= listed, f"exported files missing from {SIDECAR_NAME}: {sorted(present - listed)}"
    for name, entry in sidecar["models"].items():
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
        if (MODELS / name).is_file():
            assert sha256_of(MODELS / name) == entry["sha256"], f"{name} differs from the sidecar"


def _app_and_edge(edge: Predictor, paths) -> list:
    """(app result, edge result) per image, each front preparing the image itself (its own segmenter)."""
    from pneunet.predictor import Predictor

    app = Predictor.load(SHIPPED, gate=False)
    app_images, edge_images = [app.prepare(path) for path in paths], [edge.prepare(path) for path in paths]
    app_results = app.predict_inputs(np.stack([i.model_input for i in app_images]), heatmap=True, lungs=[i.lungs for i in app_images])
    edge_results = edge.predict_inputs(np.stack([i.model_input for i in edge_images]), heatmap=True,
                                       lungs=[i.lungs for i in edge_images])
    return list(zip(app_results, edge_results))


def test_committed_default_export_matches_shipped_pytorch_model():
    """Labels, lung masks and shown heatmaps of the runner's default export against the app's PyTorch
    predictor on the examples."""
    require_export_of_shipped_model()
    edge = Predictor.load(gate=False)
    correlations = []
    for app, result in _app_and_edge(edge, EXAMPLE_FILES):
        assert result.label == app.label, (result.pneumonia_probability, app.pneumonia_probability)
        assert (app.lungs is None) == (result.lungs is None)
        if app.lungs is not None:
            np.testing.assert_array_equal(result.lungs.mask, app.lungs.mask)
        if app.heatmap.max() > 0 and result.heatmap.max() > 0:  # a flat map (no evidence anywhere) has no correlation
            correlations.append(np.corrcoef(result.heatmap.ravel(), app.heatmap.ravel())[0, 1])
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
    monkeypatch.setattr(backends.platform, "machine", lambda: machine)
    assert int8_kernels_saturate(cpuinfo) is saturate
    if machine == "x86_64":
        assert int8_kernels_saturate(tmp_path / "absent") is True  # unknown x86 CPU: the safe choice


def test_int8_model_runs_with_reference_arithmetic_where_fused_kernels_saturate():
    """On this machine's CPU kind the runner must not use saturating kernels: "auto" equals "reference"."""
    require_committed_export()
    inputs = np.stack([Predictor.load(gate=False).prepare(path)[1] for path in EXAMPLE_FILES])
    auto = ExportedModel.load(INT8_ONNX)
    reference = ExportedModel.load(INT8_ONNX, int8_kernels="reference")
    fused = ExportedModel.load(INT8_ONNX, int8_kernels="fused")
    assert "reference" in reference.name and "fused" in fused.name
    assert ("reference" in auto.name) is int8_kernels_saturate()
    expected = (reference if int8_kernels_saturate() else fused).run(inputs)[0]
    np.testing.assert_allclose(auto.run(inputs)[0], expected, atol=1e-5)
    with pytest.raises(ModelFileError, match="choose one of"):
        ExportedModel.load(INT8_ONNX, int8_kernels="fast")


def test_default_model_follows_the_installed_runtime(monkeypatch):
    # onnxruntime is installed here: the int8 ONNX export, or the fp32 one when int8 failed its parity gate
    assert default_model() == (INT8_ONNX if backends.passes_parity(INT8_ONNX) else INT8_ONNX.with_name("model_fp32.onnx"))
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    assert default_model() == INT8_TFLITE  # a Pi with only ai-edge-litert gets the int8 TFLite file


def test_int8_tflite_export_agrees_with_int8_onnx_export():
    """The two committed int8 files give the same labels and close probabilities and heatmaps (the
    TFLite classifier with the same ONNX segmenter: onnxruntime is installed here)."""
    require_committed_export()
    if INT8_TFLITE.name not in committed_sidecar()["models"]:
        pytest.skip(f"edge/models has no {INT8_TFLITE.name} (exported without the TFLite converter environment)")
    onnx = Predictor.load(INT8_ONNX, gate=False)
    tflite = Predictor.load(INT8_TFLITE, gate=False)
    assert tflite.runtime in ("ai-edge-litert", "tflite-runtime")
    prepared = [onnx.prepare(path) for path in EXAMPLE_FILES]
    inputs, lungs = np.stack([image.model_input for image in prepared]), [image.lungs for image in prepared]
    pairs = list(zip(onnx.predict_inputs(inputs, heatmap=True, lungs=lungs), tflite.predict_inputs(inputs, heatmap=True, lungs=lungs)))
    threshold = onnx.config.threshold
    for a, b in pairs:
        assert abs(a.pneumonia_probability - b.pneumonia_probability) < 0.05
        # a borderline image (PyTorch 0.678, ONNX int8 0.666, TFLite int8 0.633 at threshold 0.649) may flip
        if min(abs(a.pneumonia_probability - threshold), abs(b.pneumonia_probability - threshold)) > 0.05:
            assert a.label == b.label
    assert sum(a.label == b.label for a, b in pairs) >= len(pairs) - 1
    # nanmean: a normal film's map can be all zero (no positive evidence inside the lungs), where r is undefined
    assert np.nanmean([np.corrcoef(a.heatmap.ravel(), b.heatmap.ravel())[0, 1] for a, b in pairs]) >= 0.95


def test_committed_fp32_export_gives_the_apps_lung_masks_and_evidence():
    """For a model trained on lung fields: the runner's fp32 export cuts every image to the app's very mask
    and draws the app's evidence map; the int8 default follows it within the parity gate's tolerance."""
    require_export_of_shipped_model()
    if not shipped_lungs():
        pytest.skip("the shipped model has no lung fields (a model trained on whole images)")
    from export.parity import INT8_GATE, pearson

    for model, per_image in ((MODELS / "model_fp32.onnx", True), (INT8_ONNX, False)):
        pairs = _app_and_edge(Predictor.load(model, gate=False), EXAMPLE_FILES)
        correlations = []
        for app, result in pairs:
            np.testing.assert_array_equal(result.lungs.mask, app.lungs.mask)
            assert result.lungs.plausible == app.lungs.plausible
            evidence, app_evidence = result.evidence["pneumonia"], app.evidence["pneumonia"]
            assert evidence.shape == app_evidence.shape == (224, 224)
            if per_image:
                scale = float(np.abs(app_evidence).max())
                np.testing.assert_allclose(evidence, app_evidence, rtol=0, atol=1e-4 * scale)
                np.testing.assert_allclose(result.heatmap, app.heatmap, rtol=0, atol=1e-3)
            correlations.append(pearson(evidence, app_evidence))
        if not per_image:
            assert np.nanmean(correlations) >= INT8_GATE.min_evidence_r, correlations


# ---------------------------------------------------------------- the segmenter shipped beside an export


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    """An untrained small segmenter (ONNX + its .json) whose lungs are never plausible, so every mask is
    its template: a known box."""
    import warnings

    from pneunet.lung_model import build_lung_model, save_lung_checkpoint
    from pneunet.lungs import LungConfig

    template = np.zeros((32, 32), dtype=int)
    template[6:28, 3:29] = 1
    config = LungConfig(input_size=64, base_channels=4, depth=2, min_area_share=0.99, template=template.tolist())
    folder = tmp_path_factory.mktemp("segmenter")
    with warnings.catch_warnings():  # the legacy TorchScript ONNX exporter's deprecation notes
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="You are using the legacy TorchScript")
        save_lung_checkpoint(build_lung_model(config), config, folder / "lungs.safetensors")
    return folder / "lungs.onnx"


@pytest.fixture
def lung_export(tmp_path, tiny_segmenter):
    """An export folder with a lung-field segmenter: the committed fp32 classifier, ``tiny_segmenter``, and a
    sidecar that says the model was trained with that segmenter and shows evidence on a fixed scale."""
    require_committed_export()
    out = tmp_path / "export"
    out.mkdir()
    (out / "model_fp32.onnx").write_bytes((MODELS / "model_fp32.onnx").read_bytes())
    (out / "pneunet.lungs.onnx").write_bytes(tiny_segmenter.read_bytes())
    (out / "pneunet.lungs.json").write_bytes(tiny_segmenter.with_suffix(".json").read_bytes())
    sidecar = committed_sidecar()
    sidecar["models"] = {"model_fp32.onnx": sidecar["models"]["model_fp32.onnx"]}
    sidecar.pop("gate", None)
    sidecar["config"].update(lungs={"onnx_sha256": sha256_of(out / "pneunet.lungs.onnx")}, evidence_scale=0.05)
    sidecar["lungs"] = {"file": "pneunet.lungs.onnx", "sha256": sha256_of(out / "pneunet.lungs.onnx"),
                        "config_file": "pneunet.lungs.json", "config_sha256": sha256_of(out / "pneunet.lungs.json")}
    (out / SIDECAR_NAME).write_text(json.dumps(sidecar))
    return out


def test_runner_cuts_images_to_the_lung_fields_and_shows_evidence_inside_them(lung_export, tmp_path):
    predictor = Predictor.load(lung_export / "model_fp32.onnx")
    assert predictor.lungs is not None
    prepared = predictor.prepare(EXAMPLE_FILES[0])
    mask = prepared.lungs.mask
    assert not prepared.lungs.plausible and prepared.lungs.reason  # the template, and the runner says so
    assert mask[100, 112] and not mask[5, 5] and 0.3 < mask.mean() < 0.8
    model_input = prepared.model_input[0]
    dark = (0.0 - predictor.config.mean) / predictor.config.std  # the unit image's black after normalize
    np.testing.assert_allclose(model_input[:8, :8], dark, atol=1e-6)  # outside the region: suppressed
    assert model_input[mask].std() > 0.1  # inside: the image
    result = predictor.predict(EXAMPLE_FILES[0], heatmap=True)
    evidence = result.evidence["pneumonia"]
    assert evidence.shape == result.heatmap.shape == (224, 224) and result.lungs is not None
    np.testing.assert_array_equal(result.heatmap, display_map(evidence, result.lungs.mask, 0.05))
    assert result.heatmap[~mask].max() == 0 and 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    normal = predictor.predict_inputs(prepared.model_input[None], heatmap=True, target="normal", lungs=[prepared.lungs])[0]
    np.testing.assert_allclose(normal.evidence["normal"], -evidence, atol=1e-7)
    # --heatmaps: the raw evidence map at the image's own size, as python -m pneunet predict --heatmaps
    assert main([str(EXAMPLE_FILES[0]), "--model", str(lung_export / "model_fp32.onnx"), "--heatmaps",
                 str(tmp_path / "maps"), "--cam", str(tmp_path / "cams")]) == 0
    saved = np.load(tmp_path / "maps" / f"{EXAMPLE_FILES[0].stem}_evidence.npy")
    from PIL import Image

    assert saved.shape == Image.open(EXAMPLE_FILES[0]).size[::-1] and saved.dtype == np.float32
    assert abs(float(saved.mean()) - float(evidence.mean())) < 0.05 * float(np.abs(evidence).max())


@pytest.mark.parametrize("damage", ["segmenter changed", "segmenter config changed", "segmenter missing",
                                    "not the trained one", "no lungs entry"])
def test_runner_refuses_a_segmenter_that_is_not_the_trained_one(lung_export, capsys, damage):
    sidecar = json.loads((lung_export / SIDECAR_NAME).read_text())
    if damage == "segmenter changed":
        data = bytearray((lung_export / "pneunet.lungs.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (lung_export / "pneunet.lungs.onnx").write_bytes(bytes(data))
    elif damage == "segmenter config changed":
        (lung_export / "pneunet.lungs.json").write_text((lung_export / "pneunet.lungs.json").read_text().replace("0.99", "0.08"))
    elif damage == "segmenter missing":
        (lung_export / "pneunet.lungs.onnx").unlink()
    elif damage == "not the trained one":
        sidecar["config"]["lungs"] = {"onnx_sha256": "0" * 64}
    else:
        del sidecar["lungs"]
    (lung_export / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(ModelFileError, match="segmenter") as error:
        Predictor.load(lung_export / "model_fp32.onnx")
    assert "re-export" in str(error.value) or "re-copy" in str(error.value)
    assert main([str(EXAMPLE_FILES[0]), "--model", str(lung_export / "model_fp32.onnx")]) == 2
    assert "segmenter" in capsys.readouterr().err


def test_runner_without_onnxruntime_says_the_segmenter_needs_it(lung_export, monkeypatch):
    """A TFLite-only install cannot run the lung-field segmenter (ONNX): a clear refusal, not a traceback."""
    model = ExportedModel.load(lung_export / "model_fp32.onnx")
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    with pytest.raises(ModelFileError, match="needs onnxruntime for its lung-field segmenter"):
        core.load_export_lungs(model)
