"""The frozen encoder reproduces sentence-transformers, and its cut halves compose back to it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kshot.errors import ConfigError, DataError
from kshot.text import Pooling, SentenceEncoder
from kshot.text.data import pack_tokens
from kshot.text.encoder import read_pooling

SENTENCES = ["How do I reset the PIN of my card?", "what's the weather like in paris tomorrow",
             "Transfer 100 dollars to my savings account, please.", "hi",
             "My card payment was declined at the supermarket even though I have money",
             "Can I get a refund for a ticket I bought by mistake? It was for the wrong date and the "
             "wrong city, and the airline says the agent has to cancel it."]


def test_embeddings_match_sentence_transformers(encoder, model_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model_path, device="cpu").encode(SENTENCES, convert_to_numpy=True)
    ours = encoder.encode(SENTENCES).numpy()
    assert ours.shape == reference.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    # The model's files name mean pooling and a Normalize module: unit vectors.
    assert encoder.pooling == Pooling("mean", True) and encoder.max_length == 256
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_pooling_read_from_the_sentence_transformers_files(model_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_path, folder, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
    (folder / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    (folder / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
                                         ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    pooling, max_length, lower = read_pooling(folder)
    assert pooling == Pooling("cls", False) and max_length == 256 and lower is False
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}')
    with pytest.raises(ConfigError, match="exactly one"):
        read_pooling(folder)
    with pytest.raises(DataError, match="no model.safetensors"):  # weights in other formats are refused
        SentenceEncoder(str(folder))


def test_pooling_modes_on_known_vectors():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(Pooling("mean")(hidden, mask), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(Pooling("max")(hidden, mask), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(Pooling("cls")(hidden, mask), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(Pooling("mean_sqrt_len")(hidden, mask), torch.tensor([[4.0, 4.0]]) / 2 ** 0.5)
    assert torch.allclose(Pooling("mean", True)(hidden, mask), torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5]]))


@pytest.mark.parametrize("cut", [0, 4, 5])
def test_top_layers_over_cached_bottom_equal_the_whole_encoder(encoder, cut):
    """Bottom (cached) + a trainable copy of the top = the frozen encoder, for any cut."""
    from kshot.text.models import TopLayers

    tokens, offsets = encoder.hidden_states(SENTENCES, cut)
    assert int(offsets[-1]) == len(tokens) and len(offsets) == len(SENTENCES) + 1
    top = TopLayers(encoder.top_module(cut), encoder.pooling).eval()
    with torch.no_grad():
        z = top(pack_tokens(tokens, offsets, np.arange(len(SENTENCES)), length=encoder.max_length))
    torch.testing.assert_close(z, encoder.encode(SENTENCES), atol=2e-5, rtol=0)
    layers = encoder.layers - cut
    n_params = sum(p.numel() for p in top.parameters())
    per_layer = sum(p.numel() for p in encoder.model.encoder.layer[0].parameters())
    assert n_params == layers * per_layer  # only the top layers: no embeddings, no frozen layers
    assert all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in encoder.model.parameters())  # the original stays frozen
