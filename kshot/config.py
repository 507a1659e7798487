"""Training settings: one dataclass, named presets for published settings, files and overrides.

Precedence, lowest first: the dataclass defaults, a ``--preset``, a ``--config`` file (TOML, YAML
or JSON), then single settings given on the command line. The resolved config is saved beside
every checkpoint and results file, so a run can always be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kshot.errors import ConfigError


#: Fewer test tasks give confidence intervals too wide to compare methods by.
MIN_TEST_TASKS = 600


@dataclass
class TrainConfig:
    """Every knob of a meta-training run. Field comments are the command line's help texts."""

    # -- what is learned, from what
    algo: str = "protonet"  # meta-learning algorithm
    dataset: str = "omniglot"  # dataset name
    protocol: str = ""  # dataset split protocol ("": the dataset's default; omniglot: vinyals | lake)
    image_size: int = 28  # side of the square input images
    data_path: str = ""  # your own data: a folder of class sub-folders (--dataset folder) or a CSV/Parquet table (--dataset table)
    split_file: str = ""  # your own data's meta-train/val/test classes, JSON or CSV; drawn and written there when missing (default: <run-dir>/classes.json)
    train_split: str = "train"  # split to meta-train on: train, or trainval (train + val, for final runs)
    backbone: str = "conv4"  # backbone network
    backbone_options: dict = field(default_factory=dict)  # extra backbone arguments, e.g. {"hidden": 32}
    text_encoder: str = ""  # text datasets: a pre-trained Hugging Face encoder (folder or hub name) instead of hashed n-grams
    encoder_layers: int = 0  # text_encoder: its top layers that are trained or adapted (0: all frozen, embeddings cached)
    # -- tasks
    ways: int = 5  # classes per training task (N)
    shots: int = 1  # support examples per class (K)
    queries: int = 15  # query examples per class in training tasks (Q)
    test_ways: int = 0  # classes per validation/test task (0: same as ways)
    test_shots: int = 0  # support examples per class at validation/test (0: same as shots)
    test_queries: int = 15  # query examples per class at validation/test
    test_within_groups: bool = False  # validation/test tasks take all classes from one group (omniglot: one alphabet)
    within_groups: bool = False  # training tasks (siamese: different-class pairs) take their classes from one group, as test_within_groups tests
    meta_batch_size: int = 1  # tasks per outer step
    episodes: str = "fixed"  # training tasks: fixed (ways x shots) | variable (Meta-Dataset: 5-50 ways, varying shots)
    source_weights: str = "uniform"  # multi-source datasets (a+b): each task's source uniform | classes (by class count)
    # -- outer loop
    steps: int = 10_000  # outer steps (meta-batches) to train for
    optimizer: str = "adam"  # outer optimiser: adam | adamw | sgd
    lr: float = 1e-3  # outer learning rate
    weight_decay: float = 0.0  # outer weight decay
    momentum: float = 0.9  # momentum of the sgd outer optimiser
    lr_schedule: str = "step"  # constant | step | cosine | linear (to 0 at the last step)
    lr_decay_every: int = 2000  # step schedule: multiply the lr by lr_decay_factor this often
    lr_decay_factor: float = 0.5  # step schedule factor
    grad_clip: float = 0.0  # clip the meta-gradient norm to this (0: off)
    # -- learner options (each learner reads the ones it uses)
    distance: str = "euclidean"  # protonet: euclidean | cosine
    temperature: float = 10.0  # protonet: scale of cosine similarities
    similarity: str = "koch"  # siamese: koch (weighted L1 + sigmoid) | contrastive | triplet
    margin: float = 1.0  # siamese: margin of the contrastive and triplet losses
    pairs: int = 128  # siamese: pairs per training batch, half same-class, half different
    augment: str = "none"  # siamese: none | affine (Koch et al.'s random distortions of training pairs)
    inner_steps: int = 1  # maml family, reptile: gradient steps on the support set per task
    inner_lr: float = 0.4  # maml family, reptile: inner learning rate (metasgd: its initial value)
    test_inner_steps: int = 0  # maml family, reptile: inner steps at validation/test (0: same as inner_steps)
    batch_tasks: str = "auto"  # maml family, reptile: loop | vmap | batched (MLPs) | auto (see docs/MAML.md)
    inner_optimizer: str = "sgd"  # maml family, reptile: sgd | adam (beta1 0, beta2 0.999: Nichol et al.'s Reptile; moments: inner_moments)
    inner_batch_size: int = 0  # maml family, reptile: examples per inner step, drawn without replacement from the task's (0: all of them)
    inner_moments: str = "reset"  # reptile with inner_optimizer adam: reset (fresh on each task) | carried (from task to task, into the test: Nichol et al.'s code)
    body_lr: float = 0.0  # finetune: learning rate of the encoder's top layers on the support set (0: the head only)
    head_l2: float = 0.0  # finetune: L2 penalty on the head's weights
    metasgd_lr_high: float = 0.0  # metasgd: draw initial inner lrs uniformly in [inner_lr, this] (0: all inner_lr)
    transductive: bool = False  # maml family, reptile: normalise each query batch by its own batch-norm statistics, in training and at validation/test (Finn et al.'s protocol); otherwise by the support set's, so that a query's prediction depends on nothing else
    head_init: str = "learned"  # maml family, reptile: learned | prototypes (every task's head starts from its support set's class prototypes: Proto-MAML); tasks of other ways than the head always start from prototypes
    multi_step_loss: int = 0  # maml family (MAML++ MSL): for the first this many outer steps, the query losses after every inner step, weights annealed to the last step (0: off)
    per_step_lr: bool = False  # maml family (MAML++ LSLR): a learned inner learning rate per layer and inner step
    per_step_bn: bool = False  # maml family (MAML++ BNWB): batch-norm weights and biases per inner step
    per_step_bn_stats: bool = False  # maml family (MAML++ BNRS): running batch-norm statistics per inner step, which non-transductive predictions normalise by
    second_order_after: int = 0  # maml family (MAML++ DA): first-order meta-gradients for the first this many outer steps, then second order
    batch_size: int = 16  # baseline, baseline++, rfs: labelled examples per pre-training batch
    head_epochs: int = 100  # baseline, baseline++: epochs of SGD over a task's support set fitting its new head (Chen et al.: 100)
    head_lr: float = 0.01  # baseline, baseline++: learning rate of that SGD (Chen et al.: 0.01)
    inner_params: str = ""  # maml family, reptile: the parameters that adapt, by name or prefix, comma-separated ("": all; anil: the head)
    # -- reinforcement learning (kshot.rl; --dataset nav2d | halfcheetah-vel | halfcheetah-dir | ant-dir)
    episodes_per_task: int = 20  # rl: episodes per task for each inner step and for the outer objective (K)
    horizon: int = 0  # rl: steps per episode (0: the environment family's own; nav2d 100, half-cheetah 200)
    discount: float = 0.99  # rl: discount of future rewards
    gae_lambda: float = 1.0  # rl: GAE lambda of the advantages (1: return minus the fitted baseline, as in the paper)
    outer_step: str = "trpo"  # rl: trpo (conjugate gradient, KL line search) | ppo (clipped surrogate with the outer optimiser)
    max_kl: float = 0.01  # rl, trpo: trust region, the mean KL of the adapted policies
    clip_ratio: float = 0.2  # rl, ppo: clipping of the probability ratio
    outer_epochs: int = 5  # rl, ppo: optimiser steps per meta-batch
    # -- validation, checkpoints, logging
    val_every: int = 500  # validate on fixed tasks every this many steps (0: never)
    val_tasks: int = 200  # fixed validation tasks
    checkpoint_every: int = 500  # write last.safetensors every this many steps
    snapshot_every: int = 0  # also keep the weights of every this many steps in snapshots/ (learning curves; 0: off)
    log_every: int = 50  # average training metrics over this many steps per log record
    test_tasks: int = 1000  # fixed test tasks evaluated with the best checkpoint at the end (0: skip)
    seed: int = 0  # seed of the model init and of the task stream
    num_workers: int = 0  # DataLoader worker processes sampling tasks ahead (0: sample in the training process)
    threads: int = 0  # torch intra-op threads (0: torch's default)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dist_timeout: float = 600.0  # distributed runs: seconds a process waits for the others before failing
    # -- where things are
    data_dir: str = ""  # archives (default: $KSHOT_DATA_DIR, else the user cache)
    cache_dir: str = ""  # writable caches (default: $KSHOT_CACHE_DIR, else the user cache)
    preset: str = ""  # name of the preset this config started from
    extra: dict = field(default_factory=dict)  # free-form settings for user extensions

    @property
    def eval_ways(self) -> int:
        return self.test_ways or self.ways

    @property
    def eval_shots(self) -> int:
        return self.test_shots or self.shots

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        for f in fields(self):  # types first, strictly (a config built in Python skips the parsing)
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name)))
        collide = sorted(set(self.extra) & {f.name for f in fields(self)})
        if collide:
            raise ConfigError(f"extra.{collide[0]} repeats the setting {collide[0]}; set it directly "
                              f"(--{collide[0].replace('_', '-')}), not in extra")
        positive = ("ways", "shots", "meta_batch_size", "steps", "image_size", "test_queries")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("queries", "val_every", "val_tasks", "checkpoint_every", "snapshot_every", "test_tasks",
                     "num_workers", "threads", "test_ways", "test_shots", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, not {self.lr}")
        if self.encoder_layers < 0 or self.body_lr < 0 or self.head_l2 < 0:
            raise ConfigError("encoder_layers, body_lr and head_l2 must not be negative")
        if self.encoder_layers and not self.text_encoder:
            raise ConfigError("encoder_layers needs a text_encoder (a model folder or hub name)")
        if self.inner_steps < 1 or self.test_inner_steps < 0:
            raise ConfigError(f"inner_steps must be at least 1 and test_inner_steps at least 0, not "
                              f"{self.inner_steps} and {self.test_inner_steps}")
        if self.inner_lr <= 0:
            raise ConfigError(f"inner_lr must be positive, not {self.inner_lr}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, not {self.seed}")
        if self.inner_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown inner_optimizer {self.inner_optimizer!r}; choose sgd or adam")
        if self.inner_moments not in ("reset", "carried"):
            raise ConfigError(f"unknown inner_moments {self.inner_moments!r}; choose reset or carried")
        if self.inner_batch_size < 0:
            raise ConfigError(f"inner_batch_size must not be negative (0: the whole support set), "
                              f"not {self.inner_batch_size}")
        if self.batch_tasks not in ("auto", "loop", "vmap", "batched"):
            raise ConfigError(f"unknown batch_tasks {self.batch_tasks!r}; choose auto, loop, vmap or batched")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose adam, adamw or sgd")
        if self.lr_schedule not in ("constant", "step", "cosine", "linear"):
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose constant, step, cosine or linear")
        if self.episodes not in ("fixed", "variable"):
            raise ConfigError(f"unknown episodes {self.episodes!r}; choose fixed or variable")
        if self.source_weights not in ("uniform", "classes"):
            raise ConfigError(f"unknown source_weights {self.source_weights!r}; choose uniform or classes")
        if 0 < self.test_tasks < MIN_TEST_TASKS:
            raise ConfigError(f"test_tasks={self.test_tasks}: a reported accuracy needs at least "
                              f"{MIN_TEST_TASKS} test tasks (or 0 to skip the final test)")
        if self.train_split not in ("train", "trainval"):
            raise ConfigError(f"train_split must be train or trainval, not {self.train_split!r}")
        if self.dist_timeout <= 0:
            raise ConfigError(f"dist_timeout must be positive, not {self.dist_timeout}")
        if self.log_every < 1:
            raise ConfigError("log_every must be at least 1")
        if self.episodes_per_task < 1 or self.horizon < 0 or self.outer_epochs < 1:
            raise ConfigError(f"episodes_per_task and outer_epochs must be at least 1 and horizon at least 0, not "
                              f"{self.episodes_per_task}, {self.outer_epochs} and {self.horizon}")
        if not 0 < self.discount <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"discount must be in (0, 1] and gae_lambda in [0, 1], not {self.discount} "
                              f"and {self.gae_lambda}")
        if self.outer_step not in ("trpo", "ppo"):
            raise ConfigError(f"unknown outer_step {self.outer_step!r}; choose trpo or ppo")
        if self.max_kl <= 0 or self.clip_ratio <= 0:
            raise ConfigError(f"max_kl and clip_ratio must be positive, not {self.max_kl} and {self.clip_ratio}")
        return self


# name -> (description, overrides). Each names the paper table cell it reproduces.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def _protonet_omniglot(test_ways: int, shots: int) -> dict[str, Any]:
    # Snell et al. 2017, section 3.1: 60-way training episodes, 5 queries per class, Adam 1e-3
    # halved every 2,000 episodes; test on 5- or 20-way tasks with the training shot count.
    return dict(algo="protonet", dataset="omniglot", protocol="vinyals", image_size=28,
                backbone="conv4", ways=60, shots=shots, queries=5, test_ways=test_ways,
                test_shots=shots, test_queries=15, meta_batch_size=1, optimizer="adam", lr=1e-3,
                lr_schedule="step", lr_decay_every=2000, lr_decay_factor=0.5, steps=20_000,
                val_every=1000, val_tasks=300, checkpoint_every=500)


for _ways, _paper in ((5, {1: 98.8, 5: 99.7}), (20, {1: 96.0, 5: 98.9})):
    for _shots in (1, 5):
        PRESETS[f"protonet-omniglot-{_ways}way-{_shots}shot"] = (
            f"Prototypical Networks, Omniglot {_ways}-way {_shots}-shot (Snell et al. 2017: "
            f"{_paper[_shots]}%), trained 60-way {_shots}-shot",
            _protonet_omniglot(_ways, _shots))

PRESETS["quick"] = ("A one-minute smoke run: Omniglot 5-way 1-shot ProtoNet, 300 steps",
                    dict(algo="protonet", dataset="omniglot", ways=5, shots=1, queries=5, steps=300,
                         val_every=100, val_tasks=100, checkpoint_every=100, test_tasks=600,
                         lr_schedule="constant"))


def _protonet_text(dataset: str, shots: int, episodes: str = "fixed") -> dict[str, Any]:
    # kshot's own setting, no published figure (docs/CROSS_DOMAIN.md): cosine prototypes over
    # hashed n-gram features re-weighted by learned term weights; 5-way training tasks (or
    # Meta-Dataset episodes), tested 5-way with the preset's shots. Validation accuracy peaks
    # within the first ~100 steps and then slowly declines, hence frequent validation.
    return dict(algo="protonet", dataset=dataset, backbone="feature_weights", distance="cosine",
                temperature=10.0, ways=5, shots=shots, queries=15, test_ways=5, test_shots=shots,
                test_queries=15, episodes=episodes, meta_batch_size=1, optimizer="adam", lr=1e-2,
                lr_schedule="constant", steps=500, val_every=50, val_tasks=300,
                checkpoint_every=50, test_tasks=1000)


for _data in ("clinc150", "banking77"):
    for _shots in (1, 5):
        PRESETS[f"protonet-{_data}-5way-{_shots}shot"] = (
            f"Prototypical Networks on {_data} intents, 5-way {_shots}-shot, learned term weights over "
            f"hashed n-grams (kshot's own setting; docs/CROSS_DOMAIN.md)",
            _protonet_text(_data, _shots))
PRESETS["protonet-text-metadataset"] = (
    "Prototypical Networks on clinc150+banking77 with Meta-Dataset episodes (variable ways and "
    "shots, Triantafillou et al. 2020), tested 5-way 5-shot (kshot's own setting)",
    _protonet_text("clinc150+banking77", 5, episodes="variable"))


def register_preset(name: str, description: str, overrides: dict[str, Any]) -> None:
    """Add a named preset (learner modules register the settings of their papers)."""
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"preset {name!r} sets unknown fields {sorted(unknown)}")
    PRESETS[name] = (description, dict(overrides))


def preset(name: str) -> dict[str, Any]:
    if not isinstance(name, str):
        raise ConfigError(f"preset must be the name of a preset, not {name!r}")
    if name not in PRESETS:
        close = [p for p in PRESETS if name.split("-")[0] in p][:4] or sorted(PRESETS)[:4]
        raise ConfigError(f"unknown preset {name!r}; `kshot presets` lists them (e.g. {', '.join(close)})")
    return dict(PRESETS[name][1], preset=name)


#: Config files are a few hundred bytes; a larger one is not a config file.
MAX_CONFIG_BYTES = 1 << 20
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
#: Integers a setting may hold (a seed beyond 64 bits cannot seed anything).
INT_LIMIT = 2 ** 63


def _yaml(text: str, path: Path):
    """YAML with no aliases: ``*name`` repeats a node, and nested repeats make a few hundred
    bytes expand to gigabytes (an "alias bomb"); a flat mapping of settings never needs them."""
    import yaml

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{path} uses a YAML alias (*{event.anchor}, line {event.start_mark.line + 1}); "
                              f"kshot reads settings without aliases: write the value out")
    return yaml.safe_load(text)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a TOML, YAML or JSON file (a flat mapping of TrainConfig fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES // 1024} KiB; a config is a short "
                          f"mapping of settings")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _yaml(text, path)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"cannot parse {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except Exception as e:  # yaml.YAMLError, without importing yaml up front
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        value = int(value)
    elif isinstance(value, str):
        if not value.strip().lstrip("+-").isdigit():
            raise ValueError
        value = int(value)
    if not isinstance(value, int) or not -INT_LIMIT < value < INT_LIMIT:
        raise ValueError
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _coerce(name: str, value: Any) -> Any:
    """Check one setting against its field's type, strictly: a bool is not an integer, an
    unknown word is not a boolean, NaN is not a number; files may give ints for floats."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    if name not in kinds:
        raise ConfigError(f"unknown setting {name!r}; `kshot train --help` lists them")
    kind = kinds[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
                return BOOL_WORDS[value.strip().lower()]
            raise ValueError
        if kind == "int":
            return _integer(value)
        if kind == "float":
            return _number(value)
        if kind == "str":
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind == "dict":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError, OverflowError, RecursionError):
        wanted = {"bool": "true or false", "int": "a whole number below 2**63", "float": "a finite number",
                  "str": "text", "dict": "a mapping, a JSON object"}.get(kind, kind)
        raise ConfigError(f"setting {name} must be of type {kind} ({wanted}), not {str(value)[:60]!r}"
                          f"{' (' + type(value).__name__ + ')' if not isinstance(value, str) else ''}") from None
    return value


def resolve_config(preset_name: str | None = None, file: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then preset, then file, then overrides; validated."""
    values: dict[str, Any] = {}
    if file:
        from_file = read_config_file(file)
        preset_name = preset_name or from_file.pop("preset", None)
        from_file.pop("preset", None)
    else:
        from_file = {}
    if preset_name:
        values.update(preset(preset_name))
    values.update(from_file)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config, ignoring fields this version does not know."""
    if not isinstance(data, dict):
        raise ConfigError(f"a saved config must be a mapping of settings, not {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: _coerce(k, v) for k, v in data.items() if k in known})
