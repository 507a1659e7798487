"""Gaussian policies as pure functions of their parameters, batched over the tasks of a meta-batch.

The policy of Finn et al. 2017 (section 5.3): an MLP (two hidden layers of 100 ReLU units) maps
an observation to the mean of a Gaussian over actions; the log standard deviation is one learned
vector, independent of the state. Written as ``forward(params, obs) -> dist``, the same
functional form the rest of kshot's inner loop uses (:mod:`kshot.learners.functional`), with
parameters carrying a leading task dimension ``[B, ...]`` and observations ``[B, n, obs_dim]``,
so that one forward serves every task of a meta-batch, each with its own adapted parameters.

``dist`` is one tensor ``[B, n, 2 * act_dim]``: the mean, then the log standard deviation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kshot.errors import ConfigError
from kshot.learners.functional import Params, batched_forward

#: The name of the log standard deviation among a policy's parameters.
LOG_STD = "log_std"


class GaussianPolicyForward:
    """``forward(params, obs [B, n, d]) -> dist [B, n, 2a]`` for an MLP mean and ``params["log_std"]``.

    Args:
        mean_net: an MLP (a Sequential of Linear layers and activations) from observations to
            action means; its parameters are looked up in ``params`` by their own names.
    """

    unused: frozenset[str] = frozenset()

    def __init__(self, mean_net: nn.Module):
        forward = batched_forward(mean_net)
        if forward is None:
            raise ConfigError("a Gaussian policy's mean network must be an MLP (Linear layers and "
                              "activations); use --backbone mlp")
        self.mean = forward

    def __call__(self, params: Params, obs: torch.Tensor) -> torch.Tensor:
        mean = self.mean(params, obs)
        log_std = params[LOG_STD].unsqueeze(1).expand_as(mean)  # [B, a] -> [B, n, a]
        return torch.cat([mean, log_std], -1)


def split(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, log_std)`` of a ``dist`` tensor, each ``[..., a]``."""
    a = dist.shape[-1] // 2
    return dist[..., :a], dist[..., a:]


def log_prob(dist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-density of ``actions [..., a]`` under the diagonal Gaussians ``dist``: ``[...]``."""
    mean, log_std = split(dist)
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * z.pow(2).sum(-1) - log_std.sum(-1) - 0.5 * actions.shape[-1] * math.log(2 * math.pi)


def kl_divergence(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``KL(old || new)`` of diagonal Gaussians, ``[...]``."""
    mean_old, log_std_old = split(old)
    mean_new, log_std_new = split(new)
    var_old, var_new = torch.exp(2 * log_std_old), torch.exp(2 * log_std_new)
    return (log_std_new - log_std_old + (var_old + (mean_old - mean_new).pow(2)) / (2 * var_new) - 0.5).sum(-1)


def sample(dist: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Actions ``mean + std * noise`` for standard-normal ``noise`` of the same shape as the mean."""
    mean, log_std = split(dist)
    return mean + torch.exp(log_std) * noise
