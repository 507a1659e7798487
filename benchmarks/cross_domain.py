"""Cross-domain few-shot intent classification: train on one source, test on another.

A meta-learner adapts well to tasks like the ones it was trained on; this benchmark measures how
much of that carries over to another domain (Triantafillou et al. 2020 make the same point with
Meta-Dataset). ProtoNet is meta-trained on

* CLINC150 training intents (in-domain test: CLINC150 test intents, from other domains),
* BANKING77 training intents (in-domain test: BANKING77 test intents),
* both, with fixed 5-way 5-shot tasks (one source per task),
* both, with Meta-Dataset episodes (variable ways and shots, one source per task),

and every model is tested on the test intents of both datasets, 5-way 1-shot and 5-shot
(1,000 fixed tasks each) and on Meta-Dataset episodes (600 each), next to the same prototypes
over the untrained features. Model selection uses the training source's own validation intents
only: nothing about the target is seen before the test.

Two backbones over the same hashed n-gram features (kshot.data.text): ``feature_weights``
(learned term weights, cosine prototypes; the presets' choice) and ``sparse_mlp`` (a 512-256
ReLU MLP, squared Euclidean distances, as in Snell et al.).

Run (30 to 45 minutes on 2 CPU cores shared with other jobs: each training 1 to 4 minutes, each
model's evaluation 80 to 90 s; finished runs and evaluations in --out are reused, and
``--backbones`` / ``--rows`` run a subset while still reporting the rows run before):

    nice -n 10 python benchmarks/cross_domain.py --out runs/cross_domain

It writes results.json, table.md and cross_domain.png to --out. ``--tiny`` checks the whole
pipeline in a minute (figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kshot.runs.build import load_learner
from kshot.services.checkpoint import load_checkpoint
from kshot.config import resolve_config
from kshot.data import load_dataset
from kshot.services.files import atomic_path, atomic_write_text
from kshot.runs.evaluate import evaluate
from kshot.learners import ProtoNet
from kshot.tasks import fixed_episodes
from kshot.models import create_model
from kshot.tasks import fixed_tasks
from kshot.runs.train import train

TARGETS = ("clinc150", "banking77")
SOURCES = {  # key -> (row name, preset, settings on top of it)
    "clinc150": ("CLINC150", "protonet-clinc150-5way-5shot", {}),
    "banking77": ("BANKING77", "protonet-banking77-5way-5shot", {}),
    "both-fixed": ("both, 5-way 5-shot", "protonet-clinc150-5way-5shot", {"dataset": "clinc150+banking77"}),
    "both-episodes": ("both, Meta-Dataset episodes", "protonet-text-metadataset", {}),
}
BACKBONES = {
    # name -> settings on top of the dataset's preset (protonet-<data>-5way-5shot)
    "feature_weights": {},
    "sparse_mlp": {"backbone": "sparse_mlp", "backbone_options": {"hidden": [512, 256]},
                   "distance": "euclidean", "lr": 1e-3},
}


def config_for(preset: str, settings: dict, backbone: str, steps: int, val_tasks: int, threads: int):
    """The run's TrainConfig, built exactly as the printed ``kshot train`` command builds it."""
    overrides = dict(settings, **BACKBONES[backbone], steps=steps, val_every=max(steps // 10, 1),
                     val_tasks=val_tasks, checkpoint_every=max(steps // 10, 1), test_tasks=0,
                     threads=threads)
    return resolve_config(preset, None, overrides), overrides


def command_for(preset: str, overrides: dict, run_dir: Path) -> str:
    flags = []
    for key, value in overrides.items():
        text = f"'{json.dumps(value)}'" if isinstance(value, dict) else str(value)
        flags.append(f"--{key.replace('_', '-')} {text}")
    return f"kshot train --preset {preset} {' '.join(flags)} --run-dir {run_dir}"


def evaluate_everywhere(learner, test_sets: dict, n_tasks: int, n_episodes: int,
                        cache: Path | None = None, key: dict | None = None) -> dict:
    """Accuracy on every target; read from ``cache`` when it holds this ``key``'s results."""
    key = dict(key or {}, tasks=n_tasks, episodes=n_episodes)
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["cells"]
    cells = {}
    for target, data in test_sets.items():
        for shots in (1, 5):
            r = evaluate(learner, fixed_tasks(data, 5, shots, 15, n_tasks))
            cells[f"{target} 5-way {shots}-shot"] = {"acc": r.mean, "ci95": r.ci95, "tasks": r.n_tasks}
        r = evaluate(learner, fixed_episodes(data, n_episodes))
        cells[f"{target} episodes"] = {"acc": r.mean, "ci95": r.ci95, "tasks": r.n_tasks}
    if cache is not None:
        atomic_write_text(cache, json.dumps({"key": key, "cells": cells}, indent=2) + "\n")
    return cells


def write_table(results: list[dict], path: Path) -> str:
    columns = [f"{t} 5-way {s}-shot" for t in TARGETS for s in (1, 5)] + [f"{t} episodes" for t in TARGETS]
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in results):
        lines += [f"\n**{backbone}** (accuracy %, mean ± 95% CI; *in-domain* cells in italics)\n",
                  "| trained on | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for r in (r for r in results if r["backbone"] == backbone):
            cells = []
            for col in columns:
                c = r["cells"][col]
                text = f"{100 * c['acc']:.2f} ± {100 * c['ci95']:.2f}"
                in_domain = col.split()[0] in r["dataset"].split("+")
                cells.append(f"*{text}*" if in_domain else text)
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines).strip() + "\n"
    atomic_write_text(path, text)
    return text


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [f"{t} 5-way {s}-shot" for t in TARGETS for s in (1, 5)] + [f"{t} episodes" for t in TARGETS]
    backbones = list(dict.fromkeys(r["backbone"] for r in results))
    fig, axes = plt.subplots(len(backbones), 1, figsize=(14, 3.6 * len(backbones)), squeeze=False)
    for ax, backbone in zip(axes[:, 0], backbones):
        rows = [r for r in results if r["backbone"] == backbone]
        width = 0.8 / len(rows)
        x = np.arange(len(columns))
        for i, r in enumerate(rows):
            acc = [100 * r["cells"][c]["acc"] for c in columns]
            ci = [100 * r["cells"][c]["ci95"] for c in columns]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, acc, width, yerr=ci, capsize=2, label=r["row"])
        ax.set_xticks(x, [c.replace(" 5-way", "\n5-way").replace(" episodes", "\nepisodes") for c in columns])
        ax.set(ylabel="accuracy (%)", ylim=(30, 100), title=f"ProtoNet, {backbone}: tested on (columns), trained on (bars)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="trained on")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/cross_domain", help="runs and results go here")
    parser.add_argument("--steps", type=int, default=1000, help="outer steps per training run")
    parser.add_argument("--tasks", type=int, default=1000, help="fixed test tasks per cell (>= 600)")
    parser.add_argument("--episodes", type=int, default=600, help="Meta-Dataset test episodes per target")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated subset")
    parser.add_argument("--rows", default=",".join(SOURCES),
                        help=f"training sources to run, comma-separated subset of {','.join(SOURCES)}; "
                             f"rows run before (their eval.json in --out) are reported too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy cores)")
    parser.add_argument("--tiny", action="store_true", help="a one-minute check of the pipeline")
    args = parser.parse_args()
    backbones, rows = args.backbones.split(","), args.rows.split(",")
    for name, chosen, known in (("backbone", backbones, BACKBONES), ("row", rows, SOURCES)):
        for value in chosen:
            if value not in known:
                parser.error(f"unknown {name} {value!r}; choose from {', '.join(known)}")
    if args.tiny:
        args.steps, args.tasks, args.episodes = 10, 50, 20
    val_tasks = 20 if args.tiny else 300
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_sets = {t: load_dataset(t, "test") for t in TARGETS}
    results = []
    t0 = time.perf_counter()
    # The features alone: cosine prototypes of the untrained hashed n-gram vectors.
    untrained = ProtoNet(create_model("feature_weights", in_features=test_sets["clinc150"].example_shape[0]),
                         distance="cosine")
    baseline = evaluate_everywhere(untrained, test_sets, args.tasks, args.episodes, out / "untrained.json")
    print(f"untrained features evaluated ({time.perf_counter() - t0:.0f} s)", flush=True)
    for backbone in BACKBONES:
        results.append({"backbone": backbone, "row": "no meta-training (features only)", "dataset": "",
                        "cells": baseline, "command": "python benchmarks/cross_domain.py (no training)"})
        for key, (row, preset, settings) in SOURCES.items():
            config, overrides = config_for(preset, settings, backbone, args.steps, val_tasks, args.threads)
            run_dir = out / f"{backbone}-{config.dataset}-{config.episodes}"
            cache = run_dir / "eval.json"
            if backbone not in backbones or key not in rows:
                if cache.is_file():  # a row run earlier: report it as it was measured
                    results.append(json.loads((run_dir / "row.json").read_text()))
                continue
            previous = json.loads((run_dir / "row.json").read_text()) if (run_dir / "row.json").is_file() else {}
            last = run_dir / "last.safetensors"
            finished_before = last.is_file() and load_checkpoint(last).train_state.get("step") == config.steps
            t = time.perf_counter()
            result = train(config, run_dir, progress=False)
            seconds = time.perf_counter() - t
            if previous.get("steps") == result.step:  # trained before: keep that run's time
                seconds = previous["train_seconds"]
            elif finished_before:  # trained before, time not recorded
                seconds = None
            learner = load_learner(run_dir)
            cells = evaluate_everywhere(learner, test_sets, args.tasks, args.episodes, cache,
                                        {"step": result.step, "best_val": result.best_val})
            record = {"backbone": backbone, "row": row, "dataset": config.dataset, "episodes": config.episodes,
                      "steps": result.step, "best_val": result.best_val, "train_seconds": seconds,
                      "cells": cells, "command": command_for(preset, overrides, run_dir)}
            atomic_write_text(run_dir / "row.json", json.dumps(record, indent=2) + "\n")
            results.append(record)
            summary = ", ".join(f"{k}: {100 * v['acc']:.1f}" for k, v in cells.items())
            print(f"{backbone} / {row}: trained {seconds or 0:.0f} s; {summary}", flush=True)
    trained = {r["backbone"] for r in results if r["dataset"]}
    results = [r for r in results if r["backbone"] in trained]  # no table of the baseline alone
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print(write_table(results, out / "table.md"))
    plot(results, out / "cross_domain.png")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'cross_domain.png'} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
