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

Every variant is a :class:`MAML` with options, and ``meta_gradient`` is the textbook loop, made
fast: for each task, adapt on the support set, loss on the query set, backward (tasks one after
another, freeing each task's graph), or the whole meta-batch at once under ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.inner_loop import GradientLearner, param_key, twice_differentiable
from kshot.tasks import Task, stack_tasks


class MAML(GradientLearner):
    """MAML around any model that maps inputs to scores (or regression outputs).

    Args:
        model: the network to meta-train; its batch norm uses per-batch statistics.
        inner_steps, inner_lr, test_inner_steps, batch_tasks, loss: see
            :class:`~kshot.learners.inner_loop.GradientLearner`.
        first_order: drop the second-order term of the meta-gradient (first-order MAML).

    Example, the textbook loop with this API::

        for task in meta_batch:
            predictor = maml.adapt(task.support_x, task.support_y)
            loss = maml.query_loss(predictor(task.query_x), task.query_y)
            (loss / len(meta_batch)).backward()
        optimizer.step()
    """

    algo = "maml"
    #: Default of the first_order option (the fomaml subclass flips it).
    default_first_order = False

    def __init__(self, model: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 test_inner_steps: int = 0, batch_tasks: str = "auto", loss: str = "cross_entropy",
                 first_order: bool | None = None, inner_params: str | Sequence[str] = ()):
        super().__init__(model, inner_steps, inner_lr, test_inner_steps, batch_tasks, loss, inner_params)
        self.first_order = self.default_first_order if first_order is None else bool(first_order)
        self.first_order_steps = self.first_order

    def options(self) -> dict:
        return {**super().options(), "first_order": self.first_order}

    # ------------------------------------------------------------------ the meta-gradient
    def meta_loss(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean query loss after adaptation (differentiable): the textbook loop through ``adapt``."""
        losses, correct = [], 0.0
        for task in tasks:
            predictor = self.adapt(task.support_x, task.support_y, task.ways)
            out = predictor(task.query_x)
            losses.append(self.query_loss(out, task.query_y))
            correct += self.query_accuracy(out.detach(), task.query_y)
        loss = torch.stack(losses).mean()
        metrics = {"loss": loss.item()}
        if self.classification:
            metrics["acc"] = correct / len(tasks)
        return loss, metrics

    def meta_gradient(self, tasks: Sequence[Task], scale: float = 1.0) -> dict[str, float]:
        """Accumulate ``scale * d(mean query loss after adaptation)/d(meta-parameters)`` in ``.grad``.

        Returns the query loss (and accuracy) after adaptation and the support loss before it,
        averaged over the tasks.
        """
        if not tasks:
            raise ConfigError("a meta-batch needs at least one task")
        self.prepare_meta_batch()
        mode = self.batch_mode(tasks)
        with twice_differentiable(not self.first_order):
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
        create_graph = not self.first_order
        weight = scale / len(tasks)
        query_loss, support_loss, correct = 0.0, 0.0, 0.0
        for task in tasks:
            if self.split is not None:
                body, head = self.split
                support_in, query_in = body(params, task.support_x), body(params, task.query_x)
                inner, forward = self.inner_loop(head), head
            else:
                support_in, query_in = task.support_x, task.query_x
                inner, forward = self.inner_loop(), self.forward
            result = inner.adapt(params, support_in, task.support_y, self.inner_steps, lr, create_graph)
            out = forward(result.params, query_in)
            loss = self._loss(out, task.query_y)
            (loss * weight).backward()
            query_loss += loss.item()
            support_loss += result.support_losses[0].item()
            if self.classification:
                correct += self.query_accuracy(out.detach(), task.query_y)
        n = len(tasks)
        metrics = {"loss": query_loss / n, "support_loss_before": support_loss / n}
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
                                                 self.learning_rates(), create_graph=not self.first_order)
        out = self.batched_forward(result.params, query_x)
        losses = self.task_losses(out, query_y)
        (losses.sum() * (scale / n)).backward()
        metrics = {"loss": losses.mean().item(), "support_loss_before": result.support_losses[0].item() / n}
        if self.classification:
            metrics["acc"] = (out.detach().argmax(-1) == query_y).float().mean().item()
        return metrics

    def _meta_gradient_vmap(self, tasks: Sequence[Task], scale: float) -> dict[str, float]:
        support_x, support_y, query_x, query_y = stack_tasks(tasks)
        meta = {n: p.detach() for n, p in self.meta_parameters().items()}
        lr = self.learning_rates()
        lrs = {n: v.detach() for n, v in lr.items()} if isinstance(lr, dict) else {}
        inner = self.inner_loop(generic=True)
        forward, loss_fn, steps = self.generic_forward, self._loss, self.inner_steps
        create_graph, classification = not self.first_order, self.classification

        def task_query_loss(theta, rates, sx, sy, qx, qy):
            result = inner.adapt(theta, sx, sy, steps, rates if rates else lr, create_graph, functional=True)
            out = forward(result.params, qx)
            loss = loss_fn(out, qy)
            acc = (out.argmax(-1) == qy).float().mean() if classification else loss.new_zeros(())
            return loss, (loss.detach(), acc, result.support_losses[0])

        per_task = torch.func.vmap(torch.func.grad(task_query_loss, argnums=(0, 1), has_aux=True),
                                   in_dims=(None, None, 0, 0, 0, 0))
        (g_params, g_lrs), (losses, accs, support_losses) = per_task(meta, lrs, support_x, support_y,
                                                                     query_x, query_y)
        model_params = self.meta_parameters()
        for name, g in g_params.items():
            _accumulate(model_params[name], g.mean(0) * scale)
        if isinstance(lr, dict):
            for name, g in g_lrs.items():
                _accumulate(lr[name], g.mean(0) * scale)
        metrics = {"loss": losses.mean().item(), "support_loss_before": support_losses.mean().item()}
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
                 inner_params: str | Sequence[str] = ()):
        super().__init__(model, inner_steps, inner_lr, test_inner_steps, batch_tasks, loss, first_order,
                         inner_params)
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

    def learning_rates(self) -> dict[str, torch.Tensor]:
        return {name: self.inner_lrs[param_key(name)] for name in self.adapted_names}


class ANIL(MAML):
    """ANIL: MAML where only the head (the model's last parametrised layer) adapts."""

    algo = "anil"
    head_only = True


# ----------------------------------------------------------------------------- presets
def _maml_omniglot(algo: str, ways: int, shots: int) -> dict:
    # Finn et al. 2017, appendix A.1 and the authors' code: strided Conv4 with 64 filters, batch
    # norm on each batch, K support and K query examples per class; 5-way: 1 step of 0.4, 32
    # tasks per meta-batch; 20-way: 5 steps of 0.1, 16 tasks. Adam 1e-3, 60,000 meta-iterations.
    five = ways == 5
    return dict(algo=algo, dataset="omniglot", protocol="vinyals", image_size=28, backbone="conv4",
                backbone_options={"pool": "stride"}, ways=ways, shots=shots, queries=shots,
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
