"""CAM: shapes, Grad-CAM == gradient-free CAM on pooling + linear heads, hooks removed, localisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pneunet.cam import GradCAM, class_activation_map, classifier_weights
from pneunet.heatmap import cam_from_features
from pneunet.config import ModelConfig
from pneunet.models import PneuNetModel, build_model, default_config, pooled_linear_head


def small_pooled_model(seed: int = 0) -> PneuNetModel:
    """A few convolutions + global average pooling + one linear layer: the head the gradient-free CAM needs."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    return PneuNetModel(features, pooled_linear_head(16), pooled_linear=True).eval()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.mark.parametrize("target", ["pneumonia", "normal"])
def test_grad_cam_equals_gradient_free_cam_on_pooled_linear_model(target):
    model = small_pooled_model()
    images = torch.randn(3, 1, 64, 48)
    free = class_activation_map(model, images, target)
    with GradCAM(model) as grad_cam:
        grad, logits = grad_cam(images, target)
    assert free.shape == grad.shape == (3, 64, 48)
    assert torch.allclose(logits, model(images).detach(), atol=1e-5)
    for index in range(3):
        assert correlation(free[index], grad[index]) >= 0.99
    assert float(free.min()) >= 0 and float(free.max()) <= 1 + 1e-6


def test_grad_cam_equals_gradient_free_cam_on_registry_lite0():
    torch.manual_seed(0)
    model = build_model(default_config("efficientnet_lite0")).eval()
    images = torch.randn(1, 1, 224, 224)
    free = class_activation_map(model, images)
    with GradCAM(model) as grad_cam:
        grad, _ = grad_cam(images)
    assert free.shape == grad.shape == (1, 224, 224)
    assert correlation(free[0], grad[0]) >= 0.99


def test_numpy_cam_matches_torch_cam():
    model = small_pooled_model()
    images = torch.randn(1, 1, 32, 32)
    weight, _ = classifier_weights(model)
    with torch.inference_mode():
        features = model.features(images)[0].numpy()
        torch_map = torch.einsum("c,chw->hw", weight, torch.from_numpy(features)).relu().numpy()
    assert np.allclose(cam_from_features(features, weight.numpy()), torch_map, atol=1e-5)


def test_grad_cam_on_one_channel_cnn5_has_input_shape_and_removes_its_hook():
    config = ModelConfig(architecture="cnn5", image_size=150, channels=1)
    model = build_model(config).eval()
    images = torch.randn(2, 1, 150, 150)
    with GradCAM(model) as grad_cam:
        maps, logits = grad_cam(images)
        assert len(model.features._forward_hooks) == 1
    assert len(model.features._forward_hooks) == 0
    assert maps.shape == (2, 150, 150) and logits.shape == (2,)
    assert torch.isfinite(maps).all() and float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6
    with pytest.raises(ValueError, match="GradCAM"):
        class_activation_map(model, images)
    with pytest.raises(RuntimeError, match="with"):
        GradCAM(model)(images)


def opacity_images(count: int, rng: np.random.Generator, side: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey 'lungs'; label 1 images get one bright round opacity at a random place."""
    images = rng.normal(0, 0.3, (count, 1, side, side)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    yy, xx = np.mgrid[:side, :side]
    for index in np.flatnonzero(labels):
        cy, cx = rng.integers(8, side - 8, 2)
        images[index, 0] += 2.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 25)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.float32))


def test_heatmap_hot_region_follows_a_moving_opacity():
    """Train a small pooling + linear CNN for a few steps to detect a synthetic opacity; the CAM peak
    must then sit on the opacity wherever it is placed (fails if the map ignores where evidence is)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = small_pooled_model(seed=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        images, labels = opacity_images(32, rng)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    side = 48
    yy, xx = np.mgrid[:side, :side]
    for cy, cx in [(12, 12), (12, 36), (36, 12), (36, 36), (24, 24)]:
        image = np.random.default_rng(1).normal(0, 0.3, (1, 1, side, side)).astype(np.float32)
        image[0, 0] += 2.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 25)
        heat = class_activation_map(model, torch.from_numpy(image))[0].numpy()
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        assert abs(peak_y - cy) <= 6 and abs(peak_x - cx) <= 6, f"opacity at {(cy, cx)}, heatmap peak at {(peak_y, peak_x)}"
