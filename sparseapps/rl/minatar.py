"""MinAtar as a Graesser-style sparse DQN suite (issue 19): environments, the MinAtar CNN, the DQN builder, the suite's
settings and one cell's runner.

MinAtar (Young & Tian 2019, pip ``minatar``) has five 10 x 10 games whose observations are ``[10, 10, C]`` bool
arrays (channels last). Graesser et al. (ICML 2022, "The state of sparse training in deep RL") trained DQN on it with
MinAtar's network, one 3 x 3 convolution of 16 filters (stride 1, no padding) and one hidden layer of 128 units, and
compared dense, static, SET and RigL at several sparsities. Here:

* :func:`make_minatar_env` makes a game by its short name (``breakout``, ...) with MinAtar's defaults (sticky actions
  0.1, difficulty ramping) and the minimal action set (the ``-v1`` ids), capped at :data:`MAX_EPISODE_STEPS`.
* :class:`MinAtarCNN` is the features extractor: ``[B, 10, 10, C] -> permute -> conv 16 3x3 -> ReLU -> flatten ->
  [B, 1024]``; the 128-unit hidden layer and the Q head are SB3's ``net_arch=[128]``.
* :func:`minatar_dqn` builds SB3's DQN with the suite's settings (:data:`DQN_SETTINGS`).
* The sparse methods go through :class:`~sparseapps.rl.callback.DynamicSparsityCallback` with the ``graesser-dqn``
  preset's schedule (ERK, topology update every 1000 gradient steps, drop fraction 0.5 cosine-decayed, last update at
  75% of training) at the cell's sparsity: ``static`` keeps the ERK mask, ``set`` drops by magnitude and grows at
  random, ``rigl`` drops by magnitude and grows by dense gradient (Graesser et al.'s ``update_alg`` '' / 'set' /
  'rigl' on one schedule). **What is sparse**: every weight of the online Q-network is under the mask, the
  convolution's (``features_extractor.conv.weight``), the hidden layer's (``q_net.0.weight``) and the Q head's
  (``q_net.2.weight``; ``dense_output_layers=False``, Graesser et al.'s ``sparse_output_layer = True``); biases stay
  dense. ERK spreads the budget by layer shape, so the small layers end up much denser than the 1024 x 128 hidden
  layer: on Breakout (3 actions) the conv / hidden / head densities are 0.49 / 0.096 / 1.0 at 90% sparsity, 0.24 /
  0.046 / 1.0 at 95% and 0.045 / 0.009 / 0.34 at 99% (below 99% the head's ERK share exceeds 1 and is capped:
  it stays dense). The target network carries the online masks (the callback's commit hook).

Example:
    >>> env = make_minatar_env("breakout", seed=0)
    >>> env.observation_space.shape, int(env.action_space.n)
    ((10, 10, 4), 3)
    >>> model = minatar_dqn(env, seed=0)
    >>> [tuple(p.shape) for n, p in model.q_net.named_parameters() if n.endswith("weight")]
    [(16, 4, 3, 3), (128, 1024), (3, 128)]
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sparseapps.core import SparsityConfig
from sparseapps.core.options import torch_threads
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.rl.callback import DynamicSparsityCallback
from sparseapps.rl.presets import rl_preset

__all__ = [
    "BUDGET",
    "CPU_STEPS_PER_SECOND",
    "DQN_SETTINGS",
    "GAMES",
    "MAX_EPISODE_STEPS",
    "METHODS",
    "SEEDS",
    "SPARSITIES",
    "SUITE_GAMES",
    "MinAtarCNN",
    "cell_name",
    "cell_settings",
    "estimate_core_hours",
    "make_minatar_env",
    "minatar_dqn",
    "run_cell",
    "sparsity_callback",
]

#: Short names -> gymnasium ids (``-v1``: the minimal action set; ``-v0`` offers all 6 actions in every game).
GAMES: dict[str, str] = {
    "asterix": "MinAtar/Asterix-v1",
    "breakout": "MinAtar/Breakout-v1",
    "freeway": "MinAtar/Freeway-v1",
    "seaquest": "MinAtar/Seaquest-v1",
    "space_invaders": "MinAtar/SpaceInvaders-v1",
}
#: Episodes are cut here (a good Breakout agent can keep the ball in play indefinitely); Freeway ends at 2500 itself.
MAX_EPISODE_STEPS = 10_000

#: The registered suite (docs/minatar_registration.md): games, methods, sparsities, seeds, env steps per run.
SUITE_GAMES = ("breakout", "space_invaders")
METHODS = ("dense", "static", "set", "rigl")
SPARSITIES = (0.9, 0.95, 0.99)
SEEDS = tuple(range(300, 310))
BUDGET = 250_000
#: Env steps per CPU second of one run on one thread, about the slowest rate measured on a quiet machine (RigL 90% on
#: Space Invaders: 1212-1257; dense 1561-1815): the suite's cost estimate (docs/minatar_registration.md).
CPU_STEPS_PER_SECOND = 1200.0
#: Evaluations per run (the learning curve), episodes per evaluation, and the final evaluation's episodes.
N_EVALS = 10
EVAL_EPISODES = 5
FINAL_EVAL_EPISODES = 20
#: Evaluation seeds are the run's seed plus this (the training environment never sees them).
EVAL_SEED_OFFSET = 10_000

#: SB3 DQN keyword arguments: MinAtar's DQN (Young & Tian 2019: replay 100k, batch 32, gamma 0.99, target update every
#: 1000 steps, learning rate 2.5e-4, epsilon 1 -> 0.1, learning from 5000 stored steps) with two changes: one gradient
#: step every 4 env steps (Dopamine's DQN update period; Graesser et al. ran their DQN agents on Dopamine. MinAtar
#: updates every step, which ran at 103 env steps/s against 184 here, Breakout on one thread of a loaded machine) and
#: epsilon decaying over the first 10% of the budget (MinAtar: over 100k of 5M frames). The optimizer is SB3's Adam
#: (MinAtar used RMSProp), with SB3's Huber loss and gradient clipping at norm 10.
DQN_SETTINGS: dict[str, Any] = {
    "learning_rate": 2.5e-4,
    "buffer_size": 100_000,
    "learning_starts": 5_000,
    "batch_size": 32,
    "gamma": 0.99,
    "train_freq": 4,
    "gradient_steps": 1,
    "target_update_interval": 1_000,
    "exploration_initial_eps": 1.0,
    "exploration_final_eps": 0.1,
    "exploration_fraction": 0.1,
}

_registered = False


def _register() -> None:
    """Registers MinAtar's gymnasium ids once (``minatar.gym.register_envs`` warns when called twice)."""
    global _registered
    if _registered or "MinAtar/Breakout-v1" in gym.registry:
        _registered = True
        return
    try:
        import minatar.gym
    except ImportError as error:
        raise ImportError(
            "MinAtar is not installed: the package 'minatar' is needed (pip install minatar, or the 'rl' extra: "
            "pip install -e '.[rl]')"
        ) from error
    minatar.gym.register_envs()
    _registered = True


def make_minatar_env(
    name: str, seed: int | None = None, *, max_episode_steps: int = MAX_EPISODE_STEPS
) -> gym.Env:
    """A MinAtar game by short name, its random state seeded with ``seed``, episodes cut at ``max_episode_steps``.

    Observations are ``[10, 10, C]`` bool arrays (channels last; ``C`` = 4 for Breakout, 7 for Freeway, 10 for
    Seaquest and Asterix, 6 for Space Invaders).

    Raises:
        ValueError: an unknown game (the message lists the valid names).
        ImportError: ``minatar`` is not installed.

    Example:
        >>> env = make_minatar_env("space_invaders", seed=1)
        >>> observation, _ = env.reset()
        >>> observation.shape, observation.dtype.name
        ((10, 10, 6), 'bool')
    """
    if name not in GAMES:
        raise ValueError(f"unknown MinAtar game {name!r}; expected one of {', '.join(GAMES)}")
    check_int("max_episode_steps", max_episode_steps, low=1)
    _register()
    env = gym.make(GAMES[name], max_episode_steps=max_episode_steps)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


class MinAtarCNN(BaseFeaturesExtractor):
    """MinAtar's convolutional torso: ``[B, H, W, C]`` (channels last, as MinAtar gives them) -> permute to
    ``[B, C, H, W]`` -> ``filters`` 3 x 3 convolutions, stride 1, no padding -> ReLU -> flatten ->
    ``[B, filters * (H - 2) * (W - 2)]``.

    Example:
        >>> space = gym.spaces.Box(0.0, 1.0, shape=(10, 10, 4), dtype=bool)
        >>> MinAtarCNN(space)(torch.zeros(2, 10, 10, 4)).shape
        torch.Size([2, 1024])
    """

    def __init__(self, observation_space: gym.spaces.Box, filters: int = 16) -> None:
        shape = observation_space.shape
        if shape is None or len(shape) != 3 or min(shape[:2]) < 3:
            raise ValueError(f"expected a [H, W, C] observation space with H, W >= 3, got shape {shape}")
        check_int("filters", filters, low=1)
        height, width, channels = shape
        super().__init__(observation_space, features_dim=filters * (height - 2) * (width - 2))
        self.conv = nn.Conv2d(channels, filters, kernel_size=3, stride=1)
        self.relu = nn.ReLU()

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C] -> [B, filters * (H - 2) * (W - 2)]``."""
        return torch.flatten(self.relu(self.conv(observations.permute(0, 3, 1, 2))), start_dim=1)


def minatar_dqn(env: gym.Env | DummyVecEnv, seed: int, **overrides: Any) -> DQN:
    """SB3's DQN with MinAtar's network (:class:`MinAtarCNN` and ``net_arch=[128]``) and :data:`DQN_SETTINGS`;
    ``overrides`` replace any DQN keyword argument (e.g. ``learning_starts=100`` for a smoke run).

    Example:
        >>> model = minatar_dqn(make_minatar_env("freeway", seed=0), seed=0, buffer_size=1000)
        >>> model.replay_buffer.buffer_size, model.target_update_interval
        (1000, 1000)
    """
    kwargs: dict[str, Any] = {
        **DQN_SETTINGS,
        "policy_kwargs": {"features_extractor_class": MinAtarCNN, "net_arch": [128]},
        **overrides,
    }
    return DQN("MlpPolicy", env, seed=seed, device="cpu", **kwargs)


def sparsity_callback(method: str, sparsity: float) -> DynamicSparsityCallback | None:
    """The callback of one of :data:`METHODS` at ``sparsity`` (None for ``dense``): the ``graesser-dqn`` preset's
    schedule for all three sparse methods, which differ only in what they grow (see the module docstring).

    Example:
        >>> callback = sparsity_callback("set", 0.95)
        >>> config = callback.config
        >>> config.sparsity, config.distribution, config.drop, config.grow, config.update_interval
        (0.95, 'erk', 'magnitude', 'random', 1000)
        >>> callback.dense_output_layers, sparsity_callback("static", 0.9).config.method
        (False, 'static')
    """
    check_choice("method", method, METHODS)
    if method == "dense":
        return None
    check_number("sparsity", sparsity, low=0.0, high=1.0, low_open=True, high_open=True)
    preset = rl_preset("graesser-dqn", sparsity=sparsity)
    config: SparsityConfig = preset.sparsity
    if method == "static":
        config = SparsityConfig.preset("static", sparsity=sparsity, distribution=config.distribution)
    elif method == "set":
        config = config.replace(grow="random")
    return DynamicSparsityCallback(
        config,
        critic_density_ratio=preset.critic_density_ratio,
        dense_output_layers=preset.dense_output_layers,
    )


def cell_name(game: str, method: str, sparsity: float) -> str:
    """``game/method`` for dense, ``game/method-<percent>`` otherwise (e.g. ``breakout/rigl-95``)."""
    return f"{game}/{method}" if method == "dense" else f"{game}/{method}-{round(sparsity * 100)}"


def cell_settings(game: str, method: str, sparsity: float, budget: int, **overrides: Any) -> dict[str, Any]:
    """Everything a cell's result depends on but its seed (a finished cell is reused only with equal settings)."""
    callback = sparsity_callback(method, sparsity)
    return {
        "game": game,
        "env_id": GAMES[game],
        "method": method,
        "sparsity": 0.0 if method == "dense" else sparsity,
        "budget": budget,
        "dqn": {**DQN_SETTINGS, **overrides},
        "sparsity_config": None if callback is None else callback.config.to_dict(),
        "max_episode_steps": MAX_EPISODE_STEPS,
        "evals": N_EVALS,
        "eval_episodes": EVAL_EPISODES,
        "final_eval_episodes": FINAL_EVAL_EPISODES,
    }


class _Curve(BaseCallback):
    """Evaluates the greedy policy every ``every`` env steps and records each training episode's return."""

    def __init__(self, eval_env: DummyVecEnv, every: int, episodes: int) -> None:
        super().__init__()
        self.eval_env, self.every, self.n_episodes = eval_env, every, episodes
        self.next_eval = every
        self.curve: list[list[float]] = []
        self.episodes: list[list[float]] = []
        self.eval_seconds = 0.0

    def evaluate(self, episodes: int) -> list[float]:
        started = time.perf_counter()
        returns, _ = evaluate_policy(
            self.model, self.eval_env, n_eval_episodes=episodes, return_episode_rewards=True
        )
        self.eval_seconds += time.perf_counter() - started
        return [float(r) for r in returns]

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            if "episode" in info:
                self.episodes.append([self.num_timesteps, float(info["episode"]["r"])])
        if self.num_timesteps >= self.next_eval:
            self.next_eval += self.every
            self.curve.append([self.num_timesteps, statistics.fmean(self.evaluate(self.n_episodes))])
        return True


def _parameter_counts(model: DQN) -> dict[str, int]:
    """Weights (conv and linear) and biases of the online Q-network, and how many weights are nonzero."""
    weights = [p for n, p in model.q_net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.q_net.named_parameters() if n.endswith("bias")]
    return {
        "weights": sum(p.numel() for p in weights),
        "nonzero_weights": sum(int(torch.count_nonzero(p)) for p in weights),
        "biases": sum(p.numel() for p in biases),
    }


def run_cell(
    game: str,
    method: str,
    sparsity: float,
    seed: int,
    budget: int = BUDGET,
    *,
    threads: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Trains one (game, method, sparsity, seed) cell for ``budget`` env steps on ``threads`` torch threads.

    Returns a JSON-able dict: ``settings`` (:func:`cell_settings`), ``seed``, ``final_return`` (mean greedy return
    over :data:`FINAL_EVAL_EPISODES` episodes after training) and ``final_returns``, ``curve`` (``[step, mean greedy
    return]`` every ``budget / N_EVALS`` steps, the final evaluation last), ``episodes`` (``[step, return]`` of each
    training episode), ``parameters`` (online Q-network weights, nonzero weights, biases), for sparse cells
    ``density`` / ``sparsity_report`` / ``training_flops`` / ``topology_updates`` from the callback, and wall-clock
    (``train_seconds`` without evaluation, ``eval_seconds``, ``steps_per_second``) and ``cpu_seconds`` (this
    process's CPU time during ``learn``, periodic evaluations included: the load-independent cost on a shared machine).

    Example:
        >>> result = run_cell("breakout", "rigl", 0.9, 0, 300, learning_starts=100, buffer_size=300)
        >>> result["timesteps"], round(result["density"]["q_net"], 2), len(result["curve"])
        (300, 0.1, 10)
    """
    check_choice("game", game, tuple(GAMES))
    check_int("budget", budget, low=N_EVALS)
    check_int("seed", seed, low=0)
    callback = sparsity_callback(method, sparsity)
    settings = cell_settings(game, method, sparsity, budget, **overrides)
    with torch_threads(check_int("threads", threads, low=1)):  # restored after the cell
        set_random_seed(seed)
        env = DummyVecEnv([lambda: Monitor(make_minatar_env(game, seed))])
        eval_env = DummyVecEnv([lambda: Monitor(make_minatar_env(game, seed + EVAL_SEED_OFFSET))])
        model = minatar_dqn(env, seed, **overrides)
        curve = _Curve(eval_env, math.ceil(budget / N_EVALS), EVAL_EPISODES)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.learn(budget, callback=[curve] if callback is None else [callback, curve])
        train_seconds = time.perf_counter() - started - curve.eval_seconds
        cpu_seconds = time.process_time() - cpu_started
        final_returns = curve.evaluate(FINAL_EVAL_EPISODES)
    if curve.curve and curve.curve[-1][0] == model.num_timesteps:
        curve.curve.pop()  # the last periodic evaluation is replaced by the final one (more episodes)
    curve.curve.append([model.num_timesteps, statistics.fmean(final_returns)])
    result: dict[str, Any] = {
        "settings": settings,
        "cell": cell_name(game, method, sparsity),
        "game": game,
        "method": method,
        "sparsity": settings["sparsity"],
        "seed": seed,
        "timesteps": model.num_timesteps,
        "final_return": statistics.fmean(final_returns),
        "final_returns": final_returns,
        "curve": curve.curve,
        "episodes": curve.episodes,
        "parameters": _parameter_counts(model),
        "train_seconds": train_seconds,
        "eval_seconds": curve.eval_seconds,
        "steps_per_second": model.num_timesteps / train_seconds if train_seconds > 0 else None,
        "cpu_seconds": cpu_seconds,
        "threads": threads,
    }
    if callback is not None:
        reports = callback.report()
        result |= {
            "density": {name: engine.density for name, engine in callback.engines.items()},
            "sparsity_report": {name: report.to_dict() for name, report in reports.items()},
            "training_flops": callback.training_flops(),
            "topology_updates": {name: len(engine.history) for name, engine in callback.engines.items()},
        }
    env.close()
    eval_env.close()
    return result


def estimate_core_hours(runs: int, budget: int, steps_per_second: float = CPU_STEPS_PER_SECOND) -> float:
    """Single-thread CPU hours of ``runs`` runs of ``budget`` env steps at ``steps_per_second`` (per CPU second).

    Example:
        >>> runs = len(SUITE_GAMES) * (1 + (len(METHODS) - 1) * len(SPARSITIES)) * len(SEEDS)
        >>> runs, round(estimate_core_hours(runs, BUDGET), 1)
        (200, 11.6)
    """
    check_int("runs", runs, low=0)
    check_int("budget", budget, low=0)
    check_number("steps_per_second", steps_per_second, low=0.0, low_open=True)
    return runs * budget / steps_per_second / 3600
