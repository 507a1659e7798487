"""MAML and its family: options of one inner loop (:mod:`kshot.learners.inner_loop`).

* ``maml``: Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, ICML 2017,
  arXiv:1703.03400). The meta-parameters are the initialisation; the meta-gradient flows
  through the inner gradient steps (second order).
* ``fomaml``: first-order MAML (same paper, section 5.2): the inner gradients are treated as
  constants, so the meta-gradient is the query gradient at the adapted parameters.
* ``metasgd``: Meta-SGD (Li, Zhou, Chen and Li 2017, arXiv:1707.09835): a learned inner
  learning rate per parameter entry, meta-trained with the initialisation.
* ``anil``: Almost No Inner Loop (Raghu, Raghu, Bengio and Vinyals, ICLR 2020,
  arXiv:1909.09157): only the head (the model's last layer) adapts in the inner loop; the body's
  features of a task are computed once.

MAML++ (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502)
is a set of options of the same learner, each off by default and free when off:

* ``multi_step_loss=N``: for the first N outer steps the meta-objective is
  ``sum_k w_k L_query(theta_k)`` over the inner steps ``k = 1..S``, with weights that start
  uniform and anneal towards the last step (:func:`multi_step_loss_weights`); then the last
  step's loss alone (MSL).
* ``per_step_lr``: a learned inner learning rate per parameter tensor (layer) and per step,
  all starting at ``inner_lr`` (LSLR).
* ``per_step_bn``: batch-norm weights and biases per inner step, meta-learned and not adapted in
  the inner loop (BNWB). The network at step ``k`` (the support pass of step ``k``, the query
  pass after ``k`` steps) uses set ``k`` of ``S + 1``; test-time steps beyond ``S`` use set ``S``.
* ``per_step_bn_stats``: running batch-norm statistics per inner step, updated (momentum 0.1)
  by every batch normalised at that step in meta-training; non-transductive predictions
  normalise queries by them instead of by the support set (BNRS).
* ``second_order_after=N``: first-order meta-gradients for the first N outer steps, then second
  order (derivative-order annealing, DA).
* cosine annealing of the outer learning rate is the trainer's ``lr_schedule="cosine"``.

The schedules follow the trainer's outer step (:meth:`~kshot.learners.base.Learner.set_training_step`).
Every variant is a :class:`MAML` with options, and ``meta_gradient`` is the textbook loop, made
fast: for each task, adapt on the support set, loss on the query set, backward (tasks one after
another, freeing each task's graph), or the whole meta-batch at once under ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.base import check_classes
from kshot.learners.functional import FunctionalForward, Params, Statistics, batch_moments, batch_norm_layers
from kshot.learners.inner_loop import (GradientLearner, LearningRates, Point, TaskAdaptation, param_key,
                                       twice_differentiable)
from kshot.learners.inner_optimizers import InnerOptimizer
from kshot.tasks import Task, stack_tasks

#: Prefix of the per-step batch-norm parameters among the meta-parameters.
STEP_BN = "step_bn:"
#: Momentum of the per-step running statistics (PyTorch's batch-norm default).
RUNNING_MOMENTUM = 0.1


def multi_step_loss_weights(steps: int, progress: float) -> list[float]:
    """MAML++'s per-step importance of the query losses after steps ``1..steps``.

    At ``progress`` 0 (the start of training) every step weighs ``1/steps``; as ``progress``
    goes to 1 (the end of the multi-step phase) the weights of steps before the last decay
    linearly to ``0.03/steps`` and the last step's grows to ``1 - (steps-1) * 0.03/steps``. The
    weights always sum to 1 (Antoniou et al. 2019, section 4, and their code, with the epoch
    fraction replaced by ``progress``).
    """
    floor = 0.03 / steps
    progress = min(max(float(progress), 0.0), 1.0)
    early = [max((1 - progress) / steps, floor) for _ in range(steps - 1)]
    last = min((1 + progress * (steps - 1)) / steps, 1 - (steps - 1) * floor)
    return early + [last]


class MAML(GradientLearner):
    """MAML around any model that maps inputs to scores (or regression outputs).

    Args:
        model: the network to meta-train; its batch norm uses per-batch statistics.
        inner_steps, inner_lr, test_inner_steps, batch_tasks, loss, transductive, head_init: see
            :class:`~kshot.learners.inner_loop.GradientLearner`.
        first_order: drop the second-order term of the meta-gradient (first-order MAML).
        multi_step_loss, per_step_lr, per_step_bn, per_step_bn_stats, second_order_after:
            MAML++'s options (see the module docstring).

    Example, the textbook loop with this API::

        for task in meta_batch:
            predictor = maml.adapt(task.support_x, task.support_y)
            loss = maml.query_loss(predictor(task.query_x), task.query_y)
            (loss / len(meta_batch)).backward()
        optimizer.step()
    """

    algo = "maml"
    config_options = GradientLearner.config_options + ("multi_step_loss", "per_step_lr", "per_step_bn",
                                                       "per_step_bn_stats", "second_order_after")
    #: Default of the first_order option (the fomaml subclass flips it).
    default_first_order = False

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 test_inner_steps: int = 0, batch_tasks: str = "auto", loss: str = "cross_entropy",
                 first_order: bool | None = None, inner_params: str | Sequence[str] = (), *,
                 transductive: bool = False, head_init: str = "learned", multi_step_loss: int = 0,
                 per_step_lr: bool = False, per_step_bn: bool = False, per_step_bn_stats: bool = False,
                 second_order_after: int = 0, inner_optimizer: str | InnerOptimizer = "sgd",
                 inner_batch_size: int = 0):
        super().__init__(model, inner_steps, inner_lr, test_inner_steps, batch_tasks, loss, inner_params,
                         transductive=transductive, head_init=head_init, inner_optimizer=inner_optimizer,
                         inner_batch_size=inner_batch_size)
        self.first_order = self.default_first_order if first_order is None else bool(first_order)
        self.first_order_steps = self.first_order
        for name, value in (("multi_step_loss", multi_step_loss), ("second_order_after", second_order_after)):
            if int(value) != value or value < 0:
                raise ConfigError(f"{name} must be a number of outer steps >= 0, not {value!r}")
        self.multi_step_loss, self.second_order_after = int(multi_step_loss), int(second_order_after)
        self.per_step_lr, self.per_step_bn = bool(per_step_lr), bool(per_step_bn)
        self.per_step_bn_stats = bool(per_step_bn_stats)
        norms = batch_norm_layers(self.model)
        if (self.per_step_bn or self.per_step_bn_stats) and self.features_once:
            raise ConfigError(f"{self.algo} computes the body's features once per task, so batch norm cannot "
                              f"change with the inner step; drop per_step_bn and per_step_bn_stats")
        if (self.per_step_bn or self.per_step_bn_stats) and not norms:
            raise ConfigError("per_step_bn and per_step_bn_stats need a model with batch norm on the batch")
        slots = self.inner_steps + 1  # the network after 0..S steps
        if self.per_step_bn:
            tables, bn_params = {}, set()
            for layer_name, layer in norms.items():
                if not layer.affine:
                    continue
                for kind in ("weight", "bias"):
                    name = f"{layer_name}.{kind}"
                    bn_params.add(name)
                    tables[param_key(name)] = nn.Parameter(getattr(layer, kind).detach().repeat(slots, 1))
            self.step_bn = nn.ParameterDict(tables)
            # MAML++: batch-norm parameters are meta-learned per step, not adapted in the inner loop.
            self.adapted_names = tuple(n for n in self.adapted_names if n not in bn_params)
            self._step_bn_names = sorted(bn_params)
        if self.per_step_bn_stats:
            self.step_statistics = nn.Module()
            for layer_name, layer in norms.items():
                key = param_key(layer_name)
                like = dict(dtype=layer.weight.dtype, device=layer.weight.device) if layer.affine else {}
                self.step_statistics.register_buffer(f"{key}__mean", torch.zeros(slots, layer.num_features, **like))
                self.step_statistics.register_buffer(f"{key}__var", torch.ones(slots, layer.num_features, **like))
            self._norm_names = list(norms)
        if self.per_step_lr:
            own = dict(self.model.named_parameters())
            self.step_lrs = nn.ParameterDict({
                param_key(n): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr, dtype=own[n].dtype,
                                                      device=own[n].device))
                for n in self.adapted_names})

    def options(self) -> dict:
        return {**super().options(), "first_order": self.first_order, "multi_step_loss": self.multi_step_loss,
                "per_step_lr": self.per_step_lr, "per_step_bn": self.per_step_bn,
                "per_step_bn_stats": self.per_step_bn_stats, "second_order_after": self.second_order_after}

    # ------------------------------------------------------------------ MAML++ schedules
    @property
    def first_order_now(self) -> bool:
        return self.first_order or self.training_step < self.second_order_after

    def step_weights(self) -> list[float] | None:
        if not (self.training and self.multi_step_loss and self.training_step < self.multi_step_loss):
            return None
        return multi_step_loss_weights(self.inner_steps, self.training_step / self.multi_step_loss)

    def loop_only(self) -> str | None:
        return "update per-step running statistics in place" if self.per_step_bn_stats else super().loop_only()

    def vmap_only(self) -> str | None:
        options = self.multi_step_loss or self.per_step_lr or self.per_step_bn or self.head_init != "learned"
        return "MAML++ or prototype-head options" if options else None

    # ------------------------------------------------------------------ per-step parameters
    def meta_parameters(self) -> Params:
        params = dict(self.model.named_parameters())
        if self.per_step_bn:
            params.update({STEP_BN + name: self.step_bn[param_key(name)] for name in self._step_bn_names})
        return params

    def point(self) -> Point | None:
        if not self.per_step_bn:
            return None
        names, last = self._step_bn_names, self.inner_steps

        def at_step(params: Params, k: int) -> Params:
            out = {n: p for n, p in params.items() if not n.startswith(STEP_BN)}
            for name in names:
                out[name] = params[STEP_BN + name][min(k, last)]
            return out
        return at_step

    def rate_parameters(self) -> Params:
        if self.per_step_lr:
            return {n: self.step_lrs[param_key(n)] for n in self.adapted_names}
        return {}

    def learning_rates(self, rates: Params | None = None) -> LearningRates:
        if not self.per_step_lr:
            return self.inner_lr
        rates = self.rate_parameters() if rates is None else rates
        last = self.inner_steps - 1
        return lambda k: {n: r[min(k, last)] for n, r in rates.items()}

    def _keeps_running(self) -> bool:
        return self.per_step_bn_stats

    def running_statistics(self, k: int) -> Statistics | None:
        if not self.per_step_bn_stats:
            return None
        k = min(k, self.inner_steps)
        buffers = dict(self.step_statistics.named_buffers())
        return {name: (buffers[f"{param_key(name)}__mean"][k], buffers[f"{param_key(name)}__var"][k])
                for name in self._norm_names}

    def observer(self, forward: FunctionalForward) -> Callable[[int], ContextManager] | None:
        if not (self.per_step_bn_stats and self.training):
            return None
        buffers = dict(self.step_statistics.named_buffers())
        last = self.inner_steps

        def update(k: int, name: str, x: torch.Tensor) -> None:
            with torch.no_grad():
                mean, var = batch_moments(x.detach())
                n = x.numel() // max(x.shape[1], 1)
                row = min(k, last)
                running_mean, running_var = buffers[f"{param_key(name)}__mean"], buffers[f"{param_key(name)}__var"]
                running_mean[row].lerp_(mean.to(running_mean.dtype), RUNNING_MOMENTUM)
                running_var[row].lerp_((var * n / max(n - 1, 1)).to(running_var.dtype), RUNNING_MOMENTUM)

        def observe(k: int):
            return forward.observing(lambda name, x: update(k, name, x))
        return observe

    # ------------------------------------------------------------------ the meta-gradient
    def task_objective(self, adaptation: TaskAdaptation, query_x: torch.Tensor,
                       query_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-objective of one adapted task and the query outputs after the last step:
        the query loss after the last step, or MAML++'s weighted sum over steps."""
        weights = self.step_weights()
        if weights is None:
            out = adaptation.logits(query_x)
            return self._loss(out, query_y), out
        total = 0.0
        for k, weight in enumerate(weights, start=1):
            out = adaptation.logits(query_x, k)
            total = total + weight * self._loss(out, query_y)
        return total, out  # type: ignore[return-value]

    def meta_loss(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean meta-objective after adaptation (differentiable): the textbook loop through ``adapt``."""
        losses, correct = [], 0.0
        for task in tasks:
            predictor = self.adapt(task.support_x, task.support_y, task.ways)
            loss, out = self.task_objective(predictor.adaptation, task.query_x, task.query_y)
            losses.append(loss)
            correct += self.query_accuracy(out.detach(), task.query_y)
        loss = torch.stack(losses).mean()
        metrics = {"loss": loss.item()}
        if self.classification:
            metrics["acc"] = correct / len(tasks)
        return loss, metrics

    def meta_gradient(self, tasks: Sequence[Task], scale: float = 1.0) -> dict[str, float]:
        """Accumulate ``scale * d(mean query loss after adaptation)/d(meta-parameters)`` in ``.grad``.

        Returns the query loss (and accuracy) after adaptation and the support loss before it,
        averaged over the tasks (and MAML++'s weighted objective, ``multi_step_loss``, while it is on).
        """
        if not tasks:
            raise ConfigError("a meta-batch needs at least one task")
        self.prepare_meta_batch()
        mode = self.batch_mode(tasks)
        with twice_differentiable(not self.first_order_now):
            metrics = self.vmap_or_loop(self._meta_gradient_vmap, tasks, scale) if mode == "vmap" else None
            if metrics is None and mode == "batched":
                metrics = self._meta_gradient_batched(tasks, scale)
            elif metrics is None:
                metrics = self._meta_gradient_loop(tasks, scale)
        for p in self.parameters():  # parameters the output ignores get their exact gradient, 0
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return metrics

    def _meta_gradient_loop(self, tasks: Sequence[Task], scale: float) -> dict[str, float]:
        params, lr = self.meta_parameters(), self.learning_rates()
        create_graph = not self.first_order_now
        weight = scale / len(tasks)
        keep = self.step_weights() is not None
        objective, query_loss, support_loss, correct = 0.0, 0.0, 0.0, 0.0
        for task in tasks:
            adaptation, support_losses = self.adapt_task(params, lr, task.support_x, task.support_y, task.ways,
                                                         self.inner_steps, create_graph, keep_trajectory=keep,
                                                         observe=True)
            loss, out = self.task_objective(adaptation, task.query_x, task.query_y)
            (loss * weight).backward()
            objective += loss.item()
            query_loss += self._loss(out.detach(), task.query_y).item() if keep else loss.item()
            support_loss += support_losses[0].item()
            if self.classification:
                correct += self.query_accuracy(out.detach(), task.query_y)
        n = len(tasks)
        metrics = {"loss": query_loss / n, "support_loss_before": support_loss / n}
        if keep:
            metrics["multi_step_loss"] = objective / n
        if self.classification:
            metrics["acc"] = correct / n
        return metrics

    def _meta_gradient_batched(self, tasks: Sequence[Task], scale: float) -> dict[str, float]:
        support_x, support_y, query_x, query_y = stack_tasks(tasks)
        n = len(tasks)
        # Each task starts from the meta-parameters: views expanded over the task dimension,
        # whose gradient is the sum of the tasks' (exactly what the meta-gradient needs).
        params = {name: p.expand(n, *p.shape) for name, p in self.meta_parameters().items()}
        result = self.batched_inner_loop().adapt(params, support_x, support_y, self.inner_steps,
                                                 self.learning_rates(), create_graph=not self.first_order_now)
        out = self.batched_forward(result.params, query_x)
        losses = self.task_losses(out, query_y)
        (losses.sum() * (scale / n)).backward()
        metrics = {"loss": losses.mean().item(), "support_loss_before": result.support_losses[0].item() / n}
        if self.classification:
            metrics["acc"] = (out.detach().argmax(-1) == query_y).float().mean().item()
        return metrics

    def _meta_gradient_vmap(self, tasks: Sequence[Task], scale: float) -> dict[str, float]:
        support_x, support_y, query_x, query_y = stack_tasks(tasks)
        if self.needs_prototype_head(tasks[0].ways):
            check_classes(support_y, tasks[0].ways)
        meta = {n: p.detach() for n, p in self.meta_parameters().items()}
        own_rates = self.rate_parameters()
        rates = {n: v.detach() for n, v in own_rates.items()}
        ways, steps = tasks[0].ways, self.inner_steps
        create_graph, classification = not self.first_order_now, self.classification
        keep = self.step_weights() is not None

        def task_query_loss(theta, rate_tensors, sx, sy, qx, qy):
            adaptation, support_losses = self.adapt_task(theta, self.learning_rates(rate_tensors), sx, sy, ways,
                                                         steps, create_graph, keep_trajectory=keep, generic=True,
                                                         functional=True)
            loss, out = self.task_objective(adaptation, qx, qy)
            last = self._loss(out, qy).detach() if keep else loss.detach()
            acc = (out.argmax(-1) == qy).float().mean() if classification else loss.new_zeros(())
            return loss, (last, loss.detach(), acc, support_losses[0])

        per_task = torch.func.vmap(torch.func.grad(task_query_loss, argnums=(0, 1), has_aux=True),
                                   in_dims=(None, None, 0, 0, 0, 0))
        (g_params, g_rates), (losses, objectives, accs, support_losses) = per_task(meta, rates, support_x,
                                                                                  support_y, query_x, query_y)
        model_params = self.meta_parameters()
        for name, g in g_params.items():
            _accumulate(model_params[name], g.mean(0) * scale)
        for name, g in g_rates.items():
            _accumulate(own_rates[name], g.mean(0) * scale)
        metrics = {"loss": losses.mean().item(), "support_loss_before": support_losses.mean().item()}
        if keep:
            metrics["multi_step_loss"] = objectives.mean().item()
        if classification:
            metrics["acc"] = accs.mean().item()
        return metrics


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad


class FOMAML(MAML):
    """First-order MAML: ``MAML(..., first_order=True)``."""

    algo = "fomaml"
    default_first_order = True


class MetaSGD(MAML):
    """Meta-SGD: MAML with a learned inner learning rate per parameter entry.

    Args:
        lr_high: initialise the learning rates uniformly in ``[inner_lr, lr_high]`` (Li et al.
            draw them from [0.005, 0.1]); 0 or below ``inner_lr``: every rate starts at ``inner_lr``.
    """

    algo = "metasgd"
    config_options = MAML.config_options + ("metasgd_lr_high",)

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 test_inner_steps: int = 0, batch_tasks: str = "auto", loss: str = "cross_entropy",
                 first_order: bool | None = None, metasgd_lr_high: float = 0.0,
                 inner_params: str | Sequence[str] = (), **options):
        if options.get("per_step_lr"):
            raise ConfigError("metasgd learns a rate per parameter entry already; drop per_step_lr")
        super().__init__(model, inner_steps, inner_lr, test_inner_steps, batch_tasks, loss, first_order,
                         inner_params, **options)
        self.metasgd_lr_high = float(metasgd_lr_high)
        params = dict(self.model.named_parameters())
        rates = {}
        for name in self.adapted_names:
            rate = torch.full_like(params[name], self.inner_lr, requires_grad=False)
            if self.metasgd_lr_high > self.inner_lr:
                rate.uniform_(self.inner_lr, self.metasgd_lr_high)
            rates[param_key(name)] = nn.Parameter(rate)
        self.inner_lrs = nn.ParameterDict(rates)

    def options(self) -> dict:
        return {**super().options(), "metasgd_lr_high": self.metasgd_lr_high}

    def rate_parameters(self) -> Params:
        return {name: self.inner_lrs[param_key(name)] for name in self.adapted_names}

    def learning_rates(self, rates: Params | None = None) -> LearningRates:
        return self.rate_parameters() if rates is None else rates


class ANIL(MAML):
    """ANIL: MAML where only the head (the model's last parametrised layer) adapts."""

    algo = "anil"
    head_only = True


# ----------------------------------------------------------------------------- presets
def _maml_omniglot(algo: str, ways: int, shots: int) -> dict:
    # Finn et al. 2017, appendix A.1 and the authors' code: strided Conv4 with 64 filters, batch
    # norm on each batch, K support and K query examples per class; 5-way: 1 step of 0.4, 32
    # tasks per meta-batch; 20-way: 5 steps of 0.1, 16 tasks. Adam 1e-3, 60,000 meta-iterations.
    # Batch norm on each batch, queries included, in training and at test: Finn et al.'s
    # transductive protocol, named in every result.
    five = ways == 5
    return dict(algo=algo, dataset="omniglot", protocol="vinyals", image_size=28, backbone="conv4",
                transductive=True, backbone_options={"pool": "stride"}, ways=ways, shots=shots, queries=shots,
                test_ways=ways, test_shots=shots, test_queries=15,
                meta_batch_size=32 if five else 16, inner_steps=1 if five else 5,
                inner_lr=0.4 if five else 0.1, test_inner_steps=3 if five else 5,
                optimizer="adam", lr=1e-3, lr_schedule="constant", steps=60_000,
                val_every=2000, val_tasks=200, checkpoint_every=500, log_every=100)


_OMNIGLOT_PAPER = {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}
for (_ways, _shots), _acc in _OMNIGLOT_PAPER.items():
    register_preset(f"maml-omniglot-{_ways}way-{_shots}shot",
                    f"MAML, Omniglot {_ways}-way {_shots}-shot (Finn et al. 2017: {_acc}%)",
                    _maml_omniglot("maml", _ways, _shots))
register_preset("fomaml-omniglot-5way-1shot",
                "First-order MAML, Omniglot 5-way 1-shot (Finn et al. 2017: 98.3%)",
                _maml_omniglot("fomaml", 5, 1))
# Li et al. 2017, Table 2: 99.53% (5-way 1-shot), with Finn et al.'s network, data and schedule and
# one inner step; rates drawn in [0.005, 0.1] as for their regression experiments.
register_preset("metasgd-omniglot-5way-1shot",
                "Meta-SGD, Omniglot 5-way 1-shot (Li et al. 2017: 99.53%), Finn et al.'s setting, 1 step",
                {**_maml_omniglot("metasgd", 5, 1), "inner_lr": 0.005, "metasgd_lr_high": 0.1,
                 "test_inner_steps": 1})


def _mamlpp_omniglot(ways: int) -> dict:
    # Antoniou et al. 2019 and their released configurations (omniglot_maml++-omniglot_1_8_0.1_64_
    # {5,20}_0.json): Conv4 with 64 filters and max-pooling, 5 inner steps (also at test) from a
    # learned per-layer per-step rate initialised at 0.1, per-step batch-norm weights and running
    # statistics, the multi-step loss for the first 10 of 100 epochs of 500 steps, second order
    # throughout (their configurations set no derivative-order annealing; the paper's text anneals
    # for 50 epochs: --second-order-after 25000), 8 tasks per meta-batch, 1 query per class in
    # training, Adam 1e-3 with cosine annealing (to 0 here, 1e-5 there). Batch norm on the batch at
    # test as in their code (transductive). Differences: kshot's Vinyals split with rotated classes
    # instead of their random split with rotations, and one model instead of their ensemble of the
    # 5 best validation checkpoints.
    return dict(algo="maml", dataset="omniglot", protocol="vinyals", image_size=28, backbone="conv4",
                transductive=True, ways=ways, shots=1, queries=1, test_ways=ways, test_shots=1, test_queries=15,
                meta_batch_size=8, inner_steps=5, test_inner_steps=5, inner_lr=0.1, per_step_lr=True,
                per_step_bn=True, per_step_bn_stats=True, multi_step_loss=5000, second_order_after=0,
                optimizer="adam", lr=1e-3, lr_schedule="cosine", steps=50_000, val_every=2500, val_tasks=200,
                checkpoint_every=500, log_every=100, test_tasks=1000)


for _ways, _acc in ((5, 99.47), (20, 97.76)):
    register_preset(f"mamlpp-omniglot-{_ways}way-1shot",
                    f"MAML++, Omniglot {_ways}-way 1-shot (Antoniou et al. 2019: {_acc}%), their released settings",
                    _mamlpp_omniglot(_ways))


def _sinusoid(algo: str, shots: int) -> dict:
    # Finn et al. 2017, section 5.1: 40-40 ReLU MLP, K support and K query points per task,
    # 25 tasks per meta-batch, one inner step of 0.01, Adam 1e-3, 70,000 meta-iterations.
    # Tested, as Li et al. 2017 do, after one inner step, on 100 query points per task.
    return dict(algo=algo, dataset="sinusoid", backbone="mlp", backbone_options={"hidden": [40, 40]},
                ways=1, shots=shots, queries=shots, test_shots=shots, test_queries=100,
                meta_batch_size=25, inner_steps=1, inner_lr=0.01, test_inner_steps=1,
                optimizer="adam", lr=1e-3, lr_schedule="constant", steps=70_000,
                val_every=5000, val_tasks=600, checkpoint_every=5000, log_every=500, test_tasks=1000,
                threads=1)  # a 40-40 MLP gains nothing from more threads, and loses on a busy machine


for _shots, _mse in ((5, 1.13), (10, 0.77), (20, 0.48)):
    register_preset(f"maml-sinusoid-{_shots}shot",
                    f"MAML, sinusoid regression {_shots}-shot, 1 step (Li et al. 2017, Table 1: MSE {_mse})",
                    _sinusoid("maml", _shots))
for _shots, _mse in ((5, 0.90), (10, 0.53), (20, 0.31)):
    register_preset(f"metasgd-sinusoid-{_shots}shot",
                    f"Meta-SGD, sinusoid regression {_shots}-shot, 1 step (Li et al. 2017, Table 1: MSE {_mse})",
                    {**_sinusoid("metasgd", _shots), "inner_lr": 0.005, "metasgd_lr_high": 0.1})
