"""Batched rollouts: every episode of every task of a meta-batch steps together.

Meta-RL time goes to stepping environments and to the Python around each step, so the episodes
of all ``B`` tasks (``K`` each) run as one vectorised environment of ``B * K`` copies, and each
time step makes one policy forward for all of them, every task with its own parameters
(``params`` carry a leading task dimension ``[B, ...]``). The random draws of task ``b`` (its
action noise, its environments' reset seeds) come from ``tasks[b].rng(phase)``, so a rollout is
a function of the tasks' keys, the phase and the parameters, whatever else is in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from kshot.errors import ConfigError
from kshot.learners.functional import Params
from kshot.rl.families import EnvTask
from kshot.rl.policies import sample


@dataclass
class Episodes:
    """``K`` episodes of each of ``B`` tasks, ``H`` steps at most.

    Attributes:
        obs: observations ``[B, K, H, obs_dim]`` (zeros after an episode ended).
        actions: actions drawn ``[B, K, H, act_dim]``.
        rewards: rewards ``[B, K, H]``.
        mask: 1 where a step happened ``[B, K, H]``.
        dist: the behaviour policy's distribution at each step ``[B, K, H, 2 act_dim]`` (detached).
        seconds: wall time of the rollout.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    dist: torch.Tensor
    seconds: float = 0.0

    @property
    def env_steps(self) -> int:
        return int(self.mask.sum().item())

    def returns(self) -> torch.Tensor:
        """Each task's mean undiscounted episode return ``[B]``."""
        return (self.rewards * self.mask).sum(-1).mean(-1)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K, H, ...]`` -> ``[B, K * H, ...]``: each task's steps in one row."""
        return x.reshape(x.shape[0], -1, *x.shape[3:])


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal draws from uniform doubles (Box-Muller): a stream NumPy keeps stable."""
    u = rng.random((2, *shape))
    return np.sqrt(-2.0 * np.log1p(-u[0])) * np.cos(2.0 * np.pi * u[1])


@torch.no_grad()
def rollout(forward: Callable[[Params, torch.Tensor], torch.Tensor], params: Params, tasks: Sequence[EnvTask],
            episodes: int, phase: int = 0) -> Episodes:
    """Run ``episodes`` episodes of each task, all at once, with each task's own parameters.

    Args:
        forward: ``forward(params, obs [B, n, d]) -> dist [B, n, 2a]``.
        params: parameters with a leading task dimension ``[B, ...]`` (row ``b`` acts in task ``b``).
        tasks: the ``B`` tasks, all of one family.
        episodes: ``K``, episodes per task.
        phase: which rollout of these tasks this is (the seed of its random draws).

    Returns:
        The :class:`Episodes`.
    """
    start = time.perf_counter()
    family = tasks[0].family
    if any(t.family.name != family.name for t in tasks):
        raise ConfigError("the tasks of one rollout must come from one environment family")
    b, k, h = len(tasks), int(episodes), family.horizon
    d, a = family.observation_dim, family.action_dim
    env = family.vector_env(b * k)
    env.set_tasks([t.params for t in tasks for _ in range(k)])
    noises, seeds = [], []
    for t in tasks:
        rng = t.rng(phase)
        noises.append(standard_normal(rng, (h, k, a)))
        seeds.append((rng.random(k) * 2**31).astype(np.int64))
    device = next(iter(params.values())).device  # the policy's; environments step on the CPU
    noise = torch.from_numpy(np.stack(noises, 1).astype(np.float32)).to(device)  # [H, B, K, a]
    obs_t = torch.from_numpy(np.asarray(env.reset(np.concatenate(seeds)), dtype=np.float32)).to(device)
    obs = torch.zeros(h, b, k, d, device=device)
    actions = torch.zeros(h, b, k, a, device=device)
    dists = torch.zeros(h, b, k, 2 * a, device=device)
    rewards = torch.zeros(h, b, k, device=device)
    mask = torch.zeros(h, b, k, device=device)
    alive = torch.ones(b, k, device=device)
    for t in range(h):
        obs[t] = obs_t.view(b, k, d) * alive.unsqueeze(-1)
        dist = forward(params, obs[t])
        action = sample(dist, noise[t])
        dists[t], actions[t], mask[t] = dist, action, alive
        next_obs, reward, done = env.step(action.reshape(b * k, a).cpu().numpy())
        rewards[t] = torch.from_numpy(np.asarray(reward, dtype=np.float32)).to(device).view(b, k) * alive
        alive = alive * torch.from_numpy(~np.asarray(done)).to(device).view(b, k).float()
        obs_t = torch.from_numpy(np.asarray(next_obs, dtype=np.float32)).to(device)
        if not alive.any():
            break
    order = (1, 2, 0)  # [H, B, K] -> [B, K, H]
    return Episodes(obs=obs.permute(*order, 3).contiguous(), actions=actions.permute(*order, 3).contiguous(),
                    rewards=rewards.permute(*order).contiguous(), mask=mask.permute(*order).contiguous(),
                    dist=dists.permute(*order, 3).contiguous(), seconds=time.perf_counter() - start)
