"""Checkpoint I/O: weights as safetensors (no pickle), beside a JSON sidecar with config and sha256.

    save_checkpoint(model, config, "runs/x/model.safetensors")   # writes model.safetensors + model.json
    model, config = load_checkpoint("runs/x/model.safetensors")  # verifies the sha256, rebuilds, loads
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pneunet.config import ModelConfig
from pneunet.integrity import ModelFileError, sha256_of  # noqa: F401  (sha256_of re-exported: callers import it from here)
from pneunet.models import PneuNetModel, build_model


class CheckpointError(ModelFileError):
    """A checkpoint is missing, incomplete or does not match its recorded sha256."""


def sidecar_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_checkpoint(model: PneuNetModel, config: ModelConfig, weights_path: str | Path) -> str:
    """Write weights and sidecar; returns the weights' sha256."""
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights_path))
    digest = sha256_of(weights_path)
    sidecar = {"config": json.loads(config.to_json()), "weights_file": weights_path.name, "sha256": digest}
    sidecar_path(weights_path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return digest


def read_sidecar(weights_path: str | Path) -> dict:
    path = sidecar_path(weights_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: sidecar JSON missing; a checkpoint is a .safetensors file plus its .json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def load_checkpoint(weights_path: str | Path, device: str | torch.device = "cpu") -> tuple[PneuNetModel, ModelConfig]:
    """Rebuild the model from its sidecar config and load its weights, refusing a file whose sha256
    differs from the one recorded (a truncated or tampered file)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such checkpoint")
    sidecar = read_sidecar(weights_path)
    actual = sha256_of(weights_path)
    if actual != sidecar.get("sha256"):
        raise CheckpointError(
            f"{weights_path}: sha256 {actual[:12]}... does not match {str(sidecar.get('sha256'))[:12]}... "
            "recorded in its sidecar; the file is damaged or was changed"
        )
    config = ModelConfig.from_dict(sidecar["config"])
    model = build_model(config)
    try:
        model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path}: weights do not fit {config.architecture} ({error})") from error
    return model.to(device).eval(), config
