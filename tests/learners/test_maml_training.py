"""The MAML family through the trainer and the command line: sinusoid regression reports MSE,
Omniglot runs log the inner loop beside meta-validation, and runs resume exactly."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kshot.services.checkpoint import load_checkpoint
from kshot.config import resolve_config
from kshot.runs.train import train


# Tiny models: more threads only wait for each other (badly so on a shared machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = Path(__file__).resolve().parents[2]


def kshot(*args: str) -> subprocess.CompletedProcess:
    # One thread: these models are tiny, and on a shared machine more threads only wait for each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kshot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_sinusoid_run_reports_mse_and_plots_the_adapted_curves(tmp_path):
    config = resolve_config("maml-sinusoid-10shot", overrides=dict(
        steps=60, val_every=30, val_tasks=50, test_tasks=600, log_every=10, checkpoint_every=30))
    result = train(config, tmp_path / "run", progress=False)
    test = result.test
    assert math.isnan(test["acc"]) and test["tasks"] == 600
    # Predicting 0 everywhere scores E[A^2]/2 = 4.3 on this task family; 60 steps already beat it.
    assert test["loss"] < 4.0 and 0 < test["loss_ci95"] < 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [30, 60]
    assert val[-1]["query_loss_step1"] < val[-1]["query_loss_step0"]  # adaptation helps
    assert val[-1]["support_loss_step1"] < val[-1]["support_loss_step0"]
    assert all(r["support_loss_before"] > 0 for r in records if r["split"] == "train")
    assert (tmp_path / "run" / "adaptation.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["loss"] == pytest.approx(test["loss"])


def _straight_and_resumed_weights(config, tmp_path) -> dict:
    """Train ``config`` in one go and stopped after 3 steps then resumed; assert both end with the
    same weights, bit for bit, and return them."""
    straight = train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = train(config, tmp_path / "resumed", progress=False)
    assert straight.step == resumed.step == config.steps
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors").state_dict
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors").state_dict
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    return a


def test_meta_sgd_run_resumes_to_the_same_weights(tmp_path):
    config = resolve_config("metasgd-sinusoid-10shot", overrides=dict(
        steps=8, val_every=4, val_tasks=10, test_tasks=0, log_every=2, checkpoint_every=2, meta_batch_size=5))
    a = _straight_and_resumed_weights(config, tmp_path)
    assert any(k.startswith("inner_lrs.") for k in a)


def test_mamlpp_run_resumes_to_the_same_weights(tmp_path):
    # Every MAML++ option on, and schedules that change within the run (the multi-step loss, the
    # switch to second order, the cosine rate): stopped and resumed, it ends where one run does.
    config = resolve_config(overrides=dict(
        algo="maml", backbone_options={"hidden": 4}, ways=5, shots=1, queries=1, meta_batch_size=2, inner_steps=2,
        inner_lr=0.1, multi_step_loss=4, per_step_lr=True, per_step_bn=True, per_step_bn_stats=True,
        second_order_after=3, lr_schedule="cosine", steps=6, val_every=0, test_tasks=0, checkpoint_every=2,
        log_every=1))
    a = _straight_and_resumed_weights(config, tmp_path)
    assert any(k.startswith("step_statistics.") for k in a) and any("step_lrs" in k for k in a)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [("multi_step_loss" in r) for r in records if r["split"] == "train"] == [True] * 4 + [False] * 2


def test_cli_trains_and_evaluates_maml_on_omniglot(tmp_path):
    run_dir = tmp_path / "omniglot"
    result = kshot("train", "--algo", "fomaml", "--ways", "5", "--shots", "1", "--queries", "2",
                   "--backbone-options", '{"hidden": 8}', "--meta-batch-size", "2", "--steps", "4",
                   "--inner-steps", "2", "--test-inner-steps", "3", "--val-every", "2", "--val-tasks", "4",
                   "--test-tasks", "0", "--log-every", "2", "--threads", "1", "--quiet", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert re.search(r"best meta-validation: \d+\.\d+ ± \d+\.\d+ % at step \d \(5-way 1-shot\), non-transductive",
                     result.stdout), result.stdout
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line]
    assert {"query_acc_step0", "query_acc_step3", "support_loss_step3"} <= set(val[-1])
    assert "query_acc_step4" not in val[-1]  # test-time steps: 3
    assert val[-1]["transductive"] is False
    # The transductive protocol on request (the run was validated non-transductively, above), and
    # tasks of more ways than the 5-way head (once a crash).
    evaluated = kshot("eval", str(run_dir), "--tasks", "600", "--queries", "1", "--ways", "7", "--transductive",
                      "--quiet", "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "7-way 1-shot, 1 queries per class; transductive predictions" in evaluated.stdout
    assert re.search(r"accuracy \d+\.\d+ ± \d+\.\d+ % \(95% CI over 600 tasks\), transductive", evaluated.stdout)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["ways"] == 7 and record["transductive"] is True and record["inference"] == "transductive"
    assert record["acc"] > 1.5 / 7  # prototype heads on 7 classes, well above chance

    # Papers report one model after several numbers of test-time steps: --inner-steps.
    one = kshot("eval", str(run_dir), "--tasks", "600", "--queries", "2", "--inner-steps", "1", "--transductive",
                "--quiet", "--threads", "1", "--out", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    assert "transductive predictions, 1 inner step per task" in one.stdout, one.stdout
    record = json.loads((tmp_path / "one.json").read_text())
    assert record["inner_steps"] == 1
    _holds_k_steps_to_a_plain_loop(run_dir, record, steps=1)
    from kshot import evaluate_checkpoint

    three = evaluate_checkpoint(run_dir, tasks=600, queries=2, transductive=True)  # the run's own 3 steps
    assert three.record["inner_steps"] == 3 and three.record["acc"] != record["acc"]
    _holds_k_steps_to_a_plain_loop(run_dir, three.record, steps=3)
    for args, pattern in ((["--inner-steps", "0"], "--inner-steps must be a whole number of steps >= 1"),
                          (["--inner-steps", "-2"], "--inner-steps must be")):
        bad = kshot("eval", str(run_dir), "--tasks", "600", *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and re.search(pattern, bad.stderr), bad.stderr


def _holds_k_steps_to_a_plain_loop(run_dir: Path, record: dict, steps: int, n_tasks: int = 12) -> None:
    """An evaluation's figure is evaluate() of the saved learner with k test steps; and on its
    first tasks, in float64, that is k plain SGD steps written here with torch.func (batch norm
    on each batch: the transductive protocol), not kshot's inner loop."""
    import torch.nn.functional as F
    from torch.func import functional_call

    from kshot import Task, evaluate, fixed_tasks, load_dataset, load_learner

    tasks = fixed_tasks(load_dataset("omniglot", "test"), 5, 1, 2, 600)
    learner = load_learner(run_dir)
    learner.test_inner_steps, learner.transductive = steps, True
    assert evaluate(learner, tasks).mean == pytest.approx(record["acc"], abs=1e-9)

    learner = learner.double()
    model, lr = learner.model, learner.inner_lr
    first = [Task(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes)
             for _, t in zip(range(n_tasks), tasks)]
    by_task = []
    for task in first:
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, params, (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():  # the query loss: accuracy could hide a difference
            by_task.append(float(F.cross_entropy(functional_call(model, params, (task.query_x,)), task.query_y)))
    assert evaluate(learner, first).losses.tolist() == pytest.approx(by_task, rel=1e-9, abs=1e-9)


def test_cli_reports_mse_for_regression_and_refuses_bad_settings(tmp_path):
    run_dir = tmp_path / "sine"
    result = kshot("train", "--preset", "maml-sinusoid-5shot", "--steps", "6", "--val-every", "3",
                   "--val-tasks", "10", "--test-tasks", "600", "--log-every", "3", "--quiet", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert re.search(r"meta-test \(600 tasks, 1-way 5-shot\): MSE \d+\.\d+ ± \d+\.\d+, non-transductive",
                     result.stdout), result.stdout
    assert json.loads((run_dir / "results.json").read_text())["test"]["transductive"] is False
    evaluated = kshot("eval", str(run_dir), "--tasks", "600", "--queries", "50", "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"MSE \d+\.\d+ ± \d+\.\d+ \(95% CI over 600 tasks\)", evaluated.stdout), evaluated.stdout
    for args, pattern in ((["--algo", "maml", "--head-init", "zeros"], "head_init learned or prototypes"),
                          (["--algo", "maml", "--batch-tasks", "sometimes"], "unknown batch_tasks"),
                          (["--algo", "metasgd", "--inner-lr", "0"], "inner_lr must be positive")):
        bad = kshot("train", *args, "--steps", "1", "--run-dir", str(tmp_path / "bad"), "--quiet")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert re.search(pattern, bad.stderr), bad.stderr
