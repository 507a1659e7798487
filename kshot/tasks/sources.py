"""Which source of tasks a setting asks for: N-way K-shot or Meta-Dataset episodes, from one
dataset or one source per task, for training or as a fixed evaluation set.

This is the one place that chooses among the samplers of this package, so the layers above
name a kind of task (``episodes="fixed" | "variable"``) and never a sampler class.
"""

from __future__ import annotations

from typing import Sequence

from kshot.data.base import FewShotDataset
from kshot.data.multisource import MultiSourceDataset
from kshot.errors import ConfigError, DataError
from kshot.tasks.base import EVAL_SEED, FixedTasks, TaskSource
from kshot.tasks.episodes import TaskSampler
from kshot.tasks.metadataset import EpisodeBounds, MultiSourceSampler, VariableTaskSampler

#: Kinds of training task: ``fixed`` N-way K-shot, or ``variable`` (Meta-Dataset episodes).
EPISODES = ("fixed", "variable")


def task_sampler(dataset: FewShotDataset, episodes: str = "fixed", ways: int = 5, shots: int = 1,
                 queries: int = 15, seed: int = 0, meta_batch_size: int = 1,
                 source_weights: str | Sequence[float] = "uniform",
                 bounds: EpisodeBounds | None = None, within_groups: bool = False) -> TaskSource:
    """The sampler for ``episodes`` tasks from ``dataset``, one source per task if it has several.

    ``fixed``: ``ways``-way ``shots``-shot tasks with ``queries`` per class (all from one group of
    classes with ``within_groups``: one Omniglot alphabet). ``variable``: Meta-Dataset episodes
    within ``bounds`` (``ways``, ``shots`` and ``queries`` unused).
    """
    if episodes not in EPISODES:
        raise ConfigError(f"unknown episodes {episodes!r}; choose one of {', '.join(EPISODES)}")
    if within_groups and episodes == "variable":
        raise ConfigError("within-group tasks are N-way K-shot tasks of one group; use --episodes fixed "
                          "or drop --within-groups")
    if within_groups and isinstance(dataset, MultiSourceDataset):
        raise DataError("within-group tasks are not available from a multi-source dataset; "
                        "train on one source, or drop --within-groups")

    def single(data: FewShotDataset, seed_: int):
        if episodes == "variable":
            return VariableTaskSampler(data, seed=seed_, meta_batch_size=meta_batch_size, bounds=bounds)
        return TaskSampler(data, ways, shots, queries, seed=seed_, meta_batch_size=meta_batch_size,
                           within_groups=within_groups)

    if isinstance(dataset, MultiSourceDataset):
        return MultiSourceSampler(dataset, single, seed=seed, meta_batch_size=meta_batch_size,
                                  weights=source_weights)
    return single(dataset, seed)


def sampler_from_config(config, dataset: FewShotDataset) -> TaskSource:
    """Training tasks as a :class:`~kshot.config.TrainConfig` asks (``episodes``, ``source_weights``,
    ``within_groups``)."""
    return task_sampler(dataset, getattr(config, "episodes", "fixed"), config.ways, config.shots,
                        config.queries, seed=config.seed, meta_batch_size=config.meta_batch_size,
                        source_weights=getattr(config, "source_weights", "uniform"),
                        within_groups=getattr(config, "within_groups", False))


def fixed_episodes(dataset: FewShotDataset, n_tasks: int = 1000, seed: int = EVAL_SEED,
                   bounds: EpisodeBounds | None = None) -> FixedTasks:
    """A fixed, seeded set of Meta-Dataset evaluation episodes (one source per task)."""
    return FixedTasks(task_sampler(dataset, "variable", seed=seed, bounds=bounds), n_tasks)  # type: ignore[arg-type]


def fixed_tasks(dataset: FewShotDataset, ways: int, shots: int, queries: int,
                n_tasks: int = 1000, seed: int = EVAL_SEED, within_groups: bool = False) -> "FixedTasks":
    """A fixed, seeded set of evaluation tasks: the same tasks on every machine, every time.

    From a multi-source dataset (``a+b``), each task's classes come from one source."""
    if isinstance(dataset, MultiSourceDataset):
        if within_groups:
            raise DataError("within-group tasks are not available from a multi-source dataset; "
                            "evaluate on each source separately")
        return FixedTasks(task_sampler(dataset, "fixed", ways, shots, queries, seed=seed), n_tasks)
    return FixedTasks(TaskSampler(dataset, ways, shots, queries, seed=seed,
                                  within_groups=within_groups), n_tasks)
