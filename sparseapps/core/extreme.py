"""Extreme classification: a sparse output layer over ``C >= 100k`` classes, on a synthetic task of known structure.

The output layer of a classifier over ``C`` classes from ``hidden`` features holds ``C * hidden`` weights; trained
with Adam, weights, gradients and two moments make ``4 * C * hidden * 4`` bytes (781 MiB at 100k x 512), before
the logits. A compact sparse output layer (``to_compact``: values + indices, gradients and optimizer state of ``nnz``
entries) at 95% sparsity holds a twentieth of that. This module gives the pieces to show it trains where the dense
layer does not fit (``scripts/bench_extreme.py`` measures both, ``docs/extreme.md`` reports them):

- :func:`make_extreme_data`: a seeded, offline task with known label structure. Class ``c`` (its frequency rank)
  is drawn with probability ``∝ (c + 1) ** -zipf_exponent``; classes form clusters (a two-level hierarchy: cluster
  centers ``[K, r]`` ~ N(0, 1), each class a prototype ``center + cluster_spread * N(0, 1)`` in ``r`` latent
  dimensions); an example is ``prototype + noise * N(0, 1)``, stored as its latent ``[N, r]`` float32 and int32
  label, and seen through a fixed random projection ``[r, in]`` computed per batch (the ``[N, in]`` features are
  never held).
- :class:`ExtremeClassifier`: ``[B, in] -> hidden (dense, ReLU) -> [B, C]``; the dense hidden layer is the
  intermediate layer that Ullah, Schultheis, Lasby, Ioannou & Babbar (NeurIPS 2024, "Navigating Extremes: Dynamic
  Sparsity in Large Output Spaces") put between the encoder and a fixed fan-in sparse classifier to restore
  gradient flow.
- :func:`build_model` / :func:`train_extreme` / :func:`evaluate`: the output layer dense, or compact under a
  preset (``rigl``, ``srigl``: constant fan-in, ``static``, ``set``) with ``include=("output.weight",)``, or
  ``srigl_entries``; Adam, full softmax cross-entropy; top-1 / top-5 accuracy overall and on the head and tail
  classes.

Which topology update a compact layer gets (``compact.topology.dense_view_reason``): RigL, SET and static run on
the active entries (nothing of size ``C * hidden`` is built); the engine's SRigL takes dense views at update steps
(mask, dense weight, scores and the dense gradient, each ``C * hidden``), which at 100k x 512 peaks at 1.6x the
dense model's memory (``docs/extreme.md``). ``srigl_entries`` makes the same decisions for an output layer (which
SRigL never ablates) on the active entries: :func:`constant_fan_in_output` draws the layer, :class:`OutputFanInUpdates`
updates it with :func:`fan_in_entry_update`.

Example:
    >>> task = ExtremeTask(n_classes=50, n_train=400, n_test=200, cluster_size=10, noise=0.05, seed=0)
    >>> data = make_extreme_data(task)
    >>> x, y = data.batch("train", torch.arange(4))
    >>> tuple(x.shape), y.dtype
    ((4, 128), torch.int32)
    >>> config = ExtremeConfig(method="srigl", sparsity=0.75, hidden=32, steps=60, lr=0.01, update_interval=20)
    >>> result = train_extreme(data, config)
    >>> result.fan_in_min == result.fan_in_max == 8, result.top1 > 0.5
    (True, True)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import schedules, structured
from sparseapps.core.compact import CompactLinear, to_compact
from sparseapps.core.compact.storage import CompactTensor
from sparseapps.core.compact.topology import dense_view_reason
from sparseapps.core.config import SparsityConfig
from sparseapps.core.distributions import target_nnz
from sparseapps.core.engine import DynamicSparsity
from sparseapps.core.rules import flat_nonzero

__all__ = [
    "ExtremeClassifier",
    "ExtremeConfig",
    "ExtremeData",
    "ExtremeResult",
    "ExtremeTask",
    "OutputFanInUpdates",
    "build_model",
    "constant_fan_in_output",
    "evaluate",
    "fan_in_entry_update",
    "make_extreme_data",
    "output_state_bytes",
    "train_extreme",
]

Split = Literal["train", "test"]
Method = Literal["dense", "srigl_entries", "rigl", "srigl", "set", "static"]
METHODS: tuple[str, ...] = ("dense", "srigl_entries", "rigl", "srigl", "set", "static")


@dataclass(frozen=True, kw_only=True)
class ExtremeTask:
    """A synthetic extreme-classification task: Zipf class frequencies, clusters of classes, noisy prototypes.

    Example:
        >>> ExtremeTask(n_classes=1)
        Traceback (most recent call last):
        ...
        ValueError: expected n_classes >= 2, got 1
    """

    n_classes: int = field(
        default=100_000, metadata={"help": "classes C (class c is the c-th most frequent)"}
    )
    n_train: int = field(default=200_000, metadata={"help": "training examples"})
    n_test: int = field(default=20_000, metadata={"help": "test examples (same distribution, own noise)"})
    latent_dim: int = field(default=32, metadata={"help": "latent dimensions r of prototypes and examples"})
    input_dim: int = field(default=128, metadata={"help": "input features (a fixed random projection of r)"})
    cluster_size: int = field(
        default=100, metadata={"help": "classes per cluster (the hierarchy's lower level)"}
    )
    zipf_exponent: float = field(
        default=1.0, metadata={"help": "class c drawn with p ∝ (c + 1) ** -exponent"}
    )
    cluster_spread: float = field(
        default=0.5, metadata={"help": "std of a prototype around its cluster center (centers: std 1)"}
    )
    noise: float = field(default=0.5, metadata={"help": "std of an example around its class prototype"})
    seed: int = field(default=0, metadata={"help": "seed of every draw of the task"})

    def __post_init__(self) -> None:
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"expected n_classes >= 2, got {self.n_classes!r}")
        for name in ("n_train", "n_test", "latent_dim", "input_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.cluster_size, int) or not 1 <= self.cluster_size <= self.n_classes:
            raise ValueError(
                f"expected cluster_size in [1, n_classes={self.n_classes}], got {self.cluster_size!r}"
            )
        for name in ("zipf_exponent", "cluster_spread", "noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"expected {name} >= 0 (finite), got {value!r}")

    @property
    def n_clusters(self) -> int:
        """Clusters ``K = ceil(C / cluster_size)``."""
        return -(-self.n_classes // self.cluster_size)


@dataclass
class ExtremeData:
    """A drawn task: the hierarchy, the class distribution, and the examples as latents + int32 labels.

    Attributes:
        task: what was drawn.
        centers: ``[K, r]`` cluster centers.
        cluster_of: ``[C]`` int32, each class's cluster (every cluster holds ``cluster_size`` classes, the last
            the rest; head and tail classes are spread over all clusters).
        prototypes: ``[C, r]`` class prototypes.
        probabilities: ``[C]`` float64, the class distribution (Zipf over ranks).
        projection: ``[r, in]`` the fixed map from latents to inputs.
        train_labels, test_labels: ``[N]`` int32.
        train_latent, test_latent: ``[N, r]`` float32.
    """

    task: ExtremeTask
    centers: torch.Tensor
    cluster_of: torch.Tensor
    prototypes: torch.Tensor
    probabilities: torch.Tensor
    projection: torch.Tensor
    train_labels: torch.Tensor
    train_latent: torch.Tensor
    test_labels: torch.Tensor
    test_latent: torch.Tensor

    def size(self, split: Split) -> int:
        """Examples in ``split``."""
        return self._split(split)[0].numel()

    def batch(self, split: Split, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, in] float32, y [B] int32)`` of the examples ``index [B]`` of ``split``; ``x`` is formed here."""
        labels, latent = self._split(split)
        return latent.index_select(0, index) @ self.projection, labels.index_select(0, index)

    def _split(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.train_labels, self.train_latent
        if split == "test":
            return self.test_labels, self.test_latent
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")

    def train_counts(self) -> torch.Tensor:
        """``[C]`` int64 training examples per class."""
        return torch.bincount(self.train_labels.long(), minlength=self.task.n_classes)

    def head_classes(self) -> int:
        """``h``: classes ``0 .. h-1`` (the most frequent) hold half the probability mass; the rest is the tail."""
        cumulative = torch.cumsum(self.probabilities, 0)
        return int(torch.searchsorted(cumulative, torch.tensor([0.5], dtype=cumulative.dtype)).item()) + 1

    def nbytes(self) -> int:
        """Bytes held by the drawn task."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


def make_extreme_data(task: ExtremeTask) -> ExtremeData:
    """Draws ``task`` (all from one generator seeded with ``task.seed``: same seed, same tensors).

    Example:
        >>> data = make_extreme_data(ExtremeTask(n_classes=20, n_train=100, n_test=10, cluster_size=5))
        >>> tuple(data.prototypes.shape), int(data.cluster_of.max()) + 1, data.train_labels.dtype
        ((20, 32), 4, torch.int32)
    """
    if not isinstance(task, ExtremeTask):
        raise TypeError(f"expected an ExtremeTask, got {type(task).__name__}")
    generator = torch.Generator().manual_seed(task.seed)
    r, c = task.latent_dim, task.n_classes
    centers = torch.randn(task.n_clusters, r, generator=generator)
    cluster_of = (torch.randperm(c, generator=generator) // task.cluster_size).to(torch.int32)
    prototypes = centers[cluster_of.long()] + task.cluster_spread * torch.randn(c, r, generator=generator)
    ranks = torch.arange(1, c + 1, dtype=torch.float64)
    weights = ranks.pow(-float(task.zipf_exponent))
    probabilities = weights / weights.sum()
    projection = torch.randn(r, task.input_dim, generator=generator) / math.sqrt(r)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(probabilities, n, replacement=True, generator=generator)
        latent = prototypes.index_select(0, labels) + task.noise * torch.randn(n, r, generator=generator)
        return labels.to(torch.int32), latent

    train_labels, train_latent = draw(task.n_train)
    test_labels, test_latent = draw(task.n_test)
    return ExtremeData(
        task=task,
        centers=centers,
        cluster_of=cluster_of,
        prototypes=prototypes,
        probabilities=probabilities,
        projection=projection,
        train_labels=train_labels,
        train_latent=train_latent,
        test_labels=test_labels,
        test_latent=test_latent,
    )


class ExtremeClassifier(nn.Module):
    """``[B, in] -> [B, hidden]`` (dense Linear, ReLU) ``-> [B, C]`` (the ``output`` layer, to make sparse).

    Example:
        >>> model = ExtremeClassifier(input_dim=16, hidden=8, n_classes=1000)
        >>> tuple(model(torch.randn(2, 16)).shape)
        (2, 1000)
    """

    def __init__(self, input_dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden)
        self.output = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.relu(self.hidden(x)))


def constant_fan_in_output(
    linear: nn.Linear, config: SparsityConfig, generator: torch.Generator, block_rows: int = 4096
) -> CompactLinear:
    """``linear`` as a :class:`CompactLinear` whose every row (class) has the same ``k`` random inputs, ``k`` from
    ``config``'s budget (``structured.fan_in_for``); the mask is drawn ``block_rows`` rows at a time, so nothing
    beyond the ``[out, in]`` bool mask is built (``to_compact`` draws a float ``[out, in]`` and sorts it).

    Example:
        >>> config = SparsityConfig.preset("srigl", sparsity=0.75, storage="compact")
        >>> layer = constant_fan_in_output(nn.Linear(16, 6), config, torch.Generator().manual_seed(0))
        >>> layer.row_ptr.diff().tolist()
        [4, 4, 4, 4, 4, 4]
    """
    rows, width = linear.out_features, linear.in_features
    budget = target_nnz({"output.weight": (rows, width)}, config.density, config.distribution)[
        "output.weight"
    ]
    k = structured.fan_in_for(budget, rows, width)
    if k == 0:
        raise ValueError(
            f"sparsity={config.sparsity} gives no weight to each of {rows} classes of {width} inputs"
        )
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        chosen = torch.rand(stop - start, width, generator=generator).topk(k, dim=1).indices
        mask[start:stop].scatter_(1, chosen, True)
    return CompactLinear.from_linear(linear, mask)


def fan_in_entry_update(
    layer: CompactLinear,
    gradient: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    n_drop: int,
    block_rows: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SRigL's update of an output layer with constant fan-in ``k`` (which SRigL never ablates), on its entries.

    1. drop: the ``n_drop`` active weights of smallest magnitude layer-wide go (as SRigL's salient set);
    2. grow: each row regrows to ``k`` by the largest ``|g|`` of the dense gradient ``g`` among its not-kept
       inputs, ``g = dy^T x`` formed ``block_rows`` rows at a time (``[block_rows, in]``) from its factors; a
       dropped entry grown again is kept, with its value and optimizer state.

    Given factors, nothing of size ``out * in`` is built. Selection has no tie noise: ties go as ``topk`` breaks
    them.

    Args:
        layer: ``[out, in]`` compact, every row with the same number ``k`` of entries.
        gradient: the captured step's dense gradient of the weight, ``g [out, in]`` or its factors ``(dy [B, out],
            x [B, in])`` with ``g = dy^T x``.
        n_drop: weights to drop layer-wide, in ``[0, nnz]``.
        block_rows: rows of ``g`` formed at a time.

    Returns:
        ``(kept, grown)``: ascending indices into ``values`` of the entries that stay and ascending row-major
        positions of new entries, for ``CompactLinear.set_positions``.

    Example:
        >>> w = torch.tensor([[0.0, 3.0, 0.0, -1.0], [2.0, 0.0, 0.5, 0.0]])
        >>> layer = CompactLinear(w, w != 0)
        >>> dy, x = torch.tensor([[1.0, 1.0]]), torch.tensor([[4.0, 0.0, 0.0, 1.0]])
        >>> kept, grown = fan_in_entry_update(layer, (dy, x), n_drop=2)  # drops -1.0 and 0.5
        >>> kept.tolist(), grown.tolist()  # row 0 regrows column 0 (|g| = 4), row 1 column 3 (|g| = 1)
        ([0, 2], [0, 7])
    """
    rows, width = layer.out_features, layer.in_features
    fan_in = layer.row_ptr.diff()
    k = int(fan_in[0]) if rows else 0
    if not bool((fan_in == k).all()):
        raise ValueError(
            f"expected constant fan-in, got rows of {int(fan_in.min())} to {int(fan_in.max())} entries"
        )
    nnz = layer.nnz
    if not 0 <= n_drop <= nnz:
        raise ValueError(f"expected n_drop in [0, {nnz}], got {n_drop}")
    if isinstance(gradient, torch.Tensor):
        if gradient.shape != (rows, width):
            raise ValueError(f"expected a gradient [{rows}, {width}], got {tuple(gradient.shape)}")
    else:
        dy, x = gradient
        if dy.shape[1:] != (rows,) or x.shape[1:] != (width,) or dy.shape[0] != x.shape[0]:
            raise ValueError(
                f"expected dy [B, {rows}] and x [B, {width}], got {tuple(dy.shape)} and {tuple(x.shape)}"
            )
    kept_mask = torch.ones(nnz, dtype=torch.bool)
    if n_drop:
        kept_mask[layer.values.detach().abs().topk(n_drop, largest=False).indices] = False
    kept_rows = kept_mask.view(rows, k)
    grow_counts = k - kept_rows.sum(1)
    columns = layer.col_indices.long().view(rows, k)
    grown_parts = []
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        most = int(grow_counts[start:stop].max()) if stop > start else 0
        if most == 0:
            continue
        if isinstance(gradient, torch.Tensor):
            scores = gradient[start:stop].abs()
        else:
            scores = dy[:, start:stop].mT.mm(x).abs()
        block_columns, block_kept = columns[start:stop], kept_rows[start:stop]
        kept_scores = torch.where(block_kept, float("-inf"), scores.gather(1, block_columns))
        scores.scatter_(1, block_columns, kept_scores)
        chosen = scores.topk(most, dim=1).indices
        take = torch.arange(most) < grow_counts[start:stop, None]
        row_ids = torch.arange(start, stop)[:, None].expand(-1, most)
        grown_parts.append((row_ids[take] * width + chosen[take]).sort().values)
    grown = torch.cat(grown_parts) if grown_parts else torch.zeros(0, dtype=torch.long)
    positions = layer.positions()
    slot = torch.searchsorted(positions, grown).clamp_(max=max(nnz - 1, 0))
    again = positions[slot] == grown if nnz else torch.zeros_like(grown, dtype=torch.bool)
    kept_mask[slot[again]] = True  # dropped and grown again: kept, with value and state
    return flat_nonzero(kept_mask), grown[~again]


class OutputFanInUpdates:
    """SRigL's topology updates of a compact constant fan-in output layer, run on its active entries.

    Hooks ``optimizer`` (``register_step_post_hook``) like ``DynamicSparsity``: it counts steps, arms the layer's
    dense-gradient capture (kept as the factors ``dy [B, out]``, ``x [B, in]``) for the step before an update, and
    after an update step drops and regrows with :func:`fan_in_entry_update` on ``config``'s schedule
    (``update_interval``, ``end_fraction``, cosine-decayed ``drop_fraction``), then re-packs values and Adam's state
    (``CompactTensor.write_positions``: kept entries keep theirs, grown ones start at zero). The engine's SRigL
    (``method="srigl"`` here) makes the same decisions from dense views of ``out * in`` entries, which at 100k
    classes cost more memory than the dense model; this runs in ``O(nnz + block_rows * in)``.

    Example:
        >>> config = SparsityConfig.preset("srigl", sparsity=0.75, storage="compact", update_interval=2, seed=0)
        >>> layer = constant_fan_in_output(nn.Linear(8, 20), config, torch.Generator().manual_seed(0))
        >>> optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        >>> updates = OutputFanInUpdates(layer, optimizer, config, total_steps=10)
        >>> for _ in range(4):
        ...     optimizer.zero_grad(); layer(torch.randn(5, 8)).square().sum().backward(); optimizer.step()
        >>> len(updates.history), layer.row_ptr.diff().unique().tolist()
        (2, [2])
    """

    def __init__(
        self,
        layer: CompactLinear,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        total_steps: int,
        block_rows: int = 2048,
    ) -> None:
        if not isinstance(layer, CompactLinear):
            raise TypeError(f"expected a CompactLinear, got {type(layer).__name__}")
        if (config.drop, config.grow) != ("magnitude", "gradient") or not config.dynamic:
            raise ValueError(
                f"expected SRigL's magnitude drop and gradient growth, got drop={config.drop!r}, "
                f"grow={config.grow!r}, method={config.method!r}"
            )
        if total_steps < 1 or block_rows < 1:
            raise ValueError(
                f"expected total_steps >= 1 and block_rows >= 1, got {total_steps}, {block_rows}"
            )
        self.layer, self.optimizer, self.config = layer, optimizer, config
        self.total_steps, self.block_rows = total_steps, block_rows
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._tensor = CompactTensor("output.weight", layer, "linear", layer.nnz)
        optimizer.register_step_post_hook(lambda *_: self._after_step())
        self._arm()

    def _arm(self) -> None:
        self.layer.capture_dense_grad = schedules.is_update_step(self.step + 1, self.config, self.total_steps)
        self.layer.dense_grad = None

    def _after_step(self) -> None:
        self.step += 1
        if schedules.is_update_step(self.step, self.config, self.total_steps):
            self.update()
        self._arm()

    def update(self) -> None:
        """One drop/regrow of ``ceil(drop_fraction * nnz)`` weights from the captured gradient factors."""
        factors = self.layer.gradient_factors()
        # the layer keeps the factors while they are smaller than the product, else the product
        gradient = self.layer.dense_grad if factors is None else (factors[0].float(), factors[1].float())
        if gradient is None:
            raise ValueError(
                f"no gradient captured for the update at step {self.step} (the layer did not run)"
            )
        for part in gradient if isinstance(gradient, tuple) else (gradient,):
            if not bool(torch.isfinite(part).all()):
                raise ValueError(f"non-finite captured gradient at update step {self.step}")
        fraction = schedules.drop_fraction(self.step, self.config, self.total_steps)
        n_drop = math.ceil(fraction * self.layer.nnz)
        with torch.no_grad():
            kept, grown = fan_in_entry_update(self.layer, gradient, n_drop, self.block_rows)
            self._tensor.write_positions(kept, grown, self.optimizer)
        self.history.append(
            {"step": self.step, "drop_fraction": fraction, "dropped": n_drop, "grown": grown.numel()}
        )


@dataclass(frozen=True, kw_only=True)
class ExtremeConfig:
    """How the classifier is built and trained.

    Example:
        >>> ExtremeConfig(method="rigl", sparsity=1.0)
        Traceback (most recent call last):
        ...
        ValueError: expected sparsity in (0, 1) for method 'rigl', got 1.0
    """

    method: Method = field(
        default="rigl", metadata={"help": f"output layer: {', '.join(METHODS)} (all but dense: compact)"}
    )
    sparsity: float = field(default=0.95, metadata={"help": "fraction of zeros of the output layer"})
    hidden: int = field(default=512, metadata={"help": "width of the dense intermediate layer"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "examples per step (and per evaluation batch)"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate"})
    update_interval: int = field(default=100, metadata={"help": "steps between topology updates"})
    seed: int = field(default=0, metadata={"help": "seed of the initialization, the masks and the batches"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"expected method among {METHODS}, got {self.method!r}")
        if self.method != "dense" and not (
            isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity < 1.0
        ):
            raise ValueError(f"expected sparsity in (0, 1) for method {self.method!r}, got {self.sparsity!r}")
        for name in ("hidden", "steps", "batch_size", "update_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"expected lr > 0, got {self.lr!r}")

    def sparsity_config(self) -> SparsityConfig | None:
        """The output layer's compact configuration (None for ``dense``)."""
        if self.method == "dense":
            return None
        return SparsityConfig.preset(
            "srigl" if self.method == "srigl_entries" else self.method,
            sparsity=self.sparsity,
            storage="compact",
            include=("output.weight",),
            update_interval=self.update_interval,
            seed=self.seed,
        )


def build_model(
    task: ExtremeTask, config: ExtremeConfig
) -> tuple[ExtremeClassifier, torch.optim.Optimizer, DynamicSparsity | OutputFanInUpdates | None]:
    """The classifier for ``task``, Adam, and what updates the output layer's topology (None when dense).

    ``srigl_entries``: the output layer drawn with constant fan-in (:func:`constant_fan_in_output`) and updated by
    :class:`OutputFanInUpdates` on its active entries. The other sparse methods: ``to_compact`` and
    ``DynamicSparsity`` under the preset of that name (``srigl`` takes dense views at update steps).

    Raises:
        ValueError: the sparsity leaves no weight per class under constant fan-in.
    """
    torch.manual_seed(config.seed)
    model = ExtremeClassifier(task.input_dim, config.hidden, task.n_classes)
    sparsity = config.sparsity_config()
    if sparsity is None:
        return model, torch.optim.Adam(model.parameters(), lr=config.lr), None
    if config.method == "srigl_entries":
        generator = torch.Generator().manual_seed(config.seed)
        model.output = constant_fan_in_output(model.output, sparsity, generator)  # type: ignore[assignment]
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        layer = model.output
        assert isinstance(layer, CompactLinear)
        return model, optimizer, OutputFanInUpdates(layer, optimizer, sparsity, total_steps=config.steps)
    model = to_compact(model, sparsity)  # type: ignore[assignment]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return model, optimizer, DynamicSparsity(model, optimizer, sparsity, total_steps=config.steps)


def output_state_bytes(model: ExtremeClassifier, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the output layer's parameters, gradients, per-entry optimizer state and (compact) indices."""
    layer = model.output
    total = 0
    for param in layer.parameters():
        total += param.numel() * param.element_size() * (2 if param.grad is not None else 1)
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                total += value.numel() * value.element_size()
    if isinstance(layer, CompactLinear):
        total += sum(b.numel() * b.element_size() for b in layer.buffers())
    return total


@dataclass(frozen=True)
class ExtremeResult:
    """One run: test accuracy (top-1 / top-5, on head and tail classes), the output layer's shape, the speed."""

    method: str
    n_classes: int
    sparsity: float
    seed: int
    steps: int
    final_loss: float
    top1: float
    top5: float
    head_top1: float
    tail_top1: float
    head_classes: int
    output_nnz: int
    fan_in_min: int
    fan_in_max: int
    empty_classes: int
    topology_updates: int
    update_path: str
    output_state_bytes: int
    samples_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, data: ExtremeData, batch_size: int = 128) -> dict[str, float]:
    """Test accuracy: ``top1``, ``top5``, and top-1 on the examples of head and tail classes (``head_top1``,
    ``tail_top1``; :meth:`ExtremeData.head_classes`). Logits are formed ``batch_size`` examples at a time."""
    was_training = model.training
    model.eval()
    head = data.head_classes()
    hits1 = hits5 = head_hits = head_n = 0
    for start in range(0, data.size("test"), batch_size):
        index = torch.arange(start, min(start + batch_size, data.size("test")))
        x, y = data.batch("test", index)
        top = model(x).topk(min(5, data.task.n_classes), dim=1).indices
        y = y.long()
        correct1 = top[:, 0] == y
        is_head = y < head
        hits1 += int(correct1.sum())
        hits5 += int((top == y[:, None]).any(1).sum())
        head_hits += int((correct1 & is_head).sum())
        head_n += int(is_head.sum())
    model.train(was_training)
    n = data.size("test")
    tail_n = n - head_n
    return {
        "top1": hits1 / n,
        "top5": hits5 / n,
        "head_top1": head_hits / head_n if head_n else math.nan,
        "tail_top1": (hits1 - head_hits) / tail_n if tail_n else math.nan,
    }


def train_extreme(data: ExtremeData, config: ExtremeConfig) -> ExtremeResult:
    """Trains :func:`build_model` on ``data`` for ``config.steps`` Adam steps of uniformly drawn training examples
    (full softmax cross-entropy over the ``C`` classes), then evaluates on the test split.

    Raises:
        ValueError: the loss is not finite (the step is named), or the engine's own checks.
    """
    if not isinstance(data, ExtremeData):
        raise TypeError(f"expected ExtremeData, got {type(data).__name__}")
    if not isinstance(config, ExtremeConfig):
        raise TypeError(f"expected an ExtremeConfig, got {type(config).__name__}")
    model, optimizer, engine = build_model(data.task, config)
    generator = torch.Generator().manual_seed(config.seed)
    n_train = data.size("train")
    loss_value = math.nan
    tick = time.perf_counter()
    for step in range(config.steps):
        x, y = data.batch("train", torch.randint(n_train, (config.batch_size,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y.long())
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ValueError(f"non-finite loss {loss_value} at step {step} (lower lr={config.lr}?)")
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - tick
    metrics = evaluate(model, data, config.batch_size)
    layer = model.output
    if isinstance(layer, CompactLinear):
        fan_in = layer.row_ptr.diff()
        nnz = layer.nnz
    else:
        fan_in = torch.full((layer.out_features,), layer.in_features)
        nnz = layer.weight.numel()
    update_path = "none (dense)"
    if isinstance(engine, OutputFanInUpdates):
        update_path = "active entries (constant fan-in, OutputFanInUpdates)"
    elif engine is not None:
        reason = dense_view_reason(engine) if engine.config.dynamic else "static"
        update_path = "active entries" if reason is None else f"dense views: {reason}"
    return ExtremeResult(
        method=config.method,
        n_classes=data.task.n_classes,
        sparsity=1.0 - nnz / (layer.out_features * layer.in_features),
        seed=config.seed,
        steps=config.steps,
        final_loss=loss_value,
        top1=metrics["top1"],
        top5=metrics["top5"],
        head_top1=metrics["head_top1"],
        tail_top1=metrics["tail_top1"],
        head_classes=data.head_classes(),
        output_nnz=nnz,
        fan_in_min=int(fan_in.min()),
        fan_in_max=int(fan_in.max()),
        empty_classes=int((fan_in == 0).sum()),
        topology_updates=len(engine.history) if engine is not None else 0,
        update_path=update_path,
        output_state_bytes=output_state_bytes(model, optimizer),
        samples_per_second=config.steps * config.batch_size / seconds,
    )
