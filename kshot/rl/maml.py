"""MAML for policies (Finn, Abbeel and Levine, ICML 2017, section 5.3), and its baselines.

A task is an environment drawn from a family. For each task of a meta-batch:

1. inner loop: ``K`` episodes with the current policy ``theta``; each task's linear-feature
   baseline fitted to them; one REINFORCE step ``theta'_i = theta - alpha * grad L_i(theta)``
   (more steps each take fresh episodes from the policy they start from). The step is kshot's
   one functional inner loop (:class:`kshot.learners.inner_loop.InnerLoop`), on all tasks at
   once: parameters carry a task dimension, one batched forward per step;
2. ``K`` episodes with each adapted policy ``theta'_i``;
3. outer loop: improve ``theta`` for the adapted policies' returns, through the inner step
   (second order; ``fomaml-rl``: the inner gradient as a constant), with TRPO as in the paper
   (conjugate gradient on Hessian-vector products of the KL of the meta-objective, a line
   search on the KL constraint and the surrogate's improvement), or with PPO's clipped
   surrogate and the trainer's optimiser, for ``outer_epochs`` steps.

``pretrain-rl`` is the paper's "pretrained" comparison: one policy trained with the same outer
step on the episodes of all tasks, with no inner loop in training; it is tested, like MAML,
after the same inner steps.

The learner takes its outer step itself (``takes_outer_step``), and evaluates itself
(:meth:`MAMLRL.evaluate_tasks`: the average return after 0, 1, ... adaptation steps).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.base import Learner
from kshot.learners.functional import Params
from kshot.learners.inner_loop import InnerLoop
from kshot.rl.families import EnvTask, env_family
from kshot.rl.objectives import Targets, clipped_surrogate, inner_loss, mean_kl, surrogate, targets
from kshot.rl.optim import trpo_step
from kshot.rl.policies import LOG_STD, GaussianPolicyForward
from kshot.rl.rollouts import Episodes, rollout

OUTER_STEPS = ("trpo", "ppo")


def confidence_interval(values: np.ndarray, z: float = 1.96) -> float:
    """Half-width of the normal 95% interval of the mean (as kshot.runs.evaluate computes it)."""
    values = np.asarray(values, dtype=np.float64)
    return float("nan") if len(values) < 2 else float(z * values.std(ddof=1) / math.sqrt(len(values)))


@dataclass
class PolicyEvaluation:
    """Average return of each task after 0, 1, ... adaptation steps.

    Attributes:
        returns: ``[n_tasks, steps + 1]``, each the mean over the task's episodes.
        headline_step: the step whose return is the run's score (the training inner steps).
        env_steps: environment steps taken; seconds: wall time.
    """

    returns: np.ndarray
    headline_step: int = 1
    env_steps: int = 0
    seconds: float = 0.0
    episodes: list[Episodes] = field(default_factory=list, repr=False)
    final_params: Params | None = field(default=None, repr=False)

    @property
    def n_tasks(self) -> int:
        return len(self.returns)

    @property
    def steps(self) -> int:
        return self.returns.shape[1] - 1

    def mean(self, step: int) -> float:
        return float(self.returns[:, step].mean())

    def ci95(self, step: int) -> float:
        return confidence_interval(self.returns[:, step])

    def summary(self) -> dict:
        k = min(self.headline_step, self.steps)
        out: dict = {"return": self.mean(k), "return_ci95": self.ci95(k), "return_step": k,
                     "acc": float("nan"), "loss": -self.mean(k), "loss_ci95": self.ci95(k), "tasks": self.n_tasks}
        for s in range(self.steps + 1):
            out[f"return_step{s}"], out[f"return_step{s}_ci95"] = self.mean(s), self.ci95(s)
        if self.seconds > 0:
            out["env_steps_per_s"] = self.env_steps / self.seconds
        return out

    def table(self) -> str:
        rows = [f"  after {s} step{'s' if s != 1 else ' '}: {self.mean(s):9.3f} ± {self.ci95(s):.3f}"
                for s in range(self.steps + 1)]
        return "\n".join(rows)

    def __str__(self) -> str:
        k = min(self.headline_step, self.steps)
        return f"return {self.mean(k):.3f} ± {self.ci95(k):.3f} after {k} steps over {self.n_tasks} tasks"


@dataclass
class AdaptedPolicy:
    """A policy adapted to one task: its parameters and the return before and after each step."""

    learner: "MAMLRL"
    task: EnvTask
    params: Params
    returns: list[float]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's state with the adapted parameters in place of the meta-parameters."""
        state = self.learner.state_dict()
        for name, value in self.params.items():
            state["log_std" if name == LOG_STD else f"model.{name}"] = value.detach().clone()
        return state


class MAMLRL(Learner):
    """MAML-RL around a policy whose mean is an MLP (``model``: observations -> action means).

    Args:
        model: the mean network (``mlp`` with ``out_features`` = the action size).
        inner_steps: policy-gradient steps per task in training.
        inner_lr: the inner step size (the paper: 0.1).
        test_inner_steps: adaptation steps at evaluation (0: as in training; the paper shows 3).
        episodes_per_task: episodes per task for each inner step and for the outer objective (K).
        discount, gae_lambda: of the returns and advantages.
        outer_step: ``trpo`` (the paper) or ``ppo`` (clipped surrogate, the trainer's optimiser).
        max_kl: TRPO's trust region.
        clip_ratio, outer_epochs: PPO's clipping and its optimiser steps per meta-batch.
        init_std: the policy's initial standard deviation.
        first_order: treat the inner gradients as constants (first-order meta-gradient).
    """

    algo = "maml-rl"
    config_options: ClassVar[tuple[str, ...]] = (
        "inner_steps", "inner_lr", "test_inner_steps", "episodes_per_task", "discount", "gae_lambda",
        "outer_step", "max_kl", "clip_ratio", "outer_epochs")
    #: The learner takes the outer step itself (TRPO's line search), see :meth:`outer_step`.
    takes_outer_step: ClassVar[bool] = True
    default_first_order: ClassVar[bool] = False
    #: Whether training adapts before the outer objective (False: pretrain-rl).
    meta_learned: ClassVar[bool] = True
    #: Tasks evaluated together (one vectorised environment of this many tasks' episodes).
    eval_batch: int = 20
    #: TRPO's Hessian-vector products use every this-many-th step (see :meth:`kl_hessian`); on 2D
    #: navigation 1/4 of the steps gave products within 2% of the exact ones at 1/5 of the cost.
    hvp_subsample: int = 4

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.1, test_inner_steps: int = 3,
                 episodes_per_task: int = 20, discount: float = 0.99, gae_lambda: float = 1.0,
                 outer_step: str = "trpo", max_kl: float = 0.01, clip_ratio: float = 0.2, outer_epochs: int = 5,
                 init_std: float = 1.0, first_order: bool | None = None):
        super().__init__(model)
        for name, value, low in (("inner_steps", inner_steps, 1), ("test_inner_steps", test_inner_steps, 0),
                                 ("episodes_per_task", episodes_per_task, 1), ("outer_epochs", outer_epochs, 1)):
            if int(value) != value or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
        for name, value in (("inner_lr", inner_lr), ("max_kl", max_kl), ("clip_ratio", clip_ratio),
                            ("init_std", init_std)):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be positive, not {value!r}")
        if not 0 < discount <= 1 or not 0 <= gae_lambda <= 1:
            raise ConfigError(f"discount must be in (0, 1] and gae_lambda in [0, 1], not {discount} and {gae_lambda}")
        if outer_step not in OUTER_STEPS:
            raise ConfigError(f"unknown outer_step {outer_step!r}; choose one of {', '.join(OUTER_STEPS)}")
        self.inner_steps, self.inner_lr, self.test_inner_steps = int(inner_steps), float(inner_lr), int(test_inner_steps)
        self.episodes_per_task, self.discount, self.gae_lambda = int(episodes_per_task), float(discount), float(gae_lambda)
        self.outer_step_kind, self.max_kl = outer_step, float(max_kl)
        self.clip_ratio, self.outer_epochs, self.init_std = float(clip_ratio), int(outer_epochs), float(init_std)
        self.first_order = self.default_first_order if first_order is None else bool(first_order)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("the policy's mean network has no Linear layer")
        self.action_dim = linears[-1].out_features
        self.log_std = nn.Parameter(torch.full((self.action_dim,), math.log(self.init_std)))
        self.forward = GaussianPolicyForward(model)

    # ------------------------------------------------------------------ settings
    @classmethod
    def backbone_overrides(cls, config) -> dict:
        family = env_family(config.dataset, horizon=getattr(config, "horizon", 0))
        return {"out_features": family.action_dim}

    def options(self) -> dict:
        return {"inner_steps": self.inner_steps, "inner_lr": self.inner_lr, "test_inner_steps": self.test_inner_steps,
                "episodes_per_task": self.episodes_per_task, "discount": self.discount,
                "gae_lambda": self.gae_lambda, "outer_step": self.outer_step_kind, "max_kl": self.max_kl,
                "clip_ratio": self.clip_ratio, "outer_epochs": self.outer_epochs, "init_std": self.init_std,
                "first_order": self.first_order}

    @property
    def eval_steps(self) -> int:
        return self.test_inner_steps or self.inner_steps

    # ------------------------------------------------------------------ parameters
    def meta_parameters(self) -> Params:
        """The policy's parameters by name: the mean network's and ``log_std``."""
        params: Params = OrderedDict(self.model.named_parameters())
        params[LOG_STD] = self.log_std
        return params

    def batched_parameters(self, n_tasks: int, detach: bool = False) -> Params:
        """The meta-parameters expanded over ``n_tasks`` tasks (views: gradients sum over tasks)."""
        params = self.meta_parameters()
        if detach:
            params = {n: p.detach() for n, p in params.items()}
        return {n: p.expand(n_tasks, *p.shape) for n, p in params.items()}

    def inner_loop(self, names: Sequence[str]) -> InnerLoop:
        """The policy-gradient inner loop: REINFORCE's surrogate as the support loss."""
        return InnerLoop(self.forward, inner_loss, names)

    def inner_step(self, params: Params, episodes: Episodes, create_graph: bool,
                   y: Targets | None = None) -> tuple[Params, torch.Tensor]:
        """One policy-gradient step of every task on its own episodes.

        Args:
            params: per-task parameters ``[B, ...]``, differentiable (or requiring grad).
            episodes: the tasks' episodes with those parameters.
            create_graph: keep the step differentiable (second-order meta-gradient).

        Returns:
            The adapted parameters and the inner loss before the step (the tasks' sum).
        """
        y = y if y is not None else targets(episodes, self.discount, self.gae_lambda)
        with torch.enable_grad():
            result = self.inner_loop(tuple(params)).adapt(params, episodes.flat(episodes.obs), y, 1, self.inner_lr,
                                                          create_graph)
        return result.params, result.support_losses[0]

    def adapt_detached(self, params: Params, episodes: Episodes) -> Params:
        """An inner step with no graph kept (for rollouts and evaluation)."""
        start = {n: p.detach().requires_grad_() for n, p in params.items()}
        adapted, _ = self.inner_step(start, episodes, create_graph=False)
        return {n: p.detach() for n, p in adapted.items()}

    # ------------------------------------------------------------------ adapt
    def adapt(self, task: EnvTask, support_y=None, ways=None, *, steps: int | None = None,
              episodes: int | None = None) -> AdaptedPolicy:
        """Adapt to one task by ``steps`` policy-gradient steps on episodes the policy gathers there.

        ``task`` is an :class:`~kshot.rl.families.EnvTask` (a policy's support set is the episodes
        it collects itself); the other arguments of :meth:`Learner.adapt` do not apply. The
        return is measured before each step and after the last, on fresh episodes.
        """
        if not isinstance(task, EnvTask):
            raise ConfigError("a policy adapts to an environment task (kshot.rl.EnvTask), not to a support set")
        evaluation = self.evaluate_tasks([task], steps=steps, episodes=episodes, keep_params=True)
        assert evaluation.final_params is not None
        return AdaptedPolicy(self, task, {n: p[0] for n, p in evaluation.final_params.items()},
                             [float(r) for r in evaluation.returns[0]])

    # ------------------------------------------------------------------ training
    def collect(self, tasks: Sequence[EnvTask]) -> tuple[list[Episodes], Episodes]:
        """The meta-batch's episodes: before each inner step, and with the adapted policies."""
        if not tasks:
            raise ConfigError("a meta-batch needs at least one task")
        params = self.batched_parameters(len(tasks), detach=True)
        pre: list[Episodes] = []
        for k in range(self.inner_steps if self.meta_learned else 0):
            pre.append(rollout(self.forward, params, tasks, self.episodes_per_task, phase=k))
            params = self.adapt_detached(params, pre[-1])
        post = rollout(self.forward, params, tasks, self.episodes_per_task, phase=len(pre))
        return pre, post

    def adapted_parameters(self, pre: Sequence[Episodes], create_graph: bool,
                           pre_targets: Sequence[Targets] | None = None) -> Params:
        """The adapted parameters as a function of the meta-parameters, through the inner steps."""
        params = self.batched_parameters(pre[0].obs.shape[0] if pre else 1)
        for k, episodes in enumerate(pre):
            params, _ = self.inner_step(params, episodes, create_graph,
                                        pre_targets[k] if pre_targets is not None else None)
        return params

    def meta_objective(self, pre: Sequence[Episodes], post: Episodes, differentiable: bool = True,
                       y: Targets | None = None, pre_targets: Sequence[Targets] | None = None):
        """(surrogate loss, KL from the behaviour policies, outputs) of the adapted policies on
        their own episodes, as functions of the meta-parameters; means over tasks."""
        y = y if y is not None else targets(post, self.discount, self.gae_lambda)
        with torch.enable_grad():
            if pre:
                params = self.adapted_parameters(pre, differentiable and not self.first_order, pre_targets)
            else:
                params = self.batched_parameters(post.obs.shape[0])
            dist = self.forward(params, post.flat(post.obs))
            loss, kl = surrogate(dist, y).mean(), mean_kl(dist, y).mean()
        if not differentiable:
            loss, kl = loss.detach(), kl.detach()
        return loss, kl, dist

    def kl_hessian(self, pre: Sequence[Episodes], post: Episodes, y: Targets | None = None,
                   pre_targets: Sequence[Targets] | None = None, subsample: int = 1):
        """``v -> H v`` for the Hessian ``H`` of the meta-objective's KL at the current parameters.

        At the current parameters the KL of each adapted policy from its behaviour policy is at
        its minimum (0), so its Hessian through the inner steps ``theta' = U(theta)`` is exactly
        ``J^T F J``: ``F`` the Fisher matrix (the KL's Hessian in ``theta'``) and ``J`` the
        Jacobian of the inner steps; for one step ``J = I - alpha H_inner``, symmetric. A product
        then costs second derivatives (inner-loss and Fisher Hessian-vector products) instead of
        the third derivatives of differentiating the KL's gradient through the inner step; the
        tests hold it to the latter. ``subsample`` > 1 uses every ``subsample``-th step of each
        task's episodes for the products (as OpenAI's TRPO does for its Fisher products): the
        products only shape the step, and the line search checks the KL on all steps.
        """
        y = y if y is not None else targets(post, self.discount, self.gae_lambda)
        pre_targets = list(pre_targets) if pre_targets is not None else [
            targets(e, self.discount, self.gae_lambda) for e in pre]
        leaves = [p for p in self.meta_parameters().values() if p.requires_grad]
        names = list(self.meta_parameters())
        shapes = [p.shape for p in leaves]
        b = post.obs.shape[0]

        def thin(x: torch.Tensor) -> torch.Tensor:
            return x[:, ::subsample] if subsample > 1 else x

        def pieces(v: torch.Tensor) -> list[torch.Tensor]:
            out, offset = [], 0
            for shape in shapes:
                n = math.prod(shape)
                out.append(v[offset:offset + n].view(shape))
                offset += n
            return out

        with torch.enable_grad():
            if len(pre) > 1:  # several inner steps: J by differentiating through them
                adapted = self.adapted_parameters(pre, not self.first_order, pre_targets)
                outs = [adapted[n] for n in names]
                dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
                jt = torch.autograd.grad(outs, leaves, dummies, create_graph=True)  # w -> J^T w
            else:
                adapted = self.batched_parameters(b)
                inner_grads = None
                if pre and not self.first_order:  # J = I - alpha H_inner, per task
                    start = self.batched_parameters(b)
                    x, t = pre[0], pre_targets[0]
                    thin_t = Targets(*(thin(f) for f in t))
                    loss = inner_loss(self.forward(start, thin(x.flat(x.obs))), thin_t)
                    starts = [start[n] for n in names]
                    inner_grads = torch.autograd.grad(loss, starts, create_graph=True)
                if pre:
                    adapted = self.adapted_parameters(pre, False, pre_targets)
            fixed = [adapted[n].detach().requires_grad_() for n in names]
            dist = self.forward(dict(zip(names, fixed)), thin(post.flat(post.obs)))
            kl_grads = torch.autograd.grad(mean_kl(dist, Targets(*(thin(f) for f in y))).mean(), fixed,
                                           create_graph=True)

        def jacobian(u: list[torch.Tensor]) -> list[torch.Tensor]:  # (I - alpha H_inner) u, per task
            if inner_grads is None:
                return u
            hu = torch.autograd.grad(inner_grads, starts, u, retain_graph=True)
            return [ui - self.inner_lr * h for ui, h in zip(u, hu)]

        def hvp(v: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                if len(pre) > 1:
                    jv = torch.autograd.grad(jt, dummies, pieces(v), retain_graph=True)
                    fjv = torch.autograd.grad(kl_grads, fixed, jv, retain_graph=True)
                    result = torch.autograd.grad(outs, leaves, fjv, retain_graph=True)
                else:
                    jv = jacobian([p.expand(b, *p.shape) for p in pieces(v)])
                    fjv = torch.autograd.grad(kl_grads, fixed, jv, retain_graph=True)
                    result = [r.sum(0) for r in jacobian(list(fjv))]
            return torch.cat([r.reshape(-1) for r in result])
        return hvp

    def _metrics(self, pre: Sequence[Episodes], post: Episodes, seconds_rollouts: float) -> dict[str, float]:
        everything = list(pre) + [post]
        metrics = {f"return_step{k}": float(e.returns().mean()) for k, e in enumerate(everything)}
        metrics["return_pre"] = metrics["return_step0"]
        if self.meta_learned:
            metrics["return_post"] = float(post.returns().mean())
        steps = sum(e.env_steps for e in everything)
        metrics["env_steps"] = float(steps)
        metrics["env_steps_per_s"] = steps / max(sum(e.seconds for e in everything), 1e-9)
        metrics["rollout_seconds"] = seconds_rollouts
        return metrics

    def meta_gradient(self, tasks: Sequence[EnvTask], scale: float = 1.0) -> dict[str, float]:
        """Accumulate ``scale * d(surrogate of the adapted policies)/d(meta-parameters)`` in ``.grad``
        (at the behaviour policy, the gradient of their expected return, negated)."""
        start = time.perf_counter()
        pre, post = self.collect(tasks)
        seconds = time.perf_counter() - start
        loss, _, _ = self.meta_objective(pre, post)
        (loss * scale).backward()
        return {"loss": float(loss.detach()), **self._metrics(pre, post, seconds)}

    def outer_step(self, tasks: Sequence[EnvTask], optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Collect the meta-batch's episodes and take the outer step (TRPO, or PPO epochs)."""
        start = time.perf_counter()
        pre, post = self.collect(tasks)
        seconds = time.perf_counter() - start
        y = targets(post, self.discount, self.gae_lambda)
        pre_targets = [targets(e, self.discount, self.gae_lambda) for e in pre]
        params = [p for p in self.meta_parameters().values() if p.requires_grad]
        metrics = self._metrics(pre, post, seconds)
        if self.outer_step_kind == "trpo":
            def loss_and_kl(differentiable: bool):
                loss, kl, _ = self.meta_objective(pre, post, differentiable, y, pre_targets)
                return loss, kl

            result = trpo_step(params, loss_and_kl, max_kl=self.max_kl,
                               hessian=lambda: self.kl_hessian(pre, post, y, pre_targets, self.hvp_subsample))
            metrics.update(loss=result.loss_before, loss_after=result.loss_after, kl=result.kl_after,
                           backtracks=float(result.backtracks), accepted=float(result.accepted))
        else:
            first = None
            for _ in range(self.outer_epochs):
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    params_b = (self.adapted_parameters(pre, not self.first_order, pre_targets) if pre
                                else self.batched_parameters(len(tasks)))
                    loss = clipped_surrogate(self.forward(params_b, post.flat(post.obs)), y, self.clip_ratio).mean()
                loss.backward()
                optimizer.step()
                first = float(loss.detach()) if first is None else first
            loss_after, kl, _ = self.meta_objective(pre, post, False, y, pre_targets)
            metrics.update(loss=first, loss_after=float(loss_after), kl=float(kl))
        metrics["outer_seconds"] = time.perf_counter() - start - seconds
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate_tasks(self, tasks: Sequence[EnvTask], device=None, progress: bool = False, desc: str = "evaluating",
                       trace: bool = False, steps: int | None = None, episodes: int | None = None,
                       keep_episodes: bool = False, keep_params: bool = False) -> PolicyEvaluation:
        """Average return of each task after 0, 1, ..., ``steps`` adaptation steps (default: the
        test inner steps), each step on fresh episodes of the policy it starts from."""
        steps = self.eval_steps if steps is None else int(steps)
        episodes = episodes or self.episodes_per_task
        tasks = list(tasks)
        returns = np.zeros((len(tasks), steps + 1))
        kept: list[Episodes] = []
        final: dict[str, list[torch.Tensor]] = {}
        env_steps, start = 0, time.perf_counter()
        was_training = self.training
        self.eval()
        try:
            with tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False) as bar:
                size = getattr(tasks[0].family, "eval_batch", self.eval_batch) if tasks else 1
                for lo in range(0, len(tasks), size):
                    chunk = tasks[lo:lo + size]
                    params = self.batched_parameters(len(chunk), detach=True)
                    for k in range(steps + 1):
                        batch = rollout(self.forward, params, chunk, episodes, phase=k)
                        returns[lo:lo + len(chunk), k] = batch.returns().cpu().numpy()
                        env_steps += batch.env_steps
                        if keep_episodes:
                            kept.append(batch)
                        if k < steps:
                            params = self.adapt_detached(params, batch)
                    for n, p in params.items():
                        final.setdefault(n, []).append(p)
                    bar.update(len(chunk))
        finally:
            self.train(was_training)
        return PolicyEvaluation(returns, self.inner_steps, env_steps, time.perf_counter() - start, kept,
                                {n: torch.cat(ps) for n, ps in final.items()} if keep_params else None)


class FOMAMLRL(MAMLRL):
    """First-order MAML for policies: the inner gradients are constants in the meta-gradient."""

    algo = "fomaml-rl"
    default_first_order = True


class PretrainedPolicy(MAMLRL):
    """The paper's "pretrained" comparison: one policy trained on all tasks with the same outer
    step and no inner loop; adapted at test time with the same inner steps as MAML."""

    algo = "pretrain-rl"
    meta_learned = False


#: Policy learners by algorithm name (the build layer adds them to kshot's learners).
POLICY_LEARNERS: dict[str, type[MAMLRL]] = {cls.algo: cls for cls in (MAMLRL, FOMAMLRL, PretrainedPolicy)}


# ----------------------------------------------------------------------------- presets
def _preset(algo: str, env: str, **overrides) -> dict:
    # Finn et al. 2017, section 5.3 and appendix A.2: a Gaussian policy with two hidden layers of
    # 100 ReLU units; one REINFORCE step of 0.1 on 20 episodes per task with a linear baseline;
    # TRPO outer step with KL 0.01; 20 tasks per meta-batch (2D navigation), 40 (locomotion);
    # the best of up to 500 meta-iterations by average return.
    base = dict(algo=algo, dataset=env, backbone="mlp", backbone_options={"hidden": [100, 100]},
                meta_batch_size=20, inner_steps=1, inner_lr=0.1, test_inner_steps=3, episodes_per_task=20,
                discount=0.99, gae_lambda=1.0, outer_step="trpo", max_kl=0.01, steps=500, optimizer="adam",
                lr=1e-3, lr_schedule="constant", val_every=25, val_tasks=40, checkpoint_every=5, log_every=1,
                test_tasks=600, threads=1)
    return {**base, **overrides}


for _algo, _what in (("maml-rl", "MAML"), ("pretrain-rl", "Pretrained policy (the paper's comparison)")):
    register_preset(f"{_algo}-nav2d", f"{_what}, 2D navigation, TRPO (Finn et al. 2017, figure 4)",
                    _preset(_algo, "nav2d", steps=200, val_every=20))
register_preset("fomaml-rl-nav2d", "First-order MAML, 2D navigation, TRPO", _preset("fomaml-rl", "nav2d", steps=200,
                                                                                    val_every=20))
register_preset("maml-rl-nav2d-ppo", "MAML, 2D navigation, clipped-surrogate (PPO-style) outer step",
                _preset("maml-rl", "nav2d", steps=200, val_every=20, outer_step="ppo", lr=3e-3, outer_epochs=5))
for _env, _figure in (("halfcheetah-vel", "velocity"), ("halfcheetah-dir", "direction")):
    register_preset(f"maml-rl-{_env}", f"MAML, half-cheetah {_figure}, TRPO, 40 tasks per meta-batch "
                    f"(Finn et al. 2017, figure 5; needs kshot[rl])",
                    _preset("maml-rl", _env, meta_batch_size=40, val_every=25, val_tasks=40, test_tasks=0))
register_preset("maml-rl-ant-dir", "MAML, ant direction, TRPO, 40 tasks per meta-batch (needs kshot[rl])",
                _preset("maml-rl", "ant-dir", meta_batch_size=40, val_every=25, val_tasks=40, test_tasks=0))
