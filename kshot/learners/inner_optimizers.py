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
from torch import nn

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

    def init(self, grads: Params, carried: dict | None = None) -> dict:
        return {}

    def step(self, params: Params, grads: Params, rate: Rates, state: dict) -> tuple[Params, dict]:
        out = dict(params)
        for n, g in grads.items():
            out[n] = params[n] - _rate(rate, n) * g
        return out, state


@dataclass(frozen=True)
class InnerAdam:
    """Adam; its state holds, per parameter, the moments ``m`` and ``v`` and the count ``t`` of
    steps they have seen (bias correction), zero at a task's start unless carried."""

    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    name = "adam"

    def __post_init__(self):
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"inner Adam betas must lie in [0, 1), not ({self.beta1}, {self.beta2})")
        if not self.eps > 0:
            raise ConfigError(f"inner Adam eps must be positive, not {self.eps}")

    def init(self, grads: Params, carried: dict | None = None) -> dict:
        """The state at a task's start: zero moments, or those ``carried`` in from earlier tasks
        (:meth:`CarriedState.state`) for the parameters it has, of the same shapes."""
        state: dict = {"m": {}, "v": {}, "t": {}}
        for n, g in grads.items():
            if carried is not None and n in carried["t"] and carried["m"][n].shape == g.shape:
                state["m"][n], state["v"][n], state["t"][n] = carried["m"][n], carried["v"][n], carried["t"][n]
            else:
                state["m"][n], state["v"][n], state["t"][n] = torch.zeros_like(g), torch.zeros_like(g), 0
        return state

    def step(self, params: Params, grads: Params, rate: Rates, state: dict) -> tuple[Params, dict]:
        b1, b2 = self.beta1, self.beta2
        out, m, v, t = dict(params), {}, {}, {}
        for n, g in grads.items():
            t[n] = state["t"][n] + 1
            m[n] = b1 * state["m"][n] + (1.0 - b1) * g
            v[n] = b2 * state["v"][n] + (1.0 - b2) * g * g
            denominator = torch.sqrt(v[n] / (1.0 - b2 ** t[n]) + _EPS_ROOT) + self.eps
            out[n] = params[n] - _rate(rate, n) * (m[n] / (1.0 - b1 ** t[n])) / denominator
        return out, {"m": m, "v": v, "t": t}


InnerOptimizer = Union[InnerSGD, InnerAdam]


class CarriedState(nn.Module):
    """Adam's moments carried from task to task, as buffers (saved in checkpoints, so a resumed
    run carries on exactly): ``m_<name>``, ``v_<name>`` and the step count ``t_<name>`` of each
    adapted parameter. Training writes them after each task, in the meta-batch's order;
    evaluation starts every task from them and leaves them as they are."""

    def __init__(self, params: Params):
        super().__init__()
        self.names = tuple(params)
        for n, p in params.items():
            key = n.replace(".", "__")
            self.register_buffer(f"m_{key}", torch.zeros_like(p, device=p.device))
            self.register_buffer(f"v_{key}", torch.zeros_like(p, device=p.device))
            self.register_buffer(f"t_{key}", torch.zeros((), dtype=torch.int64, device=p.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint is untrusted: a negative count or second moment would make Adam's steps NaN.
        for key, tensor in state_dict.items():
            if key.startswith(prefix + "t_") or key.startswith(prefix + "v_"):
                if bool((tensor < 0).any()) or not bool(torch.isfinite(tensor.double()).all()):
                    raise ValueError(f"carried Adam state {key} holds negative or non-finite values")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _buffer(self, kind: str, name: str) -> torch.Tensor:
        return getattr(self, f"{kind}_{name.replace('.', '__')}")

    def state(self) -> dict:
        """The carried state, in :class:`InnerAdam`'s form (detached)."""
        return {"m": {n: self._buffer("m", n) for n in self.names},
                "v": {n: self._buffer("v", n) for n in self.names},
                "t": {n: int(self._buffer("t", n)) for n in self.names}}

    @torch.no_grad()
    def update(self, state: dict) -> None:
        """Keep a task's final state for the next task."""
        for n in self.names:
            if n in state.get("t", {}):
                self._buffer("m", n).copy_(state["m"][n])
                self._buffer("v", n).copy_(state["v"][n])
                self._buffer("t", n).fill_(int(state["t"][n]))


def make_inner_optimizer(name: str, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """The inner optimiser called ``name`` (``sgd`` or ``adam``)."""
    if name == "sgd":
        return InnerSGD()
    if name == "adam":
        return InnerAdam(float(betas[0]), float(betas[1]), float(eps))
    raise ConfigError(f"unknown inner_optimizer {name!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
