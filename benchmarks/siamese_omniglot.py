"""Koch et al. 2015's Omniglot setting: 20-way one-shot tasks within one alphabet of the
evaluation alphabets, with a Siamese network, Prototypical Networks and MAML on the same tasks.

    nice -n 10 python benchmarks/siamese_omniglot.py --out docs/results/siamese-omniglot \
        --runs runs/siamese-omniglot

What it does, for each learner (``--learners``, default ``siamese,protonet,maml``):

1. trains it with ``kshot.train`` from a named preset plus the shared protocol below (each
   training run is printed as the ``kshot train`` command that repeats it, and resumes if the
   script is interrupted and started again);
2. tests the best checkpoint (chosen on 20-way one-shot within-alphabet tasks of the validation
   alphabets) on the same ``--test-tasks`` fixed 20-way one-shot within-alphabet tasks of the 20
   evaluation alphabets (printed as the ``kshot eval`` command that repeats it);
3. for the Siamese network, also reports verification on pairs of the evaluation alphabets: ROC,
   EER, AUC, and accuracy at the threshold calibrated on validation pairs.

Shared protocol (Lake et al. 2015 / Koch et al. 2015, as far as one CPU allows): Omniglot's Lake
split (train on 25 of the 30 background alphabets, select on the other 5, test on the 20
evaluation alphabets; Koch validated on 10 evaluation alphabets and tested on the other 10),
28x28 images and the Conv4 encoder for every learner (Koch: 105x105 and a 38.9M-parameter
network; ``--koch-net`` uses that network and image size, for a GPU). Test tasks take 5 queries per
class (Lake: 1); the expected accuracy is the same, the interval narrower.

Writes ``<out>/results.json``, ``<out>/table.md`` (one row per learner, with its commands),
``<out>/accuracy.png`` and ``<out>/roc.png``. ``--tiny`` checks the whole pipeline in a few
minutes (numbers meaningless). ``--within-alphabet`` trains as the test tests: every training
episode from one alphabet (ProtoNet's 20-way then), every Siamese negative a character of its
anchor's alphabet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kshot.runs.build import load_learner
from kshot.services.checkpoint import load_checkpoint
from kshot.config import PRESETS, TrainConfig, resolve_config
from kshot.data import load_dataset
from kshot.services.files import atomic_path, atomic_write_text
from kshot.runs.evaluate import evaluate
from kshot.tasks.pairs import PairSampler
from kshot.tasks import fixed_tasks
from kshot.runs.build import dataset_settings
from kshot.runs.train import train
from kshot.learners.verification import VerificationReport

#: learner -> (preset it starts from, its own overrides). Every learner then gets PROTOCOL.
LEARNER_SETTINGS = {
    "siamese": ("siamese-omniglot-20way-1shot", {}),
    # Snell et al.'s Omniglot recipe (60-way training episodes, 5 queries), on the Lake split.
    "protonet": ("protonet-omniglot-20way-1shot", {}),
    # Finn et al.'s 20-way 1-shot recipe (5 inner steps of 0.1, 16 tasks), on the Lake split.
    "maml": ("maml-omniglot-20way-1shot", {}),
}
PROTOCOL = dict(dataset="omniglot", protocol="lake", image_size=28, test_ways=20, test_shots=1,
                test_queries=5, test_within_groups=True, test_tasks=0)
PAPER = {"siamese": ("Koch et al. 2015, 105x105 net, affine distortions", 92.0),
         "protonet": ("Snell et al. 2017 report 96.0% on Vinyals' split, random classes", None),
         "maml": ("Finn et al. 2017 report 95.8% on Vinyals' split, random classes", None)}
TINY = dict(steps=12, val_every=6, val_tasks=3, checkpoint_every=6, log_every=3)


def kshot_command(*args: str, **settings) -> str:
    parts = ["kshot", *args]
    for name, value in settings.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def learner_config(name: str, args) -> tuple[TrainConfig, dict] | None:
    preset, own = LEARNER_SETTINGS[name]
    if preset not in PRESETS:
        return None
    overrides = {**own, **PROTOCOL, "seed": args.seed}
    if args.threads:
        overrides["threads"] = args.threads
    if args.steps:
        overrides["steps"] = args.steps
    if args.tiny:
        overrides.update(TINY)
    if args.within_alphabet:  # train as the test tests; no training alphabet has 60 characters
        overrides["within_groups"] = True
        if name == "protonet":
            overrides["ways"] = 20
    if args.koch_net and name == "siamese":
        overrides.update(image_size=105, backbone="koch")
    if args.device != "cpu":
        overrides["device"] = args.device
    return resolve_config(preset, overrides=overrides), {"preset": preset, **overrides}


def weights_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's tensors (its file's bytes vary: the header's key order does)."""
    digest = hashlib.sha256()
    state = load_checkpoint(path).state_dict
    for name in sorted(state):
        digest.update(name.encode() + state[name].numpy().tobytes())
    return digest.hexdigest()


def test_learner(name: str, run_dir: Path, args, tasks) -> dict:
    cached = run_dir / "benchmark-test.json"
    key = {"tasks": len(tasks), "ways": 20, "shots": 1, "queries": PROTOCOL["test_queries"],
           "best_weights": weights_digest(run_dir / "best.safetensors")}
    if cached.is_file():  # the same tasks on the same weights: tested already
        record = json.loads(cached.read_text())
        if record.get("key") == key:
            return record
    learner = load_learner(run_dir, device=args.device)
    t0 = time.perf_counter()
    result = evaluate(learner, tasks, device=args.device, progress=not args.quiet, desc=f"testing {name}")
    record = {"key": key, **result.summary(), "test_seconds": time.perf_counter() - t0}
    if name == "siamese":
        record["verification"] = verification_on_test_pairs(learner, args, run_dir)
    atomic_write_text(cached, json.dumps(record, indent=2) + "\n")
    return record


def verification_on_test_pairs(learner, args, run_dir: Path) -> dict:
    """ROC of evaluation-alphabet pairs, and accuracy at the threshold calibrated on val pairs."""
    config = json.loads((run_dir / "config.json").read_text())
    test_set = load_dataset("omniglot", "test", **dataset_settings(TrainConfig(**config)))
    n_pairs = 400 if args.tiny else 4000
    scores, same = learner.pair_scores(PairSampler(test_set, pairs=min(500, n_pairs), seed=args.seed + 1), n_pairs)
    report = VerificationReport.from_scores(scores, same, score=learner.score_name, split="test")
    val = json.loads((run_dir / "verification.json").read_text())
    val_report = VerificationReport(np.array(val["roc"]["fpr"]), np.array(val["roc"]["tpr"]), np.array([]),
                                    val["eer"], val["threshold"], val["auc"], val["pairs"], split="val")
    from kshot.services.plots import plot_roc

    plot_roc({f"validation alphabets ({val['pairs']} pairs)": val_report,
              f"evaluation alphabets ({n_pairs} pairs)": report}, Path(args.out) / "roc.png")
    return {**report.summary(), "accuracy_at_calibrated_threshold": report.accuracy(scores, same, val["threshold"]),
            "calibrated_threshold": val["threshold"], "val_eer": val["eer"], "val_auc": val["auc"]}


def plot_accuracies(rows: list[dict], out: Path) -> None:
    from kshot.services.plots import _pyplot

    if not any(r.get("acc") is not None for r in rows):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    names = [r["learner"] for r in rows]
    acc = [100 * (r.get("acc") or 0.0) for r in rows]
    ci = [100 * (r.get("acc_ci95") or 0.0) for r in rows]
    ax.bar(names, acc, yerr=ci, capsize=5, color=["tab:blue", "tab:orange", "tab:green"][:len(rows)])
    for i, r in enumerate(rows):
        label = "pending" if r.get("acc") is None else f"{acc[i]:.1f}"
        ax.text(i, acc[i] + ci[i] + 1, label, ha="center")
    if any(r["learner"] == "siamese" for r in rows):
        ax.axhline(92.0, ls="--", color="grey", lw=1)
        ax.text(-0.4, 93.5, "Koch et al. 2015: 92.0 (105 px net)", ha="left", fontsize=7, color="grey")
    ax.set(ylabel="accuracy (%) ± 95% CI", ylim=(0, 100),
           title="Omniglot 20-way 1-shot, within-alphabet, evaluation alphabets")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], args) -> str:
    lines = ["| learner | trained | test accuracy (20-way 1-shot, within alphabet) | tasks | "
             "steps | train time | paper |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER[r["learner"]]
        paper_text = f"{paper[1]:.1f}% ({paper[0]})" if paper[1] else paper[0]
        if r.get("acc") is None:
            lines.append(f"| {r['learner']} | {r.get('note', 'pending')} | pending | | | | {paper_text} |")
            continue
        hours = r["train_seconds"] / 3600
        lines.append(f"| {r['learner']} | preset `{r['preset']}` | **{100 * r['acc']:.2f} ± "
                     f"{100 * r['acc_ci95']:.2f} %** | {r['tasks']} | {r['steps']} | {hours:.2f} h | {paper_text} |")
    lines.append("")
    for r in rows:
        if r.get("acc") is None:
            continue
        lines.append(f"- {r['learner']}: `{r['train_command']}` then `{r['eval_command']}`")
        v = r.get("verification")
        if v:
            lines.append(f"  - verification on {v['pairs']} evaluation-alphabet pairs: EER {100 * v['eer']:.2f} %, "
                         f"AUC {v['auc']:.4f}; accuracy at the threshold calibrated on validation pairs "
                         f"{100 * v['accuracy_at_calibrated_threshold']:.2f} % (validation EER "
                         f"{100 * v['val_eer']:.2f} %, AUC {v['val_auc']:.4f})")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: list[dict], summary: dict, args) -> None:
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "table.md", markdown(rows, args))
    plot_accuracies(rows, out / "accuracy.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where results.json, table.md and the plots go")
    p.add_argument("--runs", default="runs/siamese-omniglot", help="parent of the training runs")
    p.add_argument("--learners", default="siamese,protonet,maml")
    p.add_argument("--steps", type=int, default=0, help="outer steps for every learner (0: each preset's)")
    p.add_argument("--test-tasks", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--within-alphabet", action="store_true",
                   help="train within one alphabet too: episodes of one alphabet's characters (ProtoNet: "
                        "20-way), Siamese negatives from the anchor's alphabet")
    p.add_argument("--koch-net", action="store_true", help="Siamese with Koch's 105x105 network (GPU)")
    p.add_argument("--tiny", action="store_true", help="a few steps and tasks: checks the pipeline only")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    n_tasks = 20 if args.tiny else args.test_tasks
    test_set = None
    rows = []
    for name in [n.strip() for n in args.learners.split(",") if n.strip()]:
        if name not in LEARNER_SETTINGS:
            p.error(f"unknown learner {name!r}; choose from {', '.join(LEARNER_SETTINGS)}")
        built = learner_config(name, args)
        if built is None:
            note = f"pending: no preset {LEARNER_SETTINGS[name][0]!r} in this build"
            print(f"{name}: {note}", flush=True)
            rows.append({"learner": name, "note": note})
            continue
        config, settings = built
        run_dir = runs / name
        train_command = kshot_command("train", "--run-dir", str(run_dir), **settings)
        print(f"\n== {name}: {train_command}", flush=True)
        t0 = time.perf_counter()
        result = train(config, run_dir, progress=not args.quiet)
        if test_set is None:
            test_set = load_dataset("omniglot", "test", **dataset_settings(config))
            tasks = fixed_tasks(test_set, 20, 1, PROTOCOL["test_queries"], n_tasks, within_groups=True)
        record = test_learner(name, run_dir, args, tasks)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_seconds = sum(m["window"] * config.meta_batch_size / m["tasks_per_s"] for m in _windows(metrics))
        row = {"learner": name, "preset": settings["preset"], "steps": result.step, "argv": sys.argv,
               "train_seconds": train_seconds, "best_val": result.best_val, "tasks": record["tasks"],
               "acc": record["acc"], "acc_ci95": record["acc_ci95"], "train_command": train_command,
               "eval_command": kshot_command("eval", str(run_dir), "--ways", "20", "--shots", "1",
                                             "--queries", str(PROTOCOL["test_queries"]), "--tasks",
                                             str(n_tasks), "--within-groups"),
               "verification": record.get("verification"), "session_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name}: {100 * row['acc']:.2f} ± {100 * row['acc_ci95']:.2f} % over {row['tasks']} tasks", flush=True)
    # Rows of learners not run this time are kept from an earlier run into the same --out.
    earlier = out / "results.json"
    if earlier.is_file():
        ran = {r["learner"] for r in rows}
        kept = [r for r in json.loads(earlier.read_text()).get("rows", []) if r["learner"] not in ran]
        rows = sorted(rows + kept, key=lambda r: list(LEARNER_SETTINGS).index(r["learner"]))
    summary = {"protocol": PROTOCOL, "test_tasks": n_tasks, "tiny": args.tiny, "rows": rows,
               "torch": torch.__version__, "argv": sys.argv}
    write_summary(out, rows, summary, args)
    print("\n" + markdown(rows, args))
    return 0


def _windows(metrics: list[dict]) -> list[dict]:
    """Training records, each with the number of steps it averages over (``window``)."""
    out, last = [], 0
    for m in metrics:
        if m.get("split") == "train":
            out.append({**m, "window": m["step"] - last})
            last = m["step"]
    return out


if __name__ == "__main__":
    sys.exit(main())
