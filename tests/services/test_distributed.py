"""Distributed meta-training: N gloo processes train the model one process trains.

The multi-process tests start real processes on this machine (gloo over localhost, a free port,
torchrun's environment variables) and always reap them; each takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kshot.config import TrainConfig
from kshot.services.distributed import (Distributed, RunningStatistics, current, env_world, launch,
                               process_device, rank_label)
from kshot.errors import ConfigError
from kshot.learners import LEARNERS
from kshot.runs.build import build_learner
from kshot.runs.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _worker_module():
    spec = importlib.util.spec_from_file_location("kshot_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _start(argv: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """``world_size`` processes running ``argv`` as the ranks of one run (as torchrun would)."""
    port = _free_port()
    return [subprocess.Popen(argv, env=_rank_env(r, world_size, port), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world_size)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    """Wait for the processes, killing any still running after ``timeout`` seconds in all;
    (exit code, or None when killed; stderr) of each."""
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append((p.returncode, err))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            outputs.append((None, err))
    return outputs


# ----------------------------------------------------------------------------- the meta-batch split
def test_ranks_split_each_meta_batch_into_equal_disjoint_shares():
    shares = [Distributed(rank=r, world_size=4).task_indices(12) for r in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]
    assert sorted(i for s in shares for i in s) == list(range(12))
    assert Distributed().task_indices(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="meta_batch_size 6 does not divide across 4 processes"):
        Distributed(rank=1, world_size=4).task_indices(6)


def _torchrun_env(monkeypatch, **values):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))


def test_indivisible_meta_batch_is_refused_before_any_process_waits(monkeypatch):
    # No MASTER_ADDR and nobody listening: reaching init_process_group would fail differently.
    _torchrun_env(monkeypatch, RANK=0, WORLD_SIZE=3, LOCAL_RANK=0)
    with pytest.raises(ConfigError, match="meta_batch_size 4 does not divide across 3 processes"):
        with launch("cpu", 5, meta_batch_size=4):
            pass
    assert not torch.distributed.is_initialized()


def test_launch_checks_torchruns_environment(monkeypatch):
    _torchrun_env(monkeypatch)
    with launch("cpu") as d:
        assert (d.rank, d.world_size, d.is_main, d.enabled) == (0, 1, True, False)
    assert env_world() is None and rank_label() == ""
    _torchrun_env(monkeypatch, RANK=1, WORLD_SIZE=2)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        with launch("cpu", meta_batch_size=2):
            pass
    assert rank_label() == "[rank 1/2] "
    _torchrun_env(monkeypatch, RANK=2, WORLD_SIZE=2)
    with pytest.raises(ConfigError, match="RANK=2 is not within WORLD_SIZE=2"):
        env_world()
    _torchrun_env(monkeypatch, RANK="one", WORLD_SIZE=2)
    with pytest.raises(ConfigError, match="RANK='one' must be an integer"):
        env_world()


def test_a_torchrun_process_without_a_process_group_is_refused(monkeypatch, omniglot):
    """Otherwise each process would train alone on the whole meta-batch, writing the same files."""
    _torchrun_env(monkeypatch, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0)
    with pytest.raises(ConfigError, match="one of 2 that torchrun started"):
        current()
    config = TrainConfig(steps=1, test_tasks=0, val_every=0)
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(config, "unused", sampler=LEARNERS["protonet"].make_sampler(config, omniglot("train")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_runs_need_cuda_and_one_gpu_per_process():
    assert process_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        process_device("cuda", 0, 2)


# ----------------------------------------------------------------------------- batch-norm statistics
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ranks_running_statistics_merge_into_one_process_s(momentum):
    """Rank k updates batch norm on the k-th part of the meta-batch; merged, the statistics are
    those of one process that ran every task in order (EMA and cumulative averages alike)."""
    torch.manual_seed(0)
    batches = [torch.randn(6, 3, 5, 5) * (1 + i) + i for i in range(6)]  # one forward per task
    single = torch.nn.BatchNorm2d(3, momentum=momentum)
    single.running_mean.normal_()  # a state from earlier steps
    single.num_batches_tracked.fill_(7)
    start = {k: v.clone() for k, v in single.state_dict().items()}
    for x in batches:
        single(x)

    world = 3
    ranks = []
    for r in range(world):
        bn = torch.nn.BatchNorm2d(3, momentum=momentum)
        bn.load_state_dict(start)
        ranks.append((Distributed(rank=r, world_size=world), bn, RunningStatistics(bn)))
    for d, bn, _ in ranks:
        for x in batches[2 * d.rank:2 * d.rank + 2]:
            bn(x)
    contributions = [stats.contributions(d) for d, _, stats in ranks]
    sums = [torch.stack(parts).sum(0) for parts in zip(*contributions)]  # what all-reduce(SUM) gives
    for _, bn, stats in ranks:
        stats.merge(sums)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(bn.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(ranks[0][1].num_batches_tracked) == 13


# ----------------------------------------------------------------------------- 2 processes = 1 process
def _learner_cases() -> list[str]:
    """A metric learner and a second-order gradient-based one."""
    return ["protonet", "maml"]


def _config(algo: str, cache_dir: Path, data_dir: Path) -> TrainConfig:
    # SGD, not Adam: Adam divides by sqrt(v), which turns float noise in the (zero) gradient
    # of a conv bias before batch norm into full-size steps, so no two summation orders agree.
    return TrainConfig(algo=algo, dataset="omniglot", backbone="conv4", backbone_options={"hidden": 8},
                       ways=5, shots=1, queries=3, test_queries=5, meta_batch_size=4, steps=4,
                       optimizer="sgd", lr=0.05, momentum=0.9, lr_schedule="constant", val_every=2,
                       val_tasks=7, checkpoint_every=2, log_every=1,
                       test_tasks=600 if algo == "protonet" else 0, seed=3, dist_timeout=60,
                       data_dir=str(data_dir), cache_dir=str(cache_dir)).validate()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _single_process_reference(config: TrainConfig, run_dir: Path, worker, test_tasks: int) -> dict:
    """What one process computes: the meta-gradient of the whole meta-batch 0, and a run."""
    from kshot.data import load_dataset
    from kshot.runs.build import dataset_settings

    dataset = load_dataset(config.dataset, "train", **dataset_settings(config))
    sampler = LEARNERS[config.algo].make_sampler(config, dataset)
    learner = build_learner(config, sampler.example_shape).train()
    learner.meta_gradient(sampler.meta_batch(0))
    trainer = Trainer(config, run_dir, progress=False,
                      test_tasks=worker.few_test_tasks(config, test_tasks))
    result = trainer.fit()
    return {"grads": {name: p.grad for name, p in learner.named_parameters() if p.grad is not None},
            "state": trainer.learner.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "result": result, "records": _records(run_dir)}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, data_dir, cache_dir):
    """Two ranks run every case of _learner_cases() (one launch); one process runs each
    meanwhile. Returns {algo: (config, reference, [rank outputs], run_dir)}."""
    root = tmp_path_factory.mktemp("distributed")
    worker = _worker_module()
    test_tasks = 10  # the trainer's final-test path, without 600 tasks' worth of time
    cases = {algo: _config(algo, cache_dir, data_dir) for algo in _learner_cases()}
    spec = {"out": str(root), "cases": [
        {"config": c.to_dict(), "run_dir": str(root / f"{algo}-two"), "stop_after": 2,
         "test_tasks": test_tasks} for algo, c in cases.items()]}
    (root / "spec.json").write_text(json.dumps(spec))
    procs = _start([sys.executable, str(WORKER), str(root / "spec.json")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two ranks have the cores; more threads would only contend
    try:
        references = {algo: _single_process_reference(c, root / f"{algo}-one", worker, test_tasks)
                      for algo, c in cases.items()}
    finally:
        torch.set_num_threads(threads)
        outcomes = _finish(procs, timeout=300)
    for rank, (code, err) in enumerate(outcomes):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return {algo: (c, references[algo],
                   [load_file(str(root / f"{algo}-rank{r}.safetensors")) for r in range(2)],
                   root / f"{algo}-two") for algo, c in cases.items()}


@pytest.mark.slow
@pytest.mark.parametrize("algo", _learner_cases())
def test_two_processes_train_the_model_one_process_trains(algo, two_process_runs):
    """Meta-gradient of a meta-batch, and weights, batch-norm statistics and optimiser state
    after training (interrupted and resumed in the 2-process run), equal one process's; so do
    the logs, validation and final test; a resume with other settings fails on every rank."""
    config, one, ranks, run_dir = two_process_runs[algo]
    for saved in ranks:
        assert {k[len("grad."):] for k in saved if k.startswith("grad.")} == set(one["grads"])
        # Float noise is relative to the gradient's scale (a conv bias before batch norm has a
        # true gradient of zero and a rounding-noise one).
        scale = max(float(g.abs().max()) for g in one["grads"].values())
        for name, grad in one["grads"].items():
            torch.testing.assert_close(saved[f"grad.{name}"], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        for name, value in one["state"].items():  # weights and batch-norm statistics
            torch.testing.assert_close(saved[f"state.{name}"], value, rtol=1e-4, atol=1e-5, msg=name)
        slots = {f"optim.{idx}.{key}": value for idx, state in one["optimizer"]["state"].items()
                 for key, value in state.items()}
        assert slots and set(slots) == {k for k in saved if k.startswith("optim.")}
        scale = max(float(v.abs().max()) for v in slots.values())
        for key, value in slots.items():  # momentum: sums of gradients, noise included
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)
    for key in ranks[0]:  # the ranks hold identical state
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)
    errors = []
    for r in range(2):
        with safe_open(str(run_dir.parent / f"{algo}-rank{r}.safetensors"), "pt") as f:
            errors.append(f.metadata().get("resume_error"))
    assert errors[0] == errors[1] and "holds a run with other settings (lr: 0.05 -> 0.1)" in errors[0]

    # Logs, validation and the final test: written once, by rank 0, equal to one process's.
    two = _records(run_dir)
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one["records"]]
    for a, b in zip(one["records"], two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-6)
    result = one["result"]
    with safe_open(str(run_dir.parent / f"{algo}-rank1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert int(meta["step"]) == config.steps
    assert json.loads(meta["best_val"])["acc"] == pytest.approx(result.best_val["acc"], abs=1e-6)
    if config.test_tasks:
        test_two = json.loads((run_dir / "results.json").read_text())["test"]
        assert test_two["tasks"] == result.test["tasks"] == 10
        assert test_two["acc"] == pytest.approx(result.test["acc"], abs=1e-6)
        assert json.loads(meta["test"])["acc"] == pytest.approx(result.test["acc"], abs=1e-6)


# ----------------------------------------------------------------------------- the command line
def _train_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "kshot", "train", "--run-dir", str(run_dir), "--backbone-options", '{"hidden": 8}',
            "--queries", "3", "--meta-batch-size", "2", "--val-every", "0", "--test-tasks", "0",
            "--log-every", "1", "--quiet", *extra]


@pytest.mark.slow
def test_torchrun_runs_kshot_train(tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *_train_argv(run_dir, "--steps", "3", "--checkpoint-every", "2")]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    # An exit hook in every rank, to see that the ranks end without the interpreter's teardown
    # (where torch's gloo teardown now and then aborts a finished process; see end_process).
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        "atexit.register(lambda: pathlib.Path(os.environ['KSHOT_TEST_EXITS'], "
        "f\"{os.getpid()}.exited\").touch())\n")
    env.update(KSHOT_TEST_EXITS=str(hooks), PYTHONPATH=os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")])))
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 stays quiet
    exited = sorted(hooks.glob("*.exited"))
    assert len(exited) == 1, exited  # torchrun's own agent ran its exit hooks; neither rank did
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3]  # logged once, not per rank
    from kshot.services.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir / "last.safetensors").train_state["step"] == 3


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_resumes(tmp_path):
    """A scheduler ends a torchrun job with SIGTERM, which torchrun passes to every rank: the
    ranks finish the step they are in, agree in the step's all-reduce on where to stop, rank 0
    writes that step's checkpoint and says so once, and the same command carries on from it.
    (Ranks that stopped at different steps would leave one waiting in an all-reduce: an error.)"""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *_train_argv(run_dir, "--steps", "400", "--checkpoint-every", "1000", "--dist-timeout", "60")]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    from kshot.services.checkpoint import load_checkpoint

    step = load_checkpoint(run_dir / "last.safetensors").train_state["step"]
    assert 5 <= step < 400, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kshot:")]
    assert lines == [f"kshot: stopped by SIGTERM after step {step} of 400; {run_dir / 'last.safetensors'} "
                     f"holds it: the same command resumes from there"], err[-3000:]
    assert "error" not in "\n".join(lines)
    resumed = subprocess.run([sys.executable, *_train_argv(run_dir, "--steps", str(step + 3),
                                                           "--checkpoint-every", "1000")],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _records(run_dir)] == list(range(1, step + 4))  # nothing lost or repeated


def test_end_process_keeps_what_was_printed_and_the_exit_status():
    """kshot under torchrun leaves with os._exit (skipping torch's exit-time teardown, which can
    abort a finished process): what was printed, still in the pipes' buffers, must get out, and
    the status must be the command's."""
    code = ("import sys\n"
            "from kshot.services.distributed import end_process, joined_a_group\n"
            "assert not joined_a_group()  # no process group was joined here\n"
            "print('run directory: x'); sys.stdout.write('y' * 5000)\n"
            "sys.stderr.write('kshot: error: z')\n"
            "end_process(3)\n"
            "print('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "run directory: x\n" + "y" * 5000
    assert proc.stderr == "kshot: error: z"


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_failed_rank_stops_the_others_with_a_clear_error(fault, tmp_path):
    """A killed rank makes the other fail at its next all-reduce; a stuck one, after the timeout."""
    run_dir = tmp_path / "run"
    procs = _start([sys.executable, *_train_argv(run_dir, "--steps", "100000", "--checkpoint-every",
                                                 "100000", "--dist-timeout", "5")])
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file():  # rank 0 has finished a step
            assert procs[0].poll() is None and procs[1].poll() is None, _finish(procs, 5)
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        t_fault = time.monotonic()
        code, err = _finish(procs[:1], timeout=90)[0]
        waited = time.monotonic() - t_fault
    finally:
        _finish(procs, timeout=1)
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kshot: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("kshot: error: [rank 0/2] rank 0 of 2: averaging the meta-gradient "
                               "failed: another process stopped, failed or took longer than the 5 s timeout")
    if fault == "hangs":
        assert waited >= 4, "a stuck rank must be waited for until the timeout"
