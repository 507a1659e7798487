"""MAML++'s options of the one inner loop (Antoniou, Edwards and Storkey 2019): the multi-step
loss weights, per-step learning rates and batch-norm weights, per-step running statistics and
derivative-order annealing, each held to its definition or to a reference written by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kshot.learners import FOMAML, MAML
from kshot.learners.maml import multi_step_loss_weights
from kshot.tasks import Task

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("error:.*cannot be batched over tasks with vmap")]

EPS = 1e-5  # nn.BatchNorm2d's


def tiny_cnn(seed: int = 0, conv_bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(2, track_running_stats=False),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()


def tasks_of(n: int, seed: int = 1, shots: int = 2, queries: int = 3) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3)
    return [Task(torch.randn(3 * shots, 1, 4, 4, generator=g, dtype=torch.float64), labels.repeat_interleave(shots),
                 torch.randn(3 * queries, 1, 4, 4, generator=g, dtype=torch.float64),
                 labels.repeat_interleave(queries), labels) for _ in range(n)]


# ----------------------------------------------------------------------------- multi-step loss
def paper_weights(steps: int, epoch: int, msl_epochs: int) -> np.ndarray:
    """Antoniou et al.'s per-step loss importance at an epoch, as their code computes it."""
    w = np.ones(steps) / steps
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        w[i] = max(w[i] - epoch * decay, floor)
    w[-1] = min(w[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


@pytest.mark.parametrize("steps", [2, 5])
def test_multi_step_loss_weights_sum_to_one_and_anneal_to_the_last_step(steps):
    assert multi_step_loss_weights(steps, 0.0) == pytest.approx([1 / steps] * steps)
    final = multi_step_loss_weights(steps, 1.0)
    assert final[:-1] == pytest.approx([0.03 / steps] * (steps - 1)) and final[-1] == pytest.approx(1 - 0.03 * (steps - 1) / steps)
    previous = None
    for epoch in range(11):
        w = np.array(multi_step_loss_weights(steps, epoch / 10))
        np.testing.assert_allclose(w, paper_weights(steps, epoch, 10), rtol=0, atol=1e-12)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        if previous is not None:
            assert (w[:-1] <= previous[:-1]).all() and w[-1] >= previous[-1]
        previous = w


def test_the_learner_follows_the_schedule_of_the_trainers_step():
    learner = MAML(tiny_cnn(), inner_steps=5, multi_step_loss=100)
    learner.set_training_step(0)
    assert learner.step_weights() == pytest.approx([0.2] * 5)
    learner.set_training_step(50)
    assert learner.step_weights() == pytest.approx(multi_step_loss_weights(5, 0.5))
    learner.set_training_step(100)
    assert learner.step_weights() is None  # then the last step's loss alone
    learner.set_training_step(10)
    learner.eval()
    assert learner.step_weights() is None  # evaluation scores the last step
    assert MAML(tiny_cnn(), inner_steps=5).step_weights() is None


# ----------------------------------------------------------------------------- per-step batch norm
def test_per_step_batch_norm_parameters_are_used_at_the_step_they_belong_to():
    # With the batch-norm scale at 0, the normalised activations are the step's bias c_k
    # everywhere, so after ReLU, pooling and flattening the features are c_k * ones(8) and the
    # scores after k steps are c_k * W_k.sum(1) + b_k: a different, known value at every step.
    learner = MAML(tiny_cnn(), inner_steps=2, inner_lr=0.3, test_inner_steps=3, per_step_bn=True)
    c = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)  # sets 0, 1, 2 = S
    with torch.no_grad():
        learner.step_bn["1__weight"].zero_()
        learner.step_bn["1__bias"].copy_(c[:, None].expand(3, 2))
    assert set(learner.adapted_names) == {"0.weight", "0.bias", "5.weight", "5.bias"}  # not batch norm's
    task = tasks_of(1)[0]
    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(task.support_x, task.support_y)
    for k in range(4):
        theta = predictor.trajectory[k]
        ck = c[min(k, 2)]  # steps beyond training's S use set S
        expected = ck * theta["5.weight"].sum(1) + theta["5.bias"]
        torch.testing.assert_close(predictor.at_step(k, task.query_x), expected.expand(9, 3), rtol=0, atol=1e-12)
        if k < 3:  # step k's support gradient is taken with set k: dL/dW = (p - onehot)^T c_k 1 / n
            p = torch.softmax(ck * theta["5.weight"].sum(1) + theta["5.bias"], -1).expand(6, 3)
            grad_w = ((p - F.one_hot(task.support_y, 3)).T @ torch.full((6, 8), float(ck), dtype=torch.float64)) / 6
            step = predictor.trajectory[k + 1]["5.weight"] - theta["5.weight"]
            torch.testing.assert_close(step, -0.3 * grad_w, rtol=0, atol=1e-12)


def hand_written_forward(p: dict, bn_weight, bn_bias, x, stats=None):
    """The tiny CNN by hand: conv, batch norm (the batch's statistics, or given ones), ReLU,
    2x2 max-pool, linear. Returns the scores and the statistics used."""
    h = F.conv2d(x, p["0.weight"], p.get("0.bias"), padding=1)
    if stats is None:
        stats = (h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False))
    mean, var = stats
    h = (h - mean[None, :, None, None]) / torch.sqrt(var + EPS)[None, :, None, None]
    h = h * bn_weight[None, :, None, None] + bn_bias[None, :, None, None]
    h = F.max_pool2d(F.relu(h), 2).flatten(1)
    return h @ p["5.weight"].T + p["5.bias"], stats


@pytest.mark.parametrize("transductive", [True, False])
def test_mamlpp_meta_gradient_equals_an_unrolled_reference(transductive):
    steps, lr0 = 2, 0.3
    learner = MAML(tiny_cnn(conv_bias=False), inner_steps=steps, inner_lr=lr0, multi_step_loss=10, per_step_lr=True,
                   per_step_bn=True, transductive=transductive, batch_tasks="loop")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct values per step, so that a wrong index shows
        for table in list(learner.step_bn.values()) + list(learner.step_lrs.values()):
            table.add_(0.2 * torch.rand(table.shape, generator=g, dtype=table.dtype))
    learner.set_training_step(4)
    weights = multi_step_loss_weights(steps, 0.4)
    tasks = tasks_of(2)

    # The reference: leaves for every meta-parameter, steps written out, second order.
    theta = {n: p.detach().clone().requires_grad_() for n, p in learner.model.named_parameters() if not n.startswith("1.")}
    bn_w = learner.step_bn["1__weight"].detach().clone().requires_grad_()
    bn_b = learner.step_bn["1__bias"].detach().clone().requires_grad_()
    rates = {n: learner.step_lrs[n.replace(".", "__")].detach().clone().requires_grad_() for n in theta}
    total = 0
    for task in tasks:
        p = dict(theta)
        for k in range(steps):
            scores, _ = hand_written_forward(p, bn_w[k], bn_b[k], task.support_x)
            grads = torch.autograd.grad(F.cross_entropy(scores, task.support_y), list(p.values()), create_graph=True)
            p = {n: v - rates[n][k] * gv for (n, v), gv in zip(p.items(), grads)}
            stats = None if transductive else hand_written_forward(p, bn_w[k + 1], bn_b[k + 1], task.support_x)[1]
            query, _ = hand_written_forward(p, bn_w[k + 1], bn_b[k + 1], task.query_x, stats)
            total = total + weights[k] * F.cross_entropy(query, task.query_y)
    (total / len(tasks)).backward()

    metrics = learner.meta_gradient(tasks)
    assert metrics["multi_step_loss"] == pytest.approx(total.item() / len(tasks), rel=1e-12)
    own = dict(learner.model.named_parameters())
    for n, leaf in theta.items():
        torch.testing.assert_close(own[n].grad, leaf.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(learner.step_lrs[n.replace(".", "__")].grad, rates[n].grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(learner.step_bn["1__weight"].grad, bn_w.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(learner.step_bn["1__bias"].grad, bn_b.grad, rtol=0, atol=1e-10)
    assert own["1.weight"].grad.abs().max() == 0  # the model's own batch-norm weights are unused
    assert float(bn_w.grad[0].abs().max()) > 1e-4 and float(rates["5.weight"].grad.abs().min()) > 1e-6


@pytest.mark.parametrize("head_init", ["learned", "prototypes"])
def test_mamlpp_options_give_the_same_numbers_batched_with_vmap(head_init):
    tasks = tasks_of(3)
    grads = {}
    for mode in ("loop", "vmap"):
        learner = MAML(tiny_cnn(), inner_steps=2, inner_lr=0.3, multi_step_loss=10, per_step_lr=True,
                       per_step_bn=True, head_init=head_init, batch_tasks=mode)
        learner.set_training_step(3)
        learner.meta_gradient(tasks)
        grads[mode] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    torch.testing.assert_close(grads["vmap"], grads["loop"], rtol=0, atol=1e-10)


def test_derivative_order_annealing_is_first_order_then_second_order():
    tasks = tasks_of(2)

    def gradient(learner, step):
        learner.zero_grad(set_to_none=True)
        learner.set_training_step(step)
        learner.meta_gradient(tasks)
        return torch.cat([p.grad.flatten() for p in learner.parameters()])

    annealed = MAML(tiny_cnn(), inner_steps=2, inner_lr=0.3, second_order_after=3, transductive=True)
    first = gradient(FOMAML(tiny_cnn(), inner_steps=2, inner_lr=0.3, transductive=True), 0)
    second = gradient(MAML(tiny_cnn(), inner_steps=2, inner_lr=0.3, transductive=True), 0)
    assert (first - second).abs().max() > 1e-4
    torch.testing.assert_close(gradient(annealed, 2), first, rtol=0, atol=1e-12)
    torch.testing.assert_close(gradient(annealed, 3), second, rtol=0, atol=1e-12)


def test_per_step_running_statistics_are_gathered_in_training_and_normalise_queries_at_test():
    learner = MAML(tiny_cnn(conv_bias=False), inner_steps=2, inner_lr=0.3, per_step_bn_stats=True)
    task = tasks_of(1)[0]
    theta0 = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.meta_gradient([task])
    mean, var = learner.step_statistics.__getattr__("1__mean"), learner.step_statistics.__getattr__("1__var")
    h = F.conv2d(task.support_x, theta0["0.weight"], padding=1)  # the support pass of step 0
    n = h.numel() // 2
    torch.testing.assert_close(mean[0], 0.1 * h.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(var[0], 0.9 + 0.1 * h.var((0, 2, 3), unbiased=False) * n / (n - 1), rtol=0, atol=1e-12)
    assert (mean[1:] != 0).all()  # the later steps' batches were seen too

    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(task.support_x, task.support_y)
        theta = predictor.trajectory[-1]
        h = F.conv2d(task.query_x, theta["0.weight"], padding=1)
        h = (h - mean[2][None, :, None, None]) / torch.sqrt(var[2] + EPS)[None, :, None, None]
        h = h * theta["1.weight"][None, :, None, None] + theta["1.bias"][None, :, None, None]
        expected = F.max_pool2d(F.relu(h), 2).flatten(1) @ theta["5.weight"].T + theta["5.bias"]
        torch.testing.assert_close(predictor.logits(task.query_x), expected, rtol=0, atol=1e-12)
        # each query alone, whatever its neighbours
        torch.testing.assert_close(predictor.logits(task.query_x[:1]), expected[:1], rtol=0, atol=1e-12)
    with pytest.raises(Exception, match="per-step running statistics"):
        MAML(tiny_cnn(), per_step_bn_stats=True, batch_tasks="vmap").meta_gradient(tasks_of(2))


def test_mamlpp_options_survive_a_checkpoint(tmp_path):
    from kshot.runs.build import load_learner
    from kshot.models import create_model
    from kshot.services.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("conv4", hidden=4, out_features=5, image_size=28)
    learner = MAML(model, inner_steps=2, multi_step_loss=7, per_step_lr=True, per_step_bn=True,
                   per_step_bn_stats=True, second_order_after=3, head_init="prototypes")
    with torch.no_grad():
        learner.step_lrs["5__weight"].fill_(0.123)
    loaded = load_learner(save_checkpoint(tmp_path / "c.safetensors", learner))
    assert loaded.options() == learner.options() and not loaded.transductive
    assert math.isclose(float(loaded.step_lrs["5__weight"][1]), 0.123, rel_tol=1e-6)
    assert set(dict(loaded.named_buffers())) == set(dict(learner.named_buffers()))
