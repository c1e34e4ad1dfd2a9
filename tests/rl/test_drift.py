"""Drifting environments: schedules, the wrapper on CartPole / Pendulum / MuJoCo, the make_vec_env factory."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from sparseapps.rl.drift import DriftSchedule, DriftWrapper, make_drifting_env

# ----------------------------------------------------------------------------------------------- schedules


def test_shift_schedule_phases_and_factors() -> None:
    schedule = DriftSchedule(shifts=[(10, 2.0), (25, 0.5)])
    assert [schedule.phase_at(s) for s in (0, 9, 10, 24, 25, 1000)] == [0, 0, 1, 1, 2, 2]
    assert [schedule.factor(p) for p in (0, 1, 2)] == [1.0, 2.0, 0.5]
    assert [schedule.shift_step(p) for p in (1, 2)] == [10, 25]
    assert schedule.shifts == ((10, 2.0), (25, 0.5))
    assert not schedule.periodic


def test_periodic_schedule_cycles_factors() -> None:
    schedule = DriftSchedule(period=4, factors=[2.0, 0.5])
    assert [schedule.phase_at(s) for s in (0, 3, 4, 7, 8, 12)] == [0, 0, 1, 1, 2, 3]
    assert [schedule.factor(p) for p in range(6)] == [1.0, 2.0, 0.5, 2.0, 0.5, 2.0]
    assert schedule.shift_step(3) == 12
    assert schedule.periodic


def test_empty_schedule_is_stationary() -> None:
    schedule = DriftSchedule()
    assert schedule.phase_at(10**9) == 0
    assert schedule.factor(0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(shifts=[(20, 2.0), (10, 0.5)]), "strictly increasing"),
        (dict(shifts=[(10, 2.0), (10, 0.5)]), "strictly increasing"),
        (dict(shifts=[(10, 0.0)]), r"shifts\[0\] factor must be a finite number > 0, got 0.0"),
        (dict(shifts=[(10, -1.5)]), "factor must be a finite number > 0, got -1.5"),
        (dict(shifts=[(10, math.nan)]), "factor must be a finite number > 0, got nan"),
        (dict(shifts=[(10, True)]), "factor must be a finite number > 0, got True"),
        (dict(shifts=[(0, 2.0)]), r"shifts\[0\] env step must be an integer >= 1, got 0"),
        (dict(shifts=[(2.5, 2.0)]), "got 2.5"),
        (dict(shifts=[(10,)]), r"\(env_step, factor\) pair"),
        (dict(shifts="10:2"), "sequence of"),
        (dict(shifts=[(10, 2.0)], period=5, factors=[2.0]), "either shifts or a period"),
        (dict(period=5), "at least one factor"),
        (dict(period=0, factors=[2.0]), "period"),
        (dict(period=5, factors=[2.0, -1.0]), r"factors\[1\]"),
        (dict(factors=[2.0]), "only used with a period"),
        (dict(timing="later"), "timing must be one of"),
    ],
)
def test_schedule_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftSchedule(**kwargs)


def test_schedule_queries_reject_bad_phases_and_steps() -> None:
    schedule = DriftSchedule(shifts=[(10, 2.0)])
    with pytest.raises(ValueError, match="env_step"):
        schedule.phase_at(-1)
    with pytest.raises(ValueError, match="at most 1"):
        schedule.factor(2)
    with pytest.raises(ValueError, match="phase 0"):
        schedule.shift_step(0)


# ----------------------------------------------------------------------------------------------- CartPole


def _cartpole_theta_dot(
    length: float, masspole: float = 0.1, masscart: float = 1.0, gravity: float = 9.8
) -> float:
    """theta_dot after one Euler step (tau 0.02) from [0, 0, 0.1, 0] pushing right (+10 N), by CartPole's equations."""
    theta, force, tau = 0.1, 10.0, 0.02
    total_mass = masspole + masscart
    temp = force / total_mass
    sin, cos = math.sin(theta), math.cos(theta)
    thetaacc = (gravity * sin - cos * temp) / (length * (4.0 / 3.0 - masspole * cos**2 / total_mass))
    return tau * thetaacc


def _step_from_tilted_state(env: gym.Env) -> float:
    env.unwrapped.state = np.array([0.0, 0.0, 0.1, 0.0])
    observation, *_ = env.step(1)
    return float(observation[3])


def test_cartpole_length_shifts_at_episode_boundary_only() -> None:
    env = DriftWrapper(gym.make("CartPole-v1"), "length", DriftSchedule(shifts=[(5, 2.0)]))
    _, info = env.reset(seed=0)
    assert (info["drift_phase"], info["drift_factor"], info["drift_env_step"]) == (0, 1.0, 0)
    for i in range(8):  # alternating pushes keep this seeded episode alive past the shift step
        _, _, terminated, truncated, info = env.step(i % 2)
        assert not (terminated or truncated)
        assert info["drift_phase"] == 0
        assert env.unwrapped.length == 0.5
    assert env.env_steps == 8
    _, info = env.reset()
    assert (info["drift_phase"], info["drift_factor"], info["drift_env_step"]) == (1, 2.0, 8)
    assert env.unwrapped.length == 1.0
    assert env.unwrapped.polemass_length == pytest.approx(0.1)  # masspole 0.1 * length 1.0
    assert _step_from_tilted_state(env) == pytest.approx(_cartpole_theta_dot(length=1.0), rel=1e-6)
    assert _step_from_tilted_state(env) != pytest.approx(_cartpole_theta_dot(length=0.5), rel=1e-3)


def test_cartpole_immediate_timing_shifts_mid_episode() -> None:
    env = DriftWrapper(
        gym.make("CartPole-v1"), "gravity", DriftSchedule(shifts=[(3, 1.5)], timing="immediate")
    )
    env.reset(seed=1)
    phases = []
    for i in range(5):
        _, _, terminated, _, info = env.step(i % 2)
        assert not terminated
        phases.append(info["drift_phase"])
    assert phases == [0, 0, 0, 1, 1]  # the 4th step (index 3) runs under the new gravity
    assert env.unwrapped.gravity == pytest.approx(9.8 * 1.5)
    assert env.phase == 1 and env.factor == 1.5


def test_cartpole_masscart_updates_total_mass_and_dynamics() -> None:
    env = DriftWrapper(gym.make("CartPole-v1"), "masscart", DriftSchedule(shifts=[(1, 3.0)]))
    env.reset(seed=0)
    env.step(0)
    env.reset()
    assert env.unwrapped.masscart == 3.0
    assert env.unwrapped.total_mass == pytest.approx(3.1)
    expected = _cartpole_theta_dot(length=0.5, masscart=3.0)
    assert _step_from_tilted_state(env) == pytest.approx(expected, rel=1e-6)


def test_reset_schedule_restores_original_values_exactly() -> None:
    env = DriftWrapper(
        gym.make("CartPole-v1"), "masspole", DriftSchedule(shifts=[(1, 4.0)], timing="immediate")
    )
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    assert env.unwrapped.masspole == pytest.approx(0.4)
    assert env.unwrapped.total_mass == pytest.approx(1.4)
    env.reset_schedule()
    assert (env.env_steps, env.phase) == (0, 0)
    assert (env.unwrapped.masspole, env.unwrapped.total_mass, env.unwrapped.polemass_length) == (
        0.1,
        1.1,
        0.05,
    )


def test_two_wrappers_on_different_parameters_compose() -> None:
    schedule = DriftSchedule(shifts=[(1, 2.0)])
    env = DriftWrapper(DriftWrapper(gym.make("CartPole-v1"), "length", schedule), "gravity", schedule)
    env.reset(seed=0)
    env.step(0)
    env.reset()
    assert (env.unwrapped.length, env.unwrapped.gravity) == (1.0, 19.6)


# ----------------------------------------------------------------------------------------------- Pendulum


def test_pendulum_periodic_mass() -> None:
    env = DriftWrapper(
        gym.make("Pendulum-v1"), "mass", DriftSchedule(period=4, factors=[2.0, 0.5], timing="immediate")
    )
    env.reset(seed=0)
    masses = []
    for _ in range(16):
        env.step(np.array([0.0], dtype=np.float32))
        masses.append(env.unwrapped.m)
    assert masses == [1.0] * 4 + [2.0] * 4 + [0.5] * 4 + [2.0] * 4


@pytest.mark.parametrize(
    ("parameter", "attribute", "expected_thdot"), [("mass", "m", 0.075), ("length", "l", 0.0375)]
)
def test_pendulum_dynamics_follow_the_scaled_parameter(
    parameter: str, attribute: str, expected_thdot: float
) -> None:
    # From th = 0, thdot = 0 with torque 1: thdot' = 3 / (m l^2) * u * dt = 3 / (m l^2) * 0.05.
    # m = 2: 0.075; l = 2: 0.0375 (gravity contributes sin(0) = 0).
    env = DriftWrapper(
        gym.make("Pendulum-v1"), parameter, DriftSchedule(shifts=[(1, 2.0)], timing="immediate")
    )
    env.reset(seed=0)
    env.step(np.array([0.0], dtype=np.float32))
    assert getattr(env.unwrapped, attribute) == 1.0  # the shift applies before the step with index 1
    env.unwrapped.state = np.array([0.0, 0.0])
    observation, *_ = env.step(np.array([1.0], dtype=np.float32))
    assert getattr(env.unwrapped, attribute) == 2.0
    assert float(observation[2]) == pytest.approx(expected_thdot, rel=1e-6)


def test_pendulum_gravity() -> None:
    env = DriftWrapper(gym.make("Pendulum-v1"), "gravity", DriftSchedule(shifts=[(2, 0.5)]))
    env.reset(seed=0)
    env.step(np.array([0.0], dtype=np.float32))
    env.step(np.array([0.0], dtype=np.float32))
    _, info = env.reset()
    assert env.unwrapped.g == pytest.approx(5.0)
    assert info["drift_factor"] == 0.5


# ----------------------------------------------------------------------------------------------- MuJoCo


@pytest.fixture
def cheetah(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., DriftWrapper]:
    pytest.importorskip("mujoco")
    monkeypatch.chdir(
        tmp_path
    )  # MuJoCo writes MUJOCO_LOG.TXT (a deprecation warning of this model) to the cwd

    def make(parameter: str, schedule: DriftSchedule, **kwargs: object) -> DriftWrapper:
        return DriftWrapper(gym.make("HalfCheetah-v5"), parameter, schedule, **kwargs)

    return make


def test_mujoco_body_mass_scales_mass_and_inertia_and_restores(cheetah: Callable[..., DriftWrapper]) -> None:
    env = cheetah("body_mass", DriftSchedule(shifts=[(3, 1.5)]))
    model = env.unwrapped.model
    mass, inertia = model.body_mass.copy(), model.body_inertia.copy()
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    _, info = env.reset()
    assert info["drift_phase"] == 1
    np.testing.assert_allclose(model.body_mass, mass * 1.5)
    np.testing.assert_allclose(model.body_inertia, inertia * 1.5)
    for _ in range(3):
        _, reward, *_ = env.step(env.action_space.sample())
        assert np.isfinite(reward)
    env.reset_schedule()
    np.testing.assert_array_equal(model.body_mass, mass)
    np.testing.assert_array_equal(model.body_inertia, inertia)


def test_mujoco_friction_on_named_geoms(cheetah: Callable[..., DriftWrapper]) -> None:
    env = cheetah("friction", DriftSchedule(shifts=[(1, 0.25)], timing="immediate"), names=["bfoot", "ffoot"])
    model = env.unwrapped.model
    friction = model.geom_friction.copy()
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.step(env.action_space.sample())
    names = [model.geom(i).name for i in range(model.ngeom)]
    for i, name in enumerate(names):
        factor = 0.25 if name in ("bfoot", "ffoot") else 1.0
        np.testing.assert_allclose(model.geom_friction[i], friction[i] * factor)


def test_mujoco_gravity_changes_the_trajectory(cheetah: Callable[..., DriftWrapper]) -> None:
    def rollout(schedule: DriftSchedule) -> np.ndarray:
        env = cheetah("gravity", schedule)
        observation, _ = env.reset(seed=0)
        for _ in range(5):
            observation, *_ = env.step(np.zeros(env.action_space.shape))
        return observation

    stationary = rollout(DriftSchedule())
    heavier = rollout(DriftSchedule(shifts=[(1, 3.0)], timing="immediate"))
    assert not np.allclose(stationary, heavier)


def test_mujoco_rejects_unknown_names_and_parameters(cheetah: Callable[..., DriftWrapper]) -> None:
    with pytest.raises(ValueError, match=r"HalfCheetah-v5 has no body named \['tail'\]"):
        cheetah("body_mass", DriftSchedule(), names=["tail"])
    with pytest.raises(ValueError, match="gravity is global"):
        cheetah("gravity", DriftSchedule(), names=["torso"])
    with pytest.raises(ValueError, match=r"HalfCheetah-v5.*'length'"):
        cheetah("length", DriftSchedule())


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("env_id", "parameter", "message"),
    [
        ("Acrobot-v1", "length", r"Acrobot-v1 \(AcrobotEnv\) is not supported.*'length'"),
        ("MountainCar-v0", "gravity", r"MountainCar-v0 \(MountainCarEnv\) is not supported.*'gravity'"),
        ("CartPole-v1", "friction", r"CartPole-v1 \(CartPoleEnv\) has no drifting parameter 'friction'"),
        ("Pendulum-v1", "masscart", r"Pendulum-v1 \(PendulumEnv\) has no drifting parameter 'masscart'"),
    ],
)
def test_unsupported_env_or_parameter_names_both(env_id: str, parameter: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftWrapper(gym.make(env_id), parameter, DriftSchedule())


def test_wrapper_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="names only select MuJoCo"):
        DriftWrapper(gym.make("CartPole-v1"), "length", DriftSchedule(), names=["pole"])
    with pytest.raises(TypeError, match="DriftSchedule"):
        DriftWrapper(gym.make("CartPole-v1"), "length", [(10, 2.0)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="parameter must be a string"):
        DriftWrapper(gym.make("CartPole-v1"), 3, DriftSchedule())  # type: ignore[arg-type]
    inner = DriftWrapper(gym.make("CartPole-v1"), "length", DriftSchedule())
    with pytest.raises(ValueError, match="already drifts 'length'"):
        DriftWrapper(inner, "length", DriftSchedule())


# ----------------------------------------------------------------------------------------------- factory


def test_make_drifting_env_is_seeded() -> None:
    schedule = DriftSchedule(shifts=[(5, 2.0)])
    first = make_drifting_env("CartPole-v1", "length", schedule, seed=3)
    second = make_drifting_env("CartPole-v1", "length", schedule, seed=3)
    np.testing.assert_array_equal(first.reset()[0], second.reset()[0])
    assert first.action_space.sample() == second.action_space.sample()
    with pytest.raises(ValueError, match="seed"):
        make_drifting_env("CartPole-v1", "length", schedule, seed=1.5)  # type: ignore[arg-type]


def test_make_drifting_env_with_make_vec_env() -> None:
    from stable_baselines3.common.env_util import make_vec_env

    schedule = DriftSchedule(shifts=[(3, 2.0)], timing="immediate")
    venv = make_vec_env(
        make_drifting_env,
        n_envs=2,
        seed=0,
        env_kwargs=dict(env_id="CartPole-v1", parameter="length", schedule=schedule),
    )
    venv.reset()
    seen = []
    for _ in range(4):
        _, _, _, infos = venv.step(np.array([0, 1]))
        seen.append([info["drift_phase"] for info in infos])
    assert seen == [[0, 0], [0, 0], [0, 0], [1, 1]]
    assert venv.get_attr("length") == [1.0, 1.0]
    venv.close()
