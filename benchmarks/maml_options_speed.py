"""CPU time per task of MAML's meta-gradient under its protocols and options, for one or more
checkouts of kshot, interleaved (what docs/MAML.md reports on batch norm and MAML++'s options).

Setting: Conv4 (64 filters, max-pool), synthetic Omniglot-shaped 5-way 1-shot tasks with 5 queries
per class, meta-batch 8, inner rate 0.4, tasks in a loop, one thread. Variants:

  transductive   batch norm over each query batch (the code before the protocol option did this)
  support        queries normalised by the support set's statistics (the default of the settings)
  mamlpp         MAML++: 5 steps, multi-step loss, per-step rates, batch norm and statistics

Each (checkout, variant) runs in its own subprocess, in rounds, and the medians are printed:

    python benchmarks/maml_options_speed.py --rounds 6 --variants transductive,support --trees .,../main
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(variant: str, steps: int) -> float | None:
    import torch

    torch.set_num_threads(1)
    from kshot.learners import MAML
    from kshot.models import create_model
    from kshot.tasks import Task

    g = torch.Generator().manual_seed(1)
    tasks = [Task(torch.randn(5, 1, 28, 28, generator=g), torch.arange(5), torch.randn(25, 1, 28, 28, generator=g),
                  torch.arange(5).repeat_interleave(5), torch.arange(5)) for _ in range(8)]
    torch.manual_seed(0)
    model = create_model("conv4", out_features=5, image_size=28, track_running_stats=False)
    options = {}
    if "transductive" in inspect.signature(MAML.__init__).parameters:  # a checkout before the option: transductive
        options["transductive"] = variant == "transductive"
        if variant == "mamlpp":
            options.update(transductive=True, multi_step_loss=5000, per_step_lr=True, per_step_bn=True,
                           per_step_bn_stats=True)
    elif variant != "transductive":
        return None  # this checkout has no such variant
    learner = MAML(model, inner_steps=5 if variant == "mamlpp" else steps, inner_lr=0.4, batch_tasks="loop", **options)
    learner.meta_gradient(tasks[:2])  # warm-up
    times = []
    for _ in range(3):
        learner.zero_grad(set_to_none=True)
        start = time.process_time()
        learner.meta_gradient(tasks)
        times.append((time.process_time() - start) / len(tasks))
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="transductive,support")
    p.add_argument("--trees", default=".", help="kshot checkouts (repository roots), comma-separated")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=1, help="inner steps (mamlpp: 5)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"cpu_s_per_task": worker(args.worker, args.steps)}))
        return
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for tree in args.trees.split(","):
            for variant in args.variants.split(","):
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "1"}
                out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(args.steps)],
                                     capture_output=True, text=True, env=env, check=True)
                value = json.loads(out.stdout)["cpu_s_per_task"]
                if value is not None:
                    results.setdefault((tree, variant), []).append(value)
    print(f"{'checkout':<24} {'variant':<14} median ms/task (rounds)   load {os.getloadavg()[0]:.1f}")
    for (tree, variant), values in results.items():
        print(f"{tree:<24} {variant:<14} {1000 * statistics.median(values):7.1f}  "
              f"({', '.join(f'{1000 * v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
