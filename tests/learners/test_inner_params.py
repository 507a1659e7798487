"""Adapting a named subset of parameters (``inner_params``): only those move in the inner loop,
the others still get their meta-gradient, held to a hand-unrolled autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kshot.errors import ConfigError
from kshot.learners import MAML, MetaSGD, create_learner
from kshot.models import create_model


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.decision = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.decision(torch.tanh(self.body(x)))


def reference(model: TwoPart, sx, sy, qx, qy, steps: int, lr: float):
    """Query loss after ``steps`` SGD steps of the decision parameters only, unrolled by hand."""
    params = dict(model.named_parameters())
    fast = {n: p for n, p in params.items() if n.startswith("decision.")}
    for _ in range(steps):
        loss = F.mse_loss(torch.func.functional_call(model, {**params, **fast}, (sx,)), sy)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    return F.mse_loss(torch.func.functional_call(model, {**params, **fast}, (qx,)), qy), fast


def test_only_the_named_parameters_adapt_and_the_rest_get_meta_gradients():
    torch.manual_seed(0)
    model = TwoPart()
    sx, sy, qx, qy = torch.randn(6, 3), torch.randn(6, 1), torch.randn(9, 3), torch.randn(9, 1)
    learner = MAML(model, inner_steps=3, inner_lr=0.1, loss="mse", inner_params="decision")
    assert learner.adapted_names == ("decision.0.weight", "decision.0.bias", "decision.2.weight", "decision.2.bias")
    with torch.no_grad():
        adapted = learner.adapt(sx, sy)
    ref_loss, ref_fast = reference(model, sx, sy, qx, qy, 3, 0.1)
    for name, p in model.named_parameters():
        if name.startswith("decision."):
            assert torch.allclose(adapted.params[name], ref_fast[name], atol=1e-6)
            assert not torch.allclose(adapted.params[name], p)
        else:
            assert torch.equal(adapted.params[name], p)
    # meta-gradient through the steps, of every parameter (the body's too), as unrolled by hand
    expected = torch.autograd.grad(ref_loss, list(model.parameters()))
    model.zero_grad()
    task = type("T", (), {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy, "ways": 0})
    learner.meta_gradient([task])
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-5), name
    assert model.body.weight.grad.abs().sum() > 0


def test_inner_params_round_trip_and_bad_names():
    learner = MetaSGD(create_model("mlp", in_features=1, hidden=[8, 8], out_features=1), loss="mse",
                      inner_lr=0.05, inner_params=["5", "3.bias"])
    assert learner.adapted_names == ("3.bias", "5.weight", "5.bias")
    assert len(learner.inner_lrs) == 3  # learned rates for the adapted parameters only
    options = learner.options()
    assert options["inner_params"] == ["5", "3.bias"]
    rebuilt = create_learner("metasgd", create_model("mlp", in_features=1, hidden=[8, 8], out_features=1), **options)
    assert rebuilt.adapted_names == learner.adapted_names
    assert "inner_params" not in MAML(TwoPart(), loss="mse").options()  # unset: old checkpoints unchanged
    with pytest.raises(ConfigError, match="inner_params 'decoder' names no parameter of TwoPart; .*body, decision"):
        MAML(TwoPart(), loss="mse", inner_params="decoder")
