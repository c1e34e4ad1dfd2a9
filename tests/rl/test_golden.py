"""Golden outputs of `DynamicSparsityCallback`: masks and weights after short SB3 runs, recorded before the callback
was rebuilt on the core engine (issue 14).

Each case trains a tiny agent (16-16 hidden units, one torch thread, fixed seeds) for a few hundred environment
steps with a RigL or SET configuration. Masks are compared exactly (SHA-256 of the mask bits per network, the
target network's too); the weights' norm per network with a relative tolerance of 1e-6, which float rounding on
another CPU stays far inside, while any change of logic, of gradient masking (SB3 clips the gradient norm) or of the
order of random draws moves it (and the masks) by much more. Regenerate only for an intended change, and say why
in the commit:

    .venv/bin/python -m tests.rl.test_golden --write
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from stable_baselines3 import DQN, PPO, SAC, TD3

from sparseapps.core import SparsityConfig
from sparseapps.core.masks import get_mask
from sparseapps.rl import DynamicSparsityCallback

GOLDEN = Path(__file__).with_name("golden_callback.json")
TINY = {"net_arch": [16, 16]}
ON_POLICY = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "policy_kwargs": TINY}
OFF_POLICY = {"learning_starts": 50, "batch_size": 32, "policy_kwargs": TINY}

# name -> (algorithm, env, kwargs, env steps, preset, update interval, callback options)
CASES: dict[str, tuple[type, str, dict[str, Any], int, str, int, dict[str, Any]]] = {
    "ppo-rigl": (PPO, "CartPole-v1", ON_POLICY, 512, "rigl", 4, {}),
    "ppo-set": (PPO, "CartPole-v1", ON_POLICY, 512, "set", 4, {}),
    "ppo-rigl-critic-ratio": (PPO, "CartPole-v1", ON_POLICY, 512, "rigl", 4, {"critic_density_ratio": 2.0}),
    "sac-rigl": (SAC, "Pendulum-v1", OFF_POLICY, 250, "rigl", 20, {}),
    "sac-set-sparse-outputs": (
        SAC,
        "Pendulum-v1",
        OFF_POLICY,
        250,
        "set",
        20,
        {"dense_output_layers": False},
    ),
    "td3-rigl": (TD3, "Pendulum-v1", OFF_POLICY, 250, "rigl", 20, {}),
    "dqn-set": (
        DQN,
        "CartPole-v1",
        {**OFF_POLICY, "train_freq": 4, "gradient_steps": 2, "target_update_interval": 8},
        250,
        "set",
        10,
        {},
    ),
}


def _mask_digest(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for fqn in sorted(masks):
        digest.update(fqn.encode())
        digest.update(masks[fqn].to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _norm(module: torch.nn.Module) -> float:
    return float(torch.cat([p.detach().reshape(-1).double() for p in module.parameters()]).norm())


def run_case(name: str) -> dict[str, Any]:
    """Trains case ``name`` and returns what the golden file records."""
    algorithm, env, kwargs, steps, preset, interval, options = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = algorithm("MlpPolicy", env, seed=0, device="cpu", **json.loads(json.dumps(kwargs)))
        config = SparsityConfig.preset(preset, sparsity=0.8, update_interval=interval, seed=0)
        callback = DynamicSparsityCallback(config, **options)
        model.learn(steps, callback=callback)
    finally:
        torch.set_num_threads(threads)
    record: dict[str, Any] = {"policy_norm": _norm(model.policy), "networks": {}}
    for network_name, engine in callback.engines.items():
        network = callback.networks[network_name]
        target_masks = {}
        if network.target is not None:
            for fqn in engine.masks:
                target_module = network.target.get_submodule(fqn.rpartition(".")[0])
                mask = get_mask(target_module, fqn.rpartition(".")[2])
                assert mask is not None, fqn
                target_masks[fqn] = mask
        record["networks"][network_name] = {
            "masks": _mask_digest(engine.masks),
            "target_masks": _mask_digest(target_masks) if target_masks else None,
            "nnz": {fqn: int(mask.sum()) for fqn, mask in engine.masks.items()},
            "steps": engine.step,
            "weight_norm": _norm(network.network),
            "target_norm": _norm(network.target) if network.target is not None else None,
            "updates": [
                [update["step"], {fqn: t["grown"] for fqn, t in update["tensors"].items()}]
                for update in engine.history
            ],
        }
    return record


@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_matches_its_golden_output(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())["cases"]
    assert name in golden, f"no golden output for {name!r}: regenerate {GOLDEN.name} (see module docstring)"
    got, expected = run_case(name), golden[name]
    assert sorted(got["networks"]) == sorted(expected["networks"])
    for network_name, want in expected["networks"].items():
        have = got["networks"][network_name]
        for key in ("nnz", "steps", "updates", "masks", "target_masks"):
            assert have[key] == want[key], f"{network_name}: {key}"
        for key in ("weight_norm", "target_norm"):
            if want[key] is None:
                assert have[key] is None, f"{network_name}: {key}"
            else:
                assert math.isclose(have[key], want[key], rel_tol=1e-6), f"{network_name}: {key}"
    assert math.isclose(got["policy_norm"], expected["policy_norm"], rel_tol=1e-6)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python -m tests.rl.test_golden --write  (rewrites {GOLDEN})")
    record = {"torch": torch.__version__, "cases": {name: run_case(name) for name in sorted(CASES)}}
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
