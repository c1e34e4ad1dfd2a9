"""sparseapps.core: masks, sparsity distributions, drop/grow criteria, schedules and the DST engine (torch only).

Example:
    >>> import torch
    >>> from sparseapps.core import DynamicSparsity, SparsityConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> sparsity = DynamicSparsity(model, optimizer, SparsityConfig.preset("rigl", sparsity=0.9), total_steps=100)
"""

from sparseapps.core import rules, scores
from sparseapps.core.accounting import SparsityReport, TensorReport, training_flops_per_step
from sparseapps.core.compact import CompactLinear, to_compact
from sparseapps.core.config import PRESETS, ConfigMismatchError, SparsityConfig
from sparseapps.core.distributions import target_nnz
from sparseapps.core.engine import DynamicSparsity
from sparseapps.core.finite import NonFiniteGradientError
from sparseapps.core.kernels import CondenseConfig, condense
from sparseapps.core.masks import get_mask
from sparseapps.core.selection import select_tensors

__all__ = [
    "PRESETS",
    "CompactLinear",
    "CondenseConfig",
    "ConfigMismatchError",
    "DynamicSparsity",
    "NonFiniteGradientError",
    "SparsityConfig",
    "SparsityReport",
    "TensorReport",
    "condense",
    "get_mask",
    "rules",
    "scores",
    "select_tensors",
    "target_nnz",
    "to_compact",
    "training_flops_per_step",
]
