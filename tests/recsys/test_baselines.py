"""The baselines on real ml-100k users: the item mean against a direct count, the SVD of
scikit-surprise fitted with the test users' support ratings, fine-tuning through kshot's inner loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.recsys import UserTasks, adapted_predictor, load_user_ratings
from kshot.recsys.baselines import ItemMean, SurpriseSVD, fine_tuned_learner
from kshot.recsys.model import rating_model


@pytest.fixture(scope="module")
def ratings(data_dir, cache_dir):
    kw = dict(data_dir=data_dir, cache_dir=cache_dir)
    return load_user_ratings("movielens-100k", "train", **kw), load_user_ratings("movielens-100k", "test", **kw)


def test_item_mean_is_the_training_users_mean(ratings):
    train, test = ratings
    task = UserTasks(test, 5)[0]
    item = int(task.query_items[0])
    by_train = [float(v) for u in train.users for i, v in zip(*train.ratings_of(int(u))) if i == item]
    assert ItemMean(train)(task)[0] == pytest.approx(np.mean(by_train))


def test_svd_learns_from_the_test_users_support_ratings(ratings):
    pytest.importorskip("surprise")
    train, test = ratings
    tasks = UserTasks(test, 10, max_users=30)
    svd = SurpriseSVD(train, tasks, seed=0, n_epochs=5)
    pessimist = list(UserTasks(test, 10, max_users=30))
    for t in pessimist:  # the same users, had they rated their support movies 1
        t.support_y.fill_(1.0)
    lowered = SurpriseSVD(train, pessimist, seed=0, n_epochs=5)  # type: ignore[arg-type]
    real = np.concatenate([svd(t) for t in tasks])
    low = np.concatenate([lowered(t) for t in tasks])
    assert real.shape == (sum(len(t.query_items) for t in tasks),) and 1 <= real.min() and real.max() <= 5
    assert low.mean() < real.mean() - 0.1


def test_fine_tuning_moves_only_the_decision_layers(ratings):
    train, test = ratings
    torch.manual_seed(0)
    model = rating_model(train)
    learner = fine_tuned_learner(model, steps=3, lr=0.01)
    task = UserTasks(test, 10)[0]
    with torch.no_grad():
        adapted = learner.adapt(task.support_x, task.support_y, 0)
    for name, p in learner.model.named_parameters():
        assert torch.equal(adapted.params[name], p) != name.startswith("decision.")
    assert adapted_predictor(learner)(task).shape == (len(task.query_items),)
