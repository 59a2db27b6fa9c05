"""The lung-field segmenter in torch: a small U-Net, and its checkpoint I/O (safetensors + JSON sidecar).

    model, config = load_lung_checkpoint("pneunet/weights/pneunet.lungs.safetensors")
    logits = model(torch.from_numpy(segmenter_input(unit, config))[None])   # (1, 1, s, s)

Serving fronts that must stay torch-free run its ONNX / TFLite export instead (``export``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pneunet.integrity import sha256_of
from pneunet.lungs import LungConfig


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with ``depth`` poolings and ``base_channels`` doubling per level:
    (N, 1, s, s) unit-image input -> (N, 1, s, s) lung logits."""

    def __init__(self, base_channels: int = 8, depth: int = 4):
        super().__init__()
        widths = [base_channels * 2 ** level for level in range(depth + 1)]
        self.down = nn.ModuleList([_block(1, widths[0])] + [_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def build_lung_model(config: LungConfig) -> LungUNet:
    return LungUNet(config.base_channels, config.depth)


def lung_sidecar_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def export_lung_onnx(model: LungUNet, config: LungConfig, onnx_path: str | Path) -> None:
    """fp32 ONNX of the segmenter with a dynamic batch (the legacy exporter: no onnxscript needed)."""
    dummy = torch.zeros(1, 1, config.input_size, config.input_size)
    torch.onnx.export(model.cpu().eval(), (dummy,), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["segmenter_input"], output_names=["lung_logits"],
                      dynamic_axes={"segmenter_input": {0: "batch"}, "lung_logits": {0: "batch"}})


def save_lung_checkpoint(model: LungUNet, config: LungConfig, weights_path: str | Path) -> str:
    """Write weights (safetensors), their fp32 ONNX export (same stem) and one sidecar JSON holding the
    config and both sha256s; returns the weights' sha256."""
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    onnx_path = weights_path.with_suffix(".onnx")
    export_lung_onnx(model, config, onnx_path)
    digest = sha256_of(weights_path)
    sidecar = {"config": json.loads(config.to_json()), "weights_file": weights_path.name, "sha256": digest,
               "onnx_file": onnx_path.name, "onnx_sha256": sha256_of(onnx_path)}
    lung_sidecar_path(weights_path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return digest


def read_lung_config(weights_path: str | Path) -> tuple[LungConfig, str]:
    """(config, recorded sha256) from a segmenter's sidecar."""
    sidecar = json.loads(lung_sidecar_path(weights_path).read_text())
    return LungConfig.from_dict(sidecar["config"]), sidecar["sha256"]


def load_lung_checkpoint(weights_path: str | Path, device: str | torch.device = "cpu") -> tuple[LungUNet, LungConfig]:
    """Rebuild the segmenter from its sidecar and load its weights, refusing a file whose sha256 differs."""
    from pneunet.checkpoint import CheckpointError

    weights_path = Path(weights_path)
    if not weights_path.is_file() or not lung_sidecar_path(weights_path).is_file():
        raise CheckpointError(f"{weights_path}: no lung-field segmenter (a .safetensors file plus its .json)")
    config, recorded = read_lung_config(weights_path)
    actual = sha256_of(weights_path)
    if actual != recorded:
        raise CheckpointError(f"{weights_path}: sha256 {actual[:12]}... does not match {recorded[:12]}... recorded in its sidecar")
    model = build_lung_model(config)
    model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    return model.to(device).eval(), config
