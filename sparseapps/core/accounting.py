"""Parameters, bytes and FLOPs of dense vs sparse tensors: the numbers behind every comparison table."""

from __future__ import annotations

import math
from dataclasses import dataclass


def index_bytes(width: int) -> int:
    """Bytes of one column index into a row of ``width`` entries: 1 (uint8), 2 (int16) or 4 (int32)."""
    if width <= 256:
        return 1
    if width <= 32768:
        return 2
    return 4


def forward_flops(kind: str, shape: tuple[int, ...], nnz: int, positions: int = 1) -> int:
    """Multiply-adds counted as 2 FLOPs, per sample, of a layer whose weight has ``nnz`` nonzeros.

    ``positions`` is how many times the weight is applied per sample (output pixels of a conv, tokens of a
    sequence). Embedding lookups cost no FLOPs.

    Example:
        >>> forward_flops("linear", (10, 20), 200), forward_flops("linear", (10, 20), 20)
        (400, 40)
    """
    if kind == "embedding":
        return 0
    return 2 * nnz * positions


def compressed_bytes(shape: tuple[int, ...], nnz: int, value_bytes: int = 4) -> int:
    """Bytes of a CSR-like form: values + per-entry column indices (narrowest type) + int32 row offsets."""
    rows = shape[0]
    width = math.prod(shape[1:])
    return nnz * (value_bytes + index_bytes(width)) + 4 * (rows + 1)


@dataclass(frozen=True)
class TensorReport:
    """One sparse tensor: shape, nnz, density, FLOPs per sample and bytes, dense vs sparse."""

    fqn: str
    kind: str
    shape: tuple[int, ...]
    nnz: int
    density: float
    flops_dense: int
    flops_sparse: int
    bytes_dense: int
    bytes_sparse: int
    ever_active: int | None = None  # entries active at any time so far (dynamic runs), for the ITOP rate

    @property
    def itop_rate(self) -> float | None:
        """In-time over-parameterization rate (Liu et al. 2021): the fraction of entries ever active."""
        return None if self.ever_active is None else self.ever_active / math.prod(self.shape)

    @classmethod
    def of(
        cls,
        fqn: str,
        kind: str,
        shape: tuple[int, ...],
        nnz: int,
        positions: int = 1,
        ever_active: int | None = None,
    ) -> TensorReport:
        numel = math.prod(shape)
        return cls(
            fqn=fqn,
            kind=kind,
            shape=shape,
            nnz=nnz,
            density=nnz / numel,
            flops_dense=forward_flops(kind, shape, numel, positions),
            flops_sparse=forward_flops(kind, shape, nnz, positions),
            bytes_dense=4 * numel,
            bytes_sparse=compressed_bytes(shape, nnz),
            ever_active=ever_active,
        )


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor rows plus totals; ``str()`` gives a table."""

    rows: list[TensorReport]

    @property
    def numel(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.rows)

    @property
    def density(self) -> float:
        return self.nnz / self.numel

    @property
    def flops_dense(self) -> int:
        return sum(r.flops_dense for r in self.rows)

    @property
    def flops_sparse(self) -> int:
        return sum(r.flops_sparse for r in self.rows)

    @property
    def itop_rate(self) -> float | None:
        """The fraction of all sparse tensors' entries ever active (``None`` where that is not tracked)."""
        if any(r.ever_active is None for r in self.rows):
            return None
        return sum(r.ever_active or 0 for r in self.rows) / self.numel

    def to_dict(self) -> dict[str, object]:
        return {
            "density": self.density,
            "itop_rate": self.itop_rate,
            "nnz": self.nnz,
            "numel": self.numel,
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "tensors": [r.__dict__ | {"shape": list(r.shape), "itop_rate": r.itop_rate} for r in self.rows],
        }

    def __str__(self) -> str:
        itop = self.itop_rate is not None
        header = f"{'tensor':<32} {'shape':>16} {'nnz':>10} {'density':>8} {'MFLOPs dense':>13} {'sparse':>9}"
        header += f" {'ITOP':>7}" if itop else ""
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r.fqn:<32} {'x'.join(map(str, r.shape)):>16} {r.nnz:>10} {r.density:>8.4f} "
                f"{r.flops_dense / 1e6:>13.3f} {r.flops_sparse / 1e6:>9.3f}"
                + (f" {r.itop_rate:>7.4f}" if itop else "")
            )
        lines.append(
            f"{'total':<32} {'':>16} {self.nnz:>10} {self.density:>8.4f} "
            f"{self.flops_dense / 1e6:>13.3f} {self.flops_sparse / 1e6:>9.3f}"
            + (f" {self.itop_rate:>7.4f}" if itop else "")
        )
        return "\n".join(lines)


def training_flops_per_step(
    forward_dense: int, forward_sparse: int, update_interval: int | None, dense_gradient_at_updates: bool
) -> tuple[float, float]:
    """Per-sample training FLOPs of one step, dense vs sparse, as RigL counts them.

    A step is a forward plus a backward of twice its cost. Sparse training runs all three sparse; methods
    that need a dense gradient (RigL) pay one dense weight-gradient pass every ``update_interval`` steps.

    Returns:
        ``(dense, sparse)`` FLOPs per sample per step (amortized).
    """
    dense = 3.0 * forward_dense
    sparse = 3.0 * forward_sparse
    if dense_gradient_at_updates and update_interval:
        sparse += (forward_dense - forward_sparse) / update_interval
    return dense, sparse
