"""Conv4's fast forward computes exactly the function of its layers, run one after another.

Gradients are compared in float64: Omniglot's binary drawings give max-pool windows of exactly
equal values, and in float32 the two layouts' rounding breaks such ties differently (both are
valid subgradients of the same function; in float64 they coincide).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kshot.models import create_model, im2col_conv2d


def layer_by_layer(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The independent reference: nn.Sequential's own forward, NCHW, layers in their order."""
    return nn.Sequential.forward(model, x)


@pytest.mark.parametrize("kwargs", [dict(), dict(pool="stride", out_features=5, image_size=28,
                                                  track_running_stats=False),
                                    dict(in_channels=3, hidden=32, out_features=4, image_size=28)])
def test_fast_forward_equals_layer_by_layer(omniglot, kwargs):
    data = omniglot("test")
    x = data.load(list(range(0, 400, 40)))  # 10 real drawings of different characters
    if kwargs.get("in_channels") == 3:
        x = torch.cat([x, 1 - x, x.flip(-1)], 1)
    torch.manual_seed(0)
    model = create_model("conv4", **kwargs)
    reference = create_model("conv4", **kwargs)
    reference.load_state_dict(model.state_dict())
    for training in (False, True):  # float32; eval mode uses the running statistics
        model.train(training), reference.train(training)
        torch.testing.assert_close(model(x), layer_by_layer(reference, x), rtol=1e-3, atol=1e-3)
    model, reference, x = model.double(), reference.double(), x.double()
    reference.load_state_dict(model.state_dict())  # the same running statistics again

    out = model(x)
    expected = layer_by_layer(reference, x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)
    # batch norm's running statistics are updated alike
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10, msg=name)


def test_im2col_convolution_against_the_convolution_kernel():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 11, 9)
    weight, bias = torch.randn(7, 2, 3, 3), torch.randn(7)
    for stride, padding in ((1, 1), (2, 0), ((2, 1), (1, 2))):
        expected = torch.nn.functional.conv2d(x, weight, bias, stride, padding)
        torch.testing.assert_close(im2col_conv2d(x, weight, bias, stride, padding, 1), expected,
                                   rtol=1e-5, atol=1e-5)
