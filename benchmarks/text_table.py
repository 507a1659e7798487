"""Tables and a plot of benchmarks/text_vs_setfit.py's results, for docs/TEXT.md.

    python benchmarks/text_table.py RESULTS.json [MORE.json ...] --plot docs/text_vs_setfit.png

Prints one markdown table per setting family: accuracy (mean ± 95% CI, Student's t, over the
tasks or seeds named), and training / inference time per task in CPU seconds (one thread) with
the wall-clock seconds beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"kshot-protonet": "kshot protonet (frozen, nothing trained)",
         "kshot-finetune": "kshot finetune (logistic regression, frozen)",
         "kshot-finetune-top2": "kshot finetune-top2 (head + top 2 layers)",
         "setfit": "SetFit"}


def pct(summary) -> str:
    if not summary:
        return "-"
    ci = summary.get("ci95")
    # An interval over fewer than 3 tasks or seeds says nothing; none is printed.
    ci = "" if ci is None or ci != ci or summary["n"] < 3 else f" ± {100 * ci:.2f}"
    return f"{100 * summary['mean']:.2f}{ci} ({summary['n']})"


def secs(record, key) -> str:
    cpu, wall = record.get(f"{key}_cpu_s"), record.get(f"{key}_s")
    if cpu is None:
        return "-"
    cpu = cpu["mean"] if isinstance(cpu, dict) else cpu
    wall = wall["mean"] if isinstance(wall, dict) else wall
    return f"{cpu:.2f} ({wall:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    results = {}
    for path in args.results:
        results.update({k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")})
    print("| setting | method | accuracy, many tasks/seeds (n) | accuracy, SetFit's tasks (n) "
          "| train CPU s (wall) | inference CPU s (wall) |")
    print("|---|---|---|---|---|---|")
    for setting, methods in results.items():
        for method, record in methods.items():
            if method.startswith("_"):
                continue
            many = record.get("acc") if method != "setfit" or "same_tasks_acc" not in record else None
            same = record.get("same_tasks_acc")
            if same is None and "per_seed" in record and method != "setfit":
                same = None
            print(f"| {setting} | {NAMES.get(method, method)} | {pct(many)} | {pct(same)} "
                  f"| {secs(record, 'train')} | {secs(record, 'infer')} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = [k for k, v in results.items() if any(isinstance(r, dict) and "train_cpu_s" in r for r in v.values())]
        fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.2), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for method, record in results[setting].items():
                if method.startswith("_"):
                    continue
                acc = record.get("same_tasks_acc") or record.get("acc")
                cpu = record.get("train_cpu_s")
                if acc is None or cpu is None:
                    continue
                cpu = cpu["mean"] if isinstance(cpu, dict) else cpu
                ax.scatter([max(cpu, 1e-3)], [100 * acc["mean"]], label=NAMES.get(method, method).split(" (")[0],
                           marker="*" if method == "setfit" else "o", s=80)
            ax.set_xscale("log")
            ax.set_title(setting, fontsize=9)
            ax.set_xlabel("training CPU seconds per task")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
