"""Where a real MAML training step spends its time: the trainer's own calls on real Omniglot tasks.

`benchmarks/maml_speed.py` times the meta-gradient on synthetic tasks beside the anchors; this
script times what `kshot train --preset maml-omniglot-5way-1shot` does in one outer step, phase by
phase (drawing the meta-batch from the seed, the meta-gradient, the optimiser step), plus what the
trainer does between steps, amortised over the steps it covers (meta-validation every `val_every`
steps, a checkpoint every `checkpoint_every`), and then the operators of one meta-gradient by
self CPU time (torch.profiler), with the number of operator calls: on a CPU a second-order task is
thousands of small kernels, so their count says how much is per-call overhead.

    python benchmarks/maml_step_profile.py --preset maml-omniglot-5way-1shot --steps 20 --threads 1 \\
        --out docs/results/maml_step_profile

Writes OUT.json and OUT.md. Run it on a quiet machine: the shares hold under load, the seconds do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="maml-omniglot-5way-1shot")
    p.add_argument("--steps", type=int, default=20, help="timed outer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators listed")
    p.add_argument("--out", default="runs/maml_step_profile")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kshot.config import resolve_config
    from kshot.runs.build import build_learner, evaluation_tasks, training_tasks
    from kshot.runs.evaluate import evaluate
    from kshot.services.checkpoint import save_checkpoint

    torch.set_num_threads(args.threads)
    config = resolve_config(args.preset, overrides={"threads": args.threads})
    sampler = training_tasks(config)
    learner = build_learner(config, sampler.example_shape, source=sampler)
    optimizer = torch.optim.Adam([q for q in learner.parameters() if q.requires_grad], lr=config.lr)
    learner.train()

    phases: dict[str, list[float]] = {"draw the meta-batch": [], "meta-gradient": [], "optimiser step": []}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = sampler.meta_batch(step)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        learner.set_training_step(step)
        learner.meta_gradient(batch)
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(seconds)
        print(f"step {step}: {t3 - t0:.3f} s", file=sys.stderr)
    per_step = {name: statistics.median(v) for name, v in phases.items()}

    val_tasks, _ = evaluation_tasks(config, "val", config.val_tasks)
    t0 = time.perf_counter()
    evaluate(learner, val_tasks)
    validation = time.perf_counter() - t0
    learner.train()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp) / "last.safetensors", learner, config=config.to_dict(),
                        train_state={"step": 0}, optimizer=optimizer)
        checkpoint = time.perf_counter() - t0
    between = {f"meta-validation ({config.val_tasks} tasks every {config.val_every} steps, {validation:.1f} s)":
               validation / config.val_every if config.val_every else 0.0,
               f"checkpoint (every {config.checkpoint_every} steps, {checkpoint:.2f} s)":
               checkpoint / config.checkpoint_every}
    total = sum(per_step.values()) + sum(between.values())

    batch = sampler.meta_batch(10_000)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.zero_grad(set_to_none=True)
        learner.meta_gradient(batch)
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    operators = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                  "share": e.self_cpu_time_total / 1e6 / self_total,
                  "us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in top]

    record = {"preset": args.preset, "threads": args.threads, "steps": args.steps,
              "meta_batch_size": config.meta_batch_size, "torch": torch.__version__,
              "per_step_s": per_step, "between_steps_s": between, "total_s": total,
              "profiled_step": {"operator_calls": calls, "self_cpu_s": self_total,
                                "us_per_call": self_total / calls * 1e6, "top": operators}}
    lines = [f"One outer step of `{args.preset}` ({config.meta_batch_size} tasks), {args.threads} thread(s), "
             f"median of {args.steps} steps, torch {torch.__version__}", "",
             "| phase | seconds per step | share |", "|---|---:|---:|"]
    for name, seconds in {**per_step, **between}.items():
        lines.append(f"| {name} | {seconds:.4f} | {100 * seconds / total:.1f} % |")
    lines += [f"| **total** | **{total:.3f}** | |", "",
              f"Operators of one meta-gradient (torch.profiler, self CPU time): {calls:,} calls, "
              f"{self_total:.3f} s, {self_total / calls * 1e6:.0f} us per call on average", "",
              "| operator | calls | self CPU s | share | us per call |", "|---|---:|---:|---:|---:|"]
    for o in operators:
        lines.append(f"| `{o['op']}` | {o['calls']:,} | {o['self_s']:.3f} | {100 * o['share']:.1f} % | "
                     f"{o['us_per_call']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
