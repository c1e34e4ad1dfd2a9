"""Offline benchmarks: digits streams, MNIST / CIFAR-100 readers on generated files in the official formats."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sparseapps.continual import benchmarks, sources
from sparseapps.continual.benchmarks import (
    BENCHMARK_NAMES,
    LabeledImages,
    build_permuted_benchmark,
    build_rotated_benchmark,
    build_split_benchmark,
    load_cifar100,
    load_digits_split,
    load_mnist,
    make_benchmark,
    read_idx,
    rotate_images,
)


def _stack(experience) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All samples of an experience as ``x [N, C, H, W]``, ``y [N]``, ``t [N]``."""
    dataset = experience.dataset
    loader = DataLoader(dataset, batch_size=len(dataset), shuffle=False)
    x, y, t = next(iter(loader))
    return x, y, t


# ----------------------------------------------------------------------------------------------- digits: split


@pytest.fixture(scope="module")
def digits() -> tuple[LabeledImages, LabeledImages]:
    return load_digits_split(seed=0)


def test_digits_split_is_stratified_and_complete(digits):
    train, test = digits
    assert (train.n_samples, test.n_samples) == (1347, 450)
    assert tuple(train.images.shape[1:]) == (1, 8, 8)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) == 0.0
    assert float(train.images.max()) == 1.0
    for cls in range(10):
        n_train = int((train.targets == cls).sum())
        n_test = int((test.targets == cls).sum())
        assert abs(n_test - 0.25 * (n_train + n_test)) <= 1


@pytest.mark.parametrize("task_incremental", [True, False])
def test_split_digits_experiences_hold_their_classes(digits, task_incremental):
    benchmark = make_benchmark("split-digits", seed=0, task_incremental=task_incremental)
    assert benchmark.n_tasks == 5
    assert benchmark.n_classes_per_task == 2
    assert benchmark.n_outputs == (2 if task_incremental else 10)
    assert benchmark.input_shape == (1, 8, 8)
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 5
    all_classes = [cls for task in benchmark.classes_per_task for cls in task]
    assert sorted(all_classes) == list(range(10))  # disjoint and complete

    for stream, data in ((benchmark.train_stream, digits[0]), (benchmark.test_stream, digits[1])):
        n_seen = 0
        for task, experience in enumerate(stream):
            x, y, t = _stack(experience)
            n_seen += len(y)
            expected_task = task if task_incremental else 0
            assert experience.task_label == expected_task
            assert t.tolist() == [expected_task] * len(y)
            offset = 0 if task_incremental else 2 * task
            assert experience.classes_in_this_experience == [offset, offset + 1]
            assert isinstance(experience.classes_seen_so_far, list)
            for local, cls in enumerate(benchmark.classes_per_task[task]):
                selected = y == offset + local
                original = data.targets == cls
                assert int(selected.sum()) == int(original.sum())
                torch.testing.assert_close(x[selected].sum(0), data.images[original].sum(0))
        assert n_seen == data.n_samples


def test_split_digits_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = make_benchmark("split-digits", seed=3)
    second = make_benchmark("split-digits", seed=3)
    other = make_benchmark("split-digits", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.classes_per_task == second.classes_per_task
    assert first.classes_per_task != other.classes_per_task
    x_first, y_first, _ = _stack(first.train_stream[0])
    x_second, y_second, _ = _stack(second.train_stream[0])
    assert torch.equal(x_first, x_second)
    assert torch.equal(y_first, y_second)


@pytest.mark.parametrize(("n_tasks", "per_task"), [(1, 10), (2, 5), (10, 1)])
def test_split_digits_n_tasks_divisors(n_tasks, per_task):
    benchmark = make_benchmark("split-digits", n_tasks=n_tasks, task_incremental=False)
    assert benchmark.n_tasks == n_tasks
    assert [len(classes) for classes in benchmark.classes_per_task] == [per_task] * n_tasks
    assert benchmark.train_stream[n_tasks - 1].classes_in_this_experience == list(range(10 - per_task, 10))


@pytest.mark.parametrize("n_tasks", [3, 4, 20])
def test_split_n_tasks_must_divide_the_classes(n_tasks):
    with pytest.raises(ValueError, match=rf"divisor of its 10 classes, got {n_tasks}"):
        make_benchmark("split-digits", n_tasks=n_tasks)


@pytest.mark.parametrize("n_tasks", [0, -2, 2.0, True, "5"])
def test_bad_n_tasks(n_tasks):
    with pytest.raises(ValueError, match=r"n_tasks.*got"):
        make_benchmark("permuted-digits", n_tasks=n_tasks)


def test_bad_name_seed_and_flag():
    with pytest.raises(ValueError, match=r"got 'split-digit'"):
        make_benchmark("split-digit")
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 .*got -1"):
        make_benchmark("split-digits", seed=-1)
    with pytest.raises(TypeError, match=r"task_incremental must be True or False, got 1"):
        make_benchmark("split-digits", task_incremental=1)
    assert set(BENCHMARK_NAMES) == set(benchmarks.DEFAULT_N_TASKS)


def _tiny(classes: list[int], per_class: int = 2, shape: tuple[int, ...] = (1, 2, 2)) -> LabeledImages:
    targets = torch.tensor([cls for cls in classes for _ in range(per_class)])
    images = torch.arange(len(targets) * int(np.prod(shape)), dtype=torch.float32).reshape(-1, *shape)
    return LabeledImages(images=images / images.max(), targets=targets)


def test_inconsistent_class_sets_are_rejected():
    train, test = _tiny([0, 1, 2, 3]), _tiny([0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"only in train \[3\] and only in test \[5\]"):
        build_split_benchmark(train, test, n_tasks=2)
    with pytest.raises(ValueError, match=r"only in train \[3\]"):
        build_permuted_benchmark(train, test, n_tasks=2)
    with pytest.raises(ValueError, match=r"only in train \[3\]"):
        build_rotated_benchmark(train, test, angles=[0, 90])
    with pytest.raises(ValueError, match=r"one shape"):
        build_split_benchmark(_tiny([0, 1]), _tiny([0, 1], shape=(1, 3, 3)), n_tasks=1)
    with pytest.raises(TypeError, match=r"expected LabeledImages, got tuple"):
        build_split_benchmark(train, (test.images, test.targets), n_tasks=2)


def test_split_handles_sparse_class_ids():
    train, test = _tiny([3, 7, 11, 20]), _tiny([3, 7, 11, 20], per_class=1)
    benchmark = build_split_benchmark(train, test, n_tasks=2, seed=1, task_incremental=False)
    assert sorted(c for task in benchmark.classes_per_task for c in task) == [3, 7, 11, 20]
    order = [c for task in benchmark.classes_per_task for c in task]
    for task, experience in enumerate(benchmark.test_stream):
        x, y, _ = _stack(experience)
        for label, image in zip(y.tolist(), x, strict=True):
            original = test.images[test.targets == order[label]][0]
            assert torch.equal(image, original)
        assert sorted(set(y.tolist())) == [2 * task, 2 * task + 1]


def test_labeled_images_validation():
    images = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"targets: expected dtype int64, got torch.int32"):
        LabeledImages(images=images, targets=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"one label per image \(3\), got 2"):
        LabeledImages(images=images, targets=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"images: expected a \[N, C, H, W\] tensor, got a tensor of shape \(3, 4\)"
    ):
        LabeledImages(images=torch.zeros(3, 4), targets=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"non-negative labels, got -1"):
        LabeledImages(images=images, targets=torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match=r"scale: expected a finite positive number, got 0"):
        LabeledImages(images=images, targets=torch.zeros(3, dtype=torch.int64), scale=0)


# -------------------------------------------------------------------------------------- digits: permuted, rotated


@pytest.mark.parametrize("task_incremental", [True, False])
def test_permuted_digits_tasks_are_distinct_permutations(digits, task_incremental):
    benchmark = make_benchmark("permuted-digits", n_tasks=4, seed=0, task_incremental=task_incremental)
    assert benchmark.n_tasks == 4
    assert benchmark.classes_per_task == (tuple(range(10)),) * 4
    assert benchmark.n_outputs == (10 if task_incremental else 40)
    train = digits[0]
    flat = [_stack(experience)[0].reshape(train.n_samples, -1) for experience in benchmark.train_stream]
    assert torch.equal(flat[0], train.images.reshape(train.n_samples, -1))  # task 0 is unpermuted
    for task, experience in enumerate(benchmark.train_stream):
        _, y, t = _stack(experience)
        offset = 0 if task_incremental else 10 * task
        assert torch.equal(y, train.targets + offset)
        assert set(t.tolist()) == {task if task_incremental else 0}
        # the same pixel permutation for every sample: recover it from distinct pixel positions
        assert torch.equal(flat[task].sort(dim=1).values, flat[0].sort(dim=1).values)
        for other in range(task):
            assert not torch.equal(flat[task], flat[other])
    test_x, _, _ = _stack(benchmark.test_stream[2])
    assert test_x.shape == (450, 1, 8, 8)


def test_permuted_digits_permutation_is_one_per_task_and_seeded():
    # probe images whose pixels are their own positions reveal the permutation exactly
    probe = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1) / 63
    data = LabeledImages(images=probe, targets=torch.tensor([0, 1]))
    first = build_permuted_benchmark(data, data, n_tasks=3, seed=5)
    again = build_permuted_benchmark(data, data, n_tasks=3, seed=5)
    other = build_permuted_benchmark(data, data, n_tasks=3, seed=6)
    permutations = []
    for task in range(3):
        x, _, _ = _stack(first.train_stream[task])
        positions = (x.reshape(2, 64) * 63).round().long()
        assert torch.equal(positions[0], positions[1])
        assert sorted(positions[0].tolist()) == list(range(64))
        x_test, _, _ = _stack(first.test_stream[task])
        assert torch.equal(x_test, x)
        assert torch.equal(_stack(again.train_stream[task])[0], x)
        permutations.append(positions[0])
    assert torch.equal(permutations[0], torch.arange(64))
    assert not torch.equal(permutations[1], permutations[2])
    assert not torch.equal(_stack(other.train_stream[1])[0], _stack(first.train_stream[1])[0])


def test_rotated_digits_angles(digits):
    benchmark = make_benchmark("rotated-digits", n_tasks=2, task_incremental=False)
    x0, y0, t0 = _stack(benchmark.test_stream[0])
    x1, y1, t1 = _stack(benchmark.test_stream[1])
    assert torch.equal(x0, digits[1].images)
    torch.testing.assert_close(x1, torch.rot90(x0, 1, dims=(2, 3)))  # task 1 of 2 is at 90 degrees
    assert torch.equal(y1, y0 + 10)
    assert set(t0.tolist()) == set(t1.tolist()) == {0}
    default = make_benchmark("rotated-digits")
    assert default.n_tasks == 5
    assert [experience.task_label for experience in default.train_stream] == [0, 1, 2, 3, 4]


def test_rotate_images_matches_rot90_and_identity():
    images = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate_images(images, 90), torch.rot90(images, 1, dims=(2, 3)))
    torch.testing.assert_close(rotate_images(images, -90), torch.rot90(images, -1, dims=(2, 3)))
    torch.testing.assert_close(rotate_images(images, 0), images)
    wide = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate_images(wide, 180), wide.flip(2, 3))
    with pytest.raises(ValueError, match=r"degrees: expected a finite number, got nan"):
        rotate_images(images, float("nan"))
    with pytest.raises(ValueError, match=r"float32 \[N, C, H, W\]"):
        rotate_images(images.double(), 10)


def test_rotated_angles_must_be_distinct():
    data = _tiny([0, 1])
    with pytest.raises(ValueError, match=r"distinct angles \(mod 360\), got \[0, 360\]"):
        build_rotated_benchmark(data, data, angles=[0, 360])
    with pytest.raises(ValueError, match=r"non-empty sequence"):
        build_rotated_benchmark(data, data, angles=[])


def test_streams_train_a_multitask_model_with_avalanche():
    from avalanche.models import MTSimpleMLP
    from avalanche.training import Naive

    torch.manual_seed(0)
    benchmark = make_benchmark("split-digits", n_tasks=2, seed=0)
    model = MTSimpleMLP(input_size=64, hidden_size=32)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=64,
        train_epochs=2,
        eval_mb_size=512,
        device="cpu",
        evaluator=None,
    )
    for experience in benchmark.train_stream:
        strategy.train(experience)
    heads = model.classifier.classifiers
    assert sorted(heads.keys()) == ["0", "1"]
    assert [heads[key].classifier.out_features for key in ("0", "1")] == [5, 5]
    model.eval()
    with torch.no_grad():
        for experience in benchmark.test_stream:
            x, y, t = _stack(experience)
            accuracy = (model(x, t).argmax(1) == y).float().mean().item()
            assert accuracy > 0.5  # well above the 0.2 of chance with five classes per head


# ------------------------------------------------------------------------------------------------------ MNIST


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    return images, labels


def _write_mnist(folder: Path, *, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _mnist_arrays(3, seed=0)
    test_images, test_labels = _mnist_arrays(2, seed=1)
    arrays = {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": train_labels,
        "t10k-images-idx3-ubyte": test_images,
        "t10k-labels-idx1-ubyte": test_labels,
    }
    for stem, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def _md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        tensor = read_idx(tmp_path / name, ndim=3)
        assert tensor.dtype == torch.uint8
        assert torch.equal(tensor, torch.from_numpy(array))
    with pytest.raises(ValueError, match=r"magic number .* 0x01 .*got 00000803"):
        read_idx(tmp_path / "a-idx3-ubyte", ndim=1)


def test_load_mnist_both_layouts(tmp_path):
    arrays = _write_mnist(tmp_path / "flat", gz=True)
    _write_mnist(tmp_path / "tv" / "MNIST" / "raw", gz=False)
    for root in (tmp_path / "flat", tmp_path / "tv"):
        train, test = load_mnist(root, verify_checksums=False)
        assert tuple(train.images.shape) == (30, 1, 28, 28)
        assert tuple(test.images.shape) == (20, 1, 28, 28)
        assert train.images.dtype == torch.uint8
        assert train.scale == pytest.approx(1 / 255)
        assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
        assert np.array_equal(test.targets.numpy(), arrays["t10k-labels-idx1-ubyte"].astype(np.int64))


def test_make_split_and_permuted_mnist_from_files(tmp_path, monkeypatch):
    arrays = _write_mnist(tmp_path, gz=True)
    patched = {name: _md5_of(tmp_path / name) for name in benchmarks.MNIST_MD5}
    monkeypatch.setattr(sources, "MNIST_MD5", patched)

    split = make_benchmark("split-mnist", dataset_root=tmp_path, seed=1)
    assert split.n_tasks == 5
    assert split.input_shape == (1, 28, 28)
    assert sorted(c for task in split.classes_per_task for c in task) == list(range(10))
    test_images = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255
    test_labels = torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long()
    for task, experience in enumerate(split.test_stream):
        x, y, t = _stack(experience)
        assert len(y) == 4
        assert set(t.tolist()) == {task}
        for local, cls in enumerate(split.classes_per_task[task]):
            torch.testing.assert_close(x[y == local][:, 0].sum(0), test_images[test_labels == cls].sum(0))

    permuted = make_benchmark("permuted-mnist", dataset_root=str(tmp_path), n_tasks=3)
    assert permuted.n_tasks == 3
    x0, _, _ = _stack(permuted.train_stream[0])
    x2, _, _ = _stack(permuted.train_stream[2])
    assert not torch.equal(x0, x2)
    assert torch.equal(x0.reshape(30, -1).sort(1).values, x2.reshape(30, -1).sort(1).values)


def test_mnist_checksum_mismatch_names_the_file(tmp_path):
    _write_mnist(tmp_path, gz=True)
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz: expected MD5 f68b3c2dcbeaaa9fbdd348bbdeb94873"
    ):
        load_mnist(tmp_path)


def test_mnist_missing_root_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"split-mnist reads local files: expected dataset_root, got None"):
        make_benchmark("split-mnist")
    with pytest.raises(FileNotFoundError, match=r"expected an existing folder"):
        make_benchmark("permuted-mnist", dataset_root=tmp_path / "absent")
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found.*MNIST/raw"):
        load_mnist(tmp_path, verify_checksums=False)


def test_mnist_corrupt_files(tmp_path):
    _write_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    raw = images.read_bytes()

    images.write_bytes(raw[:-5])
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte: expected 23520 data bytes .* got 23515; .*truncated"
    ):
        load_mnist(tmp_path, verify_checksums=False)

    images.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    with pytest.raises(ValueError, match=r"magic number"):
        load_mnist(tmp_path, verify_checksums=False)

    images.write_bytes(_idx_bytes(np.zeros((30, 14, 14), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"expected 28x28 images, got \(14, 14\)"):
        load_mnist(tmp_path, verify_checksums=False)

    images.write_bytes(_idx_bytes(np.zeros((29, 28, 28), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"one label per image .*\(29\), got 30"):
        load_mnist(tmp_path, verify_checksums=False)

    images.write_bytes(raw)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(30, 12, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels in 0\.\.9, got 12"):
        load_mnist(tmp_path, verify_checksums=False)

    (tmp_path / "train-labels-idx1-ubyte").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"could not decompress"):
        load_mnist(tmp_path, verify_checksums=False)


# -------------------------------------------------------------------------------------------------- CIFAR-100


def _py2_pickle(obj: object) -> bytes:
    """Pickles ``obj`` as Python 2's cPickle (protocol 2) did for the official CIFAR files: str as BINSTRING."""
    out = bytearray(pickle.PROTO + b"\x02")

    def string(value: bytes) -> None:
        if len(value) < 256:
            out.extend(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
        else:
            out.extend(pickle.BINSTRING + struct.pack("<I", len(value)) + value)

    def save(value: object) -> None:
        if value is None:
            out.extend(pickle.NONE)
        elif isinstance(value, bool):
            out.extend(pickle.NEWTRUE if value else pickle.NEWFALSE)
        elif isinstance(value, int):
            out.extend(pickle.BININT + struct.pack("<i", value))
        elif isinstance(value, str):
            string(value.encode("latin1"))
        elif isinstance(value, tuple):
            out.extend(pickle.MARK)
            for item in value:
                save(item)
            out.extend(pickle.TUPLE)
        elif isinstance(value, list):
            out.extend(pickle.EMPTY_LIST + pickle.MARK)
            for item in value:
                save(item)
            out.extend(pickle.APPENDS)
        elif isinstance(value, dict):
            out.extend(pickle.EMPTY_DICT + pickle.MARK)
            for key, item in value.items():
                save(key)
                save(item)
            out.extend(pickle.SETITEMS)
        elif isinstance(value, np.ndarray):
            assert value.dtype == np.uint8
            out.extend(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            out.extend(pickle.GLOBAL + b"numpy\nndarray\n")
            save((0,))
            string(b"b")
            out.extend(pickle.TUPLE3 + pickle.REDUCE)
            out.extend(pickle.MARK)
            save(1)
            save(tuple(value.shape))
            out.extend(pickle.GLOBAL + b"numpy\ndtype\n")
            save(("u1", 0, 1))
            out.extend(pickle.REDUCE)
            save((3, "|", None, None, None, -1, -1, 0))
            out.extend(pickle.BUILD)
            save(False)
            string(value.tobytes())
            out.extend(pickle.TUPLE + pickle.BUILD)
        else:
            raise TypeError(type(value))

    save(obj)
    out.extend(pickle.STOP)
    return bytes(out)


def _cifar_content(n_per_class: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.permutation(np.repeat(np.arange(100), n_per_class))]
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
        "batch_label": "training batch 1 of 1",
        "fine_labels": labels,
        "coarse_labels": [label // 5 for label in labels],
        "data": data,
    }


def _write_cifar_tarball(root: Path, members: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(scope="module")
def cifar_contents() -> dict[str, dict[str, object]]:
    return {"train": _cifar_content(2, seed=0), "test": _cifar_content(1, seed=1)}


@pytest.mark.parametrize(
    "dumps", [_py2_pickle, lambda obj: pickle.dumps(obj, protocol=2)], ids=["py2", "py3"]
)
def test_load_cifar100_tarball_and_extracted(tmp_path, cifar_contents, dumps):
    raws = {split: dumps(content) for split, content in cifar_contents.items()}
    _write_cifar_tarball(tmp_path / "tar", {**raws, "meta": dumps({"fine_label_names": ["a"] * 100})})
    extracted = tmp_path / "dir" / "cifar-100-python"
    extracted.mkdir(parents=True)
    for split, raw in raws.items():
        (extracted / split).write_bytes(raw)
    for root in (tmp_path / "tar", tmp_path / "dir"):
        train, test = load_cifar100(root, verify_checksums=False)
        for data, content in ((train, cifar_contents["train"]), (test, cifar_contents["test"])):
            assert data.images.dtype == torch.uint8
            assert tuple(data.images.shape) == (len(content["fine_labels"]), 3, 32, 32)
            assert data.targets.tolist() == content["fine_labels"]
            raw = content["data"]
            # row-major channels: red plane, green plane, blue plane, each 32 x 32
            assert int(data.images[5, 1, 2, 3]) == int(raw[5, 1024 + 2 * 32 + 3])
            assert int(data.images[0, 2, 31, 31]) == int(raw[0, 3071])


def test_make_split_cifar100_from_tarball(tmp_path, cifar_contents, monkeypatch):
    tarball = _write_cifar_tarball(tmp_path, {split: _py2_pickle(c) for split, c in cifar_contents.items()})
    monkeypatch.setitem(benchmarks.CIFAR100_MD5, "cifar-100-python.tar.gz", _md5_of(tarball))
    benchmark = make_benchmark("split-cifar100", dataset_root=tmp_path, n_tasks=20, task_incremental=False)
    assert benchmark.n_tasks == 20
    assert benchmark.input_shape == (3, 32, 32)
    assert benchmark.n_outputs == 100
    assert sorted(c for task in benchmark.classes_per_task for c in task) == list(range(100))
    x, y, t = _stack(benchmark.train_stream[19])
    assert x.shape == (10, 3, 32, 32)
    assert sorted(set(y.tolist())) == list(range(95, 100))
    assert set(t.tolist()) == {0}
    assert float(x.max()) <= 1.0
    with pytest.raises(ValueError, match=r"divisor of its 100 classes, got 3"):
        make_benchmark("split-cifar100", dataset_root=tmp_path, n_tasks=3)


def test_cifar100_checksum_missing_and_corrupt(tmp_path, cifar_contents):
    with pytest.raises(
        FileNotFoundError, match=r"cifar-100-python\.tar\.gz nor both .*cifar-100-python/train"
    ):
        load_cifar100(tmp_path)
    with pytest.raises(ValueError, match=r"split-cifar100 reads local files"):
        make_benchmark("split-cifar100")

    tarball = _write_cifar_tarball(tmp_path, {split: _py2_pickle(c) for split, c in cifar_contents.items()})
    with pytest.raises(ValueError, match=r"expected MD5 eb9058c3a382ffc7106e4002c42a8d85"):
        load_cifar100(tmp_path)

    _write_cifar_tarball(tmp_path, {"train": _py2_pickle(cifar_contents["train"])})
    with pytest.raises(ValueError, match=r"expected a file member 'cifar-100-python/test'"):
        load_cifar100(tmp_path, verify_checksums=False)

    tarball.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(ValueError, match=r"could not read it"):
        load_cifar100(tmp_path, verify_checksums=False)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"data": _RunsCode()}, protocol=2), r"refusing global (__builtin__|builtins)\.print"),
        (pickle.dumps([1, 2], protocol=2), r"expected a pickled dict, got list"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2), r"missing \['fine_labels'\]"),
        (
            _py2_pickle({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}),
            r"uint8 array \[N, 3072\], got an array of dtype uint8 and shape \(2, 100\)",
        ),
        (
            _py2_pickle({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0]}),
            r"list of 2 labels, got a list of 1 items",
        ),
        (_py2_pickle({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}), r"0\.\.99, got 100"),
        (b"\x80\x02garbage", r"could not read it"),
    ],
    ids=["code", "not-dict", "no-labels", "bad-shape", "short-labels", "label-range", "garbage"],
)
def test_cifar100_bad_pickles(tmp_path, capsys, content, message):
    extracted = tmp_path / "cifar-100-python"
    extracted.mkdir()
    (extracted / "train").write_bytes(content)
    (extracted / "test").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_cifar100(tmp_path, verify_checksums=False)
    assert "must never run" not in capsys.readouterr().out
