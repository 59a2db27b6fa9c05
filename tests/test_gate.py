"""Input gate: numpy-only, fitted distances behave, storage round-trips, real X-rays pass, non-X-rays don't."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneunet.gate import InputGate, NotAnXrayError, PpcaDistance, colourfulness, gate_path_for, grey_spread, image_descriptor

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "pneunet" / "examples").glob("*.jpeg"))


def test_gate_module_needs_no_torch():
    code = "import sys, pneunet.gate; assert 'torch' not in sys.modules, 'pneunet.gate imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def synthetic_gate(seed: int = 0) -> tuple[InputGate, np.ndarray, np.ndarray]:
    """Features on a 10-dim subspace of 100 dims plus small noise, like pooled CNN features."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(10, 100))

    def sample(count: int) -> np.ndarray:
        return rng.normal(size=(count, 10)) * np.linspace(5, 1, 10) @ basis + 0.1 * rng.normal(size=(count, 100))

    gate = InputGate.fit(sample(2000), dims=10)
    gate.calibrate(sample(500))
    return gate, sample(500), rng.normal(size=(50, 100)) * 3


def test_fitted_gate_accepts_in_distribution_and_refuses_outliers():
    gate, held_out, outliers = synthetic_gate()
    assert np.mean(gate.distance(held_out) > gate.threshold) <= 0.02
    assert np.all(gate.distance(outliers) > gate.threshold)
    with pytest.raises(NotAnXrayError, match="does not look like a chest X-ray"):
        gate.check_features(outliers[0])
    gate.check_features(held_out[gate.distance(held_out) <= gate.threshold][0])


def test_gate_file_round_trip(tmp_path):
    gate, held_out, _ = synthetic_gate()
    gate.save(tmp_path / "gate.safetensors", metadata={"note": "test"})
    loaded = InputGate.load(tmp_path / "gate.safetensors")
    assert loaded.threshold == pytest.approx(gate.threshold)
    assert np.allclose(loaded.distance(held_out), gate.distance(held_out), rtol=1e-4)
    assert gate_path_for("weights/pneunet.safetensors") == Path("weights/pneunet.gate.safetensors")


def test_appearance_check_round_trips_and_refuses_a_document(tmp_path):
    import skimage.data

    gate, _, _ = synthetic_gate()
    xrays = [image_descriptor(Image.open(path)) for path in EXAMPLES]
    assert all(d.shape == xrays[0].shape and np.all(np.isfinite(d)) for d in xrays)
    # a toy appearance model: the bundled X-rays, slightly jittered, as the "training set"
    rng = np.random.default_rng(0)
    sample = np.concatenate([x + 0.02 * rng.normal(size=(50, x.size)) for x in xrays])
    gate.appearance = PpcaDistance.fit(sample, dims=4)
    gate.appearance.calibrate(sample, quantile=1.0, margin=1.5)
    for path in EXAMPLES:
        gate.check_image(Image.open(path))
    with pytest.raises(NotAnXrayError, match="does not look like a chest X-ray"):
        gate.check_image(Image.fromarray(skimage.data.page()))
    gate.save(tmp_path / "gate.safetensors")
    loaded = InputGate.load(tmp_path / "gate.safetensors", verify=True)
    assert loaded.appearance is not None
    assert loaded.appearance.threshold == pytest.approx(gate.appearance.threshold)
    assert np.allclose(loaded.appearance.distance(sample[:20]), gate.appearance.distance(sample[:20]), rtol=1e-4)


def test_image_checks():
    import skimage.data

    grey_xray = Image.open(EXAMPLES[0])
    assert colourfulness(grey_xray) < 2 and grey_spread(grey_xray) > 10
    assert colourfulness(Image.fromarray(skimage.data.astronaut())) > 20
    gate, _, _ = synthetic_gate()
    with pytest.raises(NotAnXrayError, match="colour picture"):
        gate.check_image(Image.fromarray(skimage.data.coffee()))
    with pytest.raises(NotAnXrayError, match="blank"):
        gate.check_image(Image.new("L", (256, 256), 0))
    gate.check_image(grey_xray)


@pytest.fixture(scope="module")
def predictor(served_predictor):
    from pneunet.backends import default_checkpoint

    loaded = served_predictor
    if loaded.gate is None:
        pytest.fail(f"{gate_path_for(default_checkpoint())} missing: run python -m training.fit_gate "
                    f"--checkpoint {default_checkpoint()}")
    return loaded


def test_real_gate_passes_bundled_xrays_and_refuses_non_xrays(predictor):
    for path in EXAMPLES:
        result = predictor.predict(path)  # raises NotAnXrayError if refused
        assert result.gate_distance is not None and result.gate_distance <= predictor.gate.threshold
    from pneunet.non_xrays import non_xray_images

    assert predictor.gate.appearance is not None, "gate fitted before the appearance check: rerun training.fit_gate"
    refused, accepted = 0, []
    chosen = list(non_xray_images())
    for _, name, image in chosen:
        try:
            predictor.predict(image)
            accepted.append(name)
        except NotAnXrayError:
            refused += 1
    # docs/gate_report.md measures 100 % of these 107 with the shipped gate (target 95 %); a regression
    # guard at the target.
    assert refused / len(chosen) >= 0.95, f"only {refused} of {len(chosen)} non-X-rays refused; accepted: {accepted}"


def test_cli_reports_a_refused_image_as_a_per_file_error(tmp_path):
    import skimage.data

    Image.fromarray(skimage.data.coins()).save(tmp_path / "coins.png")  # refused by the feature check
    completed = subprocess.run([sys.executable, "-m", "pneunet", "predict", str(EXAMPLES[0]), str(tmp_path / "coins.png")],
                               capture_output=True, text=True)
    assert completed.returncode == 1
    assert "does not look like a chest X-ray" in completed.stderr and "coins.png" in completed.stderr
    assert EXAMPLES[0].name in completed.stdout


def test_cli_writes_cam_overlays_at_the_images_own_size(tmp_path):
    wide = tmp_path / "wide.png"
    Image.open(EXAMPLES[0]).convert("L").resize((300, 200)).save(wide)
    completed = subprocess.run([sys.executable, "-m", "pneunet", "predict", str(wide), "--cam", str(tmp_path / "cam")],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    overlay = Image.open(tmp_path / "cam" / "wide_cam.png")
    # the image keeps its own size; the colour bar is a panel to its right
    assert overlay.height == 200 and overlay.width > 300 and overlay.mode == "RGB"
    overlay = overlay.crop((0, 0, 300, 200))
    # colour only where the map is warm: some pixels are coloured, the rest stays grey
    rgb = np.asarray(overlay, dtype=np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    assert 0.01 < np.mean(chroma > 20) < 0.95


# ------------------------------------------------------------------ issue 12: not an X-ray vs unlike the population


def real_xrays(count: int) -> tuple[list[Path], list[Path]]:
    """(Kermany test, nih_adult224 test) X-rays, ``count`` of each, spread over both classes."""
    from pneunet.datasets import DEFAULT_NIH_DIR, read_nih, read_split
    from tests.helpers import require_data

    data_dir = require_data()
    if not DEFAULT_NIH_DIR.is_dir():
        pytest.skip(f"{DEFAULT_NIH_DIR} not present")
    kermany = read_split(split="test")[:: max(1, 624 // count)][:count]
    adults = read_nih(DEFAULT_NIH_DIR, "test")[:: max(1, 199 // count)][:count]
    return [data_dir / e.path for e in kermany], [DEFAULT_NIH_DIR / e.path for e in adults]


def test_real_adult_and_paediatric_xrays_are_scored_and_adults_flagged(predictor):
    if predictor.gate.population is None:
        pytest.fail("the shipped gate has no population check: refit it with python -m training.fit_gate")
    kermany, adults = real_xrays(24)
    flags = {}
    for name, paths in (("kermany", kermany), ("adults", adults)):
        results = [predictor.predict(path) for path in paths]  # raises NotAnXrayError if one is refused
        flags[name] = np.mean([r.warning is not None for r in results])
    # docs/gate_report.md has the full test sets; on these samples most adults and few children are flagged
    assert flags["adults"] >= 0.5 and flags["kermany"] <= 0.2, flags


def test_app_cli_and_edge_decide_the_same_for_a_mixed_folder(tmp_path, served_predictor):
    """Children's and adults' X-rays, non-X-rays and a broken file: the same verdict, refusal and warning
    from the CLI, the edge runner and the app's batch table."""
    import csv
    import shutil

    import skimage.data

    import app
    from edge.run import main as edge_main
    from pneunet.cli import main as cli_main

    kermany, adults = real_xrays(3)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, path in enumerate(kermany + adults):
        shutil.copy(path, folder / f"{index:02d}_{path.name}")
    Image.fromarray(skimage.data.coins()).save(folder / "10_coins.png")
    Image.fromarray(skimage.data.astronaut()).save(folder / "11_astronaut.png")
    (folder / "12_broken.jpeg").write_bytes(kermany[0].read_bytes()[:500])
    outputs = {}
    for name, main in (("cli", cli_main), ("edge", edge_main)):
        out = tmp_path / f"{name}.csv"
        main((["predict"] if name == "cli" else []) + [str(folder), "--csv", str(out), "--quiet"])
        outputs[name] = [(Path(r["path"]).name, r["label"], r["pneumonia_probability"], bool(r["error"]), r["warning"])
                         for r in csv.DictReader(open(out))]
    service = app.AppService(served_predictor)
    header = app.BATCH_HEADERS
    outputs["app"] = [(row[0], row[1], row[2], bool(row[header.index("error")]), row[header.index("warning")])
                      for row in service.batch_rows([str(p) for p in sorted(folder.iterdir())])]
    assert outputs["cli"] == outputs["edge"] == outputs["app"]
    refused = {name for name, _, _, error, _ in outputs["cli"] if error}
    assert refused == {"10_coins.png", "11_astronaut.png", "12_broken.jpeg"}
