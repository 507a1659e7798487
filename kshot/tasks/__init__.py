"""Task sources: from labelled examples (or a generator) to few-shot tasks and meta-batches.

Inside this package imports run one way, each module using only those before it::

    base         Task, meta-batches, TaskSource (what every source offers), FixedTasks, streams
    episodes     TaskSampler: N-way K-shot tasks from a FewShotDataset
    metadataset  Meta-Dataset episodes (variable ways and shots), one source per task
    pairs        balanced same/different pairs for Siamese networks
    batches      shuffled batches of labelled examples for supervised pre-training (baselines)
    families     generated task families (sinusoid regression), no dataset behind them
    sources      which sampler a setting asks for; fixed evaluation task sets
"""

from kshot.tasks.base import (EVAL_SEED, FixedTasks, MetaBatch, Task, TaskSlice, TaskSource, TaskStream,
                              identity_collate, smallest_keys, stack_tasks)
from kshot.tasks.episodes import TaskSampler
from kshot.tasks.families import TASK_FAMILIES, SinusoidTasks, family_sampler, family_tasks, task_family
from kshot.tasks.metadataset import EpisodeBounds, Episode, MultiSourceSampler, VariableTaskSampler
from kshot.tasks.pairs import PairBatch, PairSampler
from kshot.tasks.batches import LabelledBatch, LabelledBatchSampler
from kshot.tasks.sources import EPISODES, fixed_episodes, fixed_tasks, sampler_from_config, task_sampler

__all__ = ["EPISODES", "EVAL_SEED", "Episode", "EpisodeBounds", "FixedTasks", "LabelledBatch", "LabelledBatchSampler",
           "MetaBatch", "MultiSourceSampler",
           "PairBatch", "PairSampler", "SinusoidTasks", "TASK_FAMILIES", "Task", "TaskSampler", "TaskSlice",
           "TaskSource", "TaskStream", "VariableTaskSampler", "family_sampler", "family_tasks", "fixed_episodes",
           "fixed_tasks", "identity_collate", "sampler_from_config", "smallest_keys", "stack_tasks",
           "task_family", "task_sampler"]
