"""Cold-start recommendation on MovieLens-100k: meta-learned MeLU models against the baselines a
practitioner would use, on the same new users, for 5, 10 and 20 support ratings.

Rows: each trained learner (adapted to each user through kshot's inner loop; also its
meta-learned initialisation unadapted), the item mean, the global model (one model trained on
every meta-training rating) as it is and fine-tuned on each user's support ratings (learning
rate chosen on the meta-validation users), and scikit-surprise's SVD fitted on the meta-training
ratings plus the test users' support ratings. Columns: MAE, RMSE, nDCG@3, nDCG@5 (mean ± 95% CI
over test users), for each support size; the users with the fewest ratings apart; paired
differences of the best learner against each baseline. Writes JSON, a markdown table and a PNG
of error against support size.

Train the learners first (resumable; reduced budget as in docs/RECSYS.md), e.g.::

    kshot train --preset melu-movielens-100k-10shot --algo maml --steps 250 --run-dir runs/recsys/maml-10shot

then::

    python benchmarks/recsys_movielens.py --runs maml=runs/recsys/maml-{shots}shot fomaml=runs/recsys/fomaml-{shots}shot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kshot.recsys import UserTasks, adapted_predictor, load_user_ratings, score_users
from kshot.recsys.baselines import (ItemMean, SurpriseSVD, choose_fine_tuning, fine_tuned_learner,
                                    fit_global_model, global_predictor)
from kshot.recsys.evaluation import RatingReport
from kshot.recsys.metrics import METRICS
from kshot.runs.build import load_learner
from kshot.services.checkpoint import load_checkpoint
from kshot.services.files import atomic_path, atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUN_DIR",
                   help="trained learners; {shots} in RUN_DIR is replaced by the support size")
    p.add_argument("--shots", default="5,10,20")
    p.add_argument("--global-epochs", type=int, default=10)
    p.add_argument("--fine-tune-steps", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="docs/results/recsys_movielens.json")
    p.add_argument("--table", default="docs/results/recsys_movielens.md")
    p.add_argument("--plot", default="docs/recsys_movielens.png")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(data_dir=args.data_dir, cache_dir=args.cache_dir)
    train = load_user_ratings("movielens-100k", "train", **kw)
    val = load_user_ratings("movielens-100k", "val", **kw)
    test = load_user_ratings("movielens-100k", "test", **kw)
    shots_list = [int(s) for s in args.shots.split(",")]
    record: dict = {"shots": shots_list, "learners": {}, "baselines": {}, "reports": {}}

    learners: dict[int, dict] = {k: {} for k in shots_list}  # shots -> name -> learner
    for spec in args.runs:
        name, template = spec.split("=", 1)
        for shots in shots_list:
            run = template.format(shots=shots)
            if not (Path(run) / "best.safetensors").is_file():
                print(f"no {run}/best.safetensors: {name} left out at {shots} support ratings")
                continue
            ckpt = load_checkpoint(Path(run) / "best.safetensors")
            last = load_checkpoint(Path(run) / "last.safetensors")
            learners[shots][name] = load_learner(run)
            saved = ckpt.extra["ratings"]["user_split"]
            assert saved["test"] == test.user_split.test, f"{run} was trained on another user split"
            record["learners"][f"{name}@{shots}"] = {
                "run": run, "trained_shots": ckpt.config["shots"], "best_val": ckpt.train_state.get("best_val"),
                "last_step": last.train_state.get("step"), "steps": ckpt.config["steps"],
                "algo": ckpt.learner["algo"], "adapted": list(learners[shots][name].adapted_names)}

    t = time.perf_counter()
    global_model, fit = fit_global_model(train, UserTasks(val, 10), epochs=args.global_epochs, progress=True)
    record["baselines"]["global"] = {**fit, "seconds": time.perf_counter() - t}
    item_mean = ItemMean(train)

    reports = {}
    for shots in shots_list:
        tasks = UserTasks(test, shots)
        val_tasks = UserTasks(val, shots)
        scores = {}
        for name, learner in learners[shots].items():
            scores[f"{name} (adapted)"] = score_users(adapted_predictor(learner.eval()), tasks, progress=True, desc=name)
        for name, learner in list(learners[shots].items())[:1]:
            scores[f"{name} init, not adapted"] = score_users(global_predictor(learner.model), tasks)
        scores["item mean"] = score_users(item_mean, tasks)
        scores["global model"] = score_users(global_predictor(global_model), tasks)
        lr, found = choose_fine_tuning(global_model, val_tasks, steps=args.fine_tune_steps,
                                       lrs=(0.0003, 0.001, 0.003, 0.01, 0.03))
        record["baselines"][f"fine_tune_{shots}"] = {"lr": lr, "val_mse": found}
        scores["global fine-tuned"] = score_users(
            adapted_predictor(fine_tuned_learner(global_model, args.fine_tune_steps, lr)), tasks, progress=True,
            desc="fine-tune")
        t = time.perf_counter()
        scores["SVD (surprise)"] = score_users(SurpriseSVD(train, tasks, seed=0), tasks)
        record["baselines"][f"svd_{shots}_seconds"] = time.perf_counter() - t
        reports[shots] = RatingReport(shots, scores, tasks.describe())
        print(f"\n{shots} support ratings\n{reports[shots]}", flush=True)
    record["reports"] = {str(k): r.summary() for k, r in reports.items()}
    record["paired"] = paired(reports, sorted({n for k in learners.values() for n in k}))
    atomic_write_text(args.out, json.dumps(record, indent=2, default=float) + "\n")
    atomic_write_text(args.table, table(reports, record["paired"]))
    plot(reports, args.plot)
    print(f"wrote {args.out}, {args.table}, {args.plot}")


def paired(reports: dict[int, RatingReport], learners: list[str]) -> dict:
    """Each learner minus each baseline, per user (same users): mean and 95% CI of the difference."""
    out: dict = {}
    for shots, report in reports.items():
        for name in learners:
            if f"{name} (adapted)" not in report.scores:
                continue
            mine = report.scores[f"{name} (adapted)"]
            for other, theirs in report.scores.items():
                if other.endswith("(adapted)") or other.startswith(name):
                    continue
                out.setdefault(str(shots), {}).setdefault(name, {})[other] = {
                    m: mine.difference(theirs, m) for m in METRICS}
    return out


def table(reports: dict[int, RatingReport], differences: dict) -> str:
    lines = []
    for shots, report in reports.items():
        fewest, threshold = report.fewest()
        for title, group in ((f"{shots} support ratings: all {next(iter(report.scores.values())).n_users} test users",
                              report.scores),
                             (f"{shots} support ratings: the {next(iter(fewest.values())).n_users} test users "
                              f"with at most {threshold} ratings", fewest)):
            lines += [f"### {title}", "", "| method | MAE | RMSE | nDCG@3 | nDCG@5 |", "|---|---|---|---|---|"]
            lines += [f"| {name} | " + " | ".join(s.cell(m, 3) for m in METRICS) + " |" for name, s in group.items()]
            lines.append("")
        for learner, rows in differences.get(str(shots), {}).items():
            lines += [f"Paired differences, {learner} (adapted) minus each baseline, {shots} support ratings "
                      f"(negative MAE/RMSE, positive nDCG: the learner is better):", "",
                      "| baseline | ΔMAE | ΔRMSE | ΔnDCG@3 | ΔnDCG@5 |", "|---|---|---|---|---|"]
            lines += [f"| {other} | " + " | ".join(f"{d[m][0]:+.3f} ± {d[m][1]:.3f}" for m in METRICS) + " |"
                      for other, d in rows.items()]
            lines.append("")
    return "\n".join(lines)


def plot(reports: dict[int, RatingReport], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted(reports)
    names = list(reports[shots[0]].scores)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes, ("mae", "rmse", "ndcg@5")):
        for i, name in enumerate(names):
            have = [k for k in shots if name in reports[k].scores]
            x = np.array(have) + (i - len(names) / 2) * 0.12
            y = [reports[k].scores[name].mean(metric) for k in have]
            e = [reports[k].scores[name].ci95(metric) for k in have]
            ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3, label=name)
        ax.set(xlabel="support ratings per new user", ylabel=metric.upper(), xticks=shots,
               title=f"{metric.upper()} on the test users' other ratings (± 95% CI)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
