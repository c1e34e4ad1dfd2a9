"""Golden outputs of continual isolation, recorded before each task ran on the core engine (issue 14).

Seven tiny runs (an isolated MLP 16-20-12 or CNN, three tasks of a random linear rule, 30 Adam steps per task,
a topology update every 3 steps) record the ownership maps after the last task (SHA-256 of their bytes), the
accuracy over the three tasks (ACC, exact: a ratio of counts), the frozen weights' norm (relative tolerance
1e-6: float rounding on another CPU stays far inside it) and the entries grown at every update. The runs draw no
tie noise (``tie_noise=0``): the redesign changed only the order of the topology updates' random draws (every
drop score, then every grow score, instead of layer by layer), which these runs do not depend on, so they must
stay bit for bit what the code before the redesign produced. Regenerate only for an intended change, and say why
in the commit:

    .venv/bin/python -m tests.continual.test_golden --write
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sparseapps.continual.isolation import IsolationConfig, TaskIsolation
from sparseapps.continual.models import IsolatedCNN, IsolatedMLP
from sparseapps.core import SparsityConfig

GOLDEN = Path(__file__).with_name("golden_isolation.json")
SHAPE, N_TASKS, N_OUTPUTS, STEPS, BATCH = (1, 4, 4), 3, 3, 30, 16

CASES: dict[str, dict[str, Any]] = {
    "random": {"sparsity": {"sparsity": 0.7, "distribution": "uniform", "grow": "random"}},
    "gradient_transfer": {
        "sparsity": {"sparsity": 0.7, "distribution": "uniform", "grow": "gradient"},
        "forward_transfer": True,
    },
    "momentum_random_drop": {
        "sparsity": {"sparsity": 0.7, "distribution": "uniform", "grow": "momentum", "drop": "random"}
    },
    "unfired": {"sparsity": {"sparsity": 0.7, "distribution": "uniform", "grow": "unfired"}},
    "static": {"sparsity": {"sparsity": 0.7, "distribution": "uniform", "grow": "none", "method": "static"}},
    "free_first_layer": {
        "sparsity": {"sparsity": 0.6, "distribution": "uniform", "grow": "random", "dense_first_layer": True},
        "capacity": "free",
        "forward_transfer": True,
    },
    "cnn": {
        "sparsity": {"sparsity": 0.6, "distribution": "erk", "grow": "gradient"},
        "capacity": "redistribute",
        "model": "cnn",
    },
}


def _config(case: dict[str, Any]) -> IsolationConfig:
    sparsity = SparsityConfig(**case["sparsity"], update_interval=3, tie_noise=0.0, seed=0)
    return IsolationConfig(
        sparsity=sparsity,
        capacity=case.get("capacity", "equal"),
        forward_transfer=case.get("forward_transfer", False),
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _data(task: int, n: int, split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs ``[n, 1, 4, 4]`` and labels from task ``task``'s random linear rule (split 0: train, 1: test)."""
    w = torch.randn(
        SHAPE[0] * SHAPE[1] * SHAPE[2], N_OUTPUTS, generator=torch.Generator().manual_seed(100 + task)
    )
    x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1000 * split + task))
    return x, (x.reshape(n, -1) - 0.5).matmul(w).argmax(1)


def run_case(name: str) -> dict[str, Any]:
    """Trains the three tasks of case ``name`` and returns what the golden file records."""
    case = CASES[name]
    torch.manual_seed(0)
    if case.get("model") == "cnn":
        model: IsolatedMLP | IsolatedCNN = IsolatedCNN(
            input_shape=SHAPE,
            n_outputs=N_OUTPUTS,
            n_tasks=N_TASKS,
            channels=(4, 8),
            hidden=12,
            batch_norm=True,
        )
    else:
        model = IsolatedMLP(input_shape=SHAPE, n_outputs=N_OUTPUTS, n_tasks=N_TASKS, hidden=(20, 12))
    with pytest.warns(UserWarning) if case.get("capacity") == "redistribute" else contextlib.nullcontext():
        isolation = TaskIsolation(model, _config(case))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for task in range(N_TASKS):
        x, y = _data(task, STEPS * BATCH)
        isolation.begin_task(task, optimizer, total_steps=STEPS)
        model.train()
        for step in range(STEPS):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch], task), y[batch]).backward()
            optimizer.step()
        isolation.end_task()
    model.eval()
    correct = 0
    with torch.no_grad():
        for task in range(N_TASKS):
            x, y = _data(task, 200, split=1)
            correct += int((model(x, task).argmax(1) == y).sum())
    frozen = torch.cat([layer.frozen_weight.reshape(-1).double() for layer in isolation.layers.values()])
    return {
        "owners": _digest({fqn: layer.owner for fqn, layer in isolation.layers.items()}),
        "acc": correct / (200 * N_TASKS),
        "frozen_weight_norm": float(frozen.norm()),
        "updates": [
            [record["task"], record["step"], {fqn: t["grown"] for fqn, t in record["tensors"].items()}]
            for record in isolation.history
        ],
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_isolation_matches_its_golden_output(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())["cases"]
    got, expected = run_case(name), golden[name]
    assert got["updates"] == expected["updates"]
    assert got["owners"] == expected["owners"]
    assert got["acc"] == expected["acc"]
    assert math.isclose(got["frozen_weight_norm"], expected["frozen_weight_norm"], rel_tol=1e-6)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python -m tests.continual.test_golden --write  (rewrites {GOLDEN})")
    torch.set_num_threads(1)
    record = {"torch": torch.__version__, "cases": {name: run_case(name) for name in CASES}}
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
