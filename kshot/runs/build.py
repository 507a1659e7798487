"""From a config (or a saved run) to its parts: device, datasets, task sources, learner.

``train``, ``evaluate`` and ``adapt`` all start here, and this module calls nothing above
itself, so the way from "a saved run" to "its test tasks" goes down the layers once::

    checkpoint -> config -> dataset -> task source -> fixed tasks
               -> learner spec -> backbone -> learner (weights loaded)
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

import torch

from kshot.config import TrainConfig
from kshot.data import load_dataset
from kshot.data.base import FewShotDataset
from kshot.data.multisource import MultiSourceDataset
from kshot.errors import CheckpointError, ConfigError
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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


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


def learner_from_checkpoint(ckpt: Checkpoint) -> Learner:
    """Rebuild the learner a checkpoint describes and load its weights."""
    spec = ckpt.learner
    try:
        model = create_model(spec["model"]["name"], **spec["model"]["kwargs"])
        if spec["algo"] in POLICY_LEARNERS:
            learner = POLICY_LEARNERS[spec["algo"]](model, **spec.get("options", {}))
        elif spec["algo"] in LEARNERS:  # options a checkpoint predates take their values of then
            learner = LEARNERS[spec["algo"]].from_saved_options(model, dict(spec.get("options", {})))
        else:
            learner = create_learner(spec["algo"], model, **spec.get("options", {}))  # the one-line error
        learner.load_state_dict(ckpt.state_dict)
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the checkpoint does not match the learner it describes "
                              f"({str(e).splitlines()[0][:160]})") from None
    return learner


def load_learner(path: str | os.PathLike, device: str | torch.device = "cpu") -> Learner:
    """The trained learner saved at ``path`` (a file, or a run directory), in eval mode."""
    learner = learner_from_checkpoint(load_checkpoint(path))
    return learner.to(device).eval()
