"""Task families of environments: a task is an environment drawn from a family.

A family is a :class:`~kshot.tasks.TaskSource` like any other in kshot: task ``(step, index)``
is a pure function of ``(seed, step, index)``: its parameter (a goal, a target velocity, a
direction) is drawn from ``numpy.random.default_rng([seed, step, index])`` with uniform doubles
only, and everything random in its rollouts (the policy's action noise, the environments'
reset seeds) is drawn from the same key. So meta-training resumes exactly, and the fixed
validation and test tasks (seeds of their own, :data:`kshot.tasks.families.SPLIT_SEEDS`) are the
same on every machine.

Built in: ``nav2d`` (NumPy only), and with the ``rl`` extra ``halfcheetah-vel``,
``halfcheetah-dir`` and ``ant-dir``. A user's own Gymnasium environment with a ``set_task``
method becomes a family with :class:`GymFamily` and :func:`register_env_family`::

    class Reacher(gymnasium.Env):             # any Gymnasium environment
        def set_task(self, task): self.target = np.asarray(task["target"])
        ...
    register_env_family("my-reacher", lambda seed=0, meta_batch_size=1, horizon=0: GymFamily(
        "my-reacher", Reacher, lambda rng: {"target": list(rng.random(2))},
        horizon=horizon or 50, seed=seed, meta_batch_size=meta_batch_size))
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kshot.errors import ConfigError
from kshot.rl.envs import GymVector, Navigation2D, NavigationVector, VectorEnv, goal_of
from kshot.rl import mujoco
from kshot.tasks import FixedTasks, TaskSource
from kshot.tasks.families import SPLIT_SEEDS


@dataclass(frozen=True, eq=False)
class EnvTask:
    """One task: an environment of ``family`` set to ``params``.

    Attributes:
        family: the family it was drawn from (it builds the environments).
        params: the task parameter, e.g. ``{"goal": [0.3, -0.1]}``.
        key: ``(seed, step, index)``; the seed of every random draw of this task's rollouts.
    """

    family: "EnvFamily"
    params: dict
    key: tuple[int, ...]

    def to(self, device=None, non_blocking: bool = False) -> "EnvTask":
        """Tasks travel to a device as data do; an environment stays where it is."""
        return self

    def rng(self, *more: int) -> np.random.Generator:
        """A generator for one purpose of this task (``more`` names it: phase, step, ...)."""
        return np.random.default_rng([*self.key, *more])


class EnvFamily(TaskSource):
    """A distribution over task environments that share observation and action spaces.

    Subclasses set ``name``, ``observation_dim``, ``action_dim``, ``default_horizon`` and
    implement :meth:`draw_task` and :meth:`make_env` (and may give a faster :meth:`vector_env`).

    Args:
        seed: the task stream's seed.
        meta_batch_size: tasks per meta-batch.
        horizon: steps per episode (0: the family's default).
    """

    name: str
    observation_dim: int
    action_dim: int
    default_horizon: int
    #: Not images or tables: checkpoints record the environment instead (checkpoint_extra).
    image_format = None

    def __init__(self, seed: int = 0, meta_batch_size: int = 1, horizon: int = 0):
        if int(horizon) != horizon or horizon < 0:
            raise ConfigError(f"horizon must be a non-negative integer, not {horizon!r}")
        if int(meta_batch_size) != meta_batch_size or meta_batch_size < 1:
            raise ConfigError(f"meta_batch_size must be an integer >= 1, not {meta_batch_size!r}")
        self.seed, self.meta_batch_size = int(seed), int(meta_batch_size)
        self.horizon = int(horizon) or self.default_horizon
        self._vectors: dict[int, VectorEnv] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, horizon={self.horizon})"

    # ------------------------------------------------------------------ tasks
    def draw_task(self, rng: np.random.Generator) -> dict:
        """A task parameter drawn with ``rng`` (uniform doubles only: ``rng.random``)."""
        raise NotImplementedError

    def check_task(self, task: Any) -> dict:
        """``task`` as this family's parameter (a user's ``--task``), or a ConfigError."""
        if not isinstance(task, dict):
            raise ConfigError(f"a {self.name} task is a mapping like {self.draw_task(np.random.default_rng(0))}, "
                              f"not {task!r}")
        self.make_env(task)  # set_task checks it
        return dict(task)

    def task(self, step: int, index: int = 0) -> EnvTask:
        key = (self.seed, int(step), int(index))
        return EnvTask(self, self.draw_task(np.random.default_rng(list(key))), key)

    def user_task(self, params: dict, seed: int = 0) -> EnvTask:
        """A task a user names (``kshot adapt --task``), its rollouts drawn from ``seed``."""
        return EnvTask(self, self.check_task(params), (int(seed), 0, 0))

    def fixed_tasks(self, n_tasks: int) -> FixedTasks:
        """``n_tasks`` tasks of this stream: task i is ``(i, 0)``."""
        return FixedTasks(self, n_tasks)

    def for_split(self, split: str, seed: int | None = None) -> "EnvFamily":
        """The same family, with the fixed seed of an evaluation split (or ``seed``)."""
        if seed is None:
            if split not in SPLIT_SEEDS:
                raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
            seed = SPLIT_SEEDS[split]
        other = copy.copy(self)
        other.seed = int(seed)
        return other  # shares the vectorised environments: they hold no task state between rollouts

    # ------------------------------------------------------------------ environments
    def make_env(self, task: dict | None = None):
        """One Gymnasium environment of this family (set to ``task`` when given)."""
        raise NotImplementedError

    def vector_env(self, n: int) -> VectorEnv:
        """``n`` environments that step together (built once per size, then reused)."""
        if n not in self._vectors:
            self._vectors[n] = GymVector(self.make_env, n, self.horizon)
        return self._vectors[n]

    # ------------------------------------------------------------------ what the trainer reads
    @property
    def dataset(self) -> "EnvFamily":
        return self

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.observation_dim,)

    @property
    def description(self) -> str:
        return f"{self.name}, {self.horizon}-step episodes"

    def checkpoint_extra(self) -> dict:
        return {"env": self.name, "horizon": self.horizon, "action_dim": self.action_dim}


class Navigation2DTasks(EnvFamily):
    """2D navigation: goals uniform in ``[-0.5, 0.5]^2``, 100-step episodes (Finn et al. 2017)."""

    name = "nav2d"
    observation_dim = 2
    action_dim = 2
    default_horizon = 100
    goal_low, goal_high = -0.5, 0.5
    #: Tasks evaluated together: its vectorised environment is array operations, so many.
    eval_batch = 200

    def draw_task(self, rng: np.random.Generator) -> dict:
        return {"goal": (self.goal_low + rng.random(2) * (self.goal_high - self.goal_low)).tolist()}

    def check_task(self, task: Any) -> dict:
        if not isinstance(task, dict):
            raise ConfigError(f"a nav2d task is {{'goal': [x, y]}}, not {task!r}")
        return {"goal": goal_of(task).tolist()}

    def make_env(self, task: dict | None = None) -> Navigation2D:
        return Navigation2D(task, horizon=self.horizon)

    def vector_env(self, n: int) -> VectorEnv:
        if n not in self._vectors:
            self._vectors[n] = NavigationVector(n, horizon=self.horizon)
        return self._vectors[n]

    def plot_adaptation(self, learner, out, n_tasks: int = 4):
        """Trajectories before and after adaptation for a few test goals (PNG)."""
        from kshot.rl.plots import plot_navigation

        return plot_navigation(learner, self.for_split("test").fixed_tasks(n_tasks), out)


class MujocoFamily(EnvFamily):
    """Tasks of one of kshot.rl.mujoco's environments (``env``), which need the ``rl`` extra:
    checked when the family is made, so that a missing MuJoCo is one line, not a late ImportError."""

    env = ""
    default_horizon = 200

    def __init__(self, seed: int = 0, meta_batch_size: int = 1, horizon: int = 0):
        mujoco.require_mujoco(self.name)
        super().__init__(seed, meta_batch_size, horizon)

    def make_env(self, task: dict | None = None):
        return mujoco.make(self.env, task)


class HalfCheetahVelocityTasks(MujocoFamily):
    """Half-cheetah target velocity, uniform in [0, 2]; 200-step episodes (Finn et al. 2017)."""

    name = "halfcheetah-vel"
    env = "HalfCheetahVelocity"
    observation_dim = 17
    action_dim = 6
    velocity_low, velocity_high = 0.0, 2.0

    def draw_task(self, rng: np.random.Generator) -> dict:
        return {"velocity": float(self.velocity_low + rng.random() * (self.velocity_high - self.velocity_low))}


class DirectionFamily(MujocoFamily):
    """Forward (1) or backward (-1), each with probability 1/2."""

    def draw_task(self, rng: np.random.Generator) -> dict:
        return {"direction": 1 if rng.random() < 0.5 else -1}


class HalfCheetahDirectionTasks(DirectionFamily):
    """Half-cheetah forward (1) or backward (-1), each with probability 1/2; 200-step episodes."""

    name = "halfcheetah-dir"
    env = "HalfCheetahDirection"
    observation_dim = 17
    action_dim = 6


class AntDirectionTasks(DirectionFamily):
    """Ant forward (1) or backward (-1); 200-step episodes."""

    name = "ant-dir"
    env = "AntDirection"
    observation_dim = 27
    action_dim = 8


class GymFamily(EnvFamily):
    """A user's own Gymnasium environment with a task parameter, as a family.

    Args:
        name: the family's name (``--dataset`` once registered).
        env_factory: ``env_factory()`` -> a Gymnasium environment with ``set_task(task)``.
        draw_task: ``draw_task(rng)`` -> a task (a dict of numbers or lists of numbers), drawn
            with ``rng.random`` so that the stream stays a function of the seed.
        horizon: steps per episode.
        seed, meta_batch_size: as for every family.
    """

    def __init__(self, name: str, env_factory: Callable[[], Any], draw_task: Callable[[np.random.Generator], dict],
                 horizon: int, seed: int = 0, meta_batch_size: int = 1):
        self.name, self.default_horizon = name, int(horizon)
        self._factory, self._draw = env_factory, draw_task
        probe = env_factory()
        if not hasattr(probe.unwrapped, "set_task"):
            raise ConfigError(f"{type(probe.unwrapped).__name__} has no set_task(task) method, so kshot "
                              f"cannot give it tasks; add one")
        self.observation_dim = int(np.prod(probe.observation_space.shape))
        self.action_dim = int(np.prod(probe.action_space.shape))
        probe.close()
        super().__init__(seed, meta_batch_size, horizon)

    def draw_task(self, rng: np.random.Generator) -> dict:
        return dict(self._draw(rng))

    def make_env(self, task: dict | None = None):
        env = self._factory()
        if task is not None:
            env.unwrapped.set_task(task)
        return env


#: Families by name: ``factory(seed=, meta_batch_size=, horizon=)`` -> an EnvFamily.
ENV_FAMILIES: dict[str, Callable[..., EnvFamily]] = {
    "nav2d": Navigation2DTasks,
    "halfcheetah-vel": HalfCheetahVelocityTasks,
    "halfcheetah-dir": HalfCheetahDirectionTasks,
    "ant-dir": AntDirectionTasks,
}


def register_env_family(name: str, factory: Callable[..., EnvFamily]) -> None:
    """Make ``--dataset name`` a family of environments (see the module docstring's example)."""
    ENV_FAMILIES[name] = factory


def is_env_family(name: str) -> bool:
    return name in ENV_FAMILIES


def env_family(name: str, split: str = "train", seed: int | None = None, meta_batch_size: int = 1,
               horizon: int = 0) -> EnvFamily:
    """Family ``name``: the training stream from ``seed``, or an evaluation split's fixed one."""
    if name not in ENV_FAMILIES:
        raise ConfigError(f"unknown environment family {name!r}; choose one of {', '.join(sorted(ENV_FAMILIES))}")
    family = ENV_FAMILIES[name](seed=0 if seed is None else seed, meta_batch_size=meta_batch_size, horizon=horizon)
    if split != "train" or seed is None:
        family = family.for_split(split, seed)
    return family


def family_tasks(name: str, split: str, n_tasks: int, seed: int | None = None, horizon: int = 0) -> FixedTasks:
    """Fixed evaluation tasks of family ``name``: the same tasks on every machine, every time."""
    return env_family(name, split, seed=seed, horizon=horizon).fixed_tasks(n_tasks)


__all__ = ["ENV_FAMILIES", "AntDirectionTasks", "EnvFamily", "EnvTask", "GymFamily", "HalfCheetahDirectionTasks",
           "HalfCheetahVelocityTasks", "Navigation2DTasks", "env_family", "family_tasks",
           "is_env_family", "register_env_family"]
