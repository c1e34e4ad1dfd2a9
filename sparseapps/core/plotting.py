"""The two steps every plot of the package shares: pyplot on the file-only backend, and an atomic PNG write.

Plots are the last step of a run, so matplotlib is imported on first use (importing the package does not load it),
always with the ``Agg`` backend (no display is needed or opened). A figure is written through
:func:`sparseapps.core.io.write_atomic`, so an interrupted run never leaves a truncated PNG where an older one was.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> plt = pyplot()
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([0, 1], [1, 0])
    >>> path = save_figure(fig, Path(tempfile.mkdtemp()) / "line.png")
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseapps.core.io import write_atomic

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Lays ``fig`` out tightly, writes it as a PNG at ``path`` atomically and closes it (also on error); returns
    the path."""
    path = Path(path)
    try:
        fig.tight_layout()
        write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
    return path
