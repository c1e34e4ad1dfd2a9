"""Where data comes from: the GroupLens archive registry, downloads checked by MD5, and the local copies read first.

GroupLens archives (MD5 as published next to each archive, ``<url>.md5``):

==========  ==========  ==========================
name        ratings     ratings file in the zip
==========  ==========  ==========================
ml-100k     100,000     ``ml-100k/u.data``
ml-1m       1,000,209   ``ml-1m/ratings.dat``
ml-10m      10,000,054  ``ml-10M100K/ratings.dat``
ml-20m      20,000,263  ``ml-20m/ratings.csv``
ml-25m      25,000,095  ``ml-25m/ratings.csv``
ml-32m      32,000,204  ``ml-32m/ratings.csv``
==========  ==========  ==========================
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from sparseapps.core.io import write_atomic
from sparseapps.recsys.data.interactions import Interactions
from sparseapps.recsys.data.parsers import FORMAT_DESCRIPTIONS, RatingsFormat, parse_ratings
from sparseapps.recsys.data.recbole import find_recbole_ml100k, read_atomic_inter
from sparseapps.recsys.data.synthetic import synthetic_interactions


@dataclass(frozen=True, kw_only=True)
class MovieLensArchive:
    """Where one GroupLens MovieLens release lives and how its ratings are stored.

    Example:
        >>> MOVIELENS_ARCHIVES["ml-1m"].member
        'ml-1m/ratings.dat'
    """

    name: str = field(metadata={"help": "dataset name, e.g. 'ml-1m'"})
    url: str = field(metadata={"help": "download address of the zip archive"})
    md5: str = field(metadata={"help": "MD5 of the archive as GroupLens publishes it (<url>.md5)"})
    member: str = field(metadata={"help": "path of the ratings file inside the archive"})
    format: RatingsFormat = field(metadata={"help": "layout of the ratings file: u.data, dat or csv"})

    @property
    def filename(self) -> str:
        """The archive's file name in the cache directory, e.g. ``ml-1m.zip``."""
        return f"{self.name}.zip"


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
MOVIELENS_ARCHIVES: dict[str, MovieLensArchive] = {
    spec.name: spec
    for spec in (
        MovieLensArchive(
            name="ml-100k",
            url=f"{_GROUPLENS}/ml-100k.zip",
            md5="0e33842e24a9c977be4e0107933c0723",
            member="ml-100k/u.data",
            format="u.data",
        ),
        MovieLensArchive(
            name="ml-1m",
            url=f"{_GROUPLENS}/ml-1m.zip",
            md5="c4d9eecfca2ab87c1945afe126590906",
            member="ml-1m/ratings.dat",
            format="dat",
        ),
        MovieLensArchive(
            name="ml-10m",
            url=f"{_GROUPLENS}/ml-10m.zip",
            md5="ce571fd55effeba0271552578f2648bd",
            member="ml-10M100K/ratings.dat",
            format="dat",
        ),
        MovieLensArchive(
            name="ml-20m",
            url=f"{_GROUPLENS}/ml-20m.zip",
            md5="cd245b17a1ae2cc31bb14903e1204af3",
            member="ml-20m/ratings.csv",
            format="csv",
        ),
        MovieLensArchive(
            name="ml-25m",
            url=f"{_GROUPLENS}/ml-25m.zip",
            md5="6b51fb2759a8657d3bfcbfc42b592ada",
            member="ml-25m/ratings.csv",
            format="csv",
        ),
        MovieLensArchive(
            name="ml-32m",
            url=f"{_GROUPLENS}/ml-32m.zip",
            md5="d472be332d4daa821edc399621853b57",
            member="ml-32m/ratings.csv",
            format="csv",
        ),
    )
}

# Synthetic stand-ins sized like the real releases: (users, items, interactions).
SYNTHETIC_SIZES: dict[str, tuple[int, int, int]] = {
    "synthetic-ml-100k": (943, 1_682, 100_000),
    "synthetic-ml-1m": (6_040, 3_706, 1_000_209),
    "synthetic-ml-25m": (162_541, 59_047, 25_000_095),
}
DATASET_NAMES: tuple[str, ...] = (*MOVIELENS_ARCHIVES, *SYNTHETIC_SIZES)


def _check_dataset_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a string, got {type(name).__name__} {name!r}")
    if name not in DATASET_NAMES and not name.endswith(".inter"):
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)} or a path to a RecBole "
            "'.inter' file"
        )


def default_data_root() -> Path:
    """``$SPARSEAPPS_DATA`` if set, else ``~/.cache/sparseapps/data``."""
    return Path(os.environ.get("SPARSEAPPS_DATA", "~/.cache/sparseapps/data")).expanduser()


def _archive_spec(name: str) -> MovieLensArchive:
    if name not in MOVIELENS_ARCHIVES:
        raise ValueError(
            f"unknown MovieLens archive {name!r}; expected one of {', '.join(MOVIELENS_ARCHIVES)}"
        )
    return MOVIELENS_ARCHIVES[name]


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class DataNotFoundError(FileNotFoundError):
    """A dataset has no local copy and could not be downloaded; the message says which file to place where."""


def _where_to_place(spec: MovieLensArchive, root: Path) -> str:
    """Every local copy :func:`load_interactions` reads, in its order, with the archive's URL and MD5."""
    return (
        f"place one of these (read in this order): {root / spec.name / f'{spec.name}.inter'} "
        f"({FORMAT_DESCRIPTIONS['inter']}); {root / spec.member} ({FORMAT_DESCRIPTIONS[spec.format]}); or "
        f"{root / spec.filename}, the GroupLens archive from {spec.url} (its MD5 {spec.md5} is checked before "
        "use). --data-root (DataConfig.data_root) or $SPARSEAPPS_DATA sets the directory"
    )


def download_movielens(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Downloads a GroupLens archive into ``data_root`` once and returns its path.

    The file is streamed to a temporary file in the same directory (:func:`~sparseapps.core.io.write_atomic`), its
    MD5 compared with the published one, and only then renamed into place, so an interrupted or corrupt download
    never leaves ``<name>.zip`` behind. An archive already present is checked, not downloaded again.

    Raises:
        ValueError: unknown name, or a checksum that does not match (nothing is kept).
        DataNotFoundError: the download failed, e.g. offline (a ``FileNotFoundError``; the message says where to
            place the archive by hand, its URL and MD5).

    Example:
        >>> path = download_movielens("ml-1m", "/tmp/movielens")  # doctest: +SKIP
    """
    spec = _archive_spec(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    target = root / spec.filename
    if target.is_file():
        _check_archive_md5(target, spec)
        return target

    def fetch(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            digest = _stream_to(
                spec.url, out, progress=progress, timeout=timeout, manual_path=target, md5=spec.md5
            )
        if digest != spec.md5:
            raise ValueError(
                f"{spec.url}: downloaded archive has MD5 {digest}, expected {spec.md5} (the published checksum); "
                "nothing was kept"
            )
        try:
            with zipfile.ZipFile(temporary) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise ValueError(
                f"{spec.url}: expected the GroupLens {spec.filename} archive, got a file that is not a readable zip "
                f"({error}); nothing was kept"
            ) from error
        if spec.member not in members:
            raise ValueError(f"{spec.url}: the archive lacks {spec.member}; nothing was kept")

    write_atomic(target, fetch)
    return target


def _stream_to(
    url: str, out: IO[bytes], *, progress: bool, timeout: float, manual_path: Path, md5: str
) -> str:
    """Copies ``url`` into ``out`` and returns the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not progress
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataNotFoundError(
            f"could not download {url}: {reason}; place the archive at {manual_path} by hand (MD5 {md5})"
        ) from error
    return digest.hexdigest()


def _check_archive_md5(path: Path, spec: MovieLensArchive) -> None:
    digest = file_md5(path)
    if digest != spec.md5:
        raise ValueError(
            f"{path}: MD5 {digest} does not match the published {spec.md5} of {spec.url}; the file is corrupt or "
            "another release: delete it to download again"
        )


def read_movielens_archive(path: str | os.PathLike[str], name: str, *, verify: bool = True) -> Interactions:
    """Reads the ratings of a GroupLens archive straight from the zip.

    Args:
        path: the ``.zip`` file.
        name: which release it is (``"ml-1m"`` ...): gives the member and its format.
        verify: compare the archive's MD5 with the published one first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: checksum mismatch, not a zip archive, the ratings member missing, or rows in the wrong layout;
            the message names the file and the expected format.
    """
    spec = _archive_spec(name)
    path = Path(path)
    expected = (
        f"the GroupLens {spec.filename} archive holding {spec.member}: {FORMAT_DESCRIPTIONS[spec.format]}"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    if verify:
        _check_archive_md5(path, spec)
    try:
        with zipfile.ZipFile(path) as archive:
            if spec.member not in archive.namelist():
                raise ValueError(f"{path}: expected {expected}; the archive has no member {spec.member}")
            with archive.open(spec.member) as stream:
                return _with_source(
                    parse_ratings(stream, spec.format, source=f"{path}:{spec.member}"), str(path)
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ValueError(
            f"{path}: expected {expected}; the file is not a readable zip archive ({error})"
        ) from error


def _with_source(rows: Interactions, source: str) -> Interactions:
    return Interactions(rows.users, rows.items, rows.ratings, rows.timestamps, source)


def load_interactions(
    dataset: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> Interactions:
    """Raw interactions of a named dataset, from the first source that has them.

    For a MovieLens name the sources are tried in this order: a RecBole atomic file
    ``<data_root>/<name>/<name>.inter``; the extracted ratings file ``<data_root>/<member>``; the cached archive
    ``<data_root>/<name>.zip``; for ``ml-100k`` the atomic file inside the installed ``recbole`` package; and
    finally a download (when ``download``). A name ending in ``.inter`` is read as a RecBole atomic file;
    ``synthetic-*`` names are generated with ``seed``.

    Raises:
        ValueError: unknown dataset name, or a file in the wrong format.
        DataNotFoundError: no local copy, and ``download=False`` or the download failed (offline): a
            ``FileNotFoundError`` whose message lists each file to place where, the archive's URL and its MD5.

    Example:
        >>> rows = load_interactions("ml-100k", download=False)  # doctest: +SKIP
        >>> len(rows)  # doctest: +SKIP
        100000
    """
    _check_dataset_name(dataset)
    if dataset in SYNTHETIC_SIZES:
        n_users, n_items, n_interactions = SYNTHETIC_SIZES[dataset]
        rows = synthetic_interactions(
            n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=seed
        )
        return _with_source(rows, f"{dataset} (seed {seed})")
    if dataset not in MOVIELENS_ARCHIVES:
        return read_atomic_inter(dataset)
    spec = MOVIELENS_ARCHIVES[dataset]
    root = Path(data_root) if data_root is not None else default_data_root()
    atomic = root / dataset / f"{dataset}.inter"
    extracted = root / spec.member
    archive = root / spec.filename
    if atomic.is_file():
        return read_atomic_inter(atomic)
    if extracted.is_file():
        with open(extracted, "rb") as stream:
            return _with_source(parse_ratings(stream, spec.format, source=str(extracted)), str(extracted))
    if archive.is_file():
        return read_movielens_archive(archive, dataset)
    if dataset == "ml-100k":
        bundled = find_recbole_ml100k()
        if bundled is not None:
            return read_atomic_inter(bundled)
    if not download:
        raise DataNotFoundError(
            f"{dataset}: no local copy, and downloads are off (download=False): pass download=True or "
            f"{_where_to_place(spec, root)}"
        )
    try:
        downloaded = download_movielens(dataset, root, progress=progress)
    except DataNotFoundError as error:
        raise DataNotFoundError(
            f"{dataset}: no local copy, and the download failed ({error.__cause__ or error}); "
            f"{_where_to_place(spec, root)}"
        ) from error
    return read_movielens_archive(downloaded, dataset, verify=False)
