"""Neuron recyclers (ReDo, continual backprop) made resumable: their state dicts, two ``learn`` calls, an RL run that
recycles and is interrupted and resumed bit for bit, the checks of a bad state or checkpoint, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from torch import nn

from sparseapps.cli import main
from sparseapps.core.io import MANIFEST, CorruptFileError, save_torch, write_manifest
from sparseapps.rl.checkpoints import OtherRunError
from sparseapps.rl.plasticity import ContinualBackpropCallback, ReDoCallback
from sparseapps.rl.train import RLRun, train_run
from tests.rl.compare import run_differences
from tests.rl.test_train import CrashingProgress, Interrupt

RELU_PPO = {
    "n_steps": 64,
    "batch_size": 32,
    "n_epochs": 2,
    "policy_kwargs": {"net_arch": [16, 16], "activation_fn": nn.ReLU},
}
# Small enough to act within a few rollouts of 4 gradient steps each.
REDO_KWARGS = {"interval": 4, "tau": 0.5, "batch_size": 32}
CBP_KWARGS = {"replacement_rate": 0.05, "maturity_threshold": 4}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


def tiny_ppo() -> PPO:
    return PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", **RELU_PPO)


def weights_digest(model: PPO) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def through_disk(state: dict[str, Any]) -> Any:
    """``state`` written with torch.save and read back with weights_only=True (as a checkpoint reads it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same(a: Any, b: Any) -> bool:
    """Equal, tensors by dtype and every value, at any depth."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and type(a) is type(b):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------- one learn call
# Recorded with the code before the recyclers became resumable (PPO CartPole, seed 0, one torch thread, torch
# 2.14.1 on this project's CPU machine): a run with one learn call must give exactly these numbers still, so that
# the registered plasticity benchmark is unchanged. The weight digests are specific to the platform's float
# kernels; the histories are not.
PINNED_REDO_HISTORY = [
    (4, {"policy_net.1": 11, "policy_net.3": 6, "value_net.1": 9, "value_net.3": 7}, 0.515625),
    (8, {"policy_net.1": 4, "policy_net.3": 5, "value_net.1": 2, "value_net.3": 3}, 0.21875),
    (12, {"policy_net.1": 0, "policy_net.3": 4, "value_net.1": 2, "value_net.3": 2}, 0.125),
    (16, {"policy_net.1": 10, "policy_net.3": 6, "value_net.1": 9, "value_net.3": 6}, 0.484375),
    (20, {"policy_net.1": 4, "policy_net.3": 5, "value_net.1": 3, "value_net.3": 6}, 0.28125),
]
PINNED_REDO_DIGEST = "b8b17b59578d48bb"
PINNED_CBP_AGES = {
    "policy_net.1": [5, 24, 24, 1, 24, 24, 24, 2, 24, 24, 4, 24, 24, 18, 14, 24],
    "policy_net.3": [1, 2, 10, 24, 24, 24, 24, 24, 24, 24, 24, 24, 8, 24, 4, 5],
    "value_net.1": [1, 5, 24, 24, 24, 24, 24, 24, 24, 24, 24, 2, 14, 24, 4, 24],
    "value_net.3": [24, 24, 24, 24, 24, 24, 24, 24, 24, 4, 5, 24, 1, 24, 2, 24],
}
PINNED_CBP_DIGEST = "876c4e37ca18b27e"


def test_a_single_learn_call_gives_the_numbers_recorded_before_the_change() -> None:
    model, redo = tiny_ppo(), ReDoCallback(**REDO_KWARGS)
    model.learn(384, callback=redo)
    history = [
        (
            entry["step"],
            {k.removeprefix("mlp_extractor."): v for k, v in entry["recycled"].items()},
            entry["dormant_fraction"],
        )
        for entry in redo.history
    ]
    assert history == PINNED_REDO_HISTORY
    assert {entry["network"] for entry in redo.history} == {"policy"}
    assert weights_digest(model) == PINNED_REDO_DIGEST

    model, cbp = tiny_ppo(), ContinualBackpropCallback(**CBP_KWARGS)
    model.learn(384, callback=cbp)
    assert cbp.n_replaced == {"policy": 52}
    books = cbp.states["policy"]
    assert {k.removeprefix("mlp_extractor."): v.age.tolist() for k, v in books.items()} == PINNED_CBP_AGES
    # 24 optimizer steps, 16 units, 0.05 per eligible unit: the pending fraction left over is 0.65 in every layer
    assert all(book.pending == pytest.approx(0.65) for book in books.values())
    assert weights_digest(model) == PINNED_CBP_DIGEST


# ---------------------------------------------------------------------------------------------- state dicts
def trained_redo() -> tuple[PPO, ReDoCallback]:
    model, redo = tiny_ppo(), ReDoCallback(**REDO_KWARGS)
    model.learn(192, callback=redo)
    assert redo.n_recycles > 0
    return model, redo


def trained_cbp() -> tuple[PPO, ContinualBackpropCallback]:
    model, cbp = tiny_ppo(), ContinualBackpropCallback(**CBP_KWARGS)
    model.learn(192, callback=cbp)
    assert cbp.n_replaced["policy"] > 0
    return model, cbp


def test_redo_state_dict_round_trips_through_weights_only_loading() -> None:
    model, redo = trained_redo()
    state = redo.state_dict()
    assert state["steps"] == {"policy": 12} and state["next"] == {"policy": 12}  # 3 rollouts of 4 steps
    assert isinstance(state["generator"], torch.Tensor) and state["rng"]["bit_generator"] == "PCG64"
    loaded = through_disk(state)
    again = ReDoCallback(**REDO_KWARGS)
    again.load_state_dict(loaded, model=model)
    assert same(again.state_dict(), state)
    assert again.history == redo.history and again.history is not redo.history
    # the generators continue where the saved ones were: the same next draws
    assert torch.equal(torch.rand(5, generator=again._generator), torch.rand(5, generator=redo._generator))
    assert again._rng is not None and redo._rng is not None
    assert np.array_equal(again._rng.integers(0, 2**40, 5), redo._rng.integers(0, 2**40, 5))
    # a callback that never trained round-trips too (nothing seeded yet)
    fresh = ReDoCallback(**REDO_KWARGS)
    assert fresh.state_dict()["generator"] is None
    fresh.load_state_dict(through_disk(ReDoCallback(**REDO_KWARGS).state_dict()))
    assert fresh.state_dict()["steps"] == {} and fresh.history == []


def test_cbp_state_dict_round_trips_through_weights_only_loading() -> None:
    model, cbp = trained_cbp()
    state = cbp.state_dict()
    book = state["states"]["policy"]["mlp_extractor.policy_net.1"]
    assert book["utility"].dtype == torch.float64 and book["age"].dtype == torch.int64
    assert book["utility"].shape == (16,) and isinstance(book["pending"], float)
    again = ContinualBackpropCallback(**CBP_KWARGS)
    again.load_state_dict(through_disk(state), model=model)
    assert same(again.state_dict(), state)
    assert again.n_replaced == cbp.n_replaced
    # copies: training on with the original does not move the loaded books
    cbp.states["policy"]["mlp_extractor.policy_net.1"].age += 1
    assert torch.equal(again.states["policy"]["mlp_extractor.policy_net.1"].age, book["age"])
    assert torch.equal(torch.rand(5, generator=again._generator), torch.rand(5, generator=cbp._generator))


# ---------------------------------------------------------------------------------------------- two learn calls
@pytest.mark.parametrize("kind", ["redo", "cbp"])
def test_a_second_learn_call_continues_the_random_stream(kind: str) -> None:
    """learn(128) then learn(256, reset_num_timesteps=False) is one learn(384) (PPO's schedules are constant): the
    second call continues the recycler's generators and counters. Re-seeding them at the second call (the old
    behaviour, forced here) repeats the first call's draws and gives other weights."""

    def make() -> ReDoCallback | ContinualBackpropCallback:
        return ReDoCallback(**REDO_KWARGS) if kind == "redo" else ContinualBackpropCallback(**CBP_KWARGS)

    def summary(model: PPO, recycler: ReDoCallback | ContinualBackpropCallback) -> tuple[Any, ...]:
        if isinstance(recycler, ReDoCallback):
            return weights_digest(model), recycler.history
        return weights_digest(model), recycler.n_replaced, recycler.state_dict()["states"]

    model, recycler = tiny_ppo(), make()
    model.learn(384, callback=recycler)
    once = summary(model, recycler)

    model, recycler = tiny_ppo(), make()
    model.learn(128, callback=recycler)
    generator = recycler._generator
    assert generator is not None
    at_pause = generator.get_state()
    reseeded = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(at_pause, reseeded)  # the first call drew fresh weights
    model.learn(256, callback=recycler, reset_num_timesteps=False)
    assert model.num_timesteps == 384
    assert same(summary(model, recycler), once)

    model, recycler = tiny_ppo(), make()
    model.learn(128, callback=recycler)
    recycler._generator = None  # what every training start did before: seed again
    if isinstance(recycler, ReDoCallback):
        recycler._rng = None
    model.learn(256, callback=recycler, reset_num_timesteps=False)
    assert weights_digest(model) != once[0]


# ---------------------------------------------------------------------------------------------- bad states
def redo_mutations() -> list[tuple[str, Any, str]]:
    return [
        ("callback", "ContinualBackpropCallback", r"state\['callback'\] must be 'ReDoCallback'"),
        ("settings/interval", 8, r"other settings; \(saved, current\) differ in \{'interval': \(8, 4\)\}"),
        ("steps/policy", "3", r"state\['steps'\]\['policy'\] must be an integer >= 0, got '3'"),
        ("next/policy", 10, r"state\['next'\]\['policy'\] must be a multiple of interval 4, got 10"),
        ("next", {"q_net": 12}, r"must name the same networks, got \['policy'\] and \['q_net'\]"),
        ("history", "none", r"state\['history'\] must be a list, got 'none'"),
        ("history/0/network", "actor", r"state\['history'\]\[0\]\['network'\] must be one of \['policy'\]"),
        ("history/0/dormant_fraction", 1.5, r"state\['history'\]\[0\]\['dormant_fraction'\] must be"),
        (
            "generator",
            torch.zeros(3),
            r"state\['generator'\] must be a torch generator's state .*torch.float32",
        ),
        ("rng", None, r"both be set \(training started\) or both None"),
        ("rng/bit_generator", "MT19937", r"state\['rng'\]\['bit_generator'\] must be 'PCG64'"),
        ("rng/state/inc", -1, r"state\['rng'\]\['state'\]\['inc'\] must be an integer >= 0"),
    ]


def mutate(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``state`` with the entry at ``path`` (keys joined by ``/``) set to ``value``."""
    state = through_disk(state)
    *parents, last = path.split("/")
    target: Any = state
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    return state


@pytest.mark.parametrize(("path", "value", "message"), redo_mutations())
def test_a_bad_redo_state_is_refused_naming_the_key(path: str, value: Any, message: str) -> None:
    _, redo = trained_redo()
    target = ReDoCallback(**REDO_KWARGS)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(mutate(redo.state_dict(), path, value))
    assert target.state_dict()["steps"] == {}  # nothing was loaded


def test_a_bad_recycler_state_is_refused() -> None:
    model, cbp = trained_cbp()
    state = cbp.state_dict()
    layer = "mlp_extractor.policy_net.1"
    key = rf"state\['states'\]\['policy'\]\['{layer}'\]"
    cases = [
        (
            mutate(state, "callback", "ReDoCallback"),
            r"state\['callback'\] must be 'ContinualBackpropCallback'",
        ),
        ({**state, "extra": 1}, r"missing \[\], unknown \['extra'\]"),
        (
            mutate(state, "settings/maturity_threshold", 10_000),
            r"differ in \{'maturity_threshold': \(10000, 4\)\}",
        ),
        (
            mutate(state, f"states/policy/{layer}/age", torch.zeros(16)),
            key + r"\['age'\] must be a 1-D torch.int64",
        ),
        (
            mutate(state, f"states/policy/{layer}/mean_activation", torch.zeros(8, dtype=torch.float64)),
            key + r"\['mean_activation'\] must have 16 entries \(the layer's width\), got 8",
        ),
        (mutate(state, f"states/policy/{layer}/pending", 1.5), key + r"\['pending'\] must be .*got 1.5"),
        (
            mutate(state, "n_replaced", {"actor": 1}),
            r"must name the same networks, got \['actor'\] and \['policy'\]",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ContinualBackpropCallback(**CBP_KWARGS).load_state_dict(bad, model=model)

    # against the model: layer names and widths
    wider = mutate(state, f"states/policy/{layer}", {**state["states"]["policy"][layer]})
    book = wider["states"]["policy"][layer]
    for name in ("utility", "mean_activation"):
        book[name] = torch.zeros(8, dtype=torch.float64)
    book["age"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=key + r" has 8 units, but the layer has 16 neurons"):
        ContinualBackpropCallback(**CBP_KWARGS).load_state_dict(wider, model=model)
    renamed = through_disk(state)
    renamed["states"]["policy"]["other"] = renamed["states"]["policy"].pop(layer)
    with pytest.raises(ValueError, match=r"names the layers \[.*'other'\], but the network's hidden layers"):
        ContinualBackpropCallback(**CBP_KWARGS).load_state_dict(renamed, model=model)
    # without a model, the networks are checked at the next training start
    late = ContinualBackpropCallback(**CBP_KWARGS)
    late.load_state_dict(renamed)
    with pytest.raises(ValueError, match=r"names the layers"):
        tiny_ppo().learn(64, callback=late)
    # a ReDo state of another algorithm's networks
    _, redo = trained_redo()
    other = through_disk(redo.state_dict())
    other["steps"], other["next"] = {"q_net": 8}, {"q_net": 12}
    for entry in other["history"]:
        entry["network"] = "q_net"
    with pytest.raises(ValueError, match=r"names the networks \['q_net'\], but this PPO has \['policy'\]"):
        ReDoCallback(**REDO_KWARGS).load_state_dict(other, model=model)
    late_redo = ReDoCallback(**REDO_KWARGS)
    late_redo.load_state_dict(other)
    with pytest.raises(ValueError, match=r"the loaded state names the networks \['q_net'\]"):
        tiny_ppo().learn(64, callback=late_redo)


# ---------------------------------------------------------------------------------------------- RL runs
def recycling_run(recycler: str, **changes: Any) -> RLRun:
    values: dict[str, Any] = dict(
        env="CartPole-v1",
        algo="ppo",
        method="dense",
        recycler=recycler,
        recycler_kwargs=REDO_KWARGS if recycler == "redo" else CBP_KWARGS,
        steps=384,
        eval_every=128,
        eval_episodes=2,
        checkpoint_every=64,
        hyperparameters=RELU_PPO,
    )
    return RLRun(**{**values, **changes})


RESUME_CASES: dict[str, dict[str, Any]] = {
    "ppo-redo": {"recycler": "redo"},
    "ppo-cbp": {"recycler": "cbp"},
    # interrupted during SAC's uniformly random warm-up: resuming continual backprop must not draw from the action
    # space (its example inputs of the critic come from copies of the spaces after the first start)
    "sac-cbp": {
        "recycler": "cbp",
        "env": "Pendulum-v1",
        "algo": "sac",
        "steps": 200,
        "checkpoint_every": 50,
        "eval_every": 100,
        "eval_episodes": 1,
        "hyperparameters": {
            "learning_starts": 100,
            "batch_size": 32,
            "policy_kwargs": {"net_arch": [16, 16]},
        },
        "recycler_kwargs": {"replacement_rate": 0.05, "maturity_threshold": 20},
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_an_interrupted_recycling_run_resumes_bit_for_bit(case: str, tmp_path: Path) -> None:
    changes = dict(RESUME_CASES[case])
    run = recycling_run(changes.pop("recycler"), **changes)
    assert run.label == f"dense-{run.recycler}"
    reference = train_run(run, tmp_path / "reference", keep_replay_buffer=True)
    recycling = reference["recycling"]
    assert recycling["recycler"] == run.recycler
    assert sum(recycling["neurons"].values()) > 0  # it recycled
    if run.recycler == "redo":
        steps = [step for _, step, _ in recycling["rounds"]]
        assert steps and steps[-1] > 2 * 4 * 2  # rounds after the second interruption too

    trial = tmp_path / "trial"
    for limit in (run.steps // 3, 2 * run.steps // 3 + 5):
        with pytest.raises(Interrupt):
            train_run(run, trial, progress=CrashingProgress(limit), keep_replay_buffer=True)
        assert (trial / "checkpoint" / "recycler.pt").is_file()
    result = train_run(run, trial, keep_replay_buffer=True)
    assert result["recycling"] == recycling
    assert run_differences(tmp_path / "reference", trial) == []


def test_a_checkpoint_of_another_recycler_setting_is_refused(tmp_path: Path) -> None:
    plain = dataclasses.replace(recycling_run("redo"), recycler="none", recycler_kwargs={}, eval_every=0)
    with pytest.raises(Interrupt):
        train_run(plain, tmp_path, progress=CrashingProgress(200))
    with pytest.raises(OtherRunError, match=r"another configuration.*'recycler': \('none', 'redo'\)"):
        train_run(dataclasses.replace(recycling_run("redo"), eval_every=0), tmp_path)

    out = tmp_path / "redo"
    run = dataclasses.replace(recycling_run("redo"), eval_every=0)
    with pytest.raises(Interrupt):
        train_run(run, out, progress=CrashingProgress(200))
    with pytest.raises(OtherRunError, match=r"'recycler': \('redo', 'cbp'\)"):
        train_run(dataclasses.replace(recycling_run("cbp"), eval_every=0), out)
    with pytest.raises(OtherRunError, match=r"'recycler_kwargs\.interval': \(4, 8\)"):
        train_run(dataclasses.replace(run, recycler_kwargs={**REDO_KWARGS, "interval": 8}), out)
    with pytest.raises(OtherRunError, match=r"'recycler': \('redo', 'none'\)"):
        train_run(plain, out)

    # a recycler.pt that does not fit the run (rewritten with its manifest): refused as damaged, naming the file
    checkpoint = out / "checkpoint"
    state = torch.load(checkpoint / "recycler.pt", weights_only=True)
    state["steps"]["actor"] = state["next"]["actor"] = 4
    save_torch(checkpoint / "recycler.pt", state)
    write_manifest(checkpoint, sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST))
    with pytest.raises(CorruptFileError, match=r"recycler\.pt cannot be resumed: .*\['actor', 'policy'\]"):
        train_run(run, out)
    (checkpoint / "recycler.pt").unlink()
    with pytest.raises(CorruptFileError, match=r"recycler\.pt: no such file"):
        train_run(run, out)
    # overwrite starts it afresh
    assert sum(train_run(run, out, overwrite=True)["recycling"]["neurons"].values()) > 0


def test_a_checkpoint_from_before_recyclers_existed_resumes(tmp_path: Path) -> None:
    """A checkpoint whose run.json has no recycler fields (and no recycler.pt) is a run without a recycler."""
    run = dataclasses.replace(recycling_run("redo"), recycler="none", recycler_kwargs={}, eval_every=0)
    reference = train_run(run, tmp_path / "reference")
    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "old", progress=CrashingProgress(200))
    checkpoint = tmp_path / "old" / "checkpoint"
    settings = json.loads((checkpoint / "run.json").read_text())
    del settings["recycler"], settings["recycler_kwargs"]
    (checkpoint / "run.json").write_text(json.dumps(settings))
    write_manifest(checkpoint, sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST))
    assert train_run(run, tmp_path / "old")["final_return"] == reference["final_return"]
    assert run_differences(tmp_path / "reference", tmp_path / "old") == []


def test_run_settings_refuse_a_recycler_on_a_sparse_method() -> None:
    with pytest.raises(
        ValueError, match=r"recycler 'cbp' recycles neurons of dense networks, but method 'rigl'"
    ):
        RLRun(env="CartPole-v1", algo="ppo", method="rigl", recycler="cbp")
    with pytest.raises(ValueError, match=r"recycler must be one of 'none', 'redo', 'cbp', got 'lop'"):
        RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="lop")
    with pytest.raises(ValueError, match=r"recycler_kwargs \{'interval': 5\} need a recycler"):
        RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler_kwargs={"interval": 5})
    with pytest.raises(ValueError, match=r"do not fit ContinualBackpropCallback.*'interval'"):
        RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="cbp", recycler_kwargs={"interval": 5})
    with pytest.raises(ValueError, match=r"interval must be an integer >= 1, got 0"):
        RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="redo", recycler_kwargs={"interval": 0})
    with pytest.raises(ValueError, match=r"may not set 'seed'"):
        RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="redo", recycler_kwargs={"seed": 1})
    # the papers' defaults, the run's seed
    redo = RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="redo", seed=3).recycler_callback()
    assert isinstance(redo, ReDoCallback) and (redo.interval, redo.tau, redo.batch_size, redo.seed) == (
        1000,
        0.025,
        256,
        3,
    )
    cbp = RLRun(env="CartPole-v1", algo="ppo", method="dense", recycler="cbp").recycler_callback()
    assert isinstance(cbp, ContinualBackpropCallback)
    assert (cbp.replacement_rate, cbp.maturity_threshold, cbp.decay_rate, cbp.init) == (
        1e-4,
        10_000,
        0.99,
        "lecun_uniform",
    )


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_trains_dense_runs_with_recyclers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [
        "rl", "train", "--env", "CartPole-v1", "--algo", "ppo", "--steps", "128", "--seeds", "1", "--eval-every",
        "0", "--eval-episodes", "1", "--hp", "n_steps=64", "--hp", "batch_size=32", "--hp",
        "policy_kwargs={'net_arch': [16]}", "--no-progress", "--method", "dense",
    ]  # fmt: skip
    out = tmp_path / "x"
    argv = [*base, "--recycler", "redo", "--recycler", "cbp", "--recycler-arg", "init='torch_default'"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["methods"] == ["dense", "dense-redo", "dense-cbp"]
    redo = json.loads((out / "dense-redo" / "seed0" / "result.json").read_text())
    assert redo["run"]["recycler"] == "redo" and redo["run"]["recycler_kwargs"] == {"init": "torch_default"}
    assert redo["recycling"]["recycler"] == "redo" and "recycling" not in summary["runs"][0]
    cbp = json.loads((out / "dense-cbp" / "seed0" / "result.json").read_text())
    assert cbp["recycling"] == {"recycler": "cbp", "neurons": {"policy": 0}}  # maturity 10000: none yet
    capsys.readouterr()

    assert main([*base, "--sparsity", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "--sparsity: options of the sparse runs, but --method dense trains none" in capsys.readouterr().err
    assert main([*base, "--recycler-arg", "interval=5", "--out", str(tmp_path / "y")]) == 2
    assert "--recycler-arg {'interval': 5} needs a --recycler" in capsys.readouterr().err
    assert (
        main([*base, "--recycler", "cbp", "--recycler-arg", "interval=5", "--out", str(tmp_path / "y")]) == 2
    )
    assert "do not fit ContinualBackpropCallback" in capsys.readouterr().err
