"""TRPO's step (Schulman et al. 2015) on any differentiable objective with a KL constraint.

The meta-objective of MAML-RL is a function of the pre-update parameters through the inner
policy-gradient steps; TRPO needs only its value, its gradient, and products of the Hessian of
its KL term with vectors (computed by double backward through the inner steps), so the same
step serves plain and meta-learned policies. As in rllab's ``ConjugateGradientOptimizer``:
conjugate gradient for ``H^-1 g`` (10 iterations, ``H + 1e-5 I``), the largest step with
``1/2 s^T H s = max_kl``, then backtracking by 0.8 until the loss improves and the KL is
within the constraint (15 tries; otherwise the parameters stay where they were).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def conjugate_gradient(hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int = 10,
                       tolerance: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``H x = b`` given ``hvp(v) = H v`` for a positive-definite ``H``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        hp = hvp(p)
        alpha = rr / (p @ hp + 1e-12)
        x += alpha * p
        r -= alpha * hp
        rr_new = r @ r
        if rr_new < tolerance:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclass
class TRPOStep:
    """What one TRPO step did: losses and KL before and after, and the line-search outcome."""

    loss_before: float
    loss_after: float
    kl_after: float
    backtracks: int
    accepted: bool


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def kl_hessian(params: Sequence[torch.Tensor], kl: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for the Hessian ``H`` of ``kl`` (a graph allowing double backward) in ``params``."""
    kl_grads = flat(torch.autograd.grad(kl, params, create_graph=True))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return flat(torch.autograd.grad(kl_grads @ v, params, retain_graph=True))
    return hvp


def trpo_step(params: Sequence[torch.Tensor], loss_and_kl: Callable[[bool], tuple[torch.Tensor, torch.Tensor]],
              max_kl: float = 0.01, cg_iterations: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
              max_backtracks: int = 15,
              hessian: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None) -> TRPOStep:
    """One TRPO step on ``params`` (changed in place).

    Args:
        params: the parameters (leaf tensors) the objective is a function of.
        loss_and_kl: ``loss_and_kl(differentiable)`` -> (loss, KL from the behaviour policy),
            scalars, computed at the current values of ``params``; with ``differentiable`` the
            graph must allow double backward of the KL (unless ``hessian`` is given).
        max_kl: the trust region (Finn et al.: 0.01).
        hessian: ``hessian()`` -> ``v -> H v`` for the KL's Hessian at the current parameters, when
            the caller has a cheaper way than double backward of the KL (see
            :meth:`kshot.rl.maml.MAMLRL.kl_hessian`).
    """
    loss, kl = loss_and_kl(True)
    loss_value = float(loss.detach())
    g = flat(torch.autograd.grad(loss, params, retain_graph=hessian is None))
    kl_hvp = hessian() if hessian is not None else kl_hessian(params, kl)
    del loss, kl

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return kl_hvp(v) + damping * v

    direction = conjugate_gradient(hvp, g, cg_iterations)
    shs = direction @ hvp(direction)
    step = torch.sqrt(2 * max_kl / (shs + 1e-8)) * direction
    loss_before = loss_value
    del kl_hvp
    old = [p.detach().clone() for p in params]

    def assign(vector: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o - vector[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    for j in range(max_backtracks):
        assign(step * backtrack_ratio ** j)
        new_loss, new_kl = loss_and_kl(False)
        new_loss, new_kl = float(new_loss), float(new_kl)
        if new_loss < loss_before and new_kl <= max_kl and torch.isfinite(torch.tensor(new_loss)):
            return TRPOStep(loss_before, new_loss, new_kl, j, True)
    assign(torch.zeros_like(step))
    return TRPOStep(loss_before, loss_before, 0.0, max_backtracks, False)
