"""Meta-training throughput (tasks per second) with 1, 2, ... processes sharing each meta-batch.

Each setup ``PxT`` runs ``kshot train`` as P processes (torchrun, gloo on CPUs, NCCL on GPUs) of
T torch threads each, for a short run, and reads the trainer's own ``tasks_per_s`` from
metrics.jsonl (the last log windows, after warm-up). Setups are interleaved over repeats and
medians reported, since a shared machine's speed drifts. A second part times one averaging of
the meta-gradient across 2 processes: kshot's coalesced all-reduce (one flat buffer) against
one all-reduce per parameter tensor.

On this team's 2-core CPU machine (the numbers in docs/DISTRIBUTED.md)::

    python benchmarks/distributed_scaling.py --setups 1x1,1x2,2x1 --repeats 3

On a machine with 8 GPUs (one process per GPU)::

    python benchmarks/distributed_scaling.py --device cuda --setups 1x4,2x4,4x4,8x4 \\
        --meta-batch-size 32 --steps 60 -- --ways 20 --shots 5

Arguments after ``--`` go to ``kshot train`` unchanged (any setting: learner, dataset, ...).
Writes ``<out>/distributed_scaling.json`` and ``.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_setups(text: str) -> list[tuple[int, int]]:
    setups = []
    for item in text.split(","):
        procs, _, threads = item.strip().partition("x")
        setups.append((int(procs), int(threads or 1)))
    return setups


def run_setup(procs: int, threads: int, args, extra: list[str], work: Path) -> dict:
    """One short training run; its steady-state tasks/s (median of the log windows after the first)."""
    run_dir = work / f"{procs}x{threads}-{time.monotonic_ns()}"
    train = ["-m", "kshot", "train", "--run-dir", str(run_dir), "--no-resume", "--quiet",
             "--algo", args.algo, "--meta-batch-size", str(args.meta_batch_size),
             "--steps", str(args.steps), "--log-every", str(args.log_every), "--val-every", "0",
             "--test-tasks", "0", "--checkpoint-every", str(args.steps), "--threads", str(threads),
             "--device", args.device, *extra]
    if procs == 1:
        argv = [sys.executable, *train]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(procs), *train]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"setup {procs}x{threads} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tasks_per_s"] for r in records if r.get("split") == "train"]
    steady = rates[1:] or rates
    return {"tasks_per_s": statistics.median(steady), "windows": rates, "wall_s": wall,
            "loss": records[-1]["loss"]}


def allreduce_worker(iterations: int) -> None:
    """Run under torchrun: time kshot's coalesced gradient averaging against per-tensor all-reduce."""
    import torch
    import torch.distributed as dist

    from kshot.config import TrainConfig
    from kshot.services.distributed import launch
    from kshot.runs.build import build_learner

    with launch("cpu") as d:
        learner = build_learner(TrainConfig(), (1, 28, 28))
        params = [p for p in learner.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        metrics = {"loss": 1.0, "acc": 0.5}

        def coalesced():
            d.average_gradients(params, metrics)

        def per_tensor():
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(d.world_size)

        times: dict[str, list[float]] = {"coalesced": [], "per_tensor": []}
        for _ in range(5):
            coalesced(), per_tensor()
        for _ in range(iterations):  # interleaved
            for name, fn in (("coalesced", coalesced), ("per_tensor", per_tensor)):
                d.barrier()
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        if d.is_main:
            n = sum(p.numel() for p in params)
            print(json.dumps({"params": n, "tensors": len(params), "world_size": d.world_size,
                              **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}))


def time_allreduce(iterations: int) -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(Path(__file__).resolve()), "--allreduce-worker", str(iterations)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"all-reduce timing failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["setups"])
    medians = [results["setups"][n]["tasks_per_s"] for n in names]
    runs = [results["setups"][n]["runs"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.4))
    ax.bar(range(len(names)), medians, color="#4c72b0")
    for i, rs in enumerate(runs):
        ax.plot([i] * len(rs), rs, "k.", alpha=0.6)
    ax.set_xticks(range(len(names)), [f"{n.split('x')[0]} proc x {n.split('x')[1]} thr" for n in names])
    ax.set_ylabel("meta-training tasks / s")
    ax.set_title(f"{results['algo']} on {results['device']}, meta-batch {results['meta_batch_size']} "
                 f"(bars: median, dots: runs)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--allreduce-worker":
        allreduce_worker(int(sys.argv[2]))
        return
    argv, extra = sys.argv[1:], []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    p.add_argument("--algo", default="protonet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--meta-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--allreduce-iterations", type=int, default=200, help="0: skip the all-reduce timing")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    setups = parse_setups(args.setups)
    runs: dict[str, list[dict]] = {f"{n}x{t}": [] for n, t in setups}
    with tempfile.TemporaryDirectory(prefix="kshot-scaling-") as tmp:
        for rep in range(args.repeats):
            for procs, threads in setups:
                r = run_setup(procs, threads, args, extra, Path(tmp))
                runs[f"{procs}x{threads}"].append(r)
                print(f"repeat {rep + 1}/{args.repeats} {procs}x{threads}: {r['tasks_per_s']:.1f} tasks/s "
                      f"(windows {', '.join(f'{w:.1f}' for w in r['windows'])}; {r['wall_s']:.0f} s)",
                      file=sys.stderr)
    base = None
    results = {"algo": args.algo, "device": args.device, "meta_batch_size": args.meta_batch_size,
               "steps": args.steps, "extra": extra, "cpus": os.cpu_count(),
               "load_average": os.getloadavg(), "setups": {}}
    for name, rs in runs.items():
        rate = statistics.median(r["tasks_per_s"] for r in rs)
        base = base or rate
        results["setups"][name] = {"tasks_per_s": rate, "speedup": rate / base,
                                   "runs": [r["tasks_per_s"] for r in rs]}
    if args.allreduce_iterations:
        results["allreduce"] = time_allreduce(args.allreduce_iterations)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "distributed_scaling.png")
    print(f"| setup (processes x threads) | tasks/s (median of {args.repeats}) | vs {setups[0][0]}x{setups[0][1]} |")
    print("|---|---|---|")
    for name, r in results["setups"].items():
        print(f"| {name} | {r['tasks_per_s']:.1f} | {r['speedup']:.2f}x |")
    if "allreduce" in results:
        a = results["allreduce"]
        print(f"\naveraging {a['params']:,} gradient values in {a['tensors']} tensors over "
              f"{a['world_size']} processes: coalesced {a['coalesced_ms']:.2f} ms, "
              f"per tensor {a['per_tensor_ms']:.2f} ms (medians)")


if __name__ == "__main__":
    main()
