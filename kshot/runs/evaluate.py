"""Evaluation on fixed tasks: accuracy as mean ± 95% confidence interval over tasks.

The interval is the normal approximation used throughout the few-shot literature,
``1.96 * std(task accuracies) / sqrt(n_tasks)``: over 600+ tasks it is accurate, and papers
report it so, which makes figures comparable.

Every result names its protocol: ``non-transductive`` (each query scored from the support set
and itself alone) or ``transductive`` (batch norm over each task's query set, as Finn et al.
evaluated MAML); see :meth:`kshot.learners.base.Learner.inference`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kshot.config import MIN_TEST_TASKS, config_from_dict
from kshot.errors import ConfigError
from kshot.learners.base import Learner, protocol_name
from kshot.runs.build import evaluation_tasks, learner_from_checkpoint, resolve_device
from kshot.services.checkpoint import load_checkpoint
from kshot.services.distributed import Distributed
from kshot.tasks import Task, TaskSlice


@dataclass
class EvalResult:
    """Per-task accuracies (and losses) and their summary.

    For regression tasks the accuracies are NaN and the loss (MSE) is the figure to report.
    ``metrics`` holds further per-task values (e.g. losses at each inner step of a
    gradient-based learner), summarised by their means.
    """

    accuracies: np.ndarray
    losses: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    #: whether queries were normalised by their own batch (see the module docstring)
    transductive: bool = False

    @property
    def protocol(self) -> str:
        return protocol_name(self.transductive)

    @property
    def n_tasks(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        return confidence_interval(self.accuracies)

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def loss_ci95(self) -> float:
        return confidence_interval(self.losses)

    @property
    def is_regression(self) -> bool:
        return bool(np.isnan(self.accuracies).all()) and self.n_tasks > 0

    def summary(self) -> dict:
        return {"acc": self.mean, "acc_ci95": self.ci95, "loss": self.loss, "loss_ci95": self.loss_ci95,
                "tasks": self.n_tasks, "transductive": self.transductive,
                **{k: float(np.mean(v)) for k, v in self.metrics.items()}}

    def __str__(self) -> str:
        if self.is_regression:
            return f"MSE {self.loss:.4f} ± {self.loss_ci95:.4f} over {self.n_tasks} tasks ({self.protocol})"
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f} % over {self.n_tasks} tasks ({self.protocol})"


def confidence_interval(values: Sequence[float] | np.ndarray, z: float = 1.96) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(z * values.std(ddof=1) / math.sqrt(len(values)))


def evaluate(learner: Learner, tasks: Iterable[Task], device: str | torch.device = "cpu",
             progress: bool = False, desc: str = "evaluating", trace: bool = False,
             dist: Distributed | None = None, transductive: bool | None = None) -> EvalResult:
    """Adapt ``learner`` to each task's support set and score it on the task's queries.

    The learner is put in eval mode for the duration (batch norm uses its running statistics
    where it keeps them) and restored afterwards. With ``trace``, predictors that can say how
    adaptation went (gradient-based learners: support and query loss at each inner step) add
    those figures to the result's ``metrics``.

    In a distributed run (``dist``), each rank evaluates its share of the (sized) task sequence
    and every rank gets the whole result, per-task figures in task order, as one process
    would; the inner-loop ``trace`` is then left out.

    ``transductive`` chooses the protocol (None: the learner's own; True needs a learner with
    batch norm on the batch, and is refused with one line for the others).
    """
    if dist is not None and dist.enabled:
        return _evaluate_shared(learner, tasks, dist, device=device, progress=progress, desc=desc,
                                transductive=transductive)
    with learner.inference(transductive):
        return _evaluate(learner, tasks, device, progress, desc, trace)


def _evaluate(learner: Learner, tasks: Iterable[Task], device, progress: bool, desc: str, trace: bool) -> EvalResult:
    was_training = learner.training
    learner.eval()
    accs, losses = [], []
    traced: dict[str, list[float]] = {}
    total = len(tasks) if hasattr(tasks, "__len__") else None  # type: ignore[arg-type]
    try:
        for task in tqdm(tasks, total=total, desc=desc, disable=not progress, leave=False):
            task = task.to(device)
            with torch.no_grad():
                # adapt() enables gradients itself where it needs them (gradient-based learners).
                predictor = learner.adapt(task.support_x, task.support_y, task.ways)
                logits = predictor.logits(task.query_x)
                losses.append(learner.query_loss(logits, task.query_y).item())
                accs.append(learner.query_accuracy(logits, task.query_y))
                if trace and hasattr(predictor, "trace"):
                    for k, v in predictor.trace(task.query_x, task.query_y).items():
                        traced.setdefault(k, []).append(v)
    finally:
        learner.train(was_training)
    return EvalResult(np.array(accs, dtype=np.float64), np.array(losses),
                      {k: np.array(v) for k, v in traced.items() if len(v) == len(losses)},
                      transductive=learner.transductive)


def _evaluate_shared(learner: Learner, tasks: Sequence[Task], dist: Distributed, **kwargs) -> EvalResult:
    lo, hi = dist.share(len(tasks))
    mine = evaluate(learner, TaskSlice(tasks, lo, hi), progress=kwargs.pop("progress") and dist.is_main,
                    **kwargs)
    rows = torch.stack([torch.as_tensor(mine.accuracies, dtype=torch.float64),
                        torch.as_tensor(mine.losses, dtype=torch.float64)], 1).reshape(-1, 2)
    gathered = dist.gather_shares(rows, len(tasks)).numpy()
    return EvalResult(gathered[:, 0].copy(), gathered[:, 1].copy(), transductive=mine.transductive)


@dataclass
class CheckpointEvaluation:
    """What ``evaluate_checkpoint`` measured, and on which tasks (``description`` says it in words)."""

    result: EvalResult
    description: str
    record: dict

    def __str__(self) -> str:
        return f"{self.description}\n{self.result}"


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, ways: int = 0, shots: int = 0, queries: int = 15,
                        tasks: int = 1000, split: str = "test", seed: int | None = None,
                        within_groups: bool | None = None, episodes: str = "fixed",
                        dataset: str | None = None, protocol: str | None = None,
                        image_size: int | None = None, data_dir: str | None = None,
                        cache_dir: str | None = None, device: str = "cpu",
                        progress: bool = False, transductive: bool | None = None) -> CheckpointEvaluation:
    """Evaluate a saved learner on fixed test tasks, as ``kshot eval`` does.

    Unset options take the run's own settings (its test ways and shots, its dataset and split
    protocol, whether its tasks came from one class group, whether it was trained and validated
    transductively); ``dataset`` evaluates across domains. Any number of ways works: learners
    with a trained head start tasks of other ways from a head of prototypes.
    Refuses fewer than ``MIN_TEST_TASKS`` tasks: fewer give intervals too wide to compare.
    """
    if tasks < MIN_TEST_TASKS:
        raise ConfigError(f"--tasks {tasks}: report accuracy over at least {MIN_TEST_TASKS} tasks")
    ckpt = load_checkpoint(checkpoint)
    config = config_from_dict(ckpt.config)
    if dataset is not None and dataset != config.dataset and protocol is None:
        config.protocol = ""  # the trained dataset's protocol means nothing to another dataset
    overrides = {"dataset": dataset, "protocol": protocol, "data_dir": data_dir, "cache_dir": cache_dir,
                 "image_size": image_size}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    ways = ways or config.eval_ways
    shots = shots or config.eval_shots
    device = resolve_device(device)
    learner = learner_from_checkpoint(ckpt).to(device)
    within = config.test_within_groups if within_groups is None else within_groups
    task_set, shape = evaluation_tasks(config, split, tasks, ways=ways, shots=shots, queries=queries,
                                       seed=seed, within_groups=within, episodes=episodes, extra=ckpt.extra)
    result = evaluate(learner, task_set, device=device, progress=progress, transductive=transductive)
    described = (f"{ckpt.learner['algo']} on {config.dataset} ({config.protocol or 'default'} protocol) "
                 f"{split}: {shape}; {result.protocol} predictions")
    variable = episodes == "variable"
    record = {"checkpoint": str(checkpoint), "algo": ckpt.learner["algo"], "split": split,
              "episodes": episodes, "ways": None if variable else ways,
              "shots": None if variable else shots, "queries": None if variable else queries,
              "dataset": config.dataset, "protocol": config.protocol, "within_groups": within,
              "inference": result.protocol, **result.summary()}
    return CheckpointEvaluation(result, described, record)
