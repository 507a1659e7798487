"""The inner loop's Adam and mini-batches: held to torch.optim.Adam on a module copy (Reptile on
Omniglot, its paper's inner loop, with fresh or carried moments), differentiable to second order
(finite differences of an objective written with torch.optim), the same in every batching mode,
and saved with the run (carried moments resume exactly)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kshot.config import resolve_config
from kshot.errors import CheckpointError, ConfigError
from kshot.learners import MAML, Reptile
from kshot.learners.inner_loop import content_seed
from kshot.learners.inner_optimizers import InnerAdam, InnerSGD
from kshot.models import create_model
from kshot.runs.build import learner_from_checkpoint
from kshot.runs.train import train
from kshot.services.checkpoint import load_checkpoint
from kshot.tasks import Task, TaskSampler

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("error:.*cannot be batched over tasks with vmap")]


def adam_by_hand(model: nn.Module, x, y, batches, lr: float, loss_fn=F.cross_entropy) -> dict:
    """torch.optim.Adam (beta1 0, fresh moments) on a copy of the module, one step per batch."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    for rows in batches:
        optimizer.zero_grad()
        loss_fn(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def reshuffled_windows(n: int, steps: int, b: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The specification of the inner mini-batches: consecutive windows of fresh permutations."""
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * b // n))])
    return [order[k * b:(k + 1) * b] for k in range(steps)]


#: Conv4's convolution biases: batch norm subtracts them again, so their gradient is zero up to
#: rounding, which Adam scales up to steps of about its rate in either implementation; they change
#: no output, and are left out of the comparison.
BIASES_UNDER_BATCH_NORM = {f"{k}.0.bias" for k in range(4)}


def test_reptile_with_adam_on_mini_batches_is_torch_adam_on_a_copy(omniglot):
    torch.manual_seed(0)
    learner = Reptile(create_model("conv4", hidden=8, out_features=5, image_size=28).double(), inner_steps=7,
                      inner_lr=1e-3, inner_optimizer="adam", inner_batch_size=4)
    tasks = [type(t)(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes)
             for t in TaskSampler(omniglot("train"), 5, 1, 1, seed=0).meta_batch(0, [0, 1])]
    reference_model = copy.deepcopy(learner.model)
    theta = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    torch.manual_seed(5)
    learner.meta_gradient(tasks)
    torch.manual_seed(6)  # the mini-batches depend on the task, not on torch's global generator
    learner.zero_grad()
    learner.meta_gradient(tasks)
    adapted = []
    for t in tasks:
        x, y = torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])
        generator = torch.Generator().manual_seed(content_seed(x))
        batches = reshuffled_windows(len(y), 7, 4, generator)  # 10 examples, 28 drawn: three passes
        assert sorted(torch.cat(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))
        adapted.append(adam_by_hand(reference_model, x, y, batches, 1e-3))
    for name, p in learner.model.named_parameters():
        if name in BIASES_UNDER_BATCH_NORM:
            continue
        phi = torch.stack([a[name] for a in adapted]).mean(0)
        torch.testing.assert_close(p.grad, theta[name] - phi, rtol=0, atol=1e-12)
    # With beta1 = 0, step k moves a weight by at most rate * sqrt(k + 1), whatever the gradient's scale.
    moved = torch.cat([(theta[n] - adapted[0][n]).abs().flatten() for n in theta])
    bound = 1e-3 * sum((k + 1) ** 0.5 for k in range(7))
    assert 1e-3 < float(moved.max()) <= bound * (1 + 1e-6)


def test_adam_test_time_adaptation_takes_the_whole_support_set_when_the_batch_is_larger(omniglot):
    torch.manual_seed(0)
    learner = Reptile(create_model("conv4", hidden=8, out_features=5, image_size=28).double(), inner_steps=2,
                      test_inner_steps=5, inner_lr=1e-3, inner_optimizer="adam", inner_batch_size=10).eval()
    task = TaskSampler(omniglot("val"), 5, 1, 3, seed=1).meta_batch(0, [0])[0]
    sx, sy = task.support_x.double(), task.support_y
    with torch.no_grad():
        params = learner.adapt(sx, sy).params
    reference = adam_by_hand(learner.model, sx, sy, [torch.arange(5)] * 5, 1e-3)
    for name, p in reference.items():
        if name not in BIASES_UNDER_BATCH_NORM:
            torch.testing.assert_close(params[name], p, rtol=0, atol=1e-12)


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tasks_of(n: int) -> list[Task]:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3)
    return [Task(torch.randn(6, 2, generator=g, dtype=torch.float64), labels.repeat_interleave(2),
                 torch.randn(9, 2, generator=g, dtype=torch.float64), labels.repeat_interleave(3), labels)
            for _ in range(n)]


def adam_maml_objective(model: nn.Module, flat: torch.Tensor, tasks, steps: int, lr: float) -> float:
    """MAML's query loss after torch.optim.Adam steps on each support set, at parameters ``flat``."""
    model = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    total = 0.0
    for task in tasks:
        adapted = copy.deepcopy(model)
        optimizer = torch.optim.Adam(adapted.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(adapted(task.support_x), task.support_y).backward()
            optimizer.step()
        with torch.no_grad():
            total += F.cross_entropy(adapted(task.query_x), task.query_y).item()
    return total / len(tasks)


def test_second_order_meta_gradient_through_adam_matches_finite_differences():
    model, tasks = tiny_mlp(), tasks_of(2)
    learner = MAML(model, inner_steps=3, inner_lr=0.05, inner_optimizer="adam", batch_tasks="loop")
    learner.meta_gradient(tasks)
    analytic = torch.cat([p.grad.reshape(-1) for p in learner.parameters()])
    assert torch.isfinite(analytic).all()
    theta = torch.nn.utils.parameters_to_vector(learner.model.parameters()).detach()
    g = torch.Generator().manual_seed(3)
    directions = [torch.randn(len(theta), generator=g, dtype=theta.dtype) for _ in range(5)]
    directions.append(analytic / analytic.norm())
    eps = 1e-6
    for d in directions:
        numeric = (adam_maml_objective(model, theta + eps * d, tasks, 3, 0.05)
                   - adam_maml_objective(model, theta - eps * d, tasks, 3, 0.05)) / (2 * eps)
        assert abs(numeric - float(analytic @ d)) <= 1e-5 * max(1.0, abs(numeric))


@pytest.mark.parametrize("algo", [MAML, Reptile])
def test_adam_gives_the_same_meta_gradient_in_every_batching_mode(algo):
    grads = {}
    for mode in ("loop", "vmap", "batched"):
        learner = algo(tiny_mlp(), inner_steps=3, inner_lr=0.05, inner_optimizer="adam", batch_tasks=mode)
        learner.meta_gradient(tasks_of(3))
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in learner.parameters()])
    torch.testing.assert_close(grads["vmap"], grads["loop"], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["batched"], grads["loop"], rtol=0, atol=1e-12)
    sgd = algo(tiny_mlp(), inner_steps=3, inner_lr=0.05, batch_tasks="loop")
    sgd.meta_gradient(tasks_of(3))
    assert (torch.cat([p.grad.reshape(-1) for p in sgd.parameters()]) - grads["loop"]).abs().max() > 1e-4


def test_mini_batches_need_the_task_loop():
    learner = Reptile(tiny_mlp(), inner_batch_size=2, batch_tasks="vmap")
    with pytest.raises(ConfigError, match="inner_batch_size.*batch_tasks=loop"):
        learner.meta_gradient(tasks_of(2))
    assert Reptile(tiny_mlp(), inner_batch_size=2).batch_mode(tasks_of(2)) == "loop"


def test_the_inner_optimizer_is_saved_with_the_learner():
    learner = Reptile(tiny_mlp(), inner_optimizer=InnerAdam(0.5, 0.99, 1e-6), inner_batch_size=4)
    restored = Reptile.from_saved_options(tiny_mlp(), learner.options())
    assert restored.inner_update == InnerAdam(0.5, 0.99, 1e-6) and restored.inner_batch_size == 4
    assert Reptile.from_saved_options(tiny_mlp(), Reptile(tiny_mlp()).options()).inner_update == InnerSGD()
    with pytest.raises(ConfigError, match="inner Adam betas"):
        Reptile.from_saved_options(tiny_mlp(), {**learner.options(), "inner_betas": [1.5, 0.9]})
    with pytest.raises(ConfigError, match="malformed"):
        Reptile.from_saved_options(tiny_mlp(), {**learner.options(), "inner_betas": "0,0.9"})
    with pytest.raises(ConfigError, match="unknown inner_optimizer 'rmsprop'"):
        Reptile(tiny_mlp(), inner_optimizer="rmsprop")


def double_tasks(sampler: TaskSampler, index: int, n: int) -> list[Task]:
    return [type(t)(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes)
            for t in sampler.meta_batch(index, list(range(n)))]


def test_carried_moments_are_one_torch_adam_kept_across_tasks_and_into_the_test(omniglot):
    """Nichol et al.'s code: one Adam for the whole of training, its moments carried from task to
    task (in the meta-batch's order) and into every test task, which leaves them unchanged."""
    torch.manual_seed(0)
    learner = Reptile(create_model("conv4", hidden=8, out_features=5, image_size=28).double(), inner_steps=3,
                      test_inner_steps=4, inner_lr=1e-3, inner_optimizer="adam", inner_batch_size=4,
                      inner_moments="carried")
    reference = copy.deepcopy(learner.model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    by_param = dict(reference.named_parameters())
    sampler, epsilon = TaskSampler(omniglot("train"), 5, 1, 1, seed=0), 0.7
    for index in range(3):  # three outer steps of two tasks each
        tasks = double_tasks(sampler, index, 2)
        theta = {n: p.detach().clone() for n, p in reference.named_parameters()}
        adapted = []
        for t in tasks:
            x, y = torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])
            batches = reshuffled_windows(len(y), 3, 4, torch.Generator().manual_seed(content_seed(x)))
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    p.copy_(theta[n])
            for rows in batches:  # the same optimizer object: its state goes on from the last task
                optimizer.zero_grad()
                F.cross_entropy(reference(x[rows]), y[rows]).backward()
                optimizer.step()
            adapted.append({n: p.detach().clone() for n, p in reference.named_parameters()})
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.copy_(theta[n] + epsilon * (torch.stack([a[n] for a in adapted]).mean(0) - theta[n]))
        learner.zero_grad()
        learner.meta_gradient(tasks)
        with torch.no_grad():
            for p in learner.parameters():
                p -= epsilon * p.grad
    carried = learner.carried.state()
    for name, p in learner.model.named_parameters():
        if name in BIASES_UNDER_BATCH_NORM:
            assert name not in carried["t"]  # kshot's forward leaves them out: they adapt in no step
            continue
        assert carried["t"][name] == int(optimizer.state[by_param[name]]["step"]) == 3 * 2 * 3
        torch.testing.assert_close(p.detach(), by_param[name].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(carried["v"][name], optimizer.state[by_param[name]]["exp_avg_sq"],
                                   rtol=1e-9, atol=1e-20)

    learner.eval()
    task = TaskSampler(omniglot("val"), 5, 1, 3, seed=1).meta_batch(0, [0])[0]
    sx, sy = task.support_x.double(), task.support_y
    before = {k: v.clone() for k, v in learner.carried.state_dict().items()}
    with torch.no_grad():
        params = learner.adapt(sx, sy).params
    for k, v in learner.carried.state_dict().items():
        assert torch.equal(v, before[k]), k  # evaluation reads the moments, never writes them
    test_model = copy.deepcopy(reference)  # training's last moments, as the paper's code restores them
    test_optimizer = torch.optim.Adam(test_model.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    test_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    batches = reshuffled_windows(5, 4, 4, torch.Generator().manual_seed(content_seed(sx)))
    for rows in batches:
        test_optimizer.zero_grad()
        F.cross_entropy(test_model(sx[rows]), sy[rows]).backward()
        test_optimizer.step()
    fresh = adam_by_hand(reference, sx, sy, batches, 1e-3)
    differs = 0.0
    for name, p in test_model.named_parameters():
        if name not in BIASES_UNDER_BATCH_NORM:
            torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=1e-12)
            differs = max(differs, float((fresh[name] - p.detach()).abs().max()))
    assert differs > 1e-4  # fresh moments would have adapted otherwise


def test_carried_moments_need_adam_the_task_loop_and_are_saved(tmp_path):
    with pytest.raises(ConfigError, match="inner_moments=carried .*inner_optimizer=adam"):
        Reptile(tiny_mlp(), inner_moments="carried")
    with pytest.raises(ConfigError, match="unknown inner_moments 'kept'"):
        Reptile(tiny_mlp(), inner_optimizer="adam", inner_moments="kept")
    with pytest.raises(ConfigError, match="unknown inner_moments"):
        resolve_config(overrides=dict(inner_moments="kept"))
    learner = Reptile(tiny_mlp(), inner_optimizer="adam", inner_moments="carried", batch_tasks="vmap")
    with pytest.raises(ConfigError, match="carry Adam's moments.*batch_tasks=loop"):
        learner.meta_gradient(tasks_of(2))
    assert Reptile(tiny_mlp(), inner_optimizer="adam", inner_moments="carried").batch_mode(tasks_of(2)) == "loop"
    assert "inner_moments" not in Reptile(tiny_mlp(), inner_optimizer="adam").options()


def test_a_run_with_carried_moments_resumes_exactly(tmp_path):
    config = resolve_config(overrides=dict(
        algo="reptile", backbone_options={"hidden": 8}, ways=5, shots=2, queries=2, meta_batch_size=2,
        inner_steps=2, inner_lr=1e-3, inner_optimizer="adam", inner_batch_size=6, inner_moments="carried",
        optimizer="sgd", momentum=0.0, lr=1.0, steps=6, val_every=0, test_tasks=0, checkpoint_every=2,
        log_every=2, threads=1))
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=3)
    train(config, tmp_path / "resumed", progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors")
    assert a.learner["options"]["inner_moments"] == "carried"
    steps = [k for k in a.state_dict if k.startswith("carried.t_")]
    assert steps and all(int(a.state_dict[k]) == 6 * 2 * 2 for k in steps)  # 6 outer steps, 2 tasks, 2 steps
    assert any(float(a.state_dict[k].abs().max()) > 0 for k in a.state_dict if k.startswith("carried.v_"))
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    restored = learner_from_checkpoint(a)
    assert restored.carried is not None and restored.carried.state()["t"] == {
        n: 24 for n in restored.carried.names}
    assert math.isfinite(float(restored.carried.state()["v"][restored.carried.names[0]].sum()))
    tampered = copy.copy(a)
    tampered.state_dict = {**a.state_dict, steps[0]: torch.tensor(-1)}
    with pytest.raises(CheckpointError, match="carried Adam state .* negative or non-finite"):
        learner_from_checkpoint(tampered)
