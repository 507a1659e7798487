"""Environment steps per second of kshot's batched rollouts, against stepping one episode at a time.

Meta-RL time goes to environment steps and to the Python around each one, so kshot's rollouts
step every episode of every task of a meta-batch together with one policy forward per time step
(kshot/rl/rollouts.py). This measures, interleaved (``--repeats`` rounds of each):

* ``batched``: ``kshot.rl.rollout`` on the family's vectorised environment (2D navigation: array
  operations; MuJoCo: the copies stepped in turn), one forward for all episodes per step;
* ``batched, env loop`` (2D navigation only): the same, with ``GymVector`` over ``Navigation2D``
  environments stepped one by one;
* ``one at a time``: one Gymnasium environment and one policy forward per step, episode after
  episode (what a loop over ``env.step`` does);
* ``env only`` (MuJoCo): the environment stepped with fixed actions and no policy at all.

    nice -n 10 python benchmarks/rl_rollout_speed.py --out docs/results/rl_rollout_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from kshot.models import create_model
from kshot.rl import GymVector, MAMLRL, Navigation2D, env_family, rollout
from kshot.services.files import atomic_write_text


def one_at_a_time(learner: MAMLRL, family, tasks, episodes: int) -> tuple[int, float]:
    env = family.make_env()
    params = learner.batched_parameters(1, detach=True)
    steps, start = 0, time.perf_counter()
    with torch.no_grad():
        for task in tasks:
            env.unwrapped.set_task(task.params)
            for e in range(episodes):
                obs, _ = env.reset(seed=e)
                for _ in range(family.horizon):
                    dist = learner.forward(params, torch.as_tensor(obs, dtype=torch.float32).view(1, 1, -1))
                    action = (dist[0, 0, :family.action_dim] + torch.randn(family.action_dim)
                              * dist[0, 0, family.action_dim:].exp()).numpy()
                    obs, _, terminated, truncated, _ = env.step(action)
                    steps += 1
                    if terminated or truncated:
                        break
    return steps, time.perf_counter() - start


def env_only(family, n_steps: int) -> tuple[int, float]:
    env = family.make_env(family.task(0, 0).params)
    env.reset(seed=0)
    action = np.zeros(family.action_dim, dtype=np.float32)
    start = time.perf_counter()
    for _ in range(n_steps):
        env.step(action)
    return n_steps, time.perf_counter() - start


def measure(name: str, n_tasks: int, episodes: int, repeats: int, slow_tasks: int) -> dict:
    family = env_family(name, seed=0, meta_batch_size=n_tasks)
    torch.manual_seed(0)
    learner = MAMLRL(create_model("mlp", in_features=family.observation_dim, hidden=[100, 100],
                                  out_features=family.action_dim))
    tasks = family.meta_batch(0)
    params = learner.batched_parameters(n_tasks, detach=True)
    loop_env = GymVector(lambda: Navigation2D(horizon=family.horizon), n_tasks * episodes, family.horizon) \
        if name == "nav2d" else None
    rollout(learner.forward, params, tasks, episodes)  # build the vectorised environment once
    totals: dict[str, list[float]] = {}

    def add(label: str, steps: int, seconds: float) -> None:
        totals.setdefault(label, [0.0, 0.0])
        totals[label][0] += steps
        totals[label][1] += seconds

    for r in range(repeats):
        batch = rollout(learner.forward, params, tasks, episodes, phase=r)
        add("batched", batch.env_steps, batch.seconds)
        if loop_env is not None:
            vectors, family._vectors = family._vectors, {n_tasks * episodes: loop_env}
            try:
                batch = rollout(learner.forward, params, tasks, episodes, phase=r)
            finally:
                family._vectors = vectors
            add("batched, env loop", batch.env_steps, batch.seconds)
        add("one at a time", *one_at_a_time(learner, family, tasks[:slow_tasks], episodes))
        if name != "nav2d":
            add("env only", *env_only(family, 2000))
    return {label: {"env_steps_per_s": s / t, "steps": s, "seconds": t} for label, (s, t) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/rl_rollout_speed.json")
    parser.add_argument("--mujoco", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"load_average_before": os.getloadavg(),
               "nav2d (20 tasks x 20 episodes x 100 steps)": measure("nav2d", 20, 20, args.repeats, 2)}
    if args.mujoco:
        results["halfcheetah-vel (8 tasks x 5 episodes x 200 steps)"] = measure("halfcheetah-vel", 8, 5, args.repeats, 1)
    results["load_average_after"] = os.getloadavg()
    for setting, rows in results.items():
        if isinstance(rows, dict):
            print(setting)
            for label, row in rows.items():
                print(f"  {label:>18}: {row['env_steps_per_s']:10.0f} env steps/s")
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
