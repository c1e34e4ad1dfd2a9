"""Trainable compact layers: only the active weights are stored, and forward and backward are sparse.

:class:`CompactEmbedding` does the same for embedding tables (each row's active entries, CSR), driven by the
same engine.

``to_compact(model, config)`` turns the Linear layers that ``config`` sparsifies into :class:`CompactLinear`
layers (``values [nnz]`` + CSR indices, custom autograd over the compiled sparse kernels); with
``SparsityConfig(storage="compact")`` the engine drives them through the same score registry and updater as
masked-dense tensors, from the same masks for the same seed, re-packing values and optimizer state at each
topology update. ``condense`` exports them for inference like masked layers.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
    >>> config = SparsityConfig.preset("rigl", sparsity=0.9, storage="compact", seed=0)
    >>> model = to_compact(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), config)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> sparsity = DynamicSparsity(model, optimizer, config, total_steps=1000)
    >>> loss = model(torch.randn(8, 64)).sum(); loss.backward(); optimizer.step()
    >>> model[0].values.shape == model[0].values.grad.shape == (model[0].nnz,)
    True
"""

from sparseapps.core.compact.convert import to_compact
from sparseapps.core.compact.embedding import CompactEmbedding, compact_lookup
from sparseapps.core.compact.layer import CompactLinear, Repack, compact_linear

__all__ = ["CompactEmbedding", "CompactLinear", "Repack", "compact_linear", "compact_lookup", "to_compact"]
