"""ResNet-12: the parameter counts of the published widths, shapes on 84x84, registry wiring."""

from __future__ import annotations

import pytest
import torch

from kshot.errors import ConfigError
from kshot.models import create_model, input_kwargs


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_published_widths():
    # 64-160-320-640 (Lee et al. 2019): the "12.4M" of the literature, without DropBlock or head.
    assert n_params(create_model("resnet12")) == 12_424_320
    # 64-128-256-512 (Oreshkin et al. 2018).
    assert n_params(create_model("resnet12", channels=[64, 128, 256, 512])) == 7_996_800
    # One block, counted by hand: three 3x3 convs, a 1x1 shortcut, four batch norms.
    c_in, c = 3, 64
    block = 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
    small = create_model("resnet12", channels=[64, 64, 64, 64])
    assert n_params(small.blocks[0]) == block


def test_forward_shapes_on_84x84():
    x = torch.randn(2, 3, 84, 84)
    model = create_model("resnet12", channels=[16, 32, 48, 64]).eval()
    assert model(x).shape == (2, 64)
    flat = create_model("resnet12", channels=[16, 32, 48, 64], pool="flatten").eval()
    assert flat(x).shape == (2, 64 * 5 * 5)
    head = create_model("resnet12", channels=[16, 32, 48, 64], pool="flatten", out_features=5, image_size=84)
    assert head.eval()(x).shape == (2, 5)


def test_full_width_forward_gives_640_features():
    with torch.no_grad():
        assert create_model("resnet12").eval()(torch.zeros(1, 3, 84, 84)).shape == (1, 640)


def test_input_kwargs_come_from_the_example_shape():
    kwargs = input_kwargs("resnet12", (1, 28, 28))
    assert kwargs == {"in_channels": 1, "image_size": 28}
    model = create_model("resnet12", channels=[8, 8, 8, 8], **kwargs)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 8)


def test_batch_norm_without_running_statistics_and_gradients():
    model = create_model("resnet12", channels=[8, 8, 8, 8], track_running_stats=False)
    assert not any(name.endswith("running_mean") for name, _ in model.named_buffers())
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="4 widths"):
        create_model("resnet12", channels=[8, 8])
    with pytest.raises(ConfigError, match="'avg' or 'flatten'"):
        create_model("resnet12", pool="max")
    with pytest.raises(ConfigError, match="too small"):
        create_model("resnet12", pool="flatten", image_size=8)
