"""What a practitioner would use instead of a meta-learned model, as rating predictors on the
same user tasks (:mod:`kshot.recsys.evaluation`):

* :class:`ItemMean`: each item's mean rating by the meta-training users.
* :func:`fit_global_model`: MeLU's model trained as *one* model for every user (plain regression
  on all meta-training ratings); :func:`global_predictor` uses it as it is (no adaptation),
  :func:`fine_tuned_learner` fine-tunes its decision layers on each user's support ratings with
  kshot's inner loop (the same steps a meta-learned model takes, from a model not trained for
  them).
* :class:`SurpriseSVD`: matrix factorisation (Funk SVD, scikit-surprise, ``pip install
  'kshot[recsys]'``) fitted on the meta-training users' ratings plus every test user's support
  ratings: what collaborative filtering can do for a user with that few ratings.
"""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kshot.errors import ConfigError
from kshot.learners import MAML
from kshot.recsys.evaluation import RatingPredictor, adapted_predictor, score_users
from kshot.recsys.model import DECISION_LAYERS, MeLU, rating_model
from kshot.recsys.users import RatingTask, UserRatings, UserTasks


class ItemMean:
    """Predicts each query item's mean rating among the meta-training users (their overall
    mean for an item none of them rated)."""

    def __init__(self, train: UserRatings):
        data = train.data
        rated = np.isin(data.rating_user, train.users)
        sums = np.bincount(data.rating_item[rated], weights=data.rating[rated], minlength=data.n_items)
        counts = np.bincount(data.rating_item[rated], minlength=data.n_items)
        self.global_mean = float(data.rating[rated].mean())
        self.means = np.where(counts > 0, sums / np.maximum(counts, 1), self.global_mean)

    def __call__(self, task: RatingTask) -> np.ndarray:
        return self.means[task.query_items.numpy()]


def all_ratings(ratings: UserRatings) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rating of the split's users as model input ``[n, F]`` and targets ``[n, 1]``."""
    xs, ys = [], []
    for user in ratings.users:
        items, values = ratings.ratings_of(int(user))
        xs.append(ratings.features(ratings.data.user_features[user], items))
        ys.append(torch.from_numpy(values.astype(np.float32)))
    return torch.cat(xs), torch.cat(ys).unsqueeze(1)


def query_mse(predict: RatingPredictor, tasks: UserTasks) -> float:
    """Mean over users of the squared error on their query ratings (model selection)."""
    return float(np.mean(score_users(predict, tasks).values["rmse"] ** 2))


def fit_global_model(train: UserRatings, val: UserTasks | None = None, epochs: int = 20, lr: float = 1e-3,
                     batch_size: int = 256, seed: int = 0, progress: bool = False,
                     **model_options) -> tuple[MeLU, dict]:
    """MeLU's rating model trained on every rating of the meta-training users at once.

    Adam on shuffled mini-batches, MSE; after each epoch the model is scored (unadapted) on the
    ``val`` users' query ratings and the best epoch is kept.

    Returns:
        The model (eval mode) and a record: epochs, the best epoch and its validation MSE.
    """
    torch.manual_seed(seed)
    model = rating_model(train, **model_options)
    x, y = all_ratings(train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history = []
    for epoch in tqdm(range(1, epochs + 1), desc="global model", disable=not progress, leave=False):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(model(x[batch]), y[batch]).backward()
            optimizer.step()
        model.eval()
        if val is None:
            best = (float("nan"), epoch, copy.deepcopy(model.state_dict()))
            continue
        mse = query_mse(global_predictor(model), val)
        history.append(mse)
        if mse < best[0]:
            best = (mse, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model.eval(), {"epochs": epochs, "best_epoch": best[1], "val_mse": best[0], "val_history": history}


def global_predictor(model: MeLU) -> RatingPredictor:
    """The global model's predictions, the same for every user with the same features."""
    def predict(task: RatingTask) -> np.ndarray:
        with torch.no_grad():
            return model(task.query_x).reshape(-1).numpy()
    return predict


def fine_tuned_learner(model: MeLU, steps: int, lr: float) -> MAML:
    """The global model wrapped for fine-tuning: ``steps`` gradient steps of ``lr`` on each
    user's support ratings, of its decision layers, through kshot's inner loop."""
    return MAML(copy.deepcopy(model), inner_steps=steps, inner_lr=lr, loss="mse", first_order=True,
                inner_params=DECISION_LAYERS).eval()


def choose_fine_tuning(model: MeLU, val: UserTasks, steps: int = 5,
                       lrs=(0.003, 0.01, 0.03, 0.1, 0.3)) -> tuple[float, dict[float, float]]:
    """The fine-tuning learning rate with the lowest query MSE on the validation users."""
    found = {lr: query_mse(adapted_predictor(fine_tuned_learner(model, steps, lr)), val) for lr in lrs}
    return min(found, key=found.get), found  # type: ignore[arg-type]


class SurpriseSVD:
    """scikit-surprise's SVD fitted on the meta-training users' ratings and the support ratings
    of every task in ``tasks``; predicts each task's query ratings.

    Args:
        train: the meta-training users.
        tasks: the users to predict for (their support ratings join the fit).
        seed: the factorisation's random state.
        options: SVD's own settings (default: surprise's, 100 factors, 20 epochs).
    """

    def __init__(self, train: UserRatings, tasks: UserTasks, seed: int = 0, **options):
        try:
            from surprise import SVD, Dataset, Reader
        except ImportError:
            raise ConfigError("the SVD baseline needs scikit-surprise: pip install 'kshot[recsys]'") from None
        lines = []
        for user in train.users:
            items, values = train.ratings_of(int(user))
            lines += [f"u{user}\ti{i}\t{v:g}" for i, v in zip(items.tolist(), values.tolist())]
        for task in tasks:
            lines += [f"u{task.user}\ti{i}\t{v:g}" for i, v in
                      zip(task.support_items.tolist(), task.support_y.reshape(-1).tolist())]
        fd, path = tempfile.mkstemp(suffix=".tsv")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            reader = Reader(line_format="user item rating", sep="\t", rating_scale=(1, 5))
            trainset = Dataset.load_from_file(path, reader=reader).build_full_trainset()
        finally:
            os.unlink(path)
        self.algo = SVD(random_state=seed, **options)
        self.algo.fit(trainset)

    def __call__(self, task: RatingTask) -> np.ndarray:
        return np.array([self.algo.predict(f"u{task.user}", f"i{i}").est for i in task.query_items.tolist()])
