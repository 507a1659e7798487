"""The outer loop, one for every learner: meta-batches in, meta-gradient steps, validation on
fixed tasks, checkpoints that resume exactly, metrics in JSON lines and a plot.

Run directory layout::

    <run_dir>/config.json        the resolved TrainConfig
    <run_dir>/last.safetensors   weights + optimiser + step, written every checkpoint_every steps
    <run_dir>/best.safetensors   weights of the best meta-validation score so far
    <run_dir>/metrics.jsonl      one record per log_every training steps and per validation
    <run_dir>/curves.png         training and validation curves
    <run_dir>/results.json       final test accuracy (mean ± 95% CI) of the best checkpoint

Training is a pure function of the config: tasks ``(step, i)`` come from the seed, the
learning rate from the step, and everything else is in ``last.safetensors``. So a run killed at
any point and started again with the same command ends with the same weights as if it had never
stopped.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kshot.config import TrainConfig, config_from_dict
from kshot.data import SPLIT_FILE_DATASETS
from kshot.errors import CheckpointError, ConfigError, KshotError, TrainingError, TrainingStopped
from kshot.learners import Learner
from kshot.learners.base import protocol_name
from kshot.runs.build import (algorithms, build_learner, check_config, checkpoint_extra, evaluation_tasks,
                              load_split, non_finite_weights, resolve_device, training_tasks)
from kshot.runs.evaluate import EvalResult, evaluate
from kshot.services import distributed
from kshot.services.checkpoint import load_checkpoint, save_checkpoint
from kshot.services.distributed import Distributed
from kshot.services.files import atomic_write_text, check_writable
from kshot.services.plots import plot_curves
from kshot.services.stopping import stop_requests
from kshot.tasks import MetaBatch, Task, TaskSource, identity_collate

#: Settings that may change between a run and its resumption without changing what is learned
#: (``steps`` only where the learning rate does not depend on it: see :func:`resumable_changes`).
RESUMABLE_CHANGES = {"steps", "val_every", "val_tasks", "checkpoint_every", "snapshot_every", "log_every", "test_tasks",
                     "num_workers", "threads", "device", "data_dir", "cache_dir", "dist_timeout"}
#: Learning-rate schedules defined over the whole run: their rate at a step depends on ``steps``.
SCHEDULES_OVER_STEPS = ("cosine", "linear")
#: The metric a rank's stop request rides in through the step's all-reduce (its signal, or 0).
_STOP_ASKED = "_stop_asked"


def resumable_changes(config: TrainConfig) -> set[str]:
    """The settings a resumption of this run may change. ``steps`` moves the end of a ``cosine``
    or ``linear`` schedule, and so the learning rate of every step to come: not for those."""
    if config.lr_schedule in SCHEDULES_OVER_STEPS:
        return RESUMABLE_CHANGES - {"steps"}
    return set(RESUMABLE_CHANGES)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val: dict | None
    test: dict | None
    seconds: float
    rank: int = 0  # this process's rank in a distributed run (0: the one that reports)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The outer learning rate at ``step``; a function of the step alone, so it needs no state."""
    if config.lr_schedule == "step":
        return config.lr * config.lr_decay_factor ** (step // max(config.lr_decay_every, 1))
    if config.lr_schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    if config.lr_schedule == "linear":  # to 0 at the last step (Reptile's outer step size)
        return config.lr * max(0.0, 1 - step / config.steps)
    return config.lr


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Meta-trains ``learner`` on tasks from ``sampler``; see the module docstring for the files.

    Args:
        config: the run's settings.
        run_dir: where checkpoints, metrics and plots go.
        learner: the learner to train (built from the config when omitted).
        sampler: training tasks (built from the config's dataset when omitted).
        val_tasks / test_tasks: fixed tasks (built from the config's dataset when omitted).
        dist: this process's place in a distributed run (default: the process group already
            set up, else a single process; :func:`train` sets one up under torchrun).
        progress: show a progress bar.
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path, learner: Learner | None = None,
                 sampler: TaskSource | None = None, val_tasks: Sequence[Task] | None = None,
                 test_tasks: Sequence[Task] | None = None, dist: Distributed | None = None,
                 progress: bool = True):
        self.config = config.validate()
        self.run_dir = Path(run_dir)
        self.dist = dist or distributed.current(config.dist_timeout)
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device or resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        if self.config.meta_batch_size % self.dist.world_size:
            raise ConfigError(f"meta_batch_size {config.meta_batch_size} does not divide across "
                              f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}")
        check_config(self.config)
        # Paths are stored resolved, so that the run can be evaluated and resumed from anywhere.
        if config.dataset in SPLIT_FILE_DATASETS and config.data_path:
            self.config.data_path = str(Path(config.data_path).expanduser().resolve())
        if config.split_file:
            self.config.split_file = str(Path(config.split_file).expanduser().resolve())
        if config.dataset in SPLIT_FILE_DATASETS and not config.split_file:
            # The drawn class split is kept beside the run, so that eval and resume reuse it.
            self.config.split_file = str((self.run_dir / "classes.json").resolve())
        self.sampler = sampler if sampler is not None else training_tasks(config)
        self._val_tasks, self._test_tasks = val_tasks, test_tasks
        if learner is None:
            learner = build_learner(config, self.sampler.example_shape, source=self.sampler)
        self.learner = learner.to(self.device)
        if self.learner.takes_outer_step and self.dist.world_size > 1:
            raise ConfigError(f"{config.algo} takes its outer step itself and does not train distributed yet; "
                              f"run it in one process")
        if getattr(self.learner, "carried", None) is not None and self.dist.world_size > 1:
            raise ConfigError("inner_moments=carried passes Adam's moments from each task to the next, in "
                              "order, which processes cannot share; run it in one process or use "
                              "inner_moments=reset")
        trainable = [p for p in self.learner.parameters() if p.requires_grad]
        #: None for learners with nothing to meta-train (Prototypical Networks on a frozen encoder,
        #: a head fitted on each support set): the run saves them as they are and tests them.
        self.optimizer = make_optimizer(config, trainable) if trainable else None
        self.step = 0
        self._last_saved: int | None = None  # the step last.safetensors holds
        #: Seconds spent in outer steps (and waiting for their tasks) over the whole run, across
        #: resumptions; validation and checkpoints excluded. Logged with every record.
        self.train_seconds = 0.0
        self.best_val: dict | None = None
        self.after_training_summary: dict | None = None  # from the learner's after_training report

    # ------------------------------------------------------------------ fixed tasks
    def _fixed(self, split: str, n_tasks: int) -> Sequence[Task]:
        return evaluation_tasks(self.config, split, n_tasks)[0]

    @property
    def val_tasks(self) -> Sequence[Task]:
        if self._val_tasks is None:
            self._val_tasks = self._fixed("val", self.config.val_tasks)
        return self._val_tasks

    @property
    def test_tasks(self) -> Sequence[Task]:
        if self._test_tasks is None:
            self._test_tasks = self._fixed("test", self.config.test_tasks)
        return self._test_tasks

    # ------------------------------------------------------------------ files
    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    def snapshot_path(self, step: int) -> Path:
        """Where ``snapshot_every`` keeps the weights of ``step`` (for learning curves)."""
        return self.run_dir / "snapshots" / f"step-{step:08d}.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _writing(self, path: Path):
        return _writes_to(path, self.run_dir)

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with self._writing(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, path: Path, with_optimizer: bool) -> None:
        if not self.dist.is_main:
            return
        bad = non_finite_weights(self.learner)
        if bad:  # never write a checkpoint that cannot be used
            raise TrainingError(f"step {self.step}: {len(bad)} weight tensors are no longer finite (e.g. "
                                f"{bad[0]}), so {path.name} was not written; {self._what_to_lower()}")
        with self._writing(path):
            save_checkpoint(path, self.learner, config=self.config.to_dict(),
                            train_state={"step": self.step, "best_val": self.best_val,
                                         "train_seconds": self.train_seconds},
                            optimizer=self.optimizer if with_optimizer else None,
                            extra=checkpoint_extra(self.sampler.dataset))

    def _what_to_lower(self) -> str:
        c = self.config
        knobs = [f"--lr (now {c.lr:g})"]
        if "inner_lr" in algorithms()[c.algo].config_options:
            knobs.insert(0, f"--inner-lr (now {c.inner_lr:g})")
        clip = "" if c.grad_clip else ", or set --grad-clip (e.g. 10)"
        last = (f"; {self.last_path} holds step {self._last_saved}" if self._last_saved is not None else "")
        return f"lower {' or '.join(knobs)}{clip}{last}"

    def _check_finite(self, step: int, metrics: dict, params: list[torch.Tensor]) -> None:
        """Stop at the first step whose loss or meta-gradient is NaN or infinite, before the
        optimiser makes the weights so too."""
        loss = metrics.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(f"step {step + 1}: the meta-training loss is {loss} (not finite), so "
                                f"training stopped; {self._what_to_lower()}")
        if not params:  # the learner took its own outer step (no meta-gradient to check)
            return
        grads = [(name, p.grad) for name, p in self.learner.named_parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads]).cpu()
        if not bool(finite.all()):
            name = grads[int((~finite).nonzero()[0])][0]
            raise TrainingError(f"step {step + 1}: the meta-gradient of {name} is not finite "
                                f"(NaN or inf), so training stopped; {self._what_to_lower()}")

    def _resume(self) -> None:
        """Continue from last.safetensors if this run directory has one (read by rank 0, whose
        reading every rank receives: all resume from identical state)."""
        ckpt = self.dist.from_main(self._read_last)
        if ckpt is None:
            return
        try:
            self.learner.load_state_dict(ckpt.state_dict)
            if ckpt.optimizer is not None and self.optimizer is not None:
                self.optimizer.load_state_dict(ckpt.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.last_path} does not fit this run's learner ({e}); "
                                  f"use another --run-dir") from None
        self.step = int(ckpt.train_state.get("step", 0))
        self._last_saved = self.step
        self.best_val = ckpt.train_state.get("best_val")
        self.train_seconds = float(ckpt.train_state.get("train_seconds", 0.0))
        self._truncate_metrics(self.step)

    def _read_last(self):
        """The checkpoint to resume from, checked against this run's config, or None."""
        if not self.last_path.is_file():
            return None
        ckpt = load_checkpoint(self.last_path)
        try:
            saved = config_from_dict(ckpt.config).to_dict()
        except KshotError as e:
            raise CheckpointError(f"{self.last_path} holds a malformed config ({e}); use another "
                                  f"--run-dir, or delete it to start over") from None
        now = self.config.to_dict()
        for key in ("data_path", "split_file"):  # runs written before paths were stored resolved
            if saved.get(key) and not Path(saved[key]).is_absolute():
                saved[key] = str(Path(saved[key]).expanduser().resolve())
        if saved.get("steps") != now["steps"] and "steps" not in resumable_changes(self.config):
            raise ConfigError(f"{self.run_dir} was trained with --steps {saved.get('steps')}, and its "
                              f"{self.config.lr_schedule} learning-rate schedule runs over those steps: "
                              f"resuming with --steps {now['steps']} would change the rate of every step "
                              f"to come. Resume with --steps {saved.get('steps')}, or train with "
                              f"--lr-schedule constant or step (whose rate does not depend on --steps), "
                              f"or start a new --run-dir")
        # A setting newer than the checkpoint is not compared: the run was trained as that setting's
        # value reproduces (an older MAML run, transductively, as its preset now says explicitly).
        written = set(ckpt.config or {})
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and k in written
                         and saved.get(k) != now[k])
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:3])
            raise ConfigError(f"{self.run_dir} holds a run with other settings ({diffs}); "
                              f"use another --run-dir, or delete {self.last_path} to start over")
        return ckpt

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from (and any torn last line)."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    # ------------------------------------------------------------------ loop
    def _batches(self, start: int, stop: int) -> Iterator[tuple[int, MetaBatch]]:
        indices = self.dist.task_indices(self.config.meta_batch_size)
        if self.config.num_workers > 0:
            loader = DataLoader(self.sampler.stream(start, stop, indices), batch_size=None,
                                num_workers=self.config.num_workers, collate_fn=identity_collate,
                                prefetch_factor=4)
            yield from loader
            return
        # In this process, between steps. A prefetch thread was measured 7% slower for ProtoNet on
        # a 2-core CPU (it holds the GIL while the step's kernels wait for it), for sampling that
        # takes ~1% of a step (benchmarks/protonet_speed.py); slow data wants worker processes.
        for step in range(start, stop):
            yield step, self.sampler.meta_batch(step, indices)

    def validate(self) -> EvalResult:
        """Accuracy on the fixed validation tasks (shared among the ranks of a distributed run),
        with the inner-loop trace of gradient-based learners."""
        return evaluate(self.learner, self.val_tasks, device=self.device, trace=True, dist=self.dist)

    def _is_better(self, result: dict) -> bool:
        if self.best_val is None:
            return True
        if not math.isnan(result["acc"]):
            return result["acc"] > self.best_val["acc"]
        return result["loss"] < self.best_val["loss"]

    def fit(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Train to ``config.steps`` (or ``stop_after`` steps from now), then test the best checkpoint."""
        c = self.config
        if self.dist.is_main:
            check_writable(self.run_dir / "config.json", "the run directory's", ConfigError,
                           "choose a writable --run-dir")
        if resume:
            self._resume()
        elif self.dist.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        if self.dist.is_main:
            with self._writing(self.run_dir / "config.json"):
                atomic_write_text(self.run_dir / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")
        self.dist.broadcast_state(self.learner)  # every rank starts from rank 0's weights
        if self.optimizer is None:  # nothing to meta-train
            self.step = c.steps
        start = self.step
        stop = c.steps if stop_after is None else min(c.steps, start + stop_after)
        params = [p for p in self.learner.parameters() if p.requires_grad]
        window: dict[str, float] = {}
        n_window, busy, waited = 0, 0.0, 0.0
        t_begin = time.perf_counter()
        shape = getattr(self.sampler, "description", None) or (
            "variable-way" if c.episodes == "variable" else f"{c.ways}-way {c.shots}-shot")
        bar = tqdm(total=c.steps, initial=start, desc=f"{c.algo} {shape}",
                   disable=not self.progress, dynamic_ncols=True)
        self.learner.train()
        batches = self._batches(start, stop)
        t_ready = t_waiting = time.perf_counter()
        # A signal asks for a stop at a step boundary. The ranks of a distributed run may see it
        # during different steps, so each adds its request to the step's one all-reduce: every
        # rank then stops after the same step, the first one any rank was asked during.
        with stop_requests() as stop_request:
            try:
                for step, batch in batches:
                    stopping = 0
                    t_got = time.perf_counter()
                    waited += t_got - t_ready
                    assert step == self.step, (step, self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = learning_rate(c, step)
                    batch = [t.to(self.device, non_blocking=True) for t in batch]
                    if self.learner.takes_outer_step:  # e.g. TRPO: its own line search
                        self.learner.set_training_step(step)
                        metrics = self.learner.outer_step(batch, self.optimizer)
                        self._check_finite(step, metrics, [])
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                        statistics = self.dist.snapshot_statistics(self.learner)
                        self.learner.set_training_step(step)  # schedules over training (MAML++)
                        metrics = self.learner.meta_gradient(batch)
                        if self.dist.enabled:
                            metrics[_STOP_ASKED] = float(stop_request.signal_number or 0)
                        # Mean over ranks of the gradients and metrics, and the ranks' batch-norm updates
                        # merged: every rank then holds the state one process would have.
                        metrics = self.dist.average_gradients(params, metrics, statistics)
                        if self.dist.enabled and metrics.pop(_STOP_ASKED) > 0:
                            stopping = stop_request.signal_number or signal.SIGTERM  # another rank's
                        self._check_finite(step, metrics, params)
                        if c.grad_clip:
                            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                        self.optimizer.step()
                    self.step += 1
                    for k, v in metrics.items():
                        window[k] = window.get(k, 0.0) + v
                    n_window += 1
                    t_ready = time.perf_counter()
                    busy += t_ready - t_got
                    self.train_seconds += t_ready - t_waiting
                    if self.step % c.log_every == 0 or self.step == stop:
                        record = {"step": self.step, "split": "train", **{k: v / n_window for k, v in window.items()},
                                  "lr": learning_rate(c, step),
                                  "tasks_per_s": n_window * c.meta_batch_size / max(busy + waited, 1e-9),
                                  "data_wait": waited / max(busy + waited, 1e-9),
                                  "train_seconds": self.train_seconds}
                        self._log(record)
                        if "return_pre" in record:  # policies: the return before and after adaptation
                            bar.set_postfix({k: f"{record[k]:.2f}" for k in ("return_pre", "return_post") if k in record})
                        else:
                            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record.get('acc', float('nan')):.3f}")
                        window, n_window, busy, waited = {}, 0, 0.0, 0.0
                    if c.val_every and (self.step % c.val_every == 0 or self.step == c.steps):
                        self._validate_and_keep_best()
                    if self.step % c.checkpoint_every == 0 or self.step == stop:
                        self._save(self.last_path, with_optimizer=True)
                        self._last_saved = self.step
                    if c.snapshot_every and self.step % c.snapshot_every == 0:
                        self._save(self.snapshot_path(self.step), with_optimizer=False)
                    bar.update(1)
                    if not self.dist.enabled and stop_request.requested:
                        stopping = stop_request.signal_number
                    if stopping:  # on the last step too: the final test is not begun
                        if self._last_saved != self.step:
                            self._save(self.last_path, with_optimizer=True)
                            self._last_saved = self.step
                        self.dist.barrier()  # the checkpoint is written before any rank leaves
                        raise TrainingStopped(f"stopped by {signal.Signals(stopping).name} after step {self.step} "
                                              f"of {c.steps}; {self.last_path} holds it: the same command "
                                              f"resumes from there", int(stopping))
                    t_ready = t_waiting = time.perf_counter()
            finally:
                bar.close()
                batches.close()
        seconds = time.perf_counter() - t_begin
        test = None
        if self.step >= c.steps:
            if not self.best_path.exists() and self.dist.is_main:
                self._save(self.best_path, with_optimizer=False)  # no validation: the final weights
            self._after_training()
            test = self._final_test(seconds)
        self.best_val = self.dist.from_main(lambda: self.best_val)
        return TrainResult(self.run_dir, self.step, self.best_val, test, seconds, self.dist.rank)

    def _validate_and_keep_best(self) -> None:
        result = self.validate().summary()
        if self.dist.is_main:
            self._log({"step": self.step, "split": "val", **result, "train_seconds": self.train_seconds})
            if self._is_better(result):
                self.best_val = {"step": self.step, **result}
                self._save(self.best_path, with_optimizer=False)
            protocol = f", {protocol_name(result['transductive'])}" if "transductive" in result else ""
            if self.progress and "return" in result:
                tqdm.write(f"step {self.step}: val return {result['return']:.3f} ± {result['return_ci95']:.3f} "
                           f"after {result['return_step']} adaptation steps")
            elif self.progress and math.isnan(result["acc"]):
                tqdm.write(f"step {self.step}: val loss {result['loss']:.4f} ± {result['loss_ci95']:.4f}{protocol}")
            elif self.progress:
                tqdm.write(f"step {self.step}: val acc {100 * result['acc']:.2f} ± "
                           f"{100 * result['acc_ci95']:.2f} %, loss {result['loss']:.4f}{protocol}")

    def _val_dataset(self):
        sampler = getattr(self._val_tasks, "sampler", None)
        if sampler is not None:
            return sampler.dataset
        return load_split(self.config, "val")

    def _after_training(self) -> None:
        """Give the learner its :meth:`Learner.after_training` call on the best weights, and save
        what it changes into the best checkpoint (rerunning after a crash redoes it exactly)."""
        if not self.dist.is_main or type(self.learner).after_training is Learner.after_training:
            return
        best = load_checkpoint(self.best_path)
        current = {k: v.clone() for k, v in self.learner.state_dict().items()}
        self.learner.load_state_dict(best.state_dict)
        try:
            report = self.learner.after_training(self._val_dataset())
            if report is not None:
                save_checkpoint(self.best_path, self.learner, config=best.config,
                                train_state=best.train_state, extra=best.extra)
                report.write(self.run_dir)
                self.after_training_summary = report.summary()
        finally:
            self.learner.load_state_dict(current)

    def _final_test(self, seconds: float) -> dict | None:
        if self.dist.is_main:
            plot_curves(self.metrics_path, self.run_dir / "curves.png")
        if not self.config.test_tasks:
            return None
        best = self.dist.from_main(lambda: load_checkpoint(self.best_path).state_dict)
        current = {k: v.clone() for k, v in self.learner.state_dict().items()}
        self.learner.load_state_dict(best)
        try:
            result = evaluate(self.learner, self.test_tasks, device=self.device, progress=self.progress,
                              desc="testing", dist=self.dist).summary()
            plot_adaptation = getattr(self.sampler, "plot_adaptation", None)
            if plot_adaptation is not None and self.dist.is_main:  # generated tasks: adapted vs true curves
                plot_adaptation(self.learner, self.run_dir / "adaptation.png")
        finally:
            self.learner.load_state_dict(current)
        if not self.dist.is_main:
            return {**result, "ways": self.config.eval_ways, "shots": self.config.eval_shots}
        c = self.config
        summary = {"test": {**result, "ways": c.eval_ways, "shots": c.eval_shots},
                   "best_val": self.best_val, "after_training": self.after_training_summary,
                   "steps": self.step, "train_seconds_this_session": seconds,
                   "train_seconds": self.train_seconds,
                   "config": c.to_dict()}
        with self._writing(self.run_dir / "results.json"):
            atomic_write_text(self.run_dir / "results.json", json.dumps(summary, indent=2) + "\n")
        return summary["test"]


@contextmanager
def _writes_to(path: Path, run_dir: Path):
    """Turn a failed write (read-only run directory, full disk) into one line."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); free some space or make {run_dir} "
                            f"writable, then run the same command again to resume") from None


def train(config: TrainConfig, run_dir: str | Path, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, dist: Distributed | None = None, **components) -> TrainResult:
    """Meta-train as ``config`` says, in ``run_dir`` (resuming a run found there).

    Under torchrun the processes share each meta-batch (see :mod:`kshot.services.distributed`).
    In one process, SIGTERM or Ctrl-C ends training after the current outer step, with its
    checkpoint written, by raising :class:`~kshot.errors.TrainingStopped`.
    """
    config.validate()
    group = (nullcontext(dist) if dist is not None else
             distributed.launch(config.device, config.dist_timeout, config.meta_batch_size))
    with group as dist:
        trainer = Trainer(config, run_dir, progress=progress, dist=dist, **components)
        return trainer.fit(resume=resume, stop_after=stop_after)
