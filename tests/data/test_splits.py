"""Class splits: drawn from a seed, written to a file, read back, always disjoint."""

from __future__ import annotations

import json

import pytest

from kshot.data.splits import ClassSplit, draw_split, natural_key, read_split, resolve_split, write_split
from kshot.errors import DataError

NAMES = [f"class{i}" for i in range(100)]


def test_drawn_split_has_the_asked_sizes_and_is_disjoint_and_complete():
    split = draw_split(NAMES, seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (64, 16, 20)
    assert sorted(split.train + split.val + split.test, key=natural_key) == NAMES
    assert split.classes("trainval") == split.train + split.val
    assert split.origin == {"seed": 3, "fractions": [0.64, 0.16, 0.2], "classes": 100}


def test_drawn_split_depends_on_seed_not_on_listing_order():
    a = draw_split(NAMES, seed=1)
    assert draw_split(list(reversed(NAMES)), seed=1) == a
    assert draw_split(NAMES, seed=2).test != a.test
    custom = draw_split(NAMES, fractions=(2, 1, 1), seed=0)
    assert (len(custom.train), len(custom.val), len(custom.test)) == (50, 25, 25)


def test_tiny_datasets_still_get_a_class_in_each_split_or_a_clear_error():
    split = draw_split(["a", "b", "c"], seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (1, 1, 1)
    with pytest.raises(DataError, match="2 classes are too few"):
        draw_split(["a", "b"], seed=0)
    assert draw_split(["a", "b"], fractions=(1, 0, 1), seed=0).val == []
    with pytest.raises(DataError, match="three non-negative numbers"):
        draw_split(NAMES, fractions=(1, -1, 1))


def test_overlapping_splits_are_refused():
    with pytest.raises(DataError, match="'b' is listed in both train and test"):
        ClassSplit(["a", "b"], ["c"], ["b"])
    with pytest.raises(DataError, match="'a' is listed twice in train"):
        ClassSplit(["a", "a"], [], [])


def test_split_file_is_written_then_reused(tmp_path):
    path = tmp_path / "run" / "classes.json"
    first = resolve_split(NAMES, path, seed=5)
    assert json.loads(path.read_text())["test"] == first.test
    # A later call with another seed reads the file instead of drawing again.
    assert resolve_split(NAMES, path, seed=6) == first
    assert resolve_split(NAMES, None, seed=6) != first


def test_user_written_json_and_csv_split_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    assert read_split(tmp_path / "s.json") == ClassSplit(["a", "b"], ["c"], ["d"])
    (tmp_path / "s.csv").write_text("class,split\na,train\nb,TRAIN\nd,test\n\nc,val\n")
    assert read_split(tmp_path / "s.csv") == ClassSplit(["a", "b"], ["c"], ["d"])
    (tmp_path / "bad.csv").write_text("class,split\na,holdout\n")
    with pytest.raises(DataError, match="line 2: split must be train, val or test, not 'holdout'"):
        read_split(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_split(tmp_path / "bad.json")
    (tmp_path / "overlap.json").write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(DataError, match="disjoint"):
        read_split(tmp_path / "overlap.json")


def test_split_naming_classes_the_data_lacks_is_refused(tmp_path):
    write_split(tmp_path / "s.json", ClassSplit(["a", "zebra"], [], ["b"]))
    with pytest.raises(DataError, match=r"names 1 classes that the data does not have \(e.g. 'zebra'\)"):
        resolve_split(["a", "b", "c"], tmp_path / "s.json")


def test_natural_order():
    assert sorted(["c10", "c2", "C1"], key=natural_key) == ["C1", "c2", "c10"]
