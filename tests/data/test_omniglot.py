"""Omniglot from its official archives: counts, splits, rotations, cache reuse, broken archives."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import zipfile

import numpy as np
import pytest
import torch

from kshot.data.omniglot import DRAWINGS, Omniglot, build_cache
from kshot.errors import DataError


def test_cache_holds_all_1623_characters_with_20_drawings_each(omniglot, cache_dir):
    omniglot("train")  # builds the cache once for the session
    path = build_cache(cache=cache_dir)
    with np.load(path) as z:
        images, alphabet, character, archive = z["images"], z["alphabet"], z["character"], z["archive"]
    assert images.shape == (1623 * 20, 28, 28) and images.dtype == np.uint8
    assert len(alphabet) == 1623 and len(set(alphabet)) == 50
    assert (archive == "background").sum() == 964 and (archive == "evaluation").sum() == 659
    assert len(set(zip(alphabet, character))) == 1623  # every (alphabet, character) once
    # Strokes are bright on a dark ground, as Omniglot models expect.
    assert images.mean() < 60 and images.max() == 255


@pytest.mark.parametrize("protocol, counts", [
    ("vinyals", {"train": 1028, "val": 172, "test": 423}),
    ("lake", {"train": 792, "val": 172, "test": 659}),
])
def test_splits_are_disjoint_and_cover_all_characters(omniglot, protocol, counts):
    chars = {s: set(omniglot(s, protocol).characters.tolist()) for s in ("train", "val", "test", "trainval")}
    assert {s: len(chars[s]) for s in counts} == counts
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    assert chars["trainval"] == chars["train"] | chars["val"]
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    if protocol == "vinyals":
        assert len(chars["trainval"]) == 1200  # Vinyals et al.: 1,200 characters for meta-training


def test_vinyals_split_has_four_rotation_classes_per_character(omniglot):
    test = omniglot("test")
    assert test.num_classes == 4 * 423 and len(test) == 4 * 423 * DRAWINGS
    assert all(len(e) == DRAWINGS for e in test.class_examples())
    names = test.class_names[:4]
    assert [n.rsplit("/", 1)[1] for n in names] == ["rot000", "rot090", "rot180", "rot270"]
    upright = test.load(test.class_examples()[0])
    for k in (1, 2, 3):
        rotated = test.load(test.class_examples()[k])
        assert torch.equal(rotated, torch.rot90(upright, k, dims=(-2, -1)))
    assert not torch.equal(test.load(test.class_examples()[1]), upright)


def test_lake_split_has_no_rotations_by_default(omniglot):
    lake = omniglot("test", "lake")
    assert lake.num_classes == 659 and not any("rot" in n for n in lake.class_names)
    x = lake.load(lake.class_examples()[0])
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cache_is_reused_without_the_archives(omniglot, cache_dir, tmp_path):
    omniglot("train")
    empty = tmp_path / "no-archives-here"
    empty.mkdir()
    again = Omniglot("test", data_dir=empty, cache_dir=cache_dir, download=False)
    assert again.num_classes == 4 * 423


def _broken_data_dir(tmp_path, data_dir, background_bytes: bytes):
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    (root / "omniglot" / "images_background.zip").write_bytes(background_bytes)
    shutil.copy(data_dir / "omniglot" / "images_evaluation.zip", root / "omniglot")
    return root


def _expect_broken(root, tmp_path, match):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=match):
        Omniglot("train", data_dir=root, cache_dir=cache, download=False)
    assert not list(cache.rglob("*.npz")) and not list(cache.rglob("*.tmp"))  # nothing half-written


def test_truncated_archive_is_a_clear_error(tmp_path, data_dir):
    data = (data_dir / "omniglot" / "images_background.zip").read_bytes()
    _expect_broken(_broken_data_dir(tmp_path, data_dir, data[: len(data) // 3]), tmp_path, "not a valid zip")


def test_html_error_page_is_a_clear_error(tmp_path, data_dir):
    page = b"<!DOCTYPE html>\n<html><title>Google Drive - Virus scan warning</title></html>"
    _expect_broken(_broken_data_dir(tmp_path, data_dir, page), tmp_path, "HTML")


def test_wrong_archive_is_recognised_by_its_layout(tmp_path, data_dir):
    small = (data_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    _expect_broken(_broken_data_dir(tmp_path, data_dir, small), tmp_path, "layout")


def test_incomplete_archive_is_recognised_by_its_counts(tmp_path, data_dir):
    src = data_dir / "omniglot" / "images_background.zip"
    out = tmp_path / "partial.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        dropped = False
        for info in zin.infolist():
            if not dropped and info.filename.endswith("_07.png"):
                dropped = True
                continue
            zout.writestr(info, zin.read(info))
    _expect_broken(_broken_data_dir(tmp_path, data_dir, out.read_bytes()), tmp_path, "not 20 drawings")


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="images_background.zip not found"):
        Omniglot("train", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)


def test_bad_split_protocol_and_size_are_clear_errors(omniglot):
    with pytest.raises(DataError, match="unknown Omniglot split"):
        omniglot("training")
    with pytest.raises(DataError, match="unknown Omniglot protocol"):
        omniglot("train", "snell")
    with pytest.raises(DataError, match="image_size"):
        omniglot("train", image_size=4)


def _build(args):
    data_dir, cache = args
    return str(build_cache(data_dir, cache, image_size=20, download=False, workers=1, progress=False))


def test_two_processes_building_the_cache_at_once_agree(tmp_path, data_dir):
    cache = tmp_path / "shared-cache"
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_build, [(str(data_dir), str(cache))] * 2)
    assert paths[0] == paths[1]
    with np.load(paths[0]) as z:
        assert z["images"].shape == (1623 * 20, 20, 20)
    leftovers = [p.name for p in (cache / "omniglot").iterdir() if not p.name.endswith((".npz", ".lock"))]
    assert leftovers == []
