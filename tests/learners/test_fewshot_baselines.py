"""Baseline, Baseline++ and RFS-simple on real Omniglot: pre-training learns, the heads are what
the papers define, the backbone stays frozen while a task's head is fitted, runs resume exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kshot.config import PRESETS, resolve_config
from kshot.data.base import ClassSubset
from kshot.errors import ConfigError
from kshot.learners import RFS, Baseline, BaselinePlusPlus
from kshot.learners.baselines import CosineClassifier, logistic_regression
from kshot.models import create_model
from kshot.runs.train import train
from kshot.services.checkpoint import load_checkpoint
from kshot.runs.evaluate import evaluate, evaluate_checkpoint
from kshot.tasks import LabelledBatchSampler, TaskSampler, fixed_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_backbone():
    return create_model("conv4", hidden=8)


def test_baseline_pp_head_is_cosine_with_a_learned_class_wise_scale():
    torch.manual_seed(0)
    head = CosineClassifier(6, 4)
    z = torch.randn(5, 6)
    cos = F.cosine_similarity(z[:, None, :], head.direction[None, :, :], dim=-1)  # [5, 4], computed apart
    torch.testing.assert_close(head(z), head.factor * cos * head.scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(3 * z), head(z), rtol=1e-5, atol=1e-5)  # a cosine: the features' scale is gone
    torch.testing.assert_close(head.scale.detach(), head.direction.detach().norm(dim=1))  # weight norm's g
    assert head.factor == 2.0 and CosineClassifier(6, 4112).factor == 10.0  # Chen et al.'s fixed factors
    assert head.scale.requires_grad
    F.cross_entropy(head(z), torch.tensor([0, 1, 2, 3, 0])).backward()
    assert head.scale.grad.abs().min() > 0  # the scale is learned, class by class


@pytest.fixture(scope="module")
def pretrained(omniglot):
    """Each baseline pre-trained for 30 steps on 20 real Omniglot classes, and its losses."""
    data = ClassSubset(omniglot("train"), range(0, 400, 20))
    sampler = LabelledBatchSampler(data, batch_size=40, seed=0)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the tests' one-thread fixture
    try:
        _pretrain(sampler, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _pretrain(sampler, out) -> None:
    for cls in (Baseline, BaselinePlusPlus, RFS):
        torch.manual_seed(0)
        learner = cls(small_backbone(), num_classes=sampler.num_classes, embedding_dim=8)
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
        losses = []
        for step in range(30):
            optimizer.zero_grad()
            losses.append(learner.meta_gradient(sampler.meta_batch(step))["loss"])
            optimizer.step()
        out[cls] = learner, losses


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus, RFS])
def test_pretraining_learns_the_training_classes(pretrained, cls):
    losses = pretrained[cls][1]
    # Baseline++'s cosine scores start within +-1.2 (factor 2 times norms ~0.58): its loss falls slowest.
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus, RFS])
def test_a_tasks_head_is_fitted_on_frozen_features_of_any_ways(omniglot, pretrained, cls):
    learner = pretrained[cls][0]
    learner.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in learner.state_dict().items()}
    task = TaskSampler(omniglot("val"), 7, 3, 4, seed=1).task(0)
    learner.eval()
    predictor = learner.adapt(task.support_x, task.support_y, 7)  # gradients enabled: still frozen
    scores = predictor.logits(task.query_x)
    assert scores.shape == (28, 7)
    assert all(p.grad is None for p in learner.parameters())
    assert all(torch.equal(v, before[n]) for n, v in learner.state_dict().items())
    with torch.no_grad():
        support_acc = (predictor.logits(task.support_x).argmax(1) == task.support_y).float().mean()
        again = learner.adapt(task.support_x, task.support_y, 7).logits(task.query_x)
    assert support_acc >= 0.5  # the head is fitted to the support set (chance: 1/7)
    assert (scores.argmax(1) == task.query_y).float().mean() > 2 / 7  # and carries over to the queries
    torch.testing.assert_close(again, scores.detach(), rtol=0, atol=0)  # a fixed seed: the same head every time
    alone = torch.cat([predictor.logits(task.query_x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, scores[:4].detach(), rtol=1e-5, atol=1e-5)  # each query by itself


def test_rfs_logistic_regression_is_the_penalised_optimum(omniglot):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(15, 8, generator=g), dim=1)
    y = torch.arange(5).repeat_interleave(3)
    w, b = logistic_regression(z, y, 5, c=1.0)
    # scikit-learn's objective 0.5 ||W||^2 + C sum_i CE_i: its gradient, written out, vanishes.
    p = torch.softmax(z.double() @ w.T + b, 1)
    residual = p - F.one_hot(y, 5).double()
    assert (w + residual.T @ z.double()).abs().max() < 1e-6
    assert residual.sum(0).abs().max() < 1e-6
    learner = RFS(small_backbone())
    task = TaskSampler(omniglot("val"), 5, 1, 3, seed=2).task(0)
    learner.eval()
    with torch.no_grad():
        scores = learner.adapt(task.support_x, task.support_y).logits(task.query_x)
        features = F.normalize(learner.embed(task.support_x), dim=1)
    w, b = logistic_regression(features, task.support_y, 5)
    with torch.no_grad():
        expected = F.normalize(learner.embed(task.query_x), dim=1).double() @ w.T + b
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def test_an_untrained_baseline_adapts_but_does_not_pretrain(omniglot):
    learner = Baseline(small_backbone())
    with pytest.raises(ConfigError, match="built without its training classes"):
        learner.meta_gradient([])
    tasks = fixed_tasks(omniglot("val"), 5, 1, 1, n_tasks=2)
    with pytest.raises(ConfigError, match="never depend on the other queries"):  # kshot eval --transductive
        evaluate(learner, tasks, transductive=True)
    assert evaluate(learner, tasks).protocol == "non-transductive"
    assert PRESETS["baselinepp-omniglot-5way-1shot"][1]["steps"] == 25_700
    assert "95.41" in PRESETS["baselinepp-omniglot-5way-1shot"][0] and "62.02" in PRESETS["rfs-miniimagenet-5way-1shot"][0]


@pytest.mark.parametrize("algo", ["baseline", "baseline++"])
def test_pretraining_resumes_to_the_same_weights(tmp_path, algo):
    config = resolve_config(overrides=dict(
        algo=algo, backbone_options={"hidden": 8}, batch_size=8, steps=6, val_every=0, test_tasks=0,
        checkpoint_every=2, log_every=2, lr=1e-2))
    straight = train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = train(config, tmp_path / "resumed", progress=False)
    assert straight.step == resumed.step == 6
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors")
    assert a.learner["options"]["num_classes"] == 4112  # the trainer built it for its sampler's classes
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    assert not math.isnan(float(a.state_dict["classifier.weight" if algo == "baseline" else "classifier.scale"].sum()))


def test_a_baseline_checkpoint_is_tested_with_rfs_heads_on_its_own_backbone(tmp_path, omniglot):
    # One pre-training serves the Baseline and RFS rows: --head rfs must be exactly an RFS learner
    # holding the Baseline run's weights, on the same tasks.
    config = resolve_config(overrides=dict(
        algo="baseline", backbone_options={"hidden": 8}, batch_size=8, steps=2, val_every=0, test_tasks=0,
        checkpoint_every=2, log_every=2, lr=1e-2, test_ways=5, test_shots=1))
    train(config, tmp_path, progress=False)
    path = tmp_path / "last.safetensors"
    as_rfs = evaluate_checkpoint(path, head="rfs", tasks=600, queries=2)
    ckpt = load_checkpoint(path)
    rfs = RFS(create_model("conv4", hidden=8, image_size=28), **ckpt.learner["options"])
    rfs.load_state_dict(ckpt.state_dict)
    reference = evaluate(rfs, fixed_tasks(omniglot("test"), 5, 1, 2, n_tasks=600))
    assert np.array_equal(as_rfs.result.accuracies, reference.accuracies)
    assert as_rfs.record["algo"] == "rfs" and as_rfs.record["pretrained_by"] == "baseline"
    assert as_rfs.description.startswith("rfs (pre-trained by baseline) on omniglot")
    with pytest.raises(ConfigError, match="pre-trained with a linear head, so its heads can be fitted as "
                                          "baseline or rfs does"):
        evaluate_checkpoint(path, head="baseline++", tasks=600)
