"""Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999).

For each task of a meta-batch, a few gradient steps from the meta-parameters ``theta`` on all
of the task's labelled examples (support and query together) give ``phi``; the meta-update moves
``theta`` towards the mean of the ``phi``: ``theta <- theta + epsilon * mean(phi - theta)``.
:meth:`Reptile.meta_gradient` leaves ``theta - mean(phi)`` in ``.grad``, so the trainer's outer
optimiser makes the step: SGD without momentum and learning rate ``epsilon`` is the paper's
update (its ``epsilon`` is 1, annealed linearly to 0: ``--lr-schedule linear``).

No gradient flows through the inner steps, so Reptile costs what fine-tuning costs. At test
time a task is adapted on its support set only, exactly as MAML's is (``adapt``). The paper's
inner optimiser is Adam on mini-batches (``inner_optimizer="adam"``, ``inner_batch_size``; see
:mod:`kshot.learners.inner_optimizers`); plain SGD on every example is the default. Their code
keeps one Adam for the whole of training: ``inner_moments="carried"`` carries its moments from
each task to the next (in the meta-batch's order) and starts every test task from training's
last ones.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.inner_loop import GradientLearner
from kshot.learners.inner_optimizers import CarriedState, InnerAdam
from kshot.tasks import Task, stack_tasks

INNER_MOMENTS = ("reset", "carried")


class Reptile(GradientLearner):
    """Reptile around any model; see the module docstring and
    :class:`~kshot.learners.inner_loop.GradientLearner` for the arguments, and
    ``inner_moments``: ``reset`` (fresh inner Adam moments on every task) or ``carried``."""

    algo = "reptile"
    config_options = (*GradientLearner.config_options, "inner_moments")
    first_order_steps = True
    #: Reptile's meta-gradient moves the head towards adapted heads, so the head is learned; tasks
    #: of other ways than the head still start from a prototype head at test time.
    head_inits = ("learned",)

    def __init__(self, model, *args, inner_moments: str = "reset", **kwargs):
        super().__init__(model, *args, **kwargs)
        if inner_moments not in INNER_MOMENTS:
            raise ConfigError(f"unknown inner_moments {inner_moments!r}; choose one of {', '.join(INNER_MOMENTS)}")
        if inner_moments == "carried" and not isinstance(self.inner_update, InnerAdam):
            raise ConfigError("inner_moments=carried carries Adam's moments from task to task; "
                              "set inner_optimizer=adam (plain SGD has none)")
        self.inner_moments = inner_moments
        #: Adam's moments carried from task to task (None: fresh on every task), for the parameters
        #: that adapt (not those the forward leaves out, such as convolution biases under batch norm).
        unused = set(getattr(self.forward, "unused", ()))
        adapted = {n: p for n, p in self.model.named_parameters() if n in self.adapted_names and n not in unused}
        self.carried = CarriedState(adapted) if inner_moments == "carried" else None

    def options(self) -> dict:
        options = super().options()
        if self.carried is not None:
            options["inner_moments"] = self.inner_moments
        return options

    def loop_only(self) -> str | None:
        if self.carried is not None:
            return "carry Adam's moments from one task to the next (inner_moments=carried)"
        return super().loop_only()

    def carried_inner_state(self) -> dict | None:
        return self.carried.state() if self.carried is not None else None

    def meta_gradient(self, tasks: Sequence[Task], scale: float = 1.0) -> dict[str, float]:
        """Accumulate ``scale * (theta - mean over tasks of phi)`` into ``.grad``.

        Returns the tasks' training loss before adaptation (``loss``) and at the last inner step.
        """
        if not tasks:
            raise ConfigError("a meta-batch needs at least one task")
        self.prepare_meta_batch()
        meta = {n: p.detach() for n, p in self.meta_parameters().items()}
        mode = self.batch_mode(tasks)
        vmapped = self.vmap_or_loop(self._adapt_vmap, tasks, meta) if mode == "vmap" else None
        if vmapped is not None:
            adapted, first, last = vmapped
        elif mode == "batched":
            adapted, first, last = self._adapt_batched(tasks, meta)
        else:
            adapted, first, last = self._adapt_loop(tasks, meta)
        for name, p in self.meta_parameters().items():
            g = (meta[name] - adapted[name]) * scale
            p.grad = g if p.grad is None else p.grad + g
        return {"loss": first, "loss_last_step": last}

    def _adapt_loop(self, tasks: Sequence[Task], meta: dict[str, torch.Tensor]):
        inner = self.inner_loop()
        total = {n: torch.zeros_like(p) for n, p in meta.items()}
        first, last = 0.0, 0.0
        for task in tasks:
            x = torch.cat([task.support_x, task.query_x])
            y = torch.cat([task.support_y, task.query_y])
            start = {n: p.clone().requires_grad_(n in inner.names) for n, p in meta.items()}
            with torch.enable_grad():
                result = inner.adapt(start, x, y, self.inner_steps, self.inner_lr, create_graph=False,
                                     state=self.carried_inner_state())
            if self.carried is not None:
                self.carried.update(result.state)
            for n, p in result.params.items():
                total[n] += p.detach()
            first += result.support_losses[0].item()
            last += result.support_losses[-1].item()
        n = len(tasks)
        return {k: v / n for k, v in total.items()}, first / n, last / n

    def _adapt_batched(self, tasks: Sequence[Task], meta: dict[str, torch.Tensor]):
        support_x, support_y, query_x, query_y = stack_tasks(tasks)
        x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        n = len(tasks)
        start = {name: p.expand(n, *p.shape).clone().requires_grad_() for name, p in meta.items()}
        with torch.enable_grad():
            result = self.batched_inner_loop().adapt(start, x, y, self.inner_steps, self.inner_lr,
                                                     create_graph=False)
        return ({name: p.detach().mean(0) for name, p in result.params.items()},
                result.support_losses[0].item() / n, result.support_losses[-1].item() / n)

    def _adapt_vmap(self, tasks: Sequence[Task], meta: dict[str, torch.Tensor]):
        support_x, support_y, query_x, query_y = stack_tasks(tasks)
        x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        inner = self.inner_loop(generic=True)
        steps, lr = self.inner_steps, self.inner_lr

        def adapt_one(theta, xs, ys):
            result = inner.adapt(theta, xs, ys, steps, lr, create_graph=False, functional=True)
            return result.params, result.support_losses[0], result.support_losses[-1]

        with torch.enable_grad():
            params, first, last = torch.func.vmap(adapt_one, in_dims=(None, 0, 0))(meta, x, y)
        return ({n: p.detach().mean(0) for n, p in params.items()}, first.mean().item(), last.mean().item())


# Nichol, Achiam and Schulman 2018, Table 1 (97.68%, transductive) and their code's Omniglot
# command: Finn et al.'s strided Conv4; per task 5 iterations of Adam (rate 1e-3, beta1 0) on
# mini-batches of 10 from 10 examples per class (here 5 support + 5 query); meta-batch 5, outer
# step 1 annealed linearly to 0 over 100,000 iterations; at test 50 Adam iterations on the support
# set (5 images: every iteration takes them all), batch norm over each test batch (transductive).
# Their one Adam keeps its moments from task to task and into the test (inner_moments carried).
register_preset(
    "reptile-omniglot-5way-1shot",
    "Reptile, Omniglot 5-way 1-shot (Nichol et al. 2018: 97.68%, transductive), one Adam carried across tasks",
    dict(algo="reptile", dataset="omniglot", protocol="vinyals", image_size=28, backbone="conv4",
         backbone_options={"pool": "stride"}, transductive=True, ways=5, shots=5, queries=5, test_ways=5,
         test_shots=1, test_queries=15, meta_batch_size=5, inner_steps=5, inner_lr=1e-3, inner_optimizer="adam",
         inner_batch_size=10, inner_moments="carried", test_inner_steps=50, optimizer="sgd", momentum=0.0,
         lr=1.0, lr_schedule="linear",
         steps=100_000, val_every=5000, val_tasks=200, checkpoint_every=1000, log_every=200, test_tasks=1000))
