"""Plots people would rather look at than tables: learning curves, accuracy bars."""

from __future__ import annotations

import json
from pathlib import Path

from kshot.services.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    """Write ``fig`` to the PNG ``out`` atomically and close it."""
    out = Path(out)
    try:
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        _pyplot().close(fig)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    records = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value


def plot_curves(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Training loss/accuracy and validation accuracy (with its 95% CI) against outer steps."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    if any("return_pre" in r for r in train):
        return _plot_returns_curves(train, val, out)
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (query)")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="meta-val")
    ax_loss.set(xlabel="outer step", ylabel="loss", title="query loss")
    ax_loss.legend()
    if any(_finite(r.get("acc")) for r in train + val):
        if train and "acc" in train[0]:
            ax_acc.plot([r["step"] for r in train], [100 * r["acc"] for r in train], label="train (query)")
        if val and "acc" in val[0]:
            steps = [r["step"] for r in val]
            acc = [100 * r["acc"] for r in val]
            ci = [100 * r.get("acc_ci95", 0.0) for r in val]
            ax_acc.errorbar(steps, acc, yerr=ci, fmt="o-", capsize=3, label="meta-val ± 95% CI")
        ax_acc.set(xlabel="outer step", ylabel="accuracy (%)", title="accuracy")
        ax_acc.legend()
    else:  # regression: how far adapting lowers the query loss, inner step by inner step
        inner = sorted({int(k[len("query_loss_step"):]) for r in val for k in r if k.startswith("query_loss_step")})
        for k in inner:
            ax_acc.plot([r["step"] for r in val], [r.get(f"query_loss_step{k}") for r in val], "o-",
                        label="meta-parameters" if k == 0 else f"after {k} inner step{'s' * (k > 1)}")
        ax_acc.set(xlabel="outer step", ylabel="meta-val query loss", title="within task", yscale="log")
        if inner:
            ax_acc.legend()
    return _save(fig, out)


def _plot_returns_curves(train: list[dict], val: list[dict], out: str | Path) -> Path:
    """Policies: the meta-batch's return before and after adaptation, and the meta-validation
    return after each number of adaptation steps (the within-task view), against outer steps."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("return_pre", "before adaptation"), ("return_post", "after adaptation")):
        rows = [r for r in train if _finite(r.get(key))]
        if rows:
            ax_train.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
    ax_train.set(xlabel="meta-iteration", ylabel="average return", title="training meta-batches")
    ax_train.legend()
    inner = sorted({int(k[len("return_step"):]) for r in val for k in r
                    if k.startswith("return_step") and k[len("return_step"):].isdigit()})
    for k in inner:
        steps = [r["step"] for r in val]
        ax_val.errorbar(steps, [r.get(f"return_step{k}") for r in val],
                        yerr=[r.get(f"return_step{k}_ci95", 0.0) for r in val], fmt="o-", capsize=2,
                        label="meta-policy" if k == 0 else f"after {k} step{'s' * (k > 1)}")
    ax_val.set(xlabel="meta-iteration", ylabel="average return", title="meta-validation tasks")
    if inner:
        ax_val.legend(fontsize=8)
    return _save(fig, out)


def plot_roc(curves: dict, out: str | Path) -> Path:
    """ROC curves of verifiers, each with its equal-error point and AUC.

    Args:
        curves: label -> an object with ``fpr``, ``tpr`` (arrays), ``eer`` and ``auc``
            (e.g. :class:`kshot.learners.verification.VerificationReport`).
        out: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.plot([0, 1], [1, 0], "--", color="lightgrey", linewidth=0.8, label="FPR = FNR")
    for label, c in curves.items():
        (line,) = ax.plot(c.fpr, c.tpr, label=f"{label}: AUC {c.auc:.3f}, EER {100 * c.eer:.1f}%")
        ax.plot([c.eer], [1 - c.eer], "o", color=line.get_color())
    ax.set(xlabel="false-positive rate (different pairs called same)",
           ylabel="true-positive rate (same pairs called same)", title="verification ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, out)


def plot_regression_fits(learner, panels, out: str | Path, steps=None) -> Path:
    """Curves of a regression learner before and after adaptation, against the true ones.

    Args:
        learner: a gradient-based learner (its predictors keep their trajectory outside training).
        panels: ``(task, grid_x [m, 1], true_y [m, 1], title)`` per subplot.
        out: PNG path.
        steps: inner steps to draw (default 0, 1 and 10; 0 is the meta-learned initialisation).
    """
    import torch

    steps = sorted(set(steps or (0, 1, 10)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    was_training, saved = learner.training, learner.test_inner_steps
    device = next(learner.parameters()).device
    learner.eval()
    learner.test_inner_steps = max(max(steps), 1)
    try:
        for ax, (task, grid, truth, title) in zip(axes[0], panels):
            task = task.to(device)
            with torch.no_grad():
                predictor = learner.adapt(task.support_x, task.support_y)
                curves = {k: predictor.at_step(k, grid.to(device)).cpu() for k in steps}
            ax.plot(grid[:, 0], truth[:, 0], "k-", lw=2, label="true")
            for k, y in curves.items():
                ax.plot(grid[:, 0], y[:, 0], "--" if k == 0 else "-",
                        label="meta-init" if k == 0 else f"{k} step{'s' if k > 1 else ''}")
            ax.plot(task.support_x[:, 0].cpu(), task.support_y[:, 0].cpu(), "^", color="tab:purple",
                    ms=8, label="support")
            # Frame the true curve: a prediction that diverges (too many steps at a learned rate)
            # leaves the frame instead of flattening the others.
            low, high = float(truth.min()), float(truth.max())
            margin = 0.5 * max(high - low, 1.0)
            ax.set(title=title, xlabel="x", ylim=(low - margin, high + margin))
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        out = Path(out)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        learner.train(was_training)
        learner.test_inner_steps = saved
        plt.close(fig)
    return out
