"""Reproduce Snell et al. 2017, Table 1 (Omniglot): Prototypical Networks, Conv4, Vinyals split.

Two models, as in the paper: one trained with 1-shot and one with 5-shot 60-way episodes (5 queries
per class, Adam 1e-3 halved every 2,000 episodes), each tested on 1,000 fixed 5-way and 20-way tasks
with 15 queries per class. Paper: 98.8 / 99.7 % (5-way 1/5-shot), 96.0 / 98.9 % (20-way 1/5-shot).

    python benchmarks/protonet_omniglot.py --steps 20000 --out docs/results/protonet_omniglot

Each model trains with `kshot train --preset protonet-omniglot-5way-{1,5}shot --steps STEPS`
(resumable: run the same command again after an interruption), then `kshot eval` at 5 and 20 ways.
Writes OUT.json, OUT.md (the table) and OUT.png (accuracy ± 95% CI against the paper).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PAPER = {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="20000",
                        help="60-way training episodes per model (one number, or one per --shots value)")
    parser.add_argument("--shots", default="1,5", help="which models to train (comma-separated shots)")
    parser.add_argument("--train-split", default="train", choices=("train", "trainval"),
                        help="train on the train split (keeping the best meta-validation checkpoint) or on "
                             "train+val with no validation, as Snell et al. did for their final numbers")
    parser.add_argument("--tasks", type=int, default=1000, help="fixed test tasks per setting")
    parser.add_argument("--runs", default="runs/protonet-omniglot", help="run directories go here")
    parser.add_argument("--out", default="docs/results/protonet_omniglot", help="output path stem")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--snapshot-every", type=int, default=2000,
                        help="keep the weights every this many episodes (benchmarks/time_to_accuracy.py)")
    args = parser.parse_args(argv)

    from kshot.runs.build import load_learner
    from kshot.config import resolve_config
    from kshot.data import load_dataset
    from kshot.runs.evaluate import evaluate
    from kshot.tasks import fixed_tasks
    from kshot.runs.train import train

    rows, meta = [], {}
    test_set = load_dataset("omniglot", "test", protocol="vinyals")
    shot_counts = [int(s) for s in args.shots.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) == 1:
        steps *= len(shot_counts)
    if len(steps) != len(shot_counts):
        parser.error("--steps: give one number, or one per --shots value")
    for shots, n_steps in zip(shot_counts, steps):
        preset = f"protonet-omniglot-5way-{shots}shot"
        overrides = dict(steps=n_steps, threads=args.threads, test_tasks=0, train_split=args.train_split,
                         snapshot_every=args.snapshot_every)
        if args.train_split == "trainval":
            overrides["val_every"] = 0  # the val classes are trained on: the final weights are kept
        config = resolve_config(preset, overrides=overrides)
        run_dir = Path(args.runs) / f"60way-{shots}shot-{args.train_split}"
        t0 = time.perf_counter()
        result = train(config, run_dir)
        elapsed = time.perf_counter() - t0
        state = json.loads((run_dir / "config.json").read_text())
        learner = load_learner(run_dir / "best.safetensors")
        meta[f"{shots}shot"] = {"run_dir": str(run_dir), "steps": result.step, "best_val": result.best_val,
                                "train_seconds_this_invocation": round(elapsed, 1), "config": state}
        for ways in (5, 20):
            res = evaluate(learner, fixed_tasks(test_set, ways, shots, 15, args.tasks), progress=True,
                           desc=f"{ways}-way {shots}-shot")
            rows.append({"ways": ways, "shots": shots, "acc": 100 * res.mean, "ci95": 100 * res.ci95,
                         "tasks": res.n_tasks, "paper": PAPER[(ways, shots)]})
            print(f"{ways}-way {shots}-shot: {100 * res.mean:.2f} ± {100 * res.ci95:.2f} % "
                  f"(paper {PAPER[(ways, shots)]}%)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["ways"], r["shots"]))
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "runs": meta,
                                                      "command": " ".join(sys.argv)}, indent=2) + "\n")
    table = ["| setting | kshot (mean ± 95% CI) | Snell et al. 2017 |", "|---|---:|---:|"]
    table += [f"| {r['ways']}-way {r['shots']}-shot | {r['acc']:.2f} ± {r['ci95']:.2f} % | {r['paper']} % |"
              for r in rows]
    (out.with_suffix(".md")).write_text("\n".join(table) + "\n")
    print("\n".join(table))
    _plot(rows, out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['ways']}w{r['shots']}s" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r["acc"] for r in rows], 0.4, yerr=[r["ci95"] for r in rows], capsize=4,
           label="kshot ± 95% CI")
    ax.bar([i + 0.2 for i in x], [r["paper"] for r in rows], 0.4, label="Snell et al. 2017")
    ax.set_xticks(list(x), labels)
    ax.set_ylim(90, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Prototypical Networks on Omniglot")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
