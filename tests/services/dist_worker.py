"""One rank of the distributed equivalence test (tests/test_distributed.py starts two of these).

Run as ``python tests/services/dist_worker.py SPEC.json`` with torchrun's environment variables (RANK,
WORLD_SIZE, MASTER_ADDR, ...). For each learner of the spec, the rank computes the meta-gradient
of the first meta-batch on its share of the tasks, averaged over ranks, then trains with the
real Trainer: interrupted after ``stop_after`` steps and resumed to the end. It writes what it
holds to ``<out>/<algo>-rank<r>.safetensors`` for the test to compare with one process's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kshot.config import TrainConfig
from kshot.data import load_dataset
from kshot.errors import ConfigError, KshotError
from kshot.learners import LEARNERS
from kshot.tasks import fixed_tasks
from kshot.runs.build import build_learner, dataset_settings
from kshot.runs.train import Trainer


def few_test_tasks(config: TrainConfig, n_tasks: int):
    """A short final test (the trainer's path, without 600 tasks' worth of time)."""
    if not config.test_tasks:
        return None
    dataset = load_dataset(config.dataset, "test", **dataset_settings(config))
    return fixed_tasks(dataset, config.eval_ways, config.eval_shots, config.test_queries, n_tasks)


def first_meta_gradient(config: TrainConfig, dist) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Meta-gradient of meta-batch 0 on this rank's tasks, averaged over ranks (as the trainer does)."""
    dataset = load_dataset(config.dataset, "train", **dataset_settings(config))
    sampler = LEARNERS[config.algo].make_sampler(config, dataset)
    learner = build_learner(config, sampler.example_shape)
    dist.broadcast_state(learner)
    learner.train()
    params = [p for p in learner.parameters() if p.requires_grad]
    statistics = dist.snapshot_statistics(learner)
    metrics = learner.meta_gradient(sampler.meta_batch(0, dist.task_indices(config.meta_batch_size)))
    metrics = dist.average_gradients(params, metrics, statistics)
    grads = {f"grad.{name}": p.grad.detach().clone() for name, p in learner.named_parameters()
             if p.grad is not None}
    return grads, metrics


def run_case(case: dict, out: Path, dist) -> None:
    """Meta-gradient of meta-batch 0, then training interrupted after ``stop_after`` steps and
    resumed; saves this rank's gradients, state and optimiser state."""
    config = TrainConfig(**case["config"]).validate()
    grads, metrics = first_meta_gradient(config, dist)
    test_tasks = few_test_tasks(config, case["test_tasks"])
    Trainer(config, case["run_dir"], dist=dist, progress=False,
            test_tasks=test_tasks).fit(stop_after=case["stop_after"])
    trainer = Trainer(config, case["run_dir"], dist=dist, progress=False, test_tasks=test_tasks)
    result = trainer.fit()
    tensors = dict(grads)
    tensors.update({f"state.{k}": v.detach().clone() for k, v in trainer.learner.state_dict().items()})
    for idx, slots in trainer.optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{idx}.{k}": v.clone() for k, v in slots.items() if torch.is_tensor(v)})
    meta = {"metrics": json.dumps(metrics), "step": str(result.step), "test": json.dumps(result.test),
            "best_val": json.dumps(result.best_val)}
    # Resuming with other settings: rank 0 finds out, and every rank raises its error.
    other = TrainConfig(**{**case["config"], "lr": 2 * config.lr})
    try:
        Trainer(other, case["run_dir"], dist=dist, progress=False, test_tasks=test_tasks).fit()
    except ConfigError as e:
        meta["resume_error"] = str(e)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(out / f"{config.algo}-rank{dist.rank}.safetensors"), metadata=meta)


def main(spec_path: str) -> int:
    """Every case of the spec, one after another, in one process group."""
    from kshot.services.distributed import launch

    spec = json.loads(Path(spec_path).read_text())
    configs = [TrainConfig(**case["config"]) for case in spec["cases"]]
    with launch(configs[0].device, configs[0].dist_timeout, configs[0].meta_batch_size) as dist:
        for case in spec["cases"]:
            run_case(case, Path(spec["out"]), dist)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except KshotError as e:
        print(f"kshot: error: {e}", file=sys.stderr)
        sys.exit(2)
