"""The core demo: an MLP on scikit-learn's digits, dense against sparse methods at the same budget of steps.

Used by ``make demo`` (before the domain demos exist), the README's table and the learning test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import CompactLinear, DynamicSparsity, SparsityConfig, to_compact
from sparseapps.core.validation import check_choice


@dataclass(frozen=True, kw_only=True)
class DigitsRun:
    """One training run on digits."""

    method: str = field(default="rigl", metadata={"help": "'dense' or a SparsityConfig preset name"})
    sparsity: float = field(default=0.9, metadata={"help": "target sparsity (ignored for dense)"})
    hidden: int = field(default=256, metadata={"help": "width of the two hidden layers"})
    epochs: int = field(default=30, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=0.05, metadata={"help": "SGD learning rate (momentum 0.9)"})
    update_interval: int = field(default=50, metadata={"help": "optimizer steps between topology updates"})
    seed: int = field(default=0, metadata={"help": "seed of data split, init and masks"})
    rescale_initialization: bool = field(
        default=False, metadata={"help": "scale surviving initial weights to the dense output variance"}
    )
    storage: str = field(
        default="masked",
        metadata={
            "help": "'masked' (dense weights + masks) or 'compact' (active weights only; sparse-from-start)"
        },
    )

    def __post_init__(self) -> None:
        check_choice("storage", self.storage, ("masked", "compact"))


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 75/25 stratified with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_mlp(hidden: int, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``[B, n_in] -> [B, n_out]``: two hidden ReLU layers of width ``hidden``."""
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


def train_digits(run: DigitsRun) -> dict[str, object]:
    """Trains one MLP and returns test accuracy, density, FLOPs, seconds and the accuracy curve."""
    torch.manual_seed(run.seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(run.seed)
    model: nn.Module = make_mlp(run.hidden)
    steps_per_epoch = -(-len(x_train) // run.batch_size)
    total_steps = run.epochs * steps_per_epoch
    sparsity = None
    config = None
    if run.method != "dense":
        config = SparsityConfig.preset(
            run.method,
            sparsity=run.sparsity,
            seed=run.seed,
            rescale_initialization=run.rescale_initialization,
            storage=run.storage,
        )
        if config.dynamic:
            config = config.replace(update_interval=run.update_interval)
        if run.storage == "compact":
            model = to_compact(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9)
    if config is not None:
        sparsity = DynamicSparsity(model, optimizer, config, total_steps=total_steps)
        if config.method in ("snip", "grasp", "synflow"):
            sparsity.prune_at_initialization(x_train[:256], y_train[:256], F.cross_entropy)
    generator = torch.Generator().manual_seed(run.seed)
    curve = []
    start = time.perf_counter()
    rounds = sparsity.config.lottery_rounds + 1 if sparsity and sparsity.config.method == "lottery" else 1
    for round_index in range(rounds):
        for _ in range(run.epochs // rounds if rounds > 1 else run.epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            for begin in range(0, len(x_train), run.batch_size):
                index = order[begin : begin + run.batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x_train[index]), y_train[index]).backward()
                optimizer.step()
            curve.append(accuracy(model, x_test, y_test))
        if sparsity is not None and round_index < rounds - 1:
            sparsity.next_lottery_round()
    seconds = time.perf_counter() - start
    report = sparsity.report() if sparsity else None
    dense_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    dense_params += sum(math.prod(m.weight_shape) for m in model.modules() if isinstance(m, CompactLinear))
    return {
        "method": run.method,
        "storage": run.storage,
        "sparsity": 0.0 if sparsity is None else 1.0 - sparsity.density,
        "test_accuracy": curve[-1],
        "curve": curve,
        "weights_nonzero": report.nnz if report else dense_params,
        "flops_fraction": report.flops_sparse / report.flops_dense if report else 1.0,
        "seconds": seconds,
        "topology_updates": len(sparsity.history) if sparsity else 0,
        # in-time over-parameterization: the fraction of weights ever active (dynamic methods only)
        "itop_rate": report.itop_rate if report else None,
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
