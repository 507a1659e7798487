"""MovieLens (Harper and Konstan 2015): the GroupLens rating releases ml-100k and ml-1m, parsed
from their official files into users, items and ratings.

* ``movielens-100k``: ``u.data`` (user, item, rating 1-5, timestamp; tab-separated), ``u.user``
  (id|age|gender|occupation|zip), ``u.item`` (id|title|release date|video date|IMDb URL|19
  genre flags, latin-1), ``u.genre``, ``u.occupation``, ``u.info`` (the counts).
* ``movielens-1m``: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
  (UserID::Gender::Age::Occupation::Zip-code, ages and occupations as the README's codes) and
  ``movies.dat`` (MovieID::Title::Genres, genres joined by ``|``, latin-1).

The licence forbids redistribution, so kshot never ships the files: they are read from the data
directory (the release's folder, e.g. ``<data>/movielens-100k/u.data``, or its official zip),
and for users the official zip is downloaded from GroupLens and checked against its published
MD5 (:mod:`kshot.data.archives`). Every file is untrusted input: sizes are bounded, every field
is checked, and a bad line is a one-line :class:`~kshot.errors.DataError` naming file and line.

Users and items get dense indices ``0..n-1`` (their ids are kept); their features are small
categorical codes in which 0 means "unknown", so that a new user who gives no age or occupation,
or an item the training users never rated, has a well-defined input.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from kshot.data.archives import RemoteFile, cache_dir as resolve_cache_dir, data_dir as resolve_data_dir
from kshot.data.archives import find_archive, open_zip, safe_extract
from kshot.errors import DataError
from kshot.services.files import file_lock

#: The MovieLens-1M age codes (README), used for both releases: ml-100k's ages fall into them.
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
AGE_NAMES = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("M", "F")
#: Zip areas: the first digit of a US zip code (1-10), anything else (Canadian, ...) is 11.
ZIP_AREAS = 11
#: Release years as codes: 1 for 1920 and before, one per year, 81 for 2000 and after; 0 unknown.
FIRST_YEAR, LAST_YEAR = 1920, 2000
YEAR_BUCKETS = LAST_YEAR - FIRST_YEAR + 1
#: MovieLens-1M's occupation codes 0-20 (its README).
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer",
                    "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
                    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
                    "unemployed", "writer")
ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
               "Thriller", "War", "Western")
#: Largest file kshot reads from a release (ml-1m's ratings.dat is 24 MB).
MAX_FILE_BYTES = 64 * 2**20
#: Largest total an archive may unpack to before kshot refuses it (ml-1m unpacks to ~25 MB).
MAX_ARCHIVE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Release:
    """One MovieLens release: its kshot name, the official zip, the files kshot reads."""

    name: str
    remote: RemoteFile
    top: str  # the folder inside the official zip
    files: tuple[str, ...]


RELEASES = {
    # MD5 sums as GroupLens publishes them beside the zips (ml-100k.zip.md5, ml-1m.zip.md5).
    "movielens-100k": Release("movielens-100k", RemoteFile(
        "ml-100k.zip", "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723"), "ml-100k",
        ("u.data", "u.user", "u.item", "u.genre", "u.occupation")),
    "movielens-1m": Release("movielens-1m", RemoteFile(
        "ml-1m.zip", "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906"), "ml-1m",
        ("ratings.dat", "users.dat", "movies.dat")),
}


@dataclass
class MovieLens:
    """A MovieLens release in arrays. Users and items are dense indices (``user_ids[u]`` and
    ``item_ids[i]`` are the release's own ids).

    Attributes:
        user_features: ``[n_users, 4]`` int64 codes: age group (1-7), gender (1 M, 2 F),
            occupation (1..n_occupations), zip area (1-11); 0 is unknown.
        titles: ``n_items`` titles as released (``"Usual Suspects, The (1995)"``).
        years: ``[n_items]`` release year (0 unknown).
        genres: ``[n_items, n_genres]`` 0/1 flags.
        rating_user, rating_item, rating: ``[n_ratings]`` dense user, dense item, rating (1-5).
        timestamp: ``[n_ratings]`` unix seconds.
    """

    name: str
    user_ids: np.ndarray
    user_features: np.ndarray
    item_ids: np.ndarray
    titles: list[str]
    years: np.ndarray
    genres: np.ndarray
    genre_names: list[str]
    occupation_names: list[str]
    rating_user: np.ndarray
    rating_item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    source: str = ""
    _by_user: tuple | None = field(default=None, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_ratings(self) -> int:
        return len(self.rating)

    def __repr__(self) -> str:
        return (f"MovieLens({self.name}: {self.n_ratings:,} ratings by {self.n_users:,} users of "
                f"{self.n_items:,} items, {len(self.genre_names)} genres, "
                f"{len(self.occupation_names)} occupations)")

    def by_user(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ratings grouped by user: ``(offsets [n_users+1], items, ratings)``; user ``u``'s are
        ``items[offsets[u]:offsets[u+1]]``, in the order of the release's file."""
        if self._by_user is None:
            order = np.argsort(self.rating_user, kind="stable")
            counts = np.bincount(self.rating_user, minlength=self.n_users)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._by_user = (offsets, self.rating_item[order], self.rating[order])
        return self._by_user  # type: ignore[return-value]

    def ratings_per_user(self) -> np.ndarray:
        return np.bincount(self.rating_user, minlength=self.n_users)

    def year_buckets(self) -> np.ndarray:
        """``[n_items]`` codes of the release years (see :data:`YEAR_BUCKETS`)."""
        return year_bucket(self.years)

    def feature_sizes(self) -> dict[str, int]:
        """How many codes each feature has (0, unknown, not counted): the rating model's sizes."""
        return {"n_ages": len(AGE_GROUPS), "n_genders": len(GENDERS),
                "n_occupations": len(self.occupation_names), "n_zip_areas": ZIP_AREAS,
                "n_items": self.n_items, "n_years": YEAR_BUCKETS, "n_genres": len(self.genre_names)}


def year_bucket(years: np.ndarray) -> np.ndarray:
    """Year codes: 0 unknown, 1 for 1920 and before, ..., 81 for 2000 and after."""
    years = np.asarray(years, dtype=np.int64)
    return np.where(years > 0, np.clip(years, FIRST_YEAR, LAST_YEAR) - FIRST_YEAR + 1, 0)


def age_group(age: int) -> int:
    """The MovieLens-1M age group code (1-7) of an age in years (0: unknown)."""
    if age <= 0:
        return 0
    return int(np.searchsorted(np.array(AGE_GROUPS[1:]), age, side="right")) + 1


def zip_area(zip_code: str) -> int:
    """1-10 for a US zip code's first digit (0-9), 11 for anything else, 0 when missing."""
    zip_code = zip_code.strip()
    if not zip_code:
        return 0
    return int(zip_code[0]) + 1 if zip_code[0].isdigit() else ZIP_AREAS


# ----------------------------------------------------------------------------- reading
def _read_text(path: Path, encoding: str = "latin-1") -> str:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {size / 2**20:.0f} MB, more than a MovieLens file of this kind "
                        f"can be ({MAX_FILE_BYTES // 2**20} MB); is it the right file?")
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not {encoding} text ({e.reason} at byte {e.start})") from None


def _rows(path: Path, sep: str, n_fields: int, encoding: str = "latin-1",
          header: str | None = None) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-empty line, each with exactly ``n_fields`` fields.

    A first line whose first field is ``header`` (case-insensitive; some copies of the release
    carry a header row) is skipped.
    """
    out = []
    for number, line in enumerate(_read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(sep)
        if number == 1 and header is not None and fields[0].strip().lower() == header.lower():
            continue
        if len(fields) != n_fields:
            raise DataError(f"{path} line {number}: {len(fields)} fields, expected {n_fields} "
                            f"separated by {sep!r}; is it the official MovieLens file?")
        out.append((number, fields))
    if not out:
        raise DataError(f"{path} holds no records")
    return out


def _int(value: str, path: Path, number: int, what: str, low: int | None = None,
         high: int | None = None) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise DataError(f"{path} line {number}: {what} {value.strip()[:40]!r} is not an integer") from None
    if (low is not None and n < low) or (high is not None and n > high):
        raise DataError(f"{path} line {number}: {what} {n} is outside {low}..{high}")
    return n


def _ratings(path: Path, sep: str, users: dict[int, int], items: dict[int, int], header: str):
    """The ratings file as arrays (dense user, dense item, rating, timestamp), checked."""
    text = _read_text(path, "ascii" if sep == "\t" else "latin-1")
    lines = text.splitlines()
    if lines and lines[0].split(sep)[0].strip().lower() == header.lower():
        lines = lines[1:]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no ratings")
    body = "\n".join(lines).replace(sep, "\t") if sep != "\t" else "\n".join(lines)
    try:
        table = np.loadtxt(io.StringIO(body), dtype=np.int64, delimiter="\t", ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a ratings file of integer fields ({str(e).splitlines()[0][:120]})") from None
    if table.shape[1] != 4:
        raise DataError(f"{path}: {table.shape[1]} fields per line, expected 4 (user, item, rating, time)")
    bad = np.flatnonzero((table[:, 2] < 1) | (table[:, 2] > 5))
    if len(bad):
        raise DataError(f"{path}: rating {table[bad[0], 2]} on record {bad[0] + 1} is not 1-5")
    user = _dense(table[:, 0], users, path, "user")
    item = _dense(table[:, 1], items, path, "item")
    pairs = user.astype(np.int64) * (len(items) + 1) + item
    if len(np.unique(pairs)) != len(pairs):
        raise DataError(f"{path}: some user rated the same item twice; the file is not a MovieLens release")
    return user, item, table[:, 2].astype(np.float32), table[:, 3]


def _dense(ids: np.ndarray, index: dict[int, int], path: Path, what: str) -> np.ndarray:
    known = np.array(sorted(index), dtype=np.int64)
    pos = np.searchsorted(known, ids)
    pos = np.clip(pos, 0, len(known) - 1)
    missing = np.flatnonzero(known[pos] != ids)
    if len(missing):
        raise DataError(f"{path}: record {missing[0] + 1} names {what} {ids[missing[0]]}, which the "
                        f"release's {what} file does not list")
    return np.array([index[int(k)] for k in known], dtype=np.int64)[pos]


def _index(ids: list[int], path: Path, what: str) -> dict[int, int]:
    if len(set(ids)) != len(ids):
        raise DataError(f"{path} lists some {what} id twice")
    return {i: n for n, i in enumerate(ids)}


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _year(release_date: str, title: str) -> int:
    """The release year from a date like ``01-Jan-1995``, else from the title's ``(1995)``."""
    match = re.search(r"(\d{4})\s*$", release_date.strip()) or _YEAR.search(title)
    return int(match.group(1)) if match else 0


def parse_ml100k(folder: str | os.PathLike) -> MovieLens:
    """Parse the files of the official ml-100k release in ``folder``."""
    folder = Path(folder)
    genre_rows = _rows(folder / "u.genre", "|", 2)
    genre_names = [None] * len(genre_rows)
    for number, (name, index) in genre_rows:
        i = _int(index, folder / "u.genre", number, "genre index", 0, len(genre_rows) - 1)
        genre_names[i] = name.strip()
    if any(g is None for g in genre_names):
        raise DataError(f"{folder / 'u.genre'} does not number its genres 0..{len(genre_rows) - 1}")
    occupations = [line.strip() for line in _read_text(folder / "u.occupation").splitlines() if line.strip()]
    if len(set(occupations)) != len(occupations) or not occupations:
        raise DataError(f"{folder / 'u.occupation'} must list distinct occupations, one a line")
    occupation_code = {name.lower(): n + 1 for n, name in enumerate(occupations)}

    user_ids, features = [], []
    for number, (uid, age, gender, occupation, zip_code) in _rows(folder / "u.user", "|", 5, header="userid"):
        path = folder / "u.user"
        user_ids.append(_int(uid, path, number, "user id", 1))
        if gender.strip() not in GENDERS:
            raise DataError(f"{path} line {number}: gender {gender.strip()[:10]!r} is not M or F")
        if occupation.strip().lower() not in occupation_code:
            raise DataError(f"{path} line {number}: occupation {occupation.strip()[:30]!r} is not "
                            f"listed in u.occupation")
        features.append((age_group(_int(age, path, number, "age", 1, 120)), GENDERS.index(gender.strip()) + 1,
                         occupation_code[occupation.strip().lower()], zip_area(zip_code)))

    n_genres = len(genre_names)
    item_ids, titles, years, genres = [], [], [], []
    for number, fields in _rows(folder / "u.item", "|", 5 + n_genres, header="movieid"):
        path = folder / "u.item"
        item_ids.append(_int(fields[0], path, number, "movie id", 1))
        titles.append(fields[1].strip())
        years.append(_year(fields[2], fields[1]))
        flags = [_int(f, path, number, "genre flag", 0, 1) for f in fields[5:]]
        genres.append(flags)
    users = _index(user_ids, folder / "u.user", "user")
    items = _index(item_ids, folder / "u.item", "movie")
    user, item, rating, timestamp = _ratings(folder / "u.data", "\t", users, items, header="userid")
    data = MovieLens("movielens-100k", np.array(user_ids), np.array(features, dtype=np.int64),
                     np.array(item_ids), titles, np.array(years, dtype=np.int64),
                     np.array(genres, dtype=np.uint8), genre_names, occupations, user, item, rating,
                     timestamp, source=str(folder))
    _check_info(folder / "u.info", data)
    return data


def _check_info(path: Path, data: MovieLens) -> None:
    """``u.info`` (when present) must give the counts the other files have."""
    if not path.is_file():
        return
    counts = {}
    for line in _read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            counts[parts[1]] = int(parts[0])
    have = {"users": data.n_users, "items": data.n_items, "ratings": data.n_ratings}
    for what, n in counts.items():
        if what in have and have[what] != n:
            raise DataError(f"{path} says {n} {what}, but the files hold {have[what]}; the release is "
                            f"incomplete or altered")


def parse_ml1m(folder: str | os.PathLike) -> MovieLens:
    """Parse the files of the official ml-1m release in ``folder``."""
    folder = Path(folder)
    path = folder / "users.dat"
    user_ids, features = [], []
    for number, (uid, gender, age, occupation, zip_code) in _rows(path, "::", 5, header="userid"):
        user_ids.append(_int(uid, path, number, "user id", 1))
        age_code = _int(age, path, number, "age code")
        if age_code not in AGE_GROUPS:
            raise DataError(f"{path} line {number}: age code {age_code} is not one of {AGE_GROUPS}")
        if gender.strip() not in GENDERS:
            raise DataError(f"{path} line {number}: gender {gender.strip()[:10]!r} is not M or F")
        occupation_code = _int(occupation, path, number, "occupation code", 0, len(ML1M_OCCUPATIONS) - 1)
        features.append((AGE_GROUPS.index(age_code) + 1, GENDERS.index(gender.strip()) + 1,
                         occupation_code + 1, zip_area(zip_code)))
    path = folder / "movies.dat"
    item_ids, titles, years, genres = [], [], [], []
    for number, (mid, title, names) in _rows(path, "::", 3, header="movieid"):
        item_ids.append(_int(mid, path, number, "movie id", 1))
        titles.append(title.strip())
        years.append(_year("", title))
        flags = [0] * len(ML1M_GENRES)
        for name in names.strip().split("|"):
            if name not in ML1M_GENRES:
                raise DataError(f"{path} line {number}: genre {name[:30]!r} is not one of MovieLens-1M's")
            flags[ML1M_GENRES.index(name)] = 1
        genres.append(flags)
    users = _index(user_ids, folder / "users.dat", "user")
    items = _index(item_ids, folder / "movies.dat", "movie")
    user, item, rating, timestamp = _ratings(folder / "ratings.dat", "::", users, items, header="userid")
    return MovieLens("movielens-1m", np.array(user_ids), np.array(features, dtype=np.int64),
                     np.array(item_ids), titles, np.array(years, dtype=np.int64),
                     np.array(genres, dtype=np.uint8), list(ML1M_GENRES), list(ML1M_OCCUPATIONS),
                     user, item, rating, timestamp, source=str(folder))


PARSERS = {"movielens-100k": parse_ml100k, "movielens-1m": parse_ml1m}


# ----------------------------------------------------------------------------- finding
def release_folder(name: str, data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, download: bool = True,
                   progress: bool = True) -> Path:
    """The folder holding release ``name``'s files.

    Looked for, in order: ``<data>/<name>/`` (the files themselves, as in kshot's shared data),
    ``<data>/<name>/<top>/`` and ``<data>/<top>/`` (an unzipped release); else the official zip
    in ``<data>/<name>/`` or ``<data>/`` (downloaded from GroupLens, MD5-checked, when missing
    and downloads are allowed), extracted once into the cache directory.
    """
    release = RELEASES.get(name)
    if release is None:
        raise DataError(f"unknown MovieLens release {name!r}; choose one of {', '.join(RELEASES)}")
    base = resolve_data_dir(data_dir)
    for folder in (base / name, base / name / release.top, base / release.top):
        if all((folder / f).is_file() for f in release.files):
            return folder
    archive = find_archive(release.remote, name, root=data_dir, download_missing=download, progress=progress)
    target = resolve_cache_dir(cache_dir) / name
    extracted = target / "extracted" / release.top
    with file_lock(target / ".lock"):
        if not all((extracted / f).is_file() for f in release.files):
            with open_zip(archive) as zf:
                total = sum(info.file_size for info in zf.infolist())
            if total > MAX_ARCHIVE_BYTES:
                raise DataError(f"{archive} unpacks to {total / 2**20:.0f} MB, far more than the "
                                f"MovieLens release; delete it and download it again")
            safe_extract(archive, target / "extracted")
    missing = [f for f in release.files if not (extracted / f).is_file()]
    if missing:
        raise DataError(f"{archive} has no {release.top}/{missing[0]}; it is not the official "
                        f"{release.remote.name}: delete it and download it again")
    return extracted


@lru_cache(maxsize=4)
def _load(name: str, folder: str, stamp: tuple) -> MovieLens:
    return PARSERS[name](folder)


def load_movielens(name: str = "movielens-100k", data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, download: bool = True,
                   progress: bool = True) -> MovieLens:
    """Release ``name`` (``movielens-100k`` or ``movielens-1m``), found (or fetched) and parsed.

    Parsed once per process (the files' sizes and times are part of the key)."""
    folder = release_folder(name, data_dir, cache_dir, download=download, progress=progress)
    files = RELEASES[name].files
    stamp = tuple((f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in files)
    return _load(name, str(folder), stamp)
