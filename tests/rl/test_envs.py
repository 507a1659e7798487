"""Environments and task families: the Gymnasium API, vectorised stepping, seeded tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kshot.errors import ConfigError
from kshot.rl import GymVector, Navigation2D, NavigationVector, env_family
from kshot.rl.rollouts import standard_normal


def test_navigation_passes_gymnasium_env_checker():
    env_checker = pytest.importorskip("gymnasium.utils.env_checker")
    import gymnasium

    env = Navigation2D({"goal": [0.2, -0.3]})
    assert isinstance(env, gymnasium.Env)
    env_checker.check_env(env, skip_render_check=True)


@pytest.mark.parametrize("name, task", [("halfcheetah-vel", {"velocity": 1.5}), ("halfcheetah-dir", {"direction": -1}),
                                        ("ant-dir", {"direction": 1})])
def test_mujoco_task_envs_pass_gymnasium_env_checker(name, task):
    pytest.importorskip("mujoco")
    env_checker = pytest.importorskip("gymnasium.utils.env_checker")
    env = env_family(name).make_env(task)
    env_checker.check_env(env, skip_render_check=True)
    assert env.get_task() == {k: float(v) for k, v in task.items()}


def test_navigation_dynamics_and_reward_follow_the_paper():
    env = Navigation2D({"goal": [0.3, 0.0]}, horizon=5)
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0.0, 0.0]
    obs, reward, terminated, truncated, _ = env.step(np.array([1.0, 0.05]))  # clipped to 0.1
    assert np.allclose(obs, [0.1, 0.05]) and math.isclose(reward, -math.hypot(0.2, 0.05), rel_tol=1e-6)
    assert not terminated and not truncated
    for _ in range(2):
        obs, reward, terminated, truncated, _ = env.step(np.array([0.1, -0.025]))
    assert terminated and abs(reward) < 0.01  # within the tolerance of the goal: the episode ends
    env.reset()
    for _ in range(5):
        *_, truncated, _ = env.step(np.zeros(2))
    assert truncated


def test_vectorised_navigation_equals_single_environments():
    rng = np.random.default_rng(0)
    goals = [{"goal": list(g)} for g in rng.random((6, 2)) - 0.5]
    goals[0] = {"goal": [0.1, 0.0]}  # reached after one step: done early
    vector = NavigationVector(6, horizon=20)
    vector.set_tasks(goals)
    singles = [Navigation2D(g, horizon=20) for g in goals]
    gym_vector = GymVector(lambda: Navigation2D(horizon=20), 6, horizon=20)
    gym_vector.set_tasks(goals)
    obs_v, obs_g = vector.reset(range(6)), gym_vector.reset(range(6))
    for env in singles:
        env.reset()
    done = np.zeros(6, dtype=bool)
    for t in range(20):
        actions = standard_normal(rng, (6, 2)) * 0.1
        actions[0] = [0.1, 0.0]
        obs_v, rew_v, done_v = vector.step(actions)
        obs_g, rew_g, done_g = gym_vector.step(actions)
        for i, env in enumerate(singles):
            if done[i]:
                assert rew_v[i] == 0.0
                continue
            obs, reward, terminated, truncated, _ = env.step(actions[i])
            assert np.allclose(obs_v[i], obs) and math.isclose(rew_v[i], reward, rel_tol=1e-9, abs_tol=1e-12)
            done[i] = terminated or truncated
        assert (done_v == done).all() and (done_g == done).all()
        assert np.allclose(obs_v, obs_g) and np.allclose(rew_v, rew_g)
    assert done[0] and done.all()


def test_half_cheetah_velocity_reward_is_minus_the_speed_error_and_control_cost():
    pytest.importorskip("mujoco")
    env = env_family("halfcheetah-vel").make_env({"velocity": 1.0})
    env.reset(seed=3)
    action = np.full(6, 0.5, dtype=np.float32)
    x_before = float(env.unwrapped.data.qpos[0])
    _, reward, *_ = env.step(action)
    velocity = (float(env.unwrapped.data.qpos[0]) - x_before) / env.unwrapped.dt
    assert math.isclose(reward, -abs(velocity - 1.0) - 0.05 * float((action ** 2).sum()), rel_tol=1e-6)


def test_tasks_are_a_function_of_seed_step_and_index():
    family = env_family("nav2d", seed=7, meta_batch_size=4)
    again = env_family("nav2d", seed=7, meta_batch_size=4)
    batch = family.meta_batch(3)
    assert [t.params for t in batch] == [t.params for t in again.meta_batch(3)]
    assert batch[1].params == again.task(3, 1).params and batch[1].key == (7, 3, 1)
    assert len({tuple(t.params["goal"]) for t in batch}) == 4
    goals = np.array([family.task(s, 0).params["goal"] for s in range(400)])
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and abs(goals.mean()) < 0.05
    test = env_family("nav2d", "test").fixed_tasks(3)
    assert [t.params for t in test] == [t.params for t in env_family("nav2d", "test").fixed_tasks(3)]
    assert test[0].params != env_family("nav2d", "val").fixed_tasks(1)[0].params
    assert test[0].params != family.task(0, 0).params


def test_bad_tasks_and_families_are_one_line_errors():
    family = env_family("nav2d")
    assert family.user_task({"goal": [0.3, -0.2]}).params == {"goal": [0.3, -0.2]}
    for bad in ({"goal": [1, 2, 3]}, {"target": [0, 0]}, [0.1, 0.2], {"goal": ["a", 0]}):
        with pytest.raises(ConfigError):
            family.user_task(bad)
    with pytest.raises(ConfigError, match="unknown environment family"):
        env_family("nav3d")


def test_kshot_and_2d_navigation_need_no_gymnasium():
    import subprocess
    import sys

    code = ("import sys; sys.modules['gymnasium'] = None\n"  # any import of gymnasium now fails
            "import kshot\n"
            "from kshot.rl import Navigation2D, env_family, gymnasium_available\n"
            "from kshot.errors import ConfigError\n"
            "assert not gymnasium_available()\n"
            "env = Navigation2D({'goal': [0.1, 0.0]})\n"
            "obs, _ = env.reset(seed=0)\n"
            "print(env.step([0.1, 0.0])[2], env.action_space.contains(env.action_space.sample()))\n"
            "try:\n    env_family('halfcheetah-vel')\nexcept ConfigError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "True True"
    assert 'pip install "kshot[rl]"' in second


def test_a_users_own_gymnasium_env_plugs_in_as_a_family():
    gymnasium = pytest.importorskip("gymnasium")
    import torch

    from kshot.models import create_model
    from kshot.rl import MAMLRL, GymFamily, register_env_family
    from kshot.rl.families import ENV_FAMILIES

    class Line(gymnasium.Env):  # the docs/RL.md example: a point on a line, to a target
        def __init__(self):
            self.observation_space = gymnasium.spaces.Box(-5.0, 5.0, (1,), np.float32)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
            self.target, self.x = 0.0, 0.0

        def set_task(self, task):
            self.target = float(task["target"])

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.x = float(self.np_random.uniform(-0.1, 0.1))
            return np.array([self.x], np.float32), {}

        def step(self, action):
            self.x = float(np.clip(self.x + 0.1 * float(np.clip(action[0], -1, 1)), -5, 5))
            return np.array([self.x], np.float32), -abs(self.x - self.target), False, False, {}

    from gymnasium.utils.env_checker import check_env

    check_env(Line(), skip_render_check=True)
    register_env_family("line", lambda seed=0, meta_batch_size=1, horizon=0: GymFamily(
        "line", Line, lambda rng: {"target": float(2 * rng.random() - 1)}, horizon=horizon or 10, seed=seed,
        meta_batch_size=meta_batch_size))
    try:
        family = env_family("line", seed=0, meta_batch_size=2)
        assert family.observation_dim == 1 and family.action_dim == 1 and family.horizon == 10
        torch.manual_seed(0)
        learner = MAMLRL(create_model("mlp", in_features=1, hidden=[8], out_features=1), episodes_per_task=3)
        metrics = learner.outer_step(family.meta_batch(0), torch.optim.Adam(learner.parameters()))
        assert metrics["env_steps"] == 2 * 3 * 2 * 10 and np.isfinite(metrics["return_post"])
        evaluation = learner.evaluate_tasks(env_family("line", "test").fixed_tasks(2), steps=1)
        assert evaluation.returns.shape == (2, 2)
    finally:
        ENV_FAMILIES.pop("line")
