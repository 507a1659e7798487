"""Fast-adapting reinforcement learning: MAML for policies on Gymnasium environments.

Inside this package imports run one way, each module using only those before it::

    envs        Gymnasium-API environments (2D navigation, NumPy only) and vectorised forms
    mujoco      half-cheetah velocity / direction, ant direction (the ``rl`` extra)
    families    task families: a task is an environment drawn from a seed; a user's own env
    policies    Gaussian MLP policies as forward(params, obs), batched over tasks
    baselines   the linear-feature baseline, fitted per task
    rollouts    batched rollouts: all tasks' episodes step together, one forward per step
    objectives  returns, advantages, the inner REINFORCE loss, TRPO/PPO surrogates, KL
    optim       TRPO's conjugate-gradient step with a line search
    maml        MAML-RL (second or first order), the pretrained comparison; presets
    plots       return against adaptation steps; 2D-navigation trajectories
"""

from kshot.rl.envs import GymVector, Navigation2D, NavigationVector, VectorEnv, gymnasium_available
from kshot.rl.families import (ENV_FAMILIES, EnvFamily, EnvTask, GymFamily, Navigation2DTasks, env_family,
                               family_tasks, is_env_family, register_env_family)
from kshot.rl.maml import FOMAMLRL, MAMLRL, POLICY_LEARNERS, AdaptedPolicy, PolicyEvaluation, PretrainedPolicy
from kshot.rl.rollouts import Episodes, rollout

__all__ = ["AdaptedPolicy", "ENV_FAMILIES", "EnvFamily", "EnvTask", "Episodes", "FOMAMLRL", "GymFamily", "GymVector",
           "MAMLRL", "Navigation2D", "Navigation2DTasks", "NavigationVector", "POLICY_LEARNERS", "PolicyEvaluation",
           "PretrainedPolicy", "VectorEnv", "env_family", "family_tasks", "gymnasium_available", "is_env_family",
           "register_env_family", "rollout"]
