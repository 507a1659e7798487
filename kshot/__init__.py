"""kshot: meta-learning in PyTorch.

The public API, in the order data flows through it::

    dataset = kshot.load_dataset("omniglot", "train")              # labelled examples by class
    sampler = kshot.TaskSampler(dataset, ways=5, shots=1, queries=15, seed=0)
    learner = kshot.ProtoNet(kshot.create_model("conv4"))
    loss, metrics = learner.meta_loss(sampler.meta_batch(step=0))    # outer loop: loss.backward()
    predictor = learner.adapt(support_x, support_y)                  # a task -> a predictor
    result = kshot.evaluate(learner, kshot.fixed_tasks(test_set, 5, 1, 15))   # mean ± 95% CI
    kshot.evaluate_checkpoint("runs/x", ways=5, shots=1)                      # what `kshot eval` does

Learners: ProtoNet, Siamese, on one functional inner loop MAML (with MAML++'s options), FOMAML,
MetaSGD, ANIL, Reptile, and the pre-training baselines Baseline, BaselinePlusPlus, RFS.
"""

__version__ = "0.1.0"

from kshot.config import PRESETS, TrainConfig, resolve_config
from kshot.data import ArrayDataset, FewShotDataset, LabelledDataset, Omniglot, load_dataset
from kshot.errors import CheckpointError, ConfigError, DataError, KshotError, TrainingStopped
from kshot.learners import (ANIL, FOMAML, MAML, RFS, Baseline, BaselinePlusPlus, Learner, MetaSGD, Predictor,
                            ProtoNet, Reptile, Siamese, create_learner)
from kshot.models import create_model, register_model
from kshot.tasks import LabelledBatchSampler, PairBatch, PairSampler, Task, TaskSampler, fixed_tasks
from kshot.runs.build import load_learner
from kshot.runs.evaluate import EvalResult, evaluate, evaluate_checkpoint
from kshot.runs.train import Trainer, train
from kshot.services.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "ANIL", "ArrayDataset", "Baseline", "BaselinePlusPlus", "CheckpointError", "ConfigError", "DataError",
    "EvalResult", "FOMAML", "FewShotDataset", "KshotError", "LabelledBatchSampler", "LabelledDataset", "Learner",
    "MAML", "MetaSGD", "Omniglot", "PRESETS", "PairBatch", "PairSampler", "Predictor", "ProtoNet", "RFS",
    "Reptile", "Siamese", "Task",
    "TaskSampler", "TrainConfig", "Trainer", "TrainingStopped", "create_learner", "create_model", "evaluate",
    "evaluate_checkpoint", "fixed_tasks", "load_checkpoint", "load_dataset", "load_learner",
    "register_model", "resolve_config", "save_checkpoint", "train",
]
