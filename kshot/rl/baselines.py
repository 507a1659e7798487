"""The linear-feature baseline of rllab (Duan et al. 2016), which Finn et al. 2017 fit per task.

Each task's returns are regressed, by ridge regression on that task's own episodes, on features
of the observation and the time step: ``[o, o^2, t, t^2, t^3, 1]`` with ``o`` clipped to
[-10, 10] and ``t`` the step divided by 100. The fitted values are subtracted from the returns
to form advantages. All tasks of a meta-batch are fitted at once (a batched linear solve).
"""

from __future__ import annotations

import torch


def features(obs: torch.Tensor) -> torch.Tensor:
    """Features ``[B, K, H, 2d + 4]`` of observations ``[B, K, H, d]`` (``H`` steps per episode)."""
    o = obs.clamp(-10, 10)
    t = (torch.arange(obs.shape[2], dtype=obs.dtype, device=obs.device) / 100.0).view(1, 1, -1, 1)
    t = t.expand(*obs.shape[:3], 1)
    return torch.cat([o, o * o, t, t * t, t ** 3, torch.ones_like(t)], -1)


def fit_predict(obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reg: float = 1e-5) -> torch.Tensor:
    """Fit one linear baseline per task to its returns and give its values on the same steps.

    Args:
        obs: observations ``[B, K, H, d]`` of ``K`` episodes of each of ``B`` tasks.
        returns: discounted returns-to-go ``[B, K, H]``.
        mask: 1 where a step happened, 0 after an episode ended ``[B, K, H]``.
        reg: ridge coefficient; multiplied by 10 (up to 5 times) while the solve is not finite.

    Returns:
        Baseline values ``[B, K, H]`` (0 where ``mask`` is 0).
    """
    x = features(obs.double()) * mask.double().unsqueeze(-1)
    b, f = x.shape[0], x.shape[-1]
    x = x.reshape(b, -1, f)
    y = (returns.double() * mask.double()).reshape(b, -1, 1)
    xtx, xty = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(f, dtype=x.dtype, device=x.device)
    weights = torch.zeros(b, f, 1, dtype=x.dtype, device=x.device)
    for _ in range(6):
        try:
            weights = torch.linalg.solve(xtx + reg * eye, xty)
        except RuntimeError:  # singular even with the ridge term
            weights = torch.full_like(weights, float("nan"))
        if torch.isfinite(weights).all():
            break
        reg *= 10
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    return (x @ weights).reshape(returns.shape).to(returns.dtype)
