"""MAML written out by hand with plain PyTorch, the independent references of the learner tests.

Nothing here imports kshot: networks are ``torch.func.functional_call`` on the module itself or
hand-written functional layers, inner steps are explicit ``torch.autograd.grad`` calls, and
batch-norm statistics are read with forward hooks on the module's own ``nn.BatchNorm`` layers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def sgd_steps(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
              create_graph: bool = False) -> list[dict]:
    """Parameters after 0..steps plain gradient steps of the cross-entropy on ``(x, y)``,
    batch norm normalising each batch by itself."""
    out = [params]
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        params = {n: p - lr * g if g is not None else p for (n, p), g in zip(params.items(), grads)}
        out.append(params)
    return out


def batch_norm_inputs(model: nn.Module, params: dict, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and biased variance of each batch-norm layer's input when ``x`` goes through the model."""
    stats, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, output, name=name):
                z = inputs[0]
                dims = [0] + list(range(2, z.dim()))
                stats[name] = (z.mean(dims), z.var(dims, unbiased=False))
            handles.append(module.register_forward_hook(hook))
    try:
        functional_call(model, params, (x,))
    finally:
        for h in handles:
            h.remove()
    return stats


def normalised_by(model: nn.Module, params: dict, stats: dict, x: torch.Tensor) -> torch.Tensor:
    """The model's output for ``x`` with each batch-norm layer in PyTorch's evaluation mode,
    its running statistics set to ``stats`` (so no example depends on another)."""
    frozen = copy.deepcopy(model)
    buffers = {}
    for name, module in frozen.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = True
            module.eval()
            buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"] = stats[name]
    return functional_call(frozen, {**params, **buffers}, (x,), strict=False)


def adapted_probabilities(model: nn.Module, support_x, support_y, query_x, steps: int, lr: float) -> torch.Tensor:
    """What a non-transductive MAML predicts: ``steps`` SGD steps on the support set from the
    model's own weights, then each query normalised by the support set's statistics."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    with torch.enable_grad():
        adapted = sgd_steps(model, params, support_x, support_y, steps, lr)[-1]
    adapted = {n: p.detach() for n, p in adapted.items()}
    with torch.no_grad():
        stats = batch_norm_inputs(model, adapted, support_x)
        return normalised_by(model, adapted, stats, query_x).softmax(-1)
