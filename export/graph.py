"""The graph every export is traced from: image -> (pneumonia logit, last feature map).

The feature map (plus the classifier weights in the sidecar) lets the edge runner draw the same
gradient-free heatmap as the app without gradients (``pneunet.heatmap``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pneunet.cam import classifier_weights
from pneunet.config import ModelConfig
from pneunet.models import PneuNetModel

INPUT_NAME = "image"
LOGIT_NAME = "pneumonia_logit"
FEATURES_NAME = "features"


class EdgeGraph(nn.Module):
    """(N, channels, H, W) -> (logits (N,), features). ``features_layout`` "NCHW" (ONNX) or "NHWC"
    (TFLite, whose kernels are channels-last anyway, so the transpose costs nothing there)."""

    def __init__(self, model: PneuNetModel, features_layout: str = "NCHW"):
        super().__init__()
        if features_layout not in ("NCHW", "NHWC"):
            raise ValueError(f"features_layout must be NCHW or NHWC, not {features_layout!r}")
        self.model = model
        self.features_layout = features_layout

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(image)
        logits = self.model.head(features).squeeze(-1)
        if self.features_layout == "NHWC":
            features = features.permute(0, 2, 3, 1)
        return logits, features


class _StaticPadConv(nn.Sequential):
    """TF "SAME" convolution with its padding frozen for one input size."""


def freeze_same_padding(model: PneuNetModel, config: ModelConfig) -> PneuNetModel:
    """A copy of ``model`` whose TF-"same" convolutions (timm ``Conv2dSame``, which pads by a size
    computed at run time) pad by constants for ``config.image_size``.

    Why: the legacy ONNX exporter mis-orders a run-time computed ``F.pad`` (the stride-2 "same" pad is
    asymmetric, bottom/right only), which moved logits by ~0.4; constant pads export exactly and keep
    the graph free of shape arithmetic that quantisers and converters stumble on.
    """
    from timm.layers.conv2d_same import Conv2dSame

    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, inputs, name=name: sizes.__setitem__(name, tuple(inputs[0].shape[-2:]))))
    with torch.inference_mode():
        model(torch.zeros(1, config.channels, config.image_size, config.image_size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        same: Conv2dSame = getattr(parent, child_name)
        pad_h = _same_padding(height, same.kernel_size[0], same.stride[0], same.dilation[0])
        pad_w = _same_padding(width, same.kernel_size[1], same.stride[1], same.dilation[1])
        conv = nn.Conv2d(same.in_channels, same.out_channels, same.kernel_size, same.stride, 0,
                         same.dilation, same.groups, same.bias is not None)
        conv.load_state_dict(same.state_dict())
        pad = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        setattr(parent, child_name, _StaticPadConv(pad, conv))
    return model.eval()


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TF "SAME" padding along one axis (timm's ``get_same_padding``)."""
    return max((-(size // -stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def edge_graph(model: PneuNetModel, config: ModelConfig, features_layout: str = "NCHW") -> EdgeGraph:
    """The export graph for ``model``: frozen padding, eval mode, float32 on the CPU."""
    if not model.pooled_linear:
        raise ValueError(
            f"{config.architecture}: edge export needs a global-pooling + linear head (the heatmap is "
            "feature map . classifier weights); this architecture's head is not one"
        )
    model = model.to("cpu", torch.float32, memory_format=torch.contiguous_format)
    return EdgeGraph(freeze_same_padding(model, config), features_layout).eval()


def classifier_for_sidecar(model: PneuNetModel) -> dict:
    """The classifier's weight vector (C,) and bias, for the runner's heatmap."""
    weight, bias = classifier_weights(model)
    return {"weight": [float(v) for v in weight.float().tolist()], "bias": float(bias)}
