"""The encoder of Koch et al.'s Siamese network."""

from __future__ import annotations

import pytest
import torch

from kshot.errors import ConfigError
from kshot.models import create_model, output_dim


def test_koch_on_105_pixel_omniglot_images():
    model = create_model("koch", in_channels=1, image_size=105)
    # conv 64@10x10, 128@7x7, 128@4x4, 256@4x4 (valid), then 256*6*6 -> 4,096 sigmoid units.
    expected = (64 * 100 + 64) + (128 * 64 * 49 + 128) + (128 * 128 * 16 + 128) \
        + (256 * 128 * 16 + 256) + (256 * 6 * 6 * 4096 + 4096)
    assert sum(p.numel() for p in model.parameters()) == expected == 38_947_648
    assert model[-2].in_features == 9216


def test_koch_scaled_to_small_images():
    model = create_model("koch", in_channels=1, image_size=28, channels=[8, 16, 16, 32],
                         kernels=[5, 3, 2, 2], embedding_dim=24)
    z = model(torch.rand(3, 1, 28, 28))
    assert z.shape == (3, 24) and 0 < z.min() and z.max() < 1
    assert output_dim(model, (1, 28, 28)) == 24
    with pytest.raises(ConfigError, match="do not fit 28x28"):
        create_model("koch", in_channels=1, image_size=28)
