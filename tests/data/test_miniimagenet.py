"""mini-ImageNet from its two released forms, on fixtures written in exactly those formats."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from kshot.data import load_dataset
from kshot.data.miniimagenet import MiniImageNet, safe_unpickle
from kshot.errors import DataError, DataWarning
from kshot.tasks import TaskSampler

PER_CLASS = 3
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}


def _wnids():
    """100 made-up wnids in ImageNet's form, split 64/16/20 as Ravi & Larochelle's files are."""
    wnids = [f"n{1000000 + 7919 * i:08d}" for i in range(100)]
    return {"train": wnids[:64], "val": wnids[64:80], "test": wnids[80:]}


def _image(wnid: str, k: int) -> Image.Image:
    """A class-specific colour field with a little per-image noise."""
    seed = int(wnid[1:]) % 2**31
    base = np.random.default_rng(seed).integers(0, 256, 3)
    noise = np.random.default_rng([seed, k]).integers(-20, 21, (84, 84, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_csv_form(root):
    """``images/`` of 84x84 JPEGs named ``<wnid><8 digits>.jpg`` and ``{split}.csv`` (filename,label)."""
    (root / "images").mkdir(parents=True)
    for split, wnids in _wnids().items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid in wnids:
                for k in range(PER_CLASS):
                    name = f"{wnid}{k + 1:08d}.jpg"
                    _image(wnid, k).save(root / "images" / name, quality=95)
                    writer.writerow([name, wnid])


def write_pickle_form(root, from_csv_root, protocol=4):
    """``mini-imagenet-cache-{split}.pkl``: {'image_data': uint8 [N,84,84,3], 'class_dict': {wnid: [i]}}."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        with open(from_csv_root / f"{split}.csv") as f:
            rows = list(csv.reader(f))[1:]
        images, class_dict = [], {}
        for i, (name, wnid) in enumerate(rows):
            with Image.open(from_csv_root / "images" / name) as im:
                images.append(np.asarray(im.convert("RGB")))
            class_dict.setdefault(wnid, []).append(i)
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f, protocol=protocol)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    base = tmp_path_factory.mktemp("mini")
    write_csv_form(base / "csvform" / "miniimagenet")
    write_pickle_form(base / "pklform" / "mini-imagenet", base / "csvform" / "miniimagenet")
    return base


@pytest.mark.parametrize("form", ["csvform", "pklform"])
def test_both_released_forms_load_with_the_standard_split(forms, form, tmp_path):
    for split, n in {**SPLIT_CLASSES, "trainval": 80}.items():
        data = MiniImageNet(split, data_dir=forms / form, cache_dir=tmp_path, progress=False)
        assert data.num_classes == n and len(data) == n * PER_CLASS
        assert data.image_format.shape == (3, 84, 84)
        x = data.load(data.class_examples()[-1])
        assert x.shape == (PER_CLASS, 3, 84, 84) and x.dtype == torch.float32
    test = MiniImageNet("test", data_dir=forms / form, cache_dir=tmp_path, progress=False)
    assert test.class_names == _wnids()["test"]


def test_the_two_forms_give_the_same_pixels(forms, tmp_path):
    a = MiniImageNet("trainval", data_dir=forms / "csvform", cache_dir=tmp_path, progress=False)
    b = MiniImageNet("trainval", data_dir=forms / "pklform", cache_dir=tmp_path, progress=False)
    assert a.class_names == b.class_names
    everything = np.arange(len(a))
    assert torch.equal(a.load(everything), b.load(everything))
    # Each image shows its class's colour: the labels line up with the pixels.
    means = a.load(everything).mean(dim=(2, 3))
    for c in (0, 63, 64, 79):
        expected = np.random.default_rng(int(a.class_names[c][1:]) % 2**31).integers(0, 256, 3) / 255
        assert np.allclose(means[a.class_examples()[c]].numpy(), expected, atol=0.03)


def test_protocol_2_pickles_from_older_pythons_load(forms, tmp_path):
    write_pickle_form(tmp_path / "p2" / "miniimagenet", forms / "csvform" / "miniimagenet", protocol=2)
    data = MiniImageNet("val", data_dir=tmp_path / "p2", cache_dir=tmp_path / "c", progress=False)
    assert data.num_classes == 16


def test_other_image_sizes_are_resized(forms, tmp_path):
    data = MiniImageNet("test", image_size=32, data_dir=forms / "pklform", cache_dir=tmp_path, progress=False)
    assert data.load(np.array([0, 1])).shape == (2, 3, 32, 32)


def test_sampler_draws_5_way_tasks_from_the_test_classes(forms, tmp_path):
    data = load_dataset("miniimagenet", "test", image_size=84, data_dir=str(forms / "csvform"), cache_dir=str(tmp_path))
    task = TaskSampler(data, ways=5, shots=1, queries=2, seed=0).task(0)
    assert task.support_x.shape == (5, 3, 84, 84) and task.query_x.shape == (10, 3, 84, 84)


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    for split in ("train", "val", "test"):
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n0": [0]},
                         "x": Payload()}, f)
    with pytest.raises(DataError, match=r"refusing to unpickle .* refers to builtins\.exec"):
        MiniImageNet("train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    # A plain array pickle is fine.
    with open(tmp_path / "ok.pkl", "wb") as f:
        pickle.dump({"a": np.arange(3)}, f)
    assert safe_unpickle(tmp_path / "ok.pkl")["a"].tolist() == [0, 1, 2]


def test_broken_copies_are_clear_errors(forms, tmp_path):
    with pytest.raises(DataError, match="mini-ImageNet not found .* no official download"):
        MiniImageNet("train", data_dir=tmp_path / "empty")
    folder = tmp_path / "trunc" / "miniimagenet"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        data = (forms / "pklform" / "mini-imagenet" / f"mini-imagenet-cache-{split}.pkl").read_bytes()
        (folder / f"mini-imagenet-cache-{split}.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read pickle .* truncated"):
        MiniImageNet("test", data_dir=tmp_path / "trunc", cache_dir=tmp_path / "c")
    partial = tmp_path / "partial" / "miniimagenet"
    (partial / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (partial / f"{split}.csv").write_text((forms / "csvform" / "miniimagenet" / f"{split}.csv").read_text())
    with pytest.raises(DataError, match="of the 60 images that test.csv lists are not in"):
        MiniImageNet("test", data_dir=tmp_path / "partial", cache_dir=tmp_path / "c")


def test_a_non_standard_split_is_flagged(forms, tmp_path):
    folder = tmp_path / "small" / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    src = forms / "csvform" / "miniimagenet"
    for split in ("train", "val", "test"):
        rows = (src / f"{split}.csv").read_text().splitlines()
        (folder / f"{split}.csv").write_text("\n".join(rows[: 1 + 2 * PER_CLASS]) + "\n")
        for row in rows[1: 1 + 2 * PER_CLASS]:
            name = row.split(",")[0]
            (folder / "images" / name).write_bytes((src / "images" / name).read_bytes())
    with pytest.warns(DataWarning, match="has 2 classes, not the standard 20"):
        MiniImageNet("test", data_dir=tmp_path / "small", cache_dir=tmp_path / "c", progress=False)


def test_train_resnet12_on_mini_imagenet_then_adapt_to_colour_folders(forms, tmp_path, capsys):
    """The command line end to end: a colour checkpoint records 3x84x84 and reads any image so."""
    from kshot.runs.adapt import InputReader
    from kshot.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "miniimagenet", "--image-size", "84", "--data-dir", str(forms / "csvform"),
                 "--cache-dir", str(tmp_path / "cache"), "--backbone", "resnet12",
                 "--backbone-options", '{"channels": [8, 8, 8, 8]}', "--ways", "3", "--shots", "1",
                 "--queries", "1", "--steps", "2", "--val-every", "0", "--test-tasks", "0",
                 "--run-dir", str(run), "--quiet"]) == 0
    assert InputReader.from_checkpoint(run).image_format.shape == (3, 84, 84)
    images = forms / "csvform" / "miniimagenet" / "images"
    wnids = _wnids()["test"][:3]
    for wnid in wnids:
        for k in range(PER_CLASS):
            target = tmp_path / ("support" if k < 2 else "query") / wnid / f"{k}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(images / f"{wnid}{k + 1:08d}.jpg") as im:
                im.resize((120, 90)).save(target)  # another size and format than the training images
    out = tmp_path / "p.csv"
    assert main(["adapt", str(run), "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["true"] for r in rows] == wnids
    assert "accuracy" in capsys.readouterr().out
