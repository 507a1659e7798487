"""Backbones on a pre-trained encoder's outputs, registered in kshot's model registry.

* ``identity``: the frozen sentence embedding itself (Prototypical Networks without training).
* ``text_top``: the top ``layers`` transformer layers of an encoder and its pooling, trainable,
  reading the token vectors that the frozen layers below produced (:class:`~kshot.text.data.EncodedTexts`
  with ``top_layers``); ``out_features`` adds a linear head, as the MAML family needs.

``text_top`` is built from the encoder's files (its top layers start from the pre-trained
weights); its spec records the encoder by name and SHA-256, so a checkpoint holds only the
trained top layers, never the frozen ones, and refuses to be rebuilt on other files.
"""

from __future__ import annotations

import torch
from torch import nn

from kshot.errors import ConfigError
from kshot.models import register_model
from kshot.text.data import get_encoder
from kshot.text.encoder import Pooling


class Identity(nn.Module):
    """``x`` unchanged, flattened: the frozen embedding is the representation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@register_model
def identity() -> nn.Module:
    return Identity()


class TopLayers(nn.Module):
    """The top ``layers`` of a pre-trained encoder, then its pooling: ``[n, T, 1 + d]`` (mask,
    token vectors) -> sentence embeddings ``[n, d]``.

    Padding beyond the batch's longest text is cut off before the layers run, and without
    gradients large batches go through in chunks of ``chunk`` texts (the attention's memory
    grows with the square of the length).
    """

    def __init__(self, top: nn.Module, pooling: Pooling, chunk: int = 256):
        super().__init__()
        self.top, self.pooling, self.chunk = top, pooling, int(chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ConfigError(f"text_top reads token vectors [n, T, 1 + dim], not a tensor of shape "
                              f"{tuple(x.shape)}; encode the data with encoder_layers > 0")
        if not torch.is_grad_enabled() and len(x) > self.chunk:
            return torch.cat([self(x[i:i + self.chunk]) for i in range(0, len(x), self.chunk)])
        mask = x[..., 0]
        width = max(int(mask.sum(1).max()), 1) if len(x) else 1
        mask, hidden = mask[:, :width], x[:, :width, 1:]
        out = self.top(inputs_embeds=hidden, attention_mask=mask.long()).last_hidden_state
        return self.pooling(out, mask)


@register_model
def text_top(model: str = "", sha256: str = "", layers: int = 1, pooling: str = "", normalize: bool | None = None,
             max_length: int = 0, out_features: int = 0) -> nn.Module:
    """The top ``layers`` of the encoder ``model`` (a folder or hub name) whose files hash to
    ``sha256`` (empty: not checked), then pooling, then a linear head of ``out_features`` (0: none)."""
    if not model:
        raise ConfigError("text_top needs the encoder: set text_encoder (a model folder or hub name)")
    encoder = get_encoder(model, pooling, normalize, max_length)
    if sha256 and encoder.sha256 != sha256:
        raise ConfigError(f"this model was trained on the text encoder {model!r} with files of sha256 "
                          f"{sha256[:12]}..., but the files there now hash to {encoder.sha256[:12]}...; "
                          f"give the same encoder")
    if not 1 <= int(layers) <= encoder.layers:
        raise ConfigError(f"encoder_layers {layers}: the encoder has {encoder.layers} layers")
    body = TopLayers(encoder.top_module(encoder.layers - int(layers)), encoder.pooling)
    if not out_features:
        return body
    return nn.Sequential(body, nn.Linear(encoder.dim, int(out_features)))
