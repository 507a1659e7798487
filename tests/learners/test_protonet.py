"""Prototypical Networks: the maths, the textbook API, free ways, cosine option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kshot.errors import ConfigError
from kshot.learners.protonet import ProtoNet, prototype_logits, prototypes
from kshot.models import create_model
from kshot.tasks import TaskSampler


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1])
    protos = prototypes(z, y, 3)
    for c in range(3):
        assert torch.allclose(protos[c], z[y == c].mean(0))
    q = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(prototype_logits(q, protos), -torch.cdist(q, protos) ** 2)
    cos = prototype_logits(q, protos, "cosine", temperature=3.0)
    assert torch.allclose(cos, 3.0 * F.cosine_similarity(q[:, None], protos[None], dim=-1))


def test_a_class_without_support_examples_is_a_clear_error():
    with pytest.raises(ConfigError, match="no support examples"):
        prototypes(torch.zeros(2, 3), torch.tensor([0, 2]), 3)


def test_unknown_distance_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown distance"):
        ProtoNet(create_model("conv4"), distance="manhattan")


def test_textbook_loop_meta_trains_the_encoder(omniglot):
    """adapt -> query loss -> backward reaches every encoder parameter."""
    torch.manual_seed(0)
    learner = ProtoNet(create_model("conv4"))
    task = TaskSampler(omniglot("train"), 5, 1, 5, seed=0).task(0)
    predictor = learner.adapt(task.support_x, task.support_y)
    loss = F.cross_entropy(predictor.logits(task.query_x), task.query_y)
    loss.backward()
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_meta_loss_is_the_papers_single_pass_loss(omniglot):
    torch.manual_seed(0)
    learner = ProtoNet(create_model("conv4"))
    tasks = TaskSampler(omniglot("train"), 5, 2, 3, seed=0, meta_batch_size=2).meta_batch(0)
    loss, metrics = learner.meta_loss(tasks)
    expected = []
    for t in tasks:
        z = learner.model(torch.cat([t.support_x, t.query_x]))
        p = torch.stack([z[:10][t.support_y == c].mean(0) for c in range(5)])
        expected.append(F.cross_entropy(-torch.cdist(z[10:], p) ** 2, t.query_y))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["loss"] == pytest.approx(loss.item())


def test_trained_with_more_ways_than_tested(omniglot):
    """The encoder is the only meta-parameter, so a 20-way-trained model predicts 5-way tasks."""
    torch.manual_seed(0)
    learner = ProtoNet(create_model("conv4"))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    sampler = TaskSampler(omniglot("train"), 20, 1, 2, seed=0)
    for step in range(3):
        opt.zero_grad()
        learner.meta_gradient(sampler.meta_batch(step))
        opt.step()
    learner.eval()
    task = TaskSampler(omniglot("test"), 5, 1, 4, seed=0).task(0)
    with torch.no_grad():
        proba = learner.adapt(task.support_x, task.support_y).predict_proba(task.query_x)
    assert proba.shape == (20, 5)
    assert torch.allclose(proba.sum(-1), torch.ones(20))
