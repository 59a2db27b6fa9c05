"""Model registry, pretrained weights and checkpoint round trip."""

import numpy as np
import pytest
import torch

from pneunet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pneunet.models import REGISTRY, build_model, default_config, imagenet_lite0_weights_path, load_pretrained
from pneunet.preprocessing import preprocess
from tests.helpers import EXAMPLES


@pytest.mark.parametrize("architecture", list(REGISTRY))
def test_every_registry_model_runs_at_its_input_size(architecture):
    config = default_config(architecture)
    model = build_model(config).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, config.channels, config.image_size, config.image_size))
        features = model.features(torch.randn(1, config.channels, config.image_size, config.image_size))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert features.ndim == 4  # CAM needs a spatial map


def test_imagenet_weights_load_into_lite0_with_every_key_matched():
    config = default_config("efficientnet_lite0")
    model = build_model(config)
    unused = load_pretrained(model, config)  # strict: raises on any missing or unexpected key
    assert unused == ["_fc.weight", "_fc.bias"]
    source = torch.load(imagenet_lite0_weights_path(), map_location="cpu", weights_only=True)
    # the grey stem is the sum of the RGB kernels: same output as the RGB net on a grey image
    torch.testing.assert_close(model.features.model.conv_stem.weight, source["_conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.features.model.bn2.running_var, source["_bn1.running_var"])


def test_imagenet_lite0_gives_the_same_output_on_grey_as_the_rgb_network():
    import timm

    config = default_config("efficientnet_lite0")
    grey_model = build_model(config).eval()
    load_pretrained(grey_model, config)
    rgb_config = default_config("efficientnet_lite0")
    rgb_config.channels = 3
    rgb_model = build_model(rgb_config).eval()
    load_pretrained(rgb_model, rgb_config)
    x = torch.from_numpy(preprocess(EXAMPLES / "normal_IM-0001-0001.jpeg", config))[None]
    with torch.inference_mode():
        torch.testing.assert_close(grey_model.features(x), rgb_model.features(x.repeat(1, 3, 1, 1)), atol=1e-3, rtol=1e-3)
    assert isinstance(timm.__version__, str)


def test_resnet_loads_a_local_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet18

    source = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    config = default_config("resnet18")
    model = build_model(config)
    assert load_pretrained(model, config, path) == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.features[0].weight, source["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.features[7][1].conv2.weight, source["layer4.1.conv2.weight"])


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    config = default_config("cnn5")
    model = build_model(config).eval()
    path = tmp_path / "model.safetensors"
    digest = save_checkpoint(model, config, path)
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == config and len(digest) == 64
    x = torch.from_numpy(np.stack([preprocess(p, config) for p in sorted(EXAMPLES.glob("*.jpeg"))]))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


def test_tampered_or_incomplete_checkpoint_is_refused(tmp_path):
    config = default_config("cnn64")
    path = tmp_path / "model.safetensors"
    save_checkpoint(build_model(config), config, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="sidecar JSON missing"):
        load_checkpoint(path)
