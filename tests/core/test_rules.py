import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseapps.core import rules, scoring, structured
from sparseapps.core.kernels import kernel_status


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def b(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_drop_removes_lowest_active_by_hand() -> None:
    mask = b(1, 1, 1, 0, 1)
    scores = t(0.3, 0.1, 0.9, 0.0, 0.2)
    assert rules.drop(mask, scores, 2).tolist() == [True, False, True, False, False]


def test_grow_adds_highest_inactive_by_hand() -> None:
    mask = b(1, 0, 0, 0)
    scores = t(9.0, 0.5, 2.0, 1.0)
    assert rules.grow(mask, scores, 2).tolist() == [True, False, True, True]


def test_magnitude_drop_then_gradient_grow_is_rigl() -> None:
    weight = t(0.5, -0.05, 0.0, 0.0, 0.2, 0.0)
    mask = b(1, 1, 0, 0, 1, 0)
    grad = t(0.0, 0.0, -3.0, 0.1, 0.0, 1.0)
    after = rules.drop(mask, scoring.magnitude(weight), 1)
    assert after.tolist() == [True, False, False, False, True, False]
    new = rules.grow(after, scoring.gradient(grad), 1)
    assert new.tolist() == [True, False, True, False, True, False]


def test_signed_magnitude_drops_half_from_each_side() -> None:
    w = t(0.1, 0.5, 0.9, -0.2, -0.6, -0.05)
    mask = torch.ones(6, dtype=torch.bool)
    after = rules.drop(mask, scoring.signed_magnitude(w, mask), 2)
    # smallest positive (0.1) and largest negative (-0.05)
    assert after.tolist() == [False, True, True, True, True, False]


def test_signed_magnitude_takes_more_from_one_side_when_the_other_runs_out() -> None:
    w = t(0.1, 0.2, 0.3, -0.9)
    mask = torch.ones(4, dtype=torch.bool)
    assert rules.drop(mask, scoring.signed_magnitude(w, mask), 3).tolist() == [False, False, True, False]


def test_weight_gradient_score() -> None:
    assert scoring.weight_gradient(t(2.0, -1.0), t(0.5, 3.0)).tolist() == [1.0, 3.0]


def test_unfired_prefers_never_active() -> None:
    ever = b(1, 0, 1, 0)
    mask = b(1, 0, 0, 0)
    g = torch.Generator().manual_seed(0)
    assert rules.grow(mask, scoring.unfired(ever, g), 2).tolist() == [True, True, False, True]


def test_cosine_similarity_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # input 0 fires on both samples, input 1 on the second
    y = torch.tensor([[2.0], [2.0]])  # output neuron fires equally on both samples
    scores = scoring.cosine_similarity(x, y, torch.Size([1, 2]))
    assert scores[0, 0] == pytest.approx(1.0)
    assert scores[0, 1] == pytest.approx(1 / 2**0.5)


def test_cosine_similarity_broadcasts_over_conv_kernels() -> None:
    scores = scoring.cosine_similarity(
        torch.randn(4, 3, 5, 5), torch.randn(4, 2, 5, 5), torch.Size([2, 3, 3, 3])
    )
    assert scores.shape == (2, 3, 3, 3)
    assert torch.equal(scores[:, :, 0, 0], scores[:, :, 2, 1])


def test_select_top_rejects_too_many() -> None:
    with pytest.raises(ValueError, match="cannot select 3"):
        rules.select_top(t(1.0, 2.0), b(1, 1), 3)


def test_select_top_per_row_by_hand() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]])
    cand = torch.tensor([[True, True, False], [True, True, True]])
    out = rules.select_top_per_row(scores, cand, torch.tensor([2, 0]))
    assert out.tolist() == [[True, True, False], [False, False, False]]


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(4, 200),
    density=st.floats(0.05, 0.95),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    criterion=st.sampled_from(["magnitude", "signed_magnitude", "random", "weight_gradient"]),
)
def test_drop_then_grow_preserves_nnz(size, density, fraction, seed, criterion) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, generator=g)
    grad = torch.randn(size, generator=g)
    nnz = max(1, round(density * size))
    mask = rules.select_top(torch.rand(size, generator=g), torch.ones(size, dtype=torch.bool), nnz)
    weight = weight * mask
    drop_scores = {
        "magnitude": scoring.magnitude(weight),
        "signed_magnitude": scoring.signed_magnitude(weight, mask),
        "random": scoring.uniform_like(weight, g),
        "weight_gradient": scoring.weight_gradient(weight, grad),
    }[criterion]
    n = int(fraction * nnz)
    after = rules.drop(mask, drop_scores, n)
    assert int(after.sum()) == nnz - n and not bool((after & ~mask).any())
    new = rules.grow(after, scoring.gradient(grad), n)
    assert int(new.sum()) == nnz


def test_constant_fan_in_update_keeps_fan_in_and_ablates() -> None:
    g = torch.Generator().manual_seed(0)
    mask = structured.constant_fan_in_mask(torch.Size([6, 10]), 24, g)  # k = 4
    weight = torch.randn(6, 10, generator=g) * mask
    weight[0] = weight[0] * 1e-4  # neuron 0: tiny weights ...
    grad = torch.randn(6, 10, generator=g)
    grad[0] = 0.0  # ... and no gradient: not salient
    new, active = structured.constant_fan_in_update(
        mask,
        weight.abs(),
        grad.abs(),
        n_drop=8,
        budget=24,
        active_rows=torch.ones(6, dtype=torch.bool),
        ablation_threshold=0.3,
        generator=g,
    )
    assert not bool(active[0]) and int(active.sum()) == 5
    counts = new.sum(1)
    assert counts[0] == 0 and bool((counts[1:] == 24 // 5).all())


def test_constant_fan_in_update_never_ablates_every_row() -> None:
    g = torch.Generator().manual_seed(1)
    mask = structured.constant_fan_in_mask(torch.Size([3, 8]), 9, g)
    zeros = torch.zeros(3, 8)
    new, active = structured.constant_fan_in_update(
        mask,
        zeros,
        zeros,
        n_drop=3,
        budget=9,
        active_rows=torch.ones(3, dtype=torch.bool),
        ablation_threshold=1.0,
        generator=g,
    )
    assert int(active.sum()) >= 1
    assert bool((new.sum(1)[active] == new.sum(1)[active][0]).all())


@settings(max_examples=15, deadline=None)
@given(
    size=st.integers(1 << 16, 1 << 17),
    fraction=st.floats(0.05, 0.95),
    n_share=st.floats(0.0001, 0.2),
    seed=st.integers(0, 1000),
    zeros=st.booleans(),
)
def test_select_top_on_large_tensors_is_exact(size, fraction, n_share, seed, zeros) -> None:
    """The prefiltered path must pick exactly a top-n set, with and without mass ties at zero."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(size, generator=g)
    if zeros:
        scores[torch.rand(size, generator=g) < 0.7] = 0.0
    candidates = torch.rand(size, generator=g) < fraction
    n = max(1, int(n_share * int(candidates.sum())))
    selected = rules.select_top(scores, candidates, n)
    assert int(selected.sum()) == n and not bool((selected & ~candidates).any())
    rest = candidates & ~selected
    if bool(rest.any()):
        assert scores[selected].min() >= scores[rest].max()


# --- update_masks: hand-computed cases (jaxpruner style) -------------------------------------------------------
def test_update_masks_drops_lowest_active_and_grows_highest_inactive() -> None:
    masks = {"a": torch.tensor([True, True, True, False, False, False])}
    new, record = rules.update_masks(
        masks,
        drop_scores={"a": torch.tensor([5.0, 1.0, 3.0, 0.0, 0.0, 0.0])},
        grow_scores={"a": torch.tensor([0.0, 9.0, 0.0, 2.0, 7.0, 4.0])},
        n_drop={"a": 1},
        step=7,
        drop_fraction=0.33,
    )
    # drops index 1 (score 1.0); grows the best inactive: index 1 again (9.0) -- a dropped entry may come back
    assert new["a"].tolist() == [True, True, True, False, False, False]
    assert record.to_dict() == {
        "step": 7,
        "drop_fraction": 0.33,
        "tensors": {"a": {"dropped": 0, "grown": 0, "nnz": 3}},
    }
    new, record = rules.update_masks(
        masks,
        drop_scores={"a": torch.tensor([5.0, 1.0, 3.0, 0.0, 0.0, 0.0])},
        grow_scores={"a": torch.tensor([0.0, 0.0, 0.0, 2.0, 7.0, 4.0])},
        n_drop={"a": 2},
    )
    assert new["a"].tolist() == [True, False, False, False, True, True]
    assert record.tensors["a"] == rules.TensorUpdate(dropped=2, grown=2, nnz=3)


def test_update_masks_respects_candidates_counts_and_exploration() -> None:
    masks = {"a": torch.tensor([True, True, False, False, False]), "b": torch.tensor([True, False, False])}
    drop_scores = {"a": torch.tensor([1.0, 2.0, 0, 0, 0]), "b": torch.tensor([1.0, 0, 0])}
    grow_scores = {"a": torch.tensor([0.0, 0, 3.0, 2.0, 1.0]), "b": torch.tensor([0.0, 5.0, 6.0])}
    # growth only inside the candidate region; budget moved from b to a by a function of the dropped masks
    new, record = rules.update_masks(
        masks,
        drop_scores,
        grow_scores,
        {"a": 1, "b": 0},
        n_grow=lambda after: {"a": 2, "b": 0} if not after["a"][0] else {"a": 0, "b": 0},
        candidates={"a": torch.tensor([True, True, False, True, True])},
    )
    assert new["a"].tolist() == [False, True, False, True, True]  # index 0 dropped; 2 is outside the region
    assert new["b"].tolist() == [True, False, False]
    assert record.tensors["a"].nnz == 3
    # half of the grown entries by the exploration scores instead
    new, _ = rules.update_masks(
        {"a": torch.tensor([False, False, False, False])},
        {"a": torch.zeros(4)},
        {"a": torch.tensor([4.0, 3.0, 2.0, 1.0])},
        {"a": 0},
        n_grow={"a": 2},
        explore_scores={"a": torch.tensor([0.0, 0.0, 0.0, 1.0])},
        explore_fraction=0.5,
    )
    assert new["a"].tolist() == [True, False, False, True]


def test_drop_counts_never_empty_a_tensor() -> None:
    assert rules.drop_counts({"a": torch.tensor([True]), "b": torch.ones(10, dtype=torch.bool)}, 1.0) == {
        "a": 0,
        "b": 9,
    }


@pytest.mark.skipif(not kernel_status()["compiled"], reason="compiled kernels not built")
@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([1, 7, 300, 70_000, 200_000]),
    levels=st.sampled_from([1, 3, 40, 0]),
    density=st.floats(0.0, 1.0),
    share=st.floats(0.0, 1.0),
    largest=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_selection_is_the_reference_set_ties_to_the_lower_position(
    size: int, levels: int, density: float, share: float, largest: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = (
        torch.randn(size, generator=g)
        if levels == 0
        else torch.randint(0, levels, (size,), generator=g).float()
    )
    candidates = torch.rand(size, generator=g) < density
    n = round(share * int(candidates.sum()))
    compiled = torch.ops.sparseapps.select_top(scores, candidates, n, largest, -1)
    reference = rules.select_top_reference(scores, candidates, n, largest=largest)
    assert torch.equal(compiled, reference)
    assert int(compiled.sum()) == n and not bool((compiled & ~candidates).any())
    if 0 < n < int(candidates.sum()):  # every selected one is at least as good as every candidate left out
        key = scores if largest else -scores
        assert float(key[compiled].min()) >= float(key[candidates & ~compiled].max())
