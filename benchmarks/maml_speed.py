"""MAML meta-training speed: kshot against a plain torch.func loop and the anchor libraries.

Setting (the bench harness's, ../shared/bench/README.md from the repository's root): Omniglot-shaped synthetic tasks
(28x28x1, 5-way 1-shot, 5 queries per class), Conv4 (4 x [conv3x3 64, batch norm on the batch,
ReLU, max-pool 2], linear head), meta-batch 32, inner lr 0.4, outer Adam 1e-3; second order (so)
and first order (fo); 1 and 5 inner steps. Data cost is excluded (two fixed meta-batches).

Implementations, each timed in its own subprocess (so peak RSS is per implementation):

  kshot        kshot.learners.MAML / FOMAML .meta_gradient, tasks in a loop (the CPU default)
  kshot_vmap   the same with batch_tasks="vmap" (what a GPU wants)
  func_loop    a plain per-task torch.func loop written here: functional_call + torch.func.grad
  l2l, higher, torchopt, func_vmap
               the anchors: their meta-gradient functions built by the bench harness's own code
               (anchor_speed.BUILDERS, imported from ../shared/bench, never copied here; 1
               inner step only), timed by the same loop, in the anchors' venv: --anchor-python,
               else $KSHOT_ANCHOR_PYTHON, else the venv that the harness's setup_venv.sh makes
               by default, if it can import them

One invocation runs one round: every selected implementation once, in the order given, and
appends one JSON line per run to --out. Run several rounds (each a few minutes on a busy
2-core machine), then --report prints medians per implementation and writes a PNG:

    python benchmarks/maml_speed.py --orders so,fo --steps 1 --impls kshot,func_loop,l2l,higher,torchopt --out runs/maml_speed.jsonl
    python benchmarks/maml_speed.py --orders so,fo --steps 5 --impls kshot,func_loop --out runs/maml_speed.jsonl
    python benchmarks/maml_speed.py --report runs/maml_speed.jsonl --plot docs/img/maml_speed.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WAYS, SHOTS, QUERIES, META_BATCH, INNER_LR, OUTER_LR = 5, 1, 5, 32, 0.4, 1e-3
KSHOT_IMPLS = ("kshot", "kshot_vmap", "func_loop")
ANCHOR_IMPLS = ("l2l", "higher", "torchopt", "func_vmap")
ROOT = Path(__file__).resolve().parents[1]
#: The shared bench harness, beside the repository: ../shared/bench from its root.
BENCH = ROOT.parent / "shared" / "bench"
HARNESS = BENCH / "anchor_speed.py"
ANCHOR_PYTHON_ENV = "KSHOT_ANCHOR_PYTHON"
ANCHOR_MODULES = ("learn2learn", "higher", "torchopt")


def setup_script_venv(bench: Path = BENCH) -> Path | None:
    """The venv that the harness's setup_venv.sh makes when given no folder (its ``VENV=${1:-...}``)."""
    import re

    try:
        match = re.search(r"^VENV=\$\{1:-([^}]+)\}", (bench / "setup_venv.sh").read_text(), re.M)
    except OSError:
        return None
    return Path(match.group(1)) if match else None


def find_anchor_python(given: str | None, bench: Path = BENCH) -> str:
    """The Python that runs the anchors: the one given, else $KSHOT_ANCHOR_PYTHON, else the
    setup script's venv; it must import learn2learn, higher and torchopt."""
    named = given or os.environ.get(ANCHOR_PYTHON_ENV)
    venv = setup_script_venv(bench)
    candidates = [Path(named)] if named else ([venv / "bin" / "python"] if venv else [])
    how = (f"make one with `bash {bench / 'setup_venv.sh'} DIR`, then pass --anchor-python DIR/bin/python "
           f"or set {ANCHOR_PYTHON_ENV}")
    for python in candidates:
        if not python.is_file():
            continue
        probe = subprocess.run([str(python), "-c", "import " + ", ".join(ANCHOR_MODULES)], capture_output=True)
        if probe.returncode == 0:
            return str(python)
        if named:
            raise SystemExit(f"maml_speed: {python} cannot import {', '.join(ANCHOR_MODULES)}; {how}")
    tried = ", ".join(str(p) for p in candidates) or "no candidate (no setup_venv.sh in " + str(bench) + ")"
    raise SystemExit(f"maml_speed: no Python for the anchors found (tried {tried}); {how}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_tasks(torch, seed: int, meta_batch: int):
    from kshot.tasks import Task

    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(meta_batch):
        tasks.append(Task(torch.randn(WAYS * SHOTS, 1, 28, 28, generator=g),
                          torch.arange(WAYS).repeat_interleave(SHOTS)[torch.randperm(WAYS * SHOTS, generator=g)],
                          torch.randn(WAYS * QUERIES, 1, 28, 28, generator=g),
                          torch.arange(WAYS).repeat_interleave(QUERIES)[torch.randperm(WAYS * QUERIES, generator=g)],
                          torch.arange(WAYS)))
    return tasks


def func_loop_meta_gradient(torch, model, first_order: bool, steps: int):
    """The plain per-task torch.func loop: functional_call, torch.func.grad, mean of task grads."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, grad_and_value

    params = dict(model.named_parameters())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def query_loss(p, sx, sy, qx, qy):
        fast = p
        for _ in range(steps):
            g = grad(loss)(fast, sx, sy)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - INNER_LR * g[k] for k in fast}
        return loss(fast, qx, qy)

    task_grad = grad_and_value(query_loss)

    def meta_gradient(tasks):
        theta = {k: v.detach() for k, v in params.items()}
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        for t in tasks:
            g, _ = task_grad(theta, t.support_x, t.support_y, t.query_x, t.query_y)
            for k in total:
                total[k] += g[k]
        for k, p in params.items():
            p.grad = total[k] / len(tasks)

    return meta_gradient


def kshot_step(torch, impl: str, first_order: bool, steps: int, meta_batch: int):
    """(meta_gradient(batch), parameters, batches) for kshot and the plain torch.func loop."""
    from kshot.learners import FOMAML, MAML
    from kshot.models import create_model

    torch.manual_seed(0)
    model = create_model("conv4", out_features=WAYS, image_size=28, track_running_stats=False)
    batches = [synthetic_tasks(torch, seed, meta_batch) for seed in (1, 2)]
    if impl == "func_loop":
        return func_loop_meta_gradient(torch, model, first_order, steps), list(model.parameters()), batches
    cls = FOMAML if first_order else MAML
    # transductive: batch norm over each query batch, as the anchors and the harness compute it
    learner = cls(model, inner_steps=steps, inner_lr=INNER_LR, batch_tasks="vmap" if impl == "kshot_vmap" else "loop",
                  transductive=True)
    return learner.meta_gradient, list(learner.parameters()), batches


def anchor_step(torch, impl: str, first_order: bool, meta_batch: int):
    """The same for an anchor, built by the bench harness's own code (imported, not copied)."""
    import torch.nn as nn
    import torch.nn.functional as F

    sys.path.insert(0, str(HARNESS.parent))
    import anchor_speed as harness

    torch.manual_seed(0)
    model = harness.conv4(WAYS, torch, nn)
    meta_gradient = harness.BUILDERS[impl](model, first_order, torch, F)
    batches = [harness.make_tasks(torch, meta_batch, WAYS, SHOTS, QUERIES, seed, torch.float32) for seed in (1, 2)]
    return meta_gradient, list(model.parameters()), batches


def worker(impl: str, order: str, steps: int, args) -> dict:
    """Time one implementation: warm-up, then repeats of timed meta-iterations (wall and CPU)."""
    import torch

    torch.set_num_threads(args.threads)
    if impl in ANCHOR_IMPLS:
        meta_gradient, parameters, batches = anchor_step(torch, impl, order == "fo", args.meta_batch)
    else:
        meta_gradient, parameters, batches = kshot_step(torch, impl, order == "fo", steps, args.meta_batch)
    optimizer = torch.optim.Adam(parameters, lr=OUTER_LR)
    rss_setup = peak_rss_mib()

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        meta_gradient(batches[i % 2])
        optimizer.step()

    for i in range(args.warmup):
        step(i)
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.iters):
            step(i)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    tasks = args.iters * args.meta_batch
    return {"impl": impl, "order": order, "steps": steps, "threads": args.threads, "meta_batch": args.meta_batch,
            "tasks_per_s": tasks / statistics.median(walls), "cpu_tasks_per_s": tasks / statistics.median(cpus),
            "repeat_s": walls, "peak_rss_mib": peak_rss_mib(), "rss_after_setup_mib": rss_setup,
            "torch": torch.__version__}


def run_one(impl: str, order: str, steps: int, args) -> dict:
    common = ["--iters", str(args.iters), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--meta-batch", str(args.meta_batch)]
    python = sys.executable
    if impl in ANCHOR_IMPLS:
        if steps != 1:
            return {"impl": impl, "order": order, "steps": steps, "skipped": "the harness builds 1 inner step only"}
        if impl == "torchopt" and order == "fo":
            return {"impl": impl, "order": order, "steps": steps, "skipped": "the harness has no first-order torchopt"}
        python = args.anchor_python or find_anchor_python(None)
    cmd = [python, "-W", "ignore", os.path.abspath(__file__), "--worker", impl, "--order", order,
           "--steps", str(steps)] + common
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return {"impl": impl, "order": order, "steps": steps, "error": f"rc={proc.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result.update(impl=impl, order=order, steps=steps, threads=args.threads, seconds=time.perf_counter() - t0,
                  load=os.getloadavg()[0], time=time.strftime("%Y-%m-%d %H:%M:%S"))
    return result


def report(path: Path, plot: str | None) -> None:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if "tasks_per_s" in r]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["steps"], r["order"], r["threads"], r["impl"]), []).append(r)
    rows = []
    for (steps, order, threads, impl), rs in sorted(groups.items()):
        rows.append({"steps": steps, "order": order, "threads": threads, "impl": impl, "runs": len(rs),
                     "tasks_per_s": statistics.median(r["tasks_per_s"] for r in rs),
                     "cpu_tasks_per_s": (statistics.median(r["cpu_tasks_per_s"] for r in rs)
                                         if all("cpu_tasks_per_s" in r for r in rs) else None),
                     "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs)})
    print("| inner steps | order | threads | implementation | runs | tasks/s wall (median) | x fastest anchor "
          "| tasks/s of CPU time (median) | x fastest anchor | peak RSS MiB |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        same = [r for r in rows if r["impl"] in ANCHOR_IMPLS and r["impl"] != "func_vmap"
                and (r["steps"], r["order"], r["threads"]) == (row["steps"], row["order"], row["threads"])]
        ratios = []
        for key in ("tasks_per_s", "cpu_tasks_per_s"):
            best = max((r[key] for r in same if r[key]), default=None)
            ratios.append(f"{row[key] / best:.2f}" if best and row[key] else "-")
        cpu = f"{row['cpu_tasks_per_s']:.1f}" if row["cpu_tasks_per_s"] else "-"
        print(f"| {row['steps']} | {row['order']} | {row['threads']} | {row['impl']} | {row['runs']} | "
              f"{row['tasks_per_s']:.1f} | {ratios[0]} | {cpu} | {ratios[1]} | {row['peak_rss_mib']:.0f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = sorted({(r["steps"], r["order"], r["threads"]) for r in rows})
        fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            sel = [r for r in rows if (r["steps"], r["order"], r["threads"]) == setting]
            colors = ["tab:green" if r["impl"].startswith("kshot") else "tab:gray" for r in sel]
            ax.barh([r["impl"] for r in sel], [r["tasks_per_s"] for r in sel], color=colors)
            ax.set(title=f"{setting[0]} step(s), {'second' if setting[1] == 'so' else 'first'} order",
                   xlabel="tasks / s (median)")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
        print(f"wrote {plot}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="kshot,func_loop,l2l,higher,torchopt")
    p.add_argument("--orders", default="so,fo")
    p.add_argument("--steps", default="1", help="inner steps, comma-separated (anchors: 1 only)")
    p.add_argument("--iters", type=int, default=3, help="timed meta-iterations per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=META_BATCH)
    p.add_argument("--anchor-python", default=None,
                   help=f"python of the venv made by ../shared/bench/setup_venv.sh (default: ${ANCHOR_PYTHON_ENV}, "
                        f"else that script's default venv, if it imports the anchors)")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default="runs/maml_speed.jsonl", help="append one JSON line per run here")
    p.add_argument("--report", help="print the table of medians of this JSONL file (and --plot)")
    p.add_argument("--plot", help="with --report: write a bar chart PNG here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--order", default="so", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        report(Path(args.report), args.plot)
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.order, int(args.steps), args)))
        return 0
    if any(impl in ANCHOR_IMPLS for impl in args.impls.split(",")):
        args.anchor_python = find_anchor_python(args.anchor_python)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for steps in (int(s) for s in args.steps.split(",")):
        for order in args.orders.split(","):
            for impl in args.impls.split(","):
                result = run_one(impl, order, steps, args)
                with open(out, "a") as f:
                    f.write(json.dumps(result) + "\n")
                shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                         if k in ("impl", "order", "steps", "tasks_per_s", "cpu_tasks_per_s", "peak_rss_mib",
                                  "error", "skipped", "seconds", "load")}
                print(json.dumps(shown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
