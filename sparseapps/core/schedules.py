"""When the topology changes and by how much: pure functions of the step count."""

from __future__ import annotations

import math

from sparseapps.core.config import ONE_SHOT_METHODS, SparsityConfig


def update_window(config: SparsityConfig, total_steps: int) -> tuple[int, int]:
    """First and last optimizer step (inclusive) at which a topology update may run."""
    return math.floor(config.start_fraction * total_steps), math.floor(config.end_fraction * total_steps)


def is_update_step(step: int, config: SparsityConfig, total_steps: int) -> bool:
    """Whether a drop/grow update runs after optimizer step ``step`` (1-based).

    Example:
        >>> c = SparsityConfig(update_interval=100, end_fraction=0.75)
        >>> [s for s in (99, 100, 700, 750, 800) if is_update_step(s, c, 1000)]
        [100, 700]
    """
    start, end = update_window(config, total_steps)
    return config.dynamic and step > start and step < end and step % config.update_interval == 0


def drop_fraction(step: int, config: SparsityConfig, total_steps: int) -> float:
    """Fraction of a tensor's nnz to drop at ``step``: constant, cosine decay or linear decay to 0 at the end.

    Example:
        >>> c = SparsityConfig(drop_fraction=0.3, drop_schedule="cosine", end_fraction=0.75)
        >>> drop_fraction(0, c, 1000), round(drop_fraction(375, c, 1000), 3), drop_fraction(750, c, 1000)
        (0.3, 0.15, 0.0)
    """
    start, end = update_window(config, total_steps)
    if config.drop_schedule == "constant":
        return config.drop_fraction
    progress = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    if config.drop_schedule == "cosine":
        return config.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.drop_fraction * (1.0 - progress)


def gmp_sparsity(step: int, final_sparsity: float, config: SparsityConfig, total_steps: int) -> float:
    """Zhu & Gupta's cubic schedule: ``s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)``, 0 before ``t0``.

    Example:
        >>> c = SparsityConfig(method="gmp", grow="none", start_fraction=0.0, end_fraction=1.0)
        >>> gmp_sparsity(0, 0.9, c, 100), gmp_sparsity(50, 0.9, c, 100), gmp_sparsity(100, 0.9, c, 100)
        (0.0, 0.7875, 0.9)
    """
    start, end = update_window(config, total_steps)
    if step <= start:
        return 0.0
    progress = min((step - start) / max(end - start, 1), 1.0)
    return final_sparsity * (1.0 - (1.0 - progress) ** 3)


def is_pruning_step(step: int, config: SparsityConfig, total_steps: int) -> bool:
    """Whether a dense-to-sparse pruning step (gmp, or one_shot / obs / sparsegpt) runs after optimizer step ``step``."""
    start, end = update_window(config, total_steps)
    if config.method in ONE_SHOT_METHODS:
        return step == max(start, 1)
    if config.method == "gmp":
        return start < step <= end and ((step - start) % config.pruning_interval == 0 or step == end)
    return False
