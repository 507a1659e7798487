"""Backbones: plain ``nn.Module`` s with nothing meta about them.

Every learner adapts whatever module it is given; these are the standard ones of the few-shot
literature, registered by name so that configs and checkpoints can refer to them:

* ``conv4``: 4 x [3x3 conv, batch norm, ReLU, 2x2 max-pool] (Vinyals et al. 2016; Snell et al.
  2017; Finn et al. 2017). 28x28 input gives a 64-d embedding, 84x84 a 1,600-d one.
* ``mlp``: fully connected ReLU network (MAML's sinusoid regressor is ``mlp`` with 40-40).
* ``sparse_mlp``: ``mlp`` with a first layer that reads only nonzero inputs (hashed text features).
* ``feature_weights``: a learned positive weight per input feature (text: learned term weighting).

:func:`create_model` builds one from its name and keyword arguments; :func:`model_spec` is what
a checkpoint stores to build it again.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from kshot.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INPUT_KWARGS: dict[str, Callable[[Sequence[int]], dict]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *,
                   input_kwargs: Callable[[Sequence[int]], dict] | None = None):
    """Register a backbone factory under its function name.

    ``input_kwargs(example_shape)`` gives the arguments that depend on the data (input channels
    or features), so that configs need name only what they choose.
    """
    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[f.__name__] = f
        if input_kwargs is not None:
            _INPUT_KWARGS[f.__name__] = input_kwargs
        return f
    return wrap(fn) if fn is not None else wrap


def input_kwargs(name: str, example_shape: Sequence[int]) -> dict:
    """The data-dependent arguments of backbone ``name`` for examples of ``example_shape``."""
    fn = _INPUT_KWARGS.get(name)
    return fn(tuple(example_shape)) if fn else {}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; the name and kwargs are recorded for checkpoints."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model {name!r}: {e}") from None
    model.kshot_spec = {"name": name, "kwargs": dict(kwargs)}  # type: ignore[assignment]
    return model


def model_spec(model: nn.Module) -> dict:
    spec = getattr(model, "kshot_spec", None)
    if spec is None:
        raise ConfigError(f"{type(model).__name__} was not built by kshot.create_model, so a "
                          f"checkpoint could not rebuild it; register it with @register_model")
    return spec


@torch.no_grad()
def output_dim(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Size of the flat output for one input of ``input_shape`` (e.g. ``(1, 28, 28)``)."""
    was_training = model.training
    model.eval()
    try:
        return int(model(torch.zeros(2, *input_shape)).flatten(1).shape[1])
    finally:
        model.train(was_training)


def conv_block(in_channels: int, out_channels: int, pool: str = "max",
               track_running_stats: bool = True) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then 2x2 max-pool (or a stride-2 conv when ``pool='stride'``)."""
    stride = 2 if pool == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(inplace=True),
    ]
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Sequential):
    """The 4-block convolutional backbone of the few-shot literature.

    Outputs a flat embedding, or class scores when ``out_features`` adds a linear head (as the
    gradient-based learners need). ``track_running_stats=False`` makes batch norm always use
    the current batch's statistics, as MAML does.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, blocks: int = 4, pool: str = "max",
                 track_running_stats: bool = True, out_features: int = 0, image_size: int = 0):
        if pool not in ("max", "stride"):
            raise ConfigError(f"conv4 pool must be 'max' or 'stride', not {pool!r}")
        layers: list[nn.Module] = [
            conv_block(in_channels if i == 0 else hidden, hidden, pool, track_running_stats)
            for i in range(blocks)]
        layers.append(nn.Flatten())
        if out_features:
            if not image_size:
                raise ConfigError("conv4 with a linear head needs image_size to size it")
            side = image_size
            for _ in range(blocks):
                side = side // 2 if pool == "max" else (side - 1) // 2 + 1
            layers.append(nn.Linear(hidden * side * side, out_features))
        super().__init__(*layers)


def _image_input(shape: Sequence[int]) -> dict:
    return {"in_channels": int(shape[0]), "image_size": int(shape[-1])}


@register_model(input_kwargs=_image_input)
def conv4(in_channels: int = 1, hidden: int = 64, blocks: int = 4, pool: str = "max",
          track_running_stats: bool = True, out_features: int = 0, image_size: int = 0) -> nn.Module:
    return Conv4(in_channels, hidden, blocks, pool, track_running_stats, out_features, image_size)


def _flat_input(shape: Sequence[int]) -> dict:
    n = 1
    for s in shape:
        n *= int(s)
    return {"in_features": n}


@register_model(input_kwargs=_flat_input)
def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int | None = None) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if out_features:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class SparseInputMLP(nn.Module):
    """``mlp`` for sparse inputs (hashed text features): the first layer reads only the nonzero
    entries, through an ``nn.EmbeddingBag`` weighted by their values.

    It computes the same function as ``mlp`` (``weight`` is the first ``nn.Linear`` 's weight,
    transposed), at a cost proportional to the nonzeros instead of ``in_features``: tens of
    times faster on 4,096-d text vectors with ~200 nonzeros. Inputs are dense ``[n, ...]``.
    Not for ``torch.func.vmap`` (the number of nonzeros is data-dependent).
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (256,), out_features: int | None = None):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden:
            raise ConfigError("sparse_mlp needs at least one hidden layer")
        self.first = nn.EmbeddingBag(in_features, hidden[0], mode="sum")
        self.bias = nn.Parameter(torch.empty(hidden[0]))
        bound = 1.0 / in_features ** 0.5  # nn.Linear's default initialisation
        nn.init.uniform_(self.first.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        layers: list[nn.Module] = [nn.ReLU()]
        width = hidden[0]
        for h in hidden[1:]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        if out_features:
            layers.append(nn.Linear(width, out_features))
        self.rest = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        rows, cols = x.nonzero(as_tuple=True)  # row-major, so each row's entries are contiguous
        counts = torch.bincount(rows, minlength=len(x))
        offsets = torch.cumsum(counts, 0) - counts
        h = self.first(cols, offsets, per_sample_weights=x[rows, cols]) + self.bias
        return self.rest(h)


@register_model(input_kwargs=_flat_input)
def sparse_mlp(in_features: int = 1, hidden: Sequence[int] = (256,),
               out_features: int | None = None) -> nn.Module:
    return SparseInputMLP(in_features, hidden, out_features)


class FeatureWeights(nn.Module):
    """One learned, positive weight per input feature (initially 1): the embedding is the
    input re-weighted. On hashed text features this meta-learns which n-grams matter for telling
    intents apart, a class-agnostic term weighting (an IDF learned across tasks) that carries
    over to unseen classes far better than a learned projection does (docs/CROSS_DOMAIN.md).
    """

    def __init__(self, in_features: int = 1):
        super().__init__()
        self.log_weight = nn.Parameter(torch.zeros(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.log_weight.exp()


@register_model(input_kwargs=_flat_input)
def feature_weights(in_features: int = 1) -> nn.Module:
    return FeatureWeights(in_features)
