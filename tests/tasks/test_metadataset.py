"""Meta-Dataset episodes (Triantafillou et al. 2020) and multi-source tasks, on real text data."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kshot.config import TrainConfig
from kshot.data import FewShotDataset, load_dataset
from kshot.errors import ConfigError, DataError
from kshot.learners import ProtoNet
from kshot.tasks import (EpisodeBounds, MultiSourceSampler, VariableTaskSampler, fixed_episodes,
                         sampler_from_config, task_sampler)
from kshot.models import create_model
from kshot.tasks import TaskSampler, fixed_tasks, identity_collate

DIM = 512  # small feature vectors keep the tests fast; the sampler does not care


@pytest.fixture(scope="module")
def clinc():
    return load_dataset("clinc150", "train", features={"dim": DIM})


@pytest.fixture(scope="module")
def banking():
    return load_dataset("banking77", "train", features={"dim": DIM})


@pytest.fixture(scope="module")
def union():
    return load_dataset("clinc150+banking77", "val", features={"dim": DIM})


class FewerExamples(FewShotDataset):
    """Real examples, but only the first ``keep[c]`` of class ``c``: small, unequal classes."""

    def __init__(self, parent: FewShotDataset, keep: np.ndarray):
        self.parent = parent
        self._examples = [e[:k] for e, k in zip(parent.class_examples(), keep)]
        self.class_names = parent.class_names

    def class_examples(self):
        return self._examples

    def load(self, indices):
        return self.parent.load(indices)


def check_episode(ep, counts: np.ndarray, b: EpisodeBounds, n_classes: int) -> None:
    """Every rule of the paper's sampler, recomputed from the episode's own random draws."""
    n = counts[ep.classes]
    assert b.min_ways <= ep.ways <= min(b.max_ways, n_classes)
    assert len(set(ep.classes.tolist())) == ep.ways
    assert ep.queries == min(b.max_queries, int((n // 2).min()))
    remaining = n - ep.queries
    assert 0 < ep.beta <= 1
    assert ep.support_size == min(b.max_support,
                                  int(np.ceil(ep.beta * np.minimum(b.max_support_per_class, remaining)).sum()))
    assert ep.ways <= ep.support_size <= b.max_support
    assert np.all((b.min_log_weight <= ep.log_weights) & (ep.log_weights < b.max_log_weight))
    shares = np.exp(ep.log_weights) * n / (np.exp(ep.log_weights) * n).sum()
    expected = np.minimum(np.floor(shares * (ep.support_size - ep.ways)).astype(int) + 1, remaining)
    assert ep.shots.tolist() == expected.tolist()
    assert ep.shots.min() >= 1 and ep.shots.sum() <= ep.support_size
    assert np.all(ep.shots <= remaining)


def draw(sampler: VariableTaskSampler, n: int, index: int = 0):
    return [sampler.episode(step, index) for step in range(n)]


def test_episodes_keep_the_papers_bounds_and_reach_them(clinc):
    # CLINC150 train: 90 intents of 150 utterances, so the 50-way cap, the 10-query cap, the
    # 100-per-class contribution cap and the 500-example support cap all bind.
    b = EpisodeBounds()
    assert (b.min_ways, b.max_ways, b.max_queries, b.max_support, b.max_support_per_class) == (5, 50, 10, 500, 100)
    assert (b.min_log_weight, b.max_log_weight) == (math.log(0.5), math.log(2))
    sampler = VariableTaskSampler(clinc, seed=3)
    counts = np.array([len(e) for e in clinc.class_examples()])
    episodes = draw(sampler, 800)
    for ep in episodes:
        check_episode(ep, counts, b, clinc.num_classes)
        for examples, k in zip(ep.examples, ep.shots):
            assert len(set(examples.tolist())) == len(examples) == k + ep.queries
    ways = Counter(ep.ways for ep in episodes)
    assert sorted(ways) == list(range(5, 51))  # every number of ways, both ends included
    assert min(ways.values()) >= 5 and max(ways.values()) <= 35  # ~17 each: uniform
    assert {ep.queries for ep in episodes} == {10}
    support = np.array([ep.shots.sum() for ep in episodes])
    assert support.max() >= 480 and support.min() <= 10  # up to ~500 examples, down to a few
    assert any(ep.shots.max() == 1 for ep in episodes)  # beta <= 1/100: one shot for every class
    assert sum(ep.support_size == 500 for ep in episodes) > 80
    shots = np.concatenate([ep.shots for ep in episodes])
    assert shots.min() == 1 and shots.max() >= 60
    betas = np.array([ep.beta for ep in episodes])
    assert abs(betas.mean() - 0.5) < 0.03 and betas.min() < 0.01 and betas.max() > 0.99


def test_small_unequal_classes_bound_queries_and_shots(banking):
    # Real BANKING77 utterances, 7 classes cut to 2..19 examples and the others to 20..60:
    # half the smallest class caps the queries, and what is left of a class caps its shots.
    keep = np.random.default_rng(0).integers(20, 61, size=banking.num_classes)
    keep[::7] = [2, 5, 8, 11, 14, 17, 19]
    small = FewerExamples(banking, keep)
    sampler = VariableTaskSampler(small, seed=1)
    counts = np.array([len(e) for e in small.class_examples()])
    episodes = draw(sampler, 500)
    for ep in episodes:
        check_episode(ep, counts, sampler.bounds, small.num_classes)
    queries = Counter(ep.queries for ep in episodes)
    assert min(queries) == 1 and max(queries) == 10 and len(queries) >= 6
    assert any(np.any(ep.shots == counts[ep.classes] - ep.queries) for ep in episodes)
    assert Counter(ep.ways for ep in episodes).keys() == set(range(5, 48))  # 47 classes


def test_custom_bounds_and_too_few_classes(clinc):
    b = EpisodeBounds(min_ways=3, max_ways=7, max_queries=4, max_support=40, max_support_per_class=6)
    counts = np.array([len(e) for e in clinc.class_examples()])
    for ep in draw(VariableTaskSampler(clinc, seed=0, bounds=b), 200):
        check_episode(ep, counts, b, clinc.num_classes)
        assert ep.queries == 4 and ep.support_size <= min(40, 6 * ep.ways)
    with pytest.raises(ConfigError):
        EpisodeBounds(max_ways=60, max_support=50)
    with pytest.raises(DataError, match="classes"):
        VariableTaskSampler(clinc.subset([0, 1, 2]))


def test_tasks_are_reproducible_and_hold_the_episode(clinc):
    sampler = VariableTaskSampler(clinc, seed=7, meta_batch_size=3)
    ep = sampler.episode(5, 2)
    task = sampler.task(5, 2)
    assert task.ways == ep.ways
    assert torch.bincount(task.support_y).tolist() == ep.shots.tolist()
    assert torch.bincount(task.query_y).tolist() == [ep.queries] * ep.ways
    support = np.concatenate([e[:k] for e, k in zip(ep.examples, ep.shots)])
    query = np.concatenate([e[k:] for e, k in zip(ep.examples, ep.shots)])
    assert torch.equal(task.support_x, clinc.load(support))
    assert torch.equal(task.query_x, clinc.load(query))
    assert not set(support.tolist()) & set(query.tolist())
    for c, cls in enumerate(task.classes.tolist()):
        assert set(ep.examples[c].tolist()) <= set(clinc.class_examples()[cls].tolist())
    again = VariableTaskSampler(clinc, seed=7).task(5, 2)
    assert torch.equal(again.support_x, task.support_x) and torch.equal(again.classes, task.classes)
    assert sampler.meta_batch(5, [2])[0].support_y.tolist() == task.support_y.tolist()
    other = VariableTaskSampler(clinc, seed=8).episode(5, 2)
    assert other.classes.tolist() != ep.classes.tolist()
    # The DataLoader stream gives the same meta-batches as asking for them directly.
    streamed = list(DataLoader(sampler.stream(0, 2), batch_size=None, collate_fn=identity_collate))
    assert [s for s, _ in streamed] == [0, 1]
    assert torch.equal(streamed[1][1][2].query_x, sampler.meta_batch(1)[2].query_x)


def test_multi_source_tasks_come_from_one_source_each(union):
    sampler = task_sampler(union, "variable", seed=0, meta_batch_size=2)
    assert isinstance(sampler, MultiSourceSampler) and sampler.example_shape == (DIM,)
    sources = [sampler.source(step) for step in range(400)]
    assert 170 <= sources.count(0) <= 230  # uniform over the 2 sources
    for step in range(30):
        task = sampler.task(step)
        owner = union.source_of_class(task.classes.numpy())
        assert len(set(owner.tolist())) == 1 and owner[0] == sampler.source(step)
        # Union class indices: the query examples belong to the classes the task names.
        first = union.class_examples()[int(task.classes[0])]
        assert any(torch.equal(task.query_x[0], row) for row in union.load(first))
    # Proportional to classes: 30 clinc150 vs 15 banking77 validation intents.
    by_classes = MultiSourceSampler(union, lambda d, s: VariableTaskSampler(d, s), weights="classes")
    assert by_classes.probabilities.tolist() == pytest.approx([2 / 3, 1 / 3])
    share = np.mean([by_classes.source(step) == 0 for step in range(600)])
    assert abs(share - 2 / 3) < 0.06
    only_banking = MultiSourceSampler(union, lambda d, s: VariableTaskSampler(d, s), weights=[0, 1])
    assert {only_banking.source(step) for step in range(50)} == {1}
    with pytest.raises(ConfigError):
        MultiSourceSampler(union, lambda d, s: VariableTaskSampler(d, s), weights=[1])
    with pytest.raises(ConfigError):
        task_sampler(union, "random")


def test_fixed_tasks_from_several_sources_stay_within_one(union):
    tasks = fixed_tasks(union, 5, 2, 3, n_tasks=40)
    seen = set()
    for task in tasks:
        owner = set(union.source_of_class(task.classes.numpy()).tolist())
        assert len(owner) == 1 and task.support_x.shape == (10, DIM)
        seen |= owner
    assert seen == {0, 1}
    episodes = fixed_episodes(union, n_tasks=10)
    assert len({t.ways for t in episodes}) > 1
    assert torch.equal(episodes[3].query_x, fixed_episodes(union, n_tasks=10)[3].query_x)


def test_config_chooses_the_training_tasks(clinc, union):
    config = TrainConfig(ways=5, shots=2, queries=3, seed=4, meta_batch_size=2)
    assert isinstance(sampler_from_config(config, clinc), TaskSampler)
    config.episodes = "variable"
    assert isinstance(sampler_from_config(config, clinc), VariableTaskSampler)
    config.source_weights = "classes"
    multi = ProtoNet.make_sampler(config, union)
    assert isinstance(multi, MultiSourceSampler) and multi.probabilities[0] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError):
        TrainConfig(episodes="wild").validate()


@pytest.fixture
def one_thread():
    """Small models train faster on one thread than on two cores that other jobs share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_protonet_meta_trains_on_variable_tasks(clinc, one_thread):
    torch.manual_seed(0)
    learner = ProtoNet(create_model("sparse_mlp", in_features=DIM, hidden=[64]))
    sampler = VariableTaskSampler(clinc, seed=0, meta_batch_size=2,
                                  bounds=EpisodeBounds(max_ways=10, max_support=60))
    probe = sampler.meta_batch(10_000)
    before, _ = learner.meta_loss(probe)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for step in range(30):
        optimizer.zero_grad()
        metrics = learner.meta_gradient(sampler.meta_batch(step))
        assert math.isfinite(metrics["loss"])
        optimizer.step()
    after, _ = learner.meta_loss(probe)
    assert after.item() < 0.75 * before.item()
