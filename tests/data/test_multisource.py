"""Several datasets as one: clinc150+banking77, each source keeping its own class split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.data import ArrayDataset, MultiSourceDataset, load_dataset
from kshot.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def union():
    return load_dataset("clinc150+banking77", "test", features={"dim": 1024})


def test_union_keeps_every_source_class_in_order(union):
    assert isinstance(union, MultiSourceDataset)
    clinc, banking = union.sources
    assert union.names == ["clinc150", "banking77"]
    assert union.num_classes == clinc.num_classes + banking.num_classes == 45
    assert union.class_offsets.tolist() == [0, 30, 45]
    assert union.class_names[0] == f"clinc150/{clinc.class_names[0]}"
    assert union.class_names[30] == f"banking77/{banking.class_names[0]}"
    assert union.source_of_class([0, 29, 30, 44]).tolist() == [0, 0, 1, 1]
    assert union.source_classes(1).tolist() == list(range(30, 45))
    assert union.text_featuriser == clinc.text_featuriser and union.example_shape == (1024,)


def test_union_loads_the_sources_examples(union):
    clinc, banking = union.sources
    a = union.class_examples()[3][:2]       # a clinc150 class
    b = union.class_examples()[40][:3]      # a banking77 class
    assert torch.equal(union.load(a), clinc.load(clinc.class_examples()[3][:2]))
    assert torch.equal(union.load(b), banking.load(banking.class_examples()[10][:3]))
    mixed = np.concatenate([b[:1], a, b[1:]])
    x = union.load(mixed)
    assert torch.equal(x, torch.cat([union.load(b[:1]), union.load(a), union.load(b[1:])]))


def test_sources_must_share_an_input_form():
    small = ArrayDataset(torch.zeros(4, 3), [0, 0, 1, 1])
    wide = ArrayDataset(torch.zeros(4, 5), [0, 0, 1, 1])
    with pytest.raises(DataError, match="shapes"):
        MultiSourceDataset({"a": small, "b": wide})
    with pytest.raises(DataError):
        MultiSourceDataset({})
    clinc = load_dataset("clinc150", "val", features={"dim": 256})
    banking = load_dataset("banking77", "val", features={"dim": 256, "word_ngrams": 1})
    with pytest.raises(DataError, match="text_featuriser"):
        MultiSourceDataset({"clinc150": clinc, "banking77": banking})


def test_dataset_names_join_sources_with_plus():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_dataset("clinc150+nope", "test")
    with pytest.raises(ConfigError, match="repeats"):
        load_dataset("clinc150+clinc150", "test")
