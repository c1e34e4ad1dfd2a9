"""Capacity plans: how many weights of each isolated layer every task gets, in the order tasks arrive.

Each task's subnetwork gets, per isolated layer, the nnz that ``target_nnz`` gives a network at the configured
sparsity under its distribution (optionally the first layer at its whole fair share, ``size // n_tasks``, as
RigL's uniform keeps the first layer dense). ``IsolationConfig.capacity`` says what happens when the tasks do not
fit:

- ``"equal"``: every task gets exactly its target; ``n_tasks * target > layer size`` is a ``ValueError`` before
  any training (more tasks than the capacity allows).
- ``"redistribute"``: a layer gives a task at most its fair share of what is free (``free // tasks left``) and
  the surplus goes to the other layers by the same distribution; tasks get fewer weights than the target only
  when the whole network cannot hold ``n_tasks`` targets.
- ``"free"``: each layer gives a task ``density_l * free_l`` (the density computed over the free capacity: in
  Yildirim et al.'s code each task draws a fresh mask at the density over the whole network and reuses the
  frozen weights it overlaps, so it adds new weights at that density of the free ones). Nothing is capped: it
  never runs out, later tasks get geometrically fewer new weights, and a layer ERK makes dense is taken whole by
  the first task (later tasks can only reuse it, so that needs ``forward_transfer``; under strict isolation it
  is an error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from sparseapps.continual.config import IsolationConfig
from sparseapps.continual.layers import MAX_TASKS
from sparseapps.core.distributions import target_nnz
from sparseapps.core.validation import check_int


def _fair_shares(free: Mapping[str, int], tasks_left: int) -> dict[str, int]:
    return {fqn: n // tasks_left for fqn, n in free.items()}


def _capped_distribution(
    shapes: Mapping[str, Sequence[int]], budget: int, caps: Mapping[str, int], distribution: str
) -> dict[str, int]:
    """``budget`` nonzeros split by ``distribution`` with no tensor above its cap; capped tensors' surplus is
    re-split over the others (``target_nnz`` solved again on the rest). Less than ``budget`` when caps bind all."""
    counts: dict[str, int] = {}
    open_fqns = list(shapes)
    while open_fqns:
        rest = budget - sum(counts.values())
        if rest <= 0:
            counts.update({fqn: 0 for fqn in open_fqns})
            break
        if rest >= sum(caps[fqn] for fqn in open_fqns):
            counts.update({fqn: caps[fqn] for fqn in open_fqns})
            break
        total = sum(math.prod(shapes[fqn]) for fqn in open_fqns)
        trial = target_nnz({fqn: shapes[fqn] for fqn in open_fqns}, rest / total, distribution)
        over = [fqn for fqn in open_fqns if trial[fqn] > caps[fqn]]
        if not over:
            counts.update(trial)
            break
        for fqn in over:
            counts[fqn] = caps[fqn]
        open_fqns = [fqn for fqn in open_fqns if fqn not in over]
    return counts


def plan_capacity(
    shapes: Mapping[str, Sequence[int]],
    n_tasks: int,
    config: IsolationConfig,
) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Weights per layer for each task, in the order tasks arrive; a pure function of shapes and the config.

    Args:
        shapes: ``{fqn: shape}`` of the isolated weights, in forward order.
        n_tasks: how many tasks the network must hold.
        config: sparsity, distribution, first-layer option and capacity policy.

    Returns:
        ``(target, plan)``: ``target[fqn]`` is one task's nnz when nothing limits it, ``plan[k][fqn]`` the nnz the
        ``k``-th task gets.

    Raises:
        ValueError: ``capacity='equal'`` and ``n_tasks`` targets exceed a layer (more tasks than the capacity
            allows), or, under strict isolation, a task would get no weight in some layer.

    Example:
        >>> from sparseapps.core import SparsityConfig
        >>> uniform = SparsityConfig(sparsity=0.5, distribution="uniform", grow="random")
        >>> config = IsolationConfig(sparsity=uniform, capacity="redistribute")
        >>> plan_capacity({"a": (4, 10)}, 3, config)
        ({'a': 20}, [{'a': 13}, {'a': 13}, {'a': 14}])
    """
    n_tasks = check_int("n_tasks", n_tasks, low=1, high=MAX_TASKS)
    if not shapes:
        raise ValueError("shapes must name at least one isolated layer, got none")
    sizes = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
    core = config.sparsity
    names = list(shapes)
    first = names[0] if core.dense_first_layer else None
    sparse = [fqn for fqn in names if fqn != first]
    density_profile = (
        target_nnz({fqn: shapes[fqn] for fqn in sparse}, core.density, core.distribution) if sparse else {}
    )
    target = {fqn: sizes[fqn] // n_tasks if fqn == first else density_profile[fqn] for fqn in names}
    # target_nnz rounds each layer to an integer; a target above the fair share by rounding alone
    # (n_tasks x (target - 1) < size) is rounded down so that density 1 / n_tasks fits exactly.
    target = {
        fqn: sizes[fqn] // n_tasks if n * n_tasks > sizes[fqn] and (n - 1) * n_tasks < sizes[fqn] else n
        for fqn, n in target.items()
    }

    plan: list[dict[str, int]] = []
    if config.capacity == "equal":
        over = {fqn: n for fqn, n in target.items() if n * n_tasks > sizes[fqn]}
        if over:
            details = ", ".join(
                f"{fqn}: {n_tasks} x {n} = {n_tasks * n} > {sizes[fqn]}" for fqn, n in over.items()
            )
            raise ValueError(
                f"capacity: expected n_tasks x (weights per task) <= layer size in every isolated layer, got "
                f"{details} ({n_tasks} tasks at sparsity {core.sparsity} with distribution "
                f"{core.distribution!r}); raise the sparsity, use fewer tasks"
                + (", distribution='uniform'" if core.distribution != "uniform" else "")
                + ", or capacity='redistribute' / 'free'"
            )
        plan = [dict(target) for _ in range(n_tasks)]
    else:
        free = dict(sizes)
        budget = sum(target[fqn] for fqn in sparse)
        for k in range(n_tasks):
            caps = _fair_shares(free, n_tasks - k)
            if config.capacity == "redistribute":
                counts = _capped_distribution(
                    {fqn: shapes[fqn] for fqn in sparse}, budget, caps, core.distribution
                )
            else:
                counts = {fqn: round(density_profile[fqn] / sizes[fqn] * free[fqn]) for fqn in sparse}
            if first is not None:
                counts[first] = caps[first]
            allocation = {fqn: counts[fqn] for fqn in names}
            for fqn, n in allocation.items():
                free[fqn] -= n
            plan.append(allocation)
    if not config.forward_transfer:
        for k, allocation in enumerate(plan):
            empty = [fqn for fqn, n in allocation.items() if n == 0]
            if empty:
                raise ValueError(
                    f"capacity: expected every task to get at least one weight in every isolated layer under "
                    f"strict isolation, got none for task #{k} (0-based arrival order) in {empty} with "
                    f"{n_tasks} tasks at sparsity {core.sparsity}, distribution {core.distribution!r}, "
                    f"capacity {config.capacity!r}; lower the sparsity, use fewer tasks or forward_transfer=True"
                )
    return target, plan
