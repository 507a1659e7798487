"""How an inner step turns a task's gradients into new parameters.

The inner loop (:mod:`kshot.learners.inner_loop`) is written functionally, so its optimiser is
too: a pure function of the parameters, the gradients, the step's rate and a state that starts
fresh on every task, with no in-place update. That keeps every rule differentiable (a
second-order meta-gradient flows through Adam's steps as through SGD's) and composable with
``torch.func.vmap``.

* ``sgd``: ``theta <- theta - alpha * g`` (MAML and its family).
* ``adam``: Kingma and Ba's Adam with bias correction, ``theta <- theta - alpha * m_hat /
  (sqrt(v_hat) + eps)``. Nichol et al.'s Reptile adapts with Adam, ``beta1 = 0``: step ``k``
  (from 0) moves a weight by at most ``alpha * sqrt(k + 1)`` (the first by ``alpha`` exactly)
  whatever the gradient's scale, where a full SGD step can overshoot. A weight whose gradient is
  zero up to rounding (a convolution's bias under batch norm) moves as much, by noise.
  Their code carries Adam's moments from task to task; here each task starts from zero moments,
  so an adaptation depends on its task alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from kshot.errors import ConfigError

Params = dict[str, torch.Tensor]
Rates = Union[float, Params]

INNER_OPTIMIZERS = ("sgd", "adam")
#: Added under Adam's square root so that its derivative stays finite where a gradient is exactly
#: zero (second order); far below ``eps``, it changes no step.
_EPS_ROOT = 1e-30


def _rate(rate: Rates, name: str):
    return rate[name] if isinstance(rate, dict) else rate


@dataclass(frozen=True)
class InnerSGD:
    """Plain gradient steps; no state."""

    name = "sgd"

    def init(self, grads: Params) -> dict:
        return {}

    def step(self, params: Params, grads: Params, rate: Rates, k: int, state: dict) -> tuple[Params, dict]:
        out = dict(params)
        for n, g in grads.items():
            out[n] = params[n] - _rate(rate, n) * g
        return out, state


@dataclass(frozen=True)
class InnerAdam:
    """Adam with zero moments at the start of each task (``k`` counts the task's steps from 0)."""

    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    name = "adam"

    def __post_init__(self):
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"inner Adam betas must lie in [0, 1), not ({self.beta1}, {self.beta2})")
        if not self.eps > 0:
            raise ConfigError(f"inner Adam eps must be positive, not {self.eps}")

    def init(self, grads: Params) -> dict:
        return {"m": {n: torch.zeros_like(g) for n, g in grads.items()},
                "v": {n: torch.zeros_like(g) for n, g in grads.items()}}

    def step(self, params: Params, grads: Params, rate: Rates, k: int, state: dict) -> tuple[Params, dict]:
        b1, b2 = self.beta1, self.beta2
        correct1, correct2 = 1.0 - b1 ** (k + 1), 1.0 - b2 ** (k + 1)
        out, m, v = dict(params), {}, {}
        for n, g in grads.items():
            m[n] = b1 * state["m"][n] + (1.0 - b1) * g
            v[n] = b2 * state["v"][n] + (1.0 - b2) * g * g
            denominator = torch.sqrt(v[n] / correct2 + _EPS_ROOT) + self.eps
            out[n] = params[n] - _rate(rate, n) * (m[n] / correct1) / denominator
        return out, {"m": m, "v": v}


InnerOptimizer = Union[InnerSGD, InnerAdam]


def make_inner_optimizer(name: str, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """The inner optimiser called ``name`` (``sgd`` or ``adam``)."""
    if name == "sgd":
        return InnerSGD()
    if name == "adam":
        return InnerAdam(float(betas[0]), float(betas[1]), float(eps))
    raise ConfigError(f"unknown inner_optimizer {name!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
