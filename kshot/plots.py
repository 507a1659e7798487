"""Plots people would rather look at than tables: learning curves, accuracy bars."""

from __future__ import annotations

import json
from pathlib import Path

from kshot.data.archives import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_curves(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Training loss/accuracy and validation accuracy (with its 95% CI) against outer steps."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (query)")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="meta-val")
    ax_loss.set(xlabel="outer step", ylabel="loss", title="query loss")
    ax_loss.legend()
    if train and "acc" in train[0]:
        ax_acc.plot([r["step"] for r in train], [100 * r["acc"] for r in train], label="train (query)")
    if val and "acc" in val[0]:
        steps = [r["step"] for r in val]
        acc = [100 * r["acc"] for r in val]
        ci = [100 * r.get("acc_ci95", 0.0) for r in val]
        ax_acc.errorbar(steps, acc, yerr=ci, fmt="o-", capsize=3, label="meta-val ± 95% CI")
    ax_acc.set(xlabel="outer step", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
