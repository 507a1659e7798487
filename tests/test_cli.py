"""The command line: what it prints, and one clear line with exit status 2 for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kshot(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kshot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kshot: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.slow
def test_eval_prints_mean_and_confidence_interval(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "eval.json"
    result = kshot("eval", str(run_dir), "--ways", "5", "--shots", "1", "--queries", "5", "--tasks", "600", "--quiet", "--threads", "1",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr
    match = re.search(r"accuracy (\d+\.\d+) ± (\d+\.\d+) % \(95% CI over 600 tasks\)", result.stdout)
    assert match, result.stdout
    assert 60 < float(match.group(1)) <= 100 and 0 < float(match.group(2)) < 5
    record = json.loads(out.read_text())
    assert record["tasks"] == 600 and record["ways"] == 5 and record["algo"] == "protonet"
    # The command is the API's evaluate_checkpoint, which is evaluate() on the fixed test tasks.
    from kshot import evaluate, evaluate_checkpoint, fixed_tasks, load_dataset, load_learner

    api = evaluate_checkpoint(run_dir, ways=5, shots=1, queries=5, tasks=600)
    assert api.record["acc"] == pytest.approx(record["acc"], abs=1e-12)
    direct = evaluate(load_learner(run_dir), fixed_tasks(load_dataset("omniglot", "test"), 5, 1, 5, 600))
    assert direct.mean == pytest.approx(record["acc"], abs=1e-12)


def test_eval_refuses_fewer_than_600_tasks(trained_run):
    assert_one_line_error(kshot("eval", str(trained_run[0]), "--tasks", "100"), "at least 600")


def test_eval_of_impossible_tasks_is_one_line(trained_run):
    run_dir = str(trained_run[0])
    assert_one_line_error(kshot("eval", run_dir, "--ways", "5000", "--tasks", "600"),
                          "cannot draw 5000-way tasks")
    assert_one_line_error(kshot("eval", run_dir, "--shots", "10", "--queries", "15", "--tasks", "600"),
                          "need 25 examples per class")


def test_unreadable_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(kshot("eval", str(bad)), "not a readable kshot checkpoint")
    assert_one_line_error(kshot("eval", str(tmp_path / "missing.safetensors")), "not found")


def test_unknown_preset_and_bad_settings_are_one_line(tmp_path):
    assert_one_line_error(kshot("train", "--preset", "protonet-imagenet-99way", "--run-dir", str(tmp_path)),
                          "unknown preset")
    assert_one_line_error(kshot("train", "--preset", "quick", "--optimizer", "lbfgs", "--run-dir", str(tmp_path)),
                          "unknown optimizer")
    assert_one_line_error(kshot("train", "--preset", "quick", "--seed", "-1", "--run-dir", str(tmp_path)),
                          "seed must be a non-negative integer")
    config = tmp_path / "bad.toml"
    config.write_text("ways = 'five'\n")
    assert_one_line_error(kshot("train", "--config", str(config), "--run-dir", str(tmp_path)),
                          "ways must be of type int")
    assert not (tmp_path / "last.safetensors").exists()


def test_missing_archive_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    cache = tmp_path / "cache"
    result = kshot("train", "--preset", "quick", "--data-dir", str(empty), "--cache-dir", str(cache),
                   "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "images_background.zip not found")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not list(cache.rglob("*.npz"))


def test_presets_lists_the_paper_settings():
    result = kshot("presets")
    assert result.returncode == 0
    assert "protonet-omniglot-20way-5shot" in result.stdout and "98.9%" in result.stdout
