"""The long-drift plasticity suite (issue 19): environments that shift 8 times, the methods compared, the seeds,
one cell's runner, and the registered comparisons with a Holm correction.

Environments (each run faces ``len(factors)`` = 8 shifts, one every ``phase_steps`` env steps, applied at the next
episode boundary; the factors are log-uniform draws from ``numpy.random.default_rng(19)``, fixed here for every
seed and method):

====================  ==========  ======================================================  ============  ==========
name                  algorithm   shift                                                   phase steps   total
====================  ==========  ======================================================  ============  ==========
``cartpole-length``   PPO, ReLU   pole length x factor, factors in [0.25, 4]               20,480        184,320
``cartpole-permuted`` PPO, ReLU   observation vector permuted anew (seeded per phase)     20,480        184,320
``pendulum-mass``     SAC         pendulum mass x factor, factors in [0.5, 2]              2,000         18,000
====================  ==========  ======================================================  ============  ==========

PPO uses SB3's defaults (hidden layers 64 x 64) with ReLU hidden activations (SB3's default is tanh; ReDo's
dormancy test and continual backprop's utility assume ReLU units, and Dohare et al.'s PPO used ReLU); SAC uses
rl-zoo3's Pendulum learning rate (``run_config.TUNED``) and hidden layers 64 x 64 instead of SB3's 256 x 256 (about
5x cheaper per step, measured here, which is what lets the suite fit a few hours; every environment then has the
same hidden width, so dormant fractions and sranks compare across them). Methods (:data:`METHODS`): ``dense``, ``dense-redo`` (:class:`~sparseapps.rl.plasticity.
ReDoCallback`, every 1000 gradient steps, tau 0.025), ``dense-cbp`` (:class:`~sparseapps.rl.plasticity.
ContinualBackpropCallback`, official RL defaults), and at 90% sparsity through the
:class:`~sparseapps.rl.callback.DynamicSparsityCallback`: ``static``, ``set``, ``rigl`` and ``rigl-dormant`` (RigL
whose growth ranks connections into ReDo-dormant neurons first: grow criterion ``dormant_gradient``). The dynamic
methods update the topology through the whole run (``end_fraction=1.0``) with a constant drop fraction of 0.3: a
drifting stream has no end of training for a cosine decay to aim at, and topology must still move at the last
shift. Topology updates every 250 gradient steps for PPO and 1000 for SAC (Graesser et al. 2022's intervals).

Example:
    >>> env = ENVS["cartpole-length"]
    >>> env.total_steps, env.shift_steps[:2], METHODS["rigl-dormant"].sparsity_config(env).grow
    (184320, (20480, 40960), 'dormant_gradient')
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sparseapps.core import SparsityConfig
from sparseapps.core.options import torch_threads
from sparseapps.core.stats import paired_interval
from sparseapps.core.validation import check_choice, check_int
from sparseapps.rl.diagnostics import DORMANT_TAU
from sparseapps.rl.drift import INFO_ENV_STEP, INFO_PHASE, DriftSchedule, make_drifting_env
from sparseapps.rl.networks import find_networks
from sparseapps.rl.plasticity import (
    REDO_INTERVAL,
    ContinualBackpropCallback,
    PermutedObservations,
    ReDoCallback,
    buffer_batch,
    network_snapshot,
    phase_metrics,
)
from sparseapps.rl.run_config import RLRun, build_model, make_sparsity_config

__all__ = [
    "ENVS",
    "METHODS",
    "QUICK_ENVS",
    "SEEDS",
    "SPARSITY",
    "Comparison",
    "PlasticityEnv",
    "PlasticityMethod",
    "cell_settings",
    "compare",
    "holm_adjust",
    "registered_comparisons",
    "run_cell",
]

#: The registered seeds (never used by another benchmark of this package).
SEEDS = tuple(range(100, 110))
SPARSITY = 0.9
#: Episodes of the per-phase final return and of the recovery's moving averages; the share that counts as recovered.
WINDOW = 10
RECOVERY_FRACTION = 0.9
#: Observations each end-of-phase snapshot (dormant fraction, srank, weight norm) is computed on.
SNAPSHOT_BATCH = 256

Shift = Literal["drift", "permute"]
Recycler = Literal["redo", "cbp"]


@dataclass(frozen=True, kw_only=True)
class PlasticityEnv:
    """One environment of the suite: what shifts, how often, and the agent that faces it.

    Example:
        >>> env = PlasticityEnv(name="t", env_id="CartPole-v1", algo="ppo", shift="permute", factors=(1.0,) * 8,
        ...                     phase_steps=100, dst_interval=10, redo_interval=10)
        >>> env.total_steps, env.n_shifts
        (900, 8)
    """

    name: str = field(metadata={"help": "the environment's name in the suite"})
    env_id: str = field(metadata={"help": "gymnasium id"})
    algo: str = field(metadata={"help": "SB3 algorithm (ppo, sac, ...)"})
    shift: Shift = field(
        metadata={"help": "drift: a physical parameter scales; permute: observations permuted"}
    )
    parameter: str | None = field(default=None, metadata={"help": "the drifting parameter (shift='drift')"})
    factors: tuple[float, ...] = field(
        metadata={"help": "one factor per shift (permute: unused, one per shift)"}
    )
    phase_steps: int = field(metadata={"help": "env steps between shifts"})
    dst_interval: int = field(metadata={"help": "gradient steps between topology updates"})
    redo_interval: int = field(default=REDO_INTERVAL, metadata={"help": "gradient steps between ReDo rounds"})
    hyperparameters: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "SB3 constructor kwargs over the tuned defaults"}
    )
    cbp: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "ContinualBackpropCallback kwargs over its defaults"}
    )

    def __post_init__(self) -> None:
        check_choice("shift", self.shift, ("drift", "permute"))
        if (self.shift == "drift") != (self.parameter is not None):
            raise ValueError(
                f"shift='drift' needs a parameter and 'permute' none, got shift={self.shift!r}, "
                f"parameter={self.parameter!r}"
            )
        check_int("phase_steps", self.phase_steps, low=1)
        check_int("dst_interval", self.dst_interval, low=1)
        check_int("redo_interval", self.redo_interval, low=1)
        if len(self.factors) < 1 or not all(f > 0 for f in self.factors):
            raise ValueError(f"factors must be one positive number per shift, got {self.factors!r}")
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        object.__setattr__(self, "cbp", dict(self.cbp))

    @property
    def n_shifts(self) -> int:
        """Shifts in one run."""
        return len(self.factors)

    @property
    def total_steps(self) -> int:
        """Env steps of one run: ``(n_shifts + 1) * phase_steps``."""
        return (self.n_shifts + 1) * self.phase_steps

    @property
    def shift_steps(self) -> tuple[int, ...]:
        """The env step of each shift."""
        return tuple((k + 1) * self.phase_steps for k in range(self.n_shifts))

    def schedule(self) -> DriftSchedule:
        """The drift schedule (shifts at episode boundaries)."""
        return DriftSchedule(shifts=list(zip(self.shift_steps, self.factors, strict=True)))

    def make_env(self, seed: int) -> VecEnv:
        """One monitored environment copy, seeded with ``seed`` (the permutations with ``seed`` too)."""
        if self.shift == "drift":
            kwargs = {"env_id": self.env_id, "parameter": self.parameter, "schedule": self.schedule()}
            return make_vec_env(make_drifting_env, n_envs=1, seed=seed, env_kwargs=kwargs)
        schedule, env_id = self.schedule(), self.env_id

        def wrap(env: Any) -> Any:
            return PermutedObservations(env, schedule, seed)

        return make_vec_env(env_id, n_envs=1, seed=seed, wrapper_class=wrap)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (classes as their names)."""
        data = dataclasses.asdict(self)
        data["hyperparameters"] = _jsonable(self.hyperparameters)
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    return value


@dataclass(frozen=True, kw_only=True)
class PlasticityMethod:
    """One method of the suite: dense (optionally with a neuron recycler) or a sparse preset with overrides.

    Example:
        >>> METHODS["dense-redo"].recycler, METHODS["static"].sparsity_config(ENVS["pendulum-mass"]).sparsity
        ('redo', 0.9)
    """

    name: str
    preset: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    dynamic: bool = False
    recycler: Recycler | None = None

    def __post_init__(self) -> None:
        if self.recycler is not None:
            check_choice("recycler", self.recycler, ("redo", "cbp"))
            if self.preset is not None:
                raise ValueError(
                    f"method {self.name!r}: the recyclers act on dense networks, got preset {self.preset!r}"
                )

    def sparsity_config(self, env: PlasticityEnv) -> SparsityConfig | None:
        """The engines' configuration in ``env`` (None when dense)."""
        if self.preset is None:
            return None
        interval = {"update_interval": env.dst_interval} if self.dynamic else {}
        return make_sparsity_config(self.preset, sparsity=SPARSITY, **interval, **dict(self.overrides))

    def recycler_callback(self, env: PlasticityEnv, seed: int) -> BaseCallback | None:
        """The recycler of this method (None without one)."""
        if self.recycler == "redo":
            return ReDoCallback(env.redo_interval, tau=DORMANT_TAU, seed=seed)
        if self.recycler == "cbp":
            return ContinualBackpropCallback(seed=seed, **env.cbp)
        return None


# Continual topology updates: through the whole run at a constant drop fraction (see the module docstring).
_CONTINUAL = (("end_fraction", 1.0), ("drop_schedule", "constant"), ("drop_fraction", 0.3))

METHODS: dict[str, PlasticityMethod] = {
    m.name: m
    for m in (
        PlasticityMethod(name="dense"),
        PlasticityMethod(name="dense-redo", recycler="redo"),
        PlasticityMethod(name="dense-cbp", recycler="cbp"),
        PlasticityMethod(name="static", preset="static"),
        PlasticityMethod(name="set", preset="set", overrides=_CONTINUAL, dynamic=True),
        PlasticityMethod(name="rigl", preset="rigl", overrides=_CONTINUAL, dynamic=True),
        PlasticityMethod(
            name="rigl-dormant",
            preset="rigl",
            overrides=(*_CONTINUAL, ("grow", "dormant_gradient")),
            dynamic=True,
        ),
    )
}

_RELU_PPO = {"policy_kwargs": {"activation_fn": nn.ReLU}}
# Log-uniform draws from numpy.random.default_rng(19): 8 in [0.25, 4], then 8 in [0.5, 2].
CARTPOLE_LENGTH_FACTORS = (0.802, 3.257, 0.534, 0.295, 0.591, 1.831, 2.179, 1.113)
PENDULUM_MASS_FACTORS = (0.77, 1.781, 1.81, 0.916, 0.882, 1.17, 1.345, 1.181)

ENVS: dict[str, PlasticityEnv] = {
    e.name: e
    for e in (
        PlasticityEnv(
            name="cartpole-length",
            env_id="CartPole-v1",
            algo="ppo",
            shift="drift",
            parameter="length",
            factors=CARTPOLE_LENGTH_FACTORS,
            phase_steps=20_480,
            dst_interval=250,
            hyperparameters=_RELU_PPO,
        ),
        PlasticityEnv(
            name="cartpole-permuted",
            env_id="CartPole-v1",
            algo="ppo",
            shift="permute",
            factors=(1.0,) * 8,
            phase_steps=20_480,
            dst_interval=250,
            hyperparameters=_RELU_PPO,
        ),
        PlasticityEnv(
            name="pendulum-mass",
            env_id="Pendulum-v1",
            algo="sac",
            shift="drift",
            parameter="mass",
            factors=PENDULUM_MASS_FACTORS,
            phase_steps=2_000,
            dst_interval=1_000,
            hyperparameters={"policy_kwargs": {"net_arch": [64, 64]}},
        ),
    )
}

# Smoke-test versions: the same shifts on budgets of seconds, every mechanism firing (not for conclusions).
_QUICK_PPO = {"n_steps": 128, "batch_size": 64, "n_epochs": 1, "policy_kwargs": {"activation_fn": nn.ReLU}}
_QUICK_SAC = {
    "learning_starts": 64,
    "train_freq": 4,
    "batch_size": 32,
    "buffer_size": 5_000,
    "policy_kwargs": {"net_arch": [32, 32]},
}
_QUICK_CBP = {"replacement_rate": 0.01, "maturity_threshold": 5}
QUICK_ENVS: dict[str, PlasticityEnv] = {
    name: dataclasses.replace(
        env,
        phase_steps=128 if env.algo == "ppo" else 200,
        dst_interval=5,
        redo_interval=5,
        hyperparameters=_QUICK_PPO if env.algo == "ppo" else _QUICK_SAC,
        cbp=_QUICK_CBP,
    )
    for name, env in ENVS.items()
}


# ---------------------------------------------------------------------------------------------- one cell
class _PhaseTracker(BaseCallback):
    """Records training episodes and, at the first rollout end at or after each shift, a snapshot of every
    network (the state that faced the phase that just ended; off-policy it has not trained past that step)."""

    def __init__(self, env: PlasticityEnv, seed: int) -> None:
        super().__init__()
        self.env = env
        self.episodes: list[tuple[int, float, int]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.rng = np.random.default_rng(seed + 7_919)

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            episode = info.get("episode")
            if episode is not None:
                self.episodes.append(
                    (int(info.get(INFO_ENV_STEP, 0)), float(episode["r"]), int(info.get(INFO_PHASE, 0)))
                )
        return True

    def _on_rollout_end(self) -> None:
        shifts = self.env.shift_steps
        while len(self.snapshots) < len(shifts) and self.num_timesteps >= shifts[len(self.snapshots)]:
            self.snapshots.append(self.snapshot(self.model))

    def snapshot(self, model: BaseAlgorithm) -> dict[str, Any]:
        batch = buffer_batch(model, SNAPSHOT_BATCH, self.rng)
        if batch is None:
            return {}
        return {network.name: network_snapshot(network, *batch) for network in find_networks(model)}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present and len(present) == len(values) else None


def _neuron_weighted_dormant(snapshot: Mapping[str, Any]) -> float | None:
    if not snapshot:
        return None
    dormant = sum(s["dormant_fraction"] * sum(s["width"].values()) for s in snapshot.values())
    return dormant / sum(sum(s["width"].values()) for s in snapshot.values())


def cell_settings(env: PlasticityEnv, method: PlasticityMethod) -> dict[str, Any]:
    """The settings a cell's result records (JSON types: tuples as lists), to recognize results of this suite."""
    settings = {"env": env.to_dict(), "method": dataclasses.asdict(method), "sparsity": SPARSITY}
    return json.loads(json.dumps(settings))


def run_cell(env: PlasticityEnv, method: PlasticityMethod, seed: int, *, threads: int = 1) -> dict[str, Any]:
    """Trains one (environment, method, seed) cell and returns its metrics as a JSON-able dict.

    ``phases`` holds, per phase, :class:`~sparseapps.rl.plasticity.PhaseMetrics` and the end-of-phase
    ``snapshot`` of every network (dormant fraction at tau 0.025, srank and width of each hidden layer, weight
    norm); ``summary`` the cell's registered numbers: ``mean_final_return`` (primary: the mean over phases 1..8
    of the return over the last 10 episodes before the next shift), ``mean_auc``, ``mean_steps_to_recover``
    (a phase that never recovered counts its whole length), ``recovered_fraction``, ``mean_dormant_fraction``
    (over the 9 end-of-phase snapshots, neurons of all networks pooled) and ``final_dormant_fraction``.
    """
    check_int("seed", seed, low=0)
    with torch_threads(check_int("threads", threads, low=1)):  # restored after the cell
        return _train_cell(env, method, seed, threads)


def _train_cell(env: PlasticityEnv, method: PlasticityMethod, seed: int, threads: int) -> dict[str, Any]:
    """:func:`run_cell`'s training and metrics, with torch's threads already set."""
    set_random_seed(seed)
    config = method.sparsity_config(env)
    run = RLRun(
        env=env.env_id,
        algo=env.algo,
        method="dense" if config is None else (method.preset or "dense"),
        sparsity=config,
        steps=env.total_steps,
        seed=seed,
        eval_every=0,
        checkpoint_every=0,
        hyperparameters=env.hyperparameters,
        threads=threads,
    )
    venv = env.make_env(seed)
    model = build_model(run, venv, None)
    sparsity = run.callback()
    recycler = method.recycler_callback(env, seed)
    tracker = _PhaseTracker(env, seed)
    callbacks: list[BaseCallback] = [c for c in (sparsity, recycler) if c is not None] + [tracker]
    started = time.perf_counter()
    model.learn(env.total_steps, callback=CallbackList(callbacks))
    seconds = time.perf_counter() - started
    tracker.snapshots.append(tracker.snapshot(model))
    venv.close()

    steps, returns, phases = zip(*tracker.episodes, strict=True) if tracker.episodes else ((), (), ())
    metrics = phase_metrics(
        list(returns),
        list(steps),
        list(phases),
        env.shift_steps,
        env.total_steps,
        window=WINDOW,
        fraction=RECOVERY_FRACTION,
    )
    rows = [
        dataclasses.asdict(m) | {"snapshot": snap, "dormant_fraction": _neuron_weighted_dormant(snap)}
        for m, snap in zip(metrics, tracker.snapshots, strict=True)
    ]
    shifted = metrics[1:]
    censored = [
        m.steps_to_recover if m.steps_to_recover is not None else m.end_step - m.start_step
        for m in shifted
        if m.recovered is not None
    ]
    dormant = [row["dormant_fraction"] for row in rows]
    summary = {
        "mean_final_return": _mean([m.final_return for m in shifted]),
        "mean_auc": _mean([m.auc for m in shifted]),
        "mean_steps_to_recover": statistics.fmean(censored) if censored else None,
        "recovered_fraction": (
            sum(bool(m.recovered) for m in shifted if m.recovered is not None) / len(censored)
            if censored
            else None
        ),
        "mean_dormant_fraction": _mean(dormant),
        "final_dormant_fraction": dormant[-1],
    }
    result: dict[str, Any] = {
        "env": env.name,
        "method": method.name,
        "seed": seed,
        "settings": cell_settings(env, method),
        "total_steps": model.num_timesteps,
        "train_seconds": seconds,
        "steps_per_second": model.num_timesteps / seconds if seconds > 0 else None,
        "threads": threads,
        "summary": summary,
        "phases": rows,
        "episodes": [list(e) for e in tracker.episodes],
    }
    if isinstance(recycler, ReDoCallback):
        result["recycled"] = recycler.n_recycles
    elif isinstance(recycler, ContinualBackpropCallback):
        result["recycled"] = sum(recycler.n_replaced.values())
    if sparsity is not None:
        result["topology_updates"] = {name: len(engine.history) for name, engine in sparsity.engines.items()}
    return result


# ---------------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Comparison:
    """A registered paired comparison: ``metric(method) - metric(baseline)`` per seed, in ``env``.

    ``higher_is_better`` False (dormant fractions) flips the sign so that a positive difference always favours
    ``method``.
    """

    env: str
    method: str
    baseline: str
    metric: str
    higher_is_better: bool = True

    @property
    def name(self) -> str:
        """``env: method vs baseline (metric)``."""
        return f"{self.env}: {self.method} vs {self.baseline} ({self.metric})"


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` for ``None`` (a comparison with too few seeds).

    Example:
        >>> format_number(0.12345), format_number(None)
        ('0.123', 'n/a')
    """
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_table(
    rows: Sequence[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str]
) -> list[str]:
    """Markdown lines of the registered comparisons (``compare``'s dicts): seeds, mean difference, its 95% and
    Bonferroni intervals, p and Holm's p, the verdict; ``label(row)`` names each row. The benchmark scripts'
    summary tables (``bench_plasticity``, ``bench_minatar``)."""
    lines = [
        "| comparison | seeds | mean difference | 95% CI | Bonferroni CI | p | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        intervals = [
            f"[{format_number(row[key][0])}, {format_number(row[key][1])}]" if row[key] else "n/a"
            for key in ("ci95", "ci_bonferroni")
        ]
        lines.append(
            f"| {label(row)} | {len(row['seeds'])} | {format_number(row['mean'])} | {' | '.join(intervals)} | "
            f"{format_number(row['p'], 4)} | {format_number(row['p_holm'], 4)} | {row['verdict']} |"
        )
    return lines


def registered_comparisons(envs: Sequence[str] = tuple(ENVS)) -> list[Comparison]:
    """The registered family (Holm-corrected together): per environment, each DST variant (set, rigl, rigl-dormant)
    against static and against dense on ``mean_final_return``; rigl-dormant against rigl on
    ``mean_dormant_fraction`` (lower is better); dense-redo and dense-cbp against dense on ``mean_final_return``.
    Nine per environment."""
    comparisons = []
    for env in envs:
        for variant in ("set", "rigl", "rigl-dormant"):
            for baseline in ("static", "dense"):
                comparisons.append(Comparison(env, variant, baseline, "mean_final_return"))
        comparisons.append(Comparison(env, "rigl-dormant", "rigl", "mean_dormant_fraction", False))
        for recycler in ("dense-redo", "dense-cbp"):
            comparisons.append(Comparison(env, recycler, "dense", "mean_final_return"))
    return comparisons


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the input order): the ``i``-th smallest p is multiplied by
    ``m - i + 1`` (``i`` from 1), made non-decreasing along that order, capped at 1. Rejecting the hypotheses whose
    adjusted p is below ``alpha`` controls the family-wise error rate at ``alpha``.

    Example:
        >>> [round(p, 6) for p in holm_adjust([0.01, 0.04, 0.03, 0.005])]
        [0.03, 0.06, 0.06, 0.02]
    """
    values = []
    for index, p in enumerate(p_values):
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p_values[{index}] must be a probability in [0, 1], got {p!r}")
        values.append(float(p))
    m = len(values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def _paired_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0."""
    from scipy.stats import t

    n = len(differences)
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return float(2.0 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def compare(
    results: Sequence[Mapping[str, Any]],
    comparisons: Sequence[Comparison],
    *,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Each comparison's paired mean difference over the seeds both methods finished, its 95% interval (Student's t,
    unadjusted), a Bonferroni interval at ``1 - alpha / m`` (simultaneous over the ``m`` comparisons with data),
    the paired t-test p-value and its Holm adjustment across the family, and the verdict (``"better"`` or
    ``"worse"`` when the Holm-adjusted p is below ``alpha``, else ``"no difference shown"``).

    Args:
        results: cell results (:func:`run_cell`'s dicts).
        comparisons: the family.
        alpha: family-wise error rate.
    """
    cells = {(r["env"], r["method"], r["seed"]): r["summary"] for r in results}
    rows: list[dict[str, Any]] = []
    for comparison in comparisons:
        sign = 1.0 if comparison.higher_is_better else -1.0
        seeds = sorted(
            seed
            for env, method, seed in cells
            if env == comparison.env
            and method == comparison.method
            and (env, comparison.baseline, seed) in cells
            and cells[(env, method, seed)].get(comparison.metric) is not None
            and cells[(env, comparison.baseline, seed)].get(comparison.metric) is not None
        )
        differences = [
            sign
            * (
                cells[(comparison.env, comparison.method, s)][comparison.metric]
                - cells[(comparison.env, comparison.baseline, s)][comparison.metric]
            )
            for s in seeds
        ]
        rows.append(
            {
                "comparison": comparison.name,
                **dataclasses.asdict(comparison),
                "seeds": seeds,
                "differences": differences,
                "mean": statistics.fmean(differences) if differences else None,
                "ci95": paired_interval(differences),
                "p": _paired_p(differences) if len(differences) >= 2 else None,
            }
        )
    tested = [row for row in rows if row["p"] is not None]
    for row, adjusted in zip(tested, holm_adjust([row["p"] for row in tested]), strict=True):
        row["p_holm"] = adjusted
        row["ci_bonferroni"] = paired_interval(row["differences"], 1.0 - alpha / len(tested))
        row["verdict"] = (
            ("better" if row["mean"] > 0 else "worse") if adjusted < alpha else "no difference shown"
        )
    for row in rows:
        row.setdefault("p_holm", None)
        row.setdefault("ci_bonferroni", None)
        row.setdefault("verdict", "too few seeds")
    return rows
