"""Backbones for sparse text features: sparse_mlp (= mlp, faster) and feature_weights."""

from __future__ import annotations

import pytest
import torch

from kshot.runs.build import load_learner
from kshot.services.checkpoint import save_checkpoint
from kshot.data import load_dataset
from kshot.learners import ProtoNet
from kshot.models import create_model, input_kwargs


@pytest.fixture(scope="module")
def features():
    data = load_dataset("banking77", "val", features={"dim": 1024})
    return data.load(data.class_examples()[0][:6])


def test_sparse_mlp_computes_what_mlp_computes(features):
    assert input_kwargs("sparse_mlp", (1024,)) == {"in_features": 1024}
    torch.manual_seed(0)
    dense = create_model("mlp", in_features=1024, hidden=[32, 16])
    sparse = create_model("sparse_mlp", in_features=1024, hidden=[32, 16])
    with torch.no_grad():
        sparse.first.weight.copy_(dense[1].weight.T)
        sparse.bias.copy_(dense[1].bias)
        sparse.rest[1].weight.copy_(dense[3].weight)
        sparse.rest[1].bias.copy_(dense[3].bias)
    assert (features != 0).float().mean() < 0.3  # the case it is built for
    out_dense, out_sparse = dense(features), sparse(features)
    assert out_sparse.shape == (6, 16)
    assert torch.allclose(out_dense, out_sparse, atol=1e-6)
    out_dense.square().sum().backward()
    out_sparse.square().sum().backward()
    assert torch.allclose(dense[1].weight.grad.T, sparse.first.weight.grad, atol=1e-6)
    assert torch.allclose(dense[3].weight.grad, sparse.rest[1].weight.grad, atol=1e-6)
    # A row of zeros (an empty text) is a bag with nothing in it, not an error.
    assert torch.allclose(sparse(torch.zeros(2, 1024)), dense(torch.zeros(2, 1024)), atol=1e-6)


def test_feature_weights_start_as_the_identity_and_learn(features):
    model = create_model("feature_weights", in_features=1024)
    assert torch.equal(model(features), features)
    model(features).sum().backward()
    assert model.log_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sparse_mlp", "feature_weights"])
def test_text_backbones_round_trip_through_checkpoints(name, features, tmp_path):
    learner = ProtoNet(create_model(name, in_features=1024), distance="cosine")
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(tmp_path / "m.safetensors", learner)
    loaded = load_learner(tmp_path / "m.safetensors")
    learner.eval()
    assert torch.equal(loaded.embed(features), learner.embed(features))
