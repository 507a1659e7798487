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


# ----------------------------------------------------------------------------- untrusted metadata
def _rewrite(path, **changes):
    """The checkpoint at ``path`` with header fields replaced (``learner``, ``config``, ...),
    and optimiser tensors dropped with ``drop_optim=True``: what an edited file looks like."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    drop_optim = changes.pop("drop_optim", False)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not (drop_optim and k.startswith("optim."))}
    for key, value in changes.items():
        header[key] = json.dumps(value)
    save_file(tensors, str(path), metadata=header)
    return path


def _omniglot_checkpoint(tmp_path, with_optimizer=False):
    from kshot.config import resolve_config

    learner, opt = _trained_learner()
    config = resolve_config("quick", overrides={"backbone_options": {"hidden": 16}, "distance": "cosine",
                                                "temperature": 5.0}).to_dict()
    return save_checkpoint(tmp_path / "best.safetensors", learner, config=config, train_state={"step": 2},
                           optimizer=opt if with_optimizer else None,
                           extra={"image_format": {"channels": 1, "size": 28, "invert": True},
                                  "example_shape": [1, 28, 28]})


def test_a_backbone_size_in_the_metadata_is_checked_against_the_tensors_before_anything_is_built(
        tmp_path, monkeypatch):
    """The defect: model.kwargs.hidden=6000 allocated 4 GB before the file was refused."""
    import kshot.runs.build as build

    path = _omniglot_checkpoint(tmp_path)
    spec = load_checkpoint(path).learner
    spec["model"]["kwargs"]["hidden"] = 6000
    _rewrite(path, learner=spec)
    real = build.create_model

    def guarded(name, **kwargs):
        assert torch.empty(0).device.type == "meta", "a 6000-wide model was built for real"
        return real(name, **kwargs)

    monkeypatch.setattr(build, "create_model", guarded)
    with pytest.raises(CheckpointError, match=r"does not match .* is \(16, 1, 3, 3\) in the file "
                                              r"but \(6000, 1, 3, 3\)"):
        learner_from_checkpoint(load_checkpoint(path))


@pytest.mark.parametrize("field, value, match", [
    ("learner", {"algo": "protonet", "options": {"distance": "cosine", "temperature": "hot"},
                 "model": {"name": "conv4", "kwargs": {"hidden": 16}}}, "learner record is malformed"),
    ("learner", {"algo": "protonet", "model": {"name": "conv4", "kwargs": {"hidden": [16] * 99}}},
     "more layers than the"),
    ("learner", ["protonet"], "learner must be a mapping"),
    ("config", ["not", "a", "mapping"], "config must be a mapping"),
    ("extra", {"example_shape": 5}, "example_shape must be a list"),
    ("extra", {"example_shape": [1, 28, 28], "image_format": {"channels": 1, "size": 100000}},
     "image_format must give 1 or 3 channels and a size of 1 to 1024 pixels, not channels=1, size=100000"),
    ("extra", {"example_shape": [1, 28, 28], "image_format": {"channels": 1, "size": 84}},
     "does not match the example shape"),
    ("train_state", {"step": "abc"}, "train_state.step must be a non-negative integer"),
])
def test_each_malformed_field_of_a_checkpoint_is_one_checkpoint_error(tmp_path, field, value, match):
    path = _rewrite(_omniglot_checkpoint(tmp_path), **{field: value})
    with pytest.raises(CheckpointError, match=match) as error:
        learner_from_checkpoint(load_checkpoint(path))
    assert "\n" not in str(error.value)


def test_a_last_checkpoint_without_optimiser_slots_is_one_checkpoint_error(tmp_path):
    path = _omniglot_checkpoint(tmp_path, with_optimizer=True)
    optimizer = load_checkpoint(path).optimizer
    assert optimizer["state"]  # it had slots...
    _rewrite(path, optimizer={"param_groups": optimizer["param_groups"], "scalars": {}}, drop_optim=True)
    with pytest.raises(CheckpointError, match="optimizer must be a mapping of 'param_groups', 'scalars' and 'slots'"):
        load_checkpoint(path)


def test_eval_never_writes_where_the_checkpoint_says(tmp_path, cache_dir):
    """The defect: config.cache_dir in a checkpoint made `kshot eval` build its cache in the
    folder the checkpoint named, instead of the user's."""
    from kshot.errors import DataError
    from kshot.runs.evaluate import evaluate_checkpoint

    path = _omniglot_checkpoint(tmp_path)
    config = load_checkpoint(path).config
    elsewhere = tmp_path / "elsewhere"
    _rewrite(path, config={**config, "cache_dir": str(elsewhere / "cache"), "data_dir": str(elsewhere / "data")})
    # The test split loads (from the user's cache), then the task set is refused: quick to reach.
    with pytest.raises(DataError, match="cannot draw 5000-way tasks"):
        evaluate_checkpoint(path, ways=5000, tasks=600)
    assert not elsewhere.exists()
