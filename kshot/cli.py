"""The ``kshot`` command: thin wrappers that parse, call the Python API, and print.

Every error a user can cause ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

from kshot.config import MIN_TEST_TASKS, PRESETS, TrainConfig
from kshot.errors import KshotError, KshotWarning, TrainingStopped

#: Subcommands contributed by other modules: name -> (add_arguments, run).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``kshot <name>``: decorate ``run(args)``; its ``.arguments`` adds the options."""
    def wrap(run: Callable[[argparse.Namespace], int]):
        def arguments(fn: Callable[[argparse.ArgumentParser], None]):
            COMMANDS[name] = (help, fn, run)
            return fn
        run.arguments = arguments  # type: ignore[attr-defined]
        COMMANDS[name] = (help, lambda p: None, run)
        return run
    return wrap


def _field_help() -> dict[str, str]:
    """Help texts from the comments beside TrainConfig's fields."""
    source = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^\n=]+=[^\n#]*#\s*(.+)$", source, re.M)}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


#: The preset named on the command line, so that ``kshot train --preset P --help`` shows its values.
_HELP_PRESET: str | None = None


def _registered_choices() -> dict[str, str]:
    """The settings whose values are names in a registry, and those names."""
    from kshot.data import DATASETS
    from kshot.models import list_models
    from kshot.recsys.users import RELEASES
    from kshot.rl import ENV_FAMILIES
    from kshot.runs.build import algorithms
    from kshot.tasks.families import TASK_FAMILIES

    datasets = sorted(set(DATASETS) | set(TASK_FAMILIES) | set(ENV_FAMILIES) | set(RELEASES))
    return {"algo": ", ".join(sorted(algorithms())), "backbone": ", ".join(list_models()),
            "dataset": ", ".join(datasets) + ", or several joined by + (e.g. clinc150+banking77)"}


def _shown(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return '""' if value == "" else str(value)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    helps = _field_help()
    choices = _registered_choices()
    defaults = TrainConfig().to_dict()
    chosen = PRESETS.get(_HELP_PRESET or "", (None, {}))[1]
    title = (f"settings (override the preset and config file; values of --preset {_HELP_PRESET} shown)"
             if chosen else "settings (override the preset and config file; `kshot train --preset NAME "
                            "--help` shows a preset's values)")
    group = parser.add_argument_group(title)
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "dict": str, "bool": _bool}.get(f.type, str)  # type: ignore[arg-type]
        metavar = "JSON" if f.type == "dict" else str(f.type).upper()
        text = helps.get(f.name, "")
        if f.name in choices:
            text += f"; one of {choices[f.name]}"
        values = [] if "default" in text else [f"default {_shown(defaults[f.name])}"]
        if f.name in chosen and chosen[f.name] != defaults[f.name]:
            values.append(f"preset {_HELP_PRESET}: {_shown(chosen[f.name])}")
        text += f" ({'; '.join(values)})" if values else ""
        group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar,
                           help=text.replace("%", "%%"))


# ----------------------------------------------------------------------------- train
@command("train", "meta-train a learner (resumes the run in --run-dir if there is one)")
def run_train(args: argparse.Namespace) -> int:
    from kshot.config import resolve_config
    from kshot.runs.train import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "preset"}
    config = resolve_config(args.preset, args.config, overrides)
    run_dir = Path(args.run_dir or Path("runs") / (config.preset or f"{config.algo}-{config.dataset}"))
    result = train(config, run_dir, resume=not args.no_resume, progress=not args.quiet)
    if result.rank:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {run_dir}")
    if result.best_val:
        bv = result.best_val
        shape = "" if "return" in bv else f" ({config.eval_ways}-way {config.eval_shots}-shot)"
        print(f"best meta-validation: {_score(bv)} at step {bv['step']}{shape}{_protocol(bv)}")
    if result.test:
        t = result.test
        shape = "" if "return" in t else f", {t['ways']}-way {t['shots']}-shot"
        print(f"meta-test ({t['tasks']} tasks{shape}): {_score(t)}{_protocol(t)}")
    return 0


def _protocol(result: dict) -> str:
    """``, transductive`` or ``, non-transductive``: how the queries of a result were normalised."""
    if "transductive" not in result:
        return ""
    return ", transductive" if result["transductive"] else ", non-transductive"


def _score(result: dict) -> str:
    """Accuracy ± CI, the loss (MSE) ± CI for regression, where accuracy is NaN, or a policy's
    return after adaptation."""
    if "return" in result:
        return (f"return {result['return']:.3f} ± {result.get('return_ci95', float('nan')):.3f} "
                f"after {result.get('return_step', 1)} adaptation steps")
    if result["acc"] != result["acc"]:
        return f"MSE {result['loss']:.4f} ± {result.get('loss_ci95', float('nan')):.4f}"
    return f"{100 * result['acc']:.2f} ± {100 * result['acc_ci95']:.2f} %"


@run_train.arguments
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="start from a named preset (`kshot presets` lists them)")
    p.add_argument("--config", help="a TOML, YAML or JSON file of settings")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: runs/<preset>)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if --run-dir holds a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_arguments(p)
    p.epilog = ("On a shared or loaded machine, --threads 1 is often several times faster than torch's "
                "default thread count.")


# ----------------------------------------------------------------------------- eval
@command("eval", "accuracy of a checkpoint on fixed test tasks, mean ± 95% CI")
def run_eval(args: argparse.Namespace) -> int:
    from kshot.runs.evaluate import evaluate_checkpoint

    _set_threads(args.threads)
    if args.out:  # before the evaluation, not after it
        from kshot.errors import DataError
        from kshot.services.files import check_writable

        check_writable(args.out, "the result file", DataError, "give --out a writable file")
    evaluation = evaluate_checkpoint(
        args.checkpoint, ways=args.ways, shots=args.shots, queries=args.queries, tasks=args.tasks,
        split=args.split, seed=args.seed, within_groups=args.within_groups, episodes=args.episodes,
        dataset=args.dataset, protocol=args.protocol, image_size=args.image_size,
        data_dir=args.data_dir, cache_dir=args.cache_dir, data_path=args.data_path, device=args.device,
        progress=not args.quiet, steps=args.steps, plot=args.plot, transductive=args.transductive,
        inner_steps=args.inner_steps, head=args.head)
    result = evaluation.result
    print(evaluation.description)
    if hasattr(result, "table"):  # a policy: the return after each adaptation step
        print(f"average return (95% CI over {result.n_tasks} tasks):")
        print(result.table())
        for path in evaluation.plots:
            print(f"wrote {path}")
    elif evaluation.report is not None:  # a rating model: recommendation metrics per user
        print("\n".join(evaluation.report.lines()))
        print("(means ± 95% CI over users; nDCG of each user's query items ranked by predicted rating)")
    elif result.is_regression:
        print(f"MSE {result.loss:.4f} ± {result.loss_ci95:.4f} (95% CI over {result.n_tasks} tasks), "
              f"{result.protocol}")
    else:
        print(f"accuracy {100 * result.mean:.2f} ± {100 * result.ci95:.2f} % (95% CI over {result.n_tasks} tasks), "
              f"{result.protocol}")
    if args.out:
        evaluation.write_json(args.out)
    return 0


def _set_threads(threads: int) -> None:
    """Torch's intra-op threads: on a shared machine 1 is often fastest (see docs/RESULTS.md)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@run_eval.arguments
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .safetensors checkpoint, or a run directory (uses best)")
    p.add_argument("--ways", type=int, default=0, help="classes per task (default: the run's test ways)")
    p.add_argument("--shots", type=int, default=0, help="support examples per class (default: the run's)")
    p.add_argument("--queries", type=int, default=15, help="query examples per class (default: 15)")
    p.add_argument("--tasks", type=int, default=1000, help=f"fixed test tasks (default 1000, at least {MIN_TEST_TASKS})")
    p.add_argument("--split", default="test", choices=("test", "val", "train", "trainval"))
    p.add_argument("--seed", type=int, default=None, help="seed of the task set (default: kshot's fixed one)")
    p.add_argument("--within-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="draw each task's classes from one group, e.g. one Omniglot alphabet "
                        "(default: as the run was validated)")
    p.add_argument("--episodes", default="fixed", choices=("fixed", "variable"),
                   help="fixed: --ways x --shots tasks; variable: Meta-Dataset episodes")
    p.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=None,
                   help="maml family, reptile: normalise each task's query set by its own batch-norm "
                        "statistics (Finn et al.'s protocol) or, --no-transductive, by the support set's "
                        "(default: as the run was trained)")
    p.add_argument("--inner-steps", type=int, default=None, dest="inner_steps",
                   help="maml family, reptile: gradient steps per task at test time (default: the "
                        "run's test_inner_steps)")
    p.add_argument("--head", default=None, metavar="ALGO",
                   help="baseline, rfs: fit each task's head as ALGO does, on the checkpoint's frozen backbone "
                        "(rfs on a baseline run: one pre-training for both; default: the run's own)")
    p.add_argument("--dataset", help="evaluate on another dataset than the one trained on "
                   "(cross-domain evaluation; a+b for tasks from each of several)")
    p.add_argument("--protocol", help="dataset split protocol")
    p.add_argument("--image-size", type=int, dest="image_size")
    p.add_argument("--data-dir", dest="data_dir", help="archives (default: $KSHOT_DATA_DIR, else the "
                   "user cache; never the one recorded in the checkpoint)")
    p.add_argument("--cache-dir", dest="cache_dir", help="writable caches (default: $KSHOT_CACHE_DIR, "
                   "else the user cache)")
    p.add_argument("--data-path", dest="data_path", help="a run on your own folder or table: where that "
                   "data is now (default: where it was when the run trained)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--steps", type=int, default=3,
                   help="policies: report the return after 0..STEPS adaptation steps (default 3)")
    p.add_argument("--plot", help="policies: the PNG of return against steps (default: returns-<split>.png "
                   "beside the checkpoint; 2D navigation also draws trajectories beside it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- verify
@command("verify", "are two images of the same class? (a Siamese checkpoint's similarity and decision)")
def run_verify(args: argparse.Namespace) -> int:
    import torch

    from kshot.runs.build import learner_from_checkpoint
    from kshot.services.checkpoint import load_checkpoint
    from kshot.data.images import ImageFormat
    from kshot.errors import CheckpointError, ConfigError

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.learner.get("algo") != "siamese":
        raise ConfigError(f"kshot verify needs a Siamese checkpoint; {args.checkpoint} holds a "
                          f"{ckpt.learner.get('algo')!r} learner (train one with --algo siamese)")
    if "image_format" not in ckpt.extra:
        raise CheckpointError(f"{args.checkpoint} does not record the image format its model was trained "
                              f"on, so image files cannot be read for it")
    learner = learner_from_checkpoint(ckpt).eval()  # checks the checkpoint's records first
    fmt = ImageFormat.from_dict(ckpt.extra["image_format"])
    first, second = fmt.read(args.first), fmt.read(args.second)
    if args.threshold is not None:
        how = "given"
        learner.threshold.fill_(learner.from_display(args.threshold))
    elif learner.calibrated:
        how = f"calibrated at the equal-error rate, {100 * float(learner.eer):.2f} %, of held-out pairs"
    else:
        how = "not calibrated: the loss's own boundary"
    with torch.no_grad():
        scores, same = learner.verify(first[None], second[None])
    name, threshold = learner.display_name, learner.display(learner.decision_threshold)
    print(f"{name} {learner.display(float(scores[0])):.4f} (threshold {threshold:.4f}, {how})")
    print("same" if bool(same[0]) else "different")
    return 0


@run_verify.arguments
def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a Siamese .safetensors checkpoint, or its run directory (uses best)")
    p.add_argument("first", metavar="A", help="an image file")
    p.add_argument("second", metavar="B", help="another image file")
    p.add_argument("--threshold", type=float, default=None,
                   help="decide at this similarity (koch: a probability) or distance (contrastive, "
                        "triplet) instead of the calibrated threshold")


# ----------------------------------------------------------------------------- adapt
@command("adapt", "adapt a trained learner to your own classes and predict your query files "
                  "(a policy: to a task of its environments)")
def run_adapt(args: argparse.Namespace) -> int:
    from kshot.errors import ConfigError
    from kshot.runs.adapt import adapt_and_predict, adapt_policy
    from kshot.runs.build import resolve_device

    _set_threads(args.threads)
    if args.checkpoint is None and (args.task is not None or not args.text_encoder):
        raise ConfigError("give a checkpoint (or, for utterances, --text-encoder to classify them "
                          "with a pre-trained encoder and nothing trained)")
    if args.task is not None:
        out = None if args.out == "predictions.csv" else args.out
        done = adapt_policy(args.checkpoint, args.task, steps=args.steps, episodes=args.episodes,
                            seed=args.seed, out=out or "adapted.safetensors")
        returns = ", ".join(f"{r:.3f}" for r in done.returns)
        print(f"adapted the policy to {json.dumps(done.task)} in {done.steps} steps")
        print(f"average return after 0..{done.steps} steps: {returns}")
        print(f"wrote the adapted policy to {done.path}")
        return 0
    if args.support is None or args.query is None:
        raise ConfigError("give --support and --query (a classifier), or --task (a policy)")
    if args.shots is not None and args.shots < 1:
        from kshot.errors import ConfigError
        raise ConfigError(f"--shots must be at least 1, not {args.shots}")
    query = args.query[0] if len(args.query) == 1 else args.query  # several: image files
    model, support, predictions = adapt_and_predict(
        args.checkpoint, args.support, query, shots=args.shots,
        device=resolve_device(args.device), batch_size=args.batch_size,
        text_encoder=args.text_encoder, algo=args.algo)
    info = sys.stderr if args.out == "-" else sys.stdout
    classes = ", ".join(f"{name} ({n})" for name, n in list(model.support_counts.items())[:8])
    more = f", ... ({model.ways} classes)" if model.ways > 8 else ""
    print(f"adapted {model.learner.algo} to {model.ways} classes from {len(support.names)} support "
          f"examples: {classes}{more}", file=info)
    if support.inverted is not None and predictions.inverted is not None:
        print(f"polarity: the model reads light strokes on a dark ground; inverted the images with a light "
              f"ground ({int(support.inverted.sum())} of {len(support.names)} support, "
              f"{int(predictions.inverted.sum())} of {len(predictions.names)} query), kept the others",
              file=info)
    if args.out == "-":
        sys.stdout.write(predictions.to_csv())
    else:
        predictions.write_csv(args.out)
        print(f"wrote {len(predictions.names)} predictions to {args.out}", file=info)
    if predictions.accuracy is not None:
        print(f"accuracy {100 * predictions.accuracy:.2f} % ({predictions.correct} of "
              f"{len(predictions.names)} labelled queries)", file=info)
    return 0


@run_adapt.arguments
def _adapt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a .safetensors checkpoint, or a run directory (uses best); none with --text-encoder")
    p.add_argument("--support",
                   help="folder with one sub-folder of images per class (or, for a model trained on "
                        "a table, a CSV/Parquet file with the label column; for text, a CSV file "
                        "with columns text,label)")
    p.add_argument("--query", nargs="+",
                   help="images to classify: a folder of them, loose or in class sub-folders (then "
                        "accuracy is printed too), or image files; or a table; for text, a CSV file "
                        "(label column optional) or a text file with one utterance per line")
    p.add_argument("--text-encoder", dest="text_encoder", default=None,
                   help="text: a Hugging Face encoder folder or hub name; without a checkpoint, "
                        "classify utterances with it and nothing trained (with a checkpoint: where "
                        "its encoder is now, if moved)")
    p.add_argument("--algo", default="protonet", choices=("protonet", "finetune"),
                   help="without a checkpoint: protonet (cosine prototypes of the embeddings) or "
                        "finetune (a logistic-regression head fitted on them); default protonet")
    p.add_argument("--out", default="predictions.csv",
                   help="CSV written with one row per query: file, predicted class, probability of "
                        "each class (default: predictions.csv; '-' prints it); a policy: the adapted "
                        "checkpoint (default: adapted.safetensors)")
    p.add_argument("--task", help='policies: the task to adapt to, as JSON: \'{"goal": [0.3, -0.2]}\' (nav2d), '
                   '\'{"velocity": 1.5}\' (halfcheetah-vel), \'{"direction": -1}\' (halfcheetah-dir, ant-dir)')
    p.add_argument("--steps", type=int, default=None,
                   help="policies: policy-gradient steps (default: the run's test steps)")
    p.add_argument("--episodes", type=int, default=None,
                   help="policies: episodes per step (default: the run's episodes_per_task)")
    p.add_argument("--seed", type=int, default=0, help="policies: seed of the episodes' random draws")
    p.add_argument("--shots", type=int, default=None,
                   help="use only the first SHOTS support examples of each class (default: all)")
    p.add_argument("--batch-size", type=int, default=256, dest="batch_size",
                   help="query examples per forward pass (default 256)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


# ----------------------------------------------------------------------------- intent
@command("intent", "text: the standard intent-detection setting (all intents, K shots, released test set)")
def run_intent(args: argparse.Namespace) -> int:
    from kshot.config import resolve_config
    from kshot.runs.evaluate import evaluate_intents

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "preset"}
    config = resolve_config(args.preset, args.config, overrides)
    _set_threads(config.threads)
    if args.seeds < 1:
        from kshot.errors import ConfigError
        raise ConfigError(f"--seeds must be at least 1, not {args.seeds}")
    result = evaluate_intents(config, list(range(args.seeds)), checkpoint=args.checkpoint,
                              device=config.device, progress=not args.quiet)
    print(f"{config.algo} on {config.dataset} through {config.text_encoder}: {result}")
    if args.out:
        from kshot.services.files import atomic_write_text

        record = {"config": config.to_dict(), "checkpoint": args.checkpoint, **result.summary()}
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0


@run_intent.arguments
def _intent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="e.g. text-intent-banking77-10shot (`kshot presets` lists them)")
    p.add_argument("--config", help="a TOML, YAML or JSON file of settings")
    p.add_argument("--checkpoint", help="use this trained learner instead of the config's (untrained) one")
    p.add_argument("--seeds", type=int, default=5, help="support sets drawn, one per seed (default 5)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_arguments(p)


# ----------------------------------------------------------------------------- recommend
@command("recommend", "a new user's top-N unseen movies from a few ratings (a rating model's checkpoint)")
def run_recommend(args: argparse.Namespace) -> int:
    from kshot.recsys.recommend import recommend
    from kshot.runs.build import resolve_device

    _set_threads(args.threads)
    result = recommend(args.checkpoint, args.ratings, top=args.top, age=args.age, gender=args.gender,
                       occupation=args.occupation, zip_code=args.zip, min_ratings=args.min_ratings,
                       data_dir=args.data_dir,
                       cache_dir=args.cache_dir, device=resolve_device(args.device))
    info = sys.stderr if args.out == "-" else sys.stdout
    for note in result.user.notes():
        print(f"kshot: note: {note}", file=sys.stderr)
    print(f"adapted to {len(result.user.items)} ratings; top {len(result.titles)} unseen movies "
          f"(predicted rating, title):", file=info)
    print("\n".join(result.lines()), file=info)
    if args.out == "-":
        sys.stdout.write(result.to_csv())
    else:
        result.write_csv(args.out)
        print(f"wrote {args.out}", file=info)
    return 0


@run_recommend.arguments
def _recommend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a rating model's .safetensors checkpoint, or its run directory")
    p.add_argument("--ratings", required=True,
                   help="CSV of your ratings: a movie column (movie_id or title) and a rating column (1-5)")
    p.add_argument("--top", type=int, default=10, help="how many movies to recommend (default 10)")
    p.add_argument("--out", default="recommendations.csv",
                   help="CSV written with rank, movie_id, title, predicted_rating (default: "
                        "recommendations.csv; '-' prints it)")
    p.add_argument("--min-ratings", type=int, default=10, dest="min_ratings",
                   help="recommend only movies at least this many training users rated (default 10)")
    p.add_argument("--age", type=int, default=None, help="your age in years (optional)")
    p.add_argument("--gender", default=None, help="M or F (optional)")
    p.add_argument("--occupation", default=None, help="one of the release's occupations (optional)")
    p.add_argument("--zip", default=None, help="your zip code (optional)")
    p.add_argument("--data-dir", dest="data_dir", help="where the MovieLens release is (default: the run's)")
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


# ----------------------------------------------------------------------------- presets
@command("presets", "list the named presets and the published figures they reproduce")
def run_presets(args: argparse.Namespace) -> int:
    width = max(len(n) for n in PRESETS)
    for name, (description, _) in sorted(PRESETS.items()):
        print(f"{name:<{width}}  {description}")
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kshot", description="Meta-learning: train, evaluate and "
                                     "adapt few-shot learners.")
    from kshot import __version__

    parser.add_argument("--version", action="version", version=f"kshot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """kshot's own warnings as one line, like its errors; others as Python shows them."""
    if issubclass(category, KshotWarning):
        print(f"kshot: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def _preset_named(words: list[str]) -> str | None:
    """The --preset of this command line (only to show its values in --help); None if none."""
    for i, word in enumerate(words):
        if word == "--preset" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--preset="):
            return word.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    code = _run_command(argv)
    from kshot.services import distributed

    if distributed.joined_a_group():  # torchrun: see distributed.joined_a_group for why
        distributed.end_process(code)
    return code


def _run_command(argv: Sequence[str] | None) -> int:
    global _HELP_PRESET
    _HELP_PRESET = _preset_named(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", KshotWarning)
        try:
            return int(args.run(args) or 0)
        except TrainingStopped as e:  # asked to stop, and stopped cleanly: not an error
            from kshot.services.distributed import rank_label

            if not rank_label() or rank_label().startswith("[rank 0/"):  # said once, not per rank
                print(f"kshot: {e}", file=sys.stderr)
            return e.exit_status
        except KshotError as e:
            from kshot.services.distributed import rank_label

            print(f"kshot: error: {rank_label()}{e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("kshot: interrupted (a run resumes from its last checkpoint with the same command)",
                  file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
