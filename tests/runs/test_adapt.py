"""``kshot adapt`` end to end through the command line, on folders of real Omniglot PNGs."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kshot.runs.adapt import AdaptedModel, InputReader
from kshot.runs.build import load_learner
from kshot.services.checkpoint import save_checkpoint
from kshot.cli import main
from kshot.config import TrainConfig
from kshot.data.images import ImageFormat
from kshot.errors import DataError
from kshot.learners import LEARNERS
from maml_references import adapted_probabilities

CHARACTERS = [f"Tengwar/character{i:02d}" for i in range(1, 6)]  # a meta-test alphabet (Vinyals split)
FOLDERS = [c.replace("/", "-") for c in CHARACTERS]
OMNIGLOT_FORMAT = ImageFormat(1, 28, invert=True)


def read_csv(path_or_text) -> list[dict]:
    text = path_or_text if isinstance(path_or_text, str) else path_or_text.read_text()
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def quick_run(trained_run):
    """The session's short ProtoNet run on Omniglot (tests/conftest.py): its run directory."""
    return trained_run[0]


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory, omniglot_pngs):
    """A new user's folders: 5 support and 15 labelled query drawings of 5 unseen characters."""
    root = tmp_path_factory.mktemp("user")
    omniglot_pngs(root / "support", CHARACTERS, drawings=range(5))
    omniglot_pngs(root / "query", CHARACTERS, drawings=range(5, 20))
    return root


def test_adapt_writes_one_row_per_query_file_and_prints_accuracy(quick_run, user_folders, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"),
                 "--query", str(user_folders / "query"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 75
    assert list(rows[0]) == ["file", "predicted", "true"] + [f"p({f})" for f in FOLDERS]
    files = {r["file"] for r in rows}
    assert files == {p.relative_to(user_folders / "query").as_posix()
                     for p in (user_folders / "query").rglob("*.png")}
    for row in rows:
        probs = np.array([float(row[f"p({f})"]) for f in FOLDERS])
        assert abs(probs.sum() - 1) < 1e-4 and probs.min() >= 0
        assert row["predicted"] == FOLDERS[int(probs.argmax())]
        assert row["true"] == row["file"].split("/")[0]
    correct = sum(r["predicted"] == r["true"] for r in rows)
    assert f"accuracy {100 * correct / 75:.2f} % ({correct} of 75 labelled queries)" in printed
    assert "adapted protonet to 5 classes from 25 support examples" in printed
    assert correct / 75 >= 0.7  # 5-way 5-shot on unseen characters after 300 steps; chance is 0.2


def test_adapt_agrees_with_the_learner_on_the_training_pipeline_tensors(quick_run, user_folders, tmp_path,
                                                                        omniglot):
    """The command's probabilities are exactly learner.adapt(...).predict_proba(...) on the
    images as the Omniglot loader decodes them: the user's files are read like the training data."""
    out = tmp_path / "p.csv"
    assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"),
                 "--query", str(user_folders / "query"), "--out", str(out)]) == 0
    rows = read_csv(out)
    data = omniglot("test", protocol="lake")
    examples = [data.class_examples()[data.class_names.index(c)] for c in CHARACTERS]
    support_x = data.load(np.concatenate([e[:5] for e in examples]))
    query_x = data.load(np.concatenate([e[5:] for e in examples]))
    learner = load_learner(quick_run)
    with torch.no_grad():
        expected = learner.adapt(support_x, torch.arange(5).repeat_interleave(5), 5).predict_proba(query_x)
    got = np.array([[float(r[f"p({f})"]) for f in FOLDERS] for r in rows])
    assert np.allclose(got, expected.numpy(), atol=2e-6)


def test_unlabelled_queries_of_any_format_and_size(quick_run, user_folders, tmp_path, capsys):
    """Colour JPEGs, palette GIFs and RGBA PNGs of other sizes are converted, and mostly get
    the same predictions as the original drawings."""
    queries = tmp_path / "mixed"
    queries.mkdir()
    originals = sorted((user_folders / "query" / FOLDERS[2]).glob("*.png"))[:6]
    for i, path in enumerate(originals):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if i % 3 == 0:
                im.resize((64, 80)).save(queries / f"{i}.jpg", quality=95)
            elif i % 3 == 1:
                im.convert("P").resize((50, 50)).save(queries / f"{i}.gif")
            else:
                im.convert("RGBA").resize((140, 140)).save(queries / f"{i}.png")
    for folder in (user_folders / "query" / FOLDERS[2], queries):
        assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"),
                     "--query", str(folder), "--out", "-"]) == 0
    captured = capsys.readouterr()
    original, converted = (read_csv("file,predicted" + part) for part in captured.out.split("file,predicted")[1:])
    assert sorted(r["file"] for r in converted) == sorted(p.name for p in queries.iterdir())
    assert "true" not in converted[0] and "accuracy" not in captured.err
    assert "adapted protonet" in captured.err  # the summary goes to stderr when the CSV is printed
    by_name = {r["file"]: r["predicted"] for r in original}
    same = sum(by_name[originals[int(r["file"].split(".")[0])].name] == r["predicted"] for r in converted)
    assert same >= 5


def _untrained_checkpoint(algo: str, path, image_format=OMNIGLOT_FORMAT, **settings):
    config = TrainConfig(algo=algo, ways=5, shots=1, queries=1, backbone_options={"hidden": 16}, **settings)
    learner = LEARNERS[algo].from_config(config, OMNIGLOT_FORMAT.shape)
    save_checkpoint(path, learner, config=config.to_dict(),
                    extra={"image_format": image_format.to_dict()} if image_format else None)
    return path


@pytest.mark.parametrize("algo", sorted(LEARNERS))
def test_every_learner_kind_adapts_through_the_command(algo, user_folders, tmp_path, capsys):
    ckpt = _untrained_checkpoint(algo, tmp_path / f"{algo}.safetensors")
    out = tmp_path / "p.csv"
    assert main(["adapt", str(ckpt), "--support", str(user_folders / "support"), "--query",
                 str(user_folders / "query"), "--out", str(out), "--shots", "3"]) == 0
    assert f"adapted {algo} to 5 classes from 15 support examples" in capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 75
    probs = np.array([[float(r[f"p({f})"]) for f in FOLDERS] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory, omniglot_pngs):
    """Support (3 drawings) and labelled queries (2 drawings) of 7 unseen characters, and the
    first 3 of them."""
    root = tmp_path_factory.mktemp("seven")
    characters = [f"Tengwar/character{i:02d}" for i in range(1, 8)]
    for ways, chosen in ((7, characters), (3, characters[:3])):
        omniglot_pngs(root / f"{ways}" / "support", chosen, drawings=range(3))
        omniglot_pngs(root / f"{ways}" / "query", chosen, drawings=range(5, 7))
    return root


@pytest.mark.parametrize("ways", [3, 7])
@pytest.mark.parametrize("algo", sorted(LEARNERS))
def test_every_learner_adapts_to_fewer_and_more_classes_than_it_was_trained_on(algo, ways, seven_classes, tmp_path,
                                                                                capsys):
    """A 5-way checkpoint meets 3 and 7 classes: every row holds exactly one probability per
    support class, under a header naming them, and names a class that exists."""
    ckpt = _untrained_checkpoint(algo, tmp_path / f"{algo}.safetensors")
    out = tmp_path / "p.csv"
    folders = seven_classes / f"{ways}"
    assert main(["adapt", str(ckpt), "--support", str(folders / "support"), "--query", str(folders / "query"),
                 "--out", str(out)]) == 0
    assert f"adapted {algo} to {ways} classes" in capsys.readouterr().out
    names = sorted(p.name for p in (folders / "support").iterdir())
    lines = list(csv.reader(out.open()))
    assert lines[0] == ["file", "predicted", "true"] + [f"p({n})" for n in names]
    assert len(lines) == 1 + 2 * ways and all(len(row) == 3 + ways for row in lines)
    for row in read_csv(out):
        probs = np.array([float(row[f"p({n})"]) for n in names])
        assert abs(probs.sum() - 1) < 1e-4 and row["predicted"] == names[int(probs.argmax())]


def test_maml_adapts_with_its_test_steps_and_each_file_alone(user_folders, tmp_path):
    """``kshot adapt`` on a MAML checkpoint gives each file the probabilities of a reference
    written with plain PyTorch (its test-time SGD steps on the support set, then batch norm by
    the support set's statistics), whatever the other files and the batch size."""
    ckpt = _untrained_checkpoint("maml", tmp_path / "maml.safetensors", inner_lr=0.4, test_inner_steps=2)
    reader = InputReader.from_checkpoint(ckpt)
    support = reader.read_support(user_folders / "support")
    query = reader.read_query(user_folders / "query")
    classes = sorted(set(support.labels))
    support_y = torch.tensor([classes.index(c) for c in support.labels])
    model = load_learner(ckpt).model
    reference = {steps: adapted_probabilities(model.double(), support.x.double(), support_y, query.x.double(),
                                              steps=steps, lr=0.4).numpy() for steps in (0, 1, 2)}
    expected = dict(zip(query.names, reference[2]))
    for fewer in (0, 1):  # adapting with fewer steps than the checkpoint's 2 would be caught
        assert np.abs(reference[fewer] - reference[2]).max() > 1e-2
    model.float()

    one_class = tmp_path / "one-class"
    (one_class / FOLDERS[1]).mkdir(parents=True)
    for png in sorted((user_folders / "query" / FOLDERS[1]).glob("*.png"))[:2]:
        (one_class / FOLDERS[1] / png.name).write_bytes(png.read_bytes())
    runs = {}
    for label, folder, batch in (("all", user_folders / "query", "256"), ("batch-1", user_folders / "query", "1"),
                                 ("two files", one_class, "7")):
        out = tmp_path / f"{label}.csv"
        assert main(["adapt", str(ckpt), "--support", str(user_folders / "support"), "--query", str(folder),
                     "--out", str(out), "--batch-size", batch]) == 0
        runs[label] = {r["file"]: np.array([float(r[f"p({f})"]) for f in FOLDERS]) for r in read_csv(out)}
    for name, probs in runs["all"].items():
        # float32 against the float64 reference (batch norm amplifies rounding through the steps)
        assert np.abs(probs - expected[name]).max() < 1e-3, name
        assert np.abs(probs - runs["batch-1"][name]).max() <= 1.5e-6  # the CSV's 6 decimals, to rounding
    for name, probs in runs["two files"].items():
        assert np.abs(probs - runs["all"][name]).max() <= 1.5e-6


# ----------------------------------------------------------------------------- bad input
def _adapt_fails(capsys, *argv) -> str:
    """Run the command, expect exit 2 and one line on stderr, return that line."""
    assert main(["adapt", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kshot: error: "), err
    return err[0]


def test_bad_support_folders_are_one_line_errors(quick_run, user_folders, tmp_path, capsys, omniglot_pngs):
    query = user_folders / "query"
    support = tmp_path / "support"
    omniglot_pngs(support, CHARACTERS[:3], drawings=range(2))
    (support / "empty-class").mkdir()
    out = tmp_path / "never.csv"
    line = _adapt_fails(capsys, quick_run, "--support", support, "--query", query, "--out", out)
    assert "class folder 'empty-class'" in line and "holds no images" in line
    (support / "empty-class").rmdir()
    line = _adapt_fails(capsys, quick_run, "--support", support, "--query", query / FOLDERS[0],
                        "--shots", "3", "--out", out)
    assert "--shots 3: class 'Tengwar-character01'" in line and "has only 2" in line
    line = _adapt_fails(capsys, quick_run, "--support", tmp_path / "nope", "--query", query, "--out", out)
    assert "not found" in line
    line = _adapt_fails(capsys, quick_run, "--support", support, "--query", query, "--out", out)
    assert "query class 'Tengwar-character04' is not one of the support classes" in line
    png = next((support / FOLDERS[0]).iterdir())
    line = _adapt_fails(capsys, quick_run, "--support", png, "--query", query, "--out", out)
    assert "is a file, but support images need their class" in line
    assert not out.exists()
    line = _adapt_fails(capsys, quick_run, "--support", user_folders / "support", "--query", query,
                        "--out", tmp_path)
    assert f"--out {tmp_path} is a folder" in line


def test_unreadable_images_are_skipped_with_a_count(quick_run, user_folders, tmp_path, capsys, omniglot_pngs):
    support = tmp_path / "support"
    omniglot_pngs(support, CHARACTERS[:2], drawings=range(3))
    (support / FOLDERS[0] / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    query = tmp_path / "query"
    omniglot_pngs(query, CHARACTERS[:2], drawings=range(10, 12))
    (query / FOLDERS[1] / "photo.jpg").write_text("this is text, not a JPEG")
    out = tmp_path / "p.csv"
    assert main(["adapt", str(quick_run), "--support", str(support), "--query", str(query),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "kshot: warning: skipped 1 unreadable image of 7 in" in err and "corrupt.png" in err
    assert "kshot: warning: skipped 1 unreadable image of 5 in" in err and "photo.jpg" in err
    assert "Traceback" not in err
    assert len(read_csv(out)) == 4


def test_checkpoint_without_an_image_format_is_a_clear_error(user_folders, tmp_path, capsys):
    ckpt = _untrained_checkpoint("protonet", tmp_path / "c.safetensors", image_format=None)
    line = _adapt_fails(capsys, ckpt, "--support", user_folders / "support", "--query",
                        user_folders / "query", "--out", tmp_path / "p.csv")
    assert "records neither an image format nor table columns" in line
    line = _adapt_fails(capsys, tmp_path / "missing.safetensors", "--support", user_folders / "support",
                        "--query", user_folders / "query")
    assert "not found" in line


def test_python_api_predicts_names_and_checks_shapes(quick_run, user_folders):
    reader = InputReader.from_checkpoint(quick_run)
    assert reader.image_format == OMNIGLOT_FORMAT
    support = reader.read_support(user_folders / "support")
    model = AdaptedModel(load_learner(quick_run), support.x, support.labels)
    query = reader.read_query(user_folders / "query" / FOLDERS[3])
    assert query.labels is None
    names = model.predict(query.x)
    assert len(names) == 15 and names.count(FOLDERS[3]) >= 6  # chance: 3
    assert model.predict_proba(query.x).shape == (15, 5)
    with pytest.raises(DataError, match=r"query examples have shape \(3, 84, 84\) but the model was "
                                        r"adapted to examples of shape \(1, 28, 28\)"):
        model.predict(torch.rand(2, 3, 84, 84))


# ----------------------------------------------------------------------------- your own data
def test_train_on_an_image_folder_then_adapt(user_folders, tmp_path, capsys, omniglot_pngs, cache_dir):
    """``kshot train --dataset folder`` draws and records a class split, and the checkpoint
    adapts to another folder."""
    data = tmp_path / "mine"
    omniglot_pngs(data, [f"Angelic/character{i:02d}" for i in range(1, 21)], drawings=range(8))
    run = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data-path", str(data), "--extra", '{"invert": true}',
            "--run-dir", str(run), "--ways", "3", "--shots", "1", "--queries", "2", "--test-queries", "2", "--steps", "6",
            "--val-every", "3", "--val-tasks", "5", "--test-tasks", "0", "--checkpoint-every", "3",
            "--backbone-options", '{"hidden": 16}', "--quiet"]
    assert main(argv) == 0
    split = json.loads((run / "classes.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [13, 3, 4]
    config = json.loads((run / "config.json").read_text())
    assert config["split_file"] == str((run / "classes.json").resolve())
    # The run repeats: same split file, resumes to the end without error.
    assert main(argv[:-1] + ["--steps", "8", "--quiet"]) == 0
    assert json.loads((run / "classes.json").read_text()) == split
    assert InputReader.from_checkpoint(run).image_format == OMNIGLOT_FORMAT
    out = tmp_path / "p.csv"
    assert main(["adapt", str(run), "--support", str(user_folders / "support"), "--query",
                 str(user_folders / "query"), "--out", str(out)]) == 0
    assert len(read_csv(out)) == 75


def test_train_on_a_table_then_adapt_with_csv_files(tmp_path, capsys, omniglot_table):
    table = omniglot_table(tmp_path / "characters.csv", n_classes=25)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "table", "--data-path", str(table), "--backbone", "mlp",
                 "--backbone-options", '{"hidden": [64, 64]}', "--extra", '{"label_column": "character"}',
                 "--run-dir", str(run), "--ways", "5", "--shots", "1", "--queries", "3", "--steps", "20",
                 "--val-every", "0", "--test-tasks", "0", "--quiet"]) == 0
    split = json.loads((run / "classes.json").read_text())
    rows = list(csv.reader(table.open()))
    header, body = rows[0], rows[1:]
    test_rows = [r for r in body if r[0] in split["test"]][:100]  # 5 test characters x 20 drawings
    support = [r for i, r in enumerate(test_rows) if i % 20 < 5]
    query = [r[1:] for i, r in enumerate(test_rows) if i % 20 >= 5]
    with open(tmp_path / "support.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + support)
    with open(tmp_path / "query.csv", "w", newline="") as f:  # no label column, columns reordered
        csv.writer(f).writerows([header[:0:-1]] + [r[::-1] for r in query])
    out = tmp_path / "p.csv"
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"), "--query",
                 str(tmp_path / "query.csv"), "--out", str(out)]) == 0
    predictions = read_csv(out)
    assert len(predictions) == 75 and list(predictions[0])[:2] == ["row", "predicted"]
    assert [p["row"] for p in predictions[:3]] == ["1", "2", "3"]
    truth = [r[0] for i, r in enumerate(test_rows) if i % 20 >= 5]
    accuracy = np.mean([p["predicted"] == t for p, t in zip(predictions, truth)])
    assert accuracy > 0.5  # chance is 0.2
    line = _adapt_fails(capsys, run, "--support", tmp_path, "--query", tmp_path / "query.csv",
                        "--out", tmp_path / "x.csv")
    assert "is a folder, but this checkpoint was trained on a table" in line


# ----------------------------------------------------------------------------- defects seen in use
def _light_on_dark(src, dst):
    """Copies of the PNGs under ``src`` with light strokes on a dark ground (as some scans are)."""
    from PIL import ImageOps

    for png in src.rglob("*.png"):
        target = dst / png.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            ImageOps.invert(image.convert("L")).save(target)
    return dst


def test_light_on_dark_images_are_read_as_the_dark_on_light_originals(quick_run, user_folders, tmp_path, capsys):
    """The defect: light-on-dark strokes were inverted again, silently (42.7 % instead of 80 %)."""
    query = user_folders / "query" / FOLDERS[0]
    flipped = _light_on_dark(query, tmp_path / "flipped")
    runs = {}
    for name, folder in (("original", query), ("flipped", flipped)):
        out = tmp_path / f"{name}.csv"
        assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"), "--query", str(folder),
                     "--out", str(out)]) == 0
        runs[name] = (read_csv(out), capsys.readouterr().out)
    (original, said_original), (flipped_rows, said_flipped) = runs["original"], runs["flipped"]
    assert [r["predicted"] for r in original] == [r["predicted"] for r in flipped_rows]
    for a, b in zip(original, flipped_rows):
        assert all(abs(float(a[f"p({f})"]) - float(b[f"p({f})"])) < 1e-3 for f in FOLDERS)
    assert "(25 of 25 support, 15 of 15 query)" in said_original  # dark on light: inverted
    assert "(25 of 25 support, 0 of 15 query)" in said_flipped  # already light on dark: kept


def test_single_query_files_are_accepted(quick_run, user_folders, tmp_path, capsys):
    files = sorted((user_folders / "query" / FOLDERS[1]).glob("*.png"))[:2]
    out = tmp_path / "p.csv"
    assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"), "--query", str(files[0]),
                 "--out", str(out)]) == 0
    assert [r["file"] for r in read_csv(out)] == [str(files[0])]
    assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"), "--query",
                 str(files[0]), str(files[1]), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["file"] for r in rows] == [str(f) for f in files] and rows[0]["predicted"] in FOLDERS


def test_query_images_that_copy_support_images_are_counted(quick_run, user_folders, tmp_path, capsys):
    import shutil

    query = tmp_path / "query"
    shutil.copytree(user_folders / "query" / FOLDERS[2], query)
    copied = sorted((user_folders / "support" / FOLDERS[2]).glob("*.png"))[0]
    shutil.copy(copied, query / "copy.png")
    assert main(["adapt", str(quick_run), "--support", str(user_folders / "support"), "--query", str(query),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert (f"kshot: warning: 1 of the 16 query images are exact copies of support images (file copy.png = "
            f"support file {FOLDERS[2]}/{copied.name})") in capsys.readouterr().err


def test_a_run_on_a_folder_is_evaluated_from_another_directory_and_after_moving(
        tmp_path, capsys, omniglot_pngs, monkeypatch, cache_dir):
    """The defect: data_path was stored relative to where training ran, and eval had no --data-path."""
    import shutil

    work = tmp_path / "work"
    omniglot_pngs(work / "mine", [f"Angelic/character{i:02d}" for i in range(1, 21)], drawings=range(4))
    monkeypatch.chdir(work)
    assert main(["train", "--dataset", "folder", "--data-path", "mine", "--extra", '{"invert": true}',
                 "--run-dir", "run", "--ways", "3", "--shots", "1", "--queries", "1", "--test-queries", "1",
                 "--steps", "2", "--val-every", "0", "--test-tasks", "0", "--backbone-options", '{"hidden": 8}',
                 "--quiet"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    eval_args = ["--tasks", "600", "--queries", "1", "--quiet"]
    assert main(["eval", str(work / "run"), *eval_args]) == 0
    assert "accuracy" in capsys.readouterr().out
    shutil.move(str(work), str(tmp_path / "moved"))  # the run and its data, somewhere else
    assert main(["eval", str(tmp_path / "moved" / "run"), *eval_args]) == 2
    assert "pass --data-path with where it is now" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "moved" / "run"), "--data-path", str(tmp_path / "moved" / "mine"),
                 *eval_args]) == 0
