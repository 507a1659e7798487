"""ImageFolder: a user's class-per-folder images, read like the training data, bad files reported."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kshot.data import load_dataset
from kshot.data.folders import ImageFolder, infer_channels, read_query_images
from kshot.data.images import ImageFormat
from kshot.errors import DataError, DataWarning
from kshot.tasks import TaskSampler

ATLANTEAN = [f"Atlantean/character{i:02d}" for i in range(1, 7)]
OMNIGLOT_FORMAT = ImageFormat(1, 28, invert=True)


def test_folder_of_omniglot_pngs_reads_exactly_like_the_omniglot_loader(tmp_path, omniglot_pngs, omniglot):
    names = omniglot_pngs(tmp_path / "data", ATLANTEAN[:3])
    folder = ImageFolder(tmp_path / "data", invert=True, cache_dir=tmp_path / "cache", progress=False)
    assert folder.class_names == names
    assert folder.image_format == OMNIGLOT_FORMAT  # grey inferred, 28 px for grey images
    assert [len(e) for e in folder.class_examples()] == [20, 20, 20]
    lake_test = omniglot("test", protocol="lake")
    for c, character in enumerate(ATLANTEAN[:3]):
        expected = lake_test.load(lake_test.class_examples()[lake_test.class_names.index(character)])
        assert torch.equal(folder.load(folder.class_examples()[c]), expected)


def test_decoded_folder_is_cached_and_rebuilt_when_the_folder_changes(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path / "data", ATLANTEAN[:2], drawings=range(4))
    cache = tmp_path / "cache"
    first = ImageFolder(tmp_path / "data", invert=True, cache_dir=cache, progress=False)
    arrays = sorted((cache / "folders").glob("*.npy"))
    assert len(arrays) == 1
    again = ImageFolder(tmp_path / "data", invert=True, cache_dir=cache, progress=False)
    assert isinstance(again._images, np.memmap)  # read back from the cache, not decoded
    assert torch.equal(first.load(np.arange(8)), again.load(np.arange(8)))
    # Replace one drawing by another character's: a new cache entry, with the new pixels.
    victim = sorted((tmp_path / "data" / "Atlantean-character01").iterdir())[0]
    donor = sorted((tmp_path / "data" / "Atlantean-character02").iterdir())[0]
    victim.write_bytes(donor.read_bytes())
    os.utime(victim, ns=(1, 1))
    changed = ImageFolder(tmp_path / "data", invert=True, cache_dir=cache, progress=False)
    assert len(sorted((cache / "folders").glob("*.npy"))) == 2
    assert torch.equal(changed.load(np.array([0])), changed.load(np.array([4])))
    assert not torch.equal(first.load(np.array([0])), changed.load(np.array([0])))


def _save(path, image: Image.Image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_every_common_format_and_mode_is_converted(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    files = {
        "a/photo.jpg": (rgb, {}), "a/grey.png": (grey, {}), "a/pic.bmp": (rgb, {}),
        "a/anim.gif": (rgb.convert("P"), {}), "b/scan.tiff": (grey, {}), "b/web.webp": (rgb, {}),
        "b/alpha.png": (rgb.convert("RGBA"), {}), "b/deep.png": (Image.fromarray(
            (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)), {}),
        "b/bw.png": (grey.convert("1"), {}),
    }
    for name, (image, kwargs) in files.items():
        _save(tmp_path / name, image, **kwargs)
    (tmp_path / "a" / "notes.txt").write_text("not an image, ignored")
    for fmt in (ImageFormat(3, 32), ImageFormat(1, 20, invert=True)):
        folder = ImageFolder(tmp_path, image_format=fmt, cache=False, progress=False)
        x = folder.load(np.arange(len(folder)))
        assert x.shape == (9, *fmt.shape) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert folder.files[:4] == ["a/anim.gif", "a/grey.png", "a/photo.jpg", "a/pic.bmp"]
    # The lossless RGB formats agree with each other.
    colour = ImageFolder(tmp_path, image_format=ImageFormat(3, 32), cache=False, progress=False)
    bmp, png_alpha = colour.files.index("a/pic.bmp"), colour.files.index("b/alpha.png")
    assert torch.equal(colour.load(np.array([bmp])), colour.load(np.array([png_alpha])))


def test_transparent_pixels_are_laid_on_white(tmp_path):
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    _save(tmp_path / "c" / "clear.png", clear)
    x = ImageFolder(tmp_path, image_format=ImageFormat(1, 10), cache=False, progress=False).load(np.array([0]))
    assert torch.all(x == 1.0)


def test_channels_follow_the_majority_of_images(tmp_path):
    rgb = Image.new("RGB", (8, 8), (200, 10, 10))
    for i in range(3):
        _save(tmp_path / "k" / f"c{i}.png", rgb)
    _save(tmp_path / "k" / "g.png", rgb.convert("L"))
    _save(tmp_path / "k" / "p.gif", rgb.convert("L").convert("P"))  # a palette of grey shades
    paths = sorted((tmp_path / "k").iterdir())
    assert infer_channels(paths) == 3
    assert infer_channels([p for p in paths if p.suffix == ".gif" or p.name == "g.png"]) == 1
    assert ImageFolder(tmp_path, cache=False, progress=False).image_format == ImageFormat(3, 84)


def test_unreadable_images_are_listed_skipped_and_counted(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path, ATLANTEAN[:2], drawings=range(5))
    (tmp_path / "Atlantean-character01" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "Atlantean-character02" / "empty.jpg").write_bytes(b"")
    with pytest.warns(DataWarning, match=r"skipped 2 unreadable images of 12 in .*broken\.png.*empty\.jpg"):
        folder = ImageFolder(tmp_path, invert=True, cache_dir=tmp_path.parent / "c1", progress=False)
    assert [len(e) for e in folder.class_examples()] == [5, 5]
    assert [name for name, _ in folder.skipped] == ["Atlantean-character01/broken.png",
                                                    "Atlantean-character02/empty.jpg"]
    assert "broken.png" not in " ".join(folder.files)
    # The same warning comes back when the folder is read from the cache.
    with pytest.warns(DataWarning, match="skipped 2 unreadable"):
        ImageFolder(tmp_path, invert=True, cache_dir=tmp_path.parent / "c1", progress=False)


def test_empty_or_unreadable_class_folders_are_errors_naming_the_class(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path, ATLANTEAN[:2], drawings=range(3))
    (tmp_path / "lonely").mkdir()
    with pytest.raises(DataError, match=r"class folder 'lonely' .* holds no images \(it is empty\)"):
        ImageFolder(tmp_path, cache=False)
    (tmp_path / "lonely" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"'lonely' .* only 1 files of other kinds \(e.g. 'readme.txt'"):
        ImageFolder(tmp_path, cache=False)
    (tmp_path / "lonely" / "readme.txt").unlink()
    (tmp_path / "lonely" / "deeper").mkdir()
    with pytest.raises(DataError, match="has sub-folders .* classes must be the folders directly inside"):
        ImageFolder(tmp_path, cache=False)
    (tmp_path / "lonely" / "deeper").rmdir()
    (tmp_path / "lonely" / "bad.png").write_bytes(b"not a png")
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"none of the 1 images of class 'lonely'"):
        ImageFolder(tmp_path, cache=False)


def test_missing_or_flat_folders_are_clear_errors(tmp_path, omniglot_pngs):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nowhere", cache=False)
    omniglot_pngs(tmp_path, ATLANTEAN[:1], drawings=range(2))
    flat = tmp_path / "Atlantean-character01"
    with pytest.raises(DataError, match="has no class sub-folders .* holds 2 images directly"):
        ImageFolder(flat, cache=False)


def test_sampler_names_the_class_with_too_few_images(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path, ATLANTEAN[:3], drawings=range(6))
    omniglot_pngs(tmp_path, ATLANTEAN[3:4], drawings=range(2))
    folder = ImageFolder(tmp_path, invert=True, cache=False, progress=False)
    with pytest.raises(DataError, match=r"too few: 'Atlantean-character04' \(2\)"):
        TaskSampler(folder, ways=4, shots=1, queries=3)
    with pytest.warns(DataWarning, match=r"1 of 4 classes have fewer than 4 examples .* 'Atlantean-character04' \(2\)"):
        sampler = TaskSampler(folder, ways=3, shots=1, queries=3)
    task = sampler.task(0)
    assert set(task.classes.tolist()) == {0, 1, 2} and task.query_x.shape == (9, 1, 28, 28)


def test_query_folder_loose_labelled_or_mixed(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path / "labelled", ATLANTEAN[:2], drawings=range(2))
    labelled = read_query_images(tmp_path / "labelled", OMNIGLOT_FORMAT)
    assert labelled.labels == ["Atlantean-character01"] * 2 + ["Atlantean-character02"] * 2
    loose = tmp_path / "labelled" / "Atlantean-character01"
    images = read_query_images(loose, OMNIGLOT_FORMAT)
    assert images.labels is None and images.x.shape == (2, 1, 28, 28)
    assert images.files == sorted(p.name for p in loose.iterdir())
    (tmp_path / "labelled" / "stray.png").write_bytes(next(loose.iterdir()).read_bytes())
    with pytest.raises(DataError, match="holds both images and class sub-folders"):
        read_query_images(tmp_path / "labelled", OMNIGLOT_FORMAT)


def test_folder_dataset_splits_are_disjoint_recorded_and_reused(tmp_path, omniglot_pngs):
    characters = [f"Angelic/character{i:02d}" for i in range(1, 21)]
    omniglot_pngs(tmp_path / "data", characters, drawings=range(3))
    split_file = tmp_path / "run" / "classes.json"
    settings = dict(data_path=str(tmp_path / "data"), split_file=str(split_file), image_size=28,
                    invert=True, cache_dir=str(tmp_path / "cache"))
    parts = {s: load_dataset("folder", s, **settings) for s in ("train", "val", "test")}
    names = {s: set(d.class_names) for s, d in parts.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [13, 3, 4]  # 64/16/20 % of 20
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    recorded = json.loads(split_file.read_text())
    assert {s: set(recorded[s]) for s in ("train", "val", "test")} == names
    # A hand-edited split file is what the next run uses.
    recorded["test"], recorded["train"] = recorded["train"][:2], recorded["train"][2:] + recorded["test"]
    split_file.write_text(json.dumps(recorded))
    assert load_dataset("folder", "test", **settings).class_names == recorded["test"]
    assert parts["train"].image_format == OMNIGLOT_FORMAT
    assert parts["test"].checkpoint_extra() == {"image_format": OMNIGLOT_FORMAT.to_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainval = load_dataset("folder", "trainval", **settings)
    assert trainval.num_classes == 18


def test_folder_dataset_needs_a_path():
    from kshot.errors import ConfigError

    with pytest.raises(ConfigError, match="--dataset folder needs --data-path"):
        load_dataset("folder", "train")


def test_too_few_classes_in_a_split_says_which_split(tmp_path, omniglot_pngs):
    omniglot_pngs(tmp_path / "data", [f"Angelic/character{i:02d}" for i in range(1, 16)], drawings=range(2))
    split_file = tmp_path / "classes.json"
    val = load_dataset("folder", "val", data_path=str(tmp_path / "data"), split_file=str(split_file),
                       invert=True, cache_dir=str(tmp_path / "cache"))
    assert val.num_classes == 2  # 16% of 15 classes
    with pytest.raises(DataError, match=f"cannot draw 3-way tasks from the val classes of split file "
                                        f"{split_file} of 2 classes"):
        TaskSampler(val, ways=3, shots=1, queries=1)
