"""Reptile's meta-gradient is theta minus the mean of the tasks' SGD-adapted weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kshot.tasks.families import SinusoidTasks
from kshot.learners import Reptile
from kshot.models import create_model
from kshot.tasks import TaskSampler


# Tiny models: more threads only wait for each other (badly so on a shared machine). A vmap test
# that silently fell back to the loop would compare the loop with itself.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("error:.*cannot be batched over tasks with vmap")]


def sgd_by_hand(model, x, y, steps, lr, loss_fn):
    """Plain SGD on a copy of the module: the reference for Reptile's inner loop."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("mode", ["loop", "vmap", "batched"])
def test_reptile_gradient_is_theta_minus_mean_adapted_weights(mode):
    torch.manual_seed(0)
    model = create_model("mlp", in_features=1, hidden=(16, 16), out_features=1).double()
    reference_model = copy.deepcopy(model)
    tasks = [t for t in SinusoidTasks(5, 5, seed=1).meta_batch(0, range(3))]
    tasks = [type(t)(*(v.double() if v.is_floating_point() else v for v in
                       (t.support_x, t.support_y, t.query_x, t.query_y, t.classes))) for t in tasks]
    learner = Reptile(model, inner_steps=3, inner_lr=0.02, batch_tasks=mode, loss="mse")
    metrics = learner.meta_gradient(tasks)
    adapted = [sgd_by_hand(reference_model, torch.cat([t.support_x, t.query_x]),
                           torch.cat([t.support_y, t.query_y]), 3, 0.02, F.mse_loss) for t in tasks]
    for name, p in learner.model.named_parameters():
        expected = p.detach() - torch.stack([a[name].detach() for a in adapted]).mean(0)
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-12)
    assert metrics["loss_last_step"] < metrics["loss"]


def test_reptile_outer_step_moves_towards_the_adapted_weights(omniglot):
    # The trainer's SGD step with rate epsilon must land at theta + epsilon (mean(phi) - theta),
    # phi computed by plain SGD on a copy of the module: the wrong sign or scale fails. In float64:
    # in float32 on one thread, PyTorch's channels-last batch norm (kshot's fast path) sums the
    # batch statistics ~30x less accurately than its NCHW kernel, and two steps amplify that.
    torch.manual_seed(0)
    learner = Reptile(create_model("conv4", hidden=8, out_features=5, image_size=28).double(), inner_steps=2,
                      inner_lr=0.1)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    tasks = [type(t)(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes)
             for t in TaskSampler(omniglot("train"), 5, 1, 2, seed=0).meta_batch(0, [0, 1])]
    adapted = [sgd_by_hand(learner.model, torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y]),
                           2, 0.1, F.cross_entropy) for t in tasks]
    learner.meta_gradient(tasks)
    epsilon = 0.5
    torch.optim.SGD(learner.parameters(), lr=epsilon).step()
    for name, p in learner.model.named_parameters():
        phi = torch.stack([a[name].detach() for a in adapted]).mean(0)
        torch.testing.assert_close(p.detach(), before[name] + epsilon * (phi - before[name]), rtol=0, atol=1e-9)
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in learner.model.named_parameters())
    assert moved > 1e-3
    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(tasks[0].support_x, tasks[0].support_y)
    assert predictor.logits(tasks[0].query_x).shape == (10, 5)
