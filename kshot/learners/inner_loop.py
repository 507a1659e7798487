"""The inner loop shared by every optimisation-based learner (MAML and its family, Reptile).

A task is adapted to by a few gradient steps on its support set, from the meta-parameters::

    theta_0 = theta;   theta_{k+1} = theta_k - alpha_k * grad_theta L_support(theta_k)

written functionally (``forward(params, x)``, see :mod:`kshot.learners.functional`), so the
meta-parameters are never overwritten and the steps stay differentiable: with
``create_graph=True`` the meta-gradient flows through them (second order); with
``first_order=True`` each step's gradient is a constant and the meta-gradient is the query
gradient at the adapted parameters (first-order MAML). ``alpha_k`` is one number, one tensor
per parameter (Meta-SGD), or a schedule over steps (MAML++'s per-layer per-step rates); only the
parameters named in ``names`` adapt (ANIL: the head). A ``point`` function gives the
parameters the network uses at step ``k`` (MAML++'s per-step batch-norm weights).

The tasks of a meta-batch are adapted one after another (``loop``: for convolutional networks
on a CPU the fastest, and the least memory, since each task's graph is freed after its backward
pass), or all together: with ``torch.func.vmap`` (``vmap``: one batched kernel per layer for the
whole meta-batch, what a GPU wants; any model), or, for MLPs, with hand-batched matrix products
(``batched``: the fastest on a CPU for MAML's sinusoid MLP). All give the same numbers; the
tests hold them to it.

:class:`GradientLearner` is the base of the learners built on this loop: it turns a model's batch
norm into per-batch statistics (MAML's treatment, so nothing leaks between tasks), chooses the
loss (cross-entropy, or MSE for regression task families), and implements ``adapt``:

* **Any number of ways.** A task whose ways differ from the model's head (or every task, with
  ``head_init="prototypes"``: Proto-MAML, Triantafillou et al. 2020) starts from a linear head
  built from the support set's class prototypes ``mu_c`` on the body's features,
  ``W_c = 2 mu_c, b_c = -||mu_c||^2`` (the linear form of ProtoNet's squared distances). With
  ``head_init="prototypes"`` the inner loop adapts it with the rest, as trained; a learner
  meta-trained with a learned head adapts only the new head on tasks of other ways (its body's
  initialisation was learned for a head of much smaller weights, and full steps at its rate
  overshoot).
* **Predictions that do not depend on their neighbours.** With ``transductive=False`` (the
  default of the settings) every query is normalised by the batch-norm statistics of the
  support set at the adapted parameters, in training and at test, so a query's scores depend
  on the support set and itself alone. ``transductive=True`` normalises each query batch by its
  own statistics, as Finn et al. trained and evaluated.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor, accuracy, check_classes, class_means
from kshot.learners.functional import (Composed, Forward, FunctionalForward, Params, Statistics, batched_forward,
                                       functional_forward, head_layer, split_head, use_batch_statistics)
from kshot.learners.inner_optimizers import InnerOptimizer, InnerSGD, make_inner_optimizer

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}
BATCH_TASKS = ("auto", "loop", "vmap", "batched")
HEAD_INITS = ("learned", "prototypes")

#: An inner learning rate: one number, a tensor per adapted parameter, or either per step.
Rates = Union[float, Params]
LearningRates = Union[Rates, Callable[[int], Rates]]
#: ``point(params, k)``: the parameters the network uses at step ``k`` of the inner loop.
Point = Callable[[Params, int], Params]


def rates_at(lr: LearningRates, step: int) -> Rates:
    """The inner learning rate(s) of step ``step``."""
    return lr(step) if callable(lr) else lr


@dataclass
class Adaptation:
    """The result of an inner loop on one task.

    Attributes:
        params: the adapted parameters (every name of the input dict; the adapted ones replaced).
        support_losses: support loss before each step (detached scalars), ``steps`` of them.
        trajectory: the parameters before each step and after the last (only when asked for).
        state: the inner optimiser's state after the last step (Adam's moments).
    """

    params: Params
    support_losses: list[torch.Tensor] = field(default_factory=list)
    trajectory: list[Params] | None = None
    state: dict = field(default_factory=dict)


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
                 names: Sequence[str], unused: Sequence[str] = (), optimizer: InnerOptimizer | None = None,
                 batch_size: int = 0):
        self.forward, self.loss = forward, loss
        self.names = tuple(n for n in names if n not in set(unused))
        self.optimizer = optimizer or InnerSGD()
        self.batch_size = int(batch_size)

    def gradients(self, params: Params, x: torch.Tensor, y: torch.Tensor, create_graph: bool,
                  functional: bool = False,
                  view: Callable[[Params], Params] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradient of the support loss with respect to the adapted parameters, and the loss.

        ``functional=True`` uses ``torch.func.grad`` (composable with ``vmap``); otherwise
        ``torch.autograd.grad``, which needs the adapted parameters to require grad. ``view``
        maps the parameters to those the forward takes (per-step parameters).
        """
        if functional:
            def support_loss(sub: Params) -> torch.Tensor:
                merged = {**params, **sub}
                return self.loss(self.forward(view(merged) if view else merged, x), y)
            grads, loss = torch.func.grad_and_value(support_loss)({n: params[n] for n in self.names})
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            return grads, loss
        loss = self.loss(self.forward(view(params) if view else params, x), y)
        tensors = [params[n] for n in self.names]
        grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(t))
                for n, g, t in zip(self.names, grads, tensors)}, loss

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: LearningRates,
              create_graph: bool, functional: bool = False, keep_trajectory: bool = False,
              point: Point | None = None,
              observe: Callable[[int], ContextManager] | None = None, state: dict | None = None) -> Adaptation:
        """``steps`` gradient steps on ``(x, y)`` from ``params``.

        Args:
            params: the starting parameters (the meta-parameters), by name.
            x, y: the support set, ``[n, ...]`` and ``[n]`` (classes) or ``[n, d]`` (regression).
            steps: number of gradient steps.
            lr: the inner learning rate: one number, a tensor per adapted parameter (Meta-SGD),
                or a function of the step giving either (MAML++).
            create_graph: keep the steps differentiable (second-order meta-gradient); otherwise
                each step's gradient is a constant (first order).
            functional: use ``torch.func.grad`` (needed under ``vmap``).
            keep_trajectory: also return the parameters before each step.
            point: ``point(params, k)``, the parameters the forward takes at step ``k``
                (default: ``params`` themselves).
            observe: ``observe(k)``, a context around step ``k``'s support pass (running
                statistics).
            state: the optimiser's state carried in from earlier tasks (None: a fresh one).

        Returns:
            The :class:`Adaptation`; ``params`` stays differentiable with respect to the input
            parameters (to first order only when ``create_graph`` is False).
        """
        losses: list[torch.Tensor] = []
        trajectory = [params] if keep_trajectory else None
        batches = self.mini_batches(x, steps)
        carried, state = state, None
        for k in range(steps):
            view = (lambda p, k=k: point(p, k)) if point is not None else None
            xs, ys = (x, y) if batches is None else (x[batches[k]], y[batches[k]])
            with observe(k) if observe is not None else contextlib.nullcontext():
                grads, loss = self.gradients(params, xs, ys, create_graph, functional, view)
            losses.append(loss.detach())
            if state is None:
                state = self.optimizer.init(grads, carried)
            params, state = self.optimizer.step(params, grads, rates_at(lr, k), state)
            if trajectory is not None:
                trajectory.append(params)
        return Adaptation(params, losses, trajectory, state or {})

    def mini_batches(self, x: torch.Tensor, steps: int) -> list[torch.Tensor] | None:
        """The examples of each step when steps take mini-batches of ``batch_size`` (None: every
        step takes all of ``x``): consecutive slices of the examples reshuffled at every pass, so
        each pass sees every example once (Nichol et al.'s sampling).

        The shuffles are drawn from a generator seeded by the examples themselves, not from
        torch's global one: a task gets the same mini-batches wherever and whenever it is
        adapted, so training stays a function of its config (a resumed run, or one split over
        processes, draws what an uninterrupted one does) and evaluation a function of its tasks.
        """
        b, n = self.batch_size, x.shape[0]
        if not b or b >= n:
            return None
        generator = torch.Generator().manual_seed(content_seed(x))
        passes = -(-steps * b // n)
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)]).to(x.device)
        return [order[k * b:(k + 1) * b] for k in range(steps)]


def content_seed(x: torch.Tensor, samples: int = 4096) -> int:
    """A 63-bit seed from a tensor's shape and values (at most ``samples`` of them, evenly spaced)."""
    flat = x.detach().reshape(-1)
    stride = max(1, flat.numel() // samples)
    values = flat[::stride][:samples].to("cpu", torch.float64).numpy().tobytes()
    digest = hashlib.blake2b(str(tuple(x.shape)).encode() + values, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prototype_head(features: torch.Tensor, labels: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Proto-MAML's linear head from a support set's features ``[n, d]`` and labels ``[n]``:
    ``W_c = 2 mu_c`` ``[ways, d]`` and ``b_c = -||mu_c||^2`` ``[ways]``, so that
    ``W z + b = -||z - mu||^2 + ||z||^2``: ProtoNet's scores up to a term equal for all classes."""
    mu = class_means(features.flatten(1), labels, ways)
    return 2 * mu, -mu.pow(2).sum(-1)


class TaskAdaptation:
    """One task adapted: the parameters at each inner step, and predictions at any of them under
    the learner's protocol.

    Args:
        learner: the learner that adapted.
        forward: ``forward(params, inputs)`` of the adapted part (the whole model, or ANIL's head).
        trajectory: the parameters after ``0..steps`` steps (or only the last, ``[theta_S]``).
        steps: the number of inner steps taken.
        support_in: the support inputs of ``forward`` (images, or ANIL's features).
        encode: raw inputs -> inputs of ``forward`` (identity, or ANIL's body under the protocol).
        point: per-step parameters (see :class:`InnerLoop`).
        transductive: normalise each batch by its own statistics (else by the support set's).
        observe: ``observe(k)``, a context around passes at step ``k`` (running statistics).
        running: ``running(k)``: batch-norm statistics to normalise queries by at step ``k``
            instead of the support set's (MAML++'s per-step running statistics), or None.
    """

    def __init__(self, learner: "GradientLearner", forward: FunctionalForward, trajectory: list[Params],
                 steps: int, support_in: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                 point: Point | None, transductive: bool,
                 observe: Callable[[int], ContextManager] | None = None,
                 running: Callable[[int], Statistics | None] | None = None):
        self.learner, self.forward, self.trajectory, self.steps = learner, forward, trajectory, steps
        self.support_in, self.encode, self.point = support_in, encode, point
        self.transductive = transductive or not getattr(forward, "batch_norms", ())
        self.observe, self.running = observe, running
        self._statistics: dict[int, Statistics] = {}

    @property
    def params(self) -> Params:
        """The adapted parameters (after the last step)."""
        return self.trajectory[-1]

    def at(self, k: int) -> Params:
        """The parameters the forward takes after ``k`` steps."""
        params = self.trajectory[k - self.steps - 1] if len(self.trajectory) <= self.steps else self.trajectory[k]
        return self.point(params, k) if self.point is not None else params

    def _observed(self, k: int):
        return self.observe(k) if self.observe is not None else contextlib.nullcontext()

    def statistics(self, k: int) -> Statistics:
        """Batch-norm statistics the queries are normalised by after ``k`` steps: the support
        set's at those parameters (or the learner's running statistics, where it keeps them)."""
        if k not in self._statistics:
            stats = self.running(k) if self.running is not None else None
            if stats is None:
                with self._observed(k):
                    stats = self.forward.statistics(self.at(k), self.support_in)[1]
            self._statistics[k] = stats
        return self._statistics[k]

    def logits(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Outputs for raw inputs ``x`` after ``k`` steps (default: all of them)."""
        k = self.steps if k is None else k
        z = self.encode(x)
        if self.transductive:
            with self._observed(k):
                return self.forward(self.at(k), z)
        return self.forward.with_statistics(self.at(k), self.statistics(k), z)

    def support_outputs(self, k: int) -> torch.Tensor:
        """Outputs for the support set after ``k`` steps (normalised by itself, as in the inner loop)."""
        return self.forward(self.at(k), self.support_in)


class AdaptedPredictor(Predictor):
    """A predictor holding a task's adaptation (and, outside training, the way there).

    ``trace(query_x, query_y)`` scores the support and query sets at every inner step, for the
    within-task monitoring that validation logs.
    """

    def __init__(self, learner: "GradientLearner", adaptation: TaskAdaptation, ways: int,
                 support: tuple[torch.Tensor, torch.Tensor] | None = None, keeps_trajectory: bool = False):
        super().__init__(adaptation.logits, ways)
        self.learner, self.adaptation, self.support = learner, adaptation, support
        self.keeps_trajectory = keeps_trajectory

    @property
    def params(self) -> Params:
        return self.adaptation.params

    @property
    def trajectory(self) -> list[Params] | None:
        return self.adaptation.trajectory if self.keeps_trajectory else None

    def at_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` after ``step`` inner steps (0: the meta-parameters); needs the
        trajectory, which ``adapt`` keeps outside training."""
        if not self.keeps_trajectory:
            raise ValueError("this predictor kept no trajectory (it was adapted with gradients enabled)")
        return self.adaptation.logits(x, step)

    def trace(self, query_x: torch.Tensor, query_y: torch.Tensor) -> dict[str, float]:
        """Support and query loss (and accuracy, for classification) at each inner step."""
        if not self.keeps_trajectory or self.support is None:
            return {}
        out: dict[str, float] = {}
        sy = self.support[1]
        with torch.no_grad():
            for k in range(self.adaptation.steps + 1):
                for split, pred, y in (("support", self.adaptation.support_outputs(k), sy),
                                       ("query", self.adaptation.logits(query_x, k), query_y)):
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
        transductive: normalise each query batch by its own batch-norm statistics (Finn et
            al.'s protocol); False: by the support set's, so that a query's prediction depends
            on the support set and itself alone (see the module docstring).
        head_init: ``learned`` (the head is a meta-parameter; tasks of other ways start from a
            prototype head) or ``prototypes`` (every task starts from a prototype head:
            Proto-MAML).
        inner_optimizer: ``sgd``, ``adam`` (``beta1 = 0``, Nichol et al.'s Reptile) or an
            optimiser of :mod:`kshot.learners.inner_optimizers`.
        inner_batch_size: examples per inner step, drawn without replacement from the task's
            (0: all of them every step).
    """

    config_options: ClassVar[tuple[str, ...]] = ("inner_steps", "inner_lr", "test_inner_steps", "batch_tasks",
                                                 "inner_params", "transductive", "head_init",
                                                 "inner_optimizer", "inner_batch_size")
    supports_transductive = True
    #: Only the parameters of the model's last layer adapt in the inner loop (ANIL).
    head_only: ClassVar[bool] = False
    #: Whether inner-loop gradients are constants for the meta-gradient (first-order variants).
    first_order_steps: bool = False
    #: The head initialisations this learner accepts.
    head_inits: ClassVar[tuple[str, ...]] = HEAD_INITS

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 test_inner_steps: int = 0, batch_tasks: str = "auto", loss: str = "cross_entropy",
                 inner_params: str | Sequence[str] = (), *, transductive: bool = False, head_init: str = "learned",
                 inner_optimizer: str | InnerOptimizer = "sgd", inner_batch_size: int = 0):
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
        if head_init not in self.head_inits:
            raise ConfigError(f"{self.algo} takes head_init {' or '.join(self.head_inits)}, not {head_init!r}")
        if int(inner_batch_size) != inner_batch_size or inner_batch_size < 0:
            raise ConfigError(f"inner_batch_size must be an integer >= 0 (0: the whole support set), "
                              f"not {inner_batch_size!r}")
        self.inner_update = (make_inner_optimizer(inner_optimizer) if isinstance(inner_optimizer, str)
                             else inner_optimizer)
        self.inner_batch_size = int(inner_batch_size)
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.test_inner_steps, self.batch_tasks, self.loss_name = int(test_inner_steps), batch_tasks, loss
        self.transductive, self.head_init = bool(transductive), head_init
        self._loss = LOSSES[loss]
        self.forward = functional_forward(self.model)
        self.generic_forward = functional_forward(self.model, fast=False)
        self.batched_forward = batched_forward(self.model)
        self.head_names = _head_names(self.model)
        head = head_layer(self.model)
        #: Classes of the model's head (None: its last layer is not a linear one).
        self.head_ways = head[1].out_features if head is not None and isinstance(head[1], nn.Linear) else None
        self.inner_params = parameter_prefixes(inner_params)
        if self.inner_params:
            names = select_parameters(self.model, self.inner_params)
        else:
            names = self.head_names if self.head_only else [n for n, _ in self.model.named_parameters()]
        self.adapted_names = tuple(names)
        #: ANIL (its own choice of parameters): the body's features of a task are computed once.
        self.features_once = self.head_only and not self.inner_params
        #: (body, head) forwards: ANIL's features once; prototype heads need the body's features.
        self.split = split_head(self.model)
        self.generic_split = split_head(self.model, fast=False)
        #: The outer step the trainer is at (:meth:`set_training_step`): schedules follow it.
        self.training_step = 0
        if head_init == "prototypes" and loss == "cross_entropy":
            self._check_replaceable_head()

    # ------------------------------------------------------------------ settings
    @classmethod
    def backbone_overrides(cls, config) -> dict:
        from kshot.tasks.families import task_family
        from kshot.models import backbone_arguments

        family = task_family(config.dataset)
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

    @classmethod
    def from_saved_options(cls, model: nn.Module, options: dict) -> "GradientLearner":
        # Checkpoints written before the protocol was an option were trained transductively.
        options = {"transductive": True, **options}
        betas, eps = options.pop("inner_betas", (0.0, 0.999)), options.pop("inner_eps", 1e-8)
        if "inner_optimizer" in options:
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                    and all(isinstance(b, (int, float)) for b in (*betas, eps))):
                raise ConfigError(f"the checkpoint's inner Adam settings are malformed ({betas!r}, {eps!r})")
            options["inner_optimizer"] = make_inner_optimizer(str(options["inner_optimizer"]), tuple(betas), eps)
        return cls(model, **options)

    def options(self) -> dict:
        options = {"inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
                   "test_inner_steps": self.test_inner_steps, "batch_tasks": self.batch_tasks,
                   "loss": self.loss_name, "transductive": self.transductive, "head_init": self.head_init}
        if self.inner_params:
            options["inner_params"] = list(self.inner_params)
        if self.inner_update != InnerSGD():
            options["inner_optimizer"] = self.inner_update.name
            options["inner_betas"] = [self.inner_update.beta1, self.inner_update.beta2]
            options["inner_eps"] = self.inner_update.eps
        if self.inner_batch_size:
            options["inner_batch_size"] = self.inner_batch_size
        return options

    @property
    def classification(self) -> bool:
        return self.loss_name == "cross_entropy"

    @property
    def test_steps(self) -> int:
        """Inner steps at validation and test (``test_inner_steps``, 0 meaning as in training)."""
        return self.test_inner_steps or self.inner_steps

    @property
    def steps(self) -> int:
        """Inner steps now: the training number in training mode, the test number otherwise."""
        return self.inner_steps if self.training else self.test_steps

    @property
    def first_order_now(self) -> bool:
        """Whether this outer step's meta-gradient treats inner gradients as constants."""
        return self.first_order_steps

    def set_training_step(self, step: int) -> None:
        self.training_step = int(step)

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(logits, labels)

    def query_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(logits, labels) if self.classification else float("nan")

    def loop_only(self) -> str | None:
        """Why this learner's settings need the per-task loop (None: any mode works)."""
        return "draw each task's mini-batches (inner_batch_size)" if self.inner_batch_size else None

    def batch_mode(self, tasks: Sequence) -> str:
        """``loop``, ``vmap`` or ``batched`` for this meta-batch.

        ``auto`` batches MLPs with batched matrix products (on the sinusoid MLP about 2x faster
        than vmap and 10x faster than the loop on a CPU), other models with vmap on a GPU, and
        loops over tasks for other models on a CPU: batching convolutional tasks there
        multiplies the activations' memory and spills them out of cache
        (benchmarks/maml_speed.py).
        """
        same_shapes = len({(t.support_x.shape, t.query_x.shape) for t in tasks}) == 1
        plain_head = not self.classification or (self.head_init == "learned"
                                                 and all(t.ways == self.head_ways for t in tasks))
        batched_ok = (self.batched_forward is not None and plain_head and self.loop_only() is None
                      and self.vmap_only() is None)
        if self.batch_tasks in ("vmap", "batched"):
            if not same_shapes:
                raise ConfigError(f"batch_tasks={self.batch_tasks} needs tasks of equal shapes; "
                                  f"use batch_tasks=loop")
            why = self.loop_only()
            if why:
                raise ConfigError(f"batch_tasks={self.batch_tasks} cannot {why}; use batch_tasks=loop")
            if self.batch_tasks == "batched" and self.batched_forward is None:
                raise ConfigError("batch_tasks=batched works for MLPs (Linear layers and activations) "
                                  "only; use vmap or loop for this model")
            if self.batch_tasks == "batched" and not batched_ok:
                raise ConfigError("batch_tasks=batched takes plain MAML tasks of the head's ways only; "
                                  "use vmap or loop with these options")
            return self.batch_tasks
        if self.batch_tasks == "auto" and same_shapes and len(tasks) > 1 and self.loop_only() is None:
            if batched_ok:
                return "batched"
            if next(self.model.parameters()).device.type == "cuda":
                return "vmap"
        return "loop"

    def vmap_only(self) -> str | None:
        """Settings the batched MLP path does not implement but vmap does (None: none)."""
        return None

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
                         self.adapted_names, optimizer=self.inner_update)

    # ------------------------------------------------------------------ parameters
    def meta_parameters(self) -> Params:
        """The meta-parameters by name: the starting point of every task's inner loop (the
        model's parameters, and any per-step ones a subclass adds)."""
        return dict(self.model.named_parameters())

    def rate_parameters(self) -> Params:
        """Learned inner learning rates by adapted parameter name (none by default)."""
        return {}

    def learning_rates(self, rates: Params | None = None) -> LearningRates:
        """The inner learning rate(s), from the learned ``rates`` (default: the learner's own);
        Meta-SGD and MAML++ override this."""
        return self.inner_lr

    def point(self) -> Point | None:
        """``point(params, k)``: the parameters the network uses at inner step ``k`` (None: the
        same at every step)."""
        return None

    def running_statistics(self, k: int) -> Statistics | None:
        """Batch-norm statistics to normalise queries by after ``k`` steps, when the learner
        keeps running ones (None: the support set's)."""
        return None

    def observer(self, forward: FunctionalForward) -> Callable[[int], ContextManager] | None:
        """``observe(k)``: a context in which passes at step ``k`` update running statistics
        (None: nothing to update)."""
        return None

    def inner_loop(self, forward: Forward | None = None, generic: bool = False) -> InnerLoop:
        forward = forward or (self.generic_forward if generic else self.forward)
        return InnerLoop(forward, self._loss, self.adapted_names, unused=forward.unused,
                         optimizer=self.inner_update, batch_size=self.inner_batch_size)

    # ------------------------------------------------------------------ heads of any ways
    def _check_replaceable_head(self, ways: int | None = None) -> None:
        """Refuse, in one line, a model whose head cannot be swapped for one of ``ways`` classes."""
        ok = self.split is not None and self.generic_split is not None and self.head_ways is not None
        if ok and isinstance(self.model, nn.Sequential):
            head_part = self.split[1].module
            ok = [type(m) for m in head_part.modules() if not isinstance(m, nn.Sequential)] == [nn.Linear]
        if not ok:
            what = (f"tasks of {ways} classes" if ways is not None else "a head of prototypes (head_init=prototypes)")
            trained = f"its {self.head_ways}-way head" if self.head_ways else "its output layer"
            raise ConfigError(f"{self.algo} cannot adapt {type(self.model).__name__} to {what}: kshot replaces the "
                              f"model's last layer by a prototype head, and {trained} is not a plain linear "
                              f"last layer; adapt with tasks of {self.head_ways or 'its'} classes")

    def needs_prototype_head(self, ways: int) -> bool:
        """Whether a task of ``ways`` classes starts from a prototype head (Proto-MAML's)."""
        if not self.classification:
            return False
        return self.head_init == "prototypes" or (self.head_ways is not None and ways != self.head_ways)

    def _head_rates(self, lr: LearningRates, ways: int) -> LearningRates:
        """Learned per-entry rates (Meta-SGD) of a head of other ways: each class row's rates
        are exchangeable (labels are assigned at random), so every row takes their mean."""
        weight, *bias = self.head_names

        def fit(rate: Rates) -> Rates:
            if not isinstance(rate, dict):
                return rate
            out = dict(rate)
            for name in (weight, *bias):
                r = rate.get(name)
                if r is not None and r.dim() >= 1 and r.shape[0] != ways:
                    out[name] = r.mean(0, keepdim=True).expand(ways, *r.shape[1:])
            return out
        return (lambda k: fit(lr(k))) if callable(lr) else fit(lr)

    # ------------------------------------------------------------------ one task
    def adapt_task(self, params: Params, lr: LearningRates, support_x: torch.Tensor, support_y: torch.Tensor,
                   ways: int, steps: int, create_graph: bool, *, keep_trajectory: bool = False,
                   generic: bool = False, functional: bool = False, observe: bool = False,
                   differentiable: bool = True) -> tuple[TaskAdaptation, list[torch.Tensor]]:
        """Adapt to one task from ``params``: the inner loop, and how to predict after it.

        Args:
            params, lr: the starting parameters and the inner learning rate(s).
            support_x, support_y: the task's support set.
            ways: its number of classes (a head of other ways starts from its prototypes).
            steps: inner steps.
            create_graph: second order (see :class:`InnerLoop`).
            keep_trajectory: keep the parameters after every step (else only the last).
            generic, functional: the ``functional_call`` forward and ``torch.func.grad``, for vmap.
            observe: update the learner's running statistics along the way.
            differentiable: the result is differentiated with respect to ``params`` (training).

        Returns:
            The :class:`TaskAdaptation`, and the support loss before each step.
        """
        point = self.point()
        split = self.generic_split if generic else self.split
        prototype = self.needs_prototype_head(ways)
        if prototype:
            self._check_replaceable_head(None if self.head_init == "prototypes" else ways)
            if not functional:  # under vmap the caller checks the stacked labels
                check_classes(support_y, ways)
        transductive = self.transductive
        encode: Callable[[torch.Tensor], torch.Tensor] = _identity
        if self.features_once and split is not None:  # ANIL: the body's features once, the head adapts on them
            body, forward = split
            body_params = params
            if transductive or not body.batch_norms:
                support_in = body(body_params, support_x)
                encode = lambda x: body(body_params, x)  # noqa: E731
            else:
                support_in, body_stats = body.statistics(body_params, support_x)
                encode = lambda x: body.with_statistics(body_params, body_stats, x)  # noqa: E731
        else:
            forward = Composed(*split) if prototype else (self.generic_forward if generic else self.forward)
            support_in = support_x
        if prototype:
            weight, *bias = self.head_names
            if self.features_once and split is not None:
                features = support_in
            else:
                start = point(params, 0) if point is not None else params
                features = split[0](start, support_x)
            w, b = prototype_head(features, support_y, ways)
            if not functional:
                if differentiable:
                    # The inner gradient at step 0 is a partial derivative: the body's parameters
                    # enter the loop as new nodes, so that it does not flow back through the
                    # prototypes (the meta-gradient still does, through these identities).
                    params = {n: (p.view_as(p) if n in self.adapted_names else p) for n, p in params.items()}
                else:
                    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
            params = {**params, weight: w, **({bias[0]: b} if bias else {})}
            lr = self._head_rates(lr, ways)
        names = self.adapted_names
        if prototype and self.head_init == "learned":
            # The body's initialisation was meta-learned under a learned head of other ways; with a
            # prototype head (weights of the features' size) its steps at the trained rate overshoot
            # (docs/MAML.md measures it), so only the new head adapts on the body's features.
            names = tuple(self.head_names)
        inner = InnerLoop(forward, self._loss, names, unused=forward.unused, optimizer=self.inner_update,
                          batch_size=self.inner_batch_size)
        watch = self.observer(forward) if observe else None
        result = inner.adapt(params, support_in, support_y, steps, lr, create_graph, functional=functional,
                             keep_trajectory=keep_trajectory, point=point, observe=watch,
                             state=self.carried_inner_state())
        trajectory = result.trajectory if keep_trajectory else [result.params]
        running = None if (self.training or transductive) else self.running_statistics
        adaptation = TaskAdaptation(self, forward, trajectory, steps, support_in, encode, point, transductive,
                                    observe=watch, running=running if self._keeps_running() else None)
        return adaptation, result.support_losses

    def _keeps_running(self) -> bool:
        return False

    def carried_inner_state(self) -> dict | None:
        """The inner optimiser's state a task starts from (None: a fresh one on every task)."""
        return None

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
            lr = self.learning_rates({n: v.detach() for n, v in self.rate_parameters().items()})
        create_graph = differentiable and not self.first_order_now
        keep = not differentiable or self.step_weights() is not None
        with torch.enable_grad(), twice_differentiable(create_graph):
            adaptation, _ = self.adapt_task(params, lr, support_x, support_y, ways, self.steps, create_graph,
                                            keep_trajectory=keep, observe=differentiable and self.training,
                                            differentiable=differentiable)
        if not differentiable:
            adaptation.trajectory = [{n: p.detach() for n, p in step.items()} for step in adaptation.trajectory]
            adaptation.support_in = adaptation.support_in.detach()
        return AdaptedPredictor(self, adaptation, ways, support=(support_x, support_y),
                                keeps_trajectory=not differentiable)

    def step_weights(self) -> list[float] | None:
        """Weights of the query loss after each inner step (MAML++'s multi-step loss), or None:
        the loss after the last step alone."""
        return None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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
    found = head_layer(model)
    if found is None:
        raise ConfigError("the model has no parameters to adapt")
    prefix = f"{found[0]}." if found[0] else ""
    return [n for n, _ in model.named_parameters() if n.startswith(prefix) and "." not in n[len(prefix):]]
