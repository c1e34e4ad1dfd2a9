"""Golden outputs of the engine: every preset's masks after a short run, recorded before the one-engine redesign.

The run is tiny (an MLP 16-32-32-4, 60 SGD steps, an update every 10 steps) and its masks are compared exactly
(SHA-256 of the mask bits); the weights' norm with a relative tolerance of 1e-6, which float rounding on another
CPU stays far inside, while any change of logic or of the order of random draws moves it (and the masks) by much
more. Regenerate only for an intended change, and say why in the commit:

    .venv/bin/python -m tests.core.test_golden --write
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
import torch.nn.functional as F
from torch import nn

from sparseapps.core import PRESETS, DynamicSparsity, SparsityConfig

GOLDEN = Path(__file__).with_name("golden_engine.json")
STEPS, INTERVAL = 60, 10


def _mask_digest(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for fqn in sorted(masks):
        digest.update(fqn.encode())
        digest.update(masks[fqn].to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_preset(name: str) -> dict[str, Any]:
    """Trains the tiny MLP with preset ``name`` and returns what the golden file records."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    overrides: dict[str, Any] = {"sparsity": 0.8, "seed": 0}
    fields = PRESETS[name]
    if fields.get("n_m"):  # an N:M preset keeps its own sparsity, 1 - n/m
        del overrides["sparsity"]
    if fields.get("method") == "dst":
        overrides["update_interval"] = INTERVAL
    if fields.get("method") == "gmp":
        overrides["pruning_interval"] = INTERVAL
    if fields.get("method") == "synflow":
        overrides["foresight_iterations"] = 5
    config = SparsityConfig.preset(name, **overrides)
    sparsity = DynamicSparsity(model, optimizer, config, total_steps=STEPS)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, 8, 16, generator=generator)
    targets = torch.randint(0, 4, (STEPS, 8), generator=generator)
    if name in ("snip", "grasp", "synflow"):
        sparsity.prune_at_initialization(inputs[0], targets[0], F.cross_entropy)
    for step in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[step]), targets[step]).backward()
        optimizer.step()
    if name == "lottery":
        sparsity.next_lottery_round()
    weights = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    return {
        "masks": _mask_digest(sparsity.masks),
        "nnz": {fqn: int(mask.sum()) for fqn, mask in sparsity.masks.items()},
        "weight_norm": float(weights.norm()),
        "updates": [
            [record["step"], {fqn: t["grown"] for fqn, t in record["tensors"].items()}]
            for record in sparsity.history
        ],
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_its_golden_output(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())["presets"]
    assert name in golden, (
        f"no golden output for preset {name!r}: regenerate {GOLDEN.name} (see module docstring)"
    )
    got, expected = run_preset(name), golden[name]
    assert got["nnz"] == expected["nnz"]
    assert got["updates"] == expected["updates"]
    assert got["masks"] == expected["masks"]
    assert math.isclose(got["weight_norm"], expected["weight_norm"], rel_tol=1e-6)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python -m tests.core.test_golden --write  (rewrites {GOLDEN})")
    record = {"torch": torch.__version__, "presets": {name: run_preset(name) for name in sorted(PRESETS)}}
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
