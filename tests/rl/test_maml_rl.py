"""MAML for policies: the baseline, the inner step, the meta-gradient against an unrolled
reference, TRPO's Hessian products and step, batched rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from kshot.models import create_model
from kshot.rl import MAMLRL, env_family, rollout
from kshot.rl.baselines import features, fit_predict
from kshot.rl.objectives import discounted_returns, inner_loss, targets
from kshot.rl.optim import conjugate_gradient, flat, kl_hessian, trpo_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_learner(seed: int = 0, **options) -> MAMLRL:
    torch.manual_seed(seed)
    model = create_model("mlp", in_features=2, hidden=[8], out_features=2)
    return MAMLRL(model, **{"episodes_per_task": 4, "inner_lr": 0.5, "init_std": 0.5, **options})


def tiny_batch(n_tasks: int = 3, horizon: int = 12):
    return env_family("nav2d", seed=1, meta_batch_size=n_tasks, horizon=horizon).meta_batch(0)


def test_linear_baseline_is_each_tasks_ridge_regression():
    torch.manual_seed(0)
    obs, returns = torch.randn(3, 4, 6, 2), torch.randn(3, 4, 6)
    mask = torch.ones(3, 4, 6)
    mask[1, 2, 4:] = 0  # an episode that ended early
    values = fit_predict(obs, returns, mask, reg=1e-5)
    for b in range(3):
        keep = mask[b].bool()
        x = features(obs[b:b + 1].double())[0][keep].numpy()
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ returns[b][keep].double().numpy())
        assert np.allclose(values[b][keep].numpy(), x @ w, atol=1e-4)
    assert (values[1, 2, 4:] == 0).all()


def test_discounted_returns_stop_at_the_end_of_an_episode():
    rewards = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    assert torch.allclose(discounted_returns(rewards, mask, 0.5), torch.tensor([[[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0]]]))


def test_rollouts_are_seeded_per_task_whatever_else_is_in_the_batch():
    learner = tiny_learner()
    tasks = tiny_batch(3)
    params = learner.batched_parameters(3, detach=True)
    whole = rollout(learner.forward, params, tasks, 4)
    alone = rollout(learner.forward, learner.batched_parameters(1, detach=True), tasks[2:], 4)
    assert torch.equal(whole.actions[2], alone.actions[0]) and torch.equal(whole.rewards[2], alone.rewards[0])
    assert torch.equal(rollout(learner.forward, params, tasks, 4).obs, whole.obs)
    assert not torch.equal(rollout(learner.forward, params, tasks, 4, phase=1).actions, whole.actions)
    assert whole.env_steps == int(whole.mask.sum()) > 0


def test_the_inner_policy_gradient_step_lowers_the_surrogate_on_its_own_episodes():
    learner = tiny_learner(inner_lr=0.05)
    tasks = tiny_batch(4, horizon=20)
    params = learner.batched_parameters(4, detach=True)
    episodes = rollout(learner.forward, params, tasks, 8)
    y = targets(episodes)
    obs = episodes.flat(episodes.obs)
    start = {n: p.detach().requires_grad_() for n, p in params.items()}
    adapted, _ = learner.inner_step(start, episodes, create_graph=False, y=y)
    for b in range(4):  # each task's own loss goes down
        row = lambda p: {n: v[b:b + 1].detach() for n, v in p.items()}  # noqa: E731
        one = type(y)(*(f[b:b + 1] for f in y))
        before = inner_loss(learner.forward(row(start), obs[b:b + 1]), one)
        after = inner_loss(learner.forward(row(adapted), obs[b:b + 1]), one)
        assert after < before


def reference_meta_loss(learner: MAMLRL, pre, post, first_order: bool) -> torch.Tensor:
    """The meta-objective written out, task by task, with torch.distributions and functional_call."""
    y_pre, y_post = targets(pre), targets(post)
    names = [n for n, _ in learner.model.named_parameters()]
    theta = dict(learner.model.named_parameters())
    losses = []
    for b in range(pre.obs.shape[0]):
        def log_prob(weights, log_std, obs, actions):
            mean = functional_call(learner.model, weights, (obs,))
            return torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)

        mask, adv = y_pre.mask[b], y_pre.advantages[b]
        lp = log_prob(theta, learner.log_std, pre.flat(pre.obs)[b], y_pre.actions[b])
        inner = -(lp * adv * mask).sum() / mask.sum()
        grads = torch.autograd.grad(inner, [theta[n] for n in names] + [learner.log_std], create_graph=not first_order)
        if first_order:
            grads = [g.detach() for g in grads]
        fast = {n: theta[n] - learner.inner_lr * g for n, g in zip(names, grads)}
        fast_log_std = learner.log_std - learner.inner_lr * grads[-1]
        mask, adv = y_post.mask[b], y_post.advantages[b]
        new = log_prob(fast, fast_log_std, post.flat(post.obs)[b], y_post.actions[b])
        mean_old, log_std_old = y_post.old_dist[b].chunk(2, -1)
        old = torch.distributions.Normal(mean_old, log_std_old.exp()).log_prob(y_post.actions[b]).sum(-1)
        losses.append(-(torch.exp(new - old) * adv * mask).sum() / mask.sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_an_unrolled_autograd_reference(first_order):
    learner = tiny_learner(first_order=first_order)
    tasks = tiny_batch(3)
    learner.zero_grad()
    metrics = learner.meta_gradient(tasks)
    got = [p.grad.clone() for p in learner.parameters()]
    pre, post = learner.collect(tasks)  # the same episodes again: rollouts are seeded by the tasks
    learner.zero_grad()
    reference_meta_loss(learner, pre[0], post, first_order).backward()
    want = [p.grad.clone() for p in learner.parameters()]
    assert math.isclose(metrics["return_post"], float(post.returns().mean()), rel_tol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()
    assert any(g.abs().sum() > 0 for g in got)
    if not first_order:  # the second-order term is there, and not negligible
        learner.zero_grad()
        reference_meta_loss(learner, pre[0], post, True).backward()
        assert max((g - p.grad).abs().max() for g, p in zip(got, learner.parameters())) > 1e-5


@pytest.mark.parametrize("first_order, inner_steps", [(False, 1), (True, 1), (False, 2)])
def test_factored_kl_hessian_equals_differentiating_the_kl_twice_through_the_inner_steps(first_order, inner_steps):
    learner = tiny_learner(first_order=first_order, inner_steps=inner_steps)
    pre, post = learner.collect(tiny_batch(3))
    params = list(learner.meta_parameters().values())  # the order kl_hessian flattens them in
    _, kl, _ = learner.meta_objective(pre, post)
    full = kl_hessian(params, kl)
    factored = learner.kl_hessian(pre, post)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    want, got = full(v), factored(v)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), ((got - want).abs().max(), want.abs().max())
    thin = learner.kl_hessian(pre, post, subsample=2)(v)  # an approximation of the same metric
    assert torch.nn.functional.cosine_similarity(thin, want, dim=0) > 0.9


def test_conjugate_gradient_solves_a_positive_definite_system():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(conjugate_gradient(lambda v: h @ v, b, iterations=20), torch.linalg.solve(h, b), atol=1e-8)


def test_trpo_step_improves_the_surrogate_within_the_trust_region():
    learner = tiny_learner()
    pre, post = learner.collect(tiny_batch(3))
    before = [p.detach().clone() for p in learner.parameters()]

    def loss_and_kl(differentiable):
        loss, kl, _ = learner.meta_objective(pre, post, differentiable)
        return loss, kl

    step = trpo_step(list(learner.meta_parameters().values()), loss_and_kl, max_kl=0.01, hessian=lambda: learner.kl_hessian(pre, post))
    loss, kl = loss_and_kl(False)
    assert step.accepted and float(loss) < step.loss_before and 0 < float(kl) <= 0.01
    assert math.isclose(float(loss), step.loss_after, rel_tol=1e-5)
    assert flat([p - b for p, b in zip(learner.parameters(), before)]).norm() > 0
