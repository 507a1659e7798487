"""Users as tasks: a user's few ratings are the support set, their other ratings the query set.

The meta-learning view of cold-start recommendation (MeLU, Lee et al., KDD 2019): each user is a
task. A model adapted on a handful of the user's ratings (the support set: ``shots`` rated movies)
is scored on the same user's other ratings (the query set); a user's support and query never
share an item. Users are split, not ratings: meta-train, meta-val and meta-test users are
disjoint, drawn from a seed and written to a file (:func:`user_split`), so the test users are
new users in the full sense, whose ratings no model saw in training.

* :class:`RatingTasks` serves training tasks: task ``(step, i)`` is a pure function of
  ``(seed, step, i)`` (a user drawn uniformly, then a random order of their ratings), as every
  kshot task source.
* :class:`UserTasks` is a fixed evaluation set: one task per user of a split, in user-id order;
  user ``u``'s ratings are ordered by ``default_rng([seed, user id])``, the first ``shots`` are
  the support set and all the others the query set. So the 5-rating support of a user is part
  of their 10- and 20-rating supports. A user needs ``shots + MIN_QUERY`` ratings to be scored.

An example is one (user, item) pair as integer codes, ``[6 + n_genres]``: age group, gender,
occupation, zip area, item (dense index + 1), release year, genre flags; its target is the
rating, ``[1]`` (float). :meth:`UserRatings.features` builds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import cache_dir as resolve_cache_dir
from kshot.data.splits import ClassSplit, draw_split, read_split, write_split
from kshot.errors import ConfigError, DataError
from kshot.recsys.movielens import RELEASES, MovieLens, load_movielens
from kshot.tasks import EVAL_SEED, Task, TaskSource, smallest_keys

#: Meta-train / meta-val / meta-test fractions of the users.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
#: Seed of the default user split: fixed, so that every run and baseline meets the same test users.
USER_SPLIT_SEED = 0
#: Query ratings a user needs beyond the support to be scored (nDCG@5 needs five).
MIN_QUERY = 5
#: Columns of an example before the genre flags.
FEATURE_COLUMNS = ("age", "gender", "occupation", "zip_area", "item", "year")


def is_rating_dataset(name: str) -> bool:
    """Whether ``name`` is a rating dataset served by this package (``movielens-100k``, ...)."""
    return name in RELEASES


def user_split(data: MovieLens, split_file: str | os.PathLike | None = None, seed: int = USER_SPLIT_SEED,
               fractions: Sequence[float] = DEFAULT_FRACTIONS) -> ClassSplit:
    """Disjoint meta-train / meta-val / meta-test users (by the release's user ids, as text).

    Read from ``split_file`` when it exists (and checked against the data), else drawn from
    ``seed`` and ``fractions`` and written there (default: ``<cache>/<release>/users-seed<seed>.json``).
    """
    names = [str(u) for u in data.user_ids]
    path = Path(split_file) if split_file else None
    if path is not None and path.is_file():
        split = read_split(path)
        unknown = set(split.train + split.val + split.test) - set(names)
        if unknown:
            raise DataError(f"user split {path} names {len(unknown)} users that {data.name} does not have "
                            f"(e.g. {sorted(unknown)[0]!r}); it belongs to other data: delete it or name another")
        return split
    split = draw_split(names, fractions, seed)
    if path is not None:
        write_split(path, split)
    return split


def default_split_file(name: str, seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / name / f"users-seed{seed}.json"


@dataclass
class RatingTask(Task):
    """A user's task. Beyond :class:`~kshot.tasks.Task`'s tensors (``support_x [k, F]`` codes,
    ``support_y [k, 1]`` ratings, ``query_x [q, F]``, ``query_y [q, 1]``): the dense ``user`` index
    and the dense item indices of the support ``[k]`` and query ``[q]`` ratings."""

    user: int = -1
    support_items: torch.Tensor | None = None
    query_items: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RatingTask":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("support_x", "support_y", "query_x", "query_y"):
            moved[name] = moved[name].to(device, non_blocking=non_blocking)
        return RatingTask(**moved)


class UserRatings:
    """The ratings of one split's users, and how a (user, item) pair becomes model input.

    Args:
        data: the parsed release.
        split: ``train``, ``val``, ``test`` or ``trainval``.
        users: the user split (:func:`user_split`).
    """

    def __init__(self, data: MovieLens, split: str, users: ClassSplit):
        self.data, self.split, self.user_split = data, split, users
        index = {str(u): n for n, u in enumerate(data.user_ids)}
        try:
            names = users.classes(split)
        except DataError:
            raise ConfigError(f"unknown split {split!r}; choose train, val, test or trainval") from None
        if not names:
            raise DataError(f"the user split has no {split} users")
        self.users = np.array(sorted(index[n] for n in names), dtype=np.int64)
        self.offsets, self.items, self.values = data.by_user()
        self.counts = self.offsets[self.users + 1] - self.offsets[self.users]
        train = np.array([index[n] for n in users.train], dtype=np.int64)
        in_train = np.isin(data.rating_user, train)
        #: Mean rating of the meta-training users: where a rating model starts.
        self.train_mean = float(data.rating[in_train].mean()) if in_train.any() else 3.5
        years = data.year_buckets()
        self._item_codes = np.concatenate([np.arange(1, data.n_items + 1)[:, None], years[:, None],
                                           data.genres.astype(np.int64)], 1)

    def user_split_indices(self, split: str) -> np.ndarray:
        """Dense indices of the users of ``split`` (of the same user split)."""
        index = {str(u): n for n, u in enumerate(self.data.user_ids)}
        return np.array(sorted(index[n] for n in self.user_split.classes(split)), dtype=np.int64)

    def __repr__(self) -> str:
        return f"UserRatings({self.data.name} {self.split}: {len(self.users)} users, {int(self.counts.sum()):,} ratings)"

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (len(FEATURE_COLUMNS) + len(self.data.genre_names),)

    def ratings_of(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense item indices and ratings of dense user ``user``."""
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return self.items[lo:hi], self.values[lo:hi]

    def features(self, user_codes: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """Model input ``[n, F]`` (int64) for one user's codes ``[4]`` and dense ``items [n]``
        (an item index of -1 is an unknown item: all its codes 0)."""
        items = np.asarray(items, dtype=np.int64)
        codes = self._item_codes[np.clip(items, 0, None)]
        codes[items < 0] = 0
        users = np.broadcast_to(np.asarray(user_codes, dtype=np.int64), (len(items), 4))
        return torch.from_numpy(np.concatenate([users, codes], 1))

    def task(self, user: int, order: np.ndarray, shots: int) -> RatingTask:
        """The task of dense ``user`` whose ratings, taken in ``order``, give ``shots`` support
        ratings and then the query ratings."""
        items, values = self.ratings_of(user)
        items, values = items[order], values[order]
        x = self.features(self.data.user_features[user], items)
        y = torch.from_numpy(values.astype(np.float32)).unsqueeze(1)
        ids = torch.from_numpy(items)
        return RatingTask(x[:shots], y[:shots], x[shots:], y[shots:], torch.empty(0, dtype=torch.int64),
                          user=int(user), support_items=ids[:shots], query_items=ids[shots:])

    def checkpoint_extra(self) -> dict:
        """What a checkpoint keeps to meet the same users and read new ones (``kshot recommend``)."""
        return {"ratings": {"dataset": self.data.name, "user_split": self.user_split.to_dict(),
                            "feature_columns": list(FEATURE_COLUMNS), "genres": list(self.data.genre_names),
                            "occupations": list(self.data.occupation_names), "n_items": self.data.n_items,
                            "train_mean": self.train_mean}}


class RatingTasks(TaskSource):
    """Training tasks: task ``(step, index)`` is a user of the split drawn uniformly, with
    ``shots`` support ratings and up to ``queries`` query ratings (0: all the others) drawn at
    random from theirs; a pure function of ``(seed, step, index)``.
    """

    loss = "mse"

    def __init__(self, ratings: UserRatings, shots: int, queries: int = 0, seed: int = 0,
                 meta_batch_size: int = 1):
        if shots < 1 or queries < 0 or meta_batch_size < 1:
            raise ConfigError(f"rating tasks need shots >= 1, queries >= 0 and meta_batch_size >= 1, "
                              f"not {shots}, {queries}, {meta_batch_size}")
        self.ratings, self.shots, self.queries = ratings, int(shots), int(queries)
        self.seed, self.meta_batch_size = int(seed), int(meta_batch_size)
        self.users = ratings.users[ratings.counts > shots]
        if not len(self.users):
            raise DataError(f"no {ratings.split} user of {ratings.data.name} has more than {shots} ratings; "
                            f"lower --shots")

    def __repr__(self) -> str:
        return (f"RatingTasks({self.ratings.data.name} {self.ratings.split}: {len(self.users)} users, "
                f"{self.shots} support ratings, {self.queries or 'all other'} query ratings, seed={self.seed})")

    @property
    def dataset(self) -> UserRatings:
        return self.ratings

    def task(self, step: int, index: int = 0) -> RatingTask:
        rng = np.random.default_rng([self.seed, int(step), int(index)])
        user = int(self.users[min(int(rng.random() * len(self.users)), len(self.users) - 1)])
        n = int(self.ratings.offsets[user + 1] - self.ratings.offsets[user])
        keys = rng.random(n)
        take = n if not self.queries else min(n, self.shots + self.queries)
        return self.ratings.task(user, smallest_keys(keys, take), self.shots)


class UserTasks(Sequence[RatingTask]):
    """A fixed evaluation set: one task per user of the split who has ``shots + MIN_QUERY``
    ratings, in user-id order; see the module docstring for how support and query are drawn.

    Args:
        ratings: the split's users.
        shots: support ratings per user.
        seed: the ordering of each user's ratings is ``default_rng([seed, user id])``.
        max_users: evaluate only the first this many users (0: all).
    """

    def __init__(self, ratings: UserRatings, shots: int, seed: int = EVAL_SEED, max_users: int = 0,
                 min_query: int = MIN_QUERY):
        if shots < 1:
            raise ConfigError(f"a user's support set needs at least one rating, not {shots}")
        self.ratings, self.shots, self.seed, self.min_query = ratings, int(shots), int(seed), int(min_query)
        keep = ratings.counts >= shots + min_query
        self.users = ratings.users[keep]
        self.skipped = int((~keep).sum())
        if max_users:
            self.users = self.users[:max_users]
        if not len(self.users):
            raise DataError(f"no {ratings.split} user of {ratings.data.name} has {shots + min_query} ratings "
                            f"({shots} support + {min_query} query); lower --shots")

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        user = int(self.users[i])
        n = int(self.ratings.offsets[user + 1] - self.ratings.offsets[user])
        keys = np.random.default_rng([self.seed, int(self.ratings.data.user_ids[user])]).random(n)
        return self.ratings.task(user, np.argsort(keys, kind="stable"), self.shots)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def rating_counts(self) -> np.ndarray:
        """Each evaluated user's number of ratings (support + query), ``[n_users]``."""
        return self.ratings.offsets[self.users + 1] - self.ratings.offsets[self.users]

    def describe(self) -> str:
        skipped = f"; {self.skipped} users with fewer ratings left out" if self.skipped else ""
        return (f"{len(self)} {self.ratings.split} users of {self.ratings.data.name}, {self.shots} support "
                f"ratings each, all their other ratings as query{skipped}")


# ----------------------------------------------------------------------------- from a config
def load_user_ratings(name: str, split: str, data_dir: str | None = None, cache_dir: str | None = None,
                      split_file: str = "", split_seed: int = USER_SPLIT_SEED,
                      split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
                      users: dict | None = None, download: bool = True) -> UserRatings:
    """Split ``split`` of rating dataset ``name``.

    ``users`` is a saved user split (a checkpoint's record), which wins over ``split_file``;
    otherwise the split is read from, or drawn and written to, ``split_file`` (default: a file
    in the cache directory named after the split seed).
    """
    if not is_rating_dataset(name):
        raise ConfigError(f"{name!r} is not a rating dataset; choose one of {', '.join(RELEASES)}")
    data = load_movielens(name, data_dir=data_dir or None, cache_dir=cache_dir or None, download=download)
    if users is not None:
        split_users = ClassSplit(users.get("train", []), users.get("val", []), users.get("test", []),
                                 origin=users.get("origin", {}))
    else:
        path = split_file or default_split_file(name, int(split_seed), cache_dir or None)
        split_users = user_split(data, path, int(split_seed), split_fractions)
    return UserRatings(data, split, split_users)


def ratings_from_config(config, split: str, extra: dict | None = None) -> UserRatings:
    """A :class:`~kshot.config.TrainConfig`'s rating data for ``split`` (``extra``: a
    checkpoint's record, whose saved user split is then used)."""
    saved = ((extra or {}).get("ratings") or {}).get("user_split")
    settings = dict(config.extra)
    unknown = set(settings) - {"split_seed", "split_fractions"}
    if unknown:
        raise ConfigError(f"unknown extra settings {sorted(unknown)} for {config.dataset}; it takes "
                          f"split_seed and split_fractions")
    return load_user_ratings(config.dataset, split, data_dir=config.data_dir or None,
                             cache_dir=config.cache_dir or None, split_file=config.split_file,
                             users=saved, **settings)
