"""MuJoCo locomotion tasks of Finn et al. 2017 (section 5.3), on Gymnasium's v5 environments.

Each is a Gymnasium MuJoCo environment whose reward depends on a task parameter set with
``set_task``; the dynamics and observations are Gymnasium's own. The rewards follow the
paper's code (cbfinn/maml_rl, after rllab):

* :class:`HalfCheetahVelocity`, ``{"velocity": v}``: ``-|x_velocity - v| - 0.05 |a|^2``, with
  ``v`` drawn uniformly in [0, 2];
* :class:`HalfCheetahDirection`, ``{"direction": +1 or -1}``: ``direction * x_velocity -
  0.05 |a|^2`` (run forward or backward);
* :class:`AntDirection`, ``{"direction": +1 or -1}``: ``direction * x_velocity + 0.05 -
  0.005 |a|^2 - contact cost``; the observation leaves out the contact forces (27 numbers).

The classes are built on first use (``kshot.rl.mujoco.HalfCheetahVelocity``), so importing
kshot does not load MuJoCo. Needs the ``rl`` extra (``pip install "kshot[rl]"``: gymnasium and mujoco from PyPI).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

from kshot.errors import ConfigError

#: The environments of this module, by class name.
NAMES = ("HalfCheetahVelocity", "HalfCheetahDirection", "AntDirection")


def require_mujoco(name: str) -> None:
    """A ConfigError saying what to install when Gymnasium's MuJoCo environments are missing."""
    try:
        import gymnasium.envs.mujoco.half_cheetah_v5  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{name} needs Gymnasium's MuJoCo environments ({type(e).__name__}: {e}); "
                          f'pip install "kshot[rl]"') from None


def _number(task: dict, key: str) -> float:
    try:
        value = float(task[key])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"this task is {{{key!r}: number}}, not {task!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"task {key} must be finite, not {value}")
    return value


def _direction(task: dict) -> float:
    value = _number(task, "direction")
    if value not in (-1.0, 1.0):
        raise ConfigError(f"a direction task is {{'direction': 1}} (forward) or -1 (backward), not {value}")
    return value


@functools.cache
def environment_classes() -> dict[str, type]:
    """The task environments, defined on Gymnasium's MuJoCo classes when first asked for."""
    require_mujoco("the MuJoCo tasks")
    from gymnasium.envs.mujoco.ant_v5 import AntEnv
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    import mujoco

    compiled: dict = {}

    class CompiledOnce:
        """Compile each model file once and copy it for every further environment: a meta-batch
        builds hundreds of environments, and compiling costs time (and MuJoCo's warnings) each."""

        def _initialize_simulation(self):
            key = (self.fullpath, self.width, self.height)
            if key not in compiled:
                # MuJoCo's compiler warnings (Gymnasium's models use attributes MuJoCo 4 deprecates)
                # would go to stdout and to a MUJOCO_LOG.TXT in the working directory: make them
                # Python warnings instead, for this compilation only.
                previous = mujoco.get_mju_user_warning()
                mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo: {message}", stacklevel=2))
                try:
                    compiled[key] = super()._initialize_simulation()[0]
                finally:
                    mujoco.set_mju_user_warning(previous)
            model = copy.deepcopy(compiled[key])
            return model, mujoco.MjData(model)

    class HalfCheetahVelocity(CompiledOnce, HalfCheetahEnv):
        """Half-cheetah rewarded for running at the task's target velocity."""

        def __init__(self, task: dict | None = None, **kwargs):
            super().__init__(ctrl_cost_weight=0.05, **kwargs)
            self.target_velocity = 0.0
            if task is not None:
                self.set_task(task)

        def set_task(self, task: dict) -> None:
            self.target_velocity = _number(task, "velocity")

        def get_task(self) -> dict:
            return {"velocity": self.target_velocity}

        def _get_rew(self, x_velocity: float, action):
            forward = -abs(x_velocity - self.target_velocity)
            ctrl_cost = self.control_cost(action)
            return forward - ctrl_cost, {"reward_forward": forward, "reward_ctrl": -ctrl_cost}

    class Directed:
        """The task of a direction family: 1 (forward) or -1 (backward), as ``set_task`` / ``get_task``."""

        direction = 1.0

        def set_task(self, task: dict) -> None:
            self.direction = _direction(task)

        def get_task(self) -> dict:
            return {"direction": self.direction}

    class HalfCheetahDirection(Directed, CompiledOnce, HalfCheetahEnv):
        """Half-cheetah rewarded for its velocity forward (direction 1) or backward (-1)."""

        def __init__(self, task: dict | None = None, **kwargs):
            super().__init__(ctrl_cost_weight=0.05, **kwargs)
            if task is not None:
                self.set_task(task)

        def _get_rew(self, x_velocity: float, action):
            forward = self.direction * x_velocity
            ctrl_cost = self.control_cost(action)
            return forward - ctrl_cost, {"reward_forward": forward, "reward_ctrl": -ctrl_cost}

    class AntDirection(Directed, CompiledOnce, AntEnv):
        """Ant rewarded for its velocity forward (direction 1) or backward (-1)."""

        def __init__(self, task: dict | None = None, **kwargs):
            kwargs = {"ctrl_cost_weight": 0.005, "contact_cost_weight": 5e-4, "healthy_reward": 0.05,
                      "include_cfrc_ext_in_observation": False, **kwargs}
            super().__init__(**kwargs)
            if task is not None:
                self.set_task(task)

        def _get_rew(self, x_velocity: float, action):
            return super()._get_rew(self.direction * x_velocity, action)

    classes = {"HalfCheetahVelocity": HalfCheetahVelocity, "HalfCheetahDirection": HalfCheetahDirection,
               "AntDirection": AntDirection}
    for cls in (CompiledOnce, Directed, *classes.values()):
        cls.__qualname__ = cls.__name__
    return classes


def make(name: str, task: dict | None = None, **kwargs):
    """A new environment of class ``name`` (one of :data:`NAMES`), set to ``task``."""
    return environment_classes()[name](task, **kwargs)


def __getattr__(name: str):
    if name in NAMES:
        return environment_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
