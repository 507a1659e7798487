"""The meta-gradient is right: against plain autograd through an unrolled loop, against finite
differences of an objective written without kshot, and first-order MAML differs from it by
exactly the second-order term; Meta-SGD's and ANIL's against their own unrolled references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kshot.learners import ANIL, FOMAML, MAML, MetaSGD
from kshot.tasks import Task
from maml_references import batch_norm_inputs, normalised_by, sgd_steps

# Tiny models: more threads only wait for each other (badly so on a shared machine). A vmap test
# that silently fell back to the loop would compare the loop with itself: the fallback's warning
# is an error here.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("error:.*cannot be batched over tasks with vmap")]


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """Conv + batch norm (batch statistics) + ReLU + max-pool + head: every layer kind of Conv4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()


def classification_tasks(n_tasks: int, shape=(2,), ways: int = 3, shots: int = 2, queries: int = 3,
                         seed: int = 1) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        labels = torch.arange(ways)
        tasks.append(Task(torch.randn(ways * shots, *shape, generator=g, dtype=torch.float64),
                          labels.repeat_interleave(shots),
                          torch.randn(ways * queries, *shape, generator=g, dtype=torch.float64),
                          labels.repeat_interleave(queries), labels))
    return tasks


def flat_grad(learner: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in learner.parameters()])


def meta_grad(learner, tasks) -> torch.Tensor:
    learner.zero_grad(set_to_none=True)
    learner.meta_gradient(tasks)
    return flat_grad(learner)


# ----------------------------------------------------------------------------- references
def unrolled_reference(w1, b1, w2, b2, tasks, steps, lr, first_order=False):
    """MAML written out by hand for the tiny MLP: plain tensors, plain autograd, no kshot code."""
    def net(p, x):
        return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

    leaves = [t.detach().clone().requires_grad_() for t in (w1, b1, w2, b2)]
    total = 0
    for task in tasks:
        p = leaves
        for _ in range(steps):
            loss = F.cross_entropy(net(p, task.support_x), task.support_y)
            g = torch.autograd.grad(loss, p, create_graph=not first_order)
            p = [a - lr * b for a, b in zip(p, g)]
        total = total + F.cross_entropy(net(p, task.query_x), task.query_y)
    (total / len(tasks)).backward()
    return torch.cat([t.grad.reshape(-1) for t in leaves])


def objective(model: nn.Module, flat: torch.Tensor, tasks, steps: int, lr: float, transductive: bool,
              prototype_head: bool = False) -> float:
    """The MAML meta-objective at the parameters ``flat``, written without kshot (for finite
    differences): plain SGD steps through ``functional_call``, the queries normalised by their
    own batch or by the support set's statistics; optionally from Proto-MAML's head."""
    params, i = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[i:i + p.numel()].view_as(p).detach().clone().requires_grad_()
        i += p.numel()
    total = 0.0
    for task in tasks:
        start = dict(params)
        if prototype_head:
            with torch.no_grad():
                body = {n: v for n, v in params.items() if not n.startswith("5.")}  # tiny_cnn's head is layer 5
                z = functional_call(model[:-1], body, (task.support_x,))
                ways = len(task.classes)
                mu = torch.stack([z[task.support_y == c].mean(0) for c in range(ways)])
            start = {**start, "5.weight": (2 * mu).requires_grad_(), "5.bias": (-(mu ** 2).sum(1)).requires_grad_()}
        with torch.enable_grad():
            adapted = sgd_steps(model, start, task.support_x, task.support_y, steps, lr)[-1]
        with torch.no_grad():
            adapted = {n: p.detach() for n, p in adapted.items()}
            if transductive:
                out = functional_call(model, adapted, (task.query_x,))
            else:
                out = normalised_by(model, adapted, batch_norm_inputs(model, adapted, task.support_x), task.query_x)
            total += F.cross_entropy(out, task.query_y).item()
    return total / len(tasks)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_equals_autograd_through_an_unrolled_loop(mode, steps):
    model = tiny_mlp()
    w1, b1, w2, b2 = (p.detach().clone() for p in model.parameters())
    tasks = classification_tasks(4)
    learner = MAML(model, inner_steps=steps, inner_lr=0.5, batch_tasks=mode)
    ours = meta_grad(learner, tasks)
    reference = unrolled_reference(w1, b1, w2, b2, tasks, steps, 0.5)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    first_order = unrolled_reference(w1, b1, w2, b2, tasks, steps, 0.5, first_order=True)
    assert (reference - first_order).abs().max() > 1e-3  # the check above would notice a first-order bug


@pytest.mark.parametrize("make_model, transductive, head_init", [
    (tiny_mlp, False, "learned"), (tiny_cnn, True, "learned"), (tiny_cnn, False, "learned"),
    (tiny_cnn, False, "prototypes")], ids=["mlp", "cnn-batchnorm-transductive", "cnn-batchnorm-support-statistics",
                                          "cnn-proto-maml"])
def test_second_order_meta_gradient_matches_finite_differences(make_model, transductive, head_init):
    # The objective is written without kshot (see `objective`): this checks what kshot optimises
    # (queries normalised by the support set's statistics at the adapted parameters, or by
    # their own batch; Proto-MAML's head) as well as its gradient.
    model = make_model()
    shape = (2,) if make_model is tiny_mlp else (1, 4, 4)
    tasks = classification_tasks(2, shape=shape)
    learner = MAML(model, inner_steps=2, inner_lr=0.3, batch_tasks="loop", transductive=transductive,
                   head_init=head_init)
    analytic = meta_grad(learner, tasks)
    theta = torch.cat([p.detach().reshape(-1) for p in learner.model.parameters()])
    # Directional derivatives along random directions and along the gradient itself.
    g = torch.Generator().manual_seed(3)
    directions = [torch.randn(len(theta), generator=g, dtype=theta.dtype) for _ in range(6)]
    directions.append(analytic / analytic.norm())
    eps = 1e-6
    prototypes = head_init == "prototypes"
    for d in directions:
        numeric = (objective(model, theta + eps * d, tasks, 2, 0.3, transductive, prototypes)
                   - objective(model, theta - eps * d, tasks, 2, 0.3, transductive, prototypes)) / (2 * eps)
        assert abs(numeric - float(analytic @ d)) <= 1e-5 * max(1.0, abs(numeric))


def test_first_order_differs_from_second_order_by_exactly_the_hessian_term():
    # Two inner steps: d theta_2 / d theta = (I - a H(theta_1)) (I - a H(theta_0)), H the support
    # loss's Hessian. Second order: J^T g; first order: g, with g the query gradient at theta_2.
    model = tiny_mlp()
    task = classification_tasks(1)[0]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    lr = 0.4

    def unflatten(flat):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            n = shape.numel()
            out[name] = flat[i:i + n].view(shape)
            i += n
        return out

    def loss_at(flat, x, y):
        return F.cross_entropy(torch.func.functional_call(model, unflatten(flat), (x,)), y)

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hessians, theta = [], theta0
    for _ in range(2):
        hessians.append(torch.autograd.functional.hessian(lambda t: loss_at(t, task.support_x, task.support_y), theta))
        g = torch.autograd.grad(loss_at(theta.requires_grad_(), task.support_x, task.support_y), theta)[0]
        theta = (theta - lr * g).detach()
    query_grad = torch.autograd.grad(loss_at(theta.requires_grad_(), task.query_x, task.query_y), theta)[0]
    eye = torch.eye(len(theta0), dtype=theta0.dtype)
    expected_so = (eye - lr * hessians[0]) @ (eye - lr * hessians[1]) @ query_grad

    second = meta_grad(MAML(model, inner_steps=2, inner_lr=lr, batch_tasks="loop"), [task])
    first = meta_grad(FOMAML(model, inner_steps=2, inner_lr=lr, batch_tasks="loop"), [task])
    torch.testing.assert_close(first, query_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(second, expected_so, rtol=0, atol=1e-12)
    torch.testing.assert_close(second - first, expected_so - query_grad, rtol=0, atol=1e-12)
    assert (second - first).abs().max() > 1e-3


def conv4_small(seed: int = 0) -> nn.Module:
    from kshot.models import create_model

    torch.manual_seed(seed)
    return create_model("conv4", hidden=4, out_features=3, image_size=16, track_running_stats=False).double()


@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL])
def test_tasks_batched_with_vmap_give_the_loop_numbers_with_batch_norm(cls):
    # The harness found vmap + ordinary autograd off by ~1e-2 with affine batch norm; the
    # fully functional vmap used here must agree with the per-task loop.
    tasks = classification_tasks(3, shape=(1, 16, 16))
    loop = meta_grad(cls(conv4_small(), inner_steps=2, inner_lr=0.3, batch_tasks="loop"), tasks)
    vmapped = meta_grad(cls(conv4_small(), inner_steps=2, inner_lr=0.3, batch_tasks="vmap"), tasks)
    torch.testing.assert_close(vmapped, loop, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL])
def test_fast_meta_gradient_equals_the_textbook_loop_through_adapt(cls):
    tasks = classification_tasks(3, shape=(1, 16, 16))
    learner = cls(conv4_small(), inner_steps=2, inner_lr=0.3, batch_tasks="loop")
    fast = meta_grad(learner, tasks)
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(tasks)  # for each task: adapt, query loss; mean; backward
    loss.backward()
    textbook = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in learner.parameters()])
    torch.testing.assert_close(fast, textbook, rtol=0, atol=1e-10)


def test_meta_sgd_meta_gradient_equals_an_unrolled_loop_with_per_entry_rates():
    # Independent of kshot: theta_{k+1} = theta_k - alpha (entry-wise) * grad, second order;
    # both the initialisation's and the rates' gradients are compared.
    model = tiny_mlp()
    tasks = classification_tasks(3)
    learner = MetaSGD(model, inner_steps=2, inner_lr=0.1, metasgd_lr_high=0.5, batch_tasks="loop")
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alpha = [learner.inner_lrs[n.replace(".", "__")].detach().clone().requires_grad_() for n in names]

    def net(p, x):
        return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

    total = 0
    for task in tasks:
        p = theta
        for _ in range(2):
            g = torch.autograd.grad(F.cross_entropy(net(p, task.support_x), task.support_y), p, create_graph=True)
            p = [w - a * gw for w, a, gw in zip(p, alpha, g)]
        total = total + F.cross_entropy(net(p, task.query_x), task.query_y)
    (total / len(tasks)).backward()
    learner.zero_grad(set_to_none=True)
    learner.meta_gradient(tasks)
    for name, t, a in zip(names, theta, alpha):
        torch.testing.assert_close(dict(learner.model.named_parameters())[name].grad, t.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(learner.inner_lrs[name.replace(".", "__")].grad, a.grad, rtol=0, atol=1e-12)
    assert min(float(a.grad.abs().max()) for a in alpha) > 1e-4  # the rates' gradients are checked, not zeros


def test_anil_meta_gradient_reaches_the_body_through_the_second_order_term():
    # ANIL adapts only the head, on features computed once; its body gradient has a first-order
    # part (the query loss reads the features) and a second-order part (the head's steps depend
    # on the support features). The reference below is written by hand; the first-order body
    # gradient differs from it, so the comparison tells first from second order.
    model = tiny_cnn()
    tasks = classification_tasks(2, shape=(1, 4, 4))
    body = [p.detach().clone().requires_grad_() for p in model[:-1].parameters()]
    head = [p.detach().clone().requires_grad_() for p in model[-1].parameters()]
    body_names = [n for n, _ in model[:-1].named_parameters()]

    def reference(create_graph: bool) -> list[torch.Tensor]:
        total = 0
        for task in tasks:
            features = {}
            for split, x in (("support", task.support_x), ("query", task.query_x)):
                features[split] = functional_call(model[:-1], dict(zip(body_names, body)), (x,))
            w, b = head
            for _ in range(2):
                loss = F.cross_entropy(features["support"] @ w.T + b, task.support_y)
                gw, gb = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
                w, b = w - 0.3 * gw, b - 0.3 * gb
            total = total + F.cross_entropy(features["query"] @ w.T + b, task.query_y)
        return torch.autograd.grad(total / len(tasks), body)

    second, first = reference(True), reference(False)
    learner = ANIL(model, inner_steps=2, inner_lr=0.3, batch_tasks="loop", transductive=True)
    learner.meta_gradient(tasks)
    ours = [p.grad for p in learner.model[:-1].parameters()]
    differs = 0.0
    for name, got, want, fo in zip(body_names, ours, second, first):
        if name == "0.bias":  # batch norm removes the conv bias: exactly zero (up to rounding) in both
            continue
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        differs = max(differs, float((want - fo).abs().max()))
    assert differs > 1e-4


def test_inner_loop_functional_and_autograd_gradients_agree():
    model = conv4_small()
    learner = MAML(model)
    params = learner.meta_parameters()
    task = classification_tasks(1, shape=(1, 16, 16))[0]
    inner = learner.inner_loop(generic=True)
    by_autograd, loss_a = inner.gradients(params, task.support_x, task.support_y, create_graph=False)
    by_func, loss_f = inner.gradients(params, task.support_x, task.support_y, create_graph=False, functional=True)
    torch.testing.assert_close(loss_a, loss_f)
    for name in by_autograd:
        torch.testing.assert_close(by_autograd[name], by_func[name], rtol=0, atol=1e-12)
