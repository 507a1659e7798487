"""Generated task families: tasks drawn from a distribution of functions, no download needed.

* ``sinusoid`` (Finn, Abbeel and Levine, ICML 2017, section 5.1): regress ``y = A sin(x - phi)``
  with amplitude ``A`` uniform in [0.1, 5], phase ``phi`` uniform in [0, pi], inputs ``x`` uniform
  in [-5, 5]; each task is one (A, phi) with K support points and Q query points.

A task family plays the part a :class:`~kshot.tasks.TaskSampler` plays for a labelled dataset:
task ``(step, index)`` is a pure function of ``(seed, step, index)``, ``meta_batch(step,
indices)`` and ``stream()`` serve the trainer, and the validation and test tasks come from
seeds of their own (:func:`family_tasks`). Regression tasks have no classes: ``Task.classes`` is
empty and the targets are float tensors ``[n, 1]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from kshot.errors import ConfigError, DataError
from kshot.tasks.base import EVAL_SEED, FixedTasks, Task, TaskSource

#: Seeds of the fixed evaluation tasks of generated families (training uses the config's seed).
SPLIT_SEEDS = {"val": EVAL_SEED + 1, "test": EVAL_SEED, "trainval": EVAL_SEED + 2, "train": EVAL_SEED + 3}


class SinusoidTasks(TaskSource):
    """Sinusoid regression tasks with K support and Q query points each.

    Args:
        shots: support points per task (K; the paper uses 5 or 10).
        queries: query points per task (the paper's code meta-trains with K).
        seed: the stream's seed; task ``(step, index)`` depends on nothing else.
        meta_batch_size: tasks per meta-batch, for :meth:`meta_batch` and iteration.
        amplitude, phase, x_range: the (low, high) ranges of the uniform draws.
    """

    name = "sinusoid"
    #: One scalar input per example.
    example_shape: tuple[int, ...] = (1,)
    #: Not images read from files (checkpoints record this for ``kshot adapt``).
    image_format = None
    #: The meta-loss of this family (learners read it to pick their loss).
    loss = "mse"

    def __init__(self, shots: int, queries: int, seed: int = 0, meta_batch_size: int = 1,
                 amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)):
        for name, value, low in (("shots", shots, 1), ("queries", queries, 1),
                                 ("meta_batch_size", meta_batch_size, 1)):
            if int(value) != value or value < low:
                raise DataError(f"{name} must be an integer >= {low}, not {value!r}")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise DataError(f"{name} range must be (low, high) with low <= high, not {(lo, hi)}")
        self.shots, self.queries = int(shots), int(queries)
        self.seed, self.meta_batch_size = int(seed), int(meta_batch_size)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def __repr__(self) -> str:
        return (f"SinusoidTasks({self.shots}-shot, {self.queries} queries, seed={self.seed}, "
                f"amplitude={self.amplitude}, phase={tuple(round(p, 4) for p in self.phase)})")

    @property
    def dataset(self) -> "SinusoidTasks":
        """What the trainer reads a sampler's data description from: the family itself."""
        return self

    def rng(self, step: int, index: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(index)])

    def task_params(self, step: int, index: int = 0) -> tuple[float, float]:
        """Amplitude and phase of task ``(step, index)``."""
        u = self.rng(step, index).random(2)
        return (self.amplitude[0] + u[0] * (self.amplitude[1] - self.amplitude[0]),
                self.phase[0] + u[1] * (self.phase[1] - self.phase[0]))

    @staticmethod
    def curve(amplitude: float, phase: float, x: torch.Tensor) -> torch.Tensor:
        """The task's true function at ``x``."""
        return amplitude * torch.sin(x - phase)

    def task(self, step: int, index: int = 0) -> Task:
        rng = self.rng(step, index)
        u = rng.random(2)  # the same two draws as task_params
        amplitude = self.amplitude[0] + u[0] * (self.amplitude[1] - self.amplitude[0])
        phase = self.phase[0] + u[1] * (self.phase[1] - self.phase[0])
        lo, hi = self.x_range
        x = (lo + rng.random((self.shots + self.queries, 1)) * (hi - lo)).astype(np.float32)
        # NumPy end to end, one conversion: tasks are drawn ~70,000 x 25 times in a paper run.
        xy = torch.from_numpy(np.stack([x, (amplitude * np.sin(x - phase)).astype(np.float32)]))
        k = self.shots
        return Task(support_x=xy[0, :k], support_y=xy[1, :k], query_x=xy[0, k:], query_y=xy[1, k:],
                    classes=torch.empty(0, dtype=torch.int64))

    def fixed_tasks(self, n_tasks: int) -> FixedTasks:
        """``n_tasks`` tasks of this stream: task i is ``(i, 0)``."""
        return FixedTasks(self, n_tasks)  # type: ignore[arg-type]

    def plot_adaptation(self, learner, out, n_tasks: int = 4, steps: Sequence[int] | None = None):
        """Write a PNG of the learner's adapted curves against the true ones for a few tasks."""
        from kshot.services.plots import plot_regression_fits

        grid = torch.linspace(self.x_range[0], self.x_range[1], 200).unsqueeze(1)
        panels = []
        for i in range(n_tasks):
            amplitude, phase = self.task_params(i, 0)
            panels.append((self.task(i, 0), grid, self.curve(amplitude, phase, grid),
                           f"A={amplitude:.2f}, phase={phase:.2f}"))
        return plot_regression_fits(learner, panels, out, steps=steps)


#: Generated task families by dataset name; the trainer consults this before ``load_dataset``.
TASK_FAMILIES: dict[str, type] = {"sinusoid": SinusoidTasks}


def task_family(name: str) -> type | None:
    """The task family registered as ``name``, or None when ``name`` is a dataset."""
    return TASK_FAMILIES.get(name)


def family_sampler(name: str, split: str, shots: int, queries: int, seed: int | None = None,
                   meta_batch_size: int = 1, **settings):
    """The task stream of family ``name`` for ``split`` (training: the config's ``seed``)."""
    family = TASK_FAMILIES.get(name)
    if family is None:
        raise ConfigError(f"unknown task family {name!r}; choose one of {', '.join(sorted(TASK_FAMILIES))}")
    if seed is None:
        if split not in SPLIT_SEEDS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
        seed = SPLIT_SEEDS[split]
    return family(shots=shots, queries=queries, seed=seed, meta_batch_size=meta_batch_size, **settings)


def family_tasks(name: str, split: str, shots: int, queries: int, n_tasks: int,
                 seed: int | None = None) -> FixedTasks:
    """Fixed evaluation tasks of family ``name``: the same tasks on every machine, every time."""
    return family_sampler(name, split, shots, queries, seed=seed).fixed_tasks(n_tasks)
