"""One training run's settings (:class:`RLRun`), checked where they enter, and what they build: the environments,
the SB3 model and the sparsity callback.

A run contains its engines' :class:`~sparseapps.core.SparsityConfig` whole (``RLRun.sparsity``); its seed is the
run's. :func:`make_sparsity_config` builds one from a method or an RL preset with fields overridden, as the CLI does.

Example:
    >>> run = RLRun(env="CartPole-v1", algo="ppo", method="rigl", steps=50_000, seed=0)
    >>> run.label, run.sparsity.sparsity, run.sparsity_config().seed
    ('rigl', 0.9, 0)
    >>> RLRun(env="CartPole-v1", algo="ppo", sparsity=make_sparsity_config("rigl", sparsity=0.8)).sparsity.sparsity
    0.8
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.vec_env import VecEnv

from sparseapps.core import PRESETS, SparsityConfig
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.rl.callback import CALLBACK_METHODS, DynamicSparsityCallback
from sparseapps.rl.drift import DriftSchedule, make_drifting_env
from sparseapps.rl.plasticity import ContinualBackpropCallback, ReDoCallback
from sparseapps.rl.presets import RL_PRESETS, rl_preset

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
# Neuron recyclers a dense run can train with (sparseapps.rl.plasticity): none, ReDo, continual backprop.
RECYCLERS = ("none", "redo", "cbp")
# Sparsity when neither the run nor an RL preset sets one.
DEFAULT_SPARSITY = 0.9

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


def make_sparsity_config(method: str, preset: str | None = None, /, **overrides: Any) -> SparsityConfig:
    """The engine configuration of an RL preset (when given) or of the core preset ``method``, with ``overrides``
    (any :class:`SparsityConfig` field, ``method`` included) on top; the core preset's sparsity defaults to :data:`DEFAULT_SPARSITY`.

    Example:
        >>> make_sparsity_config("set", update_interval=50).update_interval
        50
        >>> make_sparsity_config("rigl", "graesser-sac").update_interval
        1000
    """
    if preset is not None:
        return rl_preset(preset, **overrides).sparsity
    check_choice("method", method, METHODS[1:])
    return SparsityConfig.preset(method, **{"sparsity": DEFAULT_SPARSITY, **overrides})


@dataclass(frozen=True, kw_only=True)
class RLRun:
    """One training run: environment, algorithm, sparse-training configuration and budget.

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
    sparsity: SparsityConfig | None = field(
        default=None,
        metadata={
            "help": "the engines' configuration (None: the preset's, or the core preset `method` at sparsity "
            "0.9; see make_sparsity_config); its seed is the run's. Must be None when method is 'dense'"
        },
    )
    critic_density_ratio: float | None = field(
        default=None, metadata={"help": "critic density / actor density (None: the preset's, or 1)"}
    )
    dense_output_layers: bool | None = field(
        default=None, metadata={"help": "keep output layers dense (None: the preset's, or True)"}
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
    recycler: str = field(
        default="none",
        metadata={
            "help": "neuron recycler of a dense run: 'none', 'redo' (ReDo, Sokar et al. 2023) or 'cbp' (continual "
            "backprop, Dohare et al. 2024), at the papers' defaults"
        },
    )
    recycler_kwargs: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "ReDoCallback / ContinualBackpropCallback kwargs over the papers' defaults (ReDo: interval, "
            "tau, batch_size, init; cbp: replacement_rate, maturity_threshold, decay_rate, init); the seed is "
            "the run's"
        },
    )

    def __post_init__(self) -> None:
        check_choice("algo", self.algo, ALGORITHM_CLASSES)
        check_choice("method", self.method, METHODS)
        if self.preset is not None:
            check_choice("preset", self.preset, RL_PRESETS)
            rl_preset(self.preset).kwargs_for(self.algo)
        if not isinstance(self.env, str) or not self.env:
            raise ValueError(f"env must be a gymnasium id, got {self.env!r}")
        check_env_id(self.env)
        for name in ("steps", "n_envs", "eval_episodes", "threads"):
            check_int(name, getattr(self, name), low=1)
        for name in ("seed", "eval_every", "checkpoint_every"):
            check_int(name, getattr(self, name), low=0)
        if self.drift_parameter is None and self.drift_shifts:
            raise ValueError(f"drift_shifts {self.drift_shifts!r} need a drift_parameter, got None")
        shifts = tuple((int(s), float(f)) for s, f in self.drift_shifts)
        object.__setattr__(self, "drift_shifts", shifts)
        if self.drift_parameter is not None:
            DriftSchedule(shifts=shifts)
        if not isinstance(self.hyperparameters, Mapping):
            raise TypeError(f"hyperparameters must be a mapping, got {self.hyperparameters!r}")
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        if self.critic_density_ratio is not None:
            check_number("critic_density_ratio", self.critic_density_ratio, low=0.0, low_open=True)
        object.__setattr__(self, "sparsity", self._checked_sparsity())
        if self.sparse:
            self.callback()  # the callback refuses the methods and settings it cannot run
        self._check_recycler()

    def _check_recycler(self) -> None:
        check_choice("recycler", self.recycler, RECYCLERS)
        if not isinstance(self.recycler_kwargs, Mapping):
            raise TypeError(f"recycler_kwargs must be a mapping, got {self.recycler_kwargs!r}")
        object.__setattr__(self, "recycler_kwargs", dict(self.recycler_kwargs))
        if self.recycler == "none":
            if self.recycler_kwargs:
                raise ValueError(
                    f"recycler_kwargs {self.recycler_kwargs!r} need a recycler, got recycler='none'"
                )
            return
        if self.sparse:
            raise ValueError(
                f"recycler {self.recycler!r} recycles neurons of dense networks, but method {self.method!r} trains "
                "sparse ones: use method='dense' with a recycler, or recycler='none' with a sparse method"
            )
        for key in ("seed", "verbose"):
            if key in self.recycler_kwargs:
                raise ValueError(
                    f"recycler_kwargs may not set {key!r} (the run's seed and verbosity are used)"
                )
        self.recycler_callback()  # the callback checks its kwargs

    def recycler_callback(self) -> ReDoCallback | ContinualBackpropCallback | None:
        """The neuron recycler of this run (None when :attr:`recycler` is ``"none"``), seeded with :attr:`seed`.

        Example:
            >>> run = RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="redo")
            >>> run.label, run.recycler_callback().interval
            ('dense-redo', 1000)
        """
        if self.recycler == "none":
            return None
        kind = ReDoCallback if self.recycler == "redo" else ContinualBackpropCallback
        try:
            return kind(seed=self.seed, **self.recycler_kwargs)
        except TypeError as error:
            raise ValueError(
                f"recycler_kwargs {self.recycler_kwargs!r} do not fit {kind.__name__}: {error}"
            ) from None

    def _checked_sparsity(self) -> SparsityConfig | None:
        config = self.sparsity
        if not self.sparse:
            if config is not None:
                raise ValueError(f"method 'dense' trains no sparse network, got sparsity={config!r}")
            return None
        if config is None:
            config = make_sparsity_config(self.method, self.preset)
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"sparsity must be a SparsityConfig or None, got {type(config).__name__}")
        if config.seed not in (None, self.seed):
            raise ValueError(f"sparsity.seed must be None or the run's seed {self.seed}, got {config.seed}")
        return config.replace(seed=None)

    @property
    def sparse(self) -> bool:
        """Whether the run trains sparse (``method="dense"`` with a preset: dense with the preset's kwargs)."""
        return self.method != "dense"

    @property
    def label(self) -> str:
        """The method's name in tables and plots: ``dense`` (``dense-redo``, ``dense-cbp`` with a recycler), else
        the preset, else the method."""
        label = self.preset if self.preset is not None and self.sparse else self.method
        return label if self.recycler == "none" else f"{label}-{self.recycler}"

    def sparsity_config(self) -> SparsityConfig | None:
        """The engine configuration (None when dense), seeded with :attr:`seed`."""
        return None if self.sparsity is None else self.sparsity.replace(seed=self.seed)

    def callback(self) -> DynamicSparsityCallback | None:
        """The sparsity callback of this run (None when dense)."""
        config = self.sparsity_config()
        if config is None:
            return None
        preset = rl_preset(self.preset) if self.preset is not None else None
        ratio, dense_outputs = self.critic_density_ratio, self.dense_output_layers
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


def upgrade_run_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved settings (:meth:`RLRun.to_dict`) in today's form.

    Runs saved before :class:`RLRun` contained a :class:`SparsityConfig` stored the sparsity and the update
    interval as fields of their own and other fields as ``sparsity_overrides``; they become the configuration
    those fields gave, so their checkpoints and results are still recognized.

    Raises:
        ValueError: the old fields name a method, preset or field that does not exist.
    """
    if "update_interval" not in saved and "sparsity_overrides" not in saved:
        return dict(saved)
    settings = {k: v for k, v in saved.items() if k not in ("update_interval", "sparsity_overrides")}
    if saved.get("method") == "dense":
        settings["sparsity"] = None
        return settings
    overrides = dict(saved.get("sparsity_overrides") or {})
    for name in ("sparsity", "update_interval"):
        if saved.get(name) is not None:
            overrides[name] = saved[name]
    config = make_sparsity_config(str(saved.get("method")), saved.get("preset"), **overrides)
    settings["sparsity"] = json.loads(json.dumps(dataclasses.asdict(config.replace(seed=None))))
    return settings


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
