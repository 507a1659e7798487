"""MAML-RL end to end: a short 2D-navigation run learns to adapt, resumes exactly, and the
command line evaluates and adapts the trained policy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kshot.config import resolve_config
from kshot.errors import ConfigError
from kshot.rl import env_family
from kshot.runs.adapt import adapt_policy
from kshot.runs.build import load_learner
from kshot.runs.train import Trainer, train
from kshot.services.checkpoint import load_checkpoint

from tests.conftest import one_thread

ROOT = Path(__file__).resolve().parents[2]


def kshot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kshot", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def nav2d_run(tmp_path_factory):
    """A short real MAML-RL run on 2D navigation (the paper's settings but a 32-32 policy, 10 tasks x 10
    episodes, 8 meta-iterations)."""
    config = resolve_config("maml-rl-nav2d", overrides=dict(
        backbone_options={"hidden": [32, 32]}, meta_batch_size=10, episodes_per_task=10, steps=8, val_every=4, val_tasks=10, checkpoint_every=4,
        test_tasks=0, test_inner_steps=1))
    run_dir = tmp_path_factory.mktemp("rl") / "nav2d"
    with one_thread():
        result = train(config, run_dir, progress=False)
    return run_dir, result


@pytest.mark.slow
def test_short_run_adapts_better_than_it_starts_on_held_out_goals(nav2d_run):
    run_dir, result = nav2d_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    assert len(train_rows) == 8 and all("return_pre" in r and "return_post" in r for r in train_rows)
    assert result.best_val is not None and "return_step1" in result.best_val
    learner = load_learner(run_dir)
    goals = env_family("nav2d", "test").fixed_tasks(60)
    with one_thread():
        evaluation = learner.evaluate_tasks(goals, steps=1)
    before, after = evaluation.mean(0), evaluation.mean(1)
    assert after - before > 2 * (evaluation.ci95(0) + evaluation.ci95(1)) / 2, evaluation.table()
    assert (run_dir / "curves.png").stat().st_size > 0


def tiny(outer_step: str, **overrides):
    return resolve_config("maml-rl-nav2d", overrides=dict(
        backbone_options={"hidden": [16]}, meta_batch_size=3, episodes_per_task=3, horizon=20, steps=4,
        val_every=0, checkpoint_every=2, test_tasks=0, outer_step=outer_step, **overrides))


@pytest.mark.parametrize("outer_step", ["trpo", "ppo"])
def test_resume_is_exact(tmp_path, outer_step):
    with one_thread():
        whole = Trainer(tiny(outer_step), tmp_path / "whole", progress=False)
        whole.fit()
        Trainer(tiny(outer_step), tmp_path / "split", progress=False).fit(stop_after=2)
        resumed = Trainer(tiny(outer_step), tmp_path / "split", progress=False)
        resumed.fit()
    assert resumed.step == 4
    a, b = whole.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["log_std"], torch.zeros_like(a["log_std"]))  # it trained
    def logged(run: str) -> list[dict]:  # what was learned, not how long it took
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith(("step", "return", "loss", "kl"))} for r in rows]
    assert logged("whole") == logged("split") and len(logged("whole")) == 4


def test_policies_and_environments_refuse_each_other():
    with pytest.raises(ConfigError, match="environment family"):
        Trainer(resolve_config(overrides=dict(algo="maml-rl", dataset="omniglot")), "unused", progress=False)
    with pytest.raises(ConfigError, match="family of environments"):
        Trainer(resolve_config(overrides=dict(algo="maml", dataset="nav2d")), "unused", progress=False)


@pytest.mark.slow
def test_kshot_eval_reports_returns_after_each_step_and_plots_them(nav2d_run, tmp_path):
    run_dir, _ = nav2d_run
    plot = tmp_path / "returns.png"
    result = kshot("eval", str(run_dir), "--tasks", "600", "--steps", "1", "--plot", str(plot), "--quiet",
                   "--threads", "1", "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"after (\d) steps?\s*:\s+(-?\d+\.\d+) ± (\d+\.\d+)", result.stdout)
    assert [int(r[0]) for r in rows] == [0, 1], result.stdout
    assert "95% CI over 600 tasks" in result.stdout
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["tasks"] == 600 and abs(record["return_step1"] - float(rows[1][1])) < 1e-3
    assert plot.stat().st_size > 0 and (tmp_path / "returns-trajectories.png").stat().st_size > 0


@pytest.mark.slow
def test_kshot_adapt_saves_the_adapted_policy(nav2d_run, tmp_path):
    run_dir, _ = nav2d_run
    out = tmp_path / "adapted.safetensors"
    result = kshot("adapt", str(run_dir), "--task", '{"goal": [0.3, -0.2]}', "--steps", "1", "--out", str(out),
                   "--threads", "1")
    assert result.returncode == 0, result.stderr
    returns = [float(x) for x in re.search(r"after 0\.\.1 steps: (.+)", result.stdout).group(1).split(", ")]
    assert len(returns) == 2
    adapted, meta = load_checkpoint(out), load_checkpoint(run_dir)
    assert adapted.extra["adapted_to"] == {"goal": [0.3, -0.2]} and adapted.extra["returns"] == pytest.approx(returns, abs=1e-3)
    assert any(not torch.equal(adapted.state_dict[k], meta.state_dict[k]) for k in meta.state_dict)
    with pytest.raises(ConfigError, match="two finite numbers"):
        adapt_policy(run_dir, '{"goal": [1, 2, 3]}')
    with pytest.raises(ConfigError, match="must be JSON"):
        adapt_policy(run_dir, "goal=1,2")
