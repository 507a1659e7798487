"""Encodings are computed once, reused, and never read stale: other texts, settings or files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kshot.data.text import TextDataset
from kshot.text import EncodedTexts, EncodingCache, SentenceEncoder, get_encoder


def _refuse(*args, **kwargs):
    raise AssertionError("the encoder ran although the cache holds the encoding")


def test_embeddings_computed_once_then_read(encoder, banking_texts, tmp_path, monkeypatch):
    texts = banking_texts[0][:24]
    cache = EncodingCache(tmp_path)
    first = cache.embeddings(encoder, texts)
    assert (cache.misses, cache.hits) == (1, 0)
    torch.testing.assert_close(first, encoder.encode(texts))
    files = list((tmp_path / "text-encodings").glob("*.safetensors"))
    assert len(files) == 1
    with monkeypatch.context() as m:
        m.setattr(encoder, "encode", _refuse)
        again = EncodingCache(tmp_path).embeddings(encoder, texts)  # a new process would do the same
    assert torch.equal(again, first)
    # One text changed: another entry, computed anew.
    changed = EncodingCache(tmp_path)
    other = changed.embeddings(encoder, texts[:-1] + [texts[-1] + "!"])
    assert changed.misses == 1 and torch.equal(other[:-1], first[:-1]) and not torch.equal(other[-1], first[-1])
    # Other settings of the same files (pooling): another entry.
    cls_pooled = get_encoder(encoder.name, pooling="cls")
    assert not torch.allclose(EncodingCache(tmp_path).embeddings(cls_pooled, texts), first)
    assert len(list((tmp_path / "text-encodings").glob("*.safetensors"))) == 3


def test_changed_model_files_invalidate_the_cache(encoder, model_path, tmp_path):
    """A copy of the model whose files differ hashes differently: its encodings are not reused."""
    folder = tmp_path / "model"
    folder.mkdir()
    model_path = os.path.abspath(model_path)
    for name in os.listdir(model_path):
        if os.path.isfile(os.path.join(model_path, name)):
            os.symlink(os.path.join(model_path, name), folder / name)
    os.symlink(os.path.join(model_path, "1_Pooling"), folder / "1_Pooling")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))  # a real change
    copy = SentenceEncoder(str(folder))
    assert copy.sha256 != encoder.sha256
    texts = ["my card was declined", "where is my refund"]
    cache = EncodingCache(tmp_path / "cache")
    a, b = cache.embeddings(encoder, texts), cache.embeddings(copy, texts)
    assert cache.misses == 2 and cache.hits == 0
    assert not torch.equal(a, b)


def test_a_damaged_entry_is_computed_again(encoder, tmp_path):
    texts = ["top up my account", "cancel the transfer"]
    cache = EncodingCache(tmp_path)
    good = cache.embeddings(encoder, texts)
    path = next((tmp_path / "text-encodings").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = EncodingCache(tmp_path)
    torch.testing.assert_close(again.embeddings(encoder, texts), good)
    assert again.misses == 1
    path.write_bytes(b"\0" * 10_000_000)  # larger than two embeddings can be: not even parsed
    assert EncodingCache(tmp_path)._read(path, path.stem, {"embeddings": (2, 384)}, 2 * 384 * 4) is None


def test_encoded_dataset_reuses_hidden_states(encoder, banking_texts, tmp_path, monkeypatch):
    texts, labels, names = banking_texts
    source = TextDataset(texts, labels, names)
    data = EncodedTexts(source, encoder, top_layers=2, cache=EncodingCache(tmp_path))
    x = data.load(np.array([0, 5, 7]))
    assert x.shape[0] == 3 and x.shape[2] == 385 and data.example_shape == (256, 385)
    assert torch.equal(x[:, :, 0].sum(1), (data.offsets[[1, 6, 8]] - data.offsets[[0, 5, 7]]).float())
    with monkeypatch.context() as m:
        m.setattr(encoder, "hidden_states", _refuse)
        again = EncodedTexts(source, encoder, top_layers=2, cache=EncodingCache(tmp_path))
        assert torch.equal(again.load(np.array([0, 5, 7])), x)
    record = data.checkpoint_extra()["text_encoder"]
    assert record["sha256"] == encoder.sha256 and record["top_layers"] == 2 and record["pooling"] == "mean"
    with pytest.raises(Exception, match="text datasets"):
        EncodedTexts(object(), encoder)  # type: ignore[arg-type]


def test_splits_share_the_whole_datasets_encodings(encoder, banking_texts, tmp_path):
    """A split taken from the whole dataset's cache entry equals the split encoded on its own."""
    texts, labels, names = banking_texts
    whole = TextDataset(texts, labels, names)
    keep = [i for i, y in enumerate(labels) if y in (1, 4)][::3]
    split = TextDataset([texts[i] for i in keep], [labels[i] // 4 for i in keep], [names[1], names[4]])
    for top_layers in (0, 1):
        cache = EncodingCache(tmp_path / str(top_layers))
        shared = EncodedTexts(split, encoder, top_layers, cache=cache, within=whole)
        alone = EncodedTexts(split, encoder, top_layers, cache=EncodingCache(tmp_path / f"alone{top_layers}"))
        rows = np.arange(len(keep))
        torch.testing.assert_close(shared.load(rows), alone.load(rows), atol=2e-5, rtol=0)
        assert cache.misses == 1  # only the whole dataset was encoded
