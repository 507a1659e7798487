"""The rating model of MeLU (Lee, Im, Jang, Cho and Chung, KDD 2019, "MeLU: Meta-Learned User
Preference Estimator for Cold-Start Recommendation"): embeddings of user and item features,
concatenated, then fully connected *decision layers* that output the rating.

MeLU meta-learns all of it and adapts only the decision layers to each user (its "local
update"); the embeddings are shared by every user (its "global update" alone changes them). In
kshot that is any gradient learner of :mod:`kshot.learners` with ``inner_params="decision"``
and the MSE loss (:func:`rating_learner`): the inner loop is kshot's own, not a copy.

The paper's item features are MPAA rating, genres, director and actors (scraped from IMDb); the
MovieLens releases have genres and the release year, so those are used, plus a learned embedding
of the item itself (zero for an item no training user rated, which then counts by its features
alone). User features: age group, gender, occupation, zip area. Every feature code 0 (unknown)
embeds to zero and stays so.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kshot.config import TrainConfig, register_preset
from kshot.errors import ConfigError
from kshot.learners import LEARNERS
from kshot.learners.inner_loop import GradientLearner
from kshot.models import create_model, register_model
from kshot.recsys.users import UserRatings

#: The parameters MeLU adapts to each user.
DECISION_LAYERS = "decision"


class MeLU(nn.Module):
    """Predicts ratings ``[n, 1]`` from integer codes ``[n, 6 + n_genres]`` (see
    :mod:`kshot.recsys.users` for the columns).

    Args:
        n_ages, n_genders, n_occupations, n_zip_areas, n_items, n_years, n_genres: how many codes
            each feature has (code 0, unknown, comes on top).
        embedding_dim: width of each feature's embedding (MeLU: 32).
        hidden: widths of the hidden decision layers (MeLU: 64, 64).
        rating_offset: initial bias of the output (the training users' mean rating).
    """

    USER_FEATURES = ("age", "gender", "occupation", "zip_area")

    def __init__(self, n_ages: int, n_genders: int, n_occupations: int, n_zip_areas: int, n_items: int,
                 n_years: int, n_genres: int, embedding_dim: int = 32, hidden: Sequence[int] = (64, 64),
                 rating_offset: float = 3.5):
        super().__init__()
        sizes = dict(age=n_ages, gender=n_genders, occupation=n_occupations, zip_area=n_zip_areas)
        self.user_embeddings = nn.ModuleDict({name: nn.Embedding(n + 1, embedding_dim, padding_idx=0)
                                              for name, n in sizes.items()})
        self.item_embedding = nn.Embedding(n_items + 1, embedding_dim, padding_idx=0)
        nn.init.zeros_(self.item_embedding.weight)  # an item no one rated in training: features only
        self.year_embedding = nn.Embedding(n_years + 1, embedding_dim, padding_idx=0)
        self.genre_embedding = nn.Linear(n_genres, embedding_dim, bias=False)
        self.n_genres = n_genres
        layers: list[nn.Module] = []
        width = 7 * embedding_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.decision = nn.Sequential(*layers)
        nn.init.constant_(self.decision[-1].bias, float(rating_offset))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated feature embeddings ``[n, 7 * embedding_dim]`` of codes ``x [n, F]``."""
        if x.dim() != 2 or x.shape[1] != 6 + self.n_genres:
            raise ConfigError(f"MeLU takes codes of shape [n, {6 + self.n_genres}], not {list(x.shape)}")
        x = x.long()
        users = [self.user_embeddings[name](x[:, i]) for i, name in enumerate(self.USER_FEATURES)]
        genres = x[:, 6:].float()
        genres = genres / genres.sum(1, keepdim=True).clamp(min=1)
        return torch.cat(users + [self.item_embedding(x[:, 4]), self.year_embedding(x[:, 5]),
                                  self.genre_embedding(genres)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decision(self.embed(x))


@register_model
def melu(n_ages: int = 7, n_genders: int = 2, n_occupations: int = 21, n_zip_areas: int = 11,
         n_items: int = 1682, n_years: int = 81, n_genres: int = 19, embedding_dim: int = 32,
         hidden: Sequence[int] = (64, 64), rating_offset: float = 3.5) -> MeLU:
    """MeLU's rating model (kshot.recsys.model.MeLU); sizes default to MovieLens-100k's."""
    return MeLU(n_ages, n_genders, n_occupations, n_zip_areas, n_items, n_years, n_genres,
                embedding_dim, list(hidden), rating_offset)


def rating_model(ratings: UserRatings, **options) -> MeLU:
    """A new MeLU model sized for ``ratings``' release, starting at its training users' mean."""
    kwargs = {**ratings.data.feature_sizes(), "rating_offset": round(ratings.train_mean, 6), **options}
    return create_model("melu", **kwargs)  # type: ignore[return-value]


def rating_learner(config: TrainConfig, ratings: UserRatings) -> GradientLearner:
    """The config's gradient learner (maml, fomaml, metasgd, anil, reptile) around a new rating
    model, with the MSE loss; its inner loop adapts ``config.inner_params``."""
    cls = LEARNERS.get(config.algo)
    if cls is None or not issubclass(cls, GradientLearner):
        gradient = sorted(n for n, c in LEARNERS.items() if issubclass(c, GradientLearner))
        raise ConfigError(f"--algo {config.algo}: rating models adapt by gradient steps; choose one of "
                          f"{', '.join(gradient)}")
    if config.backbone != "melu":
        raise ConfigError(f"--backbone {config.backbone}: rating datasets use the melu rating model")
    torch.manual_seed(config.seed)
    model = rating_model(ratings, **config.backbone_options)
    options = {name: getattr(config, name) for name in cls.config_options}
    return cls(model, loss="mse", **options)


# ----------------------------------------------------------------------------- presets
def _melu(dataset: str, shots: int, algo: str = "maml") -> dict:
    # MeLU (Lee et al. 2019): 32-d feature embeddings, decision layers 64-64-1 adapted per user by
    # 5 local steps, meta-batches of 32 users, Adam. The paper's local rate (5e-6) barely moves
    # the model; 0.01 was chosen on the meta-validation users. Query: up to 20 other ratings.
    return dict(algo=algo, dataset=dataset, backbone="melu", inner_params=DECISION_LAYERS,
                ways=1, shots=shots, queries=20, test_shots=shots, meta_batch_size=32, inner_steps=5,
                inner_lr=0.01, test_inner_steps=5, optimizer="adam", lr=1e-3, lr_schedule="constant",
                steps=500, val_every=100, val_tasks=1000, checkpoint_every=100, log_every=20,
                test_tasks=1000, threads=1)


for _shots in (5, 10, 20):
    register_preset(f"melu-movielens-100k-{_shots}shot",
                    f"MeLU (MAML on decision layers) for new MovieLens-100k users with {_shots} ratings "
                    f"(kshot's setting; docs/RECSYS.md)", _melu("movielens-100k", _shots))
    register_preset(f"melu-movielens-1m-{_shots}shot",
                    f"MeLU for new MovieLens-1M users with {_shots} ratings (kshot's setting)",
                    {**_melu("movielens-1m", _shots), "steps": 2000, "val_every": 250, "checkpoint_every": 250})
register_preset("melu-movielens-100k", "MeLU for new MovieLens-100k users with 10 ratings (= melu-movielens-100k-10shot)",
                _melu("movielens-100k", 10))

