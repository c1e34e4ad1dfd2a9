"""`sparseapps rl train` SIGKILLed anywhere (inside a checkpoint write, between the two renames that swap a
checkpoint in, while writing the final files or the summary, at a random moment) and re-run until it exits 0 ends
bit for bit where an uninterrupted run ends: every tensor of model.zip, every array of the replay buffer, every
value of result.json and results.json but the wall-clock ones."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparseapps.core.io import OWNER_FILE, TEMPORARY_GLOB
from tests.rl.compare import differences, run_differences, without_wall_clock

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hp", "policy_kwargs={'net_arch': [16, 16]}"]
PPO = [
    "rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--method", "rigl", "--sparsity", "0.8",
    "--update-interval", "2", "--steps", "384", "--seeds", "1", "--no-dense", "--eval-every", "128",
    "--eval-episodes", "2", "--checkpoint-every", "64", "--hp", "n_steps=64", "--hp", "batch_size=32", "--hp",
    "n_epochs=2", *TINY,
]  # fmt: skip
SAC = [
    "rl", "train", "--env", "Pendulum-v1", "--algo", "sac", "--method", "rigl", "--sparsity", "0.8",
    "--update-interval", "5", "--steps", "200", "--seeds", "1", "--no-dense", "--eval-every", "100",
    "--eval-episodes", "1", "--checkpoint-every", "40", "--keep-replay-buffer", "--hp", "learning_starts=60",
    "--hp", "batch_size=32", *TINY,
]  # fmt: skip

# Runs the CLI and SIGKILLs itself right before the N-th os.replace whose source path matches a pattern: every
# file sparseapps writes is renamed into place, so this reaches each write and each checkpoint swap exactly.
KILLING_DRIVER = """
import fnmatch, os, signal, sys
pattern, occurrence = sys.argv[1].rsplit(":", 1)
seen, real_replace = 0, os.replace
def replace(source, destination, *args, **kwargs):
    global seen
    if fnmatch.fnmatch(os.fspath(source), pattern):
        seen += 1
        if seen == int(occurrence):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, destination, *args, **kwargs)
os.replace = replace
from sparseapps.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(options: list[str], out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``sparseapps <options> --out <out>``; with ``kill_at`` (``PATTERN:N``) it is SIGKILLed at that write."""
    prefix = ["-c", KILLING_DRIVER, kill_at] if kill_at is not None else ["-m", "sparseapps"]
    completed = subprocess.run(
        [sys.executable, *prefix, *options, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed


def kill_after(options: list[str], out: Path, seconds: float) -> bool:
    """Runs the command and SIGKILLs it after ``seconds``; whether it was still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sparseapps", *options, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert "Traceback" not in stderr, stderr
    assert process.returncode in (0, -signal.SIGKILL), stderr
    return process.returncode == -signal.SIGKILL


def reference_run(options: list[str], out: Path) -> float:
    started = time.perf_counter()
    completed = run_cli(options, out)
    assert completed.returncode == 0, completed.stderr
    return time.perf_counter() - started


def assert_same_outputs(reference: Path, trial: Path) -> None:
    run = Path("rigl") / "seed0"
    assert run_differences(reference / run, trial / run) == []
    summaries = [
        without_wall_clock(json.loads((root / "results.json").read_text())) for root in (reference, trial)
    ]
    assert differences(*summaries) == []
    assert (reference / OWNER_FILE).read_text() == (trial / OWNER_FILE).read_text()

    def files(root: Path) -> list[str]:
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if "tb" not in p.relative_to(root).parts
        )

    # no checkpoint, temporary file or half-written output left behind
    assert files(trial) == files(reference)
    assert not list(trial.rglob(TEMPORARY_GLOB))


def test_ppo_killed_at_every_kind_of_write_resumes_bit_for_bit(tmp_path: Path) -> None:
    reference_run(PPO, tmp_path / "reference")
    trial, run = tmp_path / "trial", tmp_path / "trial" / "rigl" / "seed0"
    kills = [
        "*/seed0/checkpoint.tmp:3",  # between the renames of a checkpoint swap: only checkpoint.old is whole
        "*/seed0/checkpoint.tmp/.random_state.pt.*:2",  # halfway through writing a checkpoint
        "*/seed0/.result.json.*:1",  # the final model.zip written, result.json not
        "*/seed0/.MANIFEST.json.*:1",  # result.json written, not its manifest
        "*/.results.json.*:1",  # every run finished, the summary not written
    ]
    for kill_at in kills:
        completed = run_cli(PPO, trial, kill_at)
        assert completed.returncode == -signal.SIGKILL, (kill_at, completed.stderr)
        if kill_at == kills[0]:
            assert (run / "checkpoint.old").is_dir() and not (run / "checkpoint").exists()
        if kill_at == kills[2]:
            assert (run / "model.zip").exists() and not (run / "result.json").exists()
    completed = run_cli(PPO, trial)
    assert completed.returncode == 0, completed.stderr
    assert_same_outputs(tmp_path / "reference", trial)


def test_sac_killed_in_a_checkpoint_swap_at_random_and_before_its_manifest_resumes_bit_for_bit(
    tmp_path: Path,
) -> None:
    seconds = reference_run(SAC, tmp_path / "reference")
    trial = tmp_path / "trial"
    assert run_cli(SAC, trial, "*/seed0/checkpoint.tmp:2").returncode == -signal.SIGKILL
    kill_after(SAC, trial, random.Random(0).uniform(0.3, 0.9) * seconds)
    completed = run_cli(SAC, trial, "*/seed0/.MANIFEST.json.*:1")
    assert completed.returncode in (0, -signal.SIGKILL), completed.stderr
    completed = run_cli(SAC, trial)
    assert completed.returncode == 0, completed.stderr
    assert (trial / "rigl" / "seed0" / "replay_buffer.pkl").exists()
    assert_same_outputs(tmp_path / "reference", trial)


@pytest.mark.slow
@pytest.mark.parametrize("options", [PPO, SAC], ids=["ppo", "sac"])
def test_killed_at_random_moments_resumes_bit_for_bit(options: list[str], tmp_path: Path) -> None:
    seconds = reference_run(options, tmp_path / "reference")
    trial, rng = tmp_path / "trial", random.Random(1)
    for _ in range(6):
        if not kill_after(options, trial, rng.uniform(0.2, 1.1) * seconds):
            break
    completed = run_cli(options, trial)
    assert completed.returncode == 0, completed.stderr
    assert_same_outputs(tmp_path / "reference", trial)
