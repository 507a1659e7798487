"""Users as tasks on the real ml-100k: user-disjoint splits saved and read back, support and
query sets that never share an item, tasks that are a pure function of (seed, step, index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kshot.errors import DataError
from kshot.recsys import RatingTasks, UserRatings, UserTasks, load_movielens, load_user_ratings, user_split
from kshot.recsys.users import MIN_QUERY


@pytest.fixture(scope="module")
def ml100k(data_dir):
    return load_movielens("movielens-100k", data_dir=data_dir, download=False)


@pytest.fixture(scope="module")
def splits(ml100k, tmp_path_factory):
    users = user_split(ml100k, tmp_path_factory.mktemp("split") / "users.json")
    return {s: UserRatings(ml100k, s, users) for s in ("train", "val", "test")}


def test_user_split_is_disjoint_seeded_and_saved(ml100k, tmp_path):
    path = tmp_path / "users.json"
    split = user_split(ml100k, path, seed=3)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == 943 and set.union(*parts) == {str(u) for u in ml100k.user_ids}
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert (len(parts[0]), len(parts[1]), len(parts[2])) == (660, 94, 189)
    assert path.is_file()
    again = user_split(ml100k, path, seed=99)  # read back: the file wins over a new seed
    assert (again.train, again.val, again.test) == (split.train, split.val, split.test)
    assert user_split(ml100k, None, seed=3).test == split.test
    assert user_split(ml100k, None, seed=4).test != split.test
    path.write_text('{"train": ["1", "5000"], "val": [], "test": []}')
    with pytest.raises(DataError, match="names 1 users that movielens-100k does not have"):
        user_split(ml100k, path)


def test_tasks_of_different_splits_meet_different_users(splits):
    seen = {s: {RatingTasks(r, 10, seed=0).task(step, 0).user for step in range(40)} for s, r in splits.items()}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert seen["train"] <= set(splits["train"].users.tolist())


def test_training_tasks_are_a_function_of_seed_step_index(splits, ml100k):
    source = RatingTasks(splits["train"], 5, queries=20, seed=7, meta_batch_size=4)
    a, b = source.task(3, 2), RatingTasks(splits["train"], 5, queries=20, seed=7).task(3, 2)
    assert a.user == b.user and torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    others = [source.task(3, 1), source.task(4, 2), RatingTasks(splits["train"], 5, 20, seed=8).task(3, 2)]
    assert all(not torch.equal(t.support_items, a.support_items) for t in others)
    for task in source.meta_batch(0) + [a]:
        items, values = splits["train"].ratings_of(task.user)
        assert len(task.support_y) == 5 and len(task.query_y) == min(20, len(items) - 5)
        assert not set(task.support_items.tolist()) & set(task.query_items.tolist())
        # every example is the user's own rating of that item, with the user's and item's codes
        rating = dict(zip(items.tolist(), values.tolist()))
        got = torch.cat([task.support_items, task.query_items]).tolist()
        assert torch.cat([task.support_y, task.query_y]).reshape(-1).tolist() == [rating[i] for i in got]
        x = torch.cat([task.support_x, task.query_x])
        assert (x[:, :4] == torch.from_numpy(ml100k.user_features[task.user])).all()
        assert x[:, 4].tolist() == [i + 1 for i in got]
        assert torch.equal(x[:, 6:], torch.from_numpy(ml100k.genres[got].astype(np.int64)))


def test_evaluation_tasks_one_per_user_support_nested_query_all_the_rest(splits):
    test = splits["test"]
    by_shots = {k: UserTasks(test, k) for k in (5, 10, 20)}
    assert len(by_shots[5]) == len(by_shots[10]) == 189  # everyone has >= 20 ratings
    assert by_shots[20].skipped == int((test.counts < 20 + MIN_QUERY).sum()) > 0
    for i in range(0, 189, 17):
        t5, t10 = by_shots[5][i], by_shots[10][i]
        assert t5.user == t10.user
        assert t5.support_items.tolist() == t10.support_items[:5].tolist()  # nested supports
        n = int(test.counts[list(test.users).index(t5.user)])
        assert len(t5.support_items) + len(t5.query_items) == n  # the query is every other rating
        assert not set(t10.support_items.tolist()) & set(t10.query_items.tolist())
    assert by_shots[10][3].query_items.tolist() == UserTasks(test, 10)[3].query_items.tolist()
    moved = by_shots[10][0].to("cpu")
    assert moved.user == by_shots[10][0].user and moved.query_items is not None


def test_loaded_split_is_the_same_for_every_split_and_run(data_dir, tmp_path):
    kw = dict(data_dir=data_dir, cache_dir=tmp_path)
    train, test = load_user_ratings("movielens-100k", "train", **kw), load_user_ratings("movielens-100k", "test", **kw)
    assert (tmp_path / "movielens-100k" / "users-seed0.json").is_file()
    assert not set(train.users.tolist()) & set(test.users.tolist())
    saved = train.checkpoint_extra()["ratings"]["user_split"]
    assert load_user_ratings("movielens-100k", "test", users=saved, **kw).users.tolist() == test.users.tolist()
