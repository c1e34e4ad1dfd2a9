"""Returning the memory a conversion freed to the operating system.

Converting dense tables or layers to compact storage allocates and frees temporaries of the dense size (the dense
initialization, masks, positions). glibc's allocator keeps freed chunks below its mmap threshold (which grows to
32 MB as large blocks are freed) in the process's heap, so the resident memory of a converted model can stay
where the conversion left it: measured at ML-25M scale, D = 64 (``scripts/probe_recsys_memory.py``), 108 MB above
the same model converted with the threshold fixed, and the sampler's first batch then peaked 70 MB above the
dense run's. :func:`release_free_memory` hands those free pages back (glibc's ``malloc_trim(0)``); the
conversions call it once at their end. It frees nothing in use and is a no-op where the C library is not glibc.

Example:
    >>> isinstance(release_free_memory(), bool)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Returns the free memory the C allocator holds to the operating system (``malloc_trim(0)``); True when some
    was released, False when none was or the C library is not glibc."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
