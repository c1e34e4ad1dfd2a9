"""Loaders, filters, splits and the BPR sampler of sparseapps.recsys.data."""

from __future__ import annotations

import io
import math
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseapps.recsys import data
from sparseapps.recsys.data import (
    BPRSampler,
    DataConfig,
    Interactions,
    InteractionSplit,
    UserItemLists,
    k_core,
    load_interactions,
    load_split,
    parse_ratings,
    read_atomic_inter,
    read_movielens_archive,
    split_interactions,
    synthetic_interactions,
    to_implicit,
)

from .conftest import RATINGS, expected_arrays, ratings_text, write_zip

FORMATS = ("u.data", "dat", "csv")


def assert_rows(rows: Interactions) -> None:
    expected = expected_arrays()
    for name, values in expected.items():
        np.testing.assert_array_equal(getattr(rows, name), values)
        assert getattr(rows, name).dtype == values.dtype


def pair_set(split: InteractionSplit, part: str) -> set[tuple[int, int]]:
    pairs = split.pairs(part)
    return set(zip(split.user_ids[pairs[:, 0]].tolist(), split.item_ids[pairs[:, 1]].tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Ratings files


@pytest.mark.parametrize("format", FORMATS)
def test_parse_ratings_reads_each_layout(format: str) -> None:
    assert_rows(parse_ratings(io.BytesIO(ratings_text(format)), format, source="ratings"))


@pytest.mark.parametrize("format", FORMATS)
def test_parse_ratings_across_block_boundaries(format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.parsers, "_BLOCK_BYTES", 7)
    assert_rows(parse_ratings(io.BytesIO(ratings_text(format)), format))


def test_parse_ratings_without_trailing_newline() -> None:
    text = ratings_text("u.data").rstrip(b"\n")
    assert_rows(parse_ratings(io.BytesIO(text), "u.data"))


@pytest.mark.parametrize(
    ("format", "content", "message"),
    [
        ("u.data", b"1\t10\t5\n2\t10\t4\n", r"line 1: '1\t10\t5' has 3 fields, expected 4"),
        ("u.data", b"1,10,5,978300760\n", "line 1: '1,10,5,978300760' has 1 fields, expected 4"),
        ("dat", b"1::10::5::978300760\n2::x::4::978300761\n", "line 2: item id 'x' in '2::x::4::978300761' is not a number"),
        ("dat", b"1::10::5::978300760\n2::10::4\n", "line 2: '2::10::4' has 3 fields, expected 4"),
        ("dat", b"1\t10\t5\t978300760\n", "found a tab near line 1"),
        ("csv", b"movieId,userId,rating,timestamp\n10,1,5,978300760\n", "got the header 'movieId,userId"),
        ("csv", b"userId,movieId,rating,timestamp\n1.5,10,5,978300760\n", "line 2: user id '1.5' in '1.5,10,5,978300760' is not an integer"),
        ("csv", b"userId,movieId,rating,timestamp\n", "holds no rows"),
    ],
)  # fmt: skip
def test_parse_ratings_rejects_wrong_layouts(format: str, content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="bad-file") as error:
        parse_ratings(io.BytesIO(content), format, source="bad-file")
    assert message in str(error.value)


def test_parse_ratings_reports_line_of_later_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.parsers, "_BLOCK_BYTES", 30)
    rows = "".join(f"{u}::{u}::3::97830076{u}\n" for u in range(1, 10)) + "10::oops::3::978300760\n"
    with pytest.raises(
        ValueError, match=r"^ratings: line 10: item id 'oops' in '10::oops::3::978300760' is not a"
    ):
        parse_ratings(io.BytesIO(rows.encode()), "dat", source="ratings")


DELIMITERS = {"u.data": "\t", "dat": "::", "csv": ","}

# The last line of RATINGS, (2, 30, 2, 978302268), cut short or with a bad value: (fields, what is wrong).
BAD_LAST_LINES = [
    (["2", "30", "2"], "{line!r} has 3 fields, expected 4 (a line cut short"),
    (["2", "30", "2", ""], "timestamp is empty in {line!r} (a line cut short?)"),
    (["2", "30", ""], "{line!r} has 3 fields, expected 4"),
    (["2", "30", "", "978302268"], "rating is empty in {line!r}"),
    (["-2", "30", "2", "978302268"], "user id '-2' in {line!r} is negative (ids are non-negative integers)"),
    (["2", "-30", "2", "978302268"], "item id '-30' in {line!r} is negative"),
    (["2", "30.5", "2", "978302268"], "item id '30.5' in {line!r} is not an integer"),
    (["2.0e-1", "30", "2", "978302268"], "user id '2.0e-1' in {line!r} is not an integer"),
    (["2", "30", "2", "97830.5"], "timestamp '97830.5' in {line!r} is not an integer"),
    (["2", "30", "nan", "978302268"], "rating 'nan' in {line!r} is not a finite number"),
]


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("fields", "problem"), BAD_LAST_LINES)
def test_a_cut_last_line_or_a_bad_id_names_the_file_line_and_value(
    format: str, fields: list[str], problem: str
) -> None:
    line = DELIMITERS[format].join(fields)
    content = ratings_text(format, RATINGS[:-1]) + line.encode()  # no newline: the file ends inside the line
    line_number = len(RATINGS) + (format == "csv")
    with pytest.raises(ValueError) as error:
        parse_ratings(io.BytesIO(content), format, source="bad-file")
    expected = f"bad-file: line {line_number}: {problem.format(line=line)}"
    assert str(error.value).startswith(expected), str(error.value)
    assert data.FORMAT_DESCRIPTIONS[format] in str(error.value)


def test_a_cut_extracted_ratings_file_is_refused_by_path(tmp_path: Path) -> None:
    ratings = tmp_path / "ml-1m" / "ratings.dat"
    ratings.parent.mkdir()
    ratings.write_bytes(ratings_text("dat")[: -len("978302268\n")])
    with pytest.raises(ValueError) as error:
        load_interactions("ml-1m", tmp_path, download=False)
    assert str(error.value).startswith(
        f"{ratings}: line 6: timestamp is empty in '2::30::2::' (a line cut short?)"
    )


def test_parse_ratings_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        parse_ratings(io.BytesIO(b""), "tsv")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# GroupLens archives


@pytest.mark.parametrize("name", list(data.MOVIELENS_ARCHIVES))
def test_download_then_load_each_archive(
    name: str, tmp_path: Path, fake_archive, serve_archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ml-100k would come from RecBole otherwise
    monkeypatch.setattr(data.sources, "find_recbole_ml100k", lambda: None)
    served = serve_archive(name, fake_archive(name))
    root = tmp_path / "cache"
    assert_rows(load_interactions(name, root, download=True, progress=False))
    assert sorted(p.name for p in root.iterdir()) == [f"{name}.zip"]
    served.unlink()  # the second load must come from the cache
    rows = load_interactions(name, root, download=False)
    assert_rows(rows)
    assert str(root / f"{name}.zip") in rows.source


def test_wrong_checksum_leaves_nothing(tmp_path: Path, fake_archive, serve_archive) -> None:
    serve_archive("ml-1m", fake_archive("ml-1m"), md5="0" * 32)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"expected 0{32}"):
        data.download_movielens("ml-1m", root, progress=False)
    assert list(root.iterdir()) == []


def test_corrupt_download_leaves_nothing(tmp_path: Path, serve_archive) -> None:
    corrupt = tmp_path / "ml-1m.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    serve_archive("ml-1m", corrupt)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="not a readable zip"):
        data.download_movielens("ml-1m", root, progress=False)
    assert list(root.iterdir()) == []


def test_failed_download_names_where_to_put_the_file(tmp_path: Path, serve_archive) -> None:
    missing = tmp_path / "nowhere" / "ml-1m.zip"
    missing.parent.mkdir()
    missing.write_bytes(b"x")
    serve_archive("ml-1m", missing)
    missing.unlink()
    root = tmp_path / "cache"
    with pytest.raises(OSError, match=r"place the archive at .*ml-1m\.zip"):
        data.download_movielens("ml-1m", root, progress=False)
    assert list(root.iterdir()) == []


def test_download_rejects_archive_without_ratings(tmp_path: Path, serve_archive) -> None:
    served = write_zip(tmp_path / "ml-25m.zip", {"ml-25m/movies.csv": b"movieId,title,genres\n"})
    serve_archive("ml-25m", served)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"lacks ml-25m/ratings\.csv"):
        data.download_movielens("ml-25m", root, progress=False)
    assert list(root.iterdir()) == []


def test_cached_corrupt_archive_names_file_and_format(tmp_path: Path, serve_archive) -> None:
    cached = tmp_path / "ml-10m.zip"
    cached.write_bytes(b"garbage, not a zip")
    serve_archive("ml-10m", cached)
    with pytest.raises(
        ValueError, match=r"ml-10m\.zip.*GroupLens ml-10m\.zip archive holding ml-10M100K/ratings\.dat"
    ):
        load_interactions("ml-10m", tmp_path, download=False)
    assert cached.read_bytes() == b"garbage, not a zip"


def test_cached_archive_with_other_checksum_is_refused(tmp_path: Path, fake_archive, serve_archive) -> None:
    serve_archive("ml-20m", fake_archive("ml-20m"), md5="f" * 32)
    cached = tmp_path / "ml-20m.zip"
    cached.write_bytes(fake_archive("ml-20m").read_bytes())
    with pytest.raises(ValueError, match="delete it to download again"):
        load_interactions("ml-20m", tmp_path, download=False)


def test_cached_archive_with_wrong_columns(tmp_path: Path, serve_archive) -> None:
    cached = write_zip(tmp_path / "ml-32m.zip", {"ml-32m/ratings.csv": b"userId,movieId,rating\n1,2,3\n"})
    serve_archive("ml-32m", cached)
    with pytest.raises(ValueError, match=r"ml-32m\.zip:ml-32m/ratings\.csv: expected comma-separated rows"):
        read_movielens_archive(cached, "ml-32m")


def test_missing_member_in_cached_archive(tmp_path: Path, serve_archive) -> None:
    cached = write_zip(tmp_path / "ml-100k.zip", {"ml-100k/u.item": b"1|Toy Story|\n"})
    serve_archive("ml-100k", cached)
    with pytest.raises(ValueError, match=r"has no member ml-100k/u\.data"):
        load_interactions("ml-100k", tmp_path, download=False)


def test_missing_local_copy_lists_files_and_formats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_interactions("ml-1m", tmp_path, download=False)
    message = str(error.value)
    for expected in (
        "ml-1m.inter",
        "ml-1m/ratings.dat",
        "ml-1m.zip",
        "UserID::MovieID::Rating::Timestamp",
        "RecBole",
    ):
        assert expected in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["ml-1m", "ml-25m"])
def test_offline_without_a_local_copy_says_what_to_place_where(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec = data.MOVIELENS_ARCHIVES[name]
    with pytest.raises(data.DataNotFoundError) as error:
        load_interactions(name, tmp_path, download=True, progress=False)
    assert isinstance(error.value, FileNotFoundError)
    assert str(error.value) == (
        f"{name}: no local copy, and the download failed (<urlopen error [Errno -3] Temporary failure in name "
        f"resolution>); place one of these (read in this order): {tmp_path / name / f'{name}.inter'} "
        f"({data.FORMAT_DESCRIPTIONS['inter']}); {tmp_path / spec.member} ({data.FORMAT_DESCRIPTIONS[spec.format]}); "
        f"or {tmp_path / f'{name}.zip'}, the GroupLens archive from {spec.url} (its MD5 {spec.md5} is checked "
        "before use). --data-root (DataConfig.data_root) or $SPARSEAPPS_DATA sets the directory"
    )
    assert list(tmp_path.iterdir()) == []  # no partial archive, no temporary file


def test_missing_archive_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file; expected the GroupLens ml-1m\.zip archive"):
        read_movielens_archive(tmp_path / "ml-1m.zip", "ml-1m")


def test_extracted_ratings_file_is_used(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_bytes(ratings_text("dat"))
    assert_rows(load_interactions("ml-1m", tmp_path, download=False))


@pytest.mark.parametrize("name", ["ml-2m", "movielens", "ML-100K", ""])
def test_unknown_dataset_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_interactions(name, tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        DataConfig(dataset=name)
    with pytest.raises(ValueError, match="unknown MovieLens archive"):
        data.download_movielens(name, tmp_path)


def test_dataset_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="dataset must be a string"):
        DataConfig(dataset=100)  # type: ignore[arg-type]


def test_registry_records_published_checksums() -> None:
    for name, spec in data.MOVIELENS_ARCHIVES.items():
        assert spec.url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert len(spec.md5) == 32 and int(spec.md5, 16) >= 0
    assert data.MOVIELENS_ARCHIVES["ml-100k"].md5 == "0e33842e24a9c977be4e0107933c0723"


# ---------------------------------------------------------------------------------------------------------------
# RecBole atomic files


def write_inter(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def test_atomic_file_in_data_root_comes_first(tmp_path: Path, fake_archive, serve_archive) -> None:
    serve_archive("ml-1m", fake_archive("ml-1m"))
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    write_inter(tmp_path / "ml-1m" / "ml-1m.inter", header, ["5\t6\t4\t100", "5\t7\t2\t90"])
    rows = load_interactions("ml-1m", tmp_path, download=True, progress=False)
    assert rows.users.tolist() == [5, 5] and rows.items.tolist() == [6, 7]
    assert rows.ratings.tolist() == [4.0, 2.0] and rows.timestamps.tolist() == [100, 90]
    assert not (tmp_path / "ml-1m.zip").exists()


def test_atomic_file_by_path_with_string_tokens_and_extra_columns(tmp_path: Path) -> None:
    header = "session:token\tuser_id:token\titem_id:token\ttimestamp:float"
    path = write_inter(
        tmp_path / "x.inter", header, ["s1\tbob\tb\t10.7", "s2\talice\tc\t11", "s3\tbob\ta\t12"]
    )
    rows = load_interactions(str(path))
    assert rows.users.tolist() == [1, 0, 1]  # alice < bob
    assert rows.items.tolist() == [1, 2, 0]
    assert rows.ratings is None
    assert rows.timestamps.tolist() == [10, 11, 12]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("user_id:token\trating:float", ["1\t3"], "lacks item_id"),
        ("user_id\titem_id:token", ["1\t3"], "is not 'name:type'"),
        (
            "user_id:token\titem_id:token\trating:float",
            ["1\t2\t3", "1\t3"],
            r"line 3: '1\t3' has 2 fields, expected 3",
        ),
        ("user_id:token\titem_id:token\trating:float", ["1\t2\tgood"], "column 'rating' is not numeric"),
        ("user_id:token\titem_id:token", [], "holds no rows"),
    ],
)
def test_atomic_file_rejects_wrong_layouts(
    tmp_path: Path, header: str, rows: list[str], message: str
) -> None:
    path = write_inter(tmp_path / "bad.inter", header, rows)
    with pytest.raises(ValueError, match="RecBole atomic file") as error:
        read_atomic_inter(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_atomic_file(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"missing\.inter: no such file; expected a RecBole atomic file"
    ):
        load_interactions(str(tmp_path / "missing.inter"))


# ---------------------------------------------------------------------------------------------------------------
# The real ML-100K shipped with RecBole


@pytest.fixture(scope="module")
def ml100k_path() -> Path:
    path = data.find_recbole_ml100k()
    if path is None:
        pytest.skip("recbole is not installed, so its bundled ml-100k.inter is not available")
    return path


def test_recbole_ml100k_is_found_without_importing_recbole(ml100k_path: Path) -> None:
    import sys

    assert ml100k_path.name == "ml-100k.inter" and ml100k_path.parent.name == "ml-100k"
    assert "recbole" not in sys.modules


def test_real_ml100k_counts(ml100k_path: Path, tmp_path: Path) -> None:
    rows = load_interactions("ml-100k", tmp_path, download=False)
    assert str(ml100k_path) in rows.source
    assert len(rows) == 100_000
    assert len(set(rows.users.tolist())) == 943 and len(set(rows.items.tolist())) == 1_682
    assert set(rows.ratings.tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    split = load_split(DataConfig(dataset="ml-100k", data_root=str(tmp_path), download=False))
    assert (split.n_users, split.n_items) == (943, 1_682)
    sizes = np.array([len(split.train), len(split.valid), len(split.test)])
    assert sizes.sum() == 100_000
    np.testing.assert_allclose(sizes / sizes.sum(), [0.8, 0.1, 0.1], atol=0.015)
    # every ML-100K user has >= 20 ratings, so each has at least two valid and two test items
    assert split.valid_items.counts().min() >= 2 and split.test_items.counts().min() >= 2
    assert len(pair_set(split, "train") | pair_set(split, "valid") | pair_set(split, "test")) == 100_000


def test_real_ml100k_threshold_and_core(ml100k_path: Path, tmp_path: Path) -> None:
    rows = load_interactions("ml-100k", tmp_path, download=False)
    config = DataConfig(
        dataset="ml-100k", data_root=str(tmp_path), download=False, rating_threshold=4, user_core=10
    )
    split = load_split(config)
    total = len(split.train) + len(split.valid) + len(split.test)
    assert total <= int((rows.ratings >= 4).sum())
    counts = split.train_items.counts() + split.valid_items.counts() + split.test_items.counts()
    assert counts.min() >= 10
    kept = pair_set(split, "train") | pair_set(split, "valid") | pair_set(split, "test")
    positives = {
        (u, i)
        for u, i, r in zip(rows.users.tolist(), rows.items.tolist(), rows.ratings.tolist(), strict=True)
        if r >= 4
    }
    assert kept <= positives


# ---------------------------------------------------------------------------------------------------------------
# Implicit conversion and k-core


def test_to_implicit_threshold_and_duplicates() -> None:
    rows = Interactions(
        users=np.array([1, 1, 2, 1, 3]),
        items=np.array([5, 6, 5, 5, 7]),
        ratings=np.array([4.0, 2.0, 5.0, 4.5, 3.5]),
        timestamps=np.array([30, 10, 20, 25, 5]),
    )
    kept = to_implicit(rows, threshold=3.5)
    # (1, 5) appears twice among the positives: the earlier one (t=25) stays; rating 2.0 drops
    assert kept.users.tolist() == [2, 1, 3]
    assert kept.timestamps.tolist() == [20, 25, 5]
    assert len(to_implicit(rows)) == 4  # every rating a positive, duplicate removed


def test_to_implicit_without_duplicates_keeps_rows() -> None:
    rows = Interactions(np.array([1, 2]), np.array([3, 3]), np.array([1.0, 2.0]), None)
    assert to_implicit(rows) is rows


def test_to_implicit_needs_ratings_for_a_threshold() -> None:
    with pytest.raises(ValueError, match="needs explicit ratings"):
        to_implicit(Interactions(np.array([1]), np.array([2])), threshold=4)
    with pytest.raises(ValueError, match="finite number"):
        to_implicit(Interactions(np.array([1]), np.array([2]), np.array([1.0])), threshold=math.nan)


def test_k_core_iterates_until_stable() -> None:
    # A: x, y; B: x, y; C: x, z. z has one user -> removed; then C has one item -> removed.
    rows = Interactions(np.array([0, 0, 1, 1, 2, 2]), np.array([10, 11, 10, 11, 10, 12]))
    kept = k_core(rows, user_k=2, item_k=2)
    assert kept.users.tolist() == [0, 0, 1, 1] and kept.items.tolist() == [10, 11, 10, 11]
    assert len(k_core(rows, user_k=3, item_k=0)) == 0
    assert k_core(rows) is rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_result_is_a_core(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = to_implicit(Interactions(rng.integers(0, 60, 800), rng.zipf(1.5, 800) % 200))
    kept = k_core(rows, user_k=5, item_k=3)
    assert len(kept) > 0
    assert np.bincount(kept.users)[np.unique(kept.users)].min() >= 5
    assert np.bincount(kept.items)[np.unique(kept.items)].min() >= 3
    # nothing that survives a stricter pass is lost in a looser one
    assert len(k_core(rows, user_k=4, item_k=3)) >= len(kept)


def test_k_core_rejects_negative() -> None:
    with pytest.raises(ValueError, match="user_k must be an integer >= 0, got -1"):
        k_core(Interactions(np.array([1]), np.array([1])), user_k=-1)


# ---------------------------------------------------------------------------------------------------------------
# Splits


def rows_with_counts(counts: list[int], seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(counts)) * 7 + 100, counts)  # sparse raw ids
    items = np.concatenate([rng.permutation(50)[:c] * 3 for c in counts])
    times = rng.permutation(len(users)) * 10 + 1_000
    return Interactions(users, items, None, times)


def test_split_sizes_follow_recbole_rounding() -> None:
    counts = [1, 2, 3, 5, 10, 19, 20, 41]
    split = split_interactions(rows_with_counts(counts), seed=3)
    # per-user (valid, test) by hand: floor(0.1 n) each, and a share below one row gets one row while train > 1
    expected = {1: (0, 0), 2: (0, 1), 3: (1, 1), 5: (1, 1), 10: (1, 1), 19: (1, 1), 20: (2, 2), 41: (4, 4)}
    for user, n in enumerate(counts):
        valid, test = expected[n]
        assert split.valid_items.counts()[user] == valid
        assert split.test_items.counts()[user] == test
        assert split.train_items.counts()[user] == n - valid - test


def test_leave_one_out_keeps_the_latest_rows_out() -> None:
    rows = rows_with_counts([1, 2, 3, 8])
    split = split_interactions(rows, method="leave_one_out", seed=0)
    assert split.train_items.counts().tolist() == [1, 1, 1, 6]
    assert split.valid_items.counts().tolist() == [0, 0, 1, 1]
    assert split.test_items.counts().tolist() == [0, 1, 1, 1]
    time_of = dict(
        zip(zip(rows.users.tolist(), rows.items.tolist(), strict=True), rows.timestamps.tolist(), strict=True)
    )
    user = split.user_ids[3]
    times = sorted(t for (u, _), t in time_of.items() if u == user)
    (test_pair,) = pair_set(split, "test") & {p for p in time_of if p[0] == user}
    (valid_pair,) = pair_set(split, "valid") & {p for p in time_of if p[0] == user}
    assert time_of[test_pair] == times[-1] and time_of[valid_pair] == times[-2]


def test_temporal_split_orders_each_user_in_time() -> None:
    rows = rows_with_counts([10, 20, 30, 41])
    split = split_interactions(rows, method="temporal", seed=0)
    time_of = dict(
        zip(zip(rows.users.tolist(), rows.items.tolist(), strict=True), rows.timestamps.tolist(), strict=True)
    )
    for user in split.user_ids.tolist():
        parts = [
            [time_of[p] for p in pair_set(split, part) if p[0] == user] for part in ("train", "valid", "test")
        ]
        assert max(parts[0]) < min(parts[1]) <= max(parts[1]) < min(parts[2])


def test_temporal_split_with_a_huge_time_range_and_huge_ids() -> None:
    # timestamps too far apart to pack with a row rank into one int64, ids too sparse for a lookup table
    rng = np.random.default_rng(0)
    n = 60
    times = rng.permutation(n).astype(np.int64) * (1 << 56) - (1 << 62)
    rows = Interactions(np.repeat([10**15, 7, -(10**14)], n // 3), rng.permutation(n) * 10**13, None, times)
    split = split_interactions(rows, method="temporal", seed=0)
    assert split.user_ids.tolist() == [-(10**14), 7, 10**15]
    np.testing.assert_array_equal(split.item_ids, np.sort(rows.items))
    time_of = dict(
        zip(zip(rows.users.tolist(), rows.items.tolist(), strict=True), rows.timestamps.tolist(), strict=True)
    )
    for user in split.user_ids.tolist():
        parts = [
            [time_of[p] for p in pair_set(split, part) if p[0] == user] for part in ("train", "valid", "test")
        ]
        assert [len(p) for p in parts] == [16, 2, 2]
        assert max(parts[0]) < min(parts[1]) <= max(parts[1]) < min(parts[2])


def test_temporal_ties_are_broken_by_the_seed() -> None:
    rows = Interactions(np.zeros(40, dtype=np.int64), np.arange(40), None, np.zeros(40, dtype=np.int64))
    tests = {tuple(split_interactions(rows, method="temporal", seed=s).test[:, 1].tolist()) for s in range(6)}
    assert len(tests) > 1


@pytest.mark.parametrize("method", data.SPLIT_METHODS)
def test_split_is_disjoint_complete_and_reindexed(method: str) -> None:
    rows = synthetic_interactions(n_users=300, n_items=400, n_interactions=9_000, min_per_user=5, seed=4)
    split = split_interactions(rows, method=method, seed=1)
    parts = [pair_set(split, part) for part in data.PARTS]
    assert sum(len(p) for p in parts) == len(rows)
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert set().union(*parts) == set(zip(rows.users.tolist(), rows.items.tolist(), strict=True))
    np.testing.assert_array_equal(split.user_ids, np.unique(rows.users))
    np.testing.assert_array_equal(split.item_ids, np.unique(rows.items))
    for part in data.PARTS:
        pairs = split.pairs(part)
        keys = pairs[:, 0] * split.n_items + pairs[:, 1]
        assert np.all(np.diff(keys) > 0)  # sorted by user, then item


@pytest.mark.parametrize("method", data.SPLIT_METHODS)
def test_split_is_seeded(method: str) -> None:
    rows = synthetic_interactions(n_users=200, n_items=300, n_interactions=6_000, min_per_user=5, seed=2)
    first, again = (split_interactions(rows, method=method, seed=7) for _ in range(2))
    other = split_interactions(rows, method=method, seed=8)
    for part in data.PARTS:
        np.testing.assert_array_equal(first.pairs(part), again.pairs(part))
    if method == "random":
        assert not np.array_equal(first.test, other.test)


def test_split_proportions_on_larger_data() -> None:
    rows = synthetic_interactions(n_users=500, n_items=1_000, n_interactions=50_000, seed=0)
    split = split_interactions(rows, ratios=(0.7, 0.2, 0.1))
    shares = np.array([len(split.train), len(split.valid), len(split.test)]) / len(rows)
    np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.01)


def test_split_rejects_bad_input() -> None:
    rows = rows_with_counts([5, 5])
    with pytest.raises(ValueError, match="duplicate"):
        split_interactions(Interactions(np.array([1, 1]), np.array([2, 2])))
    with pytest.raises(ValueError, match="no timestamps"):
        split_interactions(Interactions(np.array([1, 1]), np.array([2, 3])), method="temporal")
    with pytest.raises(ValueError, match="method must be one of"):
        split_interactions(rows, method="by_time")  # type: ignore[arg-type]
    for ratios in [(0.8, 0.1), (0.8, 0.3, 0.1), (0.0, 0.5, 0.5), (1.1, -0.1, 0.0), "0.8,0.1,0.1"]:
        with pytest.raises(ValueError, match="ratios must be"):
            split_interactions(rows, ratios=ratios)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        split_interactions(Interactions(np.array([], dtype=np.int64), np.array([], dtype=np.int64)))


def test_interactions_validation() -> None:
    with pytest.raises(ValueError, match="items must have 2 rows like users, got 1"):
        Interactions(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="users must hold integers"):
        Interactions(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError, match="one-dimensional"):
        Interactions(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(TypeError, match="items must hold real numbers, got dtype <U1"):
        Interactions(np.array([1]), np.array(["a"]))


def test_split_dataclass_validation() -> None:
    good = {"n_users": 2, "n_items": 3, "user_ids": np.array([5, 6]), "item_ids": np.array([1, 2, 3])}
    pairs = np.array([[0, 1], [1, 2]])
    split = InteractionSplit(train=pairs, valid=pairs[:0], test=pairs[:1], **good)
    assert split.summary()["n_train"] == 2
    with pytest.raises(ValueError, match="outside"):
        InteractionSplit(train=np.array([[0, 3]]), valid=pairs[:0], test=pairs[:0], **good)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        InteractionSplit(train=np.array([0, 1]), valid=pairs[:0], test=pairs[:0], **good)
    with pytest.raises(ValueError, match="part must be"):
        split.pairs("validation")  # type: ignore[arg-type]


def test_targets_and_exclusions() -> None:
    ids = {"user_ids": np.arange(2), "item_ids": np.arange(5)}
    split = InteractionSplit(
        train=np.array([[0, 0], [0, 1], [1, 4]]),
        valid=np.array([[0, 2]]),
        test=np.array([[0, 3], [1, 0]]),
        n_users=2,
        n_items=5,
        **ids,
    )
    targets, exclude = split.targets_and_exclusions("valid")
    assert targets.items_of(0).tolist() == [2] and exclude.items_of(0).tolist() == [0, 1]
    targets, exclude = split.targets_and_exclusions("test")
    assert targets.items_of(1).tolist() == [0]
    assert exclude.items_of(0).tolist() == [0, 1, 2] and exclude.items_of(1).tolist() == [4]
    assert split.item_popularity().tolist() == [1, 1, 0, 0, 1]
    assert split.user_activity().tolist() == [2, 1]
    with pytest.raises(ValueError, match="part must be 'valid' or 'test'"):
        split.targets_and_exclusions("train")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Per-user item lists


def test_user_item_lists_hand_case() -> None:
    lists = UserItemLists.from_pairs(np.array([[2, 1], [0, 4], [2, 0], [0, 3]]), n_users=4, n_items=5)
    assert lists.indptr.tolist() == [0, 2, 2, 4, 4]
    assert lists.indices.tolist() == [3, 4, 0, 1]
    positions, items = lists.rows(np.array([2, 1, 0]))
    assert positions.tolist() == [0, 0, 2, 2] and items.tolist() == [0, 1, 3, 4]
    other = UserItemLists.from_pairs(np.array([[3, 2], [0, 3], [0, 0]]), n_users=4, n_items=5)
    union = lists.union(other)
    assert [union.items_of(u).tolist() for u in range(4)] == [[0, 3, 4], [], [0, 1], [2]]
    with pytest.raises(ValueError, match="same users and items"):
        lists.union(UserItemLists.from_pairs(np.array([[0, 0]]), n_users=3, n_items=5))


def test_user_item_lists_are_the_same_from_sorted_and_shuffled_pairs() -> None:
    """Sorted pairs skip the sort (a split's parts); any other order is sorted: the lists are the same."""
    rng = np.random.default_rng(4)
    pairs = np.unique(np.stack([rng.integers(0, 40, 500), rng.integers(0, 60, 500)], axis=1), axis=0)
    from_sorted = UserItemLists.from_pairs(pairs, n_users=41, n_items=60)
    from_shuffled = UserItemLists.from_pairs(pairs[rng.permutation(len(pairs))], n_users=41, n_items=60)
    assert np.array_equal(from_sorted.indptr, from_shuffled.indptr)
    assert (
        np.array_equal(from_sorted.indices, from_shuffled.indices) and from_sorted.indices.dtype == np.int32
    )
    assert [from_sorted.items_of(u).tolist() for u in (0, 7)] == [
        sorted(pairs[pairs[:, 0] == u, 1].tolist()) for u in (0, 7)
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_contains_matches_a_set(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, 30, 400), rng.zipf(1.3, 400) % 50], axis=1), axis=0)
    lists = UserItemLists.from_pairs(pairs, n_users=31, n_items=50)
    users = np.concatenate([rng.integers(0, 31, 3_000), [30, 0, 30]])
    items = np.concatenate([rng.integers(0, 50, 3_000), [49, 0, 0]])
    reference = {tuple(p) for p in pairs.tolist()}
    expected = [(u, i) in reference for u, i in zip(users.tolist(), items.tolist(), strict=True)]
    assert lists.contains(users, items).tolist() == expected
    empty = UserItemLists.from_pairs(np.zeros((0, 2), dtype=np.int64), n_users=2, n_items=3)
    assert empty.contains(np.array([0, 1]), np.array([2, 0])).tolist() == [False, False]
    with pytest.raises(ValueError, match="one shape"):
        lists.contains(np.array([0, 1]), np.array([2]))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_exact_counts_and_distinct_pairs() -> None:
    rows = synthetic_interactions(n_users=400, n_items=300, n_interactions=20_000, min_per_user=10, seed=0)
    assert len(rows) == 20_000 and rows.ratings is None and rows.timestamps is not None
    assert len(set(zip(rows.users.tolist(), rows.items.tolist(), strict=True))) == 20_000
    per_user = np.bincount(rows.users, minlength=400)
    assert per_user.min() >= 10 and rows.users.max() < 400 and rows.items.max() < 300
    np.testing.assert_array_equal(rows.users, np.sort(rows.users))


def test_synthetic_is_seeded() -> None:
    kwargs = {"n_users": 100, "n_items": 80, "n_interactions": 3_000, "min_per_user": 5}
    first, again, other = (synthetic_interactions(**kwargs, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(first.items, again.items)
    np.testing.assert_array_equal(first.timestamps, again.timestamps)
    assert not np.array_equal(first.items, other.items)


def test_synthetic_popularity_is_zipf_shaped() -> None:
    def top_share(exponent: float) -> float:
        rows = synthetic_interactions(
            n_users=2_000,
            n_items=1_000,
            n_interactions=40_000,
            item_exponent=exponent,
            user_exponent=0.0,
            seed=0,
        )
        counts = np.sort(np.bincount(rows.items, minlength=1_000))[::-1]
        return counts[:100].sum() / counts.sum()

    assert top_share(1.0) > 0.35  # the 10% most popular items hold far more than 10% of the interactions
    assert top_share(0.0) < 0.15  # exponent 0 is uniform


def test_synthetic_near_full_users_use_the_exact_path() -> None:
    rows = synthetic_interactions(
        n_users=10, n_items=50, n_interactions=470, min_per_user=40, chunk_interactions=100
    )
    assert len(set(zip(rows.users.tolist(), rows.items.tolist(), strict=True))) == 470
    full = synthetic_interactions(n_users=4, n_items=6, n_interactions=24, min_per_user=0, timestamps=False)
    assert sorted(zip(full.users.tolist(), full.items.tolist(), strict=True)) == [
        (u, i) for u in range(4) for i in range(6)
    ]
    assert full.timestamps is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_users": 0}, "n_users must be an integer >= 1"),
        ({"n_interactions": 10**9}, "at most n_users \\* n_items"),
        ({"min_per_user": 60}, "at most n_items"),
        ({"n_interactions": 100}, "at least min_per_user \\* n_users"),
        ({"item_exponent": -1.0}, "item_exponent must be a finite number >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"n_users": 10, "n_items": 50, "n_interactions": 300, "min_per_user": 20} | kwargs
    with pytest.raises(ValueError, match=message):
        synthetic_interactions(**arguments)


def test_synthetic_dataset_names() -> None:
    split = load_split(DataConfig(dataset="synthetic-ml-100k", seed=3))
    assert split.n_users == 943 and len(split.train) + len(split.valid) + len(split.test) == 100_000
    assert split.n_items <= 1_682


@pytest.mark.slow
def test_synthetic_reaches_ml25m_scale() -> None:
    n_users, n_items, n_interactions = data.SYNTHETIC_SIZES["synthetic-ml-25m"]
    rows = synthetic_interactions(n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=0)
    assert len(rows) == 25_000_095
    keys = np.sort(rows.users * n_items + rows.items)
    assert np.all(keys[1:] != keys[:-1])
    split = split_interactions(rows)
    assert split.n_users == n_users
    batch = next(iter(BPRSampler(split, batch_size=65_536)))
    assert not split.train_items.contains(batch[0].numpy(), batch[2].numpy()).any()


# ---------------------------------------------------------------------------------------------------------------
# DataConfig


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ratios": (0.5, 0.5)}, "ratios must be three"),
        ({"split": "loo"}, "split must be one of"),
        ({"user_core": -1}, "user_core must be an integer >= 0, got -1"),
        ({"item_core": 2.5}, "item_core must be an integer >= 0, got 2.5"),
        ({"rating_threshold": math.inf}, "rating_threshold must be a finite number, got inf"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"data_root": 3}, "data_root must be a path or None"),
    ],
)
def test_data_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**changes)


def test_data_config_refuses_a_non_bool_download() -> None:
    with pytest.raises(TypeError, match="download must be True or False, got 'yes'"):
        DataConfig(download="yes")  # type: ignore[arg-type]


def test_data_config_normalizes_ratios_to_a_tuple() -> None:
    assert DataConfig(ratios=[0.6, 0.2, 0.2]).ratios == (0.6, 0.2, 0.2)  # type: ignore[arg-type]


def test_load_split_reports_empty_result(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_bytes(ratings_text("dat"))
    with pytest.raises(ValueError, match="no interactions left"):
        load_split(DataConfig(dataset="ml-1m", data_root=str(tmp_path), download=False, rating_threshold=6))
    split = load_split(
        DataConfig(dataset="ml-1m", data_root=str(tmp_path), download=False, rating_threshold=4)
    )
    assert len(split.train) + len(split.valid) + len(split.test) == sum(r[2] >= 4 for r in RATINGS)


# ---------------------------------------------------------------------------------------------------------------
# BPR sampler


@pytest.fixture(scope="module")
def small_split() -> InteractionSplit:
    rows = synthetic_interactions(n_users=150, n_items=60, n_interactions=3_000, min_per_user=5, seed=5)
    return split_interactions(rows, seed=0)


def collect(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, positives, negatives = zip(*batches, strict=True)
    return tuple(torch.cat(t).numpy() for t in (users, positives, negatives))


def test_sampler_epoch_covers_each_train_pair_once(small_split: InteractionSplit) -> None:
    sampler = BPRSampler(small_split, batch_size=256, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(len(small_split.train) / 256)
    assert all(t.dtype == torch.int64 for batch in batches for t in batch)
    assert [len(b[0]) for b in batches[:-1]] == [256] * (len(batches) - 1)
    users, positives, negatives = collect(batches)
    order = np.lexsort((positives, users))
    np.testing.assert_array_equal(np.stack([users[order], positives[order]], axis=1), small_split.train)
    assert not small_split.train_items.contains(users, negatives).any()
    assert negatives.min() >= 0 and negatives.max() < small_split.n_items


def test_sampler_drop_last(small_split: InteractionSplit) -> None:
    sampler = BPRSampler(small_split, batch_size=1_000, drop_last=True)
    assert len(sampler) == len(small_split.train) // 1_000
    assert all(len(b[0]) == 1_000 for b in sampler)


def test_sampler_is_seeded_per_epoch_and_resumable(small_split: InteractionSplit) -> None:
    first = BPRSampler(small_split, batch_size=500, seed=3)
    epoch0, epoch1 = collect(first), collect(first)
    assert first.epoch == 2
    assert not np.array_equal(epoch0[0], epoch1[0])
    resumed = BPRSampler(small_split, batch_size=500, seed=3)
    resumed.load_state_dict({"epoch": 1, "seed": 3})
    for a, b in zip(collect(resumed), epoch1, strict=True):
        np.testing.assert_array_equal(a, b)
    other = collect(BPRSampler(small_split, batch_size=500, seed=4))
    assert not np.array_equal(other[2], epoch0[2])
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"epoch": 1, "seed": 9})


def test_sampler_negatives_are_uniform_over_non_positives() -> None:
    split = InteractionSplit(
        train=np.array([[0, 0], [0, 1]] * 1 + [[1, 2]]),
        valid=np.zeros((0, 2), dtype=np.int64),
        test=np.zeros((0, 2), dtype=np.int64),
        n_users=2,
        n_items=10,
        user_ids=np.arange(2),
        item_ids=np.arange(10),
    )
    sampler = BPRSampler(split, seed=0)
    users = np.zeros(40_000, dtype=np.int64)
    negatives = sampler.sample_negatives(users, np.random.default_rng(0))
    counts = np.bincount(negatives, minlength=10)
    assert counts[0] == counts[1] == 0
    expected = 40_000 / 8
    assert np.all(np.abs(counts[2:] - expected) < 5 * math.sqrt(expected))


def test_sampler_moves_batches_to_device(small_split: InteractionSplit) -> None:
    users, _, _ = next(iter(BPRSampler(small_split, batch_size=8, device="cpu")))
    assert users.device == torch.device("cpu") and users.shape == (8,)


def test_sampler_rejects_bad_input(small_split: InteractionSplit) -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        BPRSampler(small_split, batch_size=0)
    full = InteractionSplit(
        train=np.array([[0, 0], [0, 1], [1, 0]]),
        valid=np.zeros((0, 2), dtype=np.int64),
        test=np.zeros((0, 2), dtype=np.int64),
        n_users=2,
        n_items=2,
        user_ids=np.arange(2),
        item_ids=np.arange(2),
    )
    with pytest.raises(ValueError, match="user 0 has every one of the 2 items"):
        BPRSampler(full)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        BPRSampler(small_split).set_epoch(-1)


# ---------------------------------------------------------------------------------------------------------------
# Worked examples


@pytest.mark.parametrize(
    "name",
    [
        "sparseapps.recsys.data",
        *(
            f"sparseapps.recsys.data.{module}"
            for module in ("interactions", "parsers", "sources", "splits", "synthetic", "sampler")
        ),
        "sparseapps.recsys.metrics",
    ],
)
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
