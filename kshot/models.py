"""Backbones: plain ``nn.Module`` s with nothing meta about them.

Every learner adapts whatever module it is given; these are the standard ones of the few-shot
literature, registered by name so that configs and checkpoints can refer to them:

* ``conv4``: 4 x [3x3 conv, batch norm, ReLU, 2x2 max-pool] (Vinyals et al. 2016; Snell et al.
  2017; Finn et al. 2017). 28x28 input gives a 64-d embedding, 84x84 a 1,600-d one.
* ``mlp``: fully connected ReLU network (MAML's sinusoid regressor is ``mlp`` with 40-40).
* ``resnet12``: 4 residual blocks of 3 convolutions, widths 64-160-320-640 (Lee et al. 2019)
  or 64-128-256-512 (Oreshkin et al. 2018), for 84x84 colour images.
* ``sparse_mlp``: ``mlp`` with a first layer that reads only nonzero inputs (hashed text features).
* ``feature_weights``: a learned positive weight per input feature (text: learned term weighting).

:func:`create_model` builds one from its name and keyword arguments; :func:`model_spec` is what
a checkpoint stores to build it again.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
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


def backbone_arguments(name: str) -> set[str] | None:
    """The keyword arguments backbone ``name`` accepts (None: unknown, or it takes any)."""
    fn = _REGISTRY.get(name)
    if fn is None:
        return None
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


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

    The forward pass computes exactly the layers' function, faster on a CPU: activations in
    channels-last layout (the CPU kernels of convolution, batch norm and max-pooling are
    vectorised over channels there), the first convolution (1 x 3 x 3 inputs per output) as an
    im2col matrix product, and each ReLU that precedes a max-pool applied after it (``relu`` is
    monotonic, so ``maxpool(relu(x)) == relu(maxpool(x))``, gradients included) on a quarter of
    the values. Measured in benchmarks/protonet_speed.py (docs/RESULTS.md).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        for module in self:
            x = _block_forward(module, x) if type(module) is nn.Sequential else module(x)
        return x


def _block_forward(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, with a ReLU followed by a max-pool computed as the pool, then the ReLU, and
    a convolution of few inputs per output as a matrix product."""
    layers = list(block)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if type(layer) is nn.ReLU and i + 1 < len(layers) and type(layers[i + 1]) is nn.MaxPool2d:
            x = F.relu(layers[i + 1](x), inplace=layer.inplace)
            i += 2
            continue
        if isinstance(layer, nn.Conv2d) and runs_as_matmul(layer) and x.device.type == "cpu":
            x = im2col_conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        else:
            x = layer(x)
        i += 1
    return x


#: A convolution with at most this many inputs per output value (in_channels x kh x kw) runs as
#: an im2col matrix product: the CPU convolution kernels are slow for so few input channels
#: (Conv4's first layer: 1 x 3 x 3 inputs).
IM2COL_MAX_INPUTS = 32


def runs_as_matmul(layer: nn.Conv2d) -> bool:
    """Whether :func:`im2col_conv2d` computes ``layer`` (few inputs per output, zero padding)."""
    kh, kw = layer.kernel_size
    return (type(layer) is nn.Conv2d and layer.groups == 1 and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros" and layer.in_channels * kh * kw <= IM2COL_MAX_INPUTS)


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                  dilation) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, ...)`` as one matrix product over unfolded patches.

    Args:
        x: inputs ``[n, C, H, W]``.
        weight: ``[out, C, kh, kw]``; bias ``[out]`` or None.

    Returns:
        ``[n, out, H', W']`` in channels-last memory (what the next layers want on a CPU).
    """
    n, _, height, width = x.shape
    kh, kw = weight.shape[-2:]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [n, k, L]
    # [k, n*L] contiguous: then the weight gradient is one [k, n*L] @ [n*L, out] product
    # (the [n*L, k]^T layout a batched matmul would give is several times slower on CPU).
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    w = weight.reshape(weight.shape[0], -1).t().contiguous()  # [k, out]
    out = cols.t().mm(w)  # [n*L, out]
    if bias is not None:
        out = out + bias
    # [n, out_h, out_w, out] viewed as NCHW: channels-last memory, no copy.
    return out.view(n, out_h, out_w, -1).permute(0, 3, 1, 2)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


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


class Koch(nn.Sequential):
    """The encoder of Koch, Zemel and Salakhutdinov's Siamese network (ICML DL Workshop 2015).

    Valid (unpadded) convolutions with ReLU, 2x2 max-pools after all but the last, then a fully
    connected sigmoid layer. On 105x105 Omniglot images: conv 64@10x10, 128@7x7, 128@4x4,
    256@4x4, then 4,096 units; 38.95M parameters, nearly all in the last layer.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 105, embedding_dim: int = 4096,
                 channels: Sequence[int] = (64, 128, 128, 256), kernels: Sequence[int] = (10, 7, 4, 4)):
        if len(channels) != len(kernels) or not channels:
            raise ConfigError("koch needs as many kernel sizes as channel counts")
        layers: list[nn.Module] = []
        side, width = int(image_size), int(in_channels)
        for i, (c, k) in enumerate(zip(channels, kernels)):
            side -= int(k) - 1
            layers += [nn.Conv2d(width, int(c), int(k)), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            width = int(c)
            if side < 1:
                raise ConfigError(f"koch's {len(kernels)} valid convolutions (kernels {list(kernels)}) do not "
                                  f"fit {image_size}x{image_size} images; use larger images, smaller "
                                  f"kernels (backbone option \"kernels\"), or conv4")
        layers += [nn.Flatten(), nn.Linear(width * side * side, int(embedding_dim)), nn.Sigmoid()]
        super().__init__(*layers)


@register_model(input_kwargs=_image_input)
def koch(in_channels: int = 1, image_size: int = 105, embedding_dim: int = 4096,
         channels: Sequence[int] = (64, 128, 128, 256), kernels: Sequence[int] = (10, 7, 4, 4)) -> nn.Module:
    return Koch(in_channels, image_size, embedding_dim, channels, kernels)


# ----------------------------------------------------------------------------- ResNet-12
class ResidualBlock12(nn.Module):
    """One ResNet-12 block: 3 x [3x3 conv, batch norm, leaky ReLU] with a 1x1-conv shortcut
    added before the last activation, then 2x2 max-pooling (and optional dropout)."""

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.1, dropout: float = 0.0,
                 track_running_stats: bool = True):
        super().__init__()

        def bn() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)

        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), bn(), nn.LeakyReLU(slope),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn(), nn.LeakyReLU(slope),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn())
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), bn())
        self.out = nn.Sequential(nn.LeakyReLU(slope), nn.MaxPool2d(2))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 of the few-shot literature.

    Provenance: introduced for few-shot learning by Mishra et al. (SNAIL, ICLR 2018) and
    Oreshkin et al. (TADAM, NeurIPS 2018, widths 64-128-256-512, global average pooling); the
    widths 64-160-320-640 with leaky ReLU (slope 0.1) are those of Lee et al. (MetaOptNet, CVPR
    2019), used by most later work. Written from the papers' descriptions; DropBlock, which
    MetaOptNet adds, is left out (plain ``dropout`` after each block is available).

    Input ``[n, C, 84, 84]`` gives ``[n, 640]`` with ``pool='avg'`` (global average pooling), or
    ``[n, 640 * 5 * 5]`` with ``pool='flatten'`` (MetaOptNet's 16,000-d embedding).

    Args:
        in_channels: image channels.
        channels: widths of the 4 blocks.
        pool: ``avg`` or ``flatten``.
        dropout: dropout rate after each block (0: none).
        track_running_stats: False makes batch norm always use the batch's statistics (MAML).
        out_features: add a linear head with this many outputs (0: embedding only).
        image_size: input side, needed to size the head when ``pool='flatten'``.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640), pool: str = "avg",
                 dropout: float = 0.0, track_running_stats: bool = True, out_features: int = 0,
                 image_size: int = 84):
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ConfigError(f"resnet12 pool must be 'avg' or 'flatten', not {pool!r}")
        if len(channels) != 4:
            raise ConfigError(f"resnet12 has 4 blocks, so channels needs 4 widths, not {list(channels)}")
        widths = [in_channels, *[int(c) for c in channels]]
        self.blocks = nn.Sequential(*[ResidualBlock12(widths[i], widths[i + 1], dropout=dropout,
                                                      track_running_stats=track_running_stats)
                                      for i in range(4)])
        self.pool = pool
        side = image_size
        for _ in range(4):
            side //= 2
        if pool == "flatten" and side < 1:
            raise ConfigError(f"resnet12 halves the image 4 times: {image_size}px is too small")
        features = widths[-1] if pool == "avg" else widths[-1] * side * side
        self.head = nn.Linear(features, out_features) if out_features else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.blocks(x)
        z = z.mean(dim=(-2, -1)) if self.pool == "avg" else z.flatten(1)
        return self.head(z) if self.head is not None else z


@register_model(input_kwargs=_image_input)
def resnet12(in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640), pool: str = "avg",
             dropout: float = 0.0, track_running_stats: bool = True, out_features: int = 0,
             image_size: int = 84) -> nn.Module:
    return ResNet12(in_channels, channels, pool, dropout, track_running_stats, out_features, image_size)


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
