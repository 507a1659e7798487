"""Batches of labelled examples for supervised pre-training: every example once per epoch, the
right dataset-wide labels, and batch (step, i) a function of (seed, step, i) alone."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kshot.data import ArrayDataset
from kshot.data.base import ClassSubset
from kshot.errors import DataError
from kshot.tasks import LabelledBatchSampler, identity_collate


@pytest.fixture(scope="module")
def small(omniglot):
    """7 real Omniglot classes (140 drawings)."""
    return ClassSubset(omniglot("train"), [3, 50, 400, 1000, 2000, 3000, 4111])


def test_each_epoch_visits_every_example_once_with_its_class_as_label(small):
    sampler = LabelledBatchSampler(small, batch_size=10, seed=4)
    n = sampler.examples_per_epoch
    assert n == 140 and sampler.num_classes == 7
    examples = small.class_examples()
    owner = {int(e): c for c, ex in enumerate(examples) for e in ex}
    for epoch in range(2):
        positions = np.concatenate([sampler.batch_positions(step) for step in range(epoch * 14, epoch * 14 + 14)])
        assert sorted(positions.tolist()) == list(range(n))  # a permutation of the epoch's examples
    batch = sampler.batch(3)
    positions = sampler.batch_positions(3)
    flat = np.concatenate(examples)
    assert batch.y.tolist() == [owner[int(flat[p])] for p in positions]
    assert torch.equal(batch.x, small.load(flat[positions]))
    # Epochs are shuffled differently; a batch straddling two epochs takes the end of one and the start of the next.
    assert not np.array_equal(sampler.epoch_order(0), sampler.epoch_order(1))
    straddling = LabelledBatchSampler(small, batch_size=30, seed=4).batch_positions(4)  # positions 120..149
    np.testing.assert_array_equal(straddling[:20], sampler.epoch_order(0)[120:])
    np.testing.assert_array_equal(straddling[20:], sampler.epoch_order(1)[:10])


def test_batches_are_a_function_of_seed_step_and_index(small, omniglot):
    a = LabelledBatchSampler(small, batch_size=8, seed=1, meta_batch_size=3)
    b = LabelledBatchSampler(small, batch_size=8, seed=1, meta_batch_size=3)
    for step, index in ((0, 0), (5, 2), (40, 1)):
        assert np.array_equal(b.batch_positions(step, index), a.batch_positions(step, index))
    b.batch_positions(40, 1)  # another history of cached epochs changes nothing
    assert np.array_equal(b.batch_positions(0, 0), a.batch_positions(0, 0))
    assert not np.array_equal(LabelledBatchSampler(small, 8, seed=2).batch_positions(0), a.batch_positions(0))
    # A meta-batch's batches are consecutive slices of the one stream.
    flat = LabelledBatchSampler(small, batch_size=24, seed=1)
    assert np.array_equal(np.concatenate([a.batch_positions(2, i) for i in range(3)]), flat.batch_positions(2))
    loader = DataLoader(a.stream(start=3, stop=7), batch_size=None, num_workers=2, collate_fn=identity_collate)
    for step, batches in loader:
        for got, want in zip(batches, a.meta_batch(step)):
            assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    # Pinned on the full training split: a change here changes every baseline's training.
    full = LabelledBatchSampler(omniglot("train"), batch_size=16, seed=0)
    digest = hashlib.sha256(np.concatenate([full.batch_positions(s) for s in (0, 1, 5139, 5140)]).astype("<i8").tobytes())
    assert digest.hexdigest() == PINNED_SHA256


PINNED_SHA256 = "a607201b1198e1f0cd97dfbacd1f2a73665e842b5be838b965c60326be62f4bd"  # NumPy 2.4, x86-64


def test_bad_settings_are_clear_errors(small):
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        LabelledBatchSampler(small, batch_size=0)
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        LabelledBatchSampler(small, seed=-1)
    with pytest.raises(DataError, match="no examples"):
        LabelledBatchSampler(ArrayDataset(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), np.zeros(0, dtype=np.int64)))
