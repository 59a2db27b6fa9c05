"""Class activation maps: where in the image the decision came from.

Two forms, both over ``model.features`` (the last convolutional feature map):

- ``class_activation_map``: gradient-free, feature map . classifier weights (Zhou et al. 2016). Exact only
  for heads that are global average pooling + one linear layer (``model.pooled_linear``); this is the
  form the edge runner computes from an exported feature map.
- ``GradCAM``: feature map weighted by the spatially averaged gradient of the score (Selvaraju et al.
  2017), for every registry model. For pooling + linear heads it equals the gradient-free map.

Both return maps of shape (N, H, W) at the input's size, scaled to [0, 1] per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pneunet.heatmap import target_sign
from pneunet.models import PneuNetModel


def classifier_weights(model: PneuNetModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C,), bias ()) of the final linear layer of a pooling + linear head."""
    if not model.pooled_linear:
        raise ValueError("the gradient-free CAM needs a global-pooling + linear head; use GradCAM for this model")
    linear = model.head[-1]
    return linear.weight.detach()[0], linear.bias.detach()[0]


def normalise_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, upsample (N, h, w) maps to ``size`` and scale each to [0, 1]."""
    maps = F.interpolate(F.relu(maps)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return maps / peak[:, None, None]


@torch.inference_mode()
def cam_from_feature_map(model: PneuNetModel, features: torch.Tensor, size: tuple[int, int],
                         target: str = "pneumonia") -> torch.Tensor:
    """Gradient-free CAM from an already computed (N, C, h, w) feature map, upsampled to ``size``
    (lets a caller run ``model.features`` once for the logits, the pooled features and the map)."""
    weight, _ = classifier_weights(model)
    maps = torch.einsum("c,nchw->nhw", target_sign(target) * weight.to(features.dtype), features)
    return normalise_maps(maps, size)


@torch.inference_mode()
def class_activation_map(model: PneuNetModel, images: torch.Tensor, target: str = "pneumonia") -> torch.Tensor:
    return cam_from_feature_map(model, model.features(images), images.shape[-2:], target)


class GradCAM:
    """Grad-CAM over ``model.features``; a context manager that removes its hook on exit.

        with GradCAM(model) as cam:
            maps, logits = cam(images, target="pneumonia")
    """

    def __init__(self, model: PneuNetModel):
        self.model = model
        self._features: torch.Tensor | None = None
        self.features: torch.Tensor | None = None  # the last call's feature map, detached
        self._handle = None

    def __enter__(self) -> "GradCAM":
        def keep(_module, _inputs, output):
            output.retain_grad()
            self._features = output

        self._handle = self.model.features.register_forward_hook(keep)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, images: torch.Tensor, target: str = "pneumonia") -> tuple[torch.Tensor, torch.Tensor]:
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a 'with' block")
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)
            logits = self.model(images)
            score = target_sign(target) * logits
            score.sum().backward()
        features, gradients = self._features.detach(), self._features.grad.detach()
        self.features = features  # kept for callers that also want pooled features
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        maps = (weights * features).sum(dim=1)
        return normalise_maps(maps, images.shape[-2:]), logits.detach()
