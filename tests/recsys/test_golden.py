"""Golden outputs of recsys training: each method's final masks, weights and metrics after a short run, recorded
before the recsys part of the one-engine redesign (DSL on the score registry, data and train split by job).

The runs are tiny (40 users, 60 items, 6 epochs of 15 steps, a topology update every 5 steps); masks are compared
exactly (SHA-256 of the mask bits), the drop/grow history exactly, and the weights' norm and the test metrics with
a relative tolerance of 1e-6, which float rounding on another CPU stays far inside, while any change of logic or of
the order of random draws moves them by much more. Regenerate only for an intended change, and say why:

    .venv/bin/python -m tests.recsys.test_golden --write
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseapps.recsys.data import split_interactions, synthetic_interactions
from sparseapps.recsys.train import TrainConfig, train
from tests.core.test_golden import _mask_digest

GOLDEN = Path(__file__).with_name("golden_recsys.json")
BASE: dict[str, Any] = dict(
    dataset="synthetic-ml-100k",
    dim=8,
    epochs=6,
    batch_size=64,
    lr=0.02,
    update_interval=5,
    ks=(5, 10),
    selection_metric="recall@10",
    density=0.25,
)
CASES: dict[str, dict[str, Any]] = {
    "mf dense": dict(method="dense"),
    "mf dsl": dict(method="dsl"),
    "mf dsl published": dict(method="dsl", init="random", grow="gradient"),
    "mf dsl per_table prefix bags": dict(
        method="dsl", init="prefix", budget="per_table", collection="embedding_bag"
    ),
    "mf static": dict(method="static"),
    "mf prune": dict(method="prune"),
    "mf pep": dict(method="pep"),
    "lightgcn dsl": dict(model="lightgcn", layers=2, method="dsl"),
    "neumf dsl": dict(model="neumf", method="dsl"),
}


def _split() -> Any:
    rows = synthetic_interactions(n_users=40, n_items=60, n_interactions=1200, min_per_user=10, seed=3)
    return split_interactions(rows, seed=0, description="tiny synthetic")


def run_case(name: str) -> dict[str, Any]:
    """Trains case ``name`` into a scratch directory and returns what the golden file records."""
    config = TrainConfig(**{**BASE, **CASES[name]})
    with tempfile.TemporaryDirectory() as out:
        results = train(config, out, progress=False, split=_split())
        state = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    model = state["model"]
    masks = {key: value for key, value in model.items() if key.endswith("_mask")}
    weights = torch.cat(
        [value.reshape(-1).double() for key, value in sorted(model.items()) if key.endswith("weight")]
    )
    history = state["sparse"]["history"] if state["sparse"] is not None else []
    return {
        "masks": _mask_digest(masks),
        "nnz": {key: int(mask.sum()) for key, mask in masks.items()},
        "weight_norm": float(weights.norm()),
        "test": results["test"],
        "best_epoch": results["best_epoch"],
        "updates": [
            [record["step"], {k: t["grown"] for k, t in record["tensors"].items()}] for record in history
        ],
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_matches_its_golden_output(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())["cases"][name]
    result = run_case(name)
    assert result["masks"] == golden["masks"], f"{name}: masks changed"
    assert result["nnz"] == golden["nnz"]
    assert result["updates"] == golden["updates"], f"{name}: drop/grow history changed"
    assert result["best_epoch"] == golden["best_epoch"]
    assert math.isclose(result["weight_norm"], golden["weight_norm"], rel_tol=1e-6)
    for metric, value in golden["test"].items():
        assert math.isclose(result["test"][metric], value, rel_tol=1e-6, abs_tol=1e-9), metric


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(
        json.dumps({"cases": {name: run_case(name) for name in sorted(CASES)}}, indent=1, sort_keys=True)
        + "\n"
    )
    print(f"wrote {GOLDEN}")
