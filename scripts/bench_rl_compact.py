"""Benchmark: a SAC agent 4x wider on compact sparse layers vs the dense agent, wall-clock and return side by side.

Settings, fixed before any timed run (issue 15's RL goal: the wider sparse agent trains within 1.2x of the dense
agent's wall-clock):

- environment and algorithm: SAC on Pendulum-v1, rl-zoo3's learning rate 1e-3, SB3's other defaults (batch 256,
  learning_starts 100, one gradient step per env step), ``--steps`` env steps, torch on ``--threads`` threads;
- dense: hidden layers ``--width`` (256, SB3's default), every weight trained;
- compact: hidden layers ``--wide-width`` (1024), RigL (magnitude drop, gradient growth, ERK, drop fraction 0.3
  cosine, updates every ``--update-interval`` gradient steps until 75% of training) with ``storage="compact"``
  through :class:`~sparseapps.rl.DynamicSparsityCallback`; output layers dense, as the callback's default. Its
  sparsity is computed, not chosen: the hidden (sparse) weights get the dense agent's weight count (actor and
  critic, online networks, weights without biases) less the wider agent's dense output weights, so both agents
  train the same number of weights (about 93.8% at 256 -> 1024 on Pendulum). The script prints it and the nnz;
- masked (contrast): the same wider RigL agent on the masked-dense storage (dense weights and a mask), run for
  ``--masked-steps`` env steps only (it costs the full wide dense compute); compared at that step count with the
  dense and compact runs' own elapsed time there.

Seeds are paired: seed ``k`` of each variant has the same environment and agent seed. Runs are interleaved: seed by
seed, every variant in turn, the order rotated from one seed to the next, so the machine's load lands on all alike.
Each run is timed from its training start to its end (conversion to compact layers, topology updates and SB3's
environment steps included; construction and evaluation excluded); medians over seeds, and the median of the
per-seed ratios (the goal's number). Returns: ``--eval-episodes`` deterministic episodes of a separate evaluation
environment after training (5000 steps: SAC on Pendulum is about converged there).

Writes ``results.json`` and ``results.md`` to ``--out`` after every run (a run cut short keeps what finished; a seed
counts in the ratios once its dense run is in) and prints the table.

    python scripts/bench_rl_compact.py                 # 3 seeds; ~5 min per seed on 1 thread of an AMD EPYC
    python scripts/bench_rl_compact.py --quick         # a smoke run of about a minute
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from torch import nn

from sparseapps.core import SparsityConfig
from sparseapps.core.compact import CompactLinear
from sparseapps.core.io import write_atomic, write_json
from sparseapps.core.kernels import kernel_status
from sparseapps.core.kernels.tuning import cpu_model
from sparseapps.core.options import parse_config
from sparseapps.core.stats import interval_verdict, paired_interval, paired_p_value
from sparseapps.rl import DynamicSparsityCallback
from sparseapps.rl.networks import find_networks

VARIANTS = ("dense", "compact", "masked")
GOAL = 1.2  # issue 15: the wider compact agent's wall-clock at most 1.2x the dense agent's


@dataclass(frozen=True, kw_only=True)
class Args:
    """Command-line arguments."""

    out: str = field(default="runs/bench_rl_compact", metadata={"help": "output folder"})
    quick: bool = field(default=False, metadata={"help": "a smoke run: 2 seeds, 600 steps, masked 200 steps"})
    env: str = field(default="Pendulum-v1", metadata={"help": "gymnasium environment (continuous actions)"})
    steps: int = field(default=5000, metadata={"help": "env steps of the dense and compact runs"})
    masked_steps: int = field(
        default=600, metadata={"help": "env steps of the masked-dense contrast (0: skip)"}
    )
    seeds: int = field(default=3, metadata={"help": "paired seeds (first_seed, first_seed + 1, ...)"})
    first_seed: int = field(default=0, metadata={"help": "the first seed"})
    width: int = field(default=256, metadata={"help": "hidden width of the dense agent (two hidden layers)"})
    wide_width: int = field(default=1024, metadata={"help": "hidden width of the sparse agents"})
    update_interval: int = field(
        default=250, metadata={"help": "gradient steps between RigL topology updates"}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "SAC learning rate (rl-zoo3's for Pendulum)"}
    )
    eval_episodes: int = field(
        default=10, metadata={"help": "deterministic evaluation episodes after training"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads"})
    layers_only: bool = field(
        default=False,
        metadata={"help": "only the hidden-layer cost table (seconds): where the wall-clock goes"},
    )

    def __post_init__(self) -> None:
        for name in ("steps", "seeds", "width", "wide_width", "update_interval", "eval_episodes", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.first_seed < 0:
            raise ValueError(f"expected first_seed >= 0, got {self.first_seed}")
        if not 0 <= self.masked_steps <= self.steps:
            raise ValueError(f"expected masked_steps in [0, steps={self.steps}], got {self.masked_steps}")
        if self.wide_width <= self.width:
            raise ValueError(f"expected wide_width > width={self.width}, got {self.wide_width}")
        if not self.learning_rate > 0:
            raise ValueError(f"expected learning_rate > 0, got {self.learning_rate}")


QUICK = {"steps": 600, "masked_steps": 200, "seeds": 2, "update_interval": 100, "eval_episodes": 2}


def parse_args(argv: list[str] | None = None) -> Args:
    """``--name`` per field of :class:`Args` (``sparseapps.core.options``); ``--quick`` first applies :data:`QUICK`,
    then the options given."""
    return parse_config(Args, argv, description=__doc__.splitlines()[0], quick=QUICK)


def build(args: Args, width: int, seed: int) -> SAC:
    """A SAC agent with two hidden layers of ``width`` (SB3's defaults otherwise, rl-zoo3's learning rate)."""
    return SAC(
        "MlpPolicy",
        make_vec_env(args.env, n_envs=1, seed=seed),
        learning_rate=args.learning_rate,
        policy_kwargs={"net_arch": [width, width]},
        seed=seed,
        device="cpu",
        verbose=0,
    )


def weight_counts(model: SAC) -> dict[str, int]:
    """Weights (no biases) of the online networks: all of them, and those of the callback's dense output layers."""
    total = outputs = 0
    for network in find_networks(model):
        output_layers = set(network.output_layers)
        for name, module in network.network.named_modules():
            if isinstance(module, nn.Linear):
                total += module.weight.numel()
                outputs += module.weight.numel() if f"{name}.weight" in output_layers else 0
    return {"weights": total, "output_weights": outputs, "hidden_weights": total - outputs}


def matching_sparsity(dense: dict[str, int], wide: dict[str, int]) -> float:
    """The sparsity of the wide agent's hidden weights at which it trains the dense agent's number of weights
    (its output layers stay dense).

    Example:
        >>> matching_sparsity({"weights": 100}, {"output_weights": 20, "hidden_weights": 800})
        0.9
    """
    density = (dense["weights"] - wide["output_weights"]) / wide["hidden_weights"]
    if not 0 < density <= 1:
        raise ValueError(
            f"expected the dense agent to have more weights than the wide one's outputs, got {dense}"
        )
    return round(1.0 - density, 12)


class StepClock(BaseCallback):
    """The seconds since training started when the run reaches each of ``marks`` env steps (the last: when training
    ends)."""

    def __init__(self, marks: list[int]) -> None:
        super().__init__()
        self.marks = sorted(set(marks))
        self.last = self.marks[-1]
        self.at: dict[int, float] = {}

    def _on_training_start(self) -> None:
        self.started = time.perf_counter()

    def _on_step(self) -> bool:
        if self.marks and self.num_timesteps >= self.marks[0]:
            self.at[self.marks.pop(0)] = time.perf_counter() - self.started
        return True

    def _on_training_end(self) -> None:  # the last env step's gradient step comes after its _on_step
        self.at[self.last] = time.perf_counter() - self.started


def run_one(args: Args, variant: str, seed: int, sparsity: float) -> dict[str, Any]:
    """Trains one variant for its budget and returns its times, return and weight counts."""
    torch.set_num_threads(args.threads)
    steps = args.masked_steps if variant == "masked" else args.steps
    model = build(args, args.width if variant == "dense" else args.wide_width, seed)
    clock = StepClock([args.masked_steps, steps] if args.masked_steps else [steps])
    callbacks: list[BaseCallback] = [clock]  # first: its clock starts before the layers are made compact
    sparse: DynamicSparsityCallback | None = None
    if variant != "dense":
        config = SparsityConfig.preset(
            "rigl", sparsity=sparsity, update_interval=args.update_interval, seed=seed, storage=variant
        )
        sparse = DynamicSparsityCallback(config)
        callbacks.append(sparse)
    model.learn(steps, callback=callbacks)
    seconds = clock.at[steps]
    eval_env = make_vec_env(args.env, n_envs=1, seed=seed + 10_000)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True)
    eval_env.close()
    model.get_env().close()
    record: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "seconds_at": {str(k): v for k, v in clock.at.items()},
        "return": float(mean),
        "return_std": float(std),
    }
    if sparse is not None:
        trained = sum(int(t.mask.sum()) for e in sparse.engines.values() for t in e.tensors.values())
        counts = weight_counts(model)
        record |= {
            "trained_weights": trained + counts["output_weights"],
            "density": {name: engine.density for name, engine in sparse.engines.items()},
            "topology_updates": {name: len(engine.history) for name, engine in sparse.engines.items()},
            "training_flops_ratio": sparse.training_flops()["ratio"],
            "compact_layers": sum(isinstance(m, CompactLinear) for m in model.policy.modules()),
        }
    else:
        record["trained_weights"] = weight_counts(model)["weights"]
    return record


def summarize(args: Args, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per variant, paired per-seed ratios to dense, returns side by side, and the goal's verdict."""
    dense = {r["seed"]: r for r in records if r["variant"] == "dense"}
    by = {
        v: sorted((r for r in records if r["variant"] == v and r["seed"] in dense), key=lambda r: r["seed"])
        for v in VARIANTS
    }
    summary: dict[str, Any] = {}
    for variant, rows in by.items():
        if not rows:
            continue
        mark = str(rows[0]["steps"])
        paired = [r["seconds_at"][mark] / dense[r["seed"]]["seconds_at"][mark] for r in rows]
        summary[variant] = {
            "steps": rows[0]["steps"],
            "median_seconds": statistics.median(r["seconds"] for r in rows),
            "median_dense_seconds_at_same_steps": statistics.median(
                dense[r["seed"]]["seconds_at"][mark] for r in rows
            ),
            "seconds_vs_dense_median_of_pairs": statistics.median(paired),
            "seconds_vs_dense_per_seed": paired,
            "returns": [r["return"] for r in rows],
            "mean_return": statistics.fmean(r["return"] for r in rows),
            "trained_weights": rows[0]["trained_weights"],
        }
        if variant == "compact" and args.masked_steps and args.masked_steps < args.steps:
            summary[variant]["seconds_at_masked_steps_vs_dense"] = statistics.median(
                r["seconds_at"][str(args.masked_steps)]
                / dense[r["seed"]]["seconds_at"][str(args.masked_steps)]
                for r in rows
            )
    compact = summary.get("compact")
    if compact is not None and "dense" in summary:
        compact["ratio_of_medians"] = compact["median_seconds"] / summary["dense"]["median_seconds"]
        compact["return_vs_dense"] = paired_returns(by["compact"], dense)
        summary["goal"] = {
            "limit": GOAL,
            "ratio": compact["seconds_vs_dense_median_of_pairs"],
            "met": compact["seconds_vs_dense_median_of_pairs"] <= GOAL,
        }
    return summary


def paired_returns(rows: list[dict[str, Any]], dense: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The wide agent's return minus the dense agent's, paired by seed: the differences, their mean, its 95%
    interval (Student's t; None for one seed), the two-sided paired t-test's p and the verdict ("better" / "worse"
    when the interval excludes 0, else "no difference shown")."""
    differences = [r["return"] - dense[r["seed"]]["return"] for r in rows]
    interval = paired_interval(differences)
    verdict = interval_verdict(interval, missing="no difference shown")
    return {
        "differences": differences,
        "mean": statistics.fmean(differences),
        "ci95": interval,
        "p": paired_p_value(differences),
        "verdict": verdict,
    }


def layer_costs(args: Args, repeats: int = 60) -> list[dict[str, Any]]:
    """One hidden layer's forward + backward at SAC's batch (256), interleaved, medians: the dense agent's
    ``width x width`` Linear and the wide agent's ``wide x wide`` CompactLinear holding the same number of weights
    (density ``(width / wide)^2``, uniform fan-in). GFLOP/s counts the useful work of both: ``3 * 2 * B * weights``
    (forward, input gradient, weight gradient)."""
    batch, generator = 256, torch.Generator().manual_seed(0)
    dense = nn.Linear(args.width, args.width)
    wide = nn.Linear(args.wide_width, args.wide_width)
    mask = torch.rand(wide.weight.shape, generator=generator) < (args.width / args.wide_width) ** 2
    compact = CompactLinear.from_linear(wide, mask)
    layers = {"dense": (dense, args.width), "compact": (compact, args.wide_width)}
    inputs = {
        name: torch.randn(batch, width, generator=generator, requires_grad=True)
        for name, (_, width) in layers.items()
    }
    times: dict[str, list[float]] = {name: [] for name in layers}
    for repeat in range(repeats + 5):
        for name, (layer, _) in layers.items():
            start = time.perf_counter()
            layer(inputs[name]).sum().backward()
            if repeat >= 5:
                times[name].append(time.perf_counter() - start)
    weights = {"dense": dense.weight.numel(), "compact": compact.nnz}
    rows = []
    for name in layers:
        seconds = statistics.median(times[name])
        rows.append(
            {
                "layer": name,
                "shape": f"{layers[name][1]}x{layers[name][1]}",
                "weights": weights[name],
                "ms": seconds * 1e3,
                "gflops": 6 * batch * weights[name] / seconds / 1e9,
            }
        )
    return rows


def layer_parts(args: Args, repeats: int = 60) -> list[dict[str, Any]]:
    """The three products of one hidden layer's step apart, at SAC's batch (256), interleaved, medians: the dense
    ``width x width`` Linear (GEMMs) against the compact ``wide x wide`` layer's kernels holding the same weights
    (forward ``csr_linear``, input gradient ``csr_linear`` over the transposed structure, weight gradient
    ``csr_sddmm``). Each product does ``2 * B * weights`` useful FLOPs; a sparse kernel also streams ``B`` activations
    (``4 B`` bytes) per weight, which no register blocking can share between unstructured weights."""
    batch, generator = 256, torch.Generator().manual_seed(1)
    wide = nn.Linear(args.wide_width, args.wide_width, bias=False)
    mask = torch.rand(wide.weight.shape, generator=generator) < (args.width / args.wide_width) ** 2
    layer = CompactLinear.from_linear(wide, mask)
    values = layer.values.detach()
    transposed = values.index_select(0, layer.t_order)
    weight = torch.randn(args.width, args.width, generator=generator)
    x, dy = (torch.randn(batch, args.width, generator=generator) for _ in range(2))
    xw, dyw = (torch.randn(batch, args.wide_width, generator=generator) for _ in range(2))
    ops = torch.ops.sparseapps
    parts = {
        "forward": (
            lambda: x @ weight.T,
            lambda: ops.csr_linear(xw, layer.row_ptr, values, layer.col_indices, None, None, args.wide_width),
        ),
        "input gradient": (
            lambda: dy @ weight,
            lambda: ops.csr_linear(
                dyw, layer.t_row_ptr, transposed, layer.t_indices, None, None, args.wide_width
            ),
        ),
        "weight gradient": (
            lambda: dy.T @ x,
            lambda: ops.csr_sddmm(xw, dyw, layer.row_ptr, layer.col_indices),
        ),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats + 5):
        for part, pair in parts.items():
            for name, product in zip(("dense", "compact"), pair, strict=True):
                start = time.perf_counter()
                product()
                if repeat >= 5:
                    times.setdefault((part, name), []).append(time.perf_counter() - start)
    weights = {"dense": weight.numel(), "compact": layer.nnz}
    rows = []
    for part in parts:
        ms = {name: statistics.median(times[(part, name)]) * 1e3 for name in weights}
        rows.append(
            {
                "part": part,
                **{f"{name}_ms": ms[name] for name in weights},
                **{f"{name}_gflops": 2 * batch * weights[name] / ms[name] / 1e6 for name in weights},
                "ratio": ms["compact"] / ms["dense"],
            }
        )
    return rows


def _table(title: str, header: list[str], body: list[list[str]]) -> list[str]:
    """A titled markdown table."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def parts_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["product", "dense ms", "compact ms", "dense GFLOP/s", "compact GFLOP/s", "compact / dense"]
    columns = ("dense_ms", "compact_ms", "dense_gflops", "compact_gflops")
    body = [
        [r["part"], *(f"{r[c]:.{3 if c.endswith('ms') else 1}f}" for c in columns), f"{r['ratio']:.2f}x"]
        for r in rows
    ]
    return (
        "\n".join(_table("The layer's three products apart (median of interleaved repeats):", header, body))
        + "\n"
    )


def layer_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["layer", "shape", "weights", "ms", "useful GFLOP/s"]
    body = [[r["layer"], r["shape"], str(r["weights"]), f"{r['ms']:.3f}", f"{r['gflops']:.1f}"] for r in rows]
    lines = _table(
        "Hidden layer, forward + backward at batch 256 (median of interleaved repeats):", header, body
    )
    ratio = rows[1]["ms"] / rows[0]["ms"]
    lines += ["", f"The wide compact layer costs {ratio:.2f}x the dense one for the same weights."]
    return "\n".join(lines) + "\n"


def markdown(args: Args, sparsity: float, summary: dict[str, Any], machine: dict[str, Any]) -> str:
    """The results table (and the goal) as markdown."""
    lines = [
        f"SAC on {args.env}, {args.seeds} paired seeds from {args.first_seed}, {machine['threads']} thread(s), "
        f"{machine['cpu']}",
        "",
        "| agent | hidden | sparsity | trained weights | env steps | median s | vs dense (median of pairs) "
        "| return per seed | mean return |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    widths = {"dense": args.width, "compact": args.wide_width, "masked": args.wide_width}
    for variant in VARIANTS:
        row = summary.get(variant)
        if row is None:
            continue
        returns = ", ".join(f"{r:.0f}" for r in row["returns"])
        label = {"dense": "dense", "compact": "RigL compact", "masked": "RigL masked"}[variant]
        lines.append(
            f"| {label} | {widths[variant]}x2 | {0.0 if variant == 'dense' else sparsity:.4f} "
            f"| {row['trained_weights']} | {row['steps']} | {row['median_seconds']:.1f} "
            f"| {row['seconds_vs_dense_median_of_pairs']:.2f}x | {returns} | {row['mean_return']:.0f} |"
        )
    returns = summary.get("compact", {}).get("return_vs_dense")
    if returns is not None and returns["ci95"] is not None:
        low, high = returns["ci95"]
        lines += [
            "",
            f"Return, RigL compact - dense, paired over {len(returns['differences'])} seeds: "
            f"{returns['mean']:+.1f} [{low:+.1f}, {high:+.1f}] (95%), p = {returns['p']:.3g}: "
            f"{returns['verdict']}.",
        ]
    goal = summary.get("goal")
    if goal is not None:
        verdict = "met" if goal["met"] else "not met"
        lines += ["", f"Goal (compact <= {GOAL}x dense wall-clock): {goal['ratio']:.2f}x, {verdict}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_counts = weight_counts(build(args, args.width, 0))
    wide_counts = weight_counts(build(args, args.wide_width, 0))
    sparsity = matching_sparsity(dense_counts, wide_counts)
    machine = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernels": kernel_status(),
    }
    print(f"{machine['cpu']}, {args.threads} thread(s), kernels {machine['kernels'].get('state')}")
    print(
        f"dense agent: {dense_counts['weights']} weights; wide agent: {wide_counts['hidden_weights']} hidden + "
        f"{wide_counts['output_weights']} output weights -> sparsity {sparsity:.6f} "
        f"(density {1 - sparsity:.6f}) of the hidden weights"
    )
    torch.set_num_threads(args.threads)
    layers = layer_markdown(layer_costs(args)) + "\n" + parts_markdown(layer_parts(args))
    print(layers)
    if args.layers_only:
        write_atomic(out / "layers.md", layers.encode())
        return 0
    variants = [v for v in VARIANTS if v != "masked" or args.masked_steps]
    records: list[dict[str, Any]] = []
    table = ""
    for k, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
        order = variants[k % len(variants) :] + variants[: k % len(variants)]
        for variant in order:
            record = run_one(args, variant, seed, sparsity)
            records.append(record)
            print(
                f"seed {seed} {variant:8s} {record['steps']} steps {record['seconds']:7.1f} s  "
                f"return {record['return']:8.1f}  trained weights {record['trained_weights']}",
                flush=True,
            )
            summary = summarize(args, records)
            table = markdown(args, sparsity, summary, machine) + "\n" + layers
            result = {
                "args": asdict(args),
                "machine": machine,
                "weights": {"dense": dense_counts, "wide": wide_counts},
                "sparsity": sparsity,
                "records": records,
                "summary": summary,
            }
            write_json(out / "results.json", result)
            write_atomic(out / "results.md", table.encode())
    print("\n" + table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
