"""Evaluation on fixed tasks: accuracy as mean ± 95% confidence interval over tasks.

The interval is the normal approximation used throughout the few-shot literature,
``1.96 * std(task accuracies) / sqrt(n_tasks)``: over 600+ tasks it is accurate, and papers
report it so, which makes figures comparable.

Every result names its protocol: ``non-transductive`` (each query scored from the support set
and itself alone) or ``transductive`` (batch norm over each task's query set, as Finn et al.
evaluated MAML); see :meth:`kshot.learners.base.Learner.inference`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kshot.config import MIN_TEST_TASKS, TrainConfig
from kshot.data import SPLIT_FILE_DATASETS
from kshot.data.multisource import SOURCE_SEPARATOR
from kshot.errors import CheckpointError, ConfigError, DataError
from kshot.learners.base import Learner, protocol_name
from kshot.recsys import RatingReport, evaluate_rating_learner, is_rating_dataset
from kshot.rl import POLICY_LEARNERS, PolicyEvaluation
from kshot.rl.plots import plot_returns
from kshot.runs.build import (build_learner, config_of, evaluation_tasks, learner_from_checkpoint, load_split,
                              resolve_device)
from kshot.services.checkpoint import load_checkpoint
from kshot.services.distributed import Distributed
from kshot.services.files import atomic_write_text, check_writable
from kshot.tasks import Task, TaskSlice
from kshot.text import IntentResult, evaluate_released, same_encoder


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

    A learner with its own ``evaluate_tasks`` (the policies of :mod:`kshot.rl`, whose tasks are
    environments) evaluates itself: its result reports the return after each adaptation step,
    and its ``summary()`` the same keys the trainer reads (``acc`` NaN, ``loss`` minus the return).

    In a distributed run (``dist``), each rank evaluates its share of the (sized) task sequence
    and every rank gets the whole result, per-task figures in task order, as one process
    would; the inner-loop ``trace`` is then left out.

    ``transductive`` chooses the protocol (None: the learner's own; True needs a learner with
    batch norm on the batch, and is refused with one line for the others).
    """
    own = getattr(learner, "evaluate_tasks", None)
    if own is not None:  # policies: returns after each adaptation step, from their own rollouts
        return own(tasks, device=device, progress=progress, desc=desc, trace=trace)
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
    """What ``evaluate_checkpoint`` measured, and on which tasks (``description`` says it in words).

    ``report`` holds the recommendation metrics of a rating model (MAE, RMSE, nDCG@k per user)."""

    result: EvalResult | PolicyEvaluation
    description: str
    record: dict
    report: RatingReport | None = None
    plots: list[str] = field(default_factory=list)  # PNGs written (policies: returns, trajectories)

    def __str__(self) -> str:
        return f"{self.description}\n{self.result}"

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :attr:`record` as JSON, atomically; a path that cannot be written is a DataError."""
        path = check_writable(path, "the result file", DataError, "give --out a writable file")
        try:
            atomic_write_text(path, json.dumps(self.record, indent=2) + "\n")
        except OSError as e:
            raise DataError(f"cannot write the result file {path} ({e.strerror or e})") from None
        return path


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, ways: int = 0, shots: int = 0, queries: int = 15,
                        tasks: int = 1000, split: str = "test", seed: int | None = None,
                        within_groups: bool | None = None, episodes: str = "fixed",
                        dataset: str | None = None, protocol: str | None = None,
                        image_size: int | None = None, data_dir: str | None = None,
                        cache_dir: str | None = None, data_path: str | None = None, device: str = "cpu",
                        progress: bool = False, steps: int = 3, plot: str | os.PathLike | None = None,
                        transductive: bool | None = None, inner_steps: int | None = None,
                        head: str | None = None) -> CheckpointEvaluation:
    """Evaluate a saved learner on fixed test tasks, as ``kshot eval`` does.

    Unset options take the run's own settings (its test ways and shots, its dataset and split
    protocol, whether its tasks came from one class group, whether it was trained and validated
    transductively, its test-time inner steps); ``inner_steps`` adapts a learner of the MAML family
    or Reptile with that many gradient steps per task instead (papers report several numbers of
    steps for one model); ``head`` fits each task's head as another pre-trained baseline does,
    on the same frozen backbone (``rfs`` on a ``baseline`` checkpoint: both pre-train a linear
    head, so one pre-training serves both rows); ``dataset`` evaluates across domains,
    ``data_path`` finds a run's own folder or table where it is now. The checkpoint's data and
    cache directories are never used (``data_dir`` / ``cache_dir``, else the environment's and the
    defaults), nor is its class split file ever written: it must exist, as recorded or beside the
    checkpoint. Any number of ways works: learners with a trained head start tasks of other
    ways from a head of prototypes. Refuses fewer than ``MIN_TEST_TASKS`` tasks: fewer give intervals too wide to compare.

    A policy (``kshot.rl``) is tested on fixed tasks of its environment family: the average
    return after 0, 1, ..., ``steps`` adaptation steps, plotted to ``plot`` (a PNG; default
    ``returns-<split>.png`` beside the checkpoint), with 2D-navigation trajectories beside it.
    """
    if tasks < MIN_TEST_TASKS:
        raise ConfigError(f"--tasks {tasks}: report accuracy over at least {MIN_TEST_TASKS} tasks")
    for name, value, least in (("ways", ways, 0), ("shots", shots, 0), ("queries", queries, 1)):
        if value < least:
            raise ConfigError(f"--{name} must be at least {max(least, 1)}, not {value}")
    if ways == 1:
        raise ConfigError("--ways 1: one-way tasks have one possible answer; use 2 or more")
    ckpt = load_checkpoint(checkpoint)
    config = config_of(ckpt)  # checked, and with no path of the checkpoint's own
    if ckpt.learner.get("algo") in POLICY_LEARNERS:
        return _evaluate_policy(checkpoint, ckpt, config, tasks, split, seed, steps, device, progress, plot)
    pretrained_by = None
    if head is not None and head != ckpt.learner.get("algo"):
        pretrained_by = ckpt.learner.get("algo")
        ckpt.learner = {**ckpt.learner, "algo": _head_learner(head, pretrained_by)}
    learner = learner_from_checkpoint(ckpt)
    if inner_steps is not None:
        _set_test_steps(learner, inner_steps, ckpt.learner.get("algo"))
    if dataset is not None and dataset != config.dataset and protocol is None:
        config.protocol = ""  # the trained dataset's protocol means nothing to another dataset
    overrides = {"dataset": dataset, "protocol": protocol, "data_dir": data_dir, "cache_dir": cache_dir,
                 "image_size": image_size, "data_path": data_path}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if set(config.dataset.split(SOURCE_SEPARATOR)) & SPLIT_FILE_DATASETS:
        _find_own_data(config, Path(checkpoint), given_path=data_path is not None)
    ways = ways or config.eval_ways
    shots = shots or config.eval_shots
    device = resolve_device(device)
    learner = learner.to(device)
    within = config.test_within_groups if within_groups is None else within_groups
    if is_rating_dataset(config.dataset):  # users as tasks: every user of the split, metrics per user
        return _evaluate_ratings(learner, config, ckpt, checkpoint, split, shots, seed, device, progress)
    task_set, shape = evaluation_tasks(config, split, tasks, ways=ways, shots=shots, queries=queries,
                                       seed=seed, within_groups=within, episodes=episodes, extra=ckpt.extra)
    result = evaluate(learner, task_set, device=device, progress=progress, transductive=transductive)
    adapted = getattr(learner, "test_steps", None)  # gradient learners: steps at test time
    algo = ckpt.learner["algo"] + (f" (pre-trained by {pretrained_by})" if pretrained_by else "")
    described = (f"{algo} on {config.dataset} ({config.protocol or 'default'} protocol) "
                 f"{split}: {shape}; {result.protocol} predictions"
                 + (f", {adapted} inner step{'s' * (adapted != 1)} per task" if adapted else ""))
    variable = episodes == "variable"
    record = {"checkpoint": str(checkpoint), "algo": ckpt.learner["algo"], "split": split,
              "episodes": episodes, "ways": None if variable else ways,
              "shots": None if variable else shots, "queries": None if variable else queries,
              "dataset": config.dataset, "protocol": config.protocol, "within_groups": within,
              "inference": result.protocol, **({"inner_steps": adapted} if adapted else {}),
              **({"pretrained_by": pretrained_by} if pretrained_by else {}),
              **result.summary()}
    return CheckpointEvaluation(result, described, record)


def _head_learner(head: str, algo: str | None) -> str:
    """``head``, when a checkpoint of ``algo`` can fit heads its way: both are pre-trained
    baselines with the same pre-training head, so the weights mean the same to either."""
    from kshot.learners import LEARNERS
    from kshot.learners.baselines import PretrainedBaseline

    kinds = {name: cls.pretraining_head for name, cls in LEARNERS.items()
             if isinstance(cls, type) and issubclass(cls, PretrainedBaseline)}
    if algo not in kinds:
        raise ConfigError(f"--head: a {algo} checkpoint has no pre-trained backbone to fit heads on; it "
                          f"applies to {', '.join(sorted(kinds))} checkpoints")
    same = sorted(n for n, kind in kinds.items() if kind == kinds[algo])
    if head not in same:
        raise ConfigError(f"--head {head}: a {algo} checkpoint was pre-trained with a {kinds[algo]} head, "
                          f"so its heads can be fitted as {' or '.join(same)} does")
    return head


def _set_test_steps(learner: Learner, inner_steps: int, algo: str | None) -> None:
    """Adapt with ``inner_steps`` gradient steps per task at test time."""
    if not hasattr(learner, "test_inner_steps"):
        raise ConfigError(f"--inner-steps: a {algo} learner does not adapt by gradient steps; it applies "
                          f"to the maml family and reptile")
    if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or inner_steps < 1:
        raise ConfigError(f"--inner-steps must be a whole number of steps >= 1, not {inner_steps!r}")
    learner.test_inner_steps = int(inner_steps)


def _find_own_data(config, checkpoint: Path, given_path: bool) -> None:
    """A run on the user's own data needs that data and its class split: the split file as
    recorded, or the ``classes.json`` beside the checkpoint (a run directory moved elsewhere)."""
    if not config.data_path or not Path(config.data_path).expanduser().exists():
        where = f" ({config.data_path} is not there from {Path.cwd()})" if config.data_path else ""
        raise ConfigError(f"the run was trained on your own {config.dataset} data{where}; pass "
                          f"--data-path with where it is now" if not given_path else
                          f"--data-path {config.data_path} not found")
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not config.split_file or Path(config.split_file).is_file():
        return  # no file: the split is drawn from the recorded split seed, and not written
    beside = run_dir / "classes.json"
    if beside.is_file():
        config.split_file = str(beside)
        return
    raise CheckpointError(f"the run's class split {config.split_file} is missing (nor is there a "
                          f"classes.json beside {checkpoint}); it says which classes are test classes, "
                          f"so kshot will not draw a new one")


def _evaluate_ratings(learner: Learner, config, ckpt, checkpoint, split: str, shots: int, seed: int | None,
                      device: torch.device, progress: bool) -> CheckpointEvaluation:
    """A rating model adapted to each user of ``split`` from ``shots`` support ratings, scored on
    the user's other ratings (kshot.recsys.metrics): the figures are means ± 95% CI over users."""
    users, described = evaluation_tasks(config, split, 0, shots=shots, seed=seed, extra=ckpt.extra)
    report = evaluate_rating_learner(learner, users, device=device, progress=progress)  # type: ignore[arg-type]
    scores = next(iter(report.scores.values()))
    mse = scores.values["rmse"] ** 2
    result = EvalResult(np.full(len(mse), np.nan), mse, dict(scores.values))
    record = {"checkpoint": str(checkpoint), "algo": ckpt.learner["algo"], "split": split, "shots": shots,
              "dataset": config.dataset, **report.summary()}
    return CheckpointEvaluation(result, f"{ckpt.learner['algo']} on {config.dataset} {split}: {described}",
                                record, report)


def _evaluate_policy(checkpoint, ckpt, config, n_tasks: int, split: str, seed: int | None, steps: int,
                     device: str, progress: bool, plot) -> CheckpointEvaluation:
    """``evaluate_checkpoint`` for a policy: returns after each adaptation step, and plots."""
    from pathlib import Path

    if int(steps) != steps or steps < 0:
        raise ConfigError(f"--steps must be an integer >= 0, not {steps!r}")
    resolve_device(device)  # policies step on the CPU with their environments
    learner = learner_from_checkpoint(ckpt)
    task_set, shape = evaluation_tasks(config, split, n_tasks, seed=seed)
    result = learner.evaluate_tasks(task_set, progress=progress, steps=steps)
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    plot = Path(plot) if plot else folder / f"returns-{split}.png"
    written = [str(plot_returns({ckpt.learner["algo"]: result}, plot,
                                title=f"{config.dataset} {split}: {n_tasks} tasks"))]
    family = task_set.sampler
    if hasattr(family, "plot_adaptation"):
        written.append(str(family.plot_adaptation(learner, plot.with_name(plot.stem + "-trajectories.png"))))
    described = f"{ckpt.learner['algo']} on {config.dataset} {split}: {shape}, {steps} adaptation steps"
    record = {"checkpoint": str(checkpoint), "algo": ckpt.learner["algo"], "split": split, "dataset": config.dataset,
              "steps": steps, "episodes_per_task": learner.episodes_per_task, **result.summary()}
    return CheckpointEvaluation(result, described, record, plots=written)


def evaluate_intents(config: TrainConfig, seeds: Sequence[int], checkpoint: str | os.PathLike | None = None,
                     device: str = "cpu", progress: bool = False) -> IntentResult:
    """The standard intent-detection setting (what ``kshot intent`` does): every intent of the
    config's dataset at once, ``config.shots`` released training utterances of each (drawn per
    seed), the released test set; the config's learner, or the one saved in ``checkpoint``."""
    if not config.text_encoder:
        raise ConfigError("the intent-detection setting reads text through a pre-trained encoder; "
                          "set --text-encoder (a model folder or hub name)")
    data = load_split(config, "all")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        if "text_encoder" in ckpt.extra:
            same_encoder(ckpt.extra["text_encoder"], data.checkpoint_extra().get("text_encoder"))
        learner = learner_from_checkpoint(ckpt)
    else:
        learner = build_learner(config, data.example_shape)
    return evaluate_released(learner, data, config.shots, seeds, device=resolve_device(device), progress=progress)
