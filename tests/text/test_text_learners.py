"""Learners on the encoder: the train-free paths, top layers that train, checkpoints that refuse
another encoder, and the standard released-split setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.data.text import Banking77, TextDataset
from kshot.errors import CheckpointError
from kshot.learners import ProtoNet
from kshot.models import create_model
from kshot.runs.build import learner_from_checkpoint
from kshot.services.checkpoint import load_checkpoint, save_checkpoint
from kshot.tasks import fixed_tasks
from kshot.text import EncodedTexts, EncodingCache, FineTune, released_task, text_backbone_options


@pytest.fixture(scope="module")
def frozen(encoder, banking_texts, tmp_path_factory):
    texts, labels, names = banking_texts
    return EncodedTexts(TextDataset(texts, labels, names), encoder,
                        cache=EncodingCache(tmp_path_factory.mktemp("enc")))


def test_finetune_starts_as_cosine_prototypes_and_fits_its_support(frozen):
    task = fixed_tasks(frozen, 5, 5, 10, 1, seed=3)[0]
    proto = ProtoNet(create_model("identity"), distance="cosine", temperature=10.0).eval()
    expected = proto.adapt(task.support_x, task.support_y, 5).logits(task.query_x)
    untrained = FineTune(create_model("identity"), inner_steps=0).adapt(task.support_x, task.support_y, 5)
    torch.testing.assert_close(untrained.logits(task.query_x), expected, atol=1e-5, rtol=0)
    fitted = FineTune(create_model("identity"), inner_steps=100, inner_lr=0.05).adapt(task.support_x, task.support_y, 5)
    support_loss = torch.nn.functional.cross_entropy(fitted.logits(task.support_x), task.support_y)
    start_loss = torch.nn.functional.cross_entropy(untrained.logits(task.support_x), task.support_y)
    assert support_loss < 0.5 * start_loss
    assert (fitted.predict(task.support_x) == task.support_y).all()
    assert (fitted.predict(task.query_x) == task.query_y).float().mean() > 0.8  # real intents, unseen queries


def test_protonet_through_top_layers_trains_them_and_checkpoints_only_them(encoder, model_path, banking_texts,
                                                                          tmp_path):
    texts, labels, names = banking_texts
    data = EncodedTexts(TextDataset(texts, labels, names), encoder, top_layers=1,
                        cache=EncodingCache(tmp_path / "enc"))
    model = create_model("text_top", **text_backbone_options(model_path, 1))
    learner = ProtoNet(model, distance="cosine")
    task = fixed_tasks(data, 3, 2, 3, 1, seed=1)[0]
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-4)
    loss0, _ = learner.meta_loss([task])
    loss0.backward()
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    optimizer.step()
    changed = [k for k, v in learner.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("model.top.encoder.layer.0.") for k in changed)
    # The checkpoint holds the trained top layer only, and records the encoder by name and hash.
    path = save_checkpoint(tmp_path / "top.safetensors", learner, extra=data.checkpoint_extra())
    ckpt = load_checkpoint(path)
    per_layer = sum(p.numel() for p in encoder.model.encoder.layer[0].parameters())
    assert sum(t.numel() for t in ckpt.state_dict.values()) == per_layer
    assert ckpt.learner["model"]["kwargs"]["sha256"] == encoder.sha256
    rebuilt = learner_from_checkpoint(ckpt).eval()
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.embed(task.query_x), learner.embed(task.query_x))
    ckpt.learner["model"]["kwargs"]["sha256"] = "0" * 64  # made with other files
    with pytest.raises(CheckpointError, match="other|sha256"):
        learner_from_checkpoint(ckpt)


def test_released_task_draws_from_the_released_parts(data_dir):
    data = Banking77("all", data_dir=data_dir, download=False)
    task = released_task(data, 10, seed=0)
    assert len(task.support) == 77 * 10 and set(data.parts[task.support]) == {"train"}
    assert np.bincount(task.support_y).tolist() == [10] * 77
    assert len(task.query) == 3080 and set(data.parts[task.query]) == {"test"}
    assert not set(task.support) & set(task.query)
    again, other = released_task(data, 10, seed=0), released_task(data, 10, seed=1)
    assert np.array_equal(again.support, task.support) and not np.array_equal(other.support, task.support)
