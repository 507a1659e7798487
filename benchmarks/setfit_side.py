"""The SetFit side of benchmarks/text_vs_setfit.py; runs in SetFit's own environment.

Reads the tasks the kshot side wrote (the same support and query utterances, labels and seeds),
trains SetFit (Tunstall et al. 2022: contrastive fine-tuning of the sentence encoder on pairs
of support utterances, then a logistic-regression head) on each task's support set, predicts
its queries, and writes one JSON record per task: accuracy, training and inference seconds.

    benchmarks/.venv-setfit/bin/python benchmarks/setfit_side.py TASKS.json OUT.json \
        --encoder ../shared/data/models/all-MiniLM-L6-v2 [--num-iterations N] [--max-steps N]

Nothing here imports kshot: SetFit is never a dependency of kshot. Loading the model is not
timed (kshot's side does not time it either); training is ``Trainer.train()``, inference is
``SetFitModel.predict`` on the query utterances.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tasks")
    parser.add_argument("out")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--num-iterations", type=int, default=0,
                        help="SetFit's pairs per sentence (0: its default 'oversampling' strategy)")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap on contrastive steps (-1: none)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    tasks = json.load(open(args.tasks))
    records = []
    scratch = tempfile.mkdtemp(prefix="setfit-")  # SetFit's trainer wants an output folder
    for task in tasks:
        model = SetFitModel.from_pretrained(args.encoder)
        kwargs = dict(batch_size=16, num_epochs=1, seed=int(task["seed"]), report_to="none",
                      max_steps=args.max_steps, show_progress_bar=False, output_dir=scratch,
                      save_strategy="no", logging_strategy="no")
        if args.num_iterations:
            kwargs["num_iterations"] = args.num_iterations
        trainer = Trainer(model=model, args=TrainingArguments(**kwargs),
                          train_dataset=Dataset.from_dict({"text": task["support_texts"],
                                                           "label": task["support_labels"]}))
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        t1, c1 = time.perf_counter(), time.process_time()
        predicted = np.asarray(model.predict(task["query_texts"], show_progress_bar=False))
        t2, c2 = time.perf_counter(), time.process_time()
        accuracy = float((predicted == np.asarray(task["query_labels"])).mean())
        records.append({"id": task["id"], "acc": accuracy, "train_s": t1 - t0, "infer_s": t2 - t1,
                        "train_cpu_s": c1 - c0, "infer_cpu_s": c2 - c1,
                        "support": len(task["support_texts"]), "queries": len(task["query_texts"])})
        print(json.dumps(records[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
