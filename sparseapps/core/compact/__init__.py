"""Trainable compact layers: only the active weights are stored, and forward and backward are sparse.

:class:`CompactLinear` holds ``values [nnz]`` + CSR indices and trains through a custom autograd function over
the compiled sparse kernels (forward, input gradient over the transposed structure, weight gradient on the
active entries only).
"""

from sparseapps.core.compact.layer import CompactLinear, Repack, compact_linear

__all__ = ["CompactLinear", "Repack", "compact_linear"]
