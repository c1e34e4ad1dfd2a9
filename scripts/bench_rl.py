"""Dense vs static sparse vs dynamic sparse (RigL) SB3 agents at 90% sparsity, side by side in one run.

Suites (each: dense, static and rigl, the same seeds, the same algorithm hyperparameters):

  sac-pendulum    SAC on Pendulum-v1 (rl-zoo3 lr 1e-3), 15k steps, 30 evaluation episodes; RigL with
                  Graesser et al.'s SAC schedule: every 1000 gradient steps, drop 0.5 cosine, last update at 80%
  sac-pendulum-98 the same at 98% sparsity, sharing sac-pendulum's dense runs (a harder setting, reported in
                  addition to the 90% rows; added after the 90% rows tied)
  ppo-cartpole    PPO on CartPole-v1 (SB3 defaults), RigL every 250 gradient steps (Graesser et al.'s PPO interval)
  ppo-cartpole-98 the same at 98% sparsity, sharing ppo-cartpole's dense runs (a harder setting, reported in
                  addition to the 90% rows)
  dqn-cartpole    DQN on CartPole-v1 (rl-zoo3 hyperparameters), RigL every 1000 gradient steps
  drift-cartpole  PPO on CartPole-v1 whose pole length drifts (x0.25, then x4 of the original), steps to recover
                  after each shift measured on the training episodes (90% of the pre-shift level, window 10)
  sac-halfcheetah (--slow) SAC on HalfCheetah-v5 (rl-zoo3: 10k random steps first), 200k steps or
                  --slow-steps, evaluations at every tenth; RigL on Graesser et al.'s SAC schedule as above

    .venv/bin/python scripts/bench_rl.py --workers 1   # every suite, seeds 10-14 (about 3 hours on one
                                                       # loaded core; see docs/rl.md for what was run)
    .venv/bin/python scripts/bench_rl.py --quick    # smoke run, 2 seeds, tiny budgets, a few minutes
    .venv/bin/python scripts/bench_rl.py --slow     # adds HalfCheetah-v5 (hours on CPU)
    .venv/bin/python scripts/bench_rl.py --slow --slow-steps 50000 --only sac-halfcheetah --seeds 3

Seeds are ``--first-seed`` (default 10) onwards; seeds 0-2 were the first benchmark's, and the changes since
(the SAC budget, schedule and evaluation episodes, the 98% suite) were fixed before any seed from 10 ran.

Printed per suite: final return (mean and 95% confidence interval over seeds; the last evaluation of
``eval_episodes`` deterministic episodes, or for the drifting suite the mean of the last 10 training episodes),
return relative to dense, median training wall-clock relative to dense (evaluation excluded), and training FLOPs
per gradient step relative to dense (from the masks). Runs are spread over ``--workers`` processes in the order
seed by seed and method by method (suites that share dense runs, seed by seed together), so dense and sparse
runs share the machine's load and a run cut short leaves whole seeds. Each run is resumable: results land in
``--out/<suite>/<method>/seed<k>/result.json`` and a rerun reuses finished runs (their wall-clock included).
``--out/results.json`` collects every number, with the goals of the issue checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseapps.core import SparsityConfig
from sparseapps.rl.train import (
    RLRun,
    format_table,
    make_sparsity_config,
    mean_confidence_interval,
    plot_curves,
    summarize,
    train_run,
)

METHODS = ("dense", "static", "rigl")
# Graesser et al.'s SAC schedule (drop fraction 0.5, cosine, last update at 80% of training; their interval of
# 1000 gradient steps is the suite's update_interval), fixed before the 15k-step runs, not tuned.
SAC_RIGL: tuple[tuple[str, Any], ...] = (("drop_fraction", 0.5), ("end_fraction", 0.8))


@dataclass(frozen=True)
class Suite:
    """One environment / algorithm pair with its budget."""

    name: str
    env: str
    algo: str
    steps: int
    update_interval: int
    eval_every: int
    drift_parameter: str | None = None
    drift_shifts: tuple[tuple[int, float], ...] = ()
    sparsity: float = 0.9
    eval_episodes: int = 10
    # SparsityConfig fields set for the rigl runs on top of the core RigL preset.
    rigl_overrides: tuple[tuple[str, Any], ...] = ()
    # Another suite whose dense runs (same env, algorithm, budget and seeds) this one shares.
    dense_from: str | None = None


def suites(quick: bool, slow: bool, slow_steps: int = 200_000) -> list[Suite]:
    if quick:
        chosen = [
            Suite("sac-pendulum", "Pendulum-v1", "sac", 600, 100, 300, rigl_overrides=SAC_RIGL),
            Suite(
                "sac-pendulum-98",
                "Pendulum-v1",
                "sac",
                600,
                100,
                300,
                sparsity=0.98,
                rigl_overrides=SAC_RIGL,
                dense_from="sac-pendulum",
            ),
            Suite("ppo-cartpole", "CartPole-v1", "ppo", 8_192, 100, 4_096),
            Suite(
                "ppo-cartpole-98",
                "CartPole-v1",
                "ppo",
                8_192,
                100,
                4_096,
                sparsity=0.98,
                dense_from="ppo-cartpole",
            ),
            Suite("dqn-cartpole", "CartPole-v1", "dqn", 5_000, 250, 2_500),
            Suite(
                "drift-cartpole",
                "CartPole-v1",
                "ppo",
                12_288,
                100,
                0,
                "length",
                ((4_096, 0.25), (8_192, 4.0)),
            ),
        ]
    else:
        chosen = [
            Suite(
                "sac-pendulum",
                "Pendulum-v1",
                "sac",
                15_000,
                1_000,
                2_500,
                eval_episodes=30,
                rigl_overrides=SAC_RIGL,
            ),
            Suite(
                "sac-pendulum-98",
                "Pendulum-v1",
                "sac",
                15_000,
                1_000,
                2_500,
                sparsity=0.98,
                eval_episodes=30,
                rigl_overrides=SAC_RIGL,
                dense_from="sac-pendulum",
            ),
            Suite("ppo-cartpole", "CartPole-v1", "ppo", 30_720, 250, 6_144),
            Suite(
                "ppo-cartpole-98",
                "CartPole-v1",
                "ppo",
                30_720,
                250,
                6_144,
                sparsity=0.98,
                dense_from="ppo-cartpole",
            ),
            Suite("dqn-cartpole", "CartPole-v1", "dqn", 50_000, 1_000, 10_000),
            Suite(
                "drift-cartpole",
                "CartPole-v1",
                "ppo",
                75_776,
                250,
                0,
                "length",
                ((26_000, 0.25), (51_000, 4.0)),
            ),
        ]
    if slow:
        chosen.append(
            Suite(
                "sac-halfcheetah",
                "HalfCheetah-v5",
                "sac",
                slow_steps,
                1_000,
                max(slow_steps // 10, 1),
                rigl_overrides=SAC_RIGL,
            )
        )
    return chosen


def sparsity_config(suite: Suite, method: str) -> SparsityConfig | None:
    """The engines' configuration of ``method`` in ``suite``: the core preset at the suite's sparsity; RigL with the
    suite's interval and overrides on top."""
    if method == "dense":
        return None
    rigl = (
        {"update_interval": suite.update_interval, **dict(suite.rigl_overrides)} if method == "rigl" else {}
    )
    return make_sparsity_config(method, sparsity=suite.sparsity, **rigl)


def make_runs(suite: Suite, seeds: Sequence[int], methods: Sequence[str] = METHODS) -> list[RLRun]:
    return [
        RLRun(
            env=suite.env,
            algo=suite.algo,
            method=method,
            sparsity=sparsity_config(suite, method),
            steps=suite.steps,
            seed=seed,
            eval_every=suite.eval_every,
            eval_episodes=suite.eval_episodes,
            checkpoint_every=0,
            drift_parameter=suite.drift_parameter,
            drift_shifts=suite.drift_shifts,
        )
        for seed in seeds
        for method in methods
    ]


def run_directory(out: Path, suite: Suite, run: RLRun) -> Path:
    """Where ``run`` of ``suite`` lands (dense runs of a suite with ``dense_from``: the other suite's)."""
    owner = suite.dense_from if run.method == "dense" and suite.dense_from is not None else suite.name
    return out / owner / run.label / f"seed{run.seed}"


def plan(
    chosen: Sequence[Suite], seeds: Sequence[int], out: Path, methods: Sequence[str] = METHODS
) -> tuple[dict[str, list[tuple[RLRun, str]]], list[tuple[RLRun, str]]]:
    """Each suite's (run, directory) pairs, and the distinct jobs in the order they run."""
    per_suite = {
        suite.name: [(run, str(run_directory(out, suite, run))) for run in make_runs(suite, seeds, methods)]
        for suite in chosen
    }
    # Suites sharing dense runs run seed by seed together, so a run cut short leaves whole seeds behind.
    groups = list(dict.fromkeys(suite.dense_from or suite.name for suite in chosen))
    keys: dict[str, tuple[int, int, int, int]] = {}
    for position, suite in enumerate(chosen):
        for index, (run, directory) in enumerate(per_suite[suite.name]):
            key = (groups.index(suite.dense_from or suite.name), run.seed, position, index)
            keys[directory] = min(key, keys.get(directory, key))
    runs = {directory: run for pairs in per_suite.values() for run, directory in pairs}
    return per_suite, [(runs[directory], directory) for directory in sorted(runs, key=keys.__getitem__)]


def _train(job: tuple[RLRun, str]) -> dict[str, Any]:
    run, directory = job
    started = time.perf_counter()
    result = train_run(run, Path(directory))
    print(
        f"  {Path(directory).parent.parent.name:<16} {run.label:<7} seed {run.seed}: return "
        f"{result['final_return']:9.1f}  train {result['train_seconds']:6.1f}s  "
        f"(wall {time.perf_counter() - started:6.1f}s)",
        flush=True,
    )
    return result


def recovery_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and shift: env steps to recover, mean over the seeds that recovered, and how many did."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label]
        n_shifts = min(len(r.get("recovery", [])) for r in runs)
        for shift in range(n_shifts):
            steps = [r["recovery"][shift]["steps_to_recover"] for r in runs]
            recovered = [s for s in steps if s is not None]
            drops = [r["recovery"][shift]["mean_after"] - r["recovery"][shift]["level_before"] for r in runs]
            rows.append(
                {
                    "method": label,
                    "shift": shift + 1,
                    "recovered": f"{len(recovered)}/{len(steps)}",
                    "steps_to_recover_mean": statistics.fmean(recovered) if recovered else None,
                    "steps_to_recover": steps,
                    "mean_change_after_shift": statistics.fmean(drops),
                }
            )
    return rows


def learning_speed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the mean of each seed's evaluation curve over the whole run (higher: learned sooner), with
    its 95% interval over seeds. A supplementary measure, added after the first fresh-seed results."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        per_seed = [statistics.fmean(p[1] for p in r["curve"]) for r in results if r["label"] == label]
        if len(per_seed) == sum(r["label"] == label for r in results):
            mean, half = mean_confidence_interval(per_seed)
            rows.append({"method": label, "curve_mean": mean, "ci95": half, "per_seed": per_seed})
    return rows


def paired_difference(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """RigL minus static, seed by seed, of :func:`summarize`'s final returns or :func:`learning_speed`'s curve
    means (the same seed gives both the same environment, initial mask and evaluation start states): mean, 95%
    interval (Student's t) and whether the interval lies above 0.

    The criterion for "RigL beats static" fixed before the confirmatory runs (docs/rl.md): a paired interval
    above zero, which pools out the per-seed spread that the unpaired intervals carry.
    """
    by_method = {row["method"]: row for row in rows}
    if "rigl" not in by_method or "static" not in by_method or len(by_method["rigl"]["per_seed"]) < 2:
        return None
    differences = [
        r - s for r, s in zip(by_method["rigl"]["per_seed"], by_method["static"]["per_seed"], strict=True)
    ]
    mean, half = mean_confidence_interval(differences)
    return {"per_seed": differences, "mean": mean, "ci95": half, "above_zero": mean - half > 0}


def goals(report: dict[str, Any]) -> list[str]:
    """The issue's goals, checked against this run's numbers."""
    lines = []
    for suite, data in report.items():
        if suite not in (
            "sac-pendulum",
            "ppo-cartpole",
            "sac-pendulum-98",
            "ppo-cartpole-98",
            "sac-halfcheetah",
        ):
            continue
        rows = {row["method"]: row for row in data.get("rows", [])}
        if "rigl" in rows and "static" in rows:
            rigl, static = rows["rigl"], rows["static"]
            ratio = rigl.get("return_vs_dense")
            beats = rigl["final_return"] > static["final_return"]
            if rigl["seeds"] > 1 and static["seeds"] > 1:
                apart = rigl["final_return"] - rigl["ci95"] > static["final_return"] + static["ci95"]
                intervals = "disjoint" if apart else "overlap"
            else:
                intervals = "n/a with one seed"
            wins = sum(r > s for r, s in zip(rigl["per_seed"], static["per_seed"], strict=True))
            goal = (
                ""
                if suite not in ("sac-pendulum", "ppo-cartpole") or ratio is None
                else f" (goal >= 0.95: {'reached' if ratio >= 0.95 else 'NOT reached'})"
            )
            paired = data.get("paired")
            paired_text = (
                ""
                if paired is None
                else f"; paired RigL - static {paired['mean']:+.1f} ± {paired['ci95']:.1f} -> "
                f"{'above 0' if paired['above_zero'] else 'NOT above 0'}"
            )
            ratio_text = "" if ratio is None else f"RigL keeps {ratio:.3f} of dense return{goal}; "
            lines.append(
                f"{suite}: {ratio_text}beats static: "
                f"{'yes' if beats else 'NO'} ({rigl['final_return']:.1f} ± {rigl['ci95']:.1f} vs "
                f"{static['final_return']:.1f} ± {static['ci95']:.1f}; 95% intervals {intervals}; "
                f"higher in {wins} of {len(rigl['per_seed'])} seeds{paired_text})"
            )
    drift = report.get("drift-cartpole", {}).get("recovery", [])
    for shift in sorted({row["shift"] for row in drift}):
        by_method = {row["method"]: row for row in drift if row["shift"] == shift}
        if "dense" in by_method and "rigl" in by_method:
            dense, rigl = by_method["dense"], by_method["rigl"]
            n_dense = sum(s is not None for s in dense["steps_to_recover"])
            n_rigl = sum(s is not None for s in rigl["steps_to_recover"])
            if n_rigl < n_dense:
                verdict = "NOT reached (fewer seeds recovered)"
            elif n_rigl == 0:
                verdict = "n/a (no seed recovered)"
            elif n_dense == 0 or rigl["steps_to_recover_mean"] <= dense["steps_to_recover_mean"]:
                verdict = "reached"
            else:
                verdict = "NOT reached"
            lines.append(
                f"drift shift {shift}: steps to recover dense {dense['steps_to_recover_mean']} "
                f"({dense['recovered']}), rigl {rigl['steps_to_recover_mean']} ({rigl['recovered']}); "
                f"goal rigl <= dense: {verdict}"
            )
    for suite, data in report.items():
        rows = {row["method"]: row for row in data.get("rows", [])}
        if "rigl" in rows and "seconds_vs_dense" in rows["rigl"]:
            seconds, flops = rows["rigl"]["seconds_vs_dense"], rows["rigl"]["flops_ratio"]
            lines.append(
                f"{suite}: RigL wall-clock {seconds:.2f}x dense (goal <= 1.15: "
                f"{'reached' if seconds <= 1.15 else 'NOT reached'}), training FLOPs {flops:.3f}x dense "
                f"(goal <= 0.2: {'reached' if flops <= 0.2 else 'NOT reached'})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (about 2 minutes)")
    parser.add_argument("--slow", action="store_true", help="add SAC on HalfCheetah-v5")
    parser.add_argument(
        "--slow-steps", type=int, default=200_000, help="env steps of the --slow suite (default 200k)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5, quick 2)")
    parser.add_argument(
        "--first-seed", type=int, default=10, help="first seed (default 10; seeds 0-2 were the first run's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel training processes")
    parser.add_argument("--only", nargs="*", default=None, help="suite names to run")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="methods to run (default all; without dense no ratios to dense are printed)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default runs/bench_rl[_quick])"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    out = args.out or Path("runs/bench_rl_quick" if args.quick else "runs/bench_rl")
    if args.slow_steps < 1:
        print(f"error: --slow-steps must be >= 1, got {args.slow_steps}", file=sys.stderr)
        return 2
    if seeds < 1 or args.workers < 1 or args.first_seed < 0:
        print(
            f"error: --seeds and --workers must be >= 1 and --first-seed >= 0, got {seeds}, {args.workers} "
            f"and {args.first_seed}",
            file=sys.stderr,
        )
        return 2
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    chosen = [
        s for s in suites(args.quick, args.slow, args.slow_steps) if args.only is None or s.name in args.only
    ]
    if not chosen:
        print(f"error: no suite matches --only {args.only}", file=sys.stderr)
        return 2
    per_suite, jobs = plan(chosen, seed_list, out, args.methods)
    print(f"{len(jobs)} runs on {args.workers} worker(s), writing {out}", flush=True)
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        finished = dict(zip((d for _, d in jobs), pool.map(_train, jobs), strict=True))
    report: dict[str, Any] = {}
    for suite in chosen:
        mine = [finished[directory] for _, directory in per_suite[suite.name]]
        rows = summarize(mine)
        report[suite.name] = {"suite": suite.__dict__, "seeds": seed_list, "rows": rows}
        print(
            f"\n{suite.name}: {suite.algo.upper()} on {suite.env}, {suite.steps} steps, seeds {seed_list}, "
            f"{suite.sparsity:.0%} sparsity"
        )
        print(format_table(rows))
        paired = paired_difference(rows)
        if paired is not None:
            report[suite.name]["paired"] = paired
            print(
                f"paired RigL - static final return: {paired['mean']:+.1f} ± {paired['ci95']:.1f} (95% CI; "
                f"per seed {', '.join(f'{d:+.1f}' for d in paired['per_seed'])})"
            )
        if all(r["curve"] for r in mine):
            report[suite.name]["learning_speed"] = learning_speed(mine)
            paired_speed = paired_difference(report[suite.name]["learning_speed"])
            print("mean evaluation return over the run (per seed):")
            for row in report[suite.name]["learning_speed"]:
                seeds_text = ", ".join(f"{v:.1f}" for v in row["per_seed"])
                print(f"  {row['method']:<7} {row['curve_mean']:9.1f} ± {row['ci95']:<7.1f} ({seeds_text})")
            if paired_speed is not None:
                report[suite.name]["paired_learning_speed"] = paired_speed
                print(
                    f"  paired RigL - static: {paired_speed['mean']:+.1f} ± {paired_speed['ci95']:.1f} (95% CI; "
                    f"{'above 0' if paired_speed['above_zero'] else 'NOT above 0'})"
                )
        if suite.drift_parameter is not None:
            report[suite.name]["recovery"] = recovery_table(mine)
            for row in report[suite.name]["recovery"]:
                print(
                    f"  shift {row['shift']} {row['method']:<7} recovered {row['recovered']}, steps to recover "
                    f"{row['steps_to_recover']}, mean return change right after the shift "
                    f"{row['mean_change_after_shift']:.1f}"
                )
        plot_curves(
            mine, out / suite.name / "curves.png", f"{suite.algo.upper()} on {suite.env} ({suite.name})"
        )
    checks = goals(report)
    print("\ngoals")
    for line in checks:
        print(f"  {line}")
    elapsed = time.perf_counter() - started
    print(f"\ntotal wall-clock {elapsed / 60:.1f} min")
    summary = {
        "command": " ".join(["scripts/bench_rl.py", *(argv if argv is not None else sys.argv[1:])]),
        "seeds": seed_list,
        "workers": args.workers,
        "minutes": elapsed / 60,
        "suites": report,
        "goals": checks,
    }
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "results.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2))
    os.replace(temporary, out / "results.json")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
