"""Full-ranking metrics of sparseapps.recsys.metrics against hand-computed values and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparseapps.recsys.data import InteractionSplit, UserItemLists
from sparseapps.recsys.metrics import METRICS, evaluate_ranking, evaluate_split, ranking_metrics


def lists(pairs: list[tuple[int, int]], n_users: int, n_items: int) -> UserItemLists:
    return UserItemLists.from_pairs(
        np.array(pairs, dtype=np.int64).reshape(-1, 2), n_users=n_users, n_items=n_items
    )


def table_scores(table: torch.Tensor):
    """A score function that looks rows up in a fixed ``[U, I]`` table."""
    return lambda users: table[users]


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_ranking_metrics_hand_case() -> None:
    # ranks 1..3: miss, hit, hit; 4 held-out items
    values = ranking_metrics(torch.tensor([[False, True, True]]), torch.tensor([4]), ks=[1, 2, 3])
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    expected = {
        "recall@1": 0.0,
        "recall@2": 1 / 4,
        "recall@3": 2 / 4,
        "precision@1": 0.0,
        "precision@2": 1 / 2,
        "precision@3": 2 / 3,
        "hit@1": 0.0,
        "hit@2": 1.0,
        "hit@3": 1.0,
        "mrr@1": 0.0,
        "mrr@2": 1 / 2,
        "mrr@3": 1 / 2,
        "ndcg@1": 0.0,
        "ndcg@2": d2 / (1 + d2),
        "ndcg@3": (d2 + d3) / (1 + d2 + d3),
    }
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name].item() == pytest.approx(value, abs=1e-12), name


def test_ranking_metrics_ideal_dcg_uses_fewer_targets_than_k() -> None:
    # one held-out item found at rank 1 -> perfect NDCG even at K = 3
    values = ranking_metrics(
        torch.tensor([[True, False, False]]), torch.tensor([1]), ks=[3], metrics=["ndcg"]
    )
    assert values == {"ndcg@3": pytest.approx(torch.tensor([1.0], dtype=torch.float64))}


def test_evaluate_ranking_hand_case() -> None:
    # user 0: item 0 is seen (excluded); ranking of the rest by score: 1, 2, 3, 4; held out: 2 and 4
    # user 1: ranking 4, 3, 2, 1, 0; held out: 4 -> found first
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = lists([(0, 2), (0, 4), (1, 4)], 2, 5)
    exclude = lists([(0, 0)], 2, 5)
    result = evaluate_ranking(table_scores(scores), targets, exclude, ks=[2, 4])
    d2, d4 = 1 / math.log2(3), 1 / math.log2(5)
    user0 = {
        "recall@2": 1 / 2,
        "recall@4": 1.0,
        "precision@2": 1 / 2,
        "precision@4": 2 / 4,
        "hit@2": 1.0,
        "hit@4": 1.0,
        "mrr@2": 1 / 2,
        "mrr@4": 1 / 2,
        "ndcg@2": d2 / (1 + d2),
        "ndcg@4": (d2 + d4) / (1 + d2),
    }
    user1 = {"recall": 1.0, "precision@2": 1 / 2, "precision@4": 1 / 4, "hit": 1.0, "mrr": 1.0, "ndcg": 1.0}
    for name, value in user0.items():
        other = user1.get(name, user1.get(name.split("@")[0]))
        assert result[name] == pytest.approx((value + other) / 2), name
    assert result["n_users"] == 2


def test_excluded_items_are_never_ranked_or_hit() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    # item 0 is held out but also excluded: it cannot be found; item 1 is excluded and scores high
    targets = lists([(0, 0), (0, 3)], 1, 4)
    exclude = lists([(0, 0), (0, 1)], 1, 4)
    result = evaluate_ranking(table_scores(scores), targets, exclude, ks=[1, 2, 4])
    assert result["hit@1"] == 0.0 and result["precision@1"] == 0.0
    assert result["recall@2"] == 0.5 and result["mrr@2"] == 0.5  # ranking: 2, 3
    # K = 4 reaches past the two rankable items: the excluded ones add no hits
    assert result["recall@4"] == 0.5 and result["precision@4"] == 0.25


def test_users_without_held_out_items_are_skipped() -> None:
    scores = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    targets = lists([(0, 0), (2, 1)], 3, 3)
    seen_users: list[int] = []

    def score(users: torch.Tensor) -> torch.Tensor:
        seen_users.extend(users.tolist())
        return scores[users]

    result = evaluate_ranking(score, targets, ks=[1], metrics=["hit"])
    assert seen_users == [0, 2]
    assert result == {"hit@1": 0.5, "n_users": 2.0}


def test_evaluate_split_excludes_train_for_valid_and_train_plus_valid_for_test() -> None:
    split = InteractionSplit(
        train=np.array([[0, 0]]),
        valid=np.array([[0, 1]]),
        test=np.array([[0, 2]]),
        n_users=1,
        n_items=4,
        user_ids=np.arange(1),
        item_ids=np.arange(4),
    )
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert evaluate_split(table_scores(scores), split, "valid", ks=[1])["hit@1"] == 1.0  # ranking 1, 2, 3
    test = evaluate_split(table_scores(scores), split, "test", ks=[1, 2])
    assert test["hit@1"] == 1.0 and test["precision@2"] == 0.5  # ranking 2, 3


def test_score_function_output_is_not_modified() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    before = scores.clone()
    evaluate_ranking(table_scores(scores), lists([(0, 2)], 1, 3), lists([(0, 0)], 1, 3), ks=[1])
    evaluate_ranking(lambda users: scores, lists([(0, 2)], 1, 3), lists([(0, 0)], 1, 3), ks=[1])
    torch.testing.assert_close(scores, before)


def test_k_equal_to_the_number_of_items_is_allowed() -> None:
    result = evaluate_ranking(table_scores(torch.tensor([[0.0, 1.0]])), lists([(0, 0)], 1, 2), ks=[2])
    assert result["recall@2"] == 1.0 and result["mrr@2"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Against a brute-force reference


def reference_metrics(
    scores: np.ndarray, targets: dict[int, set[int]], exclude: dict[int, set[int]], k: int
) -> dict[str, float]:
    totals = dict.fromkeys(METRICS, 0.0)
    for user, held_out in targets.items():
        ranked = [
            i for i in np.argsort(-scores[user], kind="stable").tolist() if i not in exclude.get(user, set())
        ]
        top = ranked[:k]
        hits = [item in held_out for item in top]
        totals["recall"] += sum(hits) / len(held_out)
        totals["precision"] += sum(hits) / k
        totals["hit"] += float(any(hits))
        totals["mrr"] += next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0)
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        totals["ndcg"] += dcg / sum(1 / math.log2(r + 2) for r in range(min(len(held_out), k)))
    return {f"{name}@{k}": total / len(targets) for name, total in totals.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_at_any_batch_size(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 23, 40
    scores = rng.standard_normal((n_users, n_items))
    target_pairs, exclude_pairs = [], []
    for user in range(n_users):
        items = rng.permutation(n_items)
        n_targets, n_exclude = rng.integers(0, 6), rng.integers(0, 12)
        target_pairs += [(user, i) for i in items[:n_targets].tolist()]
        exclude_pairs += [(user, i) for i in items[n_targets : n_targets + n_exclude].tolist()]
    targets, exclude = lists(target_pairs, n_users, n_items), lists(exclude_pairs, n_users, n_items)
    target_sets: dict[int, set[int]] = {}
    exclude_sets: dict[int, set[int]] = {}
    for u, i in target_pairs:
        target_sets.setdefault(u, set()).add(i)
    for u, i in exclude_pairs:
        exclude_sets.setdefault(u, set()).add(i)
    expected = {}
    for k in (1, 5, 20):
        expected |= reference_metrics(scores, target_sets, exclude_sets, k)
    table = torch.from_numpy(scores)
    for batch_size in (1, 4, 100):
        result = evaluate_ranking(table_scores(table), targets, exclude, ks=(1, 5, 20), batch_size=batch_size)
        assert result.pop("n_users") == len(target_sets)
        assert result.keys() == expected.keys()
        for name, value in expected.items():
            assert result[name] == pytest.approx(value, abs=1e-9), (batch_size, name)


def test_default_cut_offs_are_10_and_20() -> None:
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((3, 30)))
    result = evaluate_ranking(table_scores(table), lists([(0, 1), (1, 2), (2, 3)], 3, 30))
    assert sorted(result) == sorted([f"{m}@{k}" for m in METRICS for k in (10, 20)] + ["n_users"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("ks", "message"),
    [
        ([21], r"K must be at most the number of items \(20\), got 21"),
        ([10, 100], r"at most the number of items \(20\), got 100"),
        ([0], "each K must be a positive integer, got 0"),
        ([2.5], "each K must be a positive integer, got 2.5"),
        ([], "ks must be a non-empty sequence"),
        (10, "ks must be a non-empty sequence"),
    ],
)
def test_bad_cut_offs(ks, message: str) -> None:
    targets = lists([(0, 1)], 1, 20)
    with pytest.raises(ValueError, match=message):
        evaluate_ranking(table_scores(torch.zeros(1, 20)), targets, ks=ks)


def test_bad_metrics_and_batch_size() -> None:
    targets = lists([(0, 1)], 1, 5)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        evaluate_ranking(table_scores(torch.zeros(1, 5)), targets, ks=[1], metrics=["auc"])
    with pytest.raises(ValueError, match="metrics must be a non-empty sequence"):
        evaluate_ranking(table_scores(torch.zeros(1, 5)), targets, ks=[1], metrics="recall")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        evaluate_ranking(table_scores(torch.zeros(1, 5)), targets, ks=[1], batch_size=0)


def test_bad_scores() -> None:
    targets = lists([(0, 1), (1, 0)], 2, 5)
    with pytest.raises(ValueError, match=r"shape \[2, 5\], got \(2, 4\)"):
        evaluate_ranking(table_scores(torch.zeros(2, 4)), targets, ks=[1])
    with pytest.raises(ValueError, match="got list"):
        evaluate_ranking(lambda users: [[0.0] * 5] * 2, targets, ks=[1])
    with pytest.raises(ValueError, match="floating-point"):
        evaluate_ranking(table_scores(torch.zeros(2, 5, dtype=torch.long)), targets, ks=[1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(table_scores(torch.full((2, 5), math.nan)), targets, ks=[1])


def test_bad_lists() -> None:
    targets = lists([(0, 1)], 1, 5)
    with pytest.raises(ValueError, match="exclude covers 1 users x 6 items"):
        evaluate_ranking(table_scores(torch.zeros(1, 5)), targets, lists([], 1, 6), ks=[1])
    with pytest.raises(ValueError, match="no user has held-out items"):
        evaluate_ranking(table_scores(torch.zeros(1, 5)), lists([], 1, 5), ks=[1])
    with pytest.raises(ValueError, match="part must be 'valid' or 'test'"):
        split = InteractionSplit(
            train=np.array([[0, 0]]),
            valid=np.array([[0, 1]]),
            test=np.array([[0, 2]]),
            n_users=1,
            n_items=4,
            user_ids=np.arange(1),
            item_ids=np.arange(4),
        )
        evaluate_split(table_scores(torch.zeros(1, 4)), split, "train", ks=[1])  # type: ignore[arg-type]


def test_ranking_metrics_bad_input() -> None:
    with pytest.raises(ValueError, match="bool tensor"):
        ranking_metrics(torch.zeros(1, 3), torch.tensor([1]), ks=[1])
    with pytest.raises(ValueError, match="at least one held-out item"):
        ranking_metrics(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([0]), ks=[1])
    with pytest.raises(ValueError, match=r"at most the length of the top lists \(3\), got 4"):
        ranking_metrics(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1]), ks=[4])
    with pytest.raises(ValueError, match=r"n_targets must have shape \[1\]"):
        ranking_metrics(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1, 2]), ks=[1])
