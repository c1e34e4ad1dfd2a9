"""Environments that drift: a physical parameter is scaled on a schedule counted in environment steps.

A :class:`DriftSchedule` says when the dynamics change and by how much; a :class:`DriftWrapper` applies it to a
gymnasium environment by scaling one physical parameter from its original value:

==========================  =============  ===============================================================
environment                 parameter      what is scaled
==========================  =============  ===============================================================
CartPole (``CartPoleEnv``)  ``length``     ``length`` (half the pole), then ``polemass_length``
                            ``gravity``    ``gravity``
                            ``masscart``   ``masscart``, then ``total_mass``
                            ``masspole``   ``masspole``, then ``total_mass`` and ``polemass_length``
Pendulum (``PendulumEnv``)  ``mass``       ``m``
                            ``length``     ``l``
                            ``gravity``    ``g``
any MuJoCo env              ``body_mass``  ``model.body_mass`` and ``model.body_inertia`` (same density)
                            ``friction``   ``model.geom_friction`` (sliding, torsional and rolling)
                            ``gravity``    ``model.opt.gravity``
==========================  =============  ===============================================================

Phase ``0`` is the unmodified environment (factor 1); phase ``k`` starts at the ``k``-th shift. Every ``info``
returned by ``reset`` and ``step`` carries ``drift_phase``, ``drift_factor`` and ``drift_env_step`` so that
diagnostics (:func:`sparseapps.rl.diagnostics.shift_recovery`) can segment returns by phase.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from sparseapps.core.validation import check_choice, check_int, check_number

Timing = Literal["episode_boundary", "immediate"]
TIMINGS = ("episode_boundary", "immediate")

CARTPOLE_PARAMETERS = ("gravity", "length", "masscart", "masspole")
PENDULUM_PARAMETERS = ("gravity", "length", "mass")
MUJOCO_PARAMETERS = ("body_mass", "friction", "gravity")

_PENDULUM_ATTRIBUTES = {"mass": "m", "length": "l", "gravity": "g"}
_MUJOCO_ARRAYS = {
    "body_mass": ("body_mass", "body_inertia"),
    "friction": ("geom_friction",),
    "gravity": ("opt.gravity",),
}

INFO_PHASE = "drift_phase"
INFO_FACTOR = "drift_factor"
INFO_ENV_STEP = "drift_env_step"


@dataclass(frozen=True, kw_only=True)
class DriftSchedule:
    """When a drifting environment changes and by which factor of the original parameter value.

    Either a list of ``shifts`` (``(env_step, factor)`` pairs with strictly increasing steps) or a periodic
    schedule (``period`` and ``factors``). Steps count the wrapped environment's own steps across episodes.
    Phase 0 (before the first shift) is the original environment; phase ``k >= 1`` uses the ``k``-th shift's
    factor, or ``factors[(k - 1) % len(factors)]`` when periodic. No shifts and no period is a stationary
    control that still reports phase 0 in ``info``.

    Example:
        >>> schedule = DriftSchedule(shifts=[(10_000, 2.0), (20_000, 0.5)])
        >>> schedule.phase_at(9_999), schedule.phase_at(10_000), schedule.factor(2)
        (0, 1, 0.5)
        >>> periodic = DriftSchedule(period=5_000, factors=(1.5, 1.0))
        >>> [periodic.factor(periodic.phase_at(step)) for step in (0, 5_000, 10_000, 15_000)]
        [1.0, 1.5, 1.0, 1.5]
    """

    shifts: Sequence[tuple[int, float]] = field(
        default=(),
        metadata={"help": "(env_step, factor) pairs, steps strictly increasing; factor from that step"},
    )
    period: int | None = field(
        default=None, metadata={"help": "periodic schedule: env steps between shifts (None: use `shifts`)"}
    )
    factors: Sequence[float] = field(
        default=(), metadata={"help": "periodic schedule: factors cycled through, one per shift"}
    )
    timing: Timing = field(
        default="episode_boundary",
        metadata={
            "help": "episode_boundary: a due shift takes effect at the next reset; immediate: at the first step "
            "at or after its env step, even mid-episode"
        },
    )

    def __post_init__(self) -> None:
        check_choice("timing", self.timing, TIMINGS)
        if isinstance(self.shifts, str | bytes) or not isinstance(self.shifts, Sequence):
            raise ValueError(f"shifts must be a sequence of (env_step, factor) pairs, got {self.shifts!r}")
        shifts: list[tuple[int, float]] = []
        for index, pair in enumerate(self.shifts):
            if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"shifts[{index}]: expected an (env_step, factor) pair, got {pair!r}")
            step = check_int(f"shifts[{index}] env step", pair[0], low=1)
            factor = check_number(f"shifts[{index}] factor", pair[1], low=0.0, low_open=True)
            if shifts and step <= shifts[-1][0]:
                raise ValueError(
                    f"shifts must have strictly increasing env steps, got {step} at shifts[{index}] after "
                    f"{shifts[-1][0]} at shifts[{index - 1}]"
                )
            shifts.append((step, factor))
        object.__setattr__(self, "shifts", tuple(shifts))
        if isinstance(self.factors, str | bytes) or not isinstance(self.factors, Sequence):
            raise ValueError(f"factors must be a sequence of positive numbers, got {self.factors!r}")
        factors = tuple(
            check_number(f"factors[{i}]", f, low=0.0, low_open=True) for i, f in enumerate(self.factors)
        )
        object.__setattr__(self, "factors", factors)
        if self.period is None:
            if factors:
                raise ValueError(
                    f"factors are only used with a period, got period=None and factors={factors}"
                )
            return
        if shifts:
            raise ValueError(
                f"expected either shifts or a period, got both (shifts={shifts}, period={self.period!r})"
            )
        object.__setattr__(self, "period", check_int("period", self.period, low=1))
        if not factors:
            raise ValueError(
                f"a periodic schedule needs at least one factor, got period={self.period} and factors=()"
            )

    @property
    def periodic(self) -> bool:
        """Whether the schedule repeats every ``period`` env steps."""
        return self.period is not None

    def phase_at(self, env_step: int) -> int:
        """The phase scheduled for the environment's ``env_step``-th step (counting from 0)."""
        env_step = check_int("env_step", env_step, low=0)
        if self.period is not None:
            return env_step // self.period
        return bisect.bisect_right([step for step, _ in self.shifts], env_step)

    def factor(self, phase: int) -> float:
        """The factor applied to the original parameter value during ``phase``."""
        self._check_phase(phase)
        if phase == 0:
            return 1.0
        if self.period is not None:
            return self.factors[(phase - 1) % len(self.factors)]
        return self.shifts[phase - 1][1]

    def shift_step(self, phase: int) -> int:
        """The env step at which ``phase`` (>= 1) is scheduled to start."""
        self._check_phase(phase)
        if phase == 0:
            raise ValueError(
                "phase 0 is the original environment and starts with no shift; expected a phase >= 1"
            )
        if self.period is not None:
            return phase * self.period
        return self.shifts[phase - 1][0]

    def _check_phase(self, phase: int) -> None:
        check_int("phase", phase, low=0)
        if self.period is None and phase > len(self.shifts):
            raise ValueError(f"phase must be at most {len(self.shifts)} (the number of shifts), got {phase}")


def _env_name(env: gym.Env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


# A writer sets what one parameter scales to ``original * factor``; it captured the originals when it was made.
# Writers are small classes, not closures, so that a drifting environment pickles (a training checkpoint holds it).
Writer = Callable[[float], None]


class _AttributeWriter:
    """Sets ``unwrapped.<attribute>`` to ``original * factor`` (CartPole: and its two derived quantities)."""

    def __init__(self, unwrapped: gym.Env, attribute: str) -> None:
        self.unwrapped = unwrapped
        self.attribute = attribute
        self.original = float(getattr(unwrapped, attribute))

    def __call__(self, factor: float) -> None:
        setattr(self.unwrapped, self.attribute, self.original * factor)
        if isinstance(self.unwrapped, CartPoleEnv):
            # CartPole caches two derived quantities in __init__; its step() reads them, not the raw masses.
            self.unwrapped.total_mass = self.unwrapped.masspole + self.unwrapped.masscart
            self.unwrapped.polemass_length = self.unwrapped.masspole * self.unwrapped.length


def _cartpole_writer(env: gym.Env, unwrapped: CartPoleEnv, parameter: str) -> Writer:
    name = _env_name(env)
    for attribute in ("gravity", "length", "masscart", "masspole", "total_mass", "polemass_length"):
        if not hasattr(unwrapped, attribute):
            raise ValueError(f"{name} ({type(unwrapped).__name__}) has no attribute {attribute!r} to drift")
    return _AttributeWriter(unwrapped, parameter)


def _pendulum_writer(env: gym.Env, unwrapped: PendulumEnv, parameter: str) -> Writer:
    attribute = _PENDULUM_ATTRIBUTES[parameter]
    if not hasattr(unwrapped, attribute):
        raise ValueError(
            f"{_env_name(env)} ({type(unwrapped).__name__}) has no attribute {attribute!r} to drift"
        )
    return _AttributeWriter(unwrapped, attribute)


def _mujoco_rows(env: gym.Env, model: Any, parameter: str, names: Sequence[str] | None) -> np.ndarray | slice:
    if names is None:
        return slice(None)
    if parameter == "gravity":
        raise ValueError(
            f"names select bodies or geoms; gravity is global, expected names=None, got {names!r}"
        )
    kind, count, lookup = (
        ("body", model.nbody, model.body) if parameter == "body_mass" else ("geom", model.ngeom, model.geom)
    )
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"names must be a non-empty sequence of {kind} names, got {names!r}")
    valid = [lookup(i).name for i in range(count)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"{_env_name(env)} has no {kind} named {unknown}; expected names among {valid}")
    return np.array([valid.index(n) for n in names], dtype=np.int64)


def _model_array(model: Any, path: str) -> np.ndarray:
    holder: Any = model
    for part in path.split("."):
        holder = getattr(holder, part)
    return holder


class _MujocoWriter:
    """Sets rows of MuJoCo model arrays to ``original * factor``; the arrays are looked up at each write (they are
    views of the model's memory, which a copy of the model, e.g. a checkpoint's, does not share)."""

    def __init__(self, model: Any, paths: Sequence[str], rows: np.ndarray | slice) -> None:
        self.model = model
        self.paths = tuple(paths)
        self.rows = rows
        self.originals = [np.array(_model_array(model, path)[rows], copy=True) for path in self.paths]

    def __call__(self, factor: float) -> None:
        for path, original in zip(self.paths, self.originals, strict=True):
            _model_array(self.model, path)[self.rows] = original * factor


def _mujoco_writer(env: gym.Env, model: Any, parameter: str, names: Sequence[str] | None) -> Writer:
    rows = _mujoco_rows(env, model, parameter, names)
    for path in _MUJOCO_ARRAYS[parameter]:
        holder: Any = model
        for part in path.split("."):
            if not hasattr(holder, part):
                raise ValueError(f"{_env_name(env)}: the MuJoCo model has no attribute {path!r} to drift")
            holder = getattr(holder, part)
    return _MujocoWriter(model, _MUJOCO_ARRAYS[parameter], rows)


def _is_mujoco(unwrapped: gym.Env) -> bool:
    model = getattr(unwrapped, "model", None)
    return model is not None and all(hasattr(model, a) for a in ("body_mass", "geom_friction", "opt"))


def _make_writer(env: gym.Env, parameter: str, names: Sequence[str] | None) -> Writer:
    unwrapped = env.unwrapped
    name = _env_name(env)
    if not isinstance(parameter, str):
        raise TypeError(f"parameter must be a string, got {type(parameter).__name__} {parameter!r}")
    if isinstance(unwrapped, CartPoleEnv | PendulumEnv):
        supported = CARTPOLE_PARAMETERS if isinstance(unwrapped, CartPoleEnv) else PENDULUM_PARAMETERS
        if parameter not in supported:
            raise ValueError(
                f"{name} ({type(unwrapped).__name__}) has no drifting parameter {parameter!r}; expected one of "
                f"{', '.join(map(repr, supported))}"
            )
        if names is not None:
            raise ValueError(
                f"names only select MuJoCo bodies or geoms; {name} takes names=None, got {names!r}"
            )
        if isinstance(unwrapped, CartPoleEnv):
            return _cartpole_writer(env, unwrapped, parameter)
        return _pendulum_writer(env, unwrapped, parameter)
    if _is_mujoco(unwrapped):
        if parameter not in MUJOCO_PARAMETERS:
            raise ValueError(
                f"{name} (MuJoCo) has no drifting parameter {parameter!r}; expected one of "
                f"{', '.join(map(repr, MUJOCO_PARAMETERS))}"
            )
        return _mujoco_writer(env, unwrapped.model, parameter, names)
    raise ValueError(
        f"{name} ({type(unwrapped).__name__}) is not supported by DriftWrapper for parameter {parameter!r}: "
        "expected CartPole (gravity, length, masscart, masspole), Pendulum (gravity, length, mass) or a MuJoCo "
        "environment with env.unwrapped.model (body_mass, friction, gravity)"
    )


class DriftWrapper(gym.Wrapper):
    """Scales one physical parameter of ``env`` by the factor its :class:`DriftSchedule` gives.

    Steps are counted by this wrapper across episodes (``env_steps``). With ``timing="episode_boundary"`` a
    due shift is applied in ``reset`` before the inner environment resets; with ``"immediate"`` it is applied
    before the first step at or after its env step. Values are always ``original * factor``, so phase 0 and
    :meth:`reset_schedule` restore the original environment exactly. With several vectorized copies each copy
    counts its own steps: a shift at env step ``s`` happens near ``n_envs * s`` steps of the whole ``VecEnv``.

    Args:
        env: a CartPole, Pendulum or MuJoCo environment (possibly wrapped).
        parameter: which parameter drifts (see the module's table).
        schedule: when and by how much.
        names: MuJoCo only: the bodies (``body_mass``) or geoms (``friction``) to scale; ``None`` scales all.

    Example:
        >>> env = DriftWrapper(gym.make("CartPole-v1"), "length", DriftSchedule(shifts=[(3, 2.0)]))
        >>> _, info = env.reset(seed=0)
        >>> for _ in range(3):
        ...     _ = env.step(0)
        >>> _, info = env.reset()
        >>> info["drift_phase"], env.unwrapped.length
        (1, 1.0)
    """

    def __init__(
        self,
        env: gym.Env,
        parameter: str,
        schedule: DriftSchedule,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(env, gym.Env):
            raise TypeError(f"env must be a gymnasium.Env, got {type(env).__name__}")
        if not isinstance(schedule, DriftSchedule):
            raise TypeError(f"schedule must be a DriftSchedule, got {type(schedule).__name__}")
        inner: gym.Env | None = env
        while isinstance(inner, gym.Wrapper):
            if isinstance(inner, DriftWrapper) and inner.parameter == parameter:
                raise ValueError(
                    f"{_env_name(env)} already drifts {parameter!r} through another DriftWrapper; two schedules "
                    "on one parameter would overwrite each other"
                )
            inner = inner.env
        super().__init__(env)
        self._write = _make_writer(env, parameter, names)
        self.parameter = parameter
        self.schedule = schedule
        self._env_steps = 0
        self._phase = 0

    @property
    def env_steps(self) -> int:
        """Steps taken through this wrapper since it was built or since :meth:`reset_schedule`."""
        return self._env_steps

    @property
    def phase(self) -> int:
        """The phase in effect (0: the original environment)."""
        return self._phase

    @property
    def factor(self) -> float:
        """The factor in effect."""
        return self.schedule.factor(self._phase)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Applies any due shift, then resets the inner environment; ``info`` carries the phase."""
        self._move_to(self.schedule.phase_at(self._env_steps))
        observation, info = self.env.reset(seed=seed, options=options)
        return observation, self._annotate(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """One step under the phase in effect (moved first when ``timing="immediate"``)."""
        if self.schedule.timing == "immediate":
            self._move_to(self.schedule.phase_at(self._env_steps))
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._env_steps += 1
        return observation, reward, terminated, truncated, self._annotate(info)

    def reset_schedule(self) -> None:
        """Restarts the schedule: step count 0, phase 0 and the original parameter values restored."""
        self._env_steps = 0
        self._move_to(0)

    def _move_to(self, phase: int) -> None:
        if phase != self._phase:
            self._write(self.schedule.factor(phase))
            self._phase = phase

    def _annotate(self, info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        info[INFO_PHASE] = self._phase
        info[INFO_FACTOR] = self.factor
        info[INFO_ENV_STEP] = self._env_steps
        return info


def make_drifting_env(
    env_id: str,
    parameter: str,
    schedule: DriftSchedule,
    seed: int | None = None,
    *,
    names: Sequence[str] | None = None,
    **make_kwargs: Any,
) -> DriftWrapper:
    """``gym.make(env_id)`` wrapped in a :class:`DriftWrapper`; usable as SB3's ``make_vec_env`` factory.

    Args:
        env_id: a registered gymnasium id, e.g. ``"CartPole-v1"``, ``"Pendulum-v1"``, ``"HalfCheetah-v5"``.
        parameter: which parameter drifts.
        schedule: when and by how much.
        seed: when given, the environment is reset once with it and its action and observation spaces are
            seeded. Under ``make_vec_env`` leave it ``None`` and pass ``make_vec_env(..., seed=...)``, which
            seeds each copy with ``seed + rank``.
        names: MuJoCo only: the bodies or geoms to scale.
        **make_kwargs: passed to ``gym.make`` (``render_mode``, ``max_episode_steps``, ...).

    Example:
        >>> from stable_baselines3.common.env_util import make_vec_env
        >>> schedule = DriftSchedule(shifts=[(10_000, 2.0)])
        >>> venv = make_vec_env(make_drifting_env, n_envs=2, seed=0,
        ...                     env_kwargs=dict(env_id="CartPole-v1", parameter="length", schedule=schedule))
    """
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a registered gymnasium id (str), got {type(env_id).__name__}")
    if seed is not None:
        check_int("seed", seed)
    env = DriftWrapper(gym.make(env_id, **make_kwargs), parameter, schedule, names=names)
    if seed is not None:
        env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
        env.observation_space.seed(int(seed))
    return env
