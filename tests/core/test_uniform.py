"""The counter-based uniform numbers behind tie noise and random scores (``scoring.uniform_like``)."""

from __future__ import annotations

import pytest
import torch

from sparseapps.core import scoring
from sparseapps.core.kernels import library, reference

compiled = pytest.mark.skipif(not library.ensure_loaded().compiled, reason="compiled kernels not loaded")


@compiled
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**62 - 1])
@pytest.mark.parametrize("numel", [0, 1, 15, 16, 17, 1000, 65537 * 3])
def test_compiled_equals_its_twin_bit_for_bit(seed: int, numel: int) -> None:
    assert torch.equal(
        torch.ops.sparseapps.hashed_uniform(seed, numel), reference.hashed_uniform_reference(seed, numel)
    )


def test_twin_matches_a_hand_computed_value() -> None:
    # i = 0, seed = 0: fmix32(0) = 0, then fmix32(0 ^ 0) = 0 -> 0.0; i = 1 worked out with Python integers.
    def fmix32(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    seed = 2**33 + 5
    expected = [
        fmix32(fmix32((i * 0x9E3779B9 + (seed & 0xFFFFFFFF)) & 0xFFFFFFFF) ^ (seed >> 32)) >> 8
        for i in range(4)
    ]
    got = reference.hashed_uniform_reference(seed, 4)
    assert got.tolist() == [value / 2**24 for value in expected]


def test_values_are_uniform_and_seeds_differ() -> None:
    u = reference.hashed_uniform_reference(3, 200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.bincount((u * 20).long(), minlength=20).float()
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 50.0  # 19 degrees of freedom: p < 1e-4 above ~45
    v = reference.hashed_uniform_reference(4, 200_000)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_uniform_like_takes_one_draw_and_keeps_the_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    first = scoring.uniform_like(torch.empty(3, 5), generator)
    second = scoring.uniform_like(torch.empty(3, 5), generator)
    assert first.shape == (3, 5) and first.dtype == torch.float32 and not torch.equal(first, second)
    again = scoring.uniform_like(torch.empty(3, 5), torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    reference_generator = torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=reference_generator))
    assert torch.equal(first.reshape(-1), reference.hashed_uniform_reference(seed, 15))


@compiled
@pytest.mark.parametrize("seed", [0, 99, 2**40 + 3])
@pytest.mark.parametrize("numel", [1, 16, 1001, 65537 * 2])
def test_noise_added_in_place_equals_its_twin(seed: int, numel: int) -> None:
    scores = torch.randn(numel, generator=torch.Generator().manual_seed(seed % 7))
    factor = float(torch.tensor(3.7e-7))  # a float32 value, as add_tie_noise passes it
    compiled_out = torch.ops.sparseapps.add_hashed_uniform_(scores.clone(), seed, factor)
    assert torch.equal(compiled_out, reference.add_hashed_uniform_reference(scores.clone(), seed, factor))


def test_tie_noise_never_writes_into_a_tensor_the_criterion_returned_from_its_context() -> None:
    from sparseapps.core import scores as registry

    @registry.register_drop("weight_itself_for_test", needs=())
    def _weight_itself(ctx: registry.ScoreContext) -> torch.Tensor:
        return ctx.weight

    try:
        weight = torch.randn(4, 6)
        before = weight.clone()
        context = registry.ScoreContext(
            fqn="w",
            weight=weight,
            mask=torch.ones(4, 6, dtype=torch.bool),
            step=0,
            generator=torch.Generator(),
        )
        noisy = registry.compute(registry.get("drop", "weight_itself_for_test"), context, tie_noise=1e-3)
        assert torch.equal(weight, before) and not torch.equal(noisy, before)
        fresh = registry.compute(registry.get("drop", "magnitude"), context, tie_noise=1e-3)
        assert torch.equal(weight, before) and fresh.shape == weight.shape
    finally:
        registry.unregister("drop", "weight_itself_for_test")
