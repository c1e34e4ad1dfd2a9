"""Training runs: an SB3 agent dense or sparse, evaluated, checkpointed, resumable; results and learning curves.

One :class:`~sparseapps.rl.run_config.RLRun` is one (environment, algorithm, sparsity configuration, seed).
:func:`train_run` trains it into a directory:

* ``tb/`` TensorBoard logs (SB3's, plus ``sparsity/*`` density and mask turnover at each topology update, and
  ``redo/*`` with ReDo),
* ``checkpoint/`` while running, every ``checkpoint_every`` steps (:mod:`sparseapps.rl.checkpoints`). Running the
  same run again resumes from it **bit for bit**: the resumed run's networks, optimizers, masks, replay buffer and
  every metric of ``result.json`` but its wall-clock fields equal those of a run never interrupted (on CPU with the
  same torch threads; see :mod:`sparseapps.rl.resume`). A different run is refused,
* ``model.zip``, ``result.json`` (with each network's density, ITOP rate, mask turnover and training FLOPs) and
  ``MANIFEST.json`` at the end (``result.json`` marks the run done; running it again returns it), and
  ``replay_buffer.pkl`` when asked to keep it.

:func:`train_many` runs several (dense and sparse, several seeds) behind one progress bar and writes
``results.json`` (:mod:`sparseapps.rl.summary`) and ``curves.png``. It claims its output directory
(:func:`sparseapps.core.io.claim_output`) for the settings all its runs share, so other methods can be added to it
later: the summary covers every finished run in the directory, never only the last call's.

A dense run may recycle neurons (``RLRun(method="dense", recycler="redo" | "cbp")``: ReDo or continual backprop
of :mod:`sparseapps.rl.plasticity`, at the papers' defaults unless ``recycler_kwargs`` says otherwise); the
recycler's state is checkpointed with the run and resumed bit for bit, and ``result.json`` counts the neurons it
recycled (``recycling``).

The public names of the modules this one was split into are importable from here too.

Example:
    >>> run = RLRun(env="CartPole-v1", algo="ppo", method="rigl", steps=50_000, seed=0)
    >>> run.label, run.sparsity_config().sparsity
    ('rigl', 0.9)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from sparseapps.core import ConfigMismatchError
from sparseapps.core.io import (
    CorruptFileError,
    claim_output,
    remove_temporaries,
    write_atomic,
    write_json,
    write_manifest,
)
from sparseapps.rl.callback import DynamicSparsityCallback
from sparseapps.rl.checkpoints import (
    FINAL_FILES,
    RUN_OUTPUTS,
    OtherRunError,
    differences,
    find_checkpoint,
    read_result,
    remove_checkpoints,
    remove_run,
    resume_model,
    start_afresh,
    write_checkpoint,
)
from sparseapps.rl.diagnostics import find_dormant_neurons, shift_recovery
from sparseapps.rl.drift import INFO_ENV_STEP, INFO_PHASE
from sparseapps.rl.plasticity import ContinualBackpropCallback, ReDoCallback
from sparseapps.rl.resume import set_random_state
from sparseapps.rl.run_config import (
    ACTION_NOISE_STD,
    ACTION_SPACES,
    ALGORITHM_CLASSES,
    METHODS,
    TUNED,
    RLRun,
    build_model,
    check_action_space,
    check_env_id,
    make_env,
    make_sparsity_config,
)
from sparseapps.rl.summary import (
    SHARED_FIELDS,
    SUMMARY_OUTPUTS,
    format_table,
    mean_confidence_interval,
    plot_curves,
    results_on_disk,
    shared_settings,
    summarize,
)

__all__ = [
    "ACTION_NOISE_STD",
    "ACTION_SPACES",
    "ALGORITHM_CLASSES",
    "FINAL_FILES",
    "METHODS",
    "RUN_OUTPUTS",
    "SHARED_FIELDS",
    "SUMMARY_OUTPUTS",
    "TUNED",
    "RLRun",
    "build_model",
    "check_action_space",
    "check_env_id",
    "format_table",
    "make_env",
    "make_sparsity_config",
    "mean_confidence_interval",
    "plot_curves",
    "read_result",
    "shared_settings",
    "summarize",
    "train_many",
    "train_run",
]


class _RunTracker(BaseCallback):
    """Evaluates, records training episodes, advances the progress bar and writes checkpoints."""

    def __init__(
        self,
        run: RLRun,
        envs: Mapping[str, VecEnv | None],
        checkpoint_dir: Path,
        sparsity: DynamicSparsityCallback | None,
        progress: Any | None,
        recycler: ReDoCallback | ContinualBackpropCallback | None = None,
    ) -> None:
        super().__init__()
        self.run = run
        self.recycler = recycler
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
        self.environments_saved = True

    def state(self) -> dict[str, Any]:
        return {
            "curve": self.curve,
            "episodes": self.episodes,
            "next_eval": self.next_eval,
            "next_checkpoint": self.next_checkpoint,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.curve, self.episodes = list(state["curve"]), list(state["episodes"])
        self.next_eval, self.next_checkpoint = state["next_eval"], state["next_checkpoint"]
        self.train_seconds_before = state.get("train_seconds", 0.0)

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
        # SB3 hands the step's infos to callbacks only through locals (no attribute holds them).
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
            if self.eval_env is not None and self.num_timesteps < self.run.steps:  # the last runs after learn
                self.curve.append([self.num_timesteps, self.evaluate()[0]])
        return True

    def _on_rollout_start(self) -> None:
        if self.resumed_random_state is not None:
            set_random_state(self.model, self.resumed_random_state)
            self.resumed_random_state = None
        if self.num_timesteps >= self.next_checkpoint and self.num_timesteps < self.run.steps:
            while self.next_checkpoint <= self.num_timesteps:
                self.next_checkpoint += self.run.checkpoint_every
            started = time.perf_counter()
            progress = {**self.state(), "train_seconds": self.train_seconds_before + self.elapsed_training()}
            self.environments_saved &= write_checkpoint(
                self.checkpoint_dir,
                self.model,
                self.run,
                self.envs,
                self.sparsity,
                progress,
                warn=self.environments_saved,
                recycler=self.recycler,
            )
            self.checkpoint_seconds += time.perf_counter() - started

    def start_clock(self) -> None:
        self.started = time.perf_counter()
        self.eval_seconds = self.checkpoint_seconds = 0.0

    def elapsed_training(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds - self.checkpoint_seconds


def _dormant_fractions(model: BaseAlgorithm) -> dict[str, float]:
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


def _sparsity_results(sparsity: DynamicSparsityCallback) -> dict[str, Any]:
    """Per network: density, ITOP rate (dynamic methods), the sparsity report, topology updates and turnover."""
    engines, reports = sparsity.engines, sparsity.report()
    results: dict[str, Any] = {
        "density": {name: engine.density for name, engine in engines.items()},
        "sparsity_report": {name: report.to_dict() for name, report in reports.items()},
        "training_flops": sparsity.training_flops(),
        "topology_updates": {name: len(engine.history) for name, engine in engines.items()},
        "turnover": {
            name: [
                sum(t["dropped"] + t["grown"] for t in update["tensors"].values())
                / (2 * sum(t["nnz"] for t in update["tensors"].values()))
                for update in engine.history
            ]
            for name, engine in engines.items()
        },
    }
    if all(engine.config.dynamic for engine in engines.values()):
        results["itop_rate"] = {name: report.itop_rate for name, report in reports.items()}
    return results


def _recycling_results(run: RLRun, recycler: ReDoCallback | ContinualBackpropCallback) -> dict[str, Any]:
    """Neurons the recycler recycled per network, and ReDo's rounds (network, gradient step, dormant fraction)."""
    if isinstance(recycler, ReDoCallback):
        neurons = {name: 0 for name in recycler.networks}
        for entry in recycler.history:
            neurons[entry["network"]] = neurons.get(entry["network"], 0) + sum(entry["recycled"].values())
        rounds = [[entry["network"], entry["step"], entry["dormant_fraction"]] for entry in recycler.history]
        return {"recycler": run.recycler, "neurons": neurons, "rounds": rounds}
    return {"recycler": run.recycler, "neurons": dict(recycler.n_replaced)}


def _recovery(run: RLRun, episodes: Sequence[Sequence[float]]) -> list[dict[str, Any]] | None:
    """Return before and after each drift shift, and the steps to recover (drifting runs)."""
    schedule = run.drift_schedule()
    if schedule is None or not episodes:
        return None
    recoveries = shift_recovery(
        [e[1] for e in episodes],
        [int(e[3]) for e in episodes],
        [int(e[2]) for e in episodes],
        shift_steps={phase: schedule.shift_step(phase) for phase in range(1, len(schedule.shifts) + 1)},
    )
    return [dataclasses.asdict(r) | {"steps_to_recover": r.steps_to_recover} for r in recoveries]


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
    except (CorruptFileError, OtherRunError) as error:
        if not overwrite:
            if isinstance(error, CorruptFileError):
                raise start_afresh(error, out) from error
            raise
        remove_run(out)
        finished = None
    if finished is not None:
        remove_checkpoints(out)
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
    recycler = run.recycler_callback()
    tracker = _RunTracker(run, envs, out / "checkpoint", sparsity, progress, recycler)
    checkpoint = find_checkpoint(out)
    try:
        if checkpoint is None:
            model = build_model(run, env, str(out / "tb"))
        else:
            model, saved, tracker.resumed_random_state = resume_model(
                run, checkpoint, envs, sparsity, str(out / "tb"), recycler
            )
            tracker.restore(saved)
            if progress is not None:
                progress.update(model.num_timesteps)
        callbacks: list[BaseCallback] = [c for c in (sparsity, recycler) if c is not None] + [tracker]
        tracker.start_clock()
        model.learn(
            max(run.steps - model.num_timesteps, 0),
            callback=CallbackList(callbacks),
            reset_num_timesteps=checkpoint is None,
            tb_log_name="run",
        )
    except (CorruptFileError, OtherRunError, ConfigMismatchError) as error:
        for opened in (env, eval_env):
            if opened is not None:
                opened.close()
        if checkpoint is None:
            raise
        if not overwrite:
            if isinstance(error, ConfigMismatchError):  # an engine refused the checkpoint's sparsity state
                error = CorruptFileError(f"{checkpoint / 'sparsity.pt'} does not fit this run: {error}")
            if isinstance(error, CorruptFileError):
                raise start_afresh(error, out) from error
            raise
        remove_run(out)
        return train_run(run, out, progress=progress, keep_replay_buffer=keep_replay_buffer)
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
        "dormant_fraction": _dormant_fractions(model),
    }
    if sparsity is not None and sparsity.engines:
        result |= _sparsity_results(sparsity)
    if recycler is not None:
        result["recycling"] = _recycling_results(run, recycler)
    recovery = _recovery(run, tracker.episodes)
    if recovery is not None:
        result["recovery"] = recovery
    final = ["model.zip", "result.json"]
    write_atomic(out / "model.zip", lambda temporary: model.save(temporary))
    if keep_replay_buffer and isinstance(model, OffPolicyAlgorithm):
        write_atomic(out / "replay_buffer.pkl", lambda temporary: model.save_replay_buffer(temporary))
        final.append("replay_buffer.pkl")
    else:
        (out / "replay_buffer.pkl").unlink(missing_ok=True)
    write_json(out / "result.json", result)
    write_manifest(out, final)
    remove_checkpoints(out)
    env.close()
    if eval_env is not None:
        eval_env.close()
    return result


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
        differ = differences(settings, shared_settings(run), SHARED_FIELDS)
        if differ:
            raise ValueError(
                f"runs written into one directory must share {', '.join(SHARED_FIELDS)}; ({runs[0].label} seed "
                f"{runs[0].seed}, {run.label} seed {run.seed}) differ in {differ}"
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
    earlier = results_on_disk(out, settings, set(keys), overwrite)
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
