"""Environments with the Gymnasium API, and their vectorised forms for batched rollouts.

* :class:`Navigation2D`: the 2D navigation task of Finn, Abbeel and Levine (ICML 2017, section
  5.3), as in their code (``PointEnvRandGoal``): a point starts at the origin, moves by its action
  (clipped to [-0.1, 0.1] per coordinate) and is rewarded minus its distance to the task's goal;
  an episode ends after 100 steps, or earlier within 0.01 of the goal. NumPy only.
* :class:`NavigationVector`: ``n`` of them stepping together as array operations.
* :class:`GymVector`: ``n`` copies of any Gymnasium environment with a task parameter, stepped
  one after another (MuJoCo); the policy still sees all of them at once.

Every environment here is a ``gymnasium.Env`` when Gymnasium is installed (so
``gymnasium.utils.env_checker.check_env`` accepts it), and a small stand-in with the same
methods when it is not: kshot's core install does not need Gymnasium for 2D navigation.

A task-parameterised environment has ``set_task(task)``, where ``task`` is a dict of numbers or
lists of numbers (``{"goal": [0.3, -0.1]}``), kept until the next ``set_task``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from kshot.errors import ConfigError

try:
    import gymnasium
    from gymnasium import spaces

    EnvBase: type = gymnasium.Env
    Box: type = spaces.Box
except ImportError:  # the core install: a stand-in with the methods kshot uses
    gymnasium = None

    class Box:  # type: ignore[no-redef]
        """A box of float vectors (the subset of ``gymnasium.spaces.Box`` kshot needs)."""

        def __init__(self, low, high, shape=None, dtype=np.float32, seed=None):
            self.dtype = np.dtype(dtype)
            self.shape = tuple(shape) if shape is not None else np.shape(low)
            self.low = np.broadcast_to(np.asarray(low, self.dtype), self.shape).copy()
            self.high = np.broadcast_to(np.asarray(high, self.dtype), self.shape).copy()
            self.np_random = np.random.default_rng(seed)

        def seed(self, seed=None):
            self.np_random = np.random.default_rng(seed)

        def sample(self):
            return (self.low + self.np_random.random(self.shape) * (self.high - self.low)).astype(self.dtype)

        def contains(self, x) -> bool:
            x = np.asarray(x)
            return x.shape == self.shape and bool(np.all(x >= self.low) and np.all(x <= self.high))

    class EnvBase:  # type: ignore[no-redef]
        """The part of ``gymnasium.Env`` kshot's environments use."""

        metadata: dict[str, Any] = {"render_modes": []}
        render_mode = None
        spec = None
        _np_random: np.random.Generator | None = None

        @property
        def np_random(self) -> np.random.Generator:
            if self._np_random is None:
                self._np_random = np.random.default_rng()
            return self._np_random

        @property
        def unwrapped(self):
            return self

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            if seed is not None:
                self._np_random = np.random.default_rng(seed)

        def close(self) -> None:
            pass


def gymnasium_available() -> bool:
    return gymnasium is not None


def goal_of(task: dict) -> np.ndarray:
    """The goal of a 2D navigation task, checked."""
    try:
        goal = np.asarray(task["goal"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"a 2D navigation task is {{'goal': [x, y]}}, not {task!r}") from None
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ConfigError(f"a 2D navigation goal is two finite numbers, not {task.get('goal')!r}")
    return goal


class Navigation2D(EnvBase):
    """A point moving to a goal in the plane (Finn et al. 2017, section 5.3).

    Observation: the position ``[2]``; action: the move ``[2]``, clipped to ``[-max_step,
    max_step]``; reward: minus the distance to the goal after the move; ``terminated`` within
    ``tolerance`` of the goal, ``truncated`` after ``horizon`` steps.

    Args:
        task: ``{"goal": [x, y]}`` (default: the origin until :meth:`set_task`).
        horizon: steps per episode (the paper: 100).
    """

    metadata = {"render_modes": []}

    def __init__(self, task: dict | None = None, horizon: int = 100, max_step: float = 0.1,
                 tolerance: float = 0.01):
        self.horizon, self.max_step, self.tolerance = int(horizon), float(max_step), float(tolerance)
        reach = self.max_step * self.horizon  # no position is farther than this from the start
        self.observation_space = Box(-reach, reach, shape=(2,), dtype=np.float32)
        self.action_space = Box(-self.max_step, self.max_step, shape=(2,), dtype=np.float32)
        self.goal = np.zeros(2)
        self.position = np.zeros(2)
        self.t = 0
        if task is not None:
            self.set_task(task)

    def set_task(self, task: dict) -> None:
        self.goal = goal_of(task)

    def get_task(self) -> dict:
        return {"goal": self.goal.tolist()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = np.zeros(2)
        self.t = 0
        return self.position.astype(np.float32), {}

    def step(self, action):
        move = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -self.max_step, self.max_step)
        self.position = self.position + move
        self.t += 1
        distance = float(np.hypot(*(self.position - self.goal)))
        terminated = bool(distance < self.tolerance)
        truncated = self.t >= self.horizon
        return self.position.astype(np.float32), -distance, terminated, truncated, {"distance": distance}


class VectorEnv:
    """``n`` task environments stepping together: what a batched rollout needs.

    ``reset(seeds)`` -> observations ``[n, obs_dim]``; ``step(actions [n, act_dim])`` ->
    observations, rewards ``[n]``, done ``[n]`` (terminated, or truncated by the horizon). An
    environment that is done is stepped no further until the next reset: its rewards are 0.
    """

    n: int

    def set_tasks(self, tasks: Sequence[dict]) -> None:
        raise NotImplementedError

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NavigationVector(VectorEnv):
    """``n`` :class:`Navigation2D` environments as array operations (the same numbers)."""

    def __init__(self, n: int, horizon: int = 100, max_step: float = 0.1, tolerance: float = 0.01):
        self.n, self.horizon, self.max_step, self.tolerance = int(n), int(horizon), float(max_step), float(tolerance)
        self.goals = np.zeros((self.n, 2))
        self.position = np.zeros((self.n, 2))
        self.done = np.zeros(self.n, dtype=bool)
        self.t = 0

    def set_tasks(self, tasks: Sequence[dict]) -> None:
        if len(tasks) != self.n:
            raise ValueError(f"{len(tasks)} tasks for {self.n} environments")
        self.goals = np.stack([goal_of(t) for t in tasks])

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        self.position = np.zeros((self.n, 2))
        self.done = np.zeros(self.n, dtype=bool)
        self.t = 0
        return self.position.astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        live = ~self.done
        move = np.clip(np.asarray(actions, dtype=np.float64), -self.max_step, self.max_step)
        self.position = np.where(live[:, None], self.position + move, self.position)
        self.t += 1
        distance = np.hypot(*(self.position - self.goals).T)
        rewards = np.where(live, -distance, 0.0)
        self.done = self.done | (live & (distance < self.tolerance)) | (self.t >= self.horizon)
        return self.position.astype(np.float32), rewards, self.done.copy()


class GymVector(VectorEnv):
    """``n`` copies of a Gymnasium environment with ``set_task``, stepped in turn.

    Actions are clipped to the action space (as rllab's ``normalize`` did for the paper); the
    policy's log-likelihood is of the action it drew.

    Args:
        make_env: builds one environment (unwrapped: the horizon is the rollout's, here).
        n: how many.
        horizon: steps per episode.
    """

    def __init__(self, make_env: Callable[[], Any], n: int, horizon: int):
        self.n, self.horizon = int(n), int(horizon)
        self.envs = [make_env() for _ in range(self.n)]
        space = self.envs[0].action_space
        self.low, self.high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        self.done = np.zeros(self.n, dtype=bool)
        self.t = 0
        self._obs: np.ndarray | None = None

    def set_tasks(self, tasks: Sequence[dict]) -> None:
        if len(tasks) != self.n:
            raise ValueError(f"{len(tasks)} tasks for {self.n} environments")
        for env, task in zip(self.envs, tasks):
            env.unwrapped.set_task(task)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        self.done = np.zeros(self.n, dtype=bool)
        self.t = 0
        self._obs = np.stack([np.asarray(env.reset(seed=int(s))[0], dtype=np.float32)
                              for env, s in zip(self.envs, seeds)])
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self._obs is not None, "reset before step"
        rewards = np.zeros(self.n)
        actions = np.clip(np.asarray(actions, dtype=np.float64), self.low, self.high)
        for i in np.flatnonzero(~self.done):
            obs, reward, terminated, truncated, _ = self.envs[i].step(actions[i])
            self._obs[i] = obs
            rewards[i] = reward
            if terminated or truncated:
                self.done[i] = True
        self.t += 1
        if self.t >= self.horizon:
            self.done[:] = True
        return self._obs.copy(), rewards, self.done.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
