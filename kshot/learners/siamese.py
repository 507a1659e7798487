"""Siamese networks (Koch, Zemel and Salakhutdinov, "Siamese Neural Networks for One-shot Image
Recognition", ICML Deep Learning Workshop 2015), with the contrastive and triplet-margin
objectives as options.

One encoder, shared by both inputs, embeds each of a pair; a similarity of the two embeddings
says whether they show the same class. It is trained on balanced same/different pairs of the
meta-training classes (:class:`~kshot.tasks.pairs.PairSampler`), never on episodes, yet it serves both:

* **verification**: a pair is "same" when its score reaches a threshold, calibrated at the
  equal-error point of held-out pairs of the meta-validation classes when training ends, and
  saved with the weights (the ``threshold`` buffer);
* **few-shot classification**: a query's score for a class is its mean score against that
  class's support examples; with one shot, the most similar support example names the class
  (Koch et al.'s one-shot rule).

Similarities (``similarity=``), each with its pair score (higher: more alike):

* ``koch``: ``sigmoid(sum_j alpha_j |z1_j - z2_j| + b)`` is the probability of "same", trained by
  binary cross-entropy; the score is its log-odds.
* ``contrastive`` (Hadsell, Chopra and LeCun, CVPR 2006): Euclidean distance ``d``, loss
  ``(y d^2 + (1 - y) max(0, margin - d)^2) / 2``; the score is ``-d``.
* ``triplet`` (Schroff, Kalenichenko and Philbin, CVPR 2015): loss
  ``max(0, d(anchor, positive) - d(anchor, negative) + margin)``; the score is ``-d``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners.base import Learner, Predictor
from kshot.models import output_dim
from kshot.tasks.pairs import PairBatch, PairSampler
from kshot.tasks import EVAL_SEED, Task
from kshot.learners.verification import VerificationReport

SIMILARITIES = ("koch", "contrastive", "triplet")
#: Pairs of meta-validation classes on which the threshold is calibrated when training ends.
CALIBRATION_PAIRS = 4000
#: Upper bound on the elements of the [queries, support, dim] difference tensor held at once.
_CHUNK_ELEMENTS = 1 << 22


class Siamese(Learner):
    """A Siamese network around any embedding network.

    Args:
        model: encoder mapping inputs ``[n, ...]`` to embeddings ``[n, d]``.
        similarity: ``koch``, ``contrastive`` or ``triplet`` (see the module docstring).
        margin: margin of the contrastive and triplet losses.
        embedding_dim: ``d``; required by ``koch``, which learns a weight per dimension
            (``kshot.models.output_dim(model, example_shape)`` gives it).
    """

    algo = "siamese"
    config_options = ("similarity", "margin")
    sampler_options = ("pairs", "augment")  # settings its training pairs take (checked by kshot.runs.build)

    def __init__(self, model: nn.Module, similarity: str = "koch", margin: float = 1.0,
                 embedding_dim: int | None = None):
        super().__init__(model)
        if similarity not in SIMILARITIES:
            raise ConfigError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if not margin > 0:
            raise ConfigError(f"margin must be positive, not {margin}")
        self.similarity, self.margin = similarity, float(margin)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        if similarity == "koch":
            if not self.embedding_dim:
                raise ConfigError("the koch similarity weighs each embedding dimension, so it needs "
                                  "embedding_dim (kshot.models.output_dim(model, example_shape))")
            self.head = nn.Linear(self.embedding_dim, 1)  # alpha_j and b of the weighted L1
        # NaN until calibrated; both travel in the state_dict, hence in checkpoints.
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("eer", torch.tensor(float("nan")))

    @classmethod
    def from_config(cls, config, example_shape: Sequence[int]) -> "Siamese":
        model = cls.build_model(config, example_shape)
        return cls(model, similarity=config.similarity, margin=config.margin,
                   embedding_dim=output_dim(model, example_shape))

    @classmethod
    def make_sampler(cls, config, dataset) -> PairSampler:
        """Balanced same/different pair batches, ``config.pairs`` pairs each."""
        return PairSampler(dataset, pairs=config.pairs, seed=config.seed, meta_batch_size=config.meta_batch_size,
                           augment=config.augment, within_groups=config.within_groups)

    def options(self) -> dict:
        return {"similarity": self.similarity, "margin": self.margin, "embedding_dim": self.embedding_dim}

    # ------------------------------------------------------------------ scores
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)

    def pair_logits(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Scores ``[...]`` of embedding pairs ``z1, z2 [..., d]`` (broadcast)."""
        if self.similarity == "koch":
            return self.head((z1 - z2).abs()).squeeze(-1)
        # A small floor keeps the gradient of the norm finite for identical embeddings.
        return -((z1 - z2).pow(2).sum(-1) + 1e-12).sqrt()

    def score_matrix(self, query_z: torch.Tensor, support_z: torch.Tensor) -> torch.Tensor:
        """Scores ``[m, n]`` of every query ``[m, d]`` against every support example ``[n, d]``."""
        if self.similarity != "koch":
            return -torch.cdist(query_z, support_z)
        rows = max(1, _CHUNK_ELEMENTS // max(1, support_z.numel()))
        return torch.cat([self.pair_logits(q[:, None, :], support_z[None, :, :])
                          for q in query_z.split(rows)])

    def score_pairs(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Scores ``[P]`` of input pairs ``first, second [P, ...]`` (one encoder pass)."""
        z = self.embed(torch.cat([first, second]))
        return self.pair_logits(*z.split(len(first)))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    @property
    def decision_threshold(self) -> float:
        """The calibrated threshold, else the loss's own boundary (p = 1/2; distance margin/2)."""
        if self.calibrated:
            return float(self.threshold)
        return 0.0 if self.similarity == "koch" else -self.margin / 2

    @torch.no_grad()
    def verify(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Are ``first[i]`` and ``second[i]`` of the same class?

        Returns:
            ``scores [P]`` and decisions ``[P]`` (True: same), at :attr:`decision_threshold`.
        """
        was_training = self.training
        self.eval()
        try:
            scores = self.score_pairs(first, second)
        finally:
            self.train(was_training)
        return scores, scores >= self.decision_threshold

    @property
    def display_name(self) -> str:
        """What :meth:`display` shows: ``similarity`` (probability of same) or ``distance``."""
        return "similarity" if self.similarity == "koch" else "distance"

    def display(self, score: float) -> float:
        """A score in the user's units: the probability of same (koch), or the distance."""
        if self.similarity == "koch":
            return 1 / (1 + math.exp(-score)) if score > -700 else 0.0
        return -score

    def from_display(self, value: float) -> float:
        """The score of a value in the user's units (the inverse of :meth:`display`)."""
        if self.similarity == "koch":
            if not 0 < value < 1:
                raise ConfigError(f"a similarity threshold is a probability strictly between 0 and 1, not {value}")
            return math.log(value / (1 - value))
        if value < 0:
            raise ConfigError(f"a distance threshold cannot be negative, not {value}")
        return -value

    # ------------------------------------------------------------------ few-shot classification
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              ways: int | None = None) -> Predictor:
        ways = int(support_y.max()) + 1 if ways is None else ways
        support_z = self.embed(support_x)
        one_hot = F.one_hot(support_y, ways).to(support_z.dtype)  # [n, ways]
        counts = one_hot.sum(0)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ConfigError(f"classes {missing} have no support examples; every class needs at least one")
        mean = one_hot / counts  # [n, ways]: averages a query's scores over each class

        def logits(x: torch.Tensor) -> torch.Tensor:
            return self.score_matrix(self.embed(x), support_z) @ mean

        return Predictor(logits, ways)

    # ------------------------------------------------------------------ training
    def pair_loss(self, same_scores: torch.Tensor, different_scores: torch.Tensor) -> torch.Tensor:
        """Loss of ``h`` same-class and ``h`` different-class pairs sharing their anchors."""
        if self.similarity == "koch":
            scores = torch.cat([same_scores, different_scores])
            targets = torch.cat([torch.ones_like(same_scores), torch.zeros_like(different_scores)])
            return F.binary_cross_entropy_with_logits(scores, targets)
        d_same, d_diff = -same_scores, -different_scores
        if self.similarity == "contrastive":
            return torch.cat([d_same.pow(2), (self.margin - d_diff).clamp_min(0).pow(2)]).mean() / 2
        return (d_same - d_diff + self.margin).clamp_min(0).mean()

    def meta_loss(self, batches: Sequence[PairBatch] | Sequence[Task]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean pair loss over pair batches (or, given tasks, the episodic query loss).

        Metrics: ``loss``; ``acc``, the fraction of anchors scored closer to their positive
        than to their negative (2-way one-shot accuracy); ``pair_acc``, pairs called right at
        the decision threshold.
        """
        if all(isinstance(b, Task) for b in batches):
            return super().meta_loss(batches)  # type: ignore[arg-type]
        if not all(isinstance(b, PairBatch) for b in batches):
            raise ConfigError("a Siamese meta-batch holds pair batches (kshot.tasks.pairs) or tasks, not a mix")
        losses, acc, pair_acc = [], 0.0, 0.0
        threshold = self.decision_threshold
        for b in batches:
            h = len(b.anchor)
            # One encoder pass per batch: batch norm sees all three kinds of example together.
            z = self.embed(torch.cat([b.anchor, b.positive, b.negative]))
            z_anchor, z_positive, z_negative = z.split(h)
            same = self.pair_logits(z_anchor, z_positive)
            different = self.pair_logits(z_anchor, z_negative)
            losses.append(self.pair_loss(same, different))
            with torch.no_grad():
                acc += (same > different).float().mean().item()
                pair_acc += ((same >= threshold).float().sum() + (different < threshold).float().sum()).item() / (2 * h)
        loss = torch.stack(losses).mean()
        n = len(batches)
        return loss, {"loss": loss.item(), "acc": acc / n, "pair_acc": pair_acc / n}

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def pair_scores(self, sampler: PairSampler, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and truth (1: same) of the first ``n_pairs`` pairs of ``sampler``'s stream
        (batches ``(i, 0)``), in eval mode."""
        was_training = self.training
        self.eval()
        device = self.threshold.device
        scores, same = [], []
        try:
            for step in range(math.ceil(n_pairs / sampler.pairs)):
                b = sampler.pair_batch(step, 0).to(device)
                scores.append(self.score_pairs(b.first, b.second).cpu())
                same.append(b.same.cpu())
        finally:
            self.train(was_training)
        return torch.cat(scores)[:n_pairs].numpy(), torch.cat(same)[:n_pairs].numpy()

    def calibrate(self, dataset, pairs: int | None = None, seed: int = EVAL_SEED,
                  split: str = "val") -> VerificationReport:
        """Set the decision threshold to the equal-error point of ``pairs`` (default
        :data:`CALIBRATION_PAIRS`) balanced pairs of ``dataset`` (held-out classes), and report
        the ROC curve there."""
        pairs = CALIBRATION_PAIRS if pairs is None else int(pairs)
        sampler = PairSampler(dataset, pairs=min(500, pairs + pairs % 2), seed=seed)
        scores, same = self.pair_scores(sampler, pairs)
        report = VerificationReport.from_scores(scores, same, score=self.score_name, split=split)
        self.threshold.fill_(report.threshold)
        self.eer.fill_(report.eer)
        report.extra["accuracy_at_threshold"] = report.accuracy(scores, same)
        return report

    @property
    def score_name(self) -> str:
        return "log-odds of same" if self.similarity == "koch" else "negative Euclidean distance"

    def after_training(self, val_dataset) -> VerificationReport:
        """Calibrate the threshold on meta-validation pairs (the trainer saves it in best)."""
        return self.calibrate(val_dataset)


# Koch et al. 2015: 20-way one-shot tasks within one alphabet of the evaluation alphabets, with
# affine distortions of the training pairs; 92.0% with their 105x105 network. This preset keeps
# the protocol and shrinks the images and encoder (28x28, Conv4) to fit a CPU; see docs/SIAMESE.md.
register_preset(
    "siamese-omniglot-20way-1shot",
    "Siamese network (Koch et al. 2015: 92.0%), Omniglot 20-way 1-shot within-alphabet, Lake "
    "split, affine distortions; 28x28 Conv4 instead of 105x105",
    dict(algo="siamese", dataset="omniglot", protocol="lake", image_size=28, backbone="conv4",
         similarity="koch", pairs=128, augment="affine", ways=20, shots=1, test_ways=20,
         test_shots=1, test_queries=5, test_within_groups=True, meta_batch_size=1,
         optimizer="adam", lr=1e-3, lr_schedule="step", lr_decay_every=4000, lr_decay_factor=0.5,
         steps=20_000, val_every=1000, val_tasks=300, checkpoint_every=500, test_tasks=1000))
