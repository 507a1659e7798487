"""Training that cannot go on says so in one line: a diverged loss, an unwritable run directory,
a resumption that would change the learning rate, options of another learner."""

from __future__ import annotations

import errno

import pytest
import torch

from kshot.cli import main
from kshot.config import resolve_config
from kshot.errors import CheckpointError, ConfigError, TrainingError
from kshot.runs.build import learner_from_checkpoint
from kshot.runs.train import train
from kshot.services.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A few cheap ProtoNet steps on real Omniglot (a narrow Conv4, one query per class).
TINY = dict(backbone_options={"hidden": 8}, queries=1, val_every=0, test_tasks=0, checkpoint_every=1,
            log_every=1)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kshot: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_diverging_run_stops_at_its_first_step_with_one_line_and_no_checkpoint(tmp_path, capsys, cache_dir):
    """The defect: --inner-lr 1e30 trained to the end with NaN loss, exit 0, '20.00 ± 0.00 %', and
    saved NaN weights in best.safetensors."""
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--preset", "quick", "--algo", "maml", "--inner-lr", "1e30",
                         "--steps", "20", "--val-every", "5", "--test-tasks", "0", "--checkpoint-every", "1",
                         "--cache-dir", str(cache_dir), "--run-dir", str(run), "--quiet")
    line = one_line(err)
    assert code == 2 and "step 1:" in line and "not finite" in line
    assert "--inner-lr (now 1e+30)" in line and "--lr" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and "meta-test" not in out  # no checkpoint


def test_a_run_that_diverges_later_keeps_its_last_finite_checkpoint(tmp_path, cache_dir, monkeypatch):
    config = resolve_config("quick", overrides=dict(TINY, steps=6, cache_dir=str(cache_dir)))
    from kshot.learners import ProtoNet

    real = ProtoNet.meta_gradient

    def poisoned(self, tasks, scale=1.0):  # step 4's meta-gradient overflows
        metrics = real(self, tasks, scale)
        if self.training and poisoned.calls == 3:
            next(self.parameters()).grad.fill_(float("inf"))
        poisoned.calls += 1
        return metrics

    poisoned.calls = 0
    monkeypatch.setattr(ProtoNet, "meta_gradient", poisoned)
    with pytest.raises(TrainingError, match=r"step 4: the meta-gradient of model\.0\.0\.weight is not finite"
                                            r".* holds step 3"):
        train(config, tmp_path, progress=False)
    last = load_checkpoint(tmp_path / "last.safetensors")
    assert last.train_state["step"] == 3
    assert all(torch.isfinite(t).all() for t in last.state_dict.values())


def test_eval_and_adapt_refuse_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    from kshot.learners import ProtoNet
    from kshot.models import create_model

    learner = ProtoNet(create_model("conv4", hidden=8))
    with torch.no_grad():
        learner.model[0][0].weight[0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "best.safetensors", learner, config={"dataset": "omniglot"},
                           extra={"image_format": {"channels": 1, "size": 28, "invert": True},
                                  "example_shape": [1, 28, 28]})
    with pytest.raises(CheckpointError, match="non-finite weights .* model.0.0.weight"):
        learner_from_checkpoint(load_checkpoint(path))
    code, out, err = cli(capsys, "eval", str(path), "--tasks", "600")
    assert code == 2 and "non-finite" in one_line(err) and out == ""
    (tmp_path / "support" / "a").mkdir(parents=True)
    code, _, err = cli(capsys, "adapt", str(path), "--support", str(tmp_path / "support"),
                       "--query", str(tmp_path / "support"), "--out", str(tmp_path / "p.csv"))
    assert code == 2 and "non-finite" in one_line(err) and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_resuming_with_other_steps_is_refused_where_the_schedule_runs_over_the_steps(tmp_path, cache_dir, schedule):
    """The defect: the rate of the steps to come silently changed, although RESUMABLE_CHANGES
    promised that steps does not change what is learned."""
    first = resolve_config("quick", overrides=dict(TINY, steps=4, lr_schedule=schedule, cache_dir=str(cache_dir)))
    train(first, tmp_path, progress=False, stop_after=2)
    longer = resolve_config("quick", overrides=dict(TINY, steps=8, lr_schedule=schedule, cache_dir=str(cache_dir)))
    with pytest.raises(ConfigError, match=f"--steps 4, and its {schedule} learning-rate schedule"):
        train(longer, tmp_path, progress=False)
    assert train(first, tmp_path, progress=False).step == 4  # the same steps resume


def test_resuming_a_step_schedule_with_more_steps_keeps_the_rates_of_an_uninterrupted_run(tmp_path, cache_dir):
    settings = dict(TINY, lr_schedule="step", lr_decay_every=2, lr_decay_factor=0.5, cache_dir=str(cache_dir))
    train(resolve_config("quick", overrides=dict(settings, steps=3)), tmp_path / "resumed", progress=False)
    resumed = train(resolve_config("quick", overrides=dict(settings, steps=6)), tmp_path / "resumed", progress=False)
    clean = train(resolve_config("quick", overrides=dict(settings, steps=6)), tmp_path / "clean", progress=False)
    assert resumed.step == clean.step == 6
    a, b = (load_checkpoint(p / "last.safetensors") for p in (tmp_path / "resumed", tmp_path / "clean"))
    for key in b.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, capsys, cache_dir):
    (tmp_path / "a-file").write_text("")
    code, _, err = cli(capsys, "train", "--preset", "quick", "--steps", "2", "--cache-dir", str(cache_dir),
                       "--run-dir", str(tmp_path / "a-file" / "run"), "--quiet")
    assert code == 2 and "cannot write the run directory's" in one_line(err) and "a-file is a file" in one_line(err)


def test_a_full_disk_during_training_is_one_line(tmp_path, capsys, cache_dir, monkeypatch):
    import kshot.runs.train as trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    code, _, err = cli(capsys, "train", "--preset", "quick", "--steps", "2", "--backbone-options", '{"hidden": 8}',
                       "--val-every", "0", "--test-tasks", "0", "--cache-dir", str(cache_dir),
                       "--run-dir", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "No space left on device" in one_line(err) and "resume" in one_line(err)


@pytest.mark.parametrize("args, match", [
    (["--similarity", "kotch"], "--similarity kotch is an option of siamese, which protonet does not use"),
    (["--algo", "maml", "--distance", "euclid"], "--distance euclid is an option of protonet, which maml"),
    (["--inner-lr", "0.1"], "--inner-lr 0.1 is an option of"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--ways", "1", "--test-ways", "1"], "1-way tasks have one possible answer"),
])
def test_settings_that_the_run_cannot_use_are_refused_before_any_data_is_read(tmp_path, capsys, args, match):
    code, _, err = cli(capsys, "train", "--preset", "quick", "--data-dir", str(tmp_path / "no-data"),
                       "--cache-dir", str(tmp_path / "no-cache"), "--run-dir", str(tmp_path / "run"), "--quiet", *args)
    assert code == 2 and match in one_line(err)


# ----------------------------------------------------------------------------- kshot eval
@pytest.fixture
def tiny_checkpoint(tmp_path):
    from kshot.learners import ProtoNet
    from kshot.models import create_model

    config = resolve_config("quick", overrides={"backbone_options": {"hidden": 8}}).to_dict()
    return save_checkpoint(tmp_path / "best.safetensors", ProtoNet(create_model("conv4", hidden=8)), config=config,
                           extra={"image_format": {"channels": 1, "size": 28, "invert": True},
                                  "example_shape": [1, 28, 28]})


@pytest.mark.parametrize("args, match", [
    (["--queries", "0"], "--queries must be at least 1, not 0"),   # was: MSE nan ± nan, exit 0
    (["--ways", "1"], "one-way tasks have one possible answer"),
    (["--device", "gpu"], "unknown device 'gpu'"),
])
def test_eval_refuses_settings_it_cannot_report_on(tiny_checkpoint, capsys, args, match):
    code, out, err = cli(capsys, "eval", str(tiny_checkpoint), "--tasks", "600", *args)
    assert code == 2 and match in one_line(err) and out == ""


def test_eval_with_an_unwritable_out_fails_before_it_evaluates(tiny_checkpoint, tmp_path, capsys):
    """The defect: the result was printed, then a traceback."""
    (tmp_path / "a-file").write_text("")
    code, out, err = cli(capsys, "eval", str(tiny_checkpoint), "--tasks", "600", "--out",
                         str(tmp_path / "a-file" / "result.json"))
    assert code == 2 and "cannot write the result file" in one_line(err) and out == ""
