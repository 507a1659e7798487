"""A new user's ratings -> their top-N unseen movies: what ``kshot recommend`` does.

The user writes a CSV of movies they rated (a movie id of the release, or a title) and their
ratings; the meta-learned model adapts its decision layers to those ratings (the user is its
support set), then predicts a rating for every movie the user has not rated, and the best N are
the recommendations. Titles are matched robustly: case, accents, punctuation, a leading or
trailing article ("The Usual Suspects" is "Usual Suspects, The (1995)") and the year are
normalised away; a year given picks among remakes; what matches nothing exactly is matched to
the closest title when it is close, and reported. Unknown movies are reported in one line and
left out.

The CSV is untrusted input: at most ``MAX_CSV_BYTES`` and ``MAX_ROWS`` rows, ratings 0.5-5.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kshot.config import config_from_dict
from kshot.errors import CheckpointError, ConfigError, DataError
from kshot.learners import create_learner
from kshot.learners.base import Learner
from kshot.models import create_model
from kshot.recsys.movielens import GENDERS, MovieLens, age_group, zip_area
from kshot.recsys.users import UserRatings, ratings_from_config
from kshot.services.checkpoint import Checkpoint, load_checkpoint
from kshot.services.files import atomic_write_text

MAX_CSV_BYTES = 2**20
MAX_ROWS = 10_000
RATING_RANGE = (0.5, 5.0)
#: Closest-title matches below this similarity (difflib ratio) count as unknown.
FUZZY_CUTOFF = 0.88
_ARTICLES = {"the", "a", "an", "les", "la", "le", "l", "il", "el", "der", "die", "das", "los", "las", "lo"}
_MOVIE_COLUMNS = ("movie_id", "movieid", "item_id", "itemid", "movie", "item", "id", "title", "name")
_RATING_COLUMNS = ("rating", "ratings", "stars", "score")


def _plain(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return re.sub(r"(?<=\w)['\u2019](?=\w)", "", text)  # "schindler's" -> "schindlers"


def _words(text: str) -> str:
    words = re.sub(r"[^0-9a-z]+", " ", text).split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def title_keys(title: str) -> tuple[list[str], int]:
    """Normalised keys of a title (the title itself and any parenthesised alternative) and its
    year (0 if none): ``"Seven (Se7en) (1995)"`` -> ``(["seven se7en", "seven", "se7en"], 1995)``."""
    text = _plain(title).strip()
    year = 0
    match = re.search(r"\((\d{4})\)\s*$", text)
    if match:
        year, text = int(match.group(1)), text[:match.start()].strip()
    # "Usual Suspects, The" -> "The Usual Suspects" (also in alternatives: "(Cité des enfants, La)")
    text = re.sub(r"([^(),]+), (the|a|an|les|la|le|l'|il|el|der|die|das|los|las)(?=\s*(\(|$))",
                  lambda m: f"{m.group(2)} {m.group(1)}", text)
    keys = [_words(text)]
    main = re.sub(r"\([^)]*\)", " ", text)
    keys.append(_words(main))
    keys += [_words(alt) for alt in re.findall(r"\(([^)]*)\)", text)]
    unique = []
    for key in keys:
        if key and key not in unique:
            unique.append(key)
    return unique, year


class TitleIndex:
    """Finds a release's items by title, robustly (see the module docstring)."""

    def __init__(self, data: MovieLens):
        self.data = data
        self.popularity = np.bincount(data.rating_item, minlength=data.n_items)
        self.index: dict[str, list[int]] = {}
        for item, title in enumerate(data.titles):
            for key in title_keys(title)[0]:
                self.index.setdefault(key, []).append(item)
        self._keys = list(self.index)

    def find(self, title: str) -> tuple[int, bool] | None:
        """``(dense item, exact)`` for ``title``, or None; among equals, the given year decides,
        then the most-rated item."""
        keys, year = title_keys(title)
        for key in keys:
            if key in self.index:
                return self._pick(self.index[key], year), True
        for key in keys:
            close = difflib.get_close_matches(key, self._keys, n=1, cutoff=FUZZY_CUTOFF)
            if close:
                return self._pick(self.index[close[0]], year), False
        return None

    def _pick(self, items: list[int], year: int) -> int:
        if year:
            same = [i for i in items if self.data.years[i] == year]
            items = same or items
        return max(items, key=lambda i: (self.popularity[i], -i))


@dataclass
class NewUserRatings:
    """A new user's ratings, matched to the release's items.

    Attributes:
        items, ratings: dense item indices ``[k]`` and their ratings ``[k]``.
        unknown: the entries that matched no movie.
        approximate: ``(given, matched title)`` for titles matched to the closest one.
        repeated: entries naming a movie already rated earlier in the file (the last one counts).
    """

    items: np.ndarray
    ratings: np.ndarray
    unknown: list[str] = field(default_factory=list)
    approximate: list[tuple[str, str]] = field(default_factory=list)
    repeated: int = 0

    def notes(self) -> list[str]:
        """One line per kind of problem met while reading (none when all matched exactly)."""
        out = []
        if self.unknown:
            shown = ", ".join(repr(u) for u in self.unknown[:8])
            more = f" and {len(self.unknown) - 8} more" if len(self.unknown) > 8 else ""
            out.append(f"{len(self.unknown)} movies not found, left out: {shown}{more}")
        if self.approximate:
            shown = "; ".join(f"{a!r} -> {b!r}" for a, b in self.approximate[:5])
            out.append(f"{len(self.approximate)} titles matched approximately: {shown}")
        if self.repeated:
            out.append(f"{self.repeated} movies rated twice: the last rating counts")
        return out


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_rating(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return RATING_RANGE[0] <= value <= RATING_RANGE[1]


def read_user_ratings(path: str | os.PathLike, data: MovieLens) -> NewUserRatings:
    """Read a CSV of a new user's ratings: a movie column (id or title) and a rating column.

    With a header, the columns are found by name (``movie_id``/``item_id``/``movie``/``title``
    and ``rating``); without one, the first column is the movie and the second the rating.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"ratings file {path} not found")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(f"ratings file {path} is over {MAX_CSV_BYTES // 1024} KB; a new user's ratings "
                        f"are a few lines: movie,rating")
    try:
        rows = [r for r in csv.reader(io.StringIO(_decode(path.read_bytes()))) if any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"ratings file {path} is not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"ratings file {path} is empty; write one line per movie: movie,rating")
    header = [c.strip().lower() for c in rows[0]]
    if len(rows[0]) >= 2 and _is_rating(rows[0][1].strip()):
        movie_col, rating_col, body, first = 0, 1, rows, 1
    else:
        movie_col = next((header.index(c) for c in _MOVIE_COLUMNS if c in header), None)
        rating_col = next((header.index(c) for c in _RATING_COLUMNS if c in header), None)
        if movie_col is None or rating_col is None:
            raise DataError(f"ratings file {path}: need a movie column (movie_id, movie or title) and a "
                            f"rating column; the header has {', '.join(repr(h) for h in header[:6])}")
        body, first = rows[1:], 2
    if len(body) > MAX_ROWS:
        raise DataError(f"ratings file {path} has {len(body)} rows; at most {MAX_ROWS} are read")
    ids = {int(i): n for n, i in enumerate(data.item_ids)}
    titles = TitleIndex(data)
    chosen: dict[int, float] = {}
    unknown, approximate, repeated = [], [], 0
    for line, row in enumerate(body, start=first):
        if len(row) <= max(movie_col, rating_col):
            raise DataError(f"ratings file {path} line {line}: expected a movie and a rating")
        movie, rating = row[movie_col].strip(), row[rating_col].strip()
        if not _is_rating(rating):
            raise DataError(f"ratings file {path} line {line}: rating {rating[:20]!r} is not a number "
                            f"from {RATING_RANGE[0]:g} to {RATING_RANGE[1]:g}")
        if movie.isdigit():
            item = ids.get(int(movie))
        else:
            found = titles.find(movie)
            item = None if found is None else found[0]
            if found is not None and not found[1]:
                approximate.append((movie, data.titles[found[0]]))
        if item is None:
            unknown.append(movie[:60])
            continue
        repeated += item in chosen
        chosen[item] = float(rating)
    items = np.array(list(chosen), dtype=np.int64)
    return NewUserRatings(items, np.array(list(chosen.values()), dtype=np.float32), unknown, approximate,
                          repeated)


def user_codes(data: MovieLens, age: int | None = None, gender: str | None = None,
               occupation: str | None = None, zip_code: str | None = None) -> np.ndarray:
    """The feature codes ``[4]`` of a new user; what is not given is unknown (0)."""
    codes = np.zeros(4, dtype=np.int64)
    if age is not None:
        if not 1 <= age <= 120:
            raise ConfigError(f"--age {age}: give an age in years")
        codes[0] = age_group(age)
    if gender:
        if gender.upper()[:1] not in GENDERS:
            raise ConfigError(f"--gender {gender!r}: give M or F")
        codes[1] = GENDERS.index(gender.upper()[:1]) + 1
    if occupation:
        names = [n.lower() for n in data.occupation_names]
        if occupation.lower() not in names:
            raise ConfigError(f"--occupation {occupation!r} is not one of {data.name}'s: {', '.join(data.occupation_names)}")
        codes[2] = names.index(occupation.lower()) + 1
    if zip_code:
        codes[3] = zip_area(zip_code)
    return codes


@dataclass
class Recommendations:
    """A user's top-N unseen movies. Rows in rank order: release id, title, predicted rating."""

    movie_ids: list[int]
    titles: list[str]
    predicted: list[float]
    user: NewUserRatings

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["rank", "movie_id", "title", "predicted_rating"])
        for rank, (mid, title, p) in enumerate(zip(self.movie_ids, self.titles, self.predicted), start=1):
            writer.writerow([rank, mid, title, f"{p:.3f}"])
        return out.getvalue()

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the CSV atomically: the file appears whole or not at all."""
        path = Path(path)
        if path.is_dir():
            raise DataError(f"--out {path} is a folder; give a file name such as {path / 'recommendations.csv'}")
        try:
            atomic_write_text(path, self.to_csv())
        except OSError as e:
            raise DataError(f"cannot write the recommendations to {path} ({e.strerror or e})") from None
        return path

    def lines(self) -> list[str]:
        width = len(str(len(self.titles)))
        return [f"{rank:>{width}}. {p:.2f}  {title}" for rank, (title, p)
                in enumerate(zip(self.titles, self.predicted), start=1)]


#: Recommend only movies rated by at least this many meta-training users by default: a
#: prediction for a movie hardly anyone rated rests on its genres and year alone.
MIN_RATINGS = 10


def recommend_for(learner: Learner, ratings: UserRatings, user: NewUserRatings, codes: np.ndarray,
                  top: int = 10, min_ratings: int = MIN_RATINGS, batch_size: int = 4096) -> Recommendations:
    """Adapt ``learner`` to ``user``'s ratings and rank every movie they have not rated (and
    that at least ``min_ratings`` meta-training users rated).

    Args:
        learner: a trained rating learner (its model takes :class:`UserRatings` features).
        ratings: any split of the release the learner was trained on (for item features).
        user: the new user's ratings (the support set).
        codes: the user's feature codes ``[4]`` (:func:`user_codes`).
        top: how many movies to return.
        min_ratings: leave out movies fewer meta-training users rated.
    """
    if top < 1:
        raise ConfigError(f"--top must be at least 1, not {top}")
    if min_ratings < 0:
        raise ConfigError(f"--min-ratings must not be negative, not {min_ratings}")
    if not len(user.items):
        raise DataError("none of the rated movies was found in the release; nothing to adapt to")
    data = ratings.data
    device = next(learner.parameters()).device
    support_x = ratings.features(codes, user.items).to(device)
    support_y = torch.from_numpy(user.ratings).unsqueeze(1).to(device)
    rated = np.isin(data.rating_user, ratings.user_split_indices("train"))
    popular = np.bincount(data.rating_item[rated], minlength=data.n_items) >= min_ratings
    unseen = np.setdiff1d(np.flatnonzero(popular), user.items)
    if not len(unseen):
        raise DataError(f"no unrated movie has {min_ratings} ratings by the training users; lower --min-ratings")
    learner.eval()
    with torch.no_grad():  # the inner loop enables gradients for itself
        predictor = learner.adapt(support_x, support_y, 0)
        scores = torch.cat([predictor(ratings.features(codes, unseen[i:i + batch_size]).to(device)).reshape(-1).cpu()
                            for i in range(0, len(unseen), batch_size)]).numpy()
    scores = np.clip(scores, 1.0, 5.0)
    order = np.argsort(-scores, kind="stable")[:top]
    picked = unseen[order]
    return Recommendations([int(data.item_ids[i]) for i in picked], [data.titles[i] for i in picked],
                           [float(s) for s in scores[order]], user)


def rating_learner_from_checkpoint(ckpt: Checkpoint) -> Learner:
    """The trained rating learner a checkpoint holds (a CheckpointError if it holds another kind)."""
    if "ratings" not in (ckpt.extra or {}):
        raise CheckpointError(f"the checkpoint holds a {ckpt.learner.get('algo')!r} learner trained on "
                              f"{(ckpt.config or {}).get('dataset', 'other data')}, not a rating model; train "
                              f"one with --preset melu-movielens-100k")
    spec = ckpt.learner
    try:
        learner = create_learner(spec["algo"], create_model(spec["model"]["name"], **spec["model"]["kwargs"]),
                                 **spec.get("options", {}))
        learner.load_state_dict(ckpt.state_dict)
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the checkpoint does not match the learner it describes "
                              f"({str(e).splitlines()[0][:160]})") from None
    return learner.eval()


def recommend(checkpoint: str | os.PathLike, ratings_csv: str | os.PathLike, top: int = 10, *,
              age: int | None = None, gender: str | None = None, occupation: str | None = None,
              zip_code: str | None = None, min_ratings: int = MIN_RATINGS, data_dir: str | None = None,
              cache_dir: str | None = None, device: str | torch.device = "cpu") -> Recommendations:
    """A new user's top-``top`` unseen movies from their ratings in ``ratings_csv``: what
    ``kshot recommend`` does.

    The checkpoint's release is read again for the movies' features and titles (from
    ``data_dir``, else where the run read it); the user's age, gender, occupation and zip code
    are optional (unknown otherwise).
    """
    ckpt = load_checkpoint(checkpoint)
    learner = rating_learner_from_checkpoint(ckpt).to(device)
    config = config_from_dict(ckpt.config)
    if data_dir is not None:
        config.data_dir = data_dir
    if cache_dir is not None:
        config.cache_dir = cache_dir
    ratings = ratings_from_config(config, "train", ckpt.extra)
    if ratings.data.n_items != ckpt.extra["ratings"].get("n_items"):
        raise CheckpointError(f"the checkpoint was trained on {ckpt.extra['ratings'].get('n_items')} movies, but "
                              f"{ratings.data.source} has {ratings.data.n_items}; point --data-dir at its release")
    user = read_user_ratings(ratings_csv, ratings.data)
    codes = user_codes(ratings.data, age, gender, occupation, zip_code)
    return recommend_for(learner, ratings, user, codes, top, min_ratings)

