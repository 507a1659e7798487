"""Checkpoints: exact round trips, no pickle, clear errors, atomic writes."""

from __future__ import annotations

import pickle

import pytest
import torch

from kshot.runs.build import learner_from_checkpoint, load_learner
from kshot.services.checkpoint import load_checkpoint, save_checkpoint
from kshot.errors import CheckpointError
from kshot.learners import ProtoNet
from kshot.models import create_model


def _trained_learner():
    torch.manual_seed(0)
    learner = ProtoNet(create_model("conv4", hidden=16), distance="cosine", temperature=5.0)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    for _ in range(2):
        opt.zero_grad()
        learner.model(torch.rand(8, 1, 28, 28)).pow(2).mean().backward()
        opt.step()
    return learner, opt


def test_round_trip_restores_weights_buffers_options_and_optimizer(tmp_path):
    learner, opt = _trained_learner()
    path = save_checkpoint(tmp_path / "c.safetensors", learner, config={"lr": 0.01},
                           train_state={"step": 2}, optimizer=opt)
    ckpt = load_checkpoint(path)
    assert ckpt.config == {"lr": 0.01} and ckpt.train_state == {"step": 2}
    again = learner_from_checkpoint(ckpt)
    assert again.distance == "cosine" and again.temperature == 5.0
    for (k, a), (_, b) in zip(learner.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k  # includes batch-norm running statistics
    opt2 = torch.optim.Adam(again.parameters(), 1e-2)
    opt2.load_state_dict(ckpt.optimizer)
    for p1, p2 in zip(learner.parameters(), again.parameters()):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    x = torch.rand(4, 1, 28, 28)
    learner.eval()
    assert torch.equal(learner.model(x), load_learner(path).model(x))


def test_loading_a_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    with pytest.raises(CheckpointError, match="not a readable kshot checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()
    torch_file = tmp_path / "torch.pt"
    torch.save({"w": torch.zeros(2)}, torch_file)
    with pytest.raises(CheckpointError):
        load_checkpoint(torch_file)


def test_foreign_safetensors_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a kshot checkpoint"):
        load_checkpoint(path)


def test_missing_and_truncated_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        load_checkpoint(tmp_path)
    learner, _ = _trained_learner()
    path = save_checkpoint(tmp_path / "c.safetensors", learner)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    learner, _ = _trained_learner()
    path = save_checkpoint(tmp_path / "last.safetensors", learner, train_state={"step": 1})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("kshot.services.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, learner, train_state={"step": 2})
    assert load_checkpoint(path).train_state == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_checkpoint_that_does_not_match_its_learner_is_a_clear_error(tmp_path):
    learner, _ = _trained_learner()
    path = save_checkpoint(tmp_path / "c.safetensors", learner)
    ckpt = load_checkpoint(path)
    ckpt.learner["model"]["kwargs"]["hidden"] = 32
    with pytest.raises(CheckpointError, match="does not match"):
        learner_from_checkpoint(ckpt)
