"""The pair sampler on real Omniglot: balanced, never self-paired, uniform, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.data import ArrayDataset
from kshot.errors import ConfigError, DataError
from kshot.tasks.pairs import PairBatch, PairSampler, random_affine


@pytest.fixture(scope="module")
def lake_train(omniglot):
    return omniglot("train", protocol="lake")


def _class_of(dataset) -> dict[int, int]:
    return {int(i): c for c, examples in enumerate(dataset.class_examples()) for i in examples}


def test_pairs_are_balanced_and_never_self_paired(lake_train):
    sampler = PairSampler(lake_train, pairs=128, seed=3)
    class_of = _class_of(lake_train)
    for step in range(40):
        classes, (anchor, positive, negative) = sampler.pair_indices(step)
        assert anchor.shape == positive.shape == negative.shape == (64,)
        assert (anchor != positive).all(), "an example was paired with itself"
        assert [class_of[i] for i in anchor] == [class_of[i] for i in positive] == classes[0].tolist()
        assert [class_of[i] for i in negative] == classes[1].tolist()
        assert (classes[0] != classes[1]).all()
    batch = sampler.pair_batch(7)
    assert len(batch) == 128 and batch.same.sum() == 64
    assert torch.equal(batch.same[:64], torch.ones(64)) and torch.equal(batch.same[64:], torch.zeros(64))
    # The loaded images are exactly the drawn examples, read as the pairs (first, second).
    _, (a, p, n) = sampler.pair_indices(7)
    assert torch.equal(batch.first, lake_train.load(np.r_[a, a]))
    assert torch.equal(batch.second, lake_train.load(np.r_[p, n]))


def test_classes_and_drawings_are_drawn_uniformly(lake_train):
    sampler = PairSampler(lake_train, pairs=128, seed=0)
    n_classes = lake_train.num_classes
    draws = [sampler.pair_indices(step) for step in range(500)]
    anchors = np.concatenate([d[0][0] for d in draws])
    negatives = np.concatenate([d[0][1] for d in draws])
    for drawn in (anchors, negatives):
        counts = np.bincount(drawn, minlength=n_classes)
        expected = len(drawn) / n_classes
        chi2 = ((counts - expected) ** 2 / expected).sum()
        # Chi-square with 791 degrees of freedom: mean 791, sd about 40.
        assert chi2 < n_classes - 1 + 5 * np.sqrt(2 * (n_classes - 1)), chi2
    # Each of a character's 20 drawings is an anchor equally often.
    drawing = np.concatenate([d[1][0] for d in draws]) % 20
    assert np.bincount(drawing, minlength=20).min() > 0.8 * len(drawing) / 20


def test_batches_are_a_pure_function_of_seed_step_and_index(lake_train):
    a = PairSampler(lake_train, pairs=32, seed=5, augment="affine")
    b = PairSampler(lake_train, pairs=32, seed=5, augment="affine")
    first, again = a.pair_batch(11, 1), b.meta_batch(11, [0, 1])[1]
    assert torch.equal(first.anchor, again.anchor) and torch.equal(first.negative, again.negative)
    assert not np.array_equal(a.pair_indices(11, 0)[1], a.pair_indices(11, 1)[1])
    assert not np.array_equal(a.pair_indices(11)[1], a.pair_indices(12)[1])
    assert not np.array_equal(a.pair_indices(11)[1], PairSampler(lake_train, 32, seed=6).pair_indices(11)[1])
    # A stream (as DataLoader workers read it) gives the same meta-batches.
    stream = list(a.stream(3, 5, indices=[0]))
    assert [s for s, _ in stream] == [3, 4]
    assert torch.equal(stream[1][1][0].positive, a.pair_batch(4, 0).positive)


def test_affine_distortions_move_strokes_but_keep_them(lake_train):
    x = lake_train.load(np.arange(64))
    rng = np.random.default_rng(0)
    y = random_affine(x, rng)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    changed = (y - x).abs().flatten(1).amax(1) > 0.05
    assert 0.8 < changed.float().mean() < 1.0  # each of 4 parts applies with p=1/2: 1/16 untouched
    ink = x.flatten(1).sum(1)
    ratio = y.flatten(1).sum(1) / ink
    assert ((ratio > 0.5) & (ratio < 1.6)).all(), ratio
    assert torch.equal(random_affine(x, np.random.default_rng(0)), y)


def test_small_classes_and_bad_settings():
    # Class 2 has one example: never an anchor, but a possible negative.
    data = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    dataset = ArrayDataset(data, [0, 0, 0, 1, 1, 2, 1])
    sampler = PairSampler(dataset, pairs=40, seed=1)
    seen_negative = set()
    for step in range(50):
        classes, (a, p, n) = sampler.pair_indices(step)
        assert 2 not in classes[0] and (a != p).all()
        seen_negative |= set(classes[1].tolist())
    assert seen_negative == {0, 1, 2}
    with pytest.raises(DataError, match="even"):
        PairSampler(dataset, pairs=7)
    with pytest.raises(ConfigError, match="augment"):
        PairSampler(dataset, augment="mixup")
    with pytest.raises(DataError, match="two classes"):
        PairSampler(ArrayDataset(data[:3], [0, 0, 0]))
    with pytest.raises(DataError, match="two examples"):
        PairSampler(ArrayDataset(data[:3], [0, 1, 2]))


def test_pair_batch_moves_to_a_device():
    batch = PairBatch(torch.zeros(2, 1), torch.ones(2, 1), torch.ones(2, 1), torch.tensor([0, 1]),
                      torch.tensor([1, 0]))
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and torch.equal(moved.second, torch.tensor([[1.], [1.], [1.], [1.]]))
