"""MovieLens parsing on the real ml-100k files (counts as its README states them) and on small
files written in the exact ml-1m format; bad files are one-line DataErrors."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kshot.data.archives import download
from kshot.errors import DataError
from kshot.recsys.movielens import (RELEASES, age_group, load_movielens, parse_ml100k, parse_ml1m,
                                    release_folder, zip_area)

ML100K_FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation", "u.info")


@pytest.fixture(scope="module")
def ml100k(data_dir):
    return load_movielens("movielens-100k", data_dir=data_dir, download=False)


def test_ml100k_counts_as_its_readme_states(ml100k, data_dir):
    assert (ml100k.n_ratings, ml100k.n_users, ml100k.n_items) == (100_000, 943, 1682)
    assert len(ml100k.genre_names) == 19 and ml100k.genre_names[0] == "unknown" and ml100k.genre_names[-1] == "Western"
    assert len(ml100k.occupation_names) == 21 and "technician" in ml100k.occupation_names
    assert ml100k.ratings_per_user().min() >= 20  # "Each user has rated at least 20 movies"
    assert set(np.unique(ml100k.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # Independently of the parser: the rating lines of u.data, read with the csv module.
    with open(data_dir / "movielens-100k" / "u.data", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and r[0].isdigit()]
    assert len(rows) == 100_000
    first = rows[0]
    u, i = ml100k.user_ids.tolist().index(int(first[0])), ml100k.item_ids.tolist().index(int(first[1]))
    match = (ml100k.rating_user == u) & (ml100k.rating_item == i)
    assert ml100k.rating[match].tolist() == [float(first[2])] and ml100k.timestamp[match].tolist() == [int(first[3])]
    assert np.bincount(ml100k.rating.astype(int), minlength=6)[1:].tolist() == \
        np.bincount([int(r[2]) for r in rows], minlength=6)[1:].tolist()


def test_ml100k_users_and_items_parsed_field_by_field(ml100k):
    # u.user line 1: 1|24|M|technician|85711; u.item: 1|Toy Story (1995)|01-Jan-1995|...
    u = ml100k.user_ids.tolist().index(1)
    age, gender, occupation, area = ml100k.user_features[u].tolist()
    assert age == age_group(24) == 2 and gender == 1 and area == zip_area("85711") == 9
    assert ml100k.occupation_names[occupation - 1] == "technician"
    toy = ml100k.item_ids.tolist().index(1)
    assert ml100k.titles[toy] == "Toy Story (1995)" and ml100k.years[toy] == 1995
    assert [ml100k.genre_names[g] for g in np.flatnonzero(ml100k.genres[toy])] == ["Animation", "Children's", "Comedy"]
    unknown = ml100k.item_ids.tolist().index(267)  # "267|unknown||||1|0|..." : no date, genre unknown
    assert ml100k.years[unknown] == 0 and ml100k.genres[unknown].tolist()[0] == 1
    # latin-1 titles decode: byte 0xE9 of "Mis\xe9rables" is "é"
    assert ml100k.titles[ml100k.item_ids.tolist().index(543)] == "Misérables, Les (1995)"
    # Codes are in range, 0 only where unknown.
    assert ml100k.user_features.min() >= 1 and ml100k.user_features[:, 2].max() == 21


def _official_layout(data_dir: Path, root: Path) -> Path:
    """The shared ml-100k files as the official zip has them: no header lines, ml-100k/ inside."""
    archive = root / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ML100K_FILES:
            lines = (data_dir / "movielens-100k" / name).read_bytes().splitlines(keepends=True)
            if lines and lines[0][:1].isalpha() and name in ("u.data", "u.user", "u.item"):
                lines = lines[1:]  # the shared copy carries a header row; the release does not
            zf.writestr(f"ml-100k/{name}", b"".join(lines))
    return archive


def test_official_zip_is_extracted_into_the_cache_and_parses_the_same(ml100k, data_dir, tmp_path):
    root = tmp_path / "data"
    (root / "movielens-100k").mkdir(parents=True)
    _official_layout(data_dir, root / "movielens-100k")
    folder = release_folder("movielens-100k", data_dir=root, cache_dir=tmp_path / "cache", download=False)
    assert folder == tmp_path / "cache" / "movielens-100k" / "extracted" / "ml-100k"
    again = parse_ml100k(folder)
    assert np.array_equal(again.rating, ml100k.rating) and again.titles == ml100k.titles
    assert np.array_equal(again.user_features, ml100k.user_features)


def test_missing_release_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="ml-100k.zip not found"):
        release_folder("movielens-100k", data_dir=tmp_path, cache_dir=tmp_path / "c", download=False)


def test_download_refuses_bytes_that_are_not_the_published_zip(tmp_path):
    class Response(io.BytesIO):
        headers: dict = {}

    remote = RELEASES["movielens-100k"].remote
    assert remote.url.startswith("https://files.grouplens.org/") and len(remote.md5) == 32
    with pytest.raises(DataError, match="checksum mismatch"):
        download(remote, tmp_path / "ml-100k.zip", progress=False, opener=lambda url: Response(b"PK not it"))
    assert not (tmp_path / "ml-100k.zip").exists()


def _write_ml1m(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::K1A0B\n")
    (folder / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                        "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
                                        "10::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n".encode("latin-1"))
    (folder / "ratings.dat").write_text(ratings or "1::1::5::978300760\n1::10::3::978302109\n"
                                                   "2::2::4::978301968\n3::1::1::978300275\n")
    return folder


def test_ml1m_format(tmp_path):
    data = parse_ml1m(_write_ml1m(tmp_path / "ml-1m"))
    assert (data.n_users, data.n_items, data.n_ratings) == (3, 3, 4)
    assert data.user_features.tolist() == [[1, 2, 11, 5], [7, 1, 17, 8], [3, 1, 16, 11]]
    assert data.occupation_names[10] == "K-12 student" and len(data.genre_names) == 18
    assert data.titles[2] == "Cité des enfants perdus, La (1995)" and data.years.tolist() == [1995] * 3
    assert data.item_ids.tolist() == [1, 2, 10] and data.rating_item.tolist() == [0, 2, 1, 0]
    # through the official zip layout, found in the data directory and extracted once
    root = tmp_path / "data"
    root.mkdir()
    with zipfile.ZipFile(root / "ml-1m.zip", "w") as zf:
        for f in ("users.dat", "movies.dat", "ratings.dat"):
            zf.write(tmp_path / "ml-1m" / f, f"ml-1m/{f}")
    loaded = load_movielens("movielens-1m", data_dir=root, cache_dir=tmp_path / "cache", download=False)
    assert loaded.rating.tolist() == data.rating.tolist()


@pytest.mark.parametrize("ratings, message", [
    ("1::1::7::978300760\n", "not 1-5"),
    ("1::99::4::978300760\n", "names item 99"),
    ("4::1::4::978300760\n", "names user 4"),
    ("1::1::x::978300760\n", "integer fields"),
    ("1::1::4::1\n1::1::5::2\n", "rated the same item twice"),
])
def test_bad_ratings_are_refused_with_one_line(tmp_path, ratings, message):
    folder = _write_ml1m(tmp_path / "ml-1m", ratings)
    with pytest.raises(DataError, match=message) as info:
        parse_ml1m(folder)
    assert "\n" not in str(info.value)


def test_bad_user_and_item_lines_name_file_and_line(tmp_path, data_dir):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in ML100K_FILES:
        (folder / name).write_bytes((data_dir / "movielens-100k" / name).read_bytes())
    lines = (folder / "u.user").read_text().splitlines()
    lines[5] = lines[5].replace("|M|", "|X|").replace("|F|", "|X|")
    (folder / "u.user").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u.user line 6: gender 'X'"):
        parse_ml100k(folder)
    (folder / "u.user").write_bytes((data_dir / "movielens-100k" / "u.user").read_bytes())
    (folder / "u.info").write_text("943 users\n1682 items\n99999 ratings\n")
    with pytest.raises(DataError, match="u.info says 99999 ratings"):
        parse_ml100k(folder)
