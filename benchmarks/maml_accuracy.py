"""Reproduce the MAML family's published figures: train a preset (or resume it), then test the
best checkpoint on 1,000 fixed test tasks after each of several numbers of inner steps.

    # sinusoid regression (Finn et al. 2017, 5.1; Li et al. 2017, Table 1): ~15 min each on 1 core
    python benchmarks/maml_accuracy.py --preset maml-sinusoid-10shot --run-dir runs/maml-sinusoid-10shot --test-steps 1,10
    python benchmarks/maml_accuracy.py --preset metasgd-sinusoid-10shot --run-dir runs/metasgd-sinusoid-10shot --test-steps 1

    # Omniglot (Finn et al. 2017, Table 1), on a budget: see docs/MAML.md for the schedules
    python benchmarks/maml_accuracy.py --preset maml-omniglot-5way-1shot --run-dir runs/maml-omniglot-5way-1shot \\
        --set steps=15000 --set val_every=1000 --test-steps 3,10

Each evaluation appends one JSON line to --out and prints the docs/RESULTS.md row; for a
regression family it also writes the adapted curves (PNG) next to the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset setting")
    p.add_argument("--test-steps", default="", help="inner steps at test time, comma-separated (default: the preset's)")
    p.add_argument("--tasks", type=int, default=1000, help="fixed test tasks")
    p.add_argument("--no-train", action="store_true", help="only evaluate the run's best checkpoint")
    p.add_argument("--out", default="runs/maml_accuracy.jsonl")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch

    from kshot.config import PRESETS, resolve_config
    from kshot.errors import TrainingStopped
    from kshot.data import load_dataset
    from kshot.runs.build import dataset_settings, load_learner
    from kshot.runs.evaluate import evaluate
    from kshot.runs.train import train
    from kshot.tasks import family_sampler, family_tasks, fixed_tasks, task_family

    overrides = dict(parse_override(s) for s in args.set)
    config = resolve_config(args.preset, overrides=overrides)
    run_dir = Path(args.run_dir)
    started = time.time()
    if not args.no_train:
        try:
            result = train(config, run_dir, progress=not args.quiet)
        except TrainingStopped as e:  # SIGTERM or Ctrl-C: stopped after a step, its checkpoint written
            print(f"maml_accuracy: {e}", file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:
            print("interrupted: the same command resumes the run from its last checkpoint", file=sys.stderr)
            return 130
        print(f"trained {result.step} steps in {result.seconds / 60:.1f} min (this session)")
    if config.threads:
        torch.set_num_threads(config.threads)
    learner = load_learner(run_dir)
    family = task_family(config.dataset)
    if family is not None:
        tasks = family_tasks(config.dataset, "test", config.eval_shots, config.test_queries, args.tasks)
    else:
        test_set = load_dataset(config.dataset, "test", **dataset_settings(config))
        tasks = fixed_tasks(test_set, config.eval_ways, config.eval_shots, config.test_queries, args.tasks)
    steps = [int(s) for s in args.test_steps.split(",") if s] or [learner.test_steps]
    description = PRESETS[args.preset][0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in steps:
        learner.test_inner_steps = k
        evaluated = evaluate(learner, tasks, progress=not args.quiet, desc=f"{k} test steps")
        record = {"preset": args.preset, "overrides": overrides, "run_dir": str(run_dir), "test_inner_steps": k,
                  **evaluated.summary(), "paper": description, "minutes": (time.time() - started) / 60,
                  "date": time.strftime("%Y-%m-%d")}
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        figure = (f"MSE {evaluated.loss:.3f} ± {evaluated.loss_ci95:.3f}" if evaluated.is_regression
                  else f"{100 * evaluated.mean:.2f} ± {100 * evaluated.ci95:.2f} %")
        print(f"| {args.preset} | {k} | {figure} | {description} |")
    if family is not None:
        sampler = family_sampler(config.dataset, "test", config.eval_shots, config.test_queries)
        png = sampler.plot_adaptation(learner, run_dir / "adaptation.png", steps=(0, 1, max(steps + [10])))
        print(f"adapted curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
