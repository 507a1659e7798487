"""MAML and its family on real components: any nn.Module adapts (a CNN, an LSTM, a Transformer on
Omniglot tasks) to any number of ways, batch norm keeps nothing between tasks and a query's
prediction depends on no other query, the variants do what they claim."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kshot.runs.build import load_learner
from kshot.services.checkpoint import save_checkpoint
from kshot.config import PRESETS, resolve_config
from kshot.errors import ConfigError
from kshot.runs.evaluate import evaluate
from kshot.learners import ANIL, FOMAML, LEARNERS, MAML, MetaSGD, create_learner
from kshot.models import create_model
from kshot.learners.protonet import prototype_logits
from kshot.learners.reptile import Reptile
from kshot.tasks import Task, TaskSampler, fixed_tasks
from kshot.runs.build import build_learner
from maml_references import batch_norm_inputs, normalised_by, sgd_steps


# Tiny models: more threads only wait for each other (badly so on a shared machine).
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("error:.*cannot be batched over tasks with vmap")]


class RowLSTM(nn.Module):
    """Reads an image row by row."""

    def __init__(self, ways: int = 5, hidden: int = 16):
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x):
        out, _ = self.lstm(x.flatten(1, 2))
        return self.head(out[:, -1])


class RowTransformer(nn.Module):
    """A one-layer Transformer encoder over the image's rows as tokens."""

    def __init__(self, ways: int = 5, width: int = 32):
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = nn.Parameter(torch.zeros(28, width))
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, ways)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1, 2)) + self.position).mean(1))


def small_conv4():
    return create_model("conv4", hidden=8, out_features=5, image_size=28, track_running_stats=False)


@pytest.mark.parametrize("make_model, inner_lr", [(small_conv4, 0.4), (RowLSTM, 0.5), (RowTransformer, 0.1)],
                         ids=["cnn", "lstm", "transformer"])
def test_any_module_meta_trains_and_adapts(omniglot, make_model, inner_lr):
    torch.manual_seed(0)
    learner = MAML(make_model(), inner_steps=1, inner_lr=inner_lr, test_inner_steps=2)
    sampler = TaskSampler(omniglot("train"), ways=5, shots=1, queries=2, seed=0, meta_batch_size=3)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for step in range(8):
        optimizer.zero_grad()
        metrics = learner.meta_gradient(sampler.meta_batch(step))
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.parameters())
        optimizer.step()
    assert metrics["loss"] == metrics["loss"]
    result = evaluate(learner, fixed_tasks(omniglot("val"), 5, 1, 3, n_tasks=8), trace=True)
    before, after = result.metrics["query_loss_step0"].mean(), result.metrics["query_loss_step2"].mean()
    assert after < before  # adapting on the support set helps on the query set
    assert result.metrics["support_loss_step2"].mean() < result.metrics["support_loss_step0"].mean()
    assert result.loss == pytest.approx(after)


def task_of(x, y):
    return Task(x[:5], y[:5], x[5:], y[5:], torch.arange(5))


@pytest.mark.parametrize("transductive", [True, False])
def test_batch_norm_uses_each_tasks_own_statistics_and_keeps_no_state(omniglot, transductive):
    model = create_model("conv4", hidden=8, out_features=5, image_size=28)  # running stats asked for...
    learner = MAML(model, inner_steps=2, test_inner_steps=2, transductive=transductive)
    assert dict(learner.named_buffers()) == {}  # ...and dropped: nothing can carry over between tasks
    sampler = TaskSampler(omniglot("train"), 5, 1, 1, seed=3)
    a, b = sampler.task(0), sampler.task(1)
    learner.eval()
    with torch.no_grad():
        alone = learner.adapt(b.support_x, b.support_y).logits(b.query_x)
        learner.adapt(a.support_x, a.support_y).logits(a.query_x)
        after_other = learner.adapt(b.support_x, b.support_y).logits(b.query_x)
        learner.train()
        in_training_mode = learner.adapt(b.support_x, b.support_y).logits(b.query_x)
    torch.testing.assert_close(after_other, alone, rtol=0, atol=0)
    # Batch statistics in eval mode too: the same numbers as in training mode (same step count).
    torch.testing.assert_close(in_training_mode, alone, rtol=0, atol=0)


def test_adapt_under_no_grad_returns_a_usable_predictor_and_its_trace(omniglot):
    learner = MAML(small_conv4(), inner_steps=1, test_inner_steps=3)
    task = TaskSampler(omniglot("val"), 5, 1, 3, seed=1).task(0)
    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(task.support_x, task.support_y)
        probs = predictor.predict_proba(task.query_x)
    assert probs.shape == (15, 5) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(1), torch.ones(15))
    assert len(predictor.trajectory) == 4  # the meta-parameters and 3 test-time steps
    trace = predictor.trace(task.query_x, task.query_y)
    assert set(trace) == {f"{s}_{m}_step{k}" for s in ("support", "query") for m in ("loss", "acc") for k in range(4)}
    assert trace["support_loss_step3"] < trace["support_loss_step0"]
    assert all(p.grad is None for p in learner.parameters())  # evaluation leaves no gradients behind


def test_anil_adapts_only_the_head_but_meta_trains_the_body(omniglot):
    learner = ANIL(small_conv4(), inner_steps=2)
    assert learner.adapted_names == ("5.weight", "5.bias")
    task = TaskSampler(omniglot("train"), 5, 1, 2, seed=2).task(0)
    predictor = learner.adapt(task.support_x, task.support_y)
    meta = learner.meta_parameters()
    for name, value in predictor.params.items():
        assert torch.equal(value, meta[name]) == (name not in learner.adapted_names), name
    learner.meta_gradient([task])
    # The body is meta-trained (its second-order term is checked against a hand-written
    # reference in test_inner_loop.py::test_anil_meta_gradient_reaches_the_body_through_the_second_order_term).
    assert learner.model[0][0].weight.grad.abs().sum() > 0


def test_meta_sgd_learns_a_rate_per_parameter_entry(omniglot):
    learner = MetaSGD(small_conv4(), inner_lr=0.1, metasgd_lr_high=0.3)
    rates = learner.learning_rates()
    assert set(rates) == set(learner.adapted_names)
    for name, p in learner.model.named_parameters():
        assert rates[name].shape == p.shape
        assert 0.1 <= float(rates[name].detach().min()) and float(rates[name].detach().max()) <= 0.3
    tasks = TaskSampler(omniglot("train"), 5, 1, 2, seed=4).meta_batch(0, [0, 1])
    learner.meta_gradient(tasks)
    assert learner.inner_lrs["5__weight"].grad.abs().sum() > 0


def test_first_order_option_survives_a_checkpoint(tmp_path, omniglot):
    torch.manual_seed(0)
    for learner in (FOMAML(small_conv4(), inner_steps=2, test_inner_steps=4),
                    MetaSGD(small_conv4(), metasgd_lr_high=0.6)):
        path = save_checkpoint(tmp_path / f"{learner.algo}.safetensors", learner)
        loaded = load_learner(path)
        assert type(loaded) is type(learner) and loaded.options() == learner.options()
        task = TaskSampler(omniglot("val"), 5, 1, 2, seed=5).task(0)
        learner.eval()
        with torch.no_grad():
            expected = learner.adapt(task.support_x, task.support_y).logits(task.query_x)
            got = loaded.adapt(task.support_x, task.support_y).logits(task.query_x)
        torch.testing.assert_close(got, expected)
    assert FOMAML(small_conv4()).first_order and not MAML(small_conv4()).first_order


def test_a_model_vmap_cannot_batch_falls_back_to_the_loop_with_the_same_numbers():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if float(x.sum()) > -1e9:  # Python control flow on a tensor's value
                return self.fc(x)
            return -self.fc(x)

    g = torch.Generator().manual_seed(0)
    tasks = [Task(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]), torch.randn(4, 3, generator=g),
                  torch.tensor([0, 1, 1, 0]), torch.arange(2)) for _ in range(3)]
    grads = {}
    for mode in ("loop", "vmap"):
        torch.manual_seed(0)
        learner = MAML(DataDependent(), batch_tasks=mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner.meta_gradient(tasks)
        assert any("looping over tasks" in str(w.message) for w in caught) == (mode == "vmap")
        grads[mode] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    torch.testing.assert_close(grads["vmap"], grads["loop"], rtol=0, atol=0)


def test_head_based_learners_train_on_their_ways_and_test_on_any():
    config = resolve_config(overrides={"algo": "maml", "ways": 5, "test_ways": 20})
    learner = build_learner(config, (1, 28, 28))
    assert learner.model[-1].out_features == 5 and learner.head_ways == 5 and not learner.transductive
    learner = build_learner(resolve_config(overrides={"algo": "anil", "ways": 5}), (1, 28, 28))
    assert learner.model[-1].out_features == 5 and dict(learner.named_buffers()) == {}


def reference_prototypes(model: nn.Module, support_x, support_y, ways):
    """Class means of the body's features (the model without its head, batch statistics)."""
    with torch.no_grad():
        z = nn.Sequential(*list(model)[:-1])(support_x)
    return torch.stack([z[support_y == c].mean(0) for c in range(ways)]), z


@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL, Reptile])
@pytest.mark.parametrize("ways", [3, 7])
def test_tasks_of_other_ways_start_from_the_prototype_head(omniglot, cls, ways):
    torch.manual_seed(0)
    options = {"metasgd_lr_high": 0.6} if cls is MetaSGD else {}
    learner = cls(small_conv4(), inner_steps=1, inner_lr=0.4, test_inner_steps=2, transductive=True, **options)
    task = TaskSampler(omniglot("val"), ways, 2, 3, seed=7).task(0)
    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(task.support_x, task.support_y, ways)
        logits = predictor.logits(task.query_x)
        start = predictor.at_step(0, task.query_x)
    assert logits.shape == (3 * ways, ways) and torch.isfinite(logits).all()
    mu, _ = reference_prototypes(learner.model, task.support_x, task.support_y, ways)
    head = predictor.trajectory[0]
    torch.testing.assert_close(head["5.weight"], 2 * mu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head["5.bias"], -mu.pow(2).sum(1), rtol=1e-4, atol=1e-4)
    # Before any step the head classifies as ProtoNet does: by the nearest prototype.
    with torch.no_grad():
        query_z = nn.Sequential(*list(learner.model)[:-1])(task.query_x)
    assert torch.equal(start.argmax(1), prototype_logits(query_z, mu).argmax(1))
    trace = predictor.trace(task.query_x, task.query_y)
    assert trace["support_loss_step2"] < trace["support_loss_step0"]  # the prototype head adapts...
    for name, value in predictor.trajectory[-1].items():  # ...alone: the body keeps its meta-learned values
        assert torch.equal(value, predictor.trajectory[0][name]) == (name not in ("5.weight", "5.bias")), name
    assert trace["query_acc_step0"] > 1.5 / ways  # prototypes of random conv features beat chance


def test_proto_maml_meta_trains_the_body_through_the_prototypes(omniglot):
    torch.manual_seed(0)
    learner = MAML(small_conv4(), inner_steps=1, head_init="prototypes")
    tasks = TaskSampler(omniglot("train"), 5, 1, 2, seed=3).meta_batch(0, [0, 1])
    learner.meta_gradient(tasks)
    head = learner.model[-1]
    assert head.weight.grad.abs().max() == 0 and head.bias.grad.abs().max() == 0  # unused: prototypes replace it
    assert learner.model[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="head_init learned"):
        Reptile(small_conv4(), head_init="prototypes")


def test_a_head_that_cannot_be_replaced_is_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 5), nn.LogSoftmax(-1))  # not a plain linear last layer
    learner = MAML(model)
    x, y = torch.rand(3, 1, 28, 28), torch.arange(3)
    with torch.no_grad():
        learner.adapt(torch.rand(5, 1, 28, 28), torch.arange(5), 5)  # its own ways: fine
        with pytest.raises(ConfigError, match="cannot adapt Sequential to tasks of 3 classes"):
            learner.adapt(x, y, 3)


def test_any_module_adapts_to_other_ways_through_its_linear_head(omniglot):
    torch.manual_seed(0)
    learner = MAML(RowLSTM(ways=5), inner_steps=1, inner_lr=0.5)
    task = TaskSampler(omniglot("val"), 7, 1, 2, seed=1).task(0)
    learner.eval()
    with torch.no_grad():
        assert learner.adapt(task.support_x, task.support_y, 7).logits(task.query_x).shape == (14, 7)


def test_non_transductive_predictions_normalise_queries_by_the_support_set(omniglot):
    torch.manual_seed(0)
    model = small_conv4().double()
    learner = MAML(model, inner_steps=1, inner_lr=0.4, test_inner_steps=2)
    assert not learner.transductive
    task = TaskSampler(omniglot("val"), 5, 1, 4, seed=2).task(0)
    sx, qx = task.support_x.double(), task.query_x.double()
    learner.eval()
    with torch.no_grad():
        predictor = learner.adapt(sx, task.support_y)
        ours = predictor.logits(qx)
        alone = torch.cat([predictor.logits(qx[i:i + 1]) for i in range(len(qx))])
        shuffled = predictor.logits(qx.flip(0)).flip(0)
    # The reference: two plain SGD steps, then PyTorch's own batch norm in evaluation mode with
    # the support set's statistics at the adapted parameters as its running statistics.
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    adapted = {n: p.detach() for n, p in sgd_steps(model, params, sx, task.support_y, 2, 0.4)[-1].items()}
    with torch.no_grad():
        reference = normalised_by(model, adapted, batch_norm_inputs(model, adapted, sx), qx)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-8)
    torch.testing.assert_close(alone, ours, rtol=0, atol=1e-10)   # one query at a time: the same scores
    torch.testing.assert_close(shuffled, ours, rtol=0, atol=1e-10)
    with torch.no_grad(), learner.inference(transductive=True):  # the transductive protocol does depend on them
        transductive = learner.adapt(sx, task.support_y)
        together, single = transductive.logits(qx), transductive.logits(qx[:2])
    assert (together[:2] - single).abs().max() > 1e-3


def test_registry_and_presets():
    assert {"maml", "fomaml", "metasgd", "anil", "reptile"} <= set(LEARNERS)
    with pytest.raises(ConfigError):
        create_learner("maml", small_conv4(), batch_tasks="sometimes")
    for name in ("maml-omniglot-5way-1shot", "maml-omniglot-20way-5shot", "maml-sinusoid-10shot",
                 "metasgd-sinusoid-10shot"):
        description, _ = PRESETS[name]
        assert any(ch.isdigit() for ch in description.split("(")[-1])  # the paper's figure
        config = resolve_config(name)
        learner = build_learner(config, (1,) if config.dataset == "sinusoid" else (1, 28, 28))
        assert learner.algo == config.algo
    assert "98.7" in PRESETS["maml-omniglot-5way-1shot"][0] and "0.53" in PRESETS["metasgd-sinusoid-10shot"][0]
