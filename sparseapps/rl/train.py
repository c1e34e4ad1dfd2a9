"""Training runs: an SB3 agent dense or sparse, evaluated, checkpointed, resumable; results and learning curves.

One :class:`RLRun` is one (environment, algorithm, method, seed). :func:`train_run` trains it into a directory:

* ``tb/`` TensorBoard logs (SB3's, plus ``sparsity/*`` density and mask turnover at each topology update),
* ``checkpoint/`` while running, written every ``checkpoint_every`` steps at a rollout boundary: ``model.zip``
  (networks with their masks, optimizers, SB3's counters and last observation), the replay buffer, the sparsity
  engines' state, the random generators (``random_state.pt``), the environments mid-episode
  (``environments.pkl``), the run's settings and progress, and ``MANIFEST.json`` (SHA-256 of each file, checked
  before anything is unpickled). Running the same :class:`RLRun` again resumes from it **bit for bit**: the
  resumed run's networks, optimizers, masks, replay buffer and every metric of ``result.json`` but its wall-clock
  fields equal those of a run never interrupted (on CPU with the same torch threads; see
  :mod:`sparseapps.rl.resume`). A different :class:`RLRun` is refused,
* ``model.zip``, ``result.json`` and ``MANIFEST.json`` at the end (``result.json`` marks the run done; running it
  again returns it), and ``replay_buffer.pkl`` when asked to keep it.

:func:`train_many` runs several (dense and sparse, several seeds) behind one progress bar and writes
``results.json`` (mean and 95% confidence interval per method, wall-clock and FLOPs relative to dense) and
``curves.png``. It claims its output directory (:func:`sparseapps.core.io.claim_output`) for the settings all its
runs share (:data:`SHARED_FIELDS`), so other methods can be added to it later: the summary covers every finished
run in the directory, never only the last call's.

Example:
    >>> run = RLRun(env="CartPole-v1", algo="ppo", method="rigl", steps=50_000, seed=0)
    >>> run.label, run.sparsity_config().sparsity
    ('rigl', 0.9)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from sparseapps.core import PRESETS, SparsityConfig
from sparseapps.core.io import (
    MANIFEST,
    CorruptFileError,
    claim_output,
    load_json,
    load_torch,
    remove_temporaries,
    save_torch,
    verify_manifest,
    write_atomic,
    write_json,
    write_manifest,
)
from sparseapps.rl.callback import CALLBACK_METHODS, DynamicSparsityCallback
from sparseapps.rl.diagnostics import find_dormant_neurons, shift_recovery
from sparseapps.rl.drift import INFO_ENV_STEP, INFO_PHASE, DriftSchedule, make_drifting_env
from sparseapps.rl.presets import RL_PRESETS, rl_preset
from sparseapps.rl.resume import pickle_environments, random_state, restore_environments, set_random_state

ALGORITHM_CLASSES: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "sac": SAC,
    "td3": TD3,
    "ddpg": DDPG,
    "dqn": DQN,
}
# The action spaces each algorithm supports (its constructor's supported_action_spaces in SB3 2.x).
ACTION_SPACES: dict[str, tuple[type[spaces.Space], ...]] = {
    "ppo": (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
    "a2c": (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
    "sac": (spaces.Box,),
    "td3": (spaces.Box,),
    "ddpg": (spaces.Box,),
    "dqn": (spaces.Discrete,),
}
# Core presets the callback can run (sparse from scratch or pruning a dense start).
METHODS = ("dense", *sorted(name for name, values in PRESETS.items() if values["method"] in CALLBACK_METHODS))

# rl-baselines3-zoo's hyperparameters (DLR-RM/rl-baselines3-zoo, hyperparams/{sac,dqn}.yml) for the benchmark's
# pairs; every other (algorithm, environment) pair starts from SB3's defaults.
TUNED: dict[tuple[str, str], dict[str, Any]] = {
    ("sac", "Pendulum-v1"): {"learning_rate": 1e-3},
    # sac.yml's MuJoCo entries: SB3's defaults with 10k uniformly random steps before learning starts.
    ("sac", "HalfCheetah-v5"): {"learning_starts": 10_000},
    ("dqn", "CartPole-v1"): {
        "learning_rate": 2.3e-3,
        "batch_size": 64,
        "buffer_size": 100_000,
        "learning_starts": 1000,
        "gamma": 0.99,
        "target_update_interval": 10,
        "train_freq": 256,
        "gradient_steps": 128,
        "exploration_fraction": 0.16,
        "exploration_final_eps": 0.04,
        "policy_kwargs": {"net_arch": [256, 256]},
    },
}
# Exploration noise of TD3 / DDPG (SB3 adds none by default; Fujimoto's TD3 and DS-TD3 use N(0, 0.1)).
ACTION_NOISE_STD = 0.1

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_confidence_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; 0 for one value).

    Example:
        >>> mean, half_width = mean_confidence_interval([1.0, 2.0, 3.0])
        >>> mean, round(half_width, 3)
        (2.0, 2.484)
    """
    if not values:
        raise ValueError("expected at least one value, got none")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, 0.0
    quantile = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def check_env_id(env_id: str) -> None:
    """Checks that ``env_id`` is a registered gymnasium environment (``module:Id`` imports ``module`` first).

    Raises:
        ValueError: the id is not registered; the message suggests close ids.

    Example:
        >>> try:
        ...     check_env_id("CartPol-v1")
        ... except ValueError as error:
        ...     print(str(error).split(" List them")[0])
        env 'CartPol-v1' is not a registered gymnasium environment: ... Close ids: 'CartPole-v1', ...
    """
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(
                f"env {env_id!r}: module {module!r} (which should register {name!r}) cannot be imported: {error}"
            ) from None
    try:
        gym.spec(name)
    except gym.error.Error as error:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        suggestion = f" Close ids: {', '.join(map(repr, close))}." if close else ""
        raise ValueError(
            f"env {env_id!r} is not a registered gymnasium environment: {error}{suggestion} List them all with "
            "`python -c 'import gymnasium; gymnasium.pprint_registry()'`"
        ) from None


def check_action_space(run: RLRun) -> None:
    """Makes ``run``'s environment once and checks that ``run.algo`` supports its action space.

    Raises:
        ValueError: the environment cannot be made, or the algorithm does not support its action space (SAC,
            TD3 and DDPG need a continuous ``Box``; DQN a ``Discrete`` one).
    """
    try:
        env = gym.make(run.env)
    except Exception as error:  # gymnasium and the environments' own packages raise many types
        raise ValueError(f"env {run.env!r} cannot be made: {type(error).__name__}: {error}") from None
    space = env.action_space
    env.close()
    supported = ACTION_SPACES[run.algo]
    if not isinstance(space, supported):
        fitting = [name for name, kinds in ACTION_SPACES.items() if isinstance(space, kinds)]
        raise ValueError(
            f"algo {run.algo!r} needs a {' or '.join(kind.__name__ for kind in supported)} action space, but "
            f"{run.env} has {space!r}; the algorithms for a {type(space).__name__} action space are "
            f"{', '.join(fitting) if fitting else 'none of ' + ', '.join(ACTION_SPACES)}"
        )


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RLRun:
    """One training run: environment, algorithm, sparse-training method and budget.

    Example:
        >>> RLRun(env="Pendulum-v1", algo="sac", preset="graesser-sac").label
        'graesser-sac'
    """

    env: str = field(default="Pendulum-v1", metadata={"help": "gymnasium environment id"})
    algo: str = field(default="sac", metadata={"help": f"one of {', '.join(ALGORITHM_CLASSES)}"})
    method: str = field(
        default="rigl",
        metadata={"help": f"'dense' or a core preset the callback runs: {', '.join(METHODS[1:])}"},
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": f"an RL preset ({', '.join(RL_PRESETS)}): its configuration replaces the method's unless "
            "method is 'dense'; its algorithm kwargs apply to both"
        },
    )
    sparsity: float | None = field(default=None, metadata={"help": "sparsity (None: the preset's, or 0.9)"})
    critic_density_ratio: float | None = field(
        default=None, metadata={"help": "critic density / actor density (None: the preset's, or 1)"}
    )
    dense_output_layers: bool | None = field(
        default=None, metadata={"help": "keep output layers dense (None: the preset's, or True)"}
    )
    update_interval: int | None = field(
        default=None, metadata={"help": "gradient steps between topology updates (None: the method's)"}
    )
    sparsity_overrides: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "other SparsityConfig fields set on top of the method's or preset's (e.g. drop_fraction)"
        },
    )
    steps: int = field(default=50_000, metadata={"help": "environment steps"})
    seed: int = field(default=0, metadata={"help": "seed of the agent, the environments and the masks"})
    n_envs: int = field(default=1, metadata={"help": "parallel environment copies"})
    eval_every: int = field(
        default=5_000, metadata={"help": "env steps between evaluations (0: only at the end)"}
    )
    eval_episodes: int = field(default=10, metadata={"help": "episodes per evaluation"})
    checkpoint_every: int = field(
        default=10_000, metadata={"help": "env steps between checkpoints (0: none)"}
    )
    drift_parameter: str | None = field(
        default=None, metadata={"help": "physical parameter that drifts (see sparseapps.rl.drift), or None"}
    )
    drift_shifts: tuple[tuple[int, float], ...] = field(
        default=(), metadata={"help": "(env step, factor) pairs of the drift schedule"}
    )
    hyperparameters: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "SB3 constructor kwargs, over the tuned defaults and the preset's"},
    )
    threads: int = field(default=1, metadata={"help": "torch threads"})
    device: str = field(default="cpu", metadata={"help": "torch device of the agent"})

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHM_CLASSES:
            raise ValueError(f"algo must be one of {', '.join(ALGORITHM_CLASSES)}, got {self.algo!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.preset is not None:
            if self.preset not in RL_PRESETS:
                raise ValueError(f"preset must be one of {', '.join(RL_PRESETS)}, got {self.preset!r}")
            rl_preset(self.preset).kwargs_for(self.algo)
        if not isinstance(self.env, str) or not self.env:
            raise ValueError(f"env must be a gymnasium id, got {self.env!r}")
        check_env_id(self.env)
        for name in ("steps", "n_envs", "eval_episodes", "threads"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        _positive_int("seed", self.seed, allow_zero=True)
        if self.update_interval is not None:
            _positive_int("update_interval", self.update_interval)
        if self.drift_parameter is None and self.drift_shifts:
            raise ValueError(f"drift_shifts {self.drift_shifts!r} need a drift_parameter, got None")
        shifts = tuple((int(s), float(f)) for s, f in self.drift_shifts)
        object.__setattr__(self, "drift_shifts", shifts)
        if self.drift_parameter is not None:
            DriftSchedule(shifts=shifts)
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        if not isinstance(self.sparsity_overrides, Mapping):
            raise TypeError(f"sparsity_overrides must be a mapping, got {self.sparsity_overrides!r}")
        object.__setattr__(self, "sparsity_overrides", dict(self.sparsity_overrides))
        reserved = sorted({"seed", "sparsity", "update_interval"} & set(self.sparsity_overrides))
        if reserved:
            raise ValueError(f"set {reserved} through RLRun's own fields, not sparsity_overrides")
        if self.sparse:
            self.sparsity_config()

    @property
    def sparse(self) -> bool:
        """Whether the run trains sparse (``method="dense"`` with a preset: dense with the preset's kwargs)."""
        return self.method != "dense"

    @property
    def label(self) -> str:
        """The method's name in tables and plots: ``dense``, else the preset, else the method."""
        return self.preset if self.preset is not None and self.sparse else self.method

    def sparsity_config(self) -> SparsityConfig | None:
        """The engine configuration (None when dense), seeded with :attr:`seed`."""
        if not self.sparse:
            return None
        overrides: dict[str, Any] = {**self.sparsity_overrides, "seed": self.seed}
        if self.sparsity is not None:
            overrides["sparsity"] = self.sparsity
        if self.update_interval is not None:
            overrides["update_interval"] = self.update_interval
        if self.preset is not None:
            return rl_preset(self.preset, **overrides).sparsity
        overrides.setdefault("sparsity", 0.9)
        return SparsityConfig.preset(self.method, **overrides)

    def callback(self) -> DynamicSparsityCallback | None:
        """The sparsity callback of this run (None when dense)."""
        config = self.sparsity_config()
        if config is None:
            return None
        preset = rl_preset(self.preset) if self.preset is not None else None
        ratio = self.critic_density_ratio
        dense_outputs = self.dense_output_layers
        if ratio is None:
            ratio = preset.critic_density_ratio if preset is not None else 1.0
        if dense_outputs is None:
            dense_outputs = preset.dense_output_layers if preset is not None else True
        return DynamicSparsityCallback(config, critic_density_ratio=ratio, dense_output_layers=dense_outputs)

    def algorithm_kwargs(self) -> dict[str, Any]:
        """SB3 constructor kwargs: tuned defaults, then the preset's, then :attr:`hyperparameters`."""
        kwargs = copy.deepcopy(TUNED.get((self.algo, self.env), {}))
        layers = [rl_preset(self.preset).kwargs_for(self.algo)] if self.preset is not None else []
        for extra in [*layers, copy.deepcopy(dict(self.hyperparameters))]:
            policy_kwargs = {**kwargs.get("policy_kwargs", {}), **extra.pop("policy_kwargs", {})}
            kwargs.update(extra)
            if policy_kwargs:
                kwargs["policy_kwargs"] = policy_kwargs
        return kwargs

    def drift_schedule(self) -> DriftSchedule | None:
        """The drift schedule, or None for a stationary environment."""
        return DriftSchedule(shifts=self.drift_shifts) if self.drift_parameter is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with checkpoints and results)."""
        data = dataclasses.asdict(self)
        data["drift_shifts"] = [list(pair) for pair in self.drift_shifts]
        return json.loads(json.dumps(data, default=repr))


def make_env(run: RLRun) -> VecEnv:
    """The training environments (monitored; drifting when the run has a drift parameter)."""
    schedule = run.drift_schedule()
    if schedule is None:
        return make_vec_env(run.env, n_envs=run.n_envs, seed=run.seed)
    return make_vec_env(
        make_drifting_env,
        n_envs=run.n_envs,
        seed=run.seed,
        env_kwargs={"env_id": run.env, "parameter": run.drift_parameter, "schedule": schedule},
    )


def build_model(run: RLRun, env: VecEnv, tensorboard_log: str | None) -> BaseAlgorithm:
    """A fresh SB3 model for ``run``."""
    kwargs = run.algorithm_kwargs()
    if run.algo in ("td3", "ddpg") and "action_noise" not in kwargs:
        n_actions = int(np.prod(env.action_space.shape))
        kwargs["action_noise"] = NormalActionNoise(np.zeros(n_actions), ACTION_NOISE_STD * np.ones(n_actions))
    return ALGORITHM_CLASSES[run.algo](
        "MlpPolicy" if "policy" not in kwargs else kwargs.pop("policy"),
        env,
        seed=run.seed,
        device=run.device,
        tensorboard_log=tensorboard_log,
        verbose=0,
        **kwargs,
    )


# Files of a run directory that train_run writes (overwrite removes these, never other files).
RUN_OUTPUTS = (
    "result.json",
    "model.zip",
    "replay_buffer.pkl",
    MANIFEST,
    "checkpoint",
    "checkpoint.old",
    "checkpoint.tmp",
    "tb",
)
# A finished run's files the run directory's manifest covers (replay_buffer.pkl only when kept).
FINAL_FILES = ("model.zip", "result.json", "replay_buffer.pkl")


class _OtherRun(ValueError):
    """A run directory holds a run of another configuration (``overwrite`` replaces it)."""


class _RunTracker(BaseCallback):
    """Evaluates, records training episodes, advances the progress bar and writes checkpoints."""

    def __init__(
        self,
        run: RLRun,
        envs: Mapping[str, VecEnv | None],
        checkpoint_dir: Path,
        sparsity: DynamicSparsityCallback | None,
        progress: Any | None,
    ) -> None:
        super().__init__()
        self.run = run
        self.envs = dict(envs)
        self.eval_env = envs["eval"]
        self.checkpoint_dir = checkpoint_dir
        self.sparsity = sparsity
        self.progress = progress
        self.curve: list[list[float]] = []
        self.episodes: list[list[float]] = []
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.train_seconds_before = 0.0
        self.next_eval = run.eval_every if run.eval_every else math.inf
        self.next_checkpoint = run.checkpoint_every if run.checkpoint_every else math.inf
        # Random states of a checkpoint, restored where they were saved: the start of the next rollout.
        self.resumed_random_state: Mapping[str, Any] | None = None
        self.environments_unpicklable = False

    def state(self) -> dict[str, Any]:
        return {
            "curve": self.curve,
            "episodes": self.episodes,
            "next_eval": self.next_eval,
            "next_checkpoint": self.next_checkpoint,
        }

    def restore(self, state: Mapping[str, Any], train_seconds: float) -> None:
        self.curve, self.episodes = list(state["curve"]), list(state["episodes"])
        self.next_eval, self.next_checkpoint = state["next_eval"], state["next_checkpoint"]
        self.train_seconds_before = train_seconds

    def evaluate(self) -> tuple[float, float]:
        if self.eval_env is None:
            raise RuntimeError(
                "this run has no evaluation environment (a drifting run is scored on its episodes)"
            )
        started = time.perf_counter()
        mean, std = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.run.eval_episodes)
        self.eval_seconds += time.perf_counter() - started
        return float(mean), float(std)

    def _on_step(self) -> bool:
        if self.progress is not None:
            self.progress.update(self.training_env.num_envs)
        for info in self.locals.get("infos", ()):
            episode = info.get("episode")
            if episode is not None:
                self.episodes.append(
                    [
                        self.num_timesteps,
                        float(episode["r"]),
                        info.get(INFO_PHASE, 0),
                        info.get(INFO_ENV_STEP, 0),
                    ]
                )
        if self.num_timesteps >= self.next_eval:
            while self.next_eval <= self.num_timesteps:
                self.next_eval += self.run.eval_every
            if (
                self.eval_env is not None and self.num_timesteps < self.run.steps
            ):  # the last one runs after learn
                self.curve.append([self.num_timesteps, self.evaluate()[0]])
        return True

    def _on_rollout_start(self) -> None:
        if self.resumed_random_state is not None:
            set_random_state(self.model, self.resumed_random_state)
            self.resumed_random_state = None
        if self.num_timesteps >= self.next_checkpoint and self.num_timesteps < self.run.steps:
            while self.next_checkpoint <= self.num_timesteps:
                self.next_checkpoint += self.run.checkpoint_every
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Writes the checkpoint into a fresh directory, then swaps it in (never a half-written checkpoint).

        Called at the start of a rollout (SB3's ``on_rollout_start``), after the previous rollout's training: the
        state saved here is everything the rest of the run depends on.
        """
        started = time.perf_counter()
        fresh = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
        old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        self.model.save(fresh / "model.zip")
        if isinstance(self.model, OffPolicyAlgorithm):
            self.model.save_replay_buffer(fresh / "replay_buffer.pkl")
        if self.sparsity is not None:
            save_torch(fresh / "sparsity.pt", self.sparsity.state_dict())
        save_torch(fresh / "random_state.pt", random_state(self.model))
        try:
            environments = pickle_environments(self.model, self.envs)
        except TypeError as error:
            if not self.environments_unpicklable:
                warnings.warn(
                    f"{self.run.env}: the checkpoints hold no environment state ({error}); resuming from one "
                    "resets the environments, so the resumed run will differ from an uninterrupted one",
                    stacklevel=2,
                )
            self.environments_unpicklable = True
        else:
            write_atomic(fresh / "environments.pkl", environments)
        write_json(fresh / "run.json", self.run.to_dict())
        train_seconds = self.train_seconds_before + self.elapsed_training()
        write_json(fresh / "progress.json", {**self.state(), "train_seconds": train_seconds})
        write_manifest(fresh, sorted(path.name for path in fresh.iterdir() if path.is_file()))
        if self.checkpoint_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.checkpoint_dir, old)
        os.replace(fresh, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.checkpoint_seconds += time.perf_counter() - started

    def start_clock(self) -> None:
        self.started = time.perf_counter()
        self.eval_seconds = self.checkpoint_seconds = 0.0

    def elapsed_training(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds - self.checkpoint_seconds


def _checkpoint_dir(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        # A checkpoint directory is swapped in only when complete; a kill between the two renames leaves the
        # previous one as checkpoint.old. verify_manifest refuses one without a manifest.
        if (out / name / "progress.json").exists():
            return out / name
    return None


# Settings that do not change what a run computes: resuming with other values is allowed.
_RESUMABLE_CHANGES = ("threads", "device", "checkpoint_every")
# Settings every run written into one train_many output directory shares (what makes its rows comparable).
SHARED_FIELDS = (
    "env",
    "algo",
    "steps",
    "n_envs",
    "eval_every",
    "eval_episodes",
    "drift_parameter",
    "drift_shifts",
    "hyperparameters",
)


def _saved_settings(saved: Mapping[str, Any], run: RLRun) -> dict[str, Any]:
    """A run's saved settings, with fields added after it was saved set to their defaults."""
    defaults = RLRun(env=run.env, algo=run.algo).to_dict()
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def _refuse_other(path: Path, saved: Mapping[str, Any], run: RLRun) -> None:
    current = run.to_dict()
    keys = sorted(k for k in {*_saved_settings(saved, run), *current} if k not in _RESUMABLE_CHANGES)
    diff = _differences(_saved_settings(saved, run), current, keys)
    if diff:
        raise _OtherRun(
            f"{path} holds a run of another configuration; (saved, requested) differ in {diff}. "
            "Use another --out directory or the same settings, or pass --overwrite (overwrite=True) to retrain it."
        )


def _listed(directory: Path) -> list[str]:
    """The files a directory's manifest lists (none when it is missing or damaged: verify_manifest says which)."""
    try:
        manifest = load_json(directory / MANIFEST)
    except CorruptFileError:
        return []
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return sorted(files) if isinstance(files, dict) else []


def _start_afresh(error: CorruptFileError, out: Path) -> CorruptFileError:
    return CorruptFileError(f"{error}. To start this run afresh, remove {out} or pass --overwrite")


def _remove_run(out: Path) -> None:
    """Removes what train_run wrote into ``out`` (``overwrite``); other files stay."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    remove_temporaries(out)


def read_result(out: Path, run: RLRun | None = None) -> dict[str, Any] | None:
    """The result of the finished run in ``out`` (None when it has not finished), checked against its manifest.

    Args:
        out: a run directory written by :func:`train_run`.
        run: when given, a result of another configuration is refused.

    Raises:
        CorruptFileError: ``result.json`` or ``model.zip`` is damaged or differs from the run's ``MANIFEST.json``.
        ValueError: the result is of another configuration than ``run``.
    """
    out = Path(out)
    result_path = out / "result.json"
    if not result_path.exists():
        return None
    if (out / MANIFEST).exists():
        verify_manifest(out, sorted({*_listed(out), "model.zip", "result.json"}))
    elif (out / "model.zip").exists():
        # Killed between writing result.json and its manifest (both files were written whole, atomically).
        write_manifest(out, [name for name in FINAL_FILES if (out / name).exists()])
    result = load_json(result_path, "a finished run's result")
    if not isinstance(result, dict) or not isinstance(result.get("run"), dict) or "label" not in result:
        raise CorruptFileError(f"{result_path} is not the result of a sparseapps RL run")
    if run is not None:
        _refuse_other(result_path, result["run"], run)
    return result


def _dormant_fractions(model: BaseAlgorithm, sparsity: DynamicSparsityCallback | None) -> dict[str, float]:
    """ReDo's dormant-neuron fraction (tau 0.025) of each online network on up to 256 stored observations."""
    if isinstance(model, OffPolicyAlgorithm):
        buffer = model.replay_buffer
        if buffer is None or buffer.size() == 0 or isinstance(buffer.observations, dict):
            return {}
        samples = buffer.sample(min(256, buffer.size()))
        observations, actions = samples.observations, samples.actions
    else:
        stored = model.rollout_buffer.observations
        if isinstance(stored, dict):
            return {}
        observations = torch.as_tensor(
            stored.reshape(-1, *model.observation_space.shape)[:256], device=model.device
        )
        actions = None
    policy = model.policy
    networks: dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]
    if isinstance(model, PPO | A2C):
        networks = {"policy": (policy, (observations,))}
    elif isinstance(model, DQN):
        networks = {"q_net": (policy.q_net, (observations,))}
    else:
        networks = {
            "actor": (policy.actor, (observations,)),
            "critic": (policy.critic, (observations, actions)),
        }
    return {
        name: find_dormant_neurons(module, inputs).fraction for name, (module, inputs) in networks.items()
    }


def _resume(
    run: RLRun,
    checkpoint: Path,
    envs: Mapping[str, VecEnv | None],
    sparsity: DynamicSparsityCallback | None,
    tracker: _RunTracker,
    tensorboard_log: str,
) -> BaseAlgorithm:
    """The model of ``checkpoint`` with everything else restored: environments, engines, progress, RNGs."""
    algorithm = ALGORITHM_CLASSES[run.algo]
    off_policy = issubclass(algorithm, OffPolicyAlgorithm)
    required = {"model.zip", "run.json", "progress.json"}
    required |= {"replay_buffer.pkl"} if off_policy else set()
    required |= {"sparsity.pt"} if sparsity is not None else set()
    present = {path.name for path in checkpoint.iterdir() if path.name != MANIFEST}
    # model.zip, the replay buffer and the environments are pickles: read only what this run wrote.
    verify_manifest(checkpoint, sorted(present | required | set(_listed(checkpoint))))
    _refuse_other(checkpoint / "run.json", load_json(checkpoint / "run.json", "the run's settings"), run)
    saved = load_json(checkpoint / "progress.json", "the run's progress")
    if not isinstance(saved, dict) or not {"curve", "episodes", "next_eval", "next_checkpoint"} <= set(saved):
        raise CorruptFileError(f"{checkpoint / 'progress.json'} is not the progress of a sparseapps RL run")
    exact = (checkpoint / "environments.pkl").exists() and (checkpoint / "random_state.pt").exists()
    try:
        model = algorithm.load(
            checkpoint / "model.zip",
            env=envs["train"],
            device=run.device,
            tensorboard_log=tensorboard_log,
            force_reset=not exact,
        )
        if off_policy:
            model.load_replay_buffer(checkpoint / "replay_buffer.pkl")
    except Exception as error:  # SB3 raises many types for an archive it cannot read
        raise CorruptFileError(
            f"{checkpoint / 'model.zip'} (or its replay buffer) cannot be loaded by {algorithm.__name__}: "
            f"{type(error).__name__}: {error}"
        ) from error
    if exact:
        # After SB3's load, which reseeds the environments and the action space.
        restore_environments(model, (checkpoint / "environments.pkl").read_bytes(), envs)
        tracker.resumed_random_state = load_torch(checkpoint / "random_state.pt", "the run's random states")
    else:
        warnings.warn(
            f"{checkpoint} holds no environment or random state (written by an older sparseapps, or for "
            "environments that cannot be pickled): the environments restart and the resumed run will differ "
            "from an uninterrupted one",
            stacklevel=3,
        )
    if sparsity is not None:
        sparsity.load_state_dict(load_torch(checkpoint / "sparsity.pt", "the sparsity engines' state"))
    tracker.restore(saved, saved.get("train_seconds", 0.0))
    return model


def train_run(
    run: RLRun,
    out: Path,
    *,
    progress: Any | None = None,
    overwrite: bool = False,
    keep_replay_buffer: bool = False,
) -> dict[str, Any]:
    """Trains ``run`` into ``out`` (resuming a checkpoint there) and returns its result (also ``result.json``).

    A finished run in ``out`` is returned as it is; an unfinished one resumes from its last checkpoint, bit for bit.

    Args:
        run: what to train.
        out: the run's directory.
        progress: a progress bar (``update(n)`` per env step), or None.
        overwrite: retrain from scratch when ``out`` holds a run of another configuration or a damaged file,
            instead of refusing; removes only the files :data:`RUN_OUTPUTS` names.
        keep_replay_buffer: also write the final replay buffer (``replay_buffer.pkl``, off-policy algorithms;
            as large as the buffer) next to ``model.zip``.

    Raises:
        ValueError: the environment cannot be made or ``run.algo`` does not support its action space; ``out``
            holds a checkpoint or result of another configuration.
        CorruptFileError: a file of ``out`` is damaged or differs from the manifest written with it (a
            ``ValueError``).
    """
    check_action_space(run)
    out = Path(out)
    remove_temporaries(out)  # of a run killed while writing a file
    try:
        finished = read_result(out, run)
    except (CorruptFileError, _OtherRun) as error:
        if not overwrite:
            if isinstance(error, CorruptFileError):
                raise _start_afresh(error, out) from error
            raise
        _remove_run(out)
        finished = None
    if finished is not None:
        # Checkpoints a kill right after finishing left behind.
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        if progress is not None:
            progress.update(run.steps)
        return finished

    torch.set_num_threads(run.threads)
    set_random_seed(run.seed)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env(run)
    eval_env = (
        None if run.drift_parameter is not None else make_vec_env(run.env, n_envs=1, seed=run.seed + 10_000)
    )
    envs = {"train": env, "eval": eval_env}
    sparsity = run.callback()
    tracker = _RunTracker(run, envs, out / "checkpoint", sparsity, progress)
    checkpoint = _checkpoint_dir(out)
    if checkpoint is not None:
        try:
            model = _resume(run, checkpoint, envs, sparsity, tracker, str(out / "tb"))
        except (CorruptFileError, _OtherRun) as error:
            for opened in (env, eval_env):
                if opened is not None:
                    opened.close()
            if not overwrite:
                if isinstance(error, CorruptFileError):
                    raise _start_afresh(error, out) from error
                raise
            _remove_run(out)
            return train_run(run, out, progress=progress, keep_replay_buffer=keep_replay_buffer)
        if progress is not None:
            progress.update(model.num_timesteps)
    else:
        model = build_model(run, env, str(out / "tb"))
    callbacks: list[BaseCallback] = [tracker] if sparsity is None else [sparsity, tracker]
    tracker.start_clock()
    model.learn(
        max(run.steps - model.num_timesteps, 0),
        callback=CallbackList(callbacks),
        reset_num_timesteps=checkpoint is None,
        tb_log_name="run",
    )
    train_seconds = tracker.train_seconds_before + tracker.elapsed_training()

    result: dict[str, Any] = {"run": run.to_dict(), "label": run.label, "timesteps": model.num_timesteps}
    if eval_env is not None:
        final_mean, final_std = tracker.evaluate()
        tracker.curve.append([model.num_timesteps, final_mean])
    else:
        tail = [episode[1] for episode in tracker.episodes[-10:]]
        final_mean = statistics.fmean(tail) if tail else float("nan")
        final_std = statistics.pstdev(tail) if tail else float("nan")
    result |= {
        "final_return": final_mean,
        "final_return_std": final_std,
        "curve": tracker.curve,
        "episodes": tracker.episodes,
        "train_seconds": train_seconds,
        "steps_per_second": model.num_timesteps / train_seconds if train_seconds > 0 else None,
        "dormant_fraction": _dormant_fractions(model, sparsity),
    }
    if sparsity is not None and sparsity.engines:
        result |= {
            "density": {name: engine.density for name, engine in sparsity.engines.items()},
            "sparsity_report": {name: report.to_dict() for name, report in sparsity.report().items()},
            "training_flops": sparsity.training_flops(),
            "topology_updates": {name: len(engine.history) for name, engine in sparsity.engines.items()},
            "turnover": {
                name: [
                    sum(t["dropped"] + t["grown"] for t in update["tensors"].values())
                    / (2 * sum(t["nnz"] for t in update["tensors"].values()))
                    for update in engine.history
                ]
                for name, engine in sparsity.engines.items()
            },
        }
    schedule = run.drift_schedule()
    if schedule is not None and tracker.episodes:
        recoveries = shift_recovery(
            [e[1] for e in tracker.episodes],
            [int(e[3]) for e in tracker.episodes],
            [int(e[2]) for e in tracker.episodes],
            shift_steps={phase: schedule.shift_step(phase) for phase in range(1, len(schedule.shifts) + 1)},
        )
        result["recovery"] = [
            dataclasses.asdict(r) | {"steps_to_recover": r.steps_to_recover} for r in recoveries
        ]
    final = ["model.zip", "result.json"]
    write_atomic(out / "model.zip", lambda temporary: model.save(temporary))
    if keep_replay_buffer and isinstance(model, OffPolicyAlgorithm):
        write_atomic(out / "replay_buffer.pkl", lambda temporary: model.save_replay_buffer(temporary))
        final.append("replay_buffer.pkl")
    else:
        (out / "replay_buffer.pkl").unlink(missing_ok=True)
    write_json(out / "result.json", result)
    write_manifest(out, final)
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)
    env.close()
    if eval_env is not None:
        eval_env.close()
    return result


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: final return mean and 95% CI over seeds, and ratios to dense in the same results.

    Ratios: ``return_vs_dense`` (mean over mean; for negative returns such as Pendulum's, dense / sparse so that
    above 1 is still better), ``seconds_vs_dense`` (median training seconds), ``flops_vs_dense`` (training FLOPs
    per gradient step, from the engines' masks).
    """
    labels = list(dict.fromkeys(r["label"] for r in results))
    rows = []
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        mean, half = mean_confidence_interval([r["final_return"] for r in runs])
        rows.append(
            {
                "method": label,
                "seeds": len(runs),
                "final_return": mean,
                "ci95": half,
                "per_seed": [r["final_return"] for r in runs],
                "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "flops_ratio": runs[0]["training_flops"]["ratio"] if "training_flops" in runs[0] else 1.0,
                "density": runs[0].get("density"),
            }
        )
    dense = next((row for row in rows if row["method"] == "dense"), None)
    for row in rows:
        if dense is None:
            continue
        base = dense["final_return"]
        if base > 0:
            row["return_vs_dense"] = row["final_return"] / base
        elif row["final_return"] < 0:
            row["return_vs_dense"] = base / row["final_return"]
        else:
            row["return_vs_dense"] = None
        row["seconds_vs_dense"] = row["train_seconds"] / dense["train_seconds"]
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table of :func:`summarize`'s rows."""
    header = (
        f"{'method':<14} {'final return (95% CI)':>24} {'vs dense':>9} {'time vs dense':>14} {'FLOPs':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row.get("return_vs_dense")
        seconds = row.get("seconds_vs_dense")
        lines.append(
            f"{row['method']:<14} {row['final_return']:>12.1f} ± {row['ci95']:<9.1f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>9} {'' if seconds is None else f'{seconds:.2f}x':>14} "
            f"{row['flops_ratio']:>7.3f}"
        )
    return "\n".join(lines)


def plot_curves(results: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Learning curves: evaluation return (or training episode return for drifting runs) per method, mean over
    seeds with the range of seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label]
        if all(r["curve"] for r in runs):
            length = min(len(r["curve"]) for r in runs)
            steps = np.array([point[0] for point in runs[0]["curve"][:length]])
            values = np.array([[point[1] for point in r["curve"][:length]] for r in runs])
        else:
            steps = np.linspace(0, runs[0]["timesteps"], 41)[1:]
            values = np.array([_binned(r["episodes"], steps) for r in runs])
        mean = np.nanmean(values, axis=0)
        line = ax.plot(steps, mean, label=label, linewidth=2.2 if label == "dense" else 1.5)[0]
        ax.fill_between(
            steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.15, color=line.get_color()
        )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)


def _binned(episodes: Sequence[Sequence[float]], edges: np.ndarray) -> np.ndarray:
    """Mean training-episode return in each window ending at ``edges`` (NaN where no episode ended)."""
    values = np.full(len(edges), np.nan)
    start = 0.0
    for index, end in enumerate(edges):
        inside = [e[1] for e in episodes if start < e[0] <= end]
        if inside:
            values[index] = statistics.fmean(inside)
        start = end
    return values


def shared_settings(run: RLRun) -> dict[str, Any]:
    """The settings of ``run`` that every run in one :func:`train_many` directory shares (:data:`SHARED_FIELDS`)."""
    values = run.to_dict()
    return {name: values[name] for name in SHARED_FIELDS}


# What train_many writes into its directory: the summary and one folder per method label.
_LABELS = (*METHODS, *RL_PRESETS)
SUMMARY_OUTPUTS = ("results.json", "curves.png", *_LABELS)


def _results_on_disk(
    out: Path, settings: Mapping[str, Any], skip: set[tuple[str, int]], overwrite: bool
) -> list[dict[str, Any]]:
    """The results of runs that finished in ``out`` earlier (other methods or seeds), except the keys in ``skip``."""
    found = []
    for path in sorted(out.glob("*/seed*/result.json")):
        run_dir = path.parent
        label, seed = run_dir.parent.name, run_dir.name.removeprefix("seed")
        if label not in _LABELS or not seed.isdigit() or (label, int(seed)) in skip:
            continue
        try:
            result = read_result(run_dir)
            if result is None:  # removed since the glob
                continue
            saved = {name: result["run"].get(name) for name in SHARED_FIELDS}
            differences = _differences(saved, settings, SHARED_FIELDS)
            if differences or result["label"] != label or result["run"].get("seed") != int(seed):
                raise _OtherRun(
                    f"{path} is not a run of this directory's settings (label {label!r}, seed {seed}); (saved, "
                    f"requested) differ in {differences or {'label/seed': ((result['label'], result['run'].get('seed')), (label, int(seed)))}}"
                )
        except (CorruptFileError, _OtherRun) as error:
            if not overwrite:
                raise CorruptFileError(
                    f"{error}. It is part of the summary of {out}; remove {run_dir}, or pass --overwrite "
                    "(overwrite=True) to drop it"
                ) from error
            warnings.warn(f"removing {run_dir}, which cannot be summarized: {error}", stacklevel=3)
            _remove_run(run_dir)
            continue
        found.append(result)
    return found


def train_many(
    runs: Sequence[RLRun],
    out: Path,
    *,
    progress: bool = True,
    title: str | None = None,
    overwrite: bool = False,
    keep_replay_buffer: bool = False,
) -> dict[str, Any]:
    """Trains every run into ``out/<label>/seed<seed>`` behind one progress bar; writes ``results.json`` and
    ``curves.png`` over every finished run in ``out`` and returns that summary.

    ``out`` is claimed for the settings the runs share (:func:`shared_settings`): another call with the same
    settings may add methods or seeds (the summary then holds the earlier runs too; runs of the same method and
    seed are reused or resumed, never repeated), a call with other settings is refused.

    Args:
        runs: the runs, all with the same :func:`shared_settings`, each (method label, seed) once.
        out: the output directory.
        progress: show a progress bar.
        title: the plot's title (default: algorithm and environment).
        overwrite: replace what conflicts instead of refusing: ``out``'s summary and runs when it was written with
            other shared settings or by another tool, a run directory of another configuration, a damaged run.
        keep_replay_buffer: also keep each off-policy run's final replay buffer (see :func:`train_run`).

    Raises:
        ValueError: runs that do not share their settings, a repeated (method, seed), an environment the
            algorithm cannot train on, a damaged file (:class:`~sparseapps.core.io.CorruptFileError`).
        OutputConflictError: ``out`` holds results of other settings or of another program.
    """
    from tqdm import tqdm

    if not runs:
        raise ValueError("expected at least one run, got none")
    out = Path(out)
    keys = [(run.label, run.seed) for run in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"expected distinct (method, seed) pairs, got {keys}")
    settings = shared_settings(runs[0])
    for run in runs[1:]:
        differences = _differences(settings, shared_settings(run), SHARED_FIELDS)
        if differences:
            raise ValueError(
                f"runs written into one directory must share {', '.join(SHARED_FIELDS)}; ({runs[0].label} seed "
                f"{runs[0].seed}, {run.label} seed {run.seed}) differ in {differences}"
            )
    check_action_space(runs[0])
    claim_output(out, tool="rl train", settings=settings, outputs=SUMMARY_OUTPUTS, overwrite=overwrite)
    bar = tqdm(total=sum(run.steps for run in runs), unit="step", desc="rl train", disable=not progress)
    results = []
    try:
        for run in runs:
            bar.set_postfix_str(f"{run.label} seed {run.seed}")
            results.append(
                train_run(
                    run,
                    out / run.label / f"seed{run.seed}",
                    progress=bar,
                    overwrite=overwrite,
                    keep_replay_buffer=keep_replay_buffer,
                )
            )
    finally:
        bar.close()
    earlier = _results_on_disk(out, settings, set(keys), overwrite)
    # Dense first, then the methods found in out (by name), then this call's; seeds in order.
    order = list(dict.fromkeys(["dense", *(r["label"] for r in earlier), *(r["label"] for r in results)]))
    merged = sorted([*earlier, *results], key=lambda r: (order.index(r["label"]), r["run"]["seed"]))
    summary = {
        **settings,
        "methods": list(dict.fromkeys(r["label"] for r in merged)),
        "rows": summarize(merged),
        "runs": [{k: v for k, v in r.items() if k not in ("episodes", "sparsity_report")} for r in merged],
    }
    write_json(out / "results.json", summary)
    plot_curves(merged, out / "curves.png", title or f"{runs[0].algo.upper()} on {runs[0].env}")
    return summary
