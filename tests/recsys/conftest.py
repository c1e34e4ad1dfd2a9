"""Fixtures for the recsys tests: tiny GroupLens-like archives built on the fly, served through file:// URLs."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sparseapps.recsys import data
from sparseapps.recsys.data import InteractionSplit, split_interactions, synthetic_interactions

# (user, item, rating, timestamp): user 1 rated three items, user 2 two, user 3 one; one half-star rating.
RATINGS = [
    (1, 10, 5.0, 978300760),
    (1, 20, 3.0, 978302109),
    (2, 10, 4.0, 978301968),
    (1, 30, 4.5, 978300275),
    (3, 20, 1.0, 978824291),
    (2, 30, 2.0, 978302268),
]


def ratings_text(format: str, rows: list[tuple[int, int, float, int]] = RATINGS) -> bytes:
    """The bytes of a ratings file in one of MovieLens' layouts."""
    if format == "u.data":
        lines = [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in rows]
    elif format == "dat":
        lines = [f"{u}::{i}::{r:g}::{t}" for u, i, r, t in rows]
    else:
        lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r:g},{t}" for u, i, r, t in rows]
    return ("\n".join(lines) + "\n").encode()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip archive holding ``members`` (name -> content)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture
def serve_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Registers a local file as the GroupLens archive of ``name``.

    Call ``serve_archive(name, content_path, md5=None)``: the registry entry of ``name`` gets a file:// URL to
    ``content_path`` and ``md5`` (default: the file's real MD5). Returns the path.
    """

    def serve(name: str, content: Path, md5: str | None = None) -> Path:
        spec = data.MOVIELENS_ARCHIVES[name]
        fake = dataclasses.replace(spec, url=content.resolve().as_uri(), md5=md5 or md5_of(content))
        monkeypatch.setitem(data.MOVIELENS_ARCHIVES, name, fake)
        return content

    return serve


@pytest.fixture
def fake_archive(tmp_path: Path) -> Callable[[str], Path]:
    """``fake_archive(name)``: a small well-formed archive of ``name`` holding :data:`RATINGS` in its layout."""

    def build(name: str) -> Path:
        spec = data.MOVIELENS_ARCHIVES[name]
        served = tmp_path / "served"
        served.mkdir(exist_ok=True)
        readme = f"{spec.member.split('/')[0]}/README"
        return write_zip(served / spec.filename, {readme: b"fake", spec.member: ratings_text(spec.format)})

    return build


def expected_arrays() -> dict[str, np.ndarray]:
    table = np.array(RATINGS, dtype=np.float64)
    return {
        "users": table[:, 0].astype(np.int64),
        "items": table[:, 1].astype(np.int64),
        "ratings": table[:, 2].astype(np.float32),
        "timestamps": table[:, 3].astype(np.int64),
    }


@pytest.fixture(scope="module")
def tiny_split() -> InteractionSplit:
    """40 users, 60 items, 1,200 interactions (at least 10 per user), split 80/10/10."""
    rows = synthetic_interactions(n_users=40, n_items=60, n_interactions=1200, min_per_user=10, seed=3)
    return split_interactions(rows, seed=0, description="tiny synthetic")
