"""The sinusoid task family of the MAML paper: the published distribution, reproducible tasks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from kshot.tasks.families import SPLIT_SEEDS, SinusoidTasks, family_sampler, family_tasks, task_family
from kshot.errors import DataError
from kshot.tasks import identity_collate


# Tiny models: more threads only wait for each other (badly so on a shared machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tasks_follow_the_papers_distribution():
    family = SinusoidTasks(shots=10, queries=10, seed=0)
    amplitudes, phases, xs = [], [], []
    for i in range(300):
        task = family.task(i, 0)
        assert task.support_x.shape == (10, 1) and task.query_y.shape == (10, 1)
        assert task.support_x.dtype == torch.float32 and len(task.classes) == 0
        amplitude, phase = family.task_params(i, 0)
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        torch.testing.assert_close(y, amplitude * torch.sin(x - phase))
        amplitudes.append(amplitude), phases.append(phase), xs.append(x)
    x = torch.cat(xs)
    assert 0.1 <= min(amplitudes) and max(amplitudes) <= 5.0 and max(amplitudes) - min(amplitudes) > 4.5
    assert 0.0 <= min(phases) and max(phases) <= math.pi and max(phases) - min(phases) > 3.0
    assert -5 <= float(x.min()) and float(x.max()) <= 5 and abs(float(x.mean())) < 0.2


def test_a_task_is_a_pure_function_of_seed_step_and_index():
    a, b = SinusoidTasks(5, 5, seed=7), SinusoidTasks(5, 5, seed=7)
    torch.testing.assert_close(a.task(3, 2).support_x, b.task(3, 2).support_x)
    assert not torch.equal(a.task(3, 2).support_x, a.task(3, 1).support_x)
    assert not torch.equal(a.task(3, 2).support_x, SinusoidTasks(5, 5, seed=8).task(3, 2).support_x)
    batch = a.meta_batch(4, [1, 3])
    torch.testing.assert_close(batch[1].query_y, a.task(4, 3).query_y)
    streamed = list(DataLoader(a.stream(0, 4, [0, 1]), batch_size=None, num_workers=2, collate_fn=identity_collate))
    assert [step for step, _ in streamed] == [0, 1, 2, 3]
    torch.testing.assert_close(streamed[2][1][1].support_y, a.task(2, 1).support_y)


def test_splits_have_their_own_fixed_tasks():
    assert task_family("sinusoid") is SinusoidTasks and task_family("omniglot") is None
    val, test = family_tasks("sinusoid", "val", 10, 100, 5), family_tasks("sinusoid", "test", 10, 100, 5)
    assert len(val) == 5 and val[0].query_x.shape == (100, 1)
    assert not torch.equal(val[0].support_x, test[0].support_x)
    torch.testing.assert_close(test[4].support_x, family_tasks("sinusoid", "test", 10, 100, 5)[4].support_x)
    train = family_sampler("sinusoid", "train", 10, 10, seed=0, meta_batch_size=25)
    assert len(train.meta_batch(0)) == 25 and train.seed == 0 and SPLIT_SEEDS["test"] != 0


def test_bad_settings_are_refused():
    with pytest.raises(DataError, match="shots"):
        SinusoidTasks(0, 5)
    with pytest.raises(DataError, match="amplitude"):
        SinusoidTasks(5, 5, amplitude=(5.0, 0.1))
