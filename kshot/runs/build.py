"""From a config (or a saved run) to its parts: device, datasets, task sources, learner.

``train``, ``evaluate`` and ``adapt`` all start here, and this module calls nothing above
itself, so the way from "a saved run" to "its test tasks" goes down the layers once::

    checkpoint -> config -> dataset -> task source -> fixed tasks
               -> learner spec -> backbone -> learner (weights loaded)
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Sequence

import torch

from kshot.config import PRESETS, TrainConfig, config_from_dict
from kshot.data import load_dataset
from kshot.data.base import FewShotDataset
from kshot.data.images import MAX_IMAGE_SIZE
from kshot.data.multisource import MultiSourceDataset
from kshot.errors import CheckpointError, ConfigError, KshotError
from kshot.learners import LEARNERS, Learner, create_learner
from kshot.models import create_model
from kshot.recsys import RatingTasks, UserTasks, is_rating_dataset, rating_learner, ratings_from_config
from kshot.rl import POLICY_LEARNERS, env_family, is_env_family
from kshot.services.checkpoint import Checkpoint, load_checkpoint
from kshot.tasks import EVAL_SEED, Task, TaskSource, family_sampler, family_tasks, fixed_episodes, fixed_tasks, task_family
from kshot.text import encode_dataset, get_encoder, same_encoder, text_backbone_options


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when torch sees one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def option_owners() -> dict[str, list[str]]:
    """Each learner option among the settings -> the algorithms that use it (what each learner
    declares in ``config_options``, and ``sampler_options`` for its training tasks)."""
    owners: dict[str, list[str]] = {}
    for algo, cls in sorted(algorithms().items()):
        for name in (*cls.config_options, *getattr(cls, "sampler_options", ())):
            owners.setdefault(name, []).append(algo)
    return owners


def check_config(config: TrainConfig) -> None:
    """What only the layers that know the learners can check in a config: the algorithm exists,
    every learner option set is one the algorithm uses, classification tasks have 2+ ways.

    An option counts as set when it differs from its default and from the preset's value (a
    preset of one learner used with ``--algo`` of another keeps its own options quietly).
    """
    check_algorithm(config)
    baseline = TrainConfig().to_dict()
    if config.preset in PRESETS:
        baseline.update(PRESETS[config.preset][1])
    for name, algos in option_owners().items():
        if config.algo in algos or getattr(config, name) == baseline[name]:
            continue
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {getattr(config, name)} is an option of {' and '.join(algos)}, which "
                          f"{config.algo} does not use; drop it, or choose --algo {algos[0]}")
    classification = not (task_family(config.dataset) or is_env_family(config.dataset)
                          or is_rating_dataset(config.dataset))
    if classification and min(config.ways, config.eval_ways) < 2:
        raise ConfigError(f"{min(config.ways, config.eval_ways)}-way tasks have one possible answer (accuracy "
                          f"is always 100%); use --ways and --test-ways of 2 or more")


def dataset_settings(config: TrainConfig) -> dict:
    """The keyword arguments of :func:`kshot.data.load_dataset` that a config sets."""
    return dict(protocol=config.protocol, image_size=config.image_size, data_path=config.data_path,
                split_file=config.split_file, data_dir=config.data_dir or None,
                cache_dir=config.cache_dir or None, **config.extra)


def load_split(config: TrainConfig, split: str, **settings) -> FewShotDataset:
    """Split ``split`` of the config's dataset (``settings`` override the config's); text seen
    through ``config.text_encoder`` when it names one (encoded once, then read from the cache)."""
    settings = {**dataset_settings(config), **settings}
    data = load_dataset(config.dataset, split, **settings)
    if config.text_encoder:  # every split shares the encodings of the whole dataset
        text = isinstance(data, MultiSourceDataset) or hasattr(data, "texts")
        whole = load_dataset(config.dataset, "all", **settings) if split != "all" and text else None
        data = encode_dataset(data, get_encoder(config.text_encoder), config.encoder_layers,
                              config.cache_dir or None, within=whole)
    return data


def checkpoint_extra(dataset) -> dict:
    """How the training data read its inputs (image format, table columns, text featuriser), for
    ``kshot adapt``, and the shape of one example, so that ``kshot eval`` can refuse other data."""
    extra = getattr(dataset, "checkpoint_extra", None)
    if callable(extra):
        record = dict(extra() or {})
    else:
        fmt = getattr(dataset, "image_format", None)
        record = {"image_format": fmt.to_dict()} if fmt is not None else {}
    record["example_shape"] = list(dataset.example_shape)
    return record


def algorithms() -> dict[str, type[Learner]]:
    """Every learner by algorithm name: kshot.learners' and the policy learners of kshot.rl."""
    return {**LEARNERS, **POLICY_LEARNERS}


def check_algorithm(config: TrainConfig) -> None:
    """A ConfigError for an unknown algorithm, or one that cannot learn from the config's data."""
    known = algorithms()
    if config.algo not in known:
        raise ConfigError(f"unknown algorithm {config.algo!r}; choose one of {', '.join(sorted(known))}")
    policy, environments = config.algo in POLICY_LEARNERS, is_env_family(config.dataset)
    if policy and not environments:
        raise ConfigError(f"{config.algo} learns policies in environments; choose an environment family "
                          f"with --dataset (nav2d, halfcheetah-vel, halfcheetah-dir, ant-dir)")
    if environments and not policy:
        raise ConfigError(f"{config.dataset} is a family of environments; train a policy on it with "
                          f"--algo {' or '.join(sorted(POLICY_LEARNERS))}")


def training_tasks(config: TrainConfig) -> TaskSource:
    """The stream of training tasks (or pair batches) the config's algorithm trains on."""
    if is_env_family(config.dataset):  # a task is an environment drawn from the family
        return env_family(config.dataset, "train", seed=config.seed, meta_batch_size=config.meta_batch_size,
                          horizon=config.horizon)
    if is_rating_dataset(config.dataset):  # users as tasks (kshot.recsys)
        return RatingTasks(ratings_from_config(config, config.train_split), config.shots, config.queries,
                           seed=config.seed, meta_batch_size=config.meta_batch_size)
    if task_family(config.dataset) is not None:  # generated tasks
        return family_sampler(config.dataset, "train", config.shots, config.queries, seed=config.seed,
                              meta_batch_size=config.meta_batch_size)
    check_algorithm(config)
    return LEARNERS[config.algo].make_sampler(config, load_split(config, config.train_split))


def evaluation_tasks(config: TrainConfig, split: str, n_tasks: int, *, ways: int = 0, shots: int = 0,
                     queries: int = 0, seed: int | None = None, within_groups: bool | None = None,
                     episodes: str = "fixed", extra: dict | None = None) -> tuple[Sequence[Task], str]:
    """Fixed tasks of ``split`` for the config's data, and their shape in words.

    Unset arguments take the config's test settings. ``extra`` is a checkpoint's record of its
    input form: text is featurised as in training, and data of another example shape is refused.
    """
    ways, shots = ways or config.eval_ways, shots or config.eval_shots
    queries = queries or config.test_queries
    within = config.test_within_groups if within_groups is None else within_groups
    if episodes not in ("fixed", "variable"):
        raise ConfigError(f"--episodes {episodes!r}: choose fixed or variable")
    if is_env_family(config.dataset):  # environments: each split's fixed tasks from its own seed
        family = env_family(config.dataset, split, seed=seed, horizon=config.horizon)
        return family.fixed_tasks(n_tasks), f"{family.description}, {config.episodes_per_task} episodes per step"
    if task_family(config.dataset) is not None:  # generated tasks (sinusoid): their own fixed seeds
        return (family_tasks(config.dataset, split, shots, queries, n_tasks, seed=seed),
                f"{shots}-shot, {queries} queries per task")
    extra = extra or {}
    if is_rating_dataset(config.dataset):  # one task per user of the split (at most n_tasks users)
        users = UserTasks(ratings_from_config(config, split, extra), shots,
                          seed=EVAL_SEED if seed is None else seed, max_users=n_tasks)
        return users, users.describe()
    settings = {"features": extra["text_features"]} if "text_features" in extra else {}
    data = load_split(config, split, **settings)
    if "text_encoder" in extra:
        same_encoder(extra["text_encoder"], checkpoint_extra(data).get("text_encoder"))
    expected = extra.get("example_shape")
    if expected is not None and tuple(data.example_shape) != tuple(expected):
        raise ConfigError(f"the checkpoint's model takes examples of shape {tuple(expected)}, but "
                          f"{config.dataset} gives {tuple(data.example_shape)}; evaluate on data "
                          f"of the kind it was trained on")
    task_seed = EVAL_SEED if seed is None else seed
    if episodes == "variable":
        if within:
            raise ConfigError("--episodes variable draws classes from the whole split; "
                              "use --no-within-groups")
        return (fixed_episodes(data, n_tasks, seed=task_seed),
                "variable-way variable-shot (Meta-Dataset episodes)")
    tasks = fixed_tasks(data, ways, shots, queries, n_tasks, seed=task_seed, within_groups=within)
    return tasks, (f"{ways}-way {shots}-shot, {queries} queries per class"
                   + (", classes of each task from one group" if within else ""))


def build_learner(config: TrainConfig, example_shape: Sequence[int], source=None) -> Learner:
    """A new learner as the config describes, its initial weights drawn from the config's seed;
    given its training ``source``, built for it (a pre-training head sized to its classes)."""
    check_algorithm(config)
    if is_rating_dataset(config.dataset):  # a rating model sized for the release
        return rating_learner(config, ratings_from_config(config, config.train_split))
    torch.manual_seed(config.seed)
    if config.text_encoder and config.backbone == "text_top":  # the encoder's top layers, by name and hash
        config = replace(config, backbone_options={**text_backbone_options(config.text_encoder, config.encoder_layers),
                                                   **config.backbone_options})
    if source is not None:
        return algorithms()[config.algo].for_training(config, source)
    return algorithms()[config.algo].from_config(config, example_shape)


def non_finite_weights(learner: Learner) -> list[str]:
    """Names of the learner's weights (its parameters and the backbone's buffers, such as
    batch-norm statistics) that hold NaN or infinity. Other buffers may be NaN by design (a
    Siamese threshold not calibrated yet)."""
    named = list(learner.named_parameters())
    model = getattr(learner, "model", None)
    if isinstance(model, torch.nn.Module):
        named += [(f"model.{n}", b) for n, b in model.named_buffers()]
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _build(spec: dict) -> Learner:
    model = create_model(spec["model"]["name"], **spec["model"]["kwargs"])
    if spec["algo"] in POLICY_LEARNERS:
        return POLICY_LEARNERS[spec["algo"]](model, **spec.get("options", {}))
    if spec["algo"] in LEARNERS:  # options a checkpoint predates take their values of then
        return LEARNERS[spec["algo"]].from_saved_options(model, dict(spec.get("options", {})))
    return create_learner(spec["algo"], model, **spec.get("options", {}))  # the one-line error


def _malformed(what: str, error: BaseException) -> CheckpointError:
    text = (str(error).splitlines() or [type(error).__name__])[0][:160]
    return CheckpointError(f"the checkpoint's {what} is malformed ({text}); it was not written by this "
                           f"kshot, or has been edited")


def learner_from_checkpoint(ckpt: Checkpoint) -> Learner:
    """Rebuild the learner a checkpoint describes and load its weights.

    The description is untrusted: the learner is first built on the ``meta`` device (no memory),
    and its tensors' names and shapes must be those in the file before anything real is built;
    weights that are NaN or infinite (a run that diverged) are refused; so is a record of the
    input form (``extra``) that does not fit the model.
    """
    spec = ckpt.learner
    lists = [v for v in spec["model"]["kwargs"].values() if isinstance(v, (list, tuple))]
    if any(len(v) > len(ckpt.state_dict) for v in lists):  # one layer per entry, each with tensors
        raise CheckpointError(f"the checkpoint's backbone record asks for more layers than the "
                              f"{len(ckpt.state_dict)} tensors in the file")
    if _sized_by_arguments(spec["model"]["name"]):
        _check_against_tensors(spec, ckpt.state_dict)
    check_extra(ckpt.extra, ckpt.state_dict)
    try:
        learner = _build(spec)
        learner.load_state_dict(ckpt.state_dict)
    except (KshotError, KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not match the learner it describes "
                              f"({str(e).splitlines()[0][:160]})") from None
    bad = non_finite_weights(learner)
    if bad:
        raise CheckpointError(f"the checkpoint holds non-finite weights ({len(bad)} of "
                              f"{len(learner.state_dict())} tensors, e.g. {bad[0]}): its run diverged; "
                              f"retrain with a lower learning rate")
    return learner


def _sized_by_arguments(name: str) -> bool:
    """kshot's own backbones (``kshot.models``) are sized by their arguments alone, and so can be
    built on the ``meta`` device; an application's may read files (a pre-trained encoder)."""
    import kshot.models as models

    factory = getattr(models, name, None)
    return callable(factory) and getattr(factory, "__module__", None) == models.__name__


def _check_against_tensors(spec: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Build the described learner on the ``meta`` device (no memory) and compare its tensors'
    names and shapes with those in the file."""
    try:
        with torch.device("meta"):
            skeleton = _build(spec)
    except (KshotError, KeyError, RuntimeError, TypeError, ValueError, OverflowError) as e:
        raise _malformed("learner record", e) from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if missing or unexpected or wrong:
        if wrong:
            detail = f"{wrong[0]} is {found[wrong[0]]} in the file but {expected[wrong[0]]} in the record"
        else:
            detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise CheckpointError(f"the checkpoint does not match the learner it describes, so its tensors "
                              f"were not loaded ({spec['algo']}, {spec['model']['name']}: {detail})")


def _positive_ints(value, what: str, limit: int) -> list[int]:
    if (not isinstance(value, list) or not 1 <= len(value) <= 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in value)):
        raise CheckpointError(f"the checkpoint's {what} must be a list of 1 to 4 positive integers up to "
                              f"{limit}, not {str(value)[:60]}")
    return value


def check_extra(extra: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """The checkpoint's record of its inputs, checked before anything is built from it: the example
    shape, and the image format or table columns that must agree with it."""
    largest = max((max(t.shape, default=1) for t in state_dict.values()), default=1)
    shape = None
    if "example_shape" in extra:
        shape = _positive_ints(extra["example_shape"], "example_shape", max(MAX_IMAGE_SIZE, largest))
        if math.prod(shape) > 1 << 22:  # a 3 x 1024 x 1024 image, or 4M text features
            raise CheckpointError(f"the checkpoint's example_shape {shape} is larger than any input kshot reads")
    fmt = extra.get("image_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise CheckpointError("the checkpoint's image_format must be a mapping")
        channels, size = fmt.get("channels"), fmt.get("size")
        if channels not in (1, 3) or isinstance(channels, bool) or not isinstance(size, int) \
                or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise CheckpointError(f"the checkpoint's image_format must give 1 or 3 channels and a size of 1 "
                                  f"to {MAX_IMAGE_SIZE} pixels, not channels={channels!r}, size={size!r}")
        if not isinstance(fmt.get("invert", False), bool):
            raise CheckpointError("the checkpoint's image_format.invert must be true or false")
        if shape is not None and shape != [channels, size, size]:
            raise CheckpointError(f"the checkpoint's image_format ({channels} channels, {size} px) does not "
                                  f"match the example shape {shape} its model was trained on")
    table = extra.get("table_format")
    if table is not None:
        ok = (isinstance(table, dict) and isinstance(table.get("label_column"), str)
              and all(isinstance(table.get(k), list) for k in ("features", "mean", "std")))
        if ok:
            n = len(table["features"])
            ok = (all(isinstance(f, str) for f in table["features"])
                  and len(table["mean"]) == len(table["std"]) == n
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                          for v in table["mean"] + table["std"])
                  and all(v > 0 for v in table["std"]) and (shape is None or shape == [n]))
        if not ok:
            raise CheckpointError("the checkpoint's table_format must name its label column and give one "
                                  "finite mean and positive std per feature column, as many as the "
                                  "example shape says")


def config_of(ckpt: Checkpoint) -> TrainConfig:
    """The config a checkpoint was trained with, checked, and with no path of its own to write
    to: its data and cache directories are dropped (the user's, or the defaults, are used)."""
    try:
        config = config_from_dict(ckpt.config)
        config.validate()
    except KshotError as e:
        raise CheckpointError(f"the checkpoint's config is malformed ({e})") from None
    config.data_dir, config.cache_dir = "", ""
    return config


def load_learner(path: str | os.PathLike, device: str | torch.device = "cpu") -> Learner:
    """The trained learner saved at ``path`` (a file, or a run directory), in eval mode."""
    learner = learner_from_checkpoint(load_checkpoint(path))
    return learner.to(device).eval()
