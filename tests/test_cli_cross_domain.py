"""Cross-domain evaluation from the command line: train on one text source, test on another."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kshot.services.checkpoint import load_checkpoint
from kshot.cli import main
from kshot.config import TrainConfig
from kshot.data import ArrayDataset, load_dataset
from kshot.tasks import task_sampler
from kshot.tasks import TaskSampler
from kshot.runs.train import train

TINY = ["--steps", "4", "--val-every", "2", "--val-tasks", "10", "--checkpoint-every", "2",
        "--test-tasks", "0", "--threads", "1", "--quiet", "--no-resume"]


@pytest.fixture(scope="module")
def multi_source_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "text"
    argv = ["train", "--dataset", "clinc150+banking77", "--episodes", "variable", "--backbone",
            "feature_weights", "--distance", "cosine", "--lr", "0.01", "--ways", "5", "--shots", "5",
            "--extra", '{"features": {"dim": 256}}', "--run-dir", str(run), *TINY]
    assert main(argv) == 0
    return run


def test_variable_multi_source_training_records_the_featuriser(multi_source_run):
    ckpt = load_checkpoint(multi_source_run / "best.safetensors")
    assert ckpt.extra["text_features"]["dim"] == 256
    assert ckpt.extra["example_shape"] == [256]
    assert ckpt.config["episodes"] == "variable" and ckpt.config["dataset"] == "clinc150+banking77"
    records = [json.loads(line) for line in (multi_source_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4]


def test_eval_on_another_dataset_and_on_episodes(multi_source_run, tmp_path, capsys):
    out = tmp_path / "banking.json"
    assert main(["eval", str(multi_source_run), "--dataset", "banking77", "--shots", "5", "--tasks", "600",
                 "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "banking77" and result["tasks"] == 600 and result["shots"] == 5
    assert 0.2 < result["acc"] <= 1.0 and result["acc_ci95"] > 0
    assert "banking77" in capsys.readouterr().out
    out = tmp_path / "episodes.json"
    assert main(["eval", str(multi_source_run), "--dataset", "clinc150", "--episodes", "variable",
                 "--tasks", "600", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["episodes"] == "variable" and result["ways"] is None and result["tasks"] == 600


def test_eval_featurises_text_as_the_checkpoint_says(tmp_path):
    # The config names no featuriser settings (defaults would give 4,096-d vectors); only the
    # checkpoint's record says 128, and evaluation must follow it.
    data = load_dataset("clinc150", "train", features={"dim": 128})
    config = TrainConfig(dataset="clinc150", backbone="feature_weights", steps=2, val_every=0,
                         test_tasks=0, threads=1)
    train(config, tmp_path / "run", progress=False, sampler=TaskSampler(data, 5, 1, 2))
    assert load_checkpoint(tmp_path / "run").extra["text_features"]["dim"] == 128
    assert main(["eval", str(tmp_path / "run"), "--dataset", "banking77", "--tasks", "600", "--quiet",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["tasks"] == 600


def test_eval_on_data_of_another_kind_is_a_one_line_error(tmp_path, capsys):
    images = ArrayDataset(torch.rand(40, 1, 8, 8), np.repeat(np.arange(8), 5))
    config = TrainConfig(dataset="clinc150", backbone="mlp", steps=1, val_every=0, test_tasks=0)
    train(config, tmp_path / "run", progress=False, sampler=task_sampler(images, "fixed", 5, 1, 1))
    assert main(["eval", str(tmp_path / "run"), "--dataset", "banking77", "--tasks", "600"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shape (1, 8, 8)" in err and "(4096,)" in err
    assert main(["train", "--dataset", "clinc150", "--extra", '{"features": {"dims": 3}}',
                 "--run-dir", str(tmp_path / "bad"), *TINY]) == 2
    assert "unknown text feature settings" in capsys.readouterr().err
    assert main(["train", "--dataset", "clinc150", "--episodes", "random",
                 "--run-dir", str(tmp_path / "bad"), *TINY]) == 2
