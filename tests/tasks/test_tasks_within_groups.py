"""Tasks whose classes all come from one group: Omniglot's within-alphabet tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.data import ArrayDataset
from kshot.errors import DataError
from kshot.tasks import TaskSampler, fixed_tasks


def test_omniglot_groups_are_alphabets(omniglot):
    test = omniglot("test", protocol="lake")
    groups = test.class_groups()
    assert groups.shape == (659,) and len(np.unique(groups)) == 20
    for c in (0, 100, 658):  # class names start with the alphabet
        same_group = np.flatnonzero(groups == groups[c])
        assert {test.class_names[i].split("/")[0] for i in same_group} == {test.class_names[c].split("/")[0]}
    rotated = omniglot("val")  # Vinyals split, 4 rotations per character: all in one alphabet
    assert np.array_equal(rotated.class_groups()[:4], np.repeat(rotated.class_groups()[0], 4))
    subset = test.subset([5, 300])
    assert np.array_equal(subset.class_groups(), groups[[5, 300]])


def test_every_task_draws_its_classes_from_one_alphabet(omniglot):
    test = omniglot("test", protocol="lake")
    groups = test.class_groups()
    sampler = TaskSampler(test, ways=20, shots=1, queries=5, seed=0, within_groups=True)
    used = set()
    for step in range(200):
        classes, _ = sampler.task_indices(step)
        assert len(set(classes.tolist())) == 20
        assert len(set(groups[classes].tolist())) == 1
        used.add(int(groups[classes[0]]))
    assert len(used) == 20  # every evaluation alphabet has 20 or more characters
    # Across alphabets, classes drawn freely span many alphabets.
    free = TaskSampler(test, ways=20, shots=1, queries=5, seed=0)
    assert len(set(groups[free.task_indices(0)[0]].tolist())) > 5
    # Fixed tasks are reproducible, and their labels still follow the drawn classes.
    a, b = fixed_tasks(test, 20, 1, 5, 3, within_groups=True), fixed_tasks(test, 20, 1, 5, 3, within_groups=True)
    assert torch.equal(a[2].support_x, b[2].support_x) and torch.equal(a[2].classes, b[2].classes)
    assert len(set(groups[a[1].classes.numpy()].tolist())) == 1


def test_groups_too_small_or_missing_are_explained(omniglot):
    with pytest.raises(DataError, match="no group has 50 classes"):
        TaskSampler(omniglot("test", protocol="lake"), ways=50, shots=1, queries=1, within_groups=True)
    plain = ArrayDataset(torch.zeros(6, 1), [0, 0, 1, 1, 2, 2])
    with pytest.raises(DataError, match="does not group its classes"):
        TaskSampler(plain, ways=2, shots=1, queries=1, within_groups=True)


def test_the_setting_reaches_the_trainers_fixed_tasks(cache_dir):
    from kshot.cli import build_parser
    from kshot.config import resolve_config
    from kshot.runs.train import Trainer

    args = build_parser().parse_args(["train", "--test-within-groups", "yes", "--protocol", "lake"])
    assert args.test_within_groups is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--test-within-groups", "maybe"])
    config = resolve_config(overrides=dict(protocol="lake", test_within_groups=True, ways=20, steps=1,
                                           val_tasks=4, test_tasks=0, cache_dir=str(cache_dir)))
    trainer = Trainer(config, "unused", progress=False)
    assert trainer.val_tasks.sampler.within_groups
    groups = trainer.val_tasks.sampler.dataset.class_groups()
    assert all(len(set(groups[t.classes.numpy()].tolist())) == 1 for t in trainer.val_tasks)


def test_training_tasks_and_siamese_negatives_can_come_from_one_alphabet(cache_dir):
    """Train as the within-alphabet test tests: episodes of one alphabet's characters, and Siamese
    negatives that are another character of the anchor's alphabet."""
    from kshot.config import resolve_config
    from kshot.errors import ConfigError
    from kshot.runs.build import training_tasks

    config = resolve_config(overrides=dict(protocol="lake", within_groups=True, ways=20, shots=1, queries=2,
                                           cache_dir=str(cache_dir)))
    sampler = training_tasks(config)
    groups = sampler.dataset.class_groups()
    seen = set()
    for step in range(60):
        classes, _ = sampler.task_indices(step)
        assert len(set(groups[classes].tolist())) == 1
        seen.add(int(groups[classes[0]]))
    assert len(seen) > 10  # the training alphabets with 20 characters or more, not one of them
    free = training_tasks(resolve_config(overrides=dict(protocol="lake", ways=20, shots=1, queries=2,
                                                        cache_dir=str(cache_dir))))
    assert len(set(groups[free.task_indices(0)[0]].tolist())) > 5

    pairs = training_tasks(resolve_config("siamese-omniglot-20way-1shot",
                                          overrides=dict(within_groups=True, cache_dir=str(cache_dir))))
    for step in range(20):
        (anchor, negative), examples = pairs.pair_indices(step)
        assert np.array_equal(groups[anchor], groups[negative]) and not np.any(anchor == negative)
        of_class = pairs.dataset.class_examples()
        assert all(e in set(np.asarray(of_class[c]).tolist()) for e, c in zip(examples[2], negative))
    across = training_tasks(resolve_config("siamese-omniglot-20way-1shot",
                                           overrides=dict(cache_dir=str(cache_dir))))
    (anchor, negative), _ = across.pair_indices(0)
    assert np.mean(groups[anchor] == groups[negative]) < 0.2  # across alphabets, mostly other alphabets
    assert np.array_equal(across.pair_indices(3)[1][:2], pairs.pair_indices(3)[1][:2])  # same anchors

    with pytest.raises(ConfigError, match="use --episodes fixed or drop --within-groups"):
        training_tasks(resolve_config(overrides=dict(protocol="lake", within_groups=True, episodes="variable",
                                                     cache_dir=str(cache_dir))))
    with pytest.raises(ConfigError, match="pre-trains on batches of all training classes"):
        training_tasks(resolve_config(overrides=dict(algo="baseline", protocol="lake", within_groups=True,
                                                     cache_dir=str(cache_dir))))
    with pytest.raises(DataError, match="no group has 60 classes"):
        training_tasks(resolve_config(overrides=dict(protocol="lake", within_groups=True, ways=60,
                                                     cache_dir=str(cache_dir))))
