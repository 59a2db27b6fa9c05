"""The PyTorch backend: a ``.safetensors`` checkpoint as a ``pneunet.backends.Backend``, for training,
evaluation, the parity gate and ``--backend torch`` in development. Serving never imports this module.

    backend = TorchBackend.load("pneunet/weights/pneunet.safetensors")
    logits, features = backend.run(inputs)   # numpy in, numpy out, as every backend
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pneunet.checkpoint import load_checkpoint
from pneunet.config import ModelConfig
from pneunet.integrity import sha256_of
from pneunet.models import PneuNetModel


class TorchBackend:
    name = "torch"

    def __init__(self, model: PneuNetModel, config: ModelConfig, path: Path | None = None):
        # channels_last: ~1.6x faster convolutions on CPU, same numbers.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.config, self.path = config, path
        self.sha256 = sha256_of(path) if path is not None else ""
        self.device = next(model.parameters()).device
        self.classifier_weight = (model.head[-1].weight.detach().float().cpu().numpy()[0]
                                  if model.pooled_linear else None)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu") -> "TorchBackend":
        """Rebuild and load a checkpoint (sha256-checked, ``CheckpointError`` naming the file otherwise)."""
        model, config = load_checkpoint(checkpoint, device=device)
        return cls(model, config, Path(checkpoint))

    @torch.inference_mode()
    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        features = self.model.features(batch.to(self.device, memory_format=torch.channels_last))
        logits = self.model.head(features).squeeze(-1)
        return logits.float().cpu().numpy().reshape(-1), features.float().cpu().numpy()
