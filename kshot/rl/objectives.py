"""Returns, advantages and the policy-gradient losses of the inner and outer loops.

* :func:`advantages`: discounted returns-to-go minus each task's fitted linear baseline
  (generalised advantage estimation with ``lambda``; ``lambda = 1`` is the paper's plain
  ``return - baseline``), normalised within each task.
* :func:`inner_loss`: REINFORCE's surrogate ``-mean(log pi(a|s) * A)``, whose gradient is the
  policy gradient on the task's own episodes: the inner loop's loss (in the form ``loss(outputs,
  targets)`` of :class:`kshot.learners.inner_loop.InnerLoop`).
* :func:`surrogate`, :func:`clipped_surrogate`, :func:`mean_kl`: the outer loop's objectives on
  the episodes of the adapted policies (TRPO's importance-weighted surrogate and KL constraint;
  PPO's clipped surrogate).

Each task's loss is its mean over the steps that happened; the inner loss sums the tasks'
losses, so that with parameters expanded over tasks each task's gradient is its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kshot.rl.baselines import fit_predict
from kshot.rl.policies import kl_divergence, log_prob
from kshot.rl.rollouts import Episodes


class Targets(NamedTuple):
    """What the policy's outputs are scored against, each task's steps in one row.

    Attributes:
        actions: ``[B, N, a]``; advantages, mask: ``[B, N]``; old_dist: the behaviour policy's
        distribution ``[B, N, 2a]`` (detached; importance weights and KL are relative to it).
    """

    actions: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old_dist: torch.Tensor


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """Returns-to-go ``sum_{t' >= t} discount^(t' - t) r_t'`` ``[B, K, H]``."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + discount * running * mask[..., t]
        out[..., t] = running * mask[..., t]
    return out


def advantages(episodes: Episodes, discount: float = 0.99, gae_lambda: float = 1.0,
               normalise: bool = True) -> torch.Tensor:
    """Advantages ``[B, K, H]`` against each task's linear-feature baseline (0 where no step)."""
    rewards, mask = episodes.rewards.double(), episodes.mask.double()
    returns = discounted_returns(rewards, mask, discount)
    values = fit_predict(episodes.obs.double(), returns, mask)
    if gae_lambda == 1.0:
        adv = returns - values
    else:
        next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], -1)
        deltas = (rewards + discount * next_values - values) * mask
        adv = discounted_returns(deltas, mask, discount * gae_lambda)
    adv = adv * mask
    if normalise:
        n = mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = adv.sum((1, 2), keepdim=True) / n
        std = (((adv - mean) * mask).pow(2).sum((1, 2), keepdim=True) / n).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv.float()


def targets(episodes: Episodes, discount: float = 0.99, gae_lambda: float = 1.0) -> Targets:
    """The :class:`Targets` of a batch of episodes (advantages fitted without gradient)."""
    with torch.no_grad():
        adv = advantages(episodes, discount, gae_lambda)
    return Targets(episodes.flat(episodes.actions), episodes.flat(adv), episodes.flat(episodes.mask),
                   episodes.flat(episodes.dist))


def _task_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def inner_loss(dist: torch.Tensor, y: Targets) -> torch.Tensor:
    """REINFORCE's surrogate, summed over tasks: ``sum_b mean_t -log pi(a_t|s_t) A_t``."""
    return _task_mean(-log_prob(dist, y.actions) * y.advantages, y.mask).sum()


def surrogate(dist: torch.Tensor, y: Targets) -> torch.Tensor:
    """Each task's importance-weighted surrogate loss ``-mean(pi / pi_old * A)`` ``[B]``."""
    ratio = torch.exp(log_prob(dist, y.actions) - log_prob(y.old_dist, y.actions))
    return _task_mean(-ratio * y.advantages, y.mask)


def clipped_surrogate(dist: torch.Tensor, y: Targets, clip: float) -> torch.Tensor:
    """Each task's clipped surrogate loss (Schulman et al. 2017) ``[B]``."""
    ratio = torch.exp(log_prob(dist, y.actions) - log_prob(y.old_dist, y.actions))
    loss = -torch.min(ratio * y.advantages, ratio.clamp(1 - clip, 1 + clip) * y.advantages)
    return _task_mean(loss, y.mask)


def mean_kl(dist: torch.Tensor, y: Targets) -> torch.Tensor:
    """Each task's mean ``KL(pi_old || pi)`` over its steps ``[B]``."""
    return _task_mean(kl_divergence(y.old_dist, dist), y.mask)
