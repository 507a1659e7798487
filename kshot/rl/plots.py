"""Pictures of meta-RL results: return against adaptation steps, and 2D-navigation trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from kshot.services.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    plt = _pyplot()
    try:
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out


def plot_returns(results: Mapping[str, object], out: str | Path, title: str = "") -> Path:
    """Average return (± 95% CI over tasks) against the number of adaptation steps.

    Args:
        results: label -> a :class:`~kshot.rl.maml.PolicyEvaluation` (``mean(k)``, ``ci95(k)``, ``steps``).
        out: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, result in results.items():
        steps = list(range(result.steps + 1))  # type: ignore[attr-defined]
        ax.errorbar(steps, [result.mean(k) for k in steps], yerr=[result.ci95(k) for k in steps],  # type: ignore[attr-defined]
                    fmt="o-", capsize=3, label=label)
    ax.set(xlabel="number of gradient steps", ylabel="average return", title=title or "return after adaptation")
    ax.set_xticks(steps)
    ax.legend()
    return _save(fig, out)


def plot_navigation(learner, tasks: Sequence, out: str | Path, episodes_shown: int = 2) -> Path:
    """Trajectories in 2D navigation before and after adaptation, one panel per goal.

    Each adaptation step takes the learner's own number of episodes; ``episodes_shown`` of them
    are drawn for the meta-policy (step 0) and after each step.
    """
    import numpy as np

    evaluation = learner.evaluate_tasks(tasks, keep_episodes=True)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.4), squeeze=False)
    colours = plt.cm.viridis(np.linspace(0.0, 0.85, evaluation.steps + 1))
    for i, (ax, task) in enumerate(zip(axes[0], tasks)):
        for k, batch in enumerate(evaluation.episodes):
            for e in range(min(episodes_shown, batch.obs.shape[1])):
                n = int(batch.mask[i, e].sum())
                path = np.vstack([[0.0, 0.0], (batch.obs[i, e, :n] + batch.actions[i, e, :n].clamp(-0.1, 0.1)).cpu().numpy()])
                ax.plot(path[:, 0], path[:, 1], "--" if k == 0 else "-", color=colours[k], lw=1.2,
                        label=(("pre-update" if k == 0 else f"{k} step{'s' if k > 1 else ''}") if e == 0 else None))
        goal = task.params["goal"]
        ax.plot([goal[0]], [goal[1]], "r*", ms=14, label="goal" if i == 0 else None)
        ax.plot([0], [0], "ko", ms=4)
        ax.set(xlim=(-0.8, 0.8), ylim=(-0.8, 0.8), aspect="equal",
               title=f"goal ({goal[0]:.2f}, {goal[1]:.2f}): {evaluation.returns[i, 0]:.1f} -> {evaluation.returns[i, -1]:.1f}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    return _save(fig, out)
