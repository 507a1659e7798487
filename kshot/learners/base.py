"""The contract between learners and everything else.

A learner does two things:

* ``adapt(support_x, support_y)`` turns one task's support set into a :class:`Predictor` for
  that task's classes (prototypes, fine-tuned weights, a similarity to the support examples).
* ``meta_gradient(tasks)`` leaves in ``.grad`` of its meta-parameters the gradient of the mean
  query loss over a meta-batch, and returns metrics. The trainer knows learners only through
  this method (plus ``state_dict``), so any learner trains, resumes and distributes alike.

The default ``meta_gradient`` is the textbook loop, written with the public API: for each task,
``adapt`` on the support set, loss on the query set; average; backward. Learners override it
only to compute the same numbers faster, and tests hold them to that.

A prediction is *non-transductive* when each query's scores depend on the support set and on
that query alone, whatever else is in its batch; *transductive* when batch norm normalises a
query batch by its own statistics (MAML's treatment in Finn et al. 2017). Every learner predicts
non-transductively unless it is built for, and asked for, the transductive protocol
(:meth:`Learner.inference`); results name the protocol they used.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kshot.errors import ConfigError
from kshot.models import create_model, input_kwargs, model_spec
from kshot.tasks import Task, TaskSampler


class Predictor:
    """A learner adapted to one task: maps inputs to scores over that task's ``ways`` classes.

    Args:
        logits_fn: inputs ``[n, ...]`` -> scores ``[n, ways]`` (higher means more likely).
        ways: number of classes of the task.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], ways: int):
        self._logits_fn = logits_fn
        self.ways = ways

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits_fn(x)

    __call__ = logits

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[n, ways]``."""
        return self.logits(x).softmax(-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``[n]`` in 0..ways-1."""
        return self.logits(x).argmax(-1)


class TrainingReport(Protocol):
    """What a learner's :meth:`Learner.after_training` hands back to the trainer."""

    def summary(self) -> dict:
        """JSON-able figures, recorded in the run's ``results.json``."""

    def write(self, run_dir: Path) -> None:
        """Write the report's files (tables, plots) into the run directory."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def check_classes(support_y: torch.Tensor, ways: int) -> None:
    """Refuse, in one line, a support set in which some of the ``ways`` classes have no example."""
    counts = torch.bincount(support_y.flatten(), minlength=ways)[:ways] if support_y.dim() == 1 else \
        torch.stack([torch.bincount(y, minlength=ways)[:ways] for y in support_y])
    if bool((counts == 0).any()):
        missing = sorted(set(torch.nonzero(counts == 0)[:, -1].tolist()))
        raise ConfigError(f"classes {missing} have no support examples; every class needs at least one")


def class_means(support_z: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean of each class's rows: ``[ways, d]`` from ``support_z [n, d]`` and labels ``[n]``, every
    class present (no data-dependent check: composable with ``torch.func.vmap``)."""
    one_hot = (support_y[:, None] == torch.arange(ways, device=support_y.device)).to(support_z.dtype)  # [n, ways]
    return (one_hot.T @ support_z) / one_hot.sum(0)[:, None]


def prototypes(support_z: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding of each class: ``[ways, d]`` from ``support_z [n, d]`` and labels ``[n]``."""
    check_classes(support_y, ways)
    return class_means(support_z, support_y, ways)


def protocol_name(transductive: bool) -> str:
    """How a result's queries were normalised, in words for result lines."""
    return "transductive" if transductive else "non-transductive"


class Learner(nn.Module, ABC):
    """Base class of every meta-learner. Subclasses set ``algo`` and implement :meth:`adapt`."""

    #: Registry name of the algorithm (``protonet``, ``maml``, ...).
    algo: ClassVar[str]
    #: TrainConfig fields this learner takes as constructor options.
    config_options: ClassVar[tuple[str, ...]] = ()
    #: Whether the learner can predict transductively (batch norm over each query batch).
    supports_transductive: ClassVar[bool] = False
    #: The protocol its predictions follow now (see the module docstring).
    transductive: bool = False
    #: Whether the learner takes its outer step itself (:meth:`outer_step`: TRPO's line search,
    #: several optimiser steps per meta-batch) instead of leaving a gradient for the trainer's.
    takes_outer_step: ClassVar[bool] = False

    @classmethod
    def backbone_overrides(cls, config) -> dict:
        """Backbone arguments the algorithm itself requires (e.g. a linear head of ``ways``)."""
        return {}

    @classmethod
    def build_model(cls, config, example_shape: Sequence[int]) -> nn.Module:
        """The backbone named by ``config``, for examples of ``example_shape``."""
        kwargs = {**input_kwargs(config.backbone, example_shape), **cls.backbone_overrides(config),
                  **config.backbone_options}
        return create_model(config.backbone, **kwargs)

    @classmethod
    def from_config(cls, config, example_shape: Sequence[int]) -> "Learner":
        """Build the backbone named by ``config`` for examples of ``example_shape``, and wrap it."""
        model = cls.build_model(config, example_shape)
        return cls(model, **{name: getattr(config, name) for name in cls.config_options})

    @classmethod
    def for_training(cls, config, source) -> "Learner":
        """The learner to train on ``source`` (what :meth:`make_sampler` made): by default as
        :meth:`from_config` builds it for the source's example shape; learners that need more
        of their training data (the number of classes of a pre-training head) read it here."""
        return cls.from_config(config, source.example_shape)

    @classmethod
    def from_saved_options(cls, model: nn.Module, options: dict) -> "Learner":
        """Wrap ``model`` with options read from a checkpoint (which may predate some options)."""
        return cls(model, **options)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def protocol(self) -> str:
        """``transductive`` or ``non-transductive``: how predictions treat the other queries."""
        return protocol_name(self.transductive)

    @contextlib.contextmanager
    def inference(self, transductive: bool | None = None):
        """A context in which predictions follow the given protocol (None: the learner's own).

        Raises:
            ConfigError: for ``transductive=True`` on a learner whose predictions never depend
                on the other queries.
        """
        if transductive is None or bool(transductive) == self.transductive:
            yield
            return
        if transductive and not self.supports_transductive:
            raise ConfigError(f"{self.algo}'s predictions never depend on the other queries, so there is no "
                              f"transductive protocol for it; drop --transductive")
        before = self.transductive
        self.transductive = bool(transductive)
        try:
            yield
        finally:
            self.transductive = before

    def set_training_step(self, step: int) -> None:
        """Called by the trainer before each outer step, for settings that follow a schedule
        over training (MAML++'s loss weights and derivative order). Nothing by default."""

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              ways: int | None = None) -> Predictor:
        """A predictor for the task whose labelled support set is given.

        In training mode with gradients enabled the predictor stays differentiable with respect
        to the meta-parameters, so ``loss(adapt(...)(query_x), query_y).backward()`` meta-trains.
        """

    @classmethod
    def make_sampler(cls, config, dataset) -> TaskSampler:
        """The source of training tasks for this algorithm: N-way K-shot tasks by default, or
        Meta-Dataset episodes (``config.episodes == "variable"``); one source per task."""
        from kshot.tasks.sources import sampler_from_config

        return sampler_from_config(config, dataset)

    def after_training(self, val_dataset) -> TrainingReport | None:
        """Called once when training ends, with the best weights loaded and the meta-validation
        classes (a FewShotDataset); may set buffers (e.g. a calibrated decision threshold),
        which the trainer then saves into the best checkpoint. Nothing to do by default."""
        return None

    def options(self) -> dict:
        """The learner's own settings (everything but the model), as saved in checkpoints."""
        return {}

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this learner: algorithm, options, backbone."""
        return {"algo": self.algo, "options": self.options(), "model": model_spec(self.model)}

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def query_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of queries classified right (NaN for learners of regression tasks)."""
        return accuracy(logits, labels)

    def meta_loss(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean query loss over ``tasks`` (differentiable) and metrics averaged over them."""
        total, correct = 0.0, 0.0
        losses = []
        for task in tasks:
            predictor = self.adapt(task.support_x, task.support_y, task.ways)
            logits = predictor.logits(task.query_x)
            loss = self.query_loss(logits, task.query_y)
            losses.append(loss)
            total += loss.item()
            correct += self.query_accuracy(logits, task.query_y)
        n = len(tasks)
        return torch.stack(losses).mean(), {"loss": total / n, "acc": correct / n}

    def meta_gradient(self, tasks: Sequence[Task], scale: float = 1.0) -> dict[str, float]:
        """Accumulate ``scale * d(mean query loss)/d(meta-parameters)`` into ``.grad``."""
        loss, metrics = self.meta_loss(tasks)
        (loss * scale).backward()
        return metrics

    def outer_step(self, tasks: Sequence, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Update the meta-parameters on ``tasks`` and return metrics; the trainer calls this
        instead of ``meta_gradient`` and its optimiser's step when ``takes_outer_step`` is set
        (it has set the optimiser's learning rate for the step)."""
        raise NotImplementedError(f"{type(self).__name__} leaves its outer step to the trainer")
