"""The baselines every few-shot paper since 2019 compares against: no meta-learning at all.

All three pre-train the backbone with a classifier over *all* meta-training classes, on
shuffled batches of labelled examples (:class:`~kshot.tasks.batches.LabelledBatchSampler`),
then, for each task, freeze the backbone, embed the support set and fit a new head on it:

* ``baseline`` (Chen, Liu, Kira, Wang and Huang, "A Closer Look at Few-shot Classification",
  ICLR 2019): a linear head, pre-trained and fitted by cross-entropy. Fitting follows the
  authors' code: 100 epochs of SGD (rate 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3)
  over the support set in batches of 4.
* ``baseline++`` (same paper): a cosine head with a learned class-wise scale,
  ``s(z)_c = f * g_c * cos(z, v_c)``: the weight-normalised rows ``g_c v_c / ||v_c||`` of their
  code, with the fixed factor ``f = 2`` for at most 200 classes and 10 for more; pre-trained and
  fitted the same way.
* ``rfs`` (RFS-simple: Tian, Wang, Krishnan, Tenenbaum and Isola, "Rethinking Few-Shot Image
  Classification: a Good Embedding Is All You Need?", ECCV 2020): a linear pre-training head;
  at test, multinomial logistic regression on the L2-normalised features, as their
  ``sklearn.linear_model.LogisticRegression(C=1)``: ``0.5 ||W||^2 + C sum_i CE_i`` minimised by
  L-BFGS (intercept not penalised). Without their self-distillation (RFS-distill).

A task's head is fitted from a fixed seed, so adaptation is a pure function of the weights and
the support set. The backbone keeps its batch norm's running statistics, used in evaluation
mode: predictions never depend on the other queries, and any number of ways works.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor, accuracy
from kshot.models import output_dim
from kshot.tasks import LabelledBatch, LabelledBatchSampler

#: Seed of the head fitted to each task (its initialisation and the order of its batches).
HEAD_SEED = 0
#: Support examples per SGD step when fitting a head (Chen et al.'s code).
HEAD_BATCH = 4
#: Inverse regularisation strength of RFS's logistic regression (scikit-learn's default, Tian et al.'s).
RFS_C = 1.0


def _uniform(shape: Sequence[int], bound: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(like)


class CosineClassifier(nn.Module):
    """Baseline++'s head: ``f * g_c * cos(z, v_c)`` for classes ``c`` (Chen et al.'s ``distLinear``
    with its class-wise learnable norm ``g``).

    Args:
        dim: feature size.
        classes: number of classes.
        generator: draws the initial directions (``nn.Linear``'s uniform initialisation).
    """

    def __init__(self, dim: int, classes: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1 / math.sqrt(dim)
        if generator is None:
            direction = torch.empty(classes, dim).uniform_(-bound, bound)
        else:
            direction = _uniform((classes, dim), bound, generator, torch.empty(0))
        self.direction = nn.Parameter(direction)
        #: the learned class-wise scale (weight norm's ``g``), initially the rows' norms
        self.scale = nn.Parameter(direction.norm(dim=1))
        #: the fixed factor of their code: 2 for up to 200 classes, 10 for more
        self.factor = 2.0 if classes <= 200 else 10.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        unit = z / (z.norm(dim=1, keepdim=True) + 1e-5)
        rows = self.direction / self.direction.norm(dim=1, keepdim=True)
        return self.factor * (unit @ rows.T) * self.scale


def linear_head(dim: int, classes: int, generator: torch.Generator, like: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear(dim, classes)`` with PyTorch's initialisation drawn from ``generator``."""
    head = nn.Linear(dim, classes).to(like)
    bound = 1 / math.sqrt(dim)
    with torch.no_grad():
        head.weight.copy_(_uniform((classes, dim), bound, generator, like))
        head.bias.copy_(_uniform((classes,), bound, generator, like))
    return head


def fit_head(head: nn.Module, z: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
             generator: torch.Generator) -> nn.Module:
    """Chen et al.'s fine-tuning: ``epochs`` passes of SGD over ``(z, y)`` in shuffled batches of
    :data:`HEAD_BATCH`, momentum 0.9, dampening 0.9, weight decay 1e-3."""
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    n = len(z)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(z.device)
            for start in range(0, n, HEAD_BATCH):
                chosen = order[start:start + HEAD_BATCH]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(head(z[chosen]), y[chosen]).backward()
                optimizer.step()
    return head


def logistic_regression(z: torch.Tensor, y: torch.Tensor, ways: int, c: float = RFS_C,
                        max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: ``W [ways, d], b [ways]`` minimising
    ``0.5 ||W||^2 + c * sum_i CE(W z_i + b, y_i)`` (scikit-learn's objective), by L-BFGS in
    float64 from zero."""
    z64 = z.detach().to(torch.float64)
    weight = torch.zeros(ways, z.shape[1], dtype=torch.float64, device=z.device, requires_grad=True)
    bias = torch.zeros(ways, dtype=torch.float64, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * weight.pow(2).sum() + c * F.cross_entropy(z64 @ weight.T + bias, y, reduction="sum")
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


class PretrainedBaseline(Learner):
    """Supervised pre-training on all meta-training classes, then a head fitted per task.

    Args:
        model: the backbone, inputs ``[n, ...]`` -> features ``[n, d]`` (batch norm with running
            statistics, as in ordinary supervised training).
        num_classes: classes of the pre-training head (0: none; the learner then only adapts).
        embedding_dim: ``d``.
        head_epochs: epochs of SGD fitting a task's head (Baseline, Baseline++).
        head_lr: their learning rate.
    """

    config_options: ClassVar[tuple[str, ...]] = ("head_epochs", "head_lr")
    #: The pre-training head: ``linear`` or ``cosine``.
    pretraining_head: ClassVar[str] = "linear"

    def __init__(self, model: nn.Module, num_classes: int = 0, embedding_dim: int | None = None,
                 head_epochs: int = 100, head_lr: float = 0.01):
        super().__init__(model)
        if int(head_epochs) != head_epochs or head_epochs < 1:
            raise ConfigError(f"head_epochs must be an integer >= 1, not {head_epochs!r}")
        if not head_lr > 0 or not math.isfinite(head_lr):
            raise ConfigError(f"head_lr must be positive, not {head_lr!r}")
        if int(num_classes) != num_classes or num_classes < 0:
            raise ConfigError(f"num_classes must be an integer >= 0, not {num_classes!r}")
        self.num_classes, self.head_epochs, self.head_lr = int(num_classes), int(head_epochs), float(head_lr)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        self.classifier: nn.Module | None = None
        if self.num_classes:
            if not self.embedding_dim:
                raise ConfigError("a pre-training head needs embedding_dim (kshot.models.output_dim(model, shape))")
            self.classifier = (CosineClassifier(self.embedding_dim, self.num_classes)
                               if self.pretraining_head == "cosine" else nn.Linear(self.embedding_dim, self.num_classes))
            if isinstance(self.classifier, nn.Linear):
                nn.init.zeros_(self.classifier.bias)  # as Chen et al.'s BaselineTrain

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config, example_shape: Sequence[int], num_classes: int = 0) -> "PretrainedBaseline":
        model = cls.build_model(config, example_shape)
        return cls(model, num_classes=num_classes, embedding_dim=output_dim(model, example_shape),
                   **{name: getattr(config, name) for name in cls.config_options})

    @classmethod
    def for_training(cls, config, source) -> "PretrainedBaseline":
        return cls.from_config(config, source.example_shape, num_classes=source.num_classes)

    @classmethod
    def make_sampler(cls, config, dataset) -> LabelledBatchSampler:
        """Shuffled batches of ``config.batch_size`` labelled examples of all training classes."""
        if getattr(config, "within_groups", False):
            raise ConfigError(f"{config.algo} pre-trains on batches of all training classes, not on tasks; "
                              f"drop --within-groups (--test-within-groups still tests within groups)")
        return LabelledBatchSampler(dataset, batch_size=config.batch_size, seed=config.seed,
                                    meta_batch_size=config.meta_batch_size)

    def options(self) -> dict:
        return {"num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
                "head_epochs": self.head_epochs, "head_lr": self.head_lr}

    # ------------------------------------------------------------------ pre-training
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)

    def meta_loss(self, batches: Sequence[LabelledBatch]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of the pre-training head over batches of labelled examples."""
        if self.classifier is None:
            raise ConfigError(f"this {self.algo} learner was built without its training classes, so it can adapt "
                              f"but not pre-train; build it with kshot.runs.build.build_learner(config, shape, source)")
        if not all(isinstance(b, LabelledBatch) for b in batches):
            raise ConfigError(f"{self.algo} pre-trains on batches of labelled examples (kshot.tasks.LabelledBatch), "
                              f"not episodes")
        losses, correct = [], 0.0
        for b in batches:
            scores = self.classifier(self.embed(b.x))
            losses.append(F.cross_entropy(scores, b.y))
            correct += accuracy(scores.detach(), b.y)
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "acc": correct / len(batches)}

    # ------------------------------------------------------------------ adapt
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen features of ``x``: no gradient reaches the backbone when a head is fitted."""
        with torch.no_grad():
            return self.embed(x)

    def fit(self, z: torch.Tensor, y: torch.Tensor, ways: int) -> nn.Module:
        """The task's head fitted on support features ``z [n, d]`` and labels ``y [n]``."""
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, ways: int | None = None) -> Predictor:
        ways = int(support_y.max()) + 1 if ways is None else int(ways)
        counts = torch.bincount(support_y, minlength=ways)
        if bool((counts == 0).any()):
            raise ConfigError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no support examples; "
                              f"every class needs at least one")
        head = self.fit(self.features(support_x), support_y, ways)
        return Predictor(lambda x: head(self.features(x)), ways)


class Baseline(PretrainedBaseline):
    """Baseline (Chen et al. 2019): linear heads, pre-trained and fitted per task."""

    algo = "baseline"

    def fit(self, z: torch.Tensor, y: torch.Tensor, ways: int) -> nn.Module:
        generator = torch.Generator().manual_seed(HEAD_SEED)
        return fit_head(linear_head(z.shape[1], ways, generator, z), z, y, self.head_epochs, self.head_lr, generator)


class BaselinePlusPlus(PretrainedBaseline):
    """Baseline++ (Chen et al. 2019): cosine heads with a learned class-wise scale."""

    algo = "baseline++"
    pretraining_head = "cosine"

    def fit(self, z: torch.Tensor, y: torch.Tensor, ways: int) -> nn.Module:
        generator = torch.Generator().manual_seed(HEAD_SEED)
        head = CosineClassifier(z.shape[1], ways, generator).to(z)
        return fit_head(head, z, y, self.head_epochs, self.head_lr, generator)


class RFS(PretrainedBaseline):
    """RFS-simple (Tian et al. 2020): logistic regression on L2-normalised frozen features."""

    algo = "rfs"

    def fit(self, z: torch.Tensor, y: torch.Tensor, ways: int) -> nn.Module:
        weight, bias = logistic_regression(F.normalize(z, dim=1), y, ways)

        def head(features: torch.Tensor) -> torch.Tensor:
            unit = F.normalize(features, dim=1).to(weight.dtype)
            return (unit @ weight.T + bias).to(features.dtype)
        return head  # type: ignore[return-value]


# ----------------------------------------------------------------------------- presets
def _chen_omniglot(algo: str, ways: int, shots: int) -> dict:
    # Chen et al. 2019, section 4 and their code (train.py): Omniglot with the rotated classes of
    # the Vinyals/Snell split (4,112 training classes, 82,240 images), Conv-4 for 28x28 images,
    # no augmentation, Adam 1e-3, batches of 16, 5 epochs = 25,700 steps; tested on 5-way tasks.
    return dict(algo=algo, dataset="omniglot", protocol="vinyals", image_size=28, backbone="conv4",
                batch_size=16, meta_batch_size=1, ways=ways, shots=shots, test_ways=ways, test_shots=shots,
                test_queries=15, optimizer="adam", lr=1e-3, lr_schedule="constant", steps=25_700,
                head_epochs=100, head_lr=0.01, val_every=5140, val_tasks=200, checkpoint_every=500,
                log_every=100, test_tasks=1000)


def _chen_miniimagenet(algo: str, shots: int) -> dict:
    # Chen et al. 2019: mini-ImageNet (Ravi & Larochelle split, 64 training classes x 600 images),
    # Conv-4 on 84x84 colour images, Adam 1e-3, batches of 16, 400 epochs = 960,000 steps. Their
    # figures use data augmentation (random crops, colour jitter, flips), which kshot does not
    # apply to pre-training: expect lower accuracy.
    return dict(algo=algo, dataset="miniimagenet", image_size=84, backbone="conv4", batch_size=16,
                meta_batch_size=1, ways=5, shots=shots, test_ways=5, test_shots=shots, test_queries=15,
                optimizer="adam", lr=1e-3, lr_schedule="constant", steps=960_000, head_epochs=100, head_lr=0.01,
                val_every=24_000, val_tasks=200, checkpoint_every=2000, log_every=500, test_tasks=1000)


# Chen et al. 2019, appendix (Omniglot, Conv-4, 5-way): Baseline 94.89 / 99.12, Baseline++ 95.41 /
# 99.38 %; mini-ImageNet, Conv-4 (their record/few_shot_exp_figures.xlsx): Baseline 42.11 / 62.53,
# Baseline++ 48.24 / 66.43 %.
for _algo, _name, _omni, _mini in (("baseline", "baseline", (94.89, 99.12), (42.11, 62.53)),
                                   ("baseline++", "baselinepp", (95.41, 99.38), (48.24, 66.43))):
    for _shots, _o, _m in ((1, _omni[0], _mini[0]), (5, _omni[1], _mini[1])):
        register_preset(f"{_name}-omniglot-5way-{_shots}shot",
                        f"{'Baseline' if _algo == 'baseline' else 'Baseline++'}, Omniglot 5-way {_shots}-shot "
                        f"(Chen et al. 2019, appendix: {_o}%), pre-trained on the 4,112 rotated training classes",
                        _chen_omniglot(_algo, 5, _shots))
        register_preset(f"{_name}-miniimagenet-5way-{_shots}shot",
                        f"{'Baseline' if _algo == 'baseline' else 'Baseline++'}, mini-ImageNet 5-way {_shots}-shot, "
                        f"Conv-4 (Chen et al. 2019: {_m}% with data augmentation, which kshot does not apply)",
                        _chen_miniimagenet(_algo, _shots))


def _rfs_miniimagenet(shots: int) -> dict:
    # Tian et al. 2020, section 4 and their code: ResNet-12 (64-160-320-640), SGD 0.05, momentum
    # 0.9, weight decay 5e-4, batches of 64, 90 epochs of the 38,400 training images (54,000
    # steps) with the rate divided by 10 at epochs 60, 70 and 80 (here: cosine annealing, one of
    # their options); standard augmentation (crops, colour jitter, flips), which kshot does not apply.
    return dict(algo="rfs", dataset="miniimagenet", image_size=84, backbone="resnet12", batch_size=64,
                meta_batch_size=1, ways=5, shots=shots, test_ways=5, test_shots=shots, test_queries=15,
                optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", steps=54_000,
                val_every=6000, val_tasks=200, checkpoint_every=1000, log_every=200, test_tasks=1000)


for _shots, _acc in ((1, 62.02), (5, 79.64)):
    register_preset(f"rfs-miniimagenet-5way-{_shots}shot",
                    f"RFS-simple, mini-ImageNet 5-way {_shots}-shot, ResNet-12 (Tian et al. 2020, Table 1: {_acc}% "
                    f"with augmentation, which kshot does not apply)", _rfs_miniimagenet(_shots))
register_preset("rfs-omniglot-5way-1shot",
                "RFS-simple, Omniglot 5-way 1-shot (kshot's own setting, no published figure: Chen et al.'s "
                "Omniglot pre-training, logistic regression on normalised features)",
                _chen_omniglot("rfs", 5, 1))
