"""Where the images come from: scikit-learn's digits (bundled), MNIST's idx files and CIFAR-100's pickles (local).

Nothing is downloaded. The recorded MD5 checksums (``MNIST_MD5``, ``CIFAR100_MD5``, as torchvision 0.29 records
them) are verified for the gzipped MNIST files, the CIFAR-100 tarball and its extracted ``train`` / ``test``
files; uncompressed idx files have no official checksum and are checked for format only. The CIFAR pickles are
read with an unpickler that accepts only the numpy array constructors the official files use, so a crafted file
cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sparseapps.continual.streams import LabeledImages
from sparseapps.core.mnist1d import MNIST1D_LENGTH, load_mnist1d
from sparseapps.core.validation import check_bool, check_int

DIGITS_TEST_FRACTION = 0.25
"""Share of scikit-learn's digits held out for the test streams (stratified by class)."""

MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
"""Mirrors of the official MNIST files (torchvision's list; the second is the original site)."""
MNIST_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_TARBALL = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_MD5 = {
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
_MNIST_LAYOUT = (
    "expected the official MNIST idx files (gzipped or not) directly in dataset_root or in "
    "dataset_root/MNIST/raw: " + ", ".join(f"{stem}[.gz]" for stem in MNIST_STEMS.values())
)
_CIFAR100_LAYOUT = (
    f"expected the official tarball dataset_root/{CIFAR100_TARBALL} ({CIFAR100_URL}) or its extracted files "
    f"dataset_root/{CIFAR100_FOLDER}/train and dataset_root/{CIFAR100_FOLDER}/test"
)


def load_digits_split(
    *, seed: int = 0, test_fraction: float = DIGITS_TEST_FRACTION
) -> tuple[LabeledImages, LabeledImages]:
    """scikit-learn's digits as ``[N, 1, 8, 8]`` float32 in [0, 1], split stratified by class.

    Args:
        seed: seeds the split (scikit-learn's ``random_state``).
        test_fraction: share of samples in the test split, in (0, 1).

    Returns:
        ``(train, test)``; with the defaults 1347 and 450 samples.
    """
    check_int("seed", seed, low=0, high=2**32 - 1)
    if (
        not isinstance(test_fraction, float)
        or not math.isfinite(test_fraction)
        or not 0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    targets = torch.from_numpy(digits.target.astype(np.int64))
    train_index, test_index = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return (
        LabeledImages(images=images[train_index], targets=targets[train_index]),
        LabeledImages(images=images[test_index], targets=targets[test_index]),
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str, source: str) -> None:
    actual = _md5(path)
    if actual != expected:
        raise ValueError(
            f"{path}: expected MD5 {expected} (the official file from {source}), got {actual}; the file is "
            "corrupt or not the official one"
        )


def read_idx(path: str | Path, *, ndim: int) -> torch.Tensor:
    """Reads an idx-ubyte file (MNIST's format), gzipped when the name ends in ``.gz``.

    Format: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions, each dimension as a
    big-endian uint32, then the bytes in row-major order.

    Args:
        path: the file.
        ndim: the expected number of dimensions (3 for images, 1 for labels).

    Returns:
        A uint8 tensor of the file's shape, e.g. ``[N, 28, 28]`` or ``[N]``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a well-formed idx-ubyte file of ``ndim`` dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected an idx-ubyte file, found none")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path}: expected a gzip-compressed idx file, could not decompress it: {error}"
        ) from error
    header = raw[:4]
    if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08 or header[3] != ndim:
        raise ValueError(
            f"{path}: expected the idx magic number 0x0000 0x08 {ndim:#04x} (unsigned bytes, {ndim} dimensions), "
            f"got {header.hex() or 'an empty file'}"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: expected a {header_size}-byte header, got {len(raw)} bytes in all")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n_values = math.prod(shape)
    if len(raw) - header_size != n_values:
        raise ValueError(
            f"{path}: expected {n_values} data bytes for shape {shape}, got {len(raw) - header_size}; "
            "the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)
    return torch.from_numpy(data.copy())


def _find_mnist_file(root: Path, stem: str) -> Path:
    candidates = [folder / name for folder in (root, root / "MNIST" / "raw") for name in (f"{stem}.gz", stem)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found under {root} (looked for {', '.join(map(str, candidates))}); "
        f"{_MNIST_LAYOUT}; official files at {MNIST_URLS[0]}"
    )


def _check_root(dataset_root: str | Path | None, name: str, layout: str) -> Path:
    if dataset_root is None:
        raise ValueError(f"{name} reads local files: expected dataset_root, got None; {layout}")
    if not isinstance(dataset_root, str | Path):
        raise TypeError(f"dataset_root: expected a str or Path, got {type(dataset_root).__name__}")
    root = Path(dataset_root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_root {root} for {name}: expected an existing folder; {layout}")
    return root


def load_mnist(
    dataset_root: str | Path, *, verify_checksums: bool = True
) -> tuple[LabeledImages, LabeledImages]:
    """Reads MNIST from its official idx files under ``dataset_root`` (layout in the module docstring).

    Args:
        dataset_root: folder holding the files, or ``MNIST/raw`` with them.
        verify_checksums: compare gzipped files with ``MNIST_MD5``.

    Returns:
        ``(train, test)``, images ``[N, 1, 28, 28]`` uint8 with ``scale = 1 / 255``, labels in 0..9.

    Raises:
        FileNotFoundError: a file is missing (the message names it and the expected layout).
        ValueError: a file is corrupt, fails its checksum, or images and labels disagree.
    """
    root = _check_root(dataset_root, "MNIST", _MNIST_LAYOUT)
    check_bool("verify_checksums", verify_checksums)
    splits = []
    for split in ("train", "test"):
        arrays = {}
        for kind, ndim in (("images", 3), ("labels", 1)):
            path = _find_mnist_file(root, MNIST_STEMS[f"{split}_{kind}"])
            if verify_checksums and path.name in MNIST_MD5:
                _verify_md5(path, MNIST_MD5[path.name], MNIST_URLS[0] + path.name)
            arrays[kind] = (path, read_idx(path, ndim=ndim))
        (image_path, images), (label_path, labels) = arrays["images"], arrays["labels"]
        if tuple(images.shape[1:]) != (28, 28):
            raise ValueError(f"{image_path}: expected 28x28 images, got {tuple(images.shape[1:])}")
        if len(images) != len(labels):
            raise ValueError(
                f"{label_path}: expected one label per image of {image_path} ({len(images)}), got {len(labels)}"
            )
        if len(labels) and int(labels.max()) > 9:
            raise ValueError(f"{label_path}: expected labels in 0..9, got {int(labels.max())}")
        splits.append(
            LabeledImages(images=images.unsqueeze(1), targets=labels.to(torch.int64), scale=1 / 255)
        )
    return splits[0], splits[1]


_ARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals of numpy arrays pickled with protocol 2 (as the official CIFAR files are)."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name} (only numpy arrays are allowed)"
            ) from None


def _parse_cifar_pickle(raw: bytes, source: str) -> LabeledImages:
    try:
        content = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as error:  # a corrupt pickle can fail in many ways; report them all as one error
        raise ValueError(
            f"{source}: expected a CIFAR-100 python pickle, could not read it: {error}"
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(content).__name__}")
    content = {
        key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()
    }
    missing = [key for key in ("data", "fine_labels") if key not in content]
    if missing:
        raise ValueError(f"{source}: expected keys 'data' and 'fine_labels', missing {missing}")
    data, labels = content["data"], content["fine_labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{source}: expected 'data' as a uint8 array [N, 3072], got {_describe_array(data)}")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise ValueError(
            f"{source}: expected 'fine_labels' as a list of {len(data)} labels, got {_describe_array(labels)}"
        )
    if not all(isinstance(label, int) and 0 <= label < 100 for label in labels):
        bad = next(label for label in labels if not (isinstance(label, int) and 0 <= label < 100))
        raise ValueError(f"{source}: expected fine labels in 0..99, got {bad!r}")
    images = torch.from_numpy(data.reshape(len(data), 3, 32, 32).copy())
    return LabeledImages(images=images, targets=torch.tensor(labels, dtype=torch.int64), scale=1 / 255)


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return type(value).__name__


def load_cifar100(
    dataset_root: str | Path, *, verify_checksums: bool = True
) -> tuple[LabeledImages, LabeledImages]:
    """Reads CIFAR-100 (fine labels) from the official python tarball or its extracted files.

    Args:
        dataset_root: folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/{train,test}``; the
            extracted files are preferred when both are present.
        verify_checksums: compare the files read with ``CIFAR100_MD5``.

    Returns:
        ``(train, test)``, images ``[N, 3, 32, 32]`` uint8 with ``scale = 1 / 255``, labels in 0..99.

    Raises:
        FileNotFoundError: neither layout is present (the message names the files and the layout).
        ValueError: a file is corrupt, fails its checksum, or is not a CIFAR-100 pickle.
    """
    root = _check_root(dataset_root, "CIFAR-100", _CIFAR100_LAYOUT)
    check_bool("verify_checksums", verify_checksums)
    folder, tarball = root / CIFAR100_FOLDER, root / CIFAR100_TARBALL
    if (folder / "train").is_file() and (folder / "test").is_file():
        splits = []
        for split in ("train", "test"):
            path = folder / split
            if verify_checksums:
                _verify_md5(path, CIFAR100_MD5[split], CIFAR100_URL)
            splits.append(_parse_cifar_pickle(path.read_bytes(), str(path)))
        return splits[0], splits[1]
    if not tarball.is_file():
        raise FileNotFoundError(
            f"CIFAR-100 not found under {root}: neither {tarball} nor both {folder / 'train'} and "
            f"{folder / 'test'} exist; {_CIFAR100_LAYOUT}"
        )
    if verify_checksums:
        _verify_md5(tarball, CIFAR100_MD5[CIFAR100_TARBALL], CIFAR100_URL)
    raws = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for split in ("train", "test"):
                member = f"{CIFAR100_FOLDER}/{split}"
                try:
                    handle = archive.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise ValueError(
                        f"{tarball}: expected a file member {member!r}, found none; {_CIFAR100_LAYOUT}"
                    )
                raws[split] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{tarball}: expected a gzip-compressed tar archive, could not read it: {error}"
        ) from error
    return (
        _parse_cifar_pickle(raws["train"], f"{tarball}:{CIFAR100_FOLDER}/train"),
        _parse_cifar_pickle(raws["test"], f"{tarball}:{CIFAR100_FOLDER}/test"),
    )


def load_mnist1d_signals(dataset_root: str | Path | None = None) -> tuple[LabeledImages, LabeledImages]:
    """The published MNIST-1D (4000 train / 1000 test) as signals ``[N, 1, 1, 40]`` float32, from the cache.

    Generated offline by mnist1d's ``make_dataset`` on first use and read from the checksummed cache afterwards
    (:func:`~sparseapps.core.mnist1d.load_mnist1d`); nothing is downloaded.

    Args:
        dataset_root: the cache root; None for ``$SPARSEAPPS_DATA`` or ``~/.cache/sparseapps/data``.

    Returns:
        ``(train, test)`` with labels in 0..9 and ``scale = 1`` (the signals as generated).

    Raises:
        TypeError: ``dataset_root`` is neither None, a str nor a Path.
        CorruptFileError: the cached file differs from its recorded checksum.
    """
    if dataset_root is not None and not isinstance(dataset_root, str | Path):
        raise TypeError(f"dataset_root: expected a str or Path, got {type(dataset_root).__name__}")
    x_train, y_train, x_test, y_test = load_mnist1d(dataset_root)
    return (
        LabeledImages(images=x_train.reshape(-1, 1, 1, MNIST1D_LENGTH), targets=y_train),
        LabeledImages(images=x_test.reshape(-1, 1, 1, MNIST1D_LENGTH), targets=y_test),
    )


def load_source(
    name: str, *, seed: int = 0, dataset_root: str | Path | None = None
) -> tuple[LabeledImages, LabeledImages]:
    """The ``(train, test)`` images of a named benchmark: digits for ``*-digits`` (split by ``seed``), MNIST-1D
    for ``*-mnist1d`` (generated offline, cached under ``dataset_root`` or the default root), the MNIST files for
    ``*-mnist`` and the CIFAR-100 files for ``*-cifar100``, read from ``dataset_root``."""
    if name.endswith("-digits"):
        return load_digits_split(seed=seed)
    if name.endswith("-mnist1d"):
        return load_mnist1d_signals(dataset_root)
    if name.endswith("-mnist"):
        return load_mnist(_check_root(dataset_root, name, _MNIST_LAYOUT))
    return load_cifar100(_check_root(dataset_root, name, _CIFAR100_LAYOUT))
