"""Kills training runs at random points, resumes them, and checks that nothing was lost and no code ran.

For each domain (recsys, rl, continual) the script runs the domain's CLI on a small configuration:

1. **Reference**: one uninterrupted run into its own directory (its wall-clock time sets the kill window).
2. **Kill and resume** (``--kills`` cases): the same command into a fresh directory, killed with SIGKILL at a
   random moment (uniform over the reference's duration, so some kills land inside a checkpoint write), then
   re-run (up to ``--max-kills`` more random kills), and finally run to the end. The case counts as *bitwise*
   when every tensor of the final outputs equals the reference's (``torch.equal``) and every metric is equal
   (wall-clock fields excepted); as *data lost* when a resume failed or the final outputs are missing; as a
   *traceback* when any attempt printed a Python traceback.
3. **Planted code**: each file the domain reads back on resume is replaced by a pickle whose unpickling would
   create a marker file; the resume must refuse with a clear error (exit code 2, no traceback) and the marker
   must not exist (*code executed* otherwise).
4. **Bad input**: a few wrong arguments per domain; each must give exit code 2 with a one-line error that names
   the bad value, never a traceback.

Goal: 0 lost, 0 executed, 0 tracebacks, 100% bitwise.

    .venv/bin/python scripts/fault_injection.py                      # 5 kill cases per domain (a few minutes)
    .venv/bin/python scripts/fault_injection.py --kills 20 --seed 1  # more cases, other kill times

Writes ``--out``/results.json (every case) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparseapps.core.io import load_torch, write_json  # noqa: E402

# JSON keys whose values are wall-clock measurements or environment facts, not results of the computation.
WALL_CLOCK_WORDS = (
    "second",
    "time",
    "elapsed",
    "date",
    "version",
    "fps",
    "per_s",
    "duration",
    "started",
    "_ms",
    "rss",
)
SKIPPED_SUFFIXES = (".png", ".txt", ".log", ".pkl")
SKIPPED_PARTS = ("tb",)


@dataclass(frozen=True, kw_only=True)
class Domain:
    """One domain's small run and the checks made on it."""

    name: str
    command: list[str]  # arguments after `python -m sparseapps`, without --out
    # files (relative to --out) that a resume reads; each in turn is replaced by a planted pickle
    planted: list[str]
    # (arguments, text the error must name)
    bad_inputs: list[tuple[list[str], str]] = field(default_factory=list)
    # the kill point (fraction of the reference time) tried first to leave a checkpoint to plant into
    plant_after: float = 0.5


DOMAINS: dict[str, Domain] = {
    "recsys": Domain(
        name="recsys",
        command=shlex.split(
            "recsys train --dataset synthetic-ml-100k --model mf --method dsl --density 0.25 --epochs 6 "
            "--no-progress --resume"
        ),
        planted=["checkpoint.pt"],
        bad_inputs=[
            (shlex.split("recsys train --density 1.5 --no-progress"), "1.5"),
            (shlex.split("recsys train --model mf --epochs -1 --no-progress"), "-1"),
        ],
    ),
    "rl": Domain(
        name="rl",
        command=shlex.split(
            "rl train --env CartPole-v1 --algo ppo --method rigl --sparsity 0.9 --steps 1536 --seeds 1 --no-dense "
            "--eval-every 512 --eval-episodes 2 --checkpoint-every 256 --hp n_steps=128 --hp batch_size=64"
        ),
        planted=[
            "rigl/seed0/checkpoint/sparsity.pt",
            "rigl/seed0/checkpoint/model.zip",
            "rigl/seed0/checkpoint/environments.pkl",
            "rigl/seed0/checkpoint/random_state.pt",
        ],
        bad_inputs=[
            (shlex.split("rl train --env CartPoleX-v9 --steps 100 --seeds 1"), "CartPoleX-v9"),
            (shlex.split("rl train --env CartPole-v1 --algo sac --steps 100 --seeds 1"), "Discrete"),
            (shlex.split("rl train --env CartPole-v1 --sparsity 1.2 --steps 100"), "1.2"),
        ],
    ),
    "continual": Domain(
        name="continual",
        # 20 short epochs, a checkpoint every 5 steps: most of the run is training, not imports, so kills land
        # inside tasks and inside checkpoint writes.
        command=shlex.split(
            "continual run --benchmark split-digits --n-tasks 5 --distribution uniform --epochs 20 --hidden 32,32 "
            "--sparsity 0.8 --checkpoint-every 5 --no-progress --resume"
        ),
        planted=["checkpoint.pt"],
        bad_inputs=[
            (shlex.split("continual run --sparsity 1.5 --no-progress"), "1.5"),
            (shlex.split("continual run --n-tasks 3 --no-progress"), "3"),
        ],
    ),
}


class _Planted:
    """Unpickling it would create ``marker``: the proof that a loader ran code from data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Attempt:
    returncode: int
    killed: bool
    traceback: bool
    stderr_tail: str


def _run(arguments: Sequence[str], out: Path | None, kill_after: float | None, timeout: float) -> Attempt:
    command = [sys.executable, "-m", "sparseapps", *arguments] + (
        ["--out", str(out)] if out is not None else []
    )
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "SB3_LOGDIR": tempfile.gettempdir()}
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
            start_new_session=True,
        )
        killed = False
        try:
            process.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = kill_after is not None
            if not killed:
                raise RuntimeError(f"{' '.join(command)} ran past {timeout:.0f} s") from None
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    return Attempt(process.returncode, killed, "Traceback (most recent call last)" in text, text[-4000:])


# ---------------------------------------------------------------------------------------------- comparison
def _is_wall_clock(key: str) -> bool:
    key = key.lower().replace("timestep", "")  # environment steps are results, not clock readings
    return any(word in key for word in WALL_CLOCK_WORDS)


def _compare(a: Any, b: Any, where: str, differences: list[str]) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        ):
            differences.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if isinstance(key, str) and _is_wall_clock(key):
                continue
            if key not in a or key not in b:
                differences.append(f"{where}.{key} (missing on one side)")
            else:
                _compare(a[key], b[key], f"{where}.{key}", differences)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            differences.append(f"{where} (length {len(a)} vs {len(b)})")
        else:
            for index, (x, y) in enumerate(zip(a, b, strict=True)):
                _compare(x, y, f"{where}[{index}]", differences)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):  # NaN == NaN
        differences.append(f"{where} ({a!r} vs {b!r})")


def _read_state(path: Path) -> Any:
    """The comparable content of one output file: tensors of .pt files and SB3 archives, JSON values."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return load_torch(path)
    if path.suffix == ".zip":  # a Stable-Baselines3 archive: its tensors only (the rest is cloudpickle)
        with zipfile.ZipFile(path) as archive:
            return {
                name: torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                for name in sorted(archive.namelist())
                if name.endswith(".pth")
            }
    return path.read_bytes()


def _outputs(directory: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or path.name.startswith(".") or path.suffix in SKIPPED_SUFFIXES:
            continue
        if any(part in SKIPPED_PARTS for part in relative.parts) or path.name == "MANIFEST.json":
            continue
        found[str(relative)] = path
    return found


def compare_outputs(reference: Path, trial: Path) -> list[str]:
    """Every difference between two runs' final outputs (wall-clock fields excepted); empty when bitwise equal."""
    expected, got = _outputs(reference), _outputs(trial)
    differences = [f"{name} (missing)" for name in sorted(set(expected) - set(got))]
    differences += [f"{name} (extra)" for name in sorted(set(got) - set(expected))]
    for name in sorted(set(expected) & set(got)):
        _compare(_read_state(expected[name]), _read_state(got[name]), name, differences)
    return differences


# ---------------------------------------------------------------------------------------------- cases
def kill_and_resume(
    domain: Domain, reference: Path, out: Path, seconds: float, rng: random.Random, max_kills: int
) -> dict[str, Any]:
    """One case: kill the run 1..max_kills times at random moments, then let it finish; compare."""
    attempts: list[Attempt] = []
    for _ in range(rng.randint(1, max_kills)):
        attempt = _run(domain.command, out, rng.uniform(0.05, 0.95) * seconds, timeout=20 * seconds)
        attempts.append(attempt)
        if not attempt.killed:
            break
    while not attempts or attempts[-1].killed:
        attempts.append(_run(domain.command, out, None, timeout=20 * seconds + 60))
    final = attempts[-1]
    differences = compare_outputs(reference, out) if final.returncode == 0 else ["the final run failed"]
    return {
        "kills": sum(a.killed for a in attempts),
        "returncodes": [a.returncode for a in attempts],
        "bitwise": final.returncode == 0 and not differences,
        "lost": final.returncode != 0 or any(d.endswith("(missing)") for d in differences),
        "traceback": any(a.traceback for a in attempts),
        "differences": differences[:10],
        "stderr": final.stderr_tail if final.returncode != 0 else "",
    }


def plant_code(domain: Domain, work: Path, seconds: float) -> list[dict[str, Any]]:
    """Leaves a checkpoint (a run killed midway), swaps each file a resume reads for a planted pickle, resumes."""
    cases = []
    for pattern in domain.planted:
        out = work / f"planted-{pattern.replace('/', '_')}"
        target = out / pattern
        # A fresh run killed at later and later points, until one leaves a checkpoint holding the file.
        for fraction in (domain.plant_after, 0.6, 0.7, 0.8, 0.9, 0.95):
            shutil.rmtree(out, ignore_errors=True)
            _run(domain.command, out, fraction * seconds, timeout=20 * seconds)
            if target.exists():
                break
        if not target.exists():
            cases.append({"file": pattern, "skipped": "no checkpoint to plant into"})
            continue
        marker = out / "code-ran"
        target.write_bytes(pickle.dumps({"version": 1, "payload": _Planted(marker)}))
        attempt = _run(domain.command, out, None, timeout=20 * seconds + 60)
        cases.append(
            {
                "file": pattern,
                "returncode": attempt.returncode,
                "executed": marker.exists(),
                "clear_error": attempt.returncode == 2
                and not attempt.traceback
                and pattern.split("/")[-1] in attempt.stderr_tail,
                "traceback": attempt.traceback,
                "stderr": attempt.stderr_tail.strip().splitlines()[-1:]
                if attempt.stderr_tail.strip()
                else [],
            }
        )
    return cases


def bad_inputs(domain: Domain, work: Path) -> list[dict[str, Any]]:
    cases = []
    for index, (arguments, named) in enumerate(domain.bad_inputs):
        out = work / f"bad-{index}"
        attempt = _run(arguments, out, None, timeout=300)
        last = attempt.stderr_tail.strip().splitlines()[-1:] if attempt.stderr_tail.strip() else []
        cases.append(
            {
                "arguments": arguments,
                "returncode": attempt.returncode,
                "clear_error": attempt.returncode == 2
                and not attempt.traceback
                and named in attempt.stderr_tail,
                "traceback": attempt.traceback,
                "left_behind": sorted(str(p.relative_to(out)) for p in out.rglob("*"))
                if out.exists()
                else [],
                "stderr": last,
            }
        )
    return cases


def run_domain(domain: Domain, work: Path, kills: int, max_kills: int, rng: random.Random) -> dict[str, Any]:
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    started = time.perf_counter()
    attempt = _run(domain.command, reference, None, timeout=1800)
    seconds = time.perf_counter() - started
    if attempt.returncode != 0:
        raise RuntimeError(f"{domain.name}: the reference run failed:\n{attempt.stderr_tail}")
    print(f"[{domain.name}] reference run: {seconds:.1f} s", flush=True)
    cases = []
    for index in range(kills):
        out = work / f"case-{index}"
        shutil.rmtree(out, ignore_errors=True)
        case = kill_and_resume(domain, reference, out, seconds, rng, max_kills)
        cases.append(case)
        verdict = "bitwise" if case["bitwise"] else f"DIFFERS {case['differences'][:3]}"
        print(f"[{domain.name}] case {index}: {case['kills']} kill(s), {verdict}", flush=True)
    planted = plant_code(domain, work, seconds)
    bad = bad_inputs(domain, work)
    for case in planted + bad:
        print(f"[{domain.name}] {case}", flush=True)
    return {"reference_seconds": seconds, "kill_cases": cases, "planted": planted, "bad_inputs": bad}


def summarize(name: str, result: dict[str, Any]) -> dict[str, Any]:
    kills, planted = result["kill_cases"], [c for c in result["planted"] if "skipped" not in c]
    bad = result["bad_inputs"]
    cases = kills + planted + bad
    return {
        "domain": name,
        "cases": len(cases),
        "kill/resume": len(kills),
        "bitwise": sum(c["bitwise"] for c in kills),
        "clear errors": f"{sum(c['clear_error'] for c in planted + bad)}/{len(planted + bad)}",
        "data lost": sum(c["lost"] for c in kills),
        "code executed": sum(c["executed"] for c in planted),
        "tracebacks": sum(c["traceback"] for c in cases),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def goals_met(rows: list[dict[str, Any]]) -> bool:
    return all(
        row["data lost"] == 0
        and row["code executed"] == 0
        and row["tracebacks"] == 0
        and row["bitwise"] == row["kill/resume"]
        and row["clear errors"].split("/")[0] == row["clear errors"].split("/")[1]
        for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--domains", default="recsys,rl,continual", help="comma-separated: recsys, rl, continual"
    )
    parser.add_argument("--kills", type=int, default=5, help="kill-and-resume cases per domain")
    parser.add_argument("--max-kills", type=int, default=3, help="most kills within one case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fault_injection", help="work directory")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.domains.split(",") if name.strip()]
    unknown = [name for name in names if name not in DOMAINS]
    if unknown or args.kills < 0 or args.max_kills < 1:
        parser.error(f"expected domains from {sorted(DOMAINS)}, --kills >= 0, --max-kills >= 1; got {args}")
    rng = random.Random(args.seed)
    results, rows = {}, []
    for name in names:
        results[name] = run_domain(DOMAINS[name], args.out / name, args.kills, args.max_kills, rng)
        rows.append(summarize(name, results[name]))
    write_json(args.out / "results.json", {"seed": args.seed, "kills": args.kills, "domains": results})
    print()
    print(format_table(rows))
    met = goals_met(rows)
    print(
        f"\ngoal (0 lost, 0 executed, 0 tracebacks, 100% bitwise, every bad input a clear error): "
        f"{'met' if met else 'NOT met'}"
    )
    print(f"wrote {args.out / 'results.json'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
