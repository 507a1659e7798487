"""Learners on a pre-trained encoder, and the presets of the settings users report.

Prototypical Networks, MAML and its family come from :mod:`kshot.learners` unchanged: the
encoder is their backbone (``identity`` on frozen embeddings, ``mlp`` as a head, ``text_top``
for the top layers). This module adds the plain baseline the field compares against:

* ``finetune``: a linear head fitted on the support set (multinomial logistic regression by
  Adam on the cross-entropy), started from the cosine prototype classifier (its weights are the
  normalised class means times ``temperature``, so with 0 steps it *is* Prototypical Networks
  with cosine similarity); with ``body_lr > 0`` the encoder's top layers (``text_top``) are
  fine-tuned with it. Nothing is meta-trained: kshot trains it in no time and tests it as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kshot.config import register_preset
from kshot.errors import ConfigError
from kshot.learners import Predictor, register_learner
from kshot.learners.base import Learner
from kshot.learners.protonet import ProtoNet, prototypes
from kshot.models import create_model
from kshot.text.models import TopLayers  # importing it registers the identity and text_top backbones

#: Where the presets find the encoder; tests and benchmarks override it with a local folder.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


class FineTune(Learner):
    """A linear head (and optionally the top layers, a :class:`TopLayers`) fitted on each task's support set.

    Args:
        model: the backbone: ``identity`` on frozen embeddings, or ``text_top``.
        inner_steps: Adam steps on the support set (full batch for the head alone; mini-batches
            of ``batch_size`` when the top layers are fine-tuned too).
        inner_lr: the head's learning rate.
        body_lr: the top layers' learning rate (0: they stay as they are).
        head_l2: L2 penalty on the head's weights (per weight, summed).
        temperature: scale of the initial cosine classifier.
        batch_size: support examples per step when the top layers are fine-tuned.
        seed: seed of the mini-batch order.
    """

    algo = "finetune"
    config_options = ("inner_steps", "inner_lr", "body_lr", "head_l2", "temperature")

    def __init__(self, model: nn.Module, inner_steps: int = 100, inner_lr: float = 0.01,
                 body_lr: float = 0.0, head_l2: float = 0.0, temperature: float = 10.0,
                 batch_size: int = 32, seed: int = 0):
        super().__init__(model)
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise ConfigError(f"finetune: inner_steps must be an integer >= 0, not {inner_steps!r}")
        if not inner_lr > 0 or body_lr < 0 or head_l2 < 0:
            raise ConfigError("finetune: inner_lr must be positive, body_lr and head_l2 not negative")
        self.steps, self.lr, self.body_lr = int(inner_steps), float(inner_lr), float(body_lr)
        self.head_l2, self.temperature = float(head_l2), float(temperature)
        self.batch_size, self.seed = int(batch_size), int(seed)
        if self.body_lr and not any(True for _ in model.parameters()):
            raise ConfigError("finetune: body_lr > 0 needs a backbone with weights to fine-tune "
                              "(text_top, with encoder_layers > 0)")
        for p in self.model.parameters():  # adapted per task from copies, never meta-trained
            p.requires_grad_(False)

    def options(self) -> dict:
        return {"inner_steps": self.steps, "inner_lr": self.lr, "body_lr": self.body_lr,
                "head_l2": self.head_l2, "temperature": self.temperature,
                "batch_size": self.batch_size, "seed": self.seed}

    def meta_gradient(self, tasks, scale: float = 1.0) -> dict[str, float]:
        raise ConfigError("finetune is fitted on each task's support set and is not meta-trained; "
                          "`kshot train` saves and tests it as it is")

    def _embed(self, params: dict[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x) if params is None else functional_call(self.model, params, (x,))
        return out.flatten(1)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              ways: int | None = None) -> Predictor:
        ways = int(support_y.max()) + 1 if ways is None else ways
        with torch.enable_grad():
            body = None
            if self.body_lr:
                body = {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}
            with torch.no_grad():
                z = self._embed(None, support_x)
            weight = (self.temperature * F.normalize(prototypes(z, support_y, ways), dim=-1)).requires_grad_(True)
            bias = torch.zeros(ways, device=z.device, requires_grad=True)
            groups = [{"params": [weight, bias], "lr": self.lr}]
            if body is not None:
                groups.append({"params": list(body.values()), "lr": self.body_lr})
            optimizer = torch.optim.Adam(groups)
            generator = torch.Generator().manual_seed(self.seed)
            n = len(support_y)
            for _ in range(self.steps):
                if body is None:
                    features, labels = z, support_y
                else:
                    rows = torch.randperm(n, generator=generator)[:self.batch_size].to(support_x.device)
                    features, labels = self._embed(body, support_x[rows]), support_y[rows]
                loss = F.cross_entropy(features @ weight.T + bias, labels)
                if self.head_l2:
                    loss = loss + self.head_l2 * weight.pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        weight, bias = weight.detach(), bias.detach()
        fitted = None if body is None else {k: v.detach() for k, v in body.items()}
        return Predictor(lambda x: self._embed(fitted, x) @ weight.T + bias, ways)


register_learner(FineTune)


# ----------------------------------------------------------------------------- presets
def _episodes(algo: str, dataset: str, shots: int, top_layers: int = 0) -> dict:
    """5-way episodes on the test intents (clinc150: unseen domains; banking77: unseen intents)."""
    common = dict(algo=algo, dataset=dataset, text_encoder=DEFAULT_ENCODER, encoder_layers=top_layers,
                  ways=5, shots=shots, queries=15, test_ways=5, test_shots=shots, test_queries=15,
                  meta_batch_size=1, test_tasks=1000, val_tasks=300, threads=1)
    if algo == "protonet" and top_layers == 0:  # nothing to train
        return {**common, "backbone": "identity", "distance": "cosine", "temperature": 10.0, "steps": 1,
                "val_every": 0}
    if algo == "protonet":  # meta-trained through the top layers
        return {**common, "backbone": "text_top", "distance": "cosine", "temperature": 10.0,
                "optimizer": "adam", "lr": 2e-5, "lr_schedule": "constant", "steps": 500,
                "val_every": 100, "checkpoint_every": 100}
    if algo == "finetune":
        return {**common, "backbone": "identity", "inner_steps": 100, "inner_lr": 0.01, "temperature": 10.0,
                "steps": 1, "val_every": 0}
    # The MAML family on a linear head over the frozen embeddings.
    return {**common, "backbone": "mlp", "backbone_options": {"hidden": []}, "inner_steps": 5,
            "inner_lr": 0.5, "test_inner_steps": 10, "meta_batch_size": 4, "optimizer": "adam",
            "lr": 1e-3, "lr_schedule": "constant", "steps": 1000, "val_every": 200, "checkpoint_every": 200,
            "batch_tasks": "loop"}


for _data in ("clinc150", "banking77"):
    _split = "test domains" if _data == "clinc150" else "test intents"
    for _shots in (1, 5):
        _name = f"{_data}-5way-{_shots}shot"
        register_preset(f"text-protonet-{_name}",
                        f"Prototypical Networks on frozen sentence embeddings, {_data} {_split}, 5-way "
                        f"{_shots}-shot: no training (docs/TEXT.md)", _episodes("protonet", _data, _shots))
        register_preset(f"text-protonet-top2-{_name}",
                        f"Prototypical Networks meta-trained through the encoder's top 2 layers, {_data} "
                        f"{_split}, 5-way {_shots}-shot (docs/TEXT.md)", _episodes("protonet", _data, _shots, 2))
        register_preset(f"text-finetune-{_name}",
                        f"Logistic regression on frozen sentence embeddings of the support set, {_data} "
                        f"{_split}, 5-way {_shots}-shot (docs/TEXT.md)", _episodes("finetune", _data, _shots))
        register_preset(f"text-maml-{_name}",
                        f"MAML on a linear head over frozen sentence embeddings, {_data} {_split}, 5-way "
                        f"{_shots}-shot (docs/TEXT.md)", _episodes("maml", _data, _shots))


def _intent(dataset: str, shots: int) -> dict:
    # The standard intent-detection setting (Casanueva et al. 2020): all intents at once, `shots`
    # labelled utterances per intent from the released training set, the released test set.
    ways = {"banking77": 77, "clinc150": 150}[dataset]
    return dict(algo="finetune", dataset=dataset, text_encoder=DEFAULT_ENCODER, encoder_layers=0,
                backbone="identity", ways=ways, shots=shots, test_ways=ways, test_shots=shots,
                inner_steps=100, inner_lr=0.01, temperature=10.0, threads=1)


for _data in ("banking77", "clinc150"):
    for _shots in (10, 5):
        _paper = (" (Casanueva et al. 2020, USE+ConveRT: 85.19%)" if (_data, _shots) == ("banking77", 10)
                  else "")
        register_preset(f"text-intent-{_data}-{_shots}shot",
                        f"{_data}, all intents at once, {_shots} labelled utterances each, tested on the "
                        f"released test set (`kshot intent`){_paper}", _intent(_data, _shots))


def frozen_text_learner(algo: str = "protonet") -> Learner:
    """A learner with nothing trained, on frozen sentence embeddings: ``protonet`` (cosine
    prototypes) or ``finetune`` (a logistic-regression head fitted on the support set)."""
    if algo == "protonet":
        return ProtoNet(create_model("identity"), distance="cosine", temperature=10.0)
    if algo == "finetune":
        return FineTune(create_model("identity"), inner_steps=100, inner_lr=0.01)
    raise ConfigError(f"without a checkpoint, --algo must be protonet or finetune, not {algo!r}")
