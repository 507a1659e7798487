"""ProtoNet training speed: kshot against a bare PyTorch loop over the same tensors.

Three ways to take one training episode (forward over support + query, prototypes, squared
distances, cross-entropy, backward, Adam step), on the same pre-sampled Omniglot tasks:

  bare      a plain PyTorch loop written inline here (the bench harness's reference loop): the
            Conv4 layers run one after another as nn.Sequential runs them, NCHW
  learner   kshot's ProtoNet.meta_gradient + optimizer step over the same task tensors
  trainer   kshot's whole Trainer: sampling tasks from the seed, prefetching, logging (no
            validation or checkpoints inside the timed window); also reports the share of each
            step spent waiting for data

Rounds alternate the three (the machine's speed drifts), and medians are reported.

    python benchmarks/protonet_speed.py --ways 5 --rounds 5 --episodes 100
    python benchmarks/protonet_speed.py --ways 20 --rounds 5 --episodes 40
    python benchmarks/protonet_speed.py --ways 60 --rounds 3 --episodes 10 --threads 1   # Snell's training episodes

kshot's Conv4 runs its layers faster than the plain loop (channels-last, im2col first
convolution, pool before ReLU: kshot/models.py), so learner and trainer can exceed 1.0x bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=100, help="episodes per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="trainer: DataLoader workers (0: thread)")
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kshot.config import resolve_config
    from kshot.data import load_dataset
    from kshot.learners import ProtoNet
    from kshot.models import create_model
    from kshot.tasks import TaskSampler
    from kshot.runs.train import Trainer

    dataset = load_dataset("omniglot", "train")
    sampler = TaskSampler(dataset, args.ways, args.shots, args.queries, seed=0)
    tasks = [sampler.task(i) for i in range(args.episodes)]

    torch.manual_seed(0)
    encoder = create_model("conv4")
    bare_opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)

    def bare_round() -> float:
        t0 = time.perf_counter()
        for task in tasks:
            xs, ys, xq, yq = task.support_x, task.support_y, task.query_x, task.query_y
            bare_opt.zero_grad(set_to_none=True)
            z = torch.nn.Sequential.forward(encoder, torch.cat([xs, xq]))  # layer by layer
            zs, zq = z[: len(xs)], z[len(xs):]
            protos = torch.zeros(args.ways, z.shape[1]).index_add_(0, ys, zs) / args.shots
            loss = F.cross_entropy(-torch.cdist(zq, protos).pow(2), yq)
            loss.backward()
            bare_opt.step()
            loss.item()
        return len(tasks) / (time.perf_counter() - t0)

    torch.manual_seed(0)
    learner = ProtoNet(create_model("conv4"))
    learner_opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def learner_round() -> float:
        t0 = time.perf_counter()
        for task in tasks:
            learner_opt.zero_grad(set_to_none=True)
            learner.meta_gradient([task])
            learner_opt.step()
        return len(tasks) / (time.perf_counter() - t0)

    run_root = Path(tempfile.mkdtemp(prefix="kshot-speed-"))
    data_wait = []

    def trainer_round(i: int) -> float:
        config = resolve_config(overrides=dict(ways=args.ways, shots=args.shots, queries=args.queries,
                                               steps=args.episodes, val_every=0, test_tasks=0,
                                               checkpoint_every=10 ** 9, log_every=args.episodes,
                                               lr_schedule="constant", num_workers=args.num_workers,
                                               seed=i))
        trainer = Trainer(config, run_root / f"r{i}", progress=False)
        trainer.fit(resume=False)
        record = [json.loads(l) for l in (run_root / f"r{i}" / "metrics.jsonl").read_text().splitlines()][-1]
        data_wait.append(record["data_wait"])
        return record["tasks_per_s"]

    for fn in (bare_round, learner_round):  # warm-up
        fn()
    trainer_round(args.rounds)  # warm-up, on a seed the timed rounds do not use
    data_wait.clear()
    results = {"bare": [], "learner": [], "trainer": []}
    for r in range(args.rounds):
        results["bare"].append(bare_round())
        results["learner"].append(learner_round())
        results["trainer"].append(trainer_round(r))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "setting": f"omniglot {args.ways}-way {args.shots}-shot, {args.queries} queries/class, conv4",
        "threads": torch.get_num_threads(), "episodes_per_round": args.episodes, "rounds": args.rounds,
        "episodes_per_s_median": med, "episodes_per_s_all": results,
        "learner_vs_bare": med["learner"] / med["bare"], "trainer_vs_bare": med["trainer"] / med["bare"],
        "trainer_data_wait_median": statistics.median(data_wait), "num_workers": args.num_workers,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
