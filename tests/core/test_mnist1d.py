"""MNIST-1D: offline generation, the checksummed cache, and the MLP / CNN shapes."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseapps.core import io
from sparseapps.core.mnist1d import (
    MNIST1D_CLASSES,
    MNIST1D_LENGTH,
    load_mnist1d,
    make_mnist1d_cnn,
    make_mnist1d_mlp,
    mnist1d_cache_directory,
)

SMALL = 200  # examples: a 160 / 40 split, generated in well under a second


def test_shapes_dtypes_and_labels(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = load_mnist1d(tmp_path, num_samples=SMALL)
    assert x_train.shape == (160, MNIST1D_LENGTH) and x_test.shape == (40, MNIST1D_LENGTH)
    assert y_train.shape == (160,) and y_test.shape == (40,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(torch.cat([y_train, y_test]).tolist()) == set(range(MNIST1D_CLASSES))
    assert bool(torch.isfinite(x_train).all())


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    first = load_mnist1d(tmp_path / "a", num_samples=SMALL, seed=3)
    again = load_mnist1d(tmp_path / "b", num_samples=SMALL, seed=3)  # generated afresh elsewhere
    other = load_mnist1d(tmp_path / "a", num_samples=SMALL, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_generation_leaves_global_random_states_alone(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.rand())
    random.seed(11)
    np.random.seed(11)
    load_mnist1d(tmp_path, num_samples=SMALL)
    assert (random.random(), np.random.rand()) == expected


def test_cache_is_reused_not_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_mnist1d(tmp_path, num_samples=SMALL)
    directory = mnist1d_cache_directory(tmp_path, num_samples=SMALL)
    assert sorted(p.name for p in directory.iterdir()) == ["MANIFEST.json", "mnist1d.npz"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr("sparseapps.core.mnist1d._generate", refuse)
    again = load_mnist1d(tmp_path, num_samples=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_cache_directory_depends_on_the_arguments(tmp_path: Path) -> None:
    a = mnist1d_cache_directory(tmp_path, num_samples=SMALL, seed=1)
    assert a == mnist1d_cache_directory(tmp_path, num_samples=SMALL, seed=1)
    assert a != mnist1d_cache_directory(tmp_path, num_samples=SMALL, seed=2)
    assert a != mnist1d_cache_directory(tmp_path, num_samples=2 * SMALL, seed=1)


def test_damaged_cache_is_refused_naming_the_file(tmp_path: Path) -> None:
    load_mnist1d(tmp_path, num_samples=SMALL)
    path = mnist1d_cache_directory(tmp_path, num_samples=SMALL) / "mnist1d.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(io.CorruptFileError, match=r"MNIST-1D cache .*mnist1d\.npz is damaged.*remove"):
        load_mnist1d(tmp_path, num_samples=SMALL)


def test_pickled_arrays_are_never_read(tmp_path: Path) -> None:
    """A cache holding an object array, even with a matching manifest, is refused, not unpickled."""
    directory = mnist1d_cache_directory(tmp_path, num_samples=SMALL)
    directory.mkdir(parents=True)
    with open(directory / "mnist1d.npz", "wb") as stream:
        arrays = {
            name: np.array([{"x": 1}], dtype=object) for name in ("x_train", "y_train", "x_test", "y_test")
        }
        np.savez(stream, **arrays)
    io.write_manifest(directory, ["mnist1d.npz"])
    with pytest.raises(io.CorruptFileError, match=r"mnist1d\.npz"):
        load_mnist1d(tmp_path, num_samples=SMALL)


@pytest.mark.parametrize("bad", [0, 5, -1, 1.5, True])
def test_bad_num_samples_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        load_mnist1d(tmp_path, num_samples=bad)  # type: ignore[arg-type]


def test_models_map_signals_to_logits() -> None:
    x = torch.randn(6, MNIST1D_LENGTH)
    assert make_mnist1d_mlp()(x).shape == (6, MNIST1D_CLASSES)
    cnn = make_mnist1d_cnn(channels=7)
    assert cnn(x).shape == (6, MNIST1D_CLASSES)
    assert cnn.head.in_features == 7 * 5
    with pytest.raises(ValueError, match=r"\[B, 40\]"):
        cnn(torch.zeros(2, 1, MNIST1D_LENGTH))


def test_missing_mnist1d_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(ImportError, match=r"pip install mnist1d==0\.0\.2\.post1"):
        load_mnist1d(tmp_path, num_samples=SMALL)


def test_docstring_examples_run() -> None:
    import doctest

    from sparseapps.core import mnist1d

    assert doctest.testmod(mnist1d).failed == 0


def test_a_run_killed_before_its_manifest_regenerates(tmp_path: Path) -> None:
    first = load_mnist1d(tmp_path, num_samples=SMALL)
    directory = mnist1d_cache_directory(tmp_path, num_samples=SMALL)
    (directory / "MANIFEST.json").unlink()
    (directory / "mnist1d.npz").write_bytes(b"half a file")
    (directory / f".mnist1d.npz.x{io.TEMPORARY_SUFFIX}").write_bytes(b"left by a killed write")
    again = load_mnist1d(tmp_path, num_samples=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sorted(p.name for p in directory.iterdir()) == ["MANIFEST.json", "mnist1d.npz"]
