"""The fast functional forward computes the module's own function, gradients and second-order
gradients included, and is used only for models it understands."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kshot.learners.functional import (BatchedMLPForward, FunctionalForward, SequentialForward, batched_forward,
                                       functional_forward, split_head, use_batch_statistics)
from kshot.models import create_model


# Tiny models: more threads only wait for each other (badly so on a shared machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv4(pool: str = "max", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("conv4", hidden=6, pool=pool, out_features=4, image_size=20,
                        track_running_stats=False).double()


def second_order(forward, params, x, y):
    """Gradient of the query loss after one differentiable inner step (a MAML meta-gradient)."""
    loss = F.cross_entropy(forward(params, x[:4]), y[:4])
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    fast = {n: p - 0.3 * g if g is not None else p for (n, p), g in zip(params.items(), grads)}
    query = F.cross_entropy(forward(fast, x[4:]), y[4:])
    return torch.autograd.grad(query, list(params.values()), allow_unused=True)


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_sequential_forward_matches_functional_call_to_second_order(pool):
    model = conv4(pool)
    fast, generic = functional_forward(model), functional_forward(model, fast=False)
    assert isinstance(fast, SequentialForward) and type(generic) is FunctionalForward
    # Every conv is followed by batch norm with batch statistics, so its bias is ignored.
    assert fast.unused == {f"{i}.0.bias" for i in range(4)}
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 20, 20, generator=g, dtype=torch.float64)
    y = torch.arange(10) % 4
    torch.testing.assert_close(fast(params, x), functional_call(model, params, (x,)), rtol=0, atol=1e-12)
    torch.testing.assert_close(fast(params, x), model(x), rtol=0, atol=1e-12)
    for a, b, name in zip(second_order(fast, params, x, y), second_order(generic, params, x, y), params):
        if name in fast.unused:
            assert a is None and b.abs().max() < 1e-12  # exactly zero, up to rounding
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_im2col_convolution_with_stride_and_padding_matches_conv2d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 2)).double()
    fast = functional_forward(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    out = fast(dict(model.named_parameters()), x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)


def test_models_it_does_not_know_use_functional_call():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * 2

    assert type(functional_forward(Custom())) is FunctionalForward
    with_dropout_free_rnn = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3))
    assert type(functional_forward(with_dropout_free_rnn)) is FunctionalForward
    running_stats = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # running stats: not batch-only
    assert type(functional_forward(running_stats)) is FunctionalForward


def test_use_batch_statistics_removes_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
    use_batch_statistics(model)
    assert dict(model.named_buffers()) == {}
    model.eval()  # even in eval mode, the current batch's statistics are used
    x = torch.randn(4, 1, 5, 5)
    z = model[0](x)
    expected = (z - z.mean((0, 2, 3), keepdim=True)) / torch.sqrt(z.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(model(x), expected.flatten(1), rtol=1e-4, atol=1e-5)


def test_batched_mlp_forward_computes_each_tasks_function():
    torch.manual_seed(0)
    model = create_model("mlp", in_features=1, hidden=(8, 8), out_features=1).double()
    batched = batched_forward(model)
    assert isinstance(batched, BatchedMLPForward)
    params = [{n: p + 0.1 * k for n, p in model.named_parameters()} for k in range(3)]
    stacked = {n: torch.stack([p[n] for p in params]) for n in params[0]}
    x = torch.randn(3, 5, 1, dtype=torch.float64)
    out = batched(stacked, x)
    for k in range(3):
        torch.testing.assert_close(out[k], functional_call(model, params[k], (x[k],)), rtol=0, atol=1e-12)
    assert batched_forward(conv4()) is None


def test_split_head_composes_to_the_model():
    model = conv4()
    body, head = split_head(model)
    params = dict(model.named_parameters())
    x = torch.randn(6, 1, 20, 20, dtype=torch.float64)
    torch.testing.assert_close(head(params, body(params, x)), model(x), rtol=0, atol=1e-12)
    assert split_head(nn.Linear(2, 2)) is None

