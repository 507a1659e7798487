"""Prototypical Networks (Snell, Swersky and Zemel, NeurIPS 2017, arXiv:1703.05175).

Each class is represented by its prototype, the mean embedding of its support examples; a query
is classified by a softmax over negative squared Euclidean distances to the prototypes (cosine
similarity, scaled by a fixed temperature, as an option). The encoder is the only meta-parameter,
so the number of ways is free: the paper trains Omniglot with 60 ways and tests with 5 or 20.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor, accuracy, prototypes
from kshot.tasks import Task

DISTANCES = ("euclidean", "cosine")


def prototype_logits(query_z: torch.Tensor, protos: torch.Tensor, distance: str = "euclidean",
                     temperature: float = 10.0) -> torch.Tensor:
    """Scores ``[m, ways]``: negative squared distances, or scaled cosine similarities."""
    if distance == "cosine":
        return temperature * F.normalize(query_z, dim=-1) @ F.normalize(protos, dim=-1).T
    # ||q - p||^2 expanded; clamp guards the tiny negatives that rounding can produce.
    sq = (query_z.pow(2).sum(-1, keepdim=True) - 2 * query_z @ protos.T
          + protos.pow(2).sum(-1)[None, :])
    return -sq.clamp_min(0)


class ProtoNet(Learner):
    """Prototypical Networks around any embedding network.

    Args:
        model: encoder mapping inputs ``[n, ...]`` to embeddings ``[n, d]``.
        distance: ``euclidean`` (squared, as in the paper) or ``cosine``.
        temperature: scale of cosine similarities (ignored for Euclidean distance).
    """

    algo = "protonet"
    config_options = ("distance", "temperature")

    def __init__(self, model: nn.Module, distance: str = "euclidean", temperature: float = 10.0):
        super().__init__(model)
        if distance not in DISTANCES:
            raise ConfigError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        self.distance, self.temperature = distance, float(temperature)

    def options(self) -> dict:
        return {"distance": self.distance, "temperature": self.temperature}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              ways: int | None = None) -> Predictor:
        ways = int(support_y.max()) + 1 if ways is None else ways
        protos = prototypes(self.embed(support_x), support_y, ways)
        return Predictor(lambda x: prototype_logits(self.embed(x), protos, self.distance,
                                                    self.temperature), ways)

    def task_logits(self, task: Task) -> torch.Tensor:
        """Query scores of one task from a single encoder pass over support and query."""
        n = len(task.support_x)
        z = self.embed(torch.cat([task.support_x, task.query_x]))
        protos = prototypes(z[:n], task.support_y, task.ways)
        return prototype_logits(z[n:], protos, self.distance, self.temperature)

    def meta_loss(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, dict[str, float]]:
        # One encoder pass per task over support and query together, as in the paper's code
        # (in training mode batch norm then normalises by the whole task, where adapt-then-
        # predict would normalise support and query separately). Tasks are never merged into
        # one batch, so no statistics flow between tasks.
        losses, correct = [], 0.0
        for task in tasks:
            logits = self.task_logits(task)
            losses.append(F.cross_entropy(logits, task.query_y))
            correct += accuracy(logits.detach(), task.query_y)
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "acc": correct / len(tasks)}
