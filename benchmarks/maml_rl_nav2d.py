"""Finn et al. 2017, figure 4 (2D navigation): return after 0-3 policy-gradient steps for MAML,
a policy pretrained on all tasks, and a randomly initialised policy, on the same test goals.

Trains ``maml-rl-nav2d`` and ``pretrain-rl-nav2d`` (each resumes if its run directory holds a
checkpoint, so the same command continues an interrupted run), takes each run's best checkpoint
by meta-validation return, and adapts all three policies with the same inner step (0.1, 20
episodes per step) on ``--tasks`` fixed test goals; writes the figure, the trajectories of the
MAML policy, and a JSON of every number::

    nice -n 10 python benchmarks/maml_rl_nav2d.py --steps 200 --tasks 600 --out docs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kshot.config import resolve_config
from kshot.rl.families import env_family
from kshot.rl.plots import plot_navigation, plot_returns
from kshot.runs.build import build_learner, load_learner
from kshot.runs.train import train
from kshot.services.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="meta-iterations of each training run")
    parser.add_argument("--tasks", type=int, default=600, help="fixed test goals")
    parser.add_argument("--runs", default="runs/bench-rl-nav2d", help="run directories go here")
    parser.add_argument("--out", default="docs", help="the figure and results go here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, out = Path(args.runs), Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    trained, timing = {}, {}
    for label, preset in (("MAML", "maml-rl-nav2d"), ("pretrained", "pretrain-rl-nav2d")):
        config = resolve_config(preset, overrides=dict(steps=args.steps, test_tasks=0, seed=args.seed))
        result = train(config, runs / preset, progress=True)
        metrics = [json.loads(line) for line in (runs / preset / "metrics.jsonl").read_text().splitlines()]
        rows = [m for m in metrics if m.get("split") == "train"]
        timing[label] = {"train_seconds_this_session": result.seconds, "steps": result.step,
                         "best_val": result.best_val,
                         "mean_env_steps_per_s": sum(r["env_steps_per_s"] for r in rows) / max(len(rows), 1),
                         "mean_seconds_per_meta_iteration": sum(r["rollout_seconds"] + r["outer_seconds"]
                                                                for r in rows) / max(len(rows), 1)}
        trained[label] = load_learner(runs / preset / "best.safetensors")
    trained["random init"] = build_learner(resolve_config("maml-rl-nav2d", overrides=dict(seed=args.seed)), (2,))
    tasks = env_family("nav2d", "test").fixed_tasks(args.tasks)
    results, record = {}, {}
    for label, learner in trained.items():
        start = time.perf_counter()
        results[label] = learner.evaluate_tasks(tasks, progress=True, desc=label, steps=3)
        record[label] = {**results[label].summary(), "eval_seconds": time.perf_counter() - start}
        print(f"{label:>12}: " + ", ".join(f"{results[label].mean(k):.2f} ± {results[label].ci95(k):.2f}"
                                           for k in range(4)))
    plot_returns(results, out / "rl_nav2d.png", title=f"2D navigation: {args.tasks} test goals, 95% CI")
    plot_navigation(trained["MAML"], env_family("nav2d", "test").fixed_tasks(4), out / "rl_nav2d_trajectories.png")
    atomic_write_text(out / "results" / "rl_nav2d.json",
                      json.dumps({"returns": record, "training": timing, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
