"""kshot and SetFit side by side on few-shot intent detection, same encoder, splits, shots, seeds.

Settings (docs/TEXT.md):

* episodes: 5-way 1- and 5-shot tasks, 15 queries per class, on the test intents of CLINC150
  (the travel and kitchen_and_dining domains) and BANKING77 (the seeded 15 test intents), drawn
  by kshot's fixed evaluation seed; kshot on ``--kshot-tasks`` of them (from cached embeddings),
  SetFit and kshot's timings from raw text on the first ``--setfit-tasks``.
* intent: every intent at once, 10 (or 5) labelled utterances each from the released training
  set, the whole released test set (BANKING77 77-way, CLINC150 150-way); seeds 0..``--seeds``-1
  for kshot, the first ``--setfit-seeds`` of them for SetFit.

kshot methods: ``protonet`` (cosine prototypes of the frozen embeddings: nothing trained),
``finetune`` (a logistic-regression head fitted on them), ``finetune-top2`` (the head and the
encoder's top 2 layers fine-tuned on the support set, the 4 layers below frozen). SetFit runs in
its own environment (``bash benchmarks/setfit_env.sh``) through ``benchmarks/setfit_side.py``.

Timings are per task on this machine, one thread each, interleaved by setting (kshot, then
SetFit): training = embedding the support utterances + fitting; inference = embedding the
queries + predicting; in wall-clock and CPU seconds (on a shared machine CPU seconds of a
one-thread process are the figure that does not depend on the other jobs). Model loading is
not timed on either side.

    python benchmarks/text_vs_setfit.py --encoder ../shared/data/models/all-MiniLM-L6-v2 \
        --setfit-python benchmarks/.venv-setfit/bin/python --out docs/results/text/text_vs_setfit.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kshot.data import load_dataset  # noqa: E402
from kshot.learners import ProtoNet  # noqa: E402
from kshot.models import create_model  # noqa: E402
from kshot.tasks import EVAL_SEED, TaskSampler  # noqa: E402
from kshot.text import (FineTune, encode_dataset, get_encoder, released_task, t_interval,  # noqa: E402
                        text_backbone_options)
from kshot.text.data import pack_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def kshot_learner(method: str, encoder_path: str, ways: int):
    if method == "protonet":
        return ProtoNet(create_model("identity"), distance="cosine", temperature=10.0)
    if method == "finetune":
        return FineTune(create_model("identity"), inner_steps=100, inner_lr=0.01)
    if method == "finetune-top2":
        model = create_model("text_top", **text_backbone_options(encoder_path, 2))
        return FineTune(model, inner_steps=FINETUNE_TOP_STEPS, inner_lr=0.01, body_lr=1e-4, batch_size=32)
    raise ValueError(method)


FINETUNE_TOP_STEPS = 120


def from_text(learner, encoder, method: str, support_texts, support_y, query_texts, ways: int):
    """kshot from raw utterances, timed: (predicted labels, training seconds, inference seconds)."""
    top = method.endswith("top2")

    def inputs(texts):
        if not top:
            return encoder.encode(texts)
        tokens, offsets = encoder.hidden_states(texts, encoder.layers - 2)
        return pack_tokens(tokens, offsets, np.arange(len(texts)))

    learner.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        predictor = learner.adapt(inputs(support_texts), torch.as_tensor(support_y), ways)
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        predicted = torch.cat([predictor.logits(inputs(query_texts[i:i + 512])).argmax(-1)
                               for i in range(0, len(query_texts), 512)])
    t2, c2 = time.perf_counter(), time.process_time()
    return predicted.numpy(), {"wall": t1 - t0, "cpu": c1 - c0}, {"wall": t2 - t1, "cpu": c2 - c1}


def run_setfit(args, tasks: list[dict], extra: list[str]) -> list[dict]:
    if not args.setfit_python or not tasks:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        task_file, out_file = Path(tmp) / "tasks.json", Path(tmp) / "out.json"
        task_file.write_text(json.dumps(tasks))
        cmd = [args.setfit_python, str(ROOT / "benchmarks" / "setfit_side.py"), str(task_file), str(out_file),
               "--encoder", args.encoder, *extra]
        print("  setfit:", " ".join(cmd[2:4]), *extra, flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out_file.read_text())


def summarise(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "ci95": t_interval(values), "n": int(len(values))}


def episodes(args, encoder, results: dict) -> None:
    for name in ("clinc150", "banking77"):
        full = encode_dataset(load_dataset(name, "all", data_dir=args.data_dir), encoder, 0, args.cache_dir,
                              progress=False)
        test_names = load_dataset(name, "test", data_dir=args.data_dir).class_names
        index = {c: i for i, c in enumerate(full.class_names)}
        test = full.subset([index[c] for c in test_names])
        top = None
        if "finetune-top2" in args.methods:
            top_full = encode_dataset(load_dataset(name, "all", data_dir=args.data_dir), encoder, 2,
                                      args.cache_dir, progress=False)
            top = top_full.subset([index[c] for c in test_names])
        for shots in (1, 5):
            key = f"{name}-5way-{shots}shot"
            if args.settings and key not in args.settings:
                continue
            sampler = TaskSampler(test, 5, shots, 15, seed=EVAL_SEED)
            record = results.setdefault(key, {})
            print(key, flush=True)
            # kshot accuracy over many tasks, from the cached encodings.
            for method in args.methods:
                n_tasks = args.kshot_tasks if method != "finetune-top2" else args.top_tasks
                if record.get(f"kshot-{method}", {}).get("acc", {}).get("n") == n_tasks:
                    continue  # measured by an earlier run into the same file
                data = top if method == "finetune-top2" else test
                learner = kshot_learner(method, args.encoder, 5).eval()
                accs = []
                for i in range(n_tasks):
                    classes, examples = sampler.task_indices(i, 0)
                    sx = data.load(examples[:, :shots].reshape(-1))
                    qx = data.load(examples[:, shots:].reshape(-1))
                    sy = torch.arange(5).repeat_interleave(shots)
                    qy = torch.arange(5).repeat_interleave(15)
                    with torch.no_grad():
                        accs.append(float((learner.adapt(sx, sy, 5).predict(qx) == qy).float().mean()))
                record[f"kshot-{method}"] = {"acc": summarise(accs)}
                print(f"  kshot {method}: {100 * np.mean(accs):.2f} ± {100 * t_interval(accs):.2f} "
                      f"({n_tasks} tasks)", flush=True)
            # The first tasks from raw text: kshot timed, and SetFit on the same utterances.
            tasks = []
            for i in range(args.setfit_tasks):
                classes, examples = sampler.task_indices(i, 0)
                s, q = examples[:, :shots].reshape(-1), examples[:, shots:].reshape(-1)
                tasks.append({"id": i, "seed": i, "support_texts": [full.texts[j] for j in s],
                              "support_labels": np.repeat(np.arange(5), shots).tolist(),
                              "query_texts": [full.texts[j] for j in q],
                              "query_labels": np.repeat(np.arange(5), 15).tolist()})
            for method in args.methods:
                learner = kshot_learner(method, args.encoder, 5)
                timed = [from_text(learner, encoder, method, t["support_texts"], t["support_labels"],
                                   t["query_texts"], 5) for t in tasks]
                record[f"kshot-{method}"].update(
                    same_tasks_acc=summarise([np.mean(p == np.asarray(t["query_labels"])) for (p, _, _), t
                                              in zip(timed, tasks)]),
                    train_s=summarise([tr["wall"] for _, tr, _ in timed]),
                    infer_s=summarise([inf["wall"] for _, _, inf in timed]),
                    train_cpu_s=summarise([tr["cpu"] for _, tr, _ in timed]),
                    infer_cpu_s=summarise([inf["cpu"] for _, _, inf in timed]))
            sf = run_setfit(args, tasks, [])
            if sf:
                record["setfit"] = {"same_tasks_acc": summarise([r["acc"] for r in sf]),
                                    **{k: summarise([r[k] for r in sf])
                                       for k in ("train_s", "infer_s", "train_cpu_s", "infer_cpu_s")}}
                print(f"  setfit: {100 * record['setfit']['same_tasks_acc']['mean']:.2f} on {len(sf)} tasks, "
                      f"train {record['setfit']['train_s']['mean']:.1f} s", flush=True)
            write(args, results)


def intent(args, encoder, results: dict) -> None:
    for name, shots in args.intent_settings:
        key = f"{name}-all-{shots}shot"
        record = results.setdefault(key, {})
        print(key, flush=True)
        raw = load_dataset(name, "all", data_dir=args.data_dir)
        datasets = {0: encode_dataset(raw, encoder, 0, args.cache_dir, progress=False)}
        if "finetune-top2" in args.methods:
            datasets[2] = encode_dataset(raw, encoder, 2, args.cache_dir, progress=False)
        ways = raw.num_classes
        tasks = [released_task(raw, shots, seed) for seed in range(args.seeds)]
        for method in args.methods:
            data = datasets[2 if method == "finetune-top2" else 0]
            learner = kshot_learner(method, args.encoder, ways).eval()
            accs = []
            n_seeds = args.seeds if method != "finetune-top2" else min(args.seeds, args.top_seeds)
            for task in tasks[:n_seeds]:
                with torch.no_grad():
                    predictor = learner.adapt(data.load(task.support), torch.as_tensor(task.support_y), ways)
                    predicted = torch.cat([predictor.predict(data.load(task.query[i:i + 512]))
                                           for i in range(0, len(task.query), 512)]).numpy()
                accs.append(float((predicted == task.query_y).mean()))
            record[f"kshot-{method}"] = {"acc": summarise(accs), "per_seed": accs}
            print(f"  kshot {method}: {100 * np.mean(accs):.2f} ± {100 * t_interval(accs):.2f} "
                  f"({n_seeds} seeds)", flush=True)
        texts = [{"id": t.seed, "seed": t.seed, "support_texts": [raw.texts[j] for j in t.support],
                  "support_labels": t.support_y.tolist(), "query_texts": [raw.texts[j] for j in t.query],
                  "query_labels": t.query_y.tolist()} for t in tasks[:args.setfit_seeds]]
        for method in args.methods if not args.no_timing else []:
            learner = kshot_learner(method, args.encoder, ways)
            timed = [from_text(learner, encoder, method, t["support_texts"], t["support_labels"],
                               t["query_texts"], ways) for t in texts[:1]]
            predicted, train_s, infer_s = timed[0]
            record[f"kshot-{method}"].update(train_s=train_s["wall"], infer_s=infer_s["wall"],
                                             train_cpu_s=train_s["cpu"], infer_cpu_s=infer_s["cpu"], timed_seed_acc=float(
                (predicted == np.asarray(texts[0]["query_labels"])).mean()))
        extra = ["--num-iterations", str(args.setfit_iterations), "--max-steps", str(args.setfit_max_steps)]
        sf = run_setfit(args, texts, extra) if f"{name}:{shots}" in args.setfit_intent else []
        if sf:
            record["setfit"] = {"acc": summarise([r["acc"] for r in sf]), "per_seed": [r["acc"] for r in sf],
                                **{k: float(np.mean([r[k] for r in sf]))
                                   for k in ("train_s", "infer_s", "train_cpu_s", "infer_cpu_s")},
                                "num_iterations": args.setfit_iterations, "max_steps": args.setfit_max_steps}
            print(f"  setfit: {100 * record['setfit']['acc']['mean']:.2f}, train {record['setfit']['train_s']:.0f} s",
                  flush=True)
        write(args, results)


def write(args, results: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=str(ROOT.parent / "shared" / "data" / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--data-dir", default=os.environ.get("KSHOT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--cache-dir", default=os.environ.get("KSHOT_CACHE_DIR"))
    parser.add_argument("--setfit-python", default="", help="the SetFit environment's python (empty: kshot only)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "text" / "text_vs_setfit.json"))
    parser.add_argument("--only", choices=("episodes", "intent"), default=None)
    parser.add_argument("--settings", nargs="*", default=[], help="episode settings to run (default: all)")
    parser.add_argument("--methods", nargs="+", default=["protonet", "finetune", "finetune-top2"])
    parser.add_argument("--kshot-tasks", type=int, default=600)
    parser.add_argument("--top-tasks", type=int, default=100, help="tasks for finetune-top2 (slower)")
    parser.add_argument("--setfit-tasks", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--top-seeds", type=int, default=3)
    parser.add_argument("--setfit-seeds", type=int, default=1)
    parser.add_argument("--setfit-iterations", type=int, default=5,
                        help="SetFit's num_iterations in the all-intents setting (its default sampling "
                             "would draw ~600,000 pairs for BANKING77 10-shot)")
    parser.add_argument("--setfit-intent", nargs="*", default=["banking77:10"],
                        help="all-intents settings SetFit runs on (it is slow there)")
    parser.add_argument("--setfit-max-steps", type=int, default=-1,
                        help="cap on SetFit's contrastive steps in the all-intents setting (-1: none)")
    parser.add_argument("--intent", nargs="+", default=["banking77:10", "banking77:5", "clinc150:10", "clinc150:5"])
    parser.add_argument("--no-timing", action="store_true",
                        help="all-intents setting: accuracy only (timing embeds every test utterance again)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.intent_settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.intent]
    torch.set_num_threads(args.threads)
    encoder = get_encoder(args.encoder)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    results["_machine"] = {"load_average_at_start": os.getloadavg(), "threads": args.threads,
                           "encoder": args.encoder, "argv": sys.argv[1:]}
    if args.only in (None, "episodes"):
        episodes(args, encoder, results)
    if args.only in (None, "intent"):
        intent(args, encoder, results)
    results["_machine"]["load_average_at_end"] = os.getloadavg()
    write(args, results)


if __name__ == "__main__":
    main()
