"""What an hour buys: test accuracy against training time on this machine, for runs of any learner.

For each run directory given, the points are its weight snapshots (``--snapshot-every`` in
training), each evaluated with ``kshot eval`` on the same fixed test tasks; a run without snapshots
contributes its meta-validation records instead (marked as such). The x axis is the run's
``train_seconds``: time spent in outer steps, summed over every session that trained it.

    python benchmarks/time_to_accuracy.py \\
        --row "ProtoNet 5-way 1-shot=runs/protonet-omniglot/60way-1shot-trainval:5:1:98.8" \\
        --row "MAML 5-way 1-shot=runs/maml-omniglot-5way-1shot:5:1:98.7" \\
        --out docs/results/time_to_accuracy

A row is ``LABEL=RUN_DIR[:WAYS:SHOTS[:PAPER[:within]]]`` (ways and shots default to the run's own
test settings; ``within`` draws each task's classes from one alphabet). Evaluations are cached in
``RUN_DIR/snapshots/eval-*.json``, so adding snapshots as training continues costs only the new
ones. Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_row(text: str) -> dict:
    if "=" not in text:
        raise SystemExit(f"--row {text!r}: expected LABEL=RUN_DIR[:WAYS:SHOTS[:PAPER[:within]]]")
    label, spec = text.split("=", 1)
    parts = spec.split(":")
    row = {"label": label, "run": Path(parts[0]), "ways": 0, "shots": 0, "paper": None, "within": None}
    if len(parts) > 1 and parts[1]:
        row["ways"] = int(parts[1])
    if len(parts) > 2 and parts[2]:
        row["shots"] = int(parts[2])
    if len(parts) > 3 and parts[3]:
        row["paper"] = float(parts[3])
    if len(parts) > 4:
        row["within"] = parts[4] == "within"
    return row


def snapshot_points(row: dict, tasks: int, queries: int, progress: bool, inner_steps: int = 0) -> list[dict]:
    from kshot.runs.evaluate import evaluate_checkpoint
    from kshot.services.checkpoint import load_checkpoint
    from kshot.services.files import atomic_write_text

    folder = row["run"] / "snapshots"
    snapshots = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
    if not snapshots:
        return []
    key = (f"{row['ways']}w{row['shots']}s{queries}q{tasks}t{'-within' if row['within'] else ''}"
           f"{f'-k{inner_steps}' if inner_steps else ''}")
    cache_path = folder / f"eval-{key}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    points = []
    for path in snapshots:
        stamp = f"{path.name}:{path.stat().st_size}:{int(path.stat().st_mtime)}"
        if stamp not in cache:
            ckpt = load_checkpoint(path)
            evaluation = evaluate_checkpoint(path, ways=row["ways"], shots=row["shots"], queries=queries,
                                             tasks=tasks, within_groups=row["within"], progress=progress,
                                             inner_steps=inner_steps or None)
            cache[stamp] = {"step": ckpt.train_state.get("step"),
                            "train_seconds": ckpt.train_state.get("train_seconds"),
                            "acc": 100 * evaluation.result.mean, "ci95": 100 * evaluation.result.ci95,
                            "tasks": evaluation.result.n_tasks, "description": evaluation.description}
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
            print(f"{row['label']}: step {cache[stamp]['step']}: {cache[stamp]['acc']:.2f} ± "
                  f"{cache[stamp]['ci95']:.2f} %", flush=True)
        points.append({**cache[stamp], "kind": "test"})
    return sorted(points, key=lambda p: p["step"])


def validation_points(row: dict) -> list[dict]:
    metrics = row["run"] / "metrics.jsonl"
    if not metrics.is_file():
        return []
    points = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "val" and "train_seconds" in record:
            points.append({"step": record["step"], "train_seconds": record["train_seconds"],
                           "acc": 100 * record["acc"], "ci95": 100 * record["acc_ci95"],
                           "tasks": record["tasks"], "kind": "val"})
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", required=True, help="LABEL=RUN_DIR[:WAYS:SHOTS[:PAPER[:within]]]")
    parser.add_argument("--tasks", type=int, default=1000, help="fixed test tasks per snapshot")
    parser.add_argument("--queries", type=int, default=15, help="queries per class of the test tasks")
    parser.add_argument("--inner-steps", type=int, default=0,
                        help="maml family, reptile: inner steps per test task (default: each run's own)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="docs/results/time_to_accuracy", help="output path stem")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = [parse_row(r) for r in args.row]
    for row in rows:
        if not row["run"].is_dir():
            raise SystemExit(f"run directory {row['run']} not found")
        row["points"] = snapshot_points(row, args.tasks, args.queries, progress=True,
                                        inner_steps=args.inner_steps) or validation_points(row)
        if not row["points"]:
            print(f"{row['label']}: no snapshots and no validation records with train_seconds; skipped")
    rows = [r for r in rows if r["points"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from kshot.services.files import atomic_write_text

    record = {"command": " ".join(["python", "benchmarks/time_to_accuracy.py", *(argv or sys.argv[1:])]),
              "rows": [{k: (str(v) if k == "run" else v) for k, v in r.items()} for r in rows]}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    lines = ["| row | training time | steps | accuracy (%) | paper (%) | points |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        last = r["points"][-1]
        kind = "test tasks" if last["kind"] == "test" else "meta-validation"
        lines.append(f"| {r['label']} | {last['train_seconds'] / 3600:.2f} h | {last['step']} | "
                     f"{last['acc']:.2f} ± {last['ci95']:.2f} | {r['paper'] if r['paper'] else '-'} | "
                     f"{len(r['points'])} ({kind}) |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kshot.services.files import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, r in enumerate(rows):
        colour = f"C{i}"
        hours = [p["train_seconds"] / 3600 for p in r["points"]]
        style = "-o" if r["points"][0]["kind"] == "test" else "--s"
        ax.errorbar(hours, [p["acc"] for p in r["points"]], yerr=[p["ci95"] for p in r["points"]],
                    fmt=style, color=colour, markersize=3, capsize=2, label=r["label"])
        if r["paper"]:
            ax.axhline(r["paper"], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("training time on this machine (hours, one thread)")
    ax.set_ylabel("accuracy (%), mean ± 95% CI")
    ax.set_title("Time to accuracy (dotted: the paper's figure; dashed: meta-validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
