"""Meta-learners, registered by algorithm name."""

from __future__ import annotations

from torch import nn

from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor
from kshot.learners.baselines import RFS, Baseline, BaselinePlusPlus
from kshot.learners.maml import ANIL, FOMAML, MAML, MetaSGD
from kshot.learners.protonet import ProtoNet
from kshot.learners.reptile import Reptile
from kshot.learners.siamese import Siamese

LEARNERS: dict[str, type[Learner]] = {cls.algo: cls for cls in (ProtoNet, Siamese, MAML, FOMAML, MetaSGD, ANIL,
                                                                Reptile, Baseline, BaselinePlusPlus, RFS)}


def register_learner(cls: type[Learner]) -> type[Learner]:
    """Add a learner class under its ``algo`` name (applications register their own learners)."""
    LEARNERS[cls.algo] = cls
    return cls


def create_learner(algo: str, model: nn.Module, **options) -> Learner:
    """Wrap ``model`` in the learner registered as ``algo`` with its ``options``."""
    if algo not in LEARNERS:
        raise ConfigError(f"unknown algorithm {algo!r}; choose one of {', '.join(sorted(LEARNERS))}")
    return LEARNERS[algo](model, **options)


__all__ = ["ANIL", "Baseline", "BaselinePlusPlus", "FOMAML", "LEARNERS", "Learner", "MAML", "MetaSGD", "Predictor",
           "ProtoNet", "RFS", "Reptile", "Siamese", "create_learner", "register_learner"]
