"""The inner loop shared by every optimisation-based learner (MAML and its family, Reptile).

A task is adapted to by a few gradient steps on its support set, from the meta-parameters::

    theta_0 = theta;   theta_{k+1} = theta_k - alpha * grad_theta L_support(theta_k)

written functionally (``forward(params, x)``, see :mod:`kshot.learners.functional`), so the
meta-parameters are never overwritten and the steps stay differentiable: with
``create_graph=True`` the meta-gradient flows through them (second order); with
``first_order=True`` each step's gradient is a constant and the meta-gradient is the query
gradient at the adapted parameters (first-order MAML). ``alpha`` is one number, or one tensor
per parameter (Meta-SGD); only the parameters named in ``names`` adapt (ANIL: the head).

The tasks of a meta-batch are adapted one after another (``loop``: for convolutional networks
on a CPU the fastest, and the least memory, since each task's graph is freed after its backward
pass), or all together: with ``torch.func.vmap`` (``vmap``: one batched kernel per layer for the
whole meta-batch, what a GPU wants; any model), or, for MLPs, with hand-batched matrix products
(``batched``: the fastest on a CPU for MAML's sinusoid MLP). All give the same numbers; the
tests hold them to it.

:class:`GradientLearner` is the base of the learners built on this loop: it turns a model's batch
norm into per-batch statistics (MAML's treatment, so nothing leaks between tasks), chooses the
loss (cross-entropy, or MSE for regression task families), and implements ``adapt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor, accuracy
from kshot.learners.functional import (Forward, FunctionalForward, Params, batched_forward, functional_forward,
                                       split_head, use_batch_statistics)

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}
BATCH_TASKS = ("auto", "loop", "vmap", "batched")


@dataclass
class Adaptation:
    """The result of an inner loop on one task.

    Attributes:
        params: the adapted parameters (every name of the input dict; the adapted ones replaced).
        support_losses: support loss before each step (detached scalars), ``steps`` of them.
        trajectory: the parameters before each step and after the last (only when asked for).
    """

    params: Params
    support_losses: list[torch.Tensor] = field(default_factory=list)
    trajectory: list[Params] | None = None


_MEMORY_POLICY_SET = False


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the OS.

    A meta-training step allocates and frees the same large activation and gradient buffers for
    every task; by default glibc hands big blocks back to the kernel (``munmap``, heap trimming)
    and takes them again on the next task, paying a page fault per 4 KiB page each time. For
    second-order MAML on Conv4 that was ~3,600 page faults and a third of the CPU time per task
    (benchmarks/maml_speed.py, docs/MAML.md). Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` keeps the buffers; peak memory does not change. Process-wide, once;
    glibc only; set ``KSHOT_KEEP_FREED_MEMORY=0`` to leave the allocator alone.

    Returns:
        Whether the policy is in effect.
    """
    global _MEMORY_POLICY_SET
    if _MEMORY_POLICY_SET:
        return True
    if os.environ.get("KSHOT_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        return False
    _MEMORY_POLICY_SET = bool(ok)
    return _MEMORY_POLICY_SET


def twice_differentiable(enabled: bool = True):
    """A context in which attention uses the plain math kernel when ``enabled``.

    PyTorch's fused attention kernels have no second derivative, so a second-order
    meta-gradient through a Transformer needs the math kernel (same function, more memory).
    """
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    return sdpa_kernel(SDPBackend.MATH)


class InnerLoop:
    """Gradient steps on a support set, from given parameters.

    Args:
        forward: ``forward(params, x) -> outputs``.
        loss: ``loss(outputs, targets) -> scalar``.
        names: the parameters that adapt (others keep their meta-values in every step).
        unused: parameters the forward ignores (their gradient is exactly zero).
    """

    def __init__(self, forward: Forward, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 names: Sequence[str], unused: Sequence[str] = ()):
        self.forward, self.loss = forward, loss
        self.names = tuple(n for n in names if n not in set(unused))

    def gradients(self, params: Params, x: torch.Tensor, y: torch.Tensor, create_graph: bool,
                  functional: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradient of the support loss with respect to the adapted parameters, and the loss.

        ``functional=True`` uses ``torch.func.grad`` (composable with ``vmap``); otherwise
        ``torch.autograd.grad``, which needs the adapted parameters to require grad.
        """
        if functional:
            def support_loss(sub: Params) -> torch.Tensor:
                return self.loss(self.forward({**params, **sub}, x), y)
            grads, loss = torch.func.grad_and_value(support_loss)({n: params[n] for n in self.names})
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            return grads, loss
        loss = self.loss(self.forward(params, x), y)
        tensors = [params[n] for n in self.names]
        grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(t))
                for n, g, t in zip(self.names, grads, tensors)}, loss

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float | Params,
              create_graph: bool, functional: bool = False, keep_trajectory: bool = False) -> Adaptation:
        """``steps`` gradient steps on ``(x, y)`` from ``params``.

        Args:
            params: the starting parameters (the meta-parameters), by name.
            x, y: the support set, ``[n, ...]`` and ``[n]`` (classes) or ``[n, d]`` (regression).
            steps: number of gradient steps.
            lr: the inner learning rate, one number or a tensor per adapted parameter (Meta-SGD).
            create_graph: keep the steps differentiable (second-order meta-gradient); otherwise
                each step's gradient is a constant (first order).
            functional: use ``torch.func.grad`` (needed under ``vmap``).
            keep_trajectory: also return the parameters before each step.

        Returns:
            The :class:`Adaptation`; ``params`` stays differentiable with respect to the input
            parameters (to first order only when ``create_graph`` is False).
        """
        losses: list[torch.Tensor] = []
        trajectory = [params] if keep_trajectory else None
        for _ in range(steps):
            grads, loss = self.gradients(params, x, y, create_graph, functional)
            losses.append(loss.detach())
            params = dict(params)
            for n, g in grads.items():
                params[n] = params[n] - (lr[n] if isinstance(lr, dict) else lr) * g
            if trajectory is not None:
                trajectory.append(params)
        return Adaptation(params, losses, trajectory)


class AdaptedPredictor(Predictor):
    """A predictor holding a task's adapted parameters (and, outside training, the way there).

    ``trace(query_x, query_y)`` scores the support and query sets at every inner step, for the
    within-task monitoring that validation logs.
    """

    def __init__(self, learner: "GradientLearner", params: Params, ways: int,
                 forward: Forward | None = None, support: tuple[torch.Tensor, torch.Tensor] | None = None,
                 trajectory: list[Params] | None = None):
        forward = forward or learner.forward
        super().__init__(lambda x: forward(params, x), ways)
        self.learner, self.params, self._forward = learner, params, forward
        self.support, self.trajectory = support, trajectory

    def at_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` after ``step`` inner steps (0: the meta-parameters); needs the
        trajectory, which ``adapt`` keeps outside training."""
        if self.trajectory is None:
            raise ValueError("this predictor kept no trajectory (it was adapted with gradients enabled)")
        return self._forward(self.trajectory[step], x)

    def trace(self, query_x: torch.Tensor, query_y: torch.Tensor) -> dict[str, float]:
        """Support and query loss (and accuracy, for classification) at each inner step."""
        if self.trajectory is None or self.support is None:
            return {}
        out: dict[str, float] = {}
        sx, sy = self.support
        with torch.no_grad():
            for k, params in enumerate(self.trajectory):
                for split, x, y in (("support", sx, sy), ("query", query_x, query_y)):
                    pred = self._forward(params, x)
                    out[f"{split}_loss_step{k}"] = self.learner.query_loss(pred, y).item()
                    if self.learner.classification:
                        out[f"{split}_acc_step{k}"] = accuracy(pred, y)
        return out


def param_key(name: str) -> str:
    """A ParameterDict key for a parameter name (which may not contain dots)."""
    return name.replace(".", "__")


class GradientLearner(Learner):
    """Base of the learners that adapt by gradient steps on the support set.

    Args:
        model: any ``nn.Module`` mapping inputs to class scores ``[n, ways]`` (or to regression
            outputs). Its batch-norm layers are switched to per-batch statistics (in place).
        inner_steps: gradient steps per task in training.
        inner_lr: inner learning rate (Meta-SGD: the initial per-parameter value).
        test_inner_steps: gradient steps per task outside training (0: same as training).
        batch_tasks: ``loop`` (one task after another), ``vmap`` (all tasks of a meta-batch
            batched with ``torch.func.vmap``), ``batched`` (MLPs: batched matrix products over
            tasks) or ``auto`` (see :meth:`GradientLearner.batch_mode`).
        loss: ``cross_entropy`` (classification) or ``mse`` (regression).
        inner_params: the parameters that adapt in the inner loop, by name or name prefix (a
            module: ``"decision"`` names every parameter under ``decision.``); a sequence or a
            comma-separated string. Empty: the learner's own choice (all; ANIL: the head).
    """

    config_options: ClassVar[tuple[str, ...]] = ("inner_steps", "inner_lr", "test_inner_steps", "batch_tasks",
                                                 "inner_params")
    #: Only the parameters of the model's last layer adapt in the inner loop (ANIL).
    head_only: ClassVar[bool] = False
    #: Whether inner-loop gradients are constants for the meta-gradient (first-order variants).
    first_order_steps: bool = False

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 test_inner_steps: int = 0, batch_tasks: str = "auto", loss: str = "cross_entropy",
                 inner_params: str | Sequence[str] = ()):
        super().__init__(use_batch_statistics(model))
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ConfigError(f"inner_steps must be an integer >= 1, not {inner_steps!r}")
        if int(test_inner_steps) != test_inner_steps or test_inner_steps < 0:
            raise ConfigError(f"test_inner_steps must be an integer >= 0, not {test_inner_steps!r}")
        if not inner_lr > 0 or not math.isfinite(inner_lr):
            raise ConfigError(f"inner_lr must be positive, not {inner_lr!r}")
        if batch_tasks not in BATCH_TASKS:
            raise ConfigError(f"unknown batch_tasks {batch_tasks!r}; choose one of {', '.join(BATCH_TASKS)}")
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.test_inner_steps, self.batch_tasks, self.loss_name = int(test_inner_steps), batch_tasks, loss
        self._loss = LOSSES[loss]
        self.forward = functional_forward(self.model)
        self.generic_forward = functional_forward(self.model, fast=False)
        self.batched_forward = batched_forward(self.model)
        self.head_names = _head_names(self.model)
        self.inner_params = parameter_prefixes(inner_params)
        if self.inner_params:
            names = select_parameters(self.model, self.inner_params)
        else:
            names = self.head_names if self.head_only else [n for n, _ in self.model.named_parameters()]
        self.adapted_names = tuple(names)
        #: ANIL on a Sequential: (body, head) forwards, so that features are computed once per task.
        self.split = split_head(self.model) if self.head_only and not self.inner_params else None

    # ------------------------------------------------------------------ settings
    @classmethod
    def backbone_overrides(cls, config) -> dict:
        from kshot.tasks.families import task_family
        from kshot.models import backbone_arguments

        family = task_family(config.dataset)
        if family is None and config.eval_ways != config.ways:
            raise ConfigError(f"{cls.algo} learns a {config.ways}-way head, so it cannot be tested on "
                              f"{config.eval_ways}-way tasks; set --test-ways {config.ways} (or 0)")
        wanted = {"out_features": 1 if family is not None else config.ways, "track_running_stats": False}
        accepted = backbone_arguments(config.backbone)
        return {k: v for k, v in wanted.items() if accepted is None or k in accepted}

    @classmethod
    def from_config(cls, config, example_shape: Sequence[int]) -> "GradientLearner":
        from kshot.tasks.families import task_family
        from kshot.models import create_model, input_kwargs

        kwargs = {**input_kwargs(config.backbone, example_shape), **cls.backbone_overrides(config),
                  **config.backbone_options}
        model = create_model(config.backbone, **kwargs)
        family = task_family(config.dataset)
        loss = family.loss if family is not None else "cross_entropy"
        return cls(model, loss=loss, **{name: getattr(config, name) for name in cls.config_options})

    def options(self) -> dict:
        options = {"inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
                   "test_inner_steps": self.test_inner_steps, "batch_tasks": self.batch_tasks,
                   "loss": self.loss_name}
        if self.inner_params:
            options["inner_params"] = list(self.inner_params)
        return options

    @property
    def classification(self) -> bool:
        return self.loss_name == "cross_entropy"

    @property
    def steps(self) -> int:
        """Inner steps now: the training number in training mode, the test number otherwise."""
        return self.inner_steps if self.training else (self.test_inner_steps or self.inner_steps)

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(logits, labels)

    def query_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(logits, labels) if self.classification else float("nan")

    def batch_mode(self, tasks: Sequence) -> str:
        """``loop``, ``vmap`` or ``batched`` for this meta-batch.

        ``auto`` batches MLPs with batched matrix products (on the sinusoid MLP about 2x faster
        than vmap and 10x faster than the loop on a CPU), other models with vmap on a GPU, and
        loops over tasks for other models on a CPU: batching convolutional tasks there
        multiplies the activations' memory and spills them out of cache
        (benchmarks/maml_speed.py).
        """
        same_shapes = len({(t.support_x.shape, t.query_x.shape) for t in tasks}) == 1
        if self.batch_tasks in ("vmap", "batched"):
            if not same_shapes:
                raise ConfigError(f"batch_tasks={self.batch_tasks} needs tasks of equal shapes; "
                                  f"use batch_tasks=loop")
            if self.batch_tasks == "batched" and self.batched_forward is None:
                raise ConfigError("batch_tasks=batched works for MLPs (Linear layers and activations) "
                                  "only; use vmap or loop for this model")
            return self.batch_tasks
        if self.batch_tasks == "auto" and same_shapes and len(tasks) > 1:
            if self.batched_forward is not None:
                return "batched"
            if next(self.model.parameters()).device.type == "cuda":
                return "vmap"
        return "loop"

    def vmap_or_loop(self, vmapped: Callable, *args):
        """``vmapped(*args)``, or None when the model cannot be batched with vmap (data-dependent
        control flow, an operator without a batching rule): the caller then loops over tasks,
        which computes the same numbers. Warns once per learner."""
        if getattr(self, "_vmap_failed", False):
            return None
        try:
            return vmapped(*args)
        except (RuntimeError, NotImplementedError) as e:
            self._vmap_failed = True
            warnings.warn(f"{type(self.model).__name__} cannot be batched over tasks with vmap "
                          f"({str(e).splitlines()[0][:160]}); looping over tasks instead", stacklevel=3)
            return None

    def prepare_meta_batch(self) -> None:
        """Called by ``meta_gradient`` before each meta-batch: on a CPU, keep freed memory for reuse
        (:func:`keep_freed_memory`)."""
        if not _MEMORY_POLICY_SET and next(self.model.parameters()).device.type == "cpu":
            keep_freed_memory()

    def task_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each task's mean loss, ``[B]``, from batched outputs ``[B, n, ...]`` and targets."""
        if self.classification:
            losses = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
            return losses.view(targets.shape[0], -1).mean(1)
        return (outputs - targets).pow(2).flatten(1).mean(1)

    def batched_inner_loop(self) -> InnerLoop:
        """The inner loop over a whole meta-batch (parameters ``[B, ...]``, inputs ``[B, n, ...]``):
        its loss is the sum of the tasks' losses, so its gradient is each task's own."""
        assert self.batched_forward is not None
        return InnerLoop(self.batched_forward, lambda out, y: self.task_losses(out, y).sum(),
                         self.adapted_names)

    # ------------------------------------------------------------------ parameters
    def meta_parameters(self) -> Params:
        """The model's parameters by name: the starting point of every task's inner loop."""
        return dict(self.model.named_parameters())

    def learning_rates(self) -> float | Params:
        """The inner learning rate(s); Meta-SGD overrides this with learned tensors."""
        return self.inner_lr

    def inner_loop(self, forward: Forward | None = None, generic: bool = False) -> InnerLoop:
        forward = forward or (self.generic_forward if generic else self.forward)
        return InnerLoop(forward, self._loss, self.adapted_names, unused=forward.unused)

    # ------------------------------------------------------------------ adapt
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              ways: int | None = None) -> AdaptedPredictor:
        """Adapt to one task by ``steps`` gradient steps on its support set.

        With gradients enabled the predictor is differentiable with respect to the
        meta-parameters (through the steps, unless the learner is first-order). Under
        ``torch.no_grad`` (evaluation) the steps still take gradients, and the predictor holds
        detached parameters and the trajectory for :meth:`AdaptedPredictor.trace`.
        """
        if ways is None:
            ways = int(support_y.max()) + 1 if self.classification else 1
        differentiable = torch.is_grad_enabled()
        params = self.meta_parameters()
        lr = self.learning_rates()
        if not differentiable:
            params = {n: p.detach().requires_grad_(n in self.adapted_names) for n, p in params.items()}
            lr = {n: v.detach() for n, v in lr.items()} if isinstance(lr, dict) else lr
        create_graph = differentiable and not self.first_order_steps
        with torch.enable_grad(), twice_differentiable(create_graph):
            if self.split is not None:  # ANIL: the body's features once, the head adapts on them
                body, head = self.split
                features = body(params, support_x)
                result = self.inner_loop(head).adapt(params, features, support_y, self.steps, lr, create_graph,
                                                     keep_trajectory=not differentiable)
                forward: Forward = _Composed(body, head)
            else:
                result = self.inner_loop().adapt(params, support_x, support_y, self.steps, lr, create_graph,
                                                 keep_trajectory=not differentiable)
                forward = self.forward
        fast = result.params
        trajectory = None
        if not differentiable:
            fast = {n: p.detach() for n, p in fast.items()}
            trajectory = [{n: p.detach() for n, p in step.items()} for step in result.trajectory or []]
        return AdaptedPredictor(self, fast, ways, forward=forward, support=(support_x, support_y),
                                trajectory=trajectory)


class _Composed(FunctionalForward):
    """``head(params, body(params, x))``."""

    def __init__(self, body: FunctionalForward, head: FunctionalForward):
        self.body, self.head = body, head
        self.unused = body.unused | head.unused

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.head(params, self.body(params, x))


def parameter_prefixes(names: str | Sequence[str]) -> tuple[str, ...]:
    """``"a, b.c"`` or ``["a", "b.c"]`` -> ``("a", "b.c")`` (empty entries dropped)."""
    if isinstance(names, str):
        names = names.split(",")
    return tuple(n.strip() for n in names if n.strip())


def select_parameters(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Names of the model's parameters that are, or lie under, one of ``prefixes`` (in the
    model's order); a prefix that names nothing is a ConfigError listing what there is."""
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            modules = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"inner_params {prefix!r} names no parameter of {type(model).__name__}; "
                              f"its parameters lie under {', '.join(modules)}")
        chosen.update(matched)
    return [n for n in names if n in chosen]


def _head_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the model's last module that has parameters (its head)."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ConfigError("the model has no parameters to adapt")
    prefix = f"{last}." if last else ""
    return [n for n, _ in model.named_parameters() if n.startswith(prefix) and "." not in n[len(prefix):]]
