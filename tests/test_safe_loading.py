"""Safe loading: weights only from safetensors (no pickle), and every shipped file checked against the
sha256 recorded beside it; a truncated or tampered file is refused with a message naming it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pneunet.checkpoint import CheckpointError, load_checkpoint
from pneunet.gate import GateFileError, InputGate, gate_path_for, gate_sidecar_path
from pneunet.lungs import LungFileError, lungs_path_for
from pneunet.backends import DEFAULT_CHECKPOINT
from pneunet.predictor import Predictor

from tests.helpers import REPO_ROOT as REPO  # noqa: E402


@pytest.fixture()
def shipped_copy(tmp_path) -> Path:
    """The shipped checkpoint, its sidecar, gate, gate sidecar and lung-field segmenter (ONNX + sidecar),
    copied to a temporary folder."""
    target = tmp_path / "pneunet.safetensors"
    lungs = lungs_path_for(DEFAULT_CHECKPOINT)
    for source in (DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT.with_suffix(".json"), gate_path_for(DEFAULT_CHECKPOINT),
                   gate_sidecar_path(gate_path_for(DEFAULT_CHECKPOINT)), lungs, lungs.with_suffix(".json")):
        if not source.is_file():
            pytest.fail(f"{source} missing from the shipped model")
        shutil.copy(source, tmp_path / source.name)
    return target


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["tampered", "truncated"])
def test_damaged_weights_are_refused_naming_the_file(shipped_copy, damage):
    if damage is flip_byte:
        damage(shipped_copy, shipped_copy.stat().st_size - 100)  # a weight, not the header
    else:
        damage(shipped_copy)
    with pytest.raises(CheckpointError, match=re.escape(str(shipped_copy)) + ".*sha256"):
        load_checkpoint(shipped_copy)


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["tampered", "truncated"])
def test_damaged_gate_is_refused_naming_the_file(shipped_copy, damage):
    gate_file = gate_path_for(shipped_copy)
    if damage is flip_byte:
        damage(gate_file, gate_file.stat().st_size - 100)
    else:
        damage(gate_file)
    with pytest.raises(GateFileError, match=re.escape(str(gate_file)) + ".*sha256"):
        Predictor.load(shipped_copy)
    if damage is truncate:  # even unverified, a truncated gate is refused as unreadable, naming the file
        with pytest.raises(GateFileError, match=re.escape(str(gate_file)) + ".*not a readable gate file"):
            InputGate.load(gate_file)


def test_gate_without_recorded_sha256_is_refused(shipped_copy):
    gate_sidecar_path(gate_path_for(shipped_copy)).unlink()
    with pytest.raises(GateFileError, match="no recorded sha256"):
        Predictor.load(shipped_copy)


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["tampered", "truncated"])
def test_damaged_lung_segmenter_is_refused_naming_the_file(shipped_copy, damage):
    lungs = lungs_path_for(shipped_copy)
    if damage is flip_byte:
        damage(lungs, lungs.stat().st_size - 100)
    else:
        damage(lungs)
    with pytest.raises(LungFileError, match=re.escape(str(lungs)) + ".*sha256"):
        Predictor.load(shipped_copy)


def test_gate_save_records_its_sha256(shipped_copy, tmp_path):
    gate = InputGate.load(gate_path_for(shipped_copy), verify=True)
    gate.save(tmp_path / "refit.gate.safetensors")
    assert InputGate.load(tmp_path / "refit.gate.safetensors", verify=True).threshold == pytest.approx(gate.threshold)


def test_gate_fitted_for_another_model_is_refused(shipped_copy):
    gate_file = gate_path_for(shipped_copy)
    InputGate.load(gate_file).save(gate_file, metadata={"checkpoint_sha256": "0" * 64})
    with pytest.raises(GateFileError, match=re.escape(str(gate_file)) + ".*fitted for another model"):
        Predictor.load(shipped_copy)


def test_cli_refuses_a_tampered_model_with_one_line(shipped_copy, tmp_path, capsys):
    from pneunet.cli import main

    flip_byte(shipped_copy, shipped_copy.stat().st_size - 100)
    code = main(["predict", str(REPO / "pneunet" / "examples"), "--checkpoint", str(shipped_copy), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(shipped_copy) in err and "sha256" in err and "Traceback" not in err


def test_load_path_has_no_pickle():
    """No pickle on the load path: no torch.load without weights_only=True, no pickle / numpy allow_pickle."""
    offenders = []
    for path in [REPO / "app.py", *sorted((REPO / "pneunet").rglob("*.py")), *sorted((REPO / "edge").rglob("*.py"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or re.search(
                    r"\bimport pickle\b|\bpickle\.loads?\(|allow_pickle=True|joblib\.load", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
