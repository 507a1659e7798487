"""The outer loop on real Omniglot: it learns, it resumes exactly after SIGKILL, it refuses to mix runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kshot.services.checkpoint import load_checkpoint
from kshot.config import resolve_config
from kshot.errors import ConfigError
from kshot.runs.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_training_run_is_far_above_chance(trained_run):
    run_dir, result = trained_run
    assert result.step == 300
    assert result.test["tasks"] == 600 and result.test["ways"] == 5
    assert result.test["acc"] > 0.6  # chance is 0.2
    assert 0 < result.test["acc_ci95"] < 0.05
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert [r["step"] for r in records if r["split"] == "val"] == [150, 300]
    for name in ("best.safetensors", "last.safetensors", "config.json", "curves.png", "results.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "results.json").read_text())["test"]["acc"] == result.test["acc"]


def _kshot(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kshot", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


RESUME_ARGS = ["train", "--preset", "quick", "--steps", "120", "--queries", "5", "--checkpoint-every", "10",
               "--val-every", "40", "--val-tasks", "10", "--test-tasks", "0", "--log-every", "10",
               "--threads", "1", "--seed", "5", "--quiet"]


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    interrupted, clean = tmp_path / "interrupted", tmp_path / "clean"
    proc = _kshot(*RESUME_ARGS, "--run-dir", str(interrupted))
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        last = interrupted / "last.safetensors"
        if last.is_file():
            step = load_checkpoint(last).train_state["step"]
            if step >= 30:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.02)
    assert killed_at is not None and killed_at < 120, "the run was not interrupted part way"

    resumed = _kshot(*RESUME_ARGS, "--run-dir", str(interrupted))
    uninterrupted = _kshot(*RESUME_ARGS, "--run-dir", str(clean))
    for p in (resumed, uninterrupted):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a = load_checkpoint(interrupted / "last.safetensors")
    b = load_checkpoint(clean / "last.safetensors")
    assert a.train_state["step"] == b.train_state["step"] == 120
    for key in b.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()

    def train_losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]

    assert train_losses(interrupted) == train_losses(clean)  # no duplicated or missing records


STOP_ARGS = ["train", "--preset", "quick", "--steps", "60", "--queries", "5", "--checkpoint-every", "1000",
             "--val-every", "0", "--test-tasks", "0", "--log-every", "2", "--threads", "1", "--seed", "3",
             "--quiet"]


def test_sigterm_stops_at_a_step_boundary_with_its_checkpoint_and_resumes_exactly(tmp_path):
    # checkpoint_every is beyond the run, so the only checkpoint before the end is the stop's own.
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    proc = _kshot(*STOP_ARGS, "--run-dir", str(stopped))
    metrics, deadline = stopped / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:  # 10 steps done
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = load_checkpoint(stopped / "last.safetensors").train_state["step"]
    assert 10 <= step < 60
    assert err.strip().splitlines() == [f"kshot: stopped by SIGTERM after step {step} of 60; "
                                        f"{stopped / 'last.safetensors'} holds it: the same command resumes "
                                        f"from there"]
    assert not list(stopped.glob(".*.tmp"))

    resumed = _kshot(*STOP_ARGS, "--run-dir", str(stopped))
    uninterrupted = _kshot(*STOP_ARGS, "--run-dir", str(clean))
    for p in (resumed, uninterrupted):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a, b = load_checkpoint(stopped / "last.safetensors"), load_checkpoint(clean / "last.safetensors")
    assert a.train_state["step"] == b.train_state["step"] == 60
    for key in b.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def test_resuming_with_other_settings_is_refused(tmp_path, cache_dir):
    config = resolve_config("quick", overrides=dict(steps=4, val_every=0, test_tasks=0, checkpoint_every=2,
                                                    cache_dir=str(cache_dir)))
    train(config, tmp_path, progress=False)
    other = resolve_config("quick", overrides=dict(steps=8, lr=0.01, val_every=0, test_tasks=0,
                                                   cache_dir=str(cache_dir)))
    with pytest.raises(ConfigError, match="other settings .*lr"):
        train(other, tmp_path, progress=False)
    longer = resolve_config("quick", overrides=dict(steps=6, val_every=0, test_tasks=0, checkpoint_every=2,
                                                    cache_dir=str(cache_dir)))
    assert train(longer, tmp_path, progress=False).step == 6  # more steps is a continuation


def test_data_waiting_is_measured_and_logged(trained_run):
    run_dir, _ = trained_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert all(0.0 <= r["data_wait"] < 1.0 and r["tasks_per_s"] > 0 for r in train_records)


def test_training_time_adds_up_across_resumption_and_snapshots_are_kept(tmp_path, cache_dir):
    """``train_seconds`` is the run's cumulative time in outer steps (a learning curve's x axis),
    carried across a resumption; ``snapshot_every`` keeps the weights of those steps."""
    settings = dict(steps=6, val_every=0, test_tasks=0, checkpoint_every=3, log_every=3, snapshot_every=3,
                    cache_dir=str(cache_dir))
    train(resolve_config("quick", overrides=settings), tmp_path, progress=False, stop_after=3)
    first = load_checkpoint(tmp_path / "last.safetensors").train_state["train_seconds"]
    train(resolve_config("quick", overrides=settings), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["train_seconds"] for r in records if r["split"] == "train"]
    assert len(seconds) == 2 and 0 < first == seconds[0] < seconds[1]
    assert load_checkpoint(tmp_path / "last.safetensors").train_state["train_seconds"] == seconds[1]
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snapshots == ["step-00000003.safetensors", "step-00000006.safetensors"]
    final = load_checkpoint(tmp_path / "last.safetensors").state_dict
    kept = load_checkpoint(tmp_path / "snapshots" / "step-00000006.safetensors").state_dict
    assert all(torch.equal(final[k], kept[k]) for k in final)
