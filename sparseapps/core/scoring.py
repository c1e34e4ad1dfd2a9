"""Score functions: one number per tensor entry, higher means more worth keeping (drop) or adding (grow).

Each is a pure function of tensors. ``drop`` removes the lowest-scoring active entries, ``grow`` adds the
highest-scoring inactive ones (see ``rules.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed from ``generator``: the draw behind every counter-based uniform tensor."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _compiled_on(tensor: torch.Tensor) -> bool:
    from sparseapps.core.kernels import library  # the kernels package imports this module's users

    return tensor.device.type == "cpu" and library.ensure_loaded().compiled


def uniform_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``U(0, 1)`` float32 of ``tensor``'s shape on its device, determined by one draw from a CPU ``generator``.

    The draw is a 62-bit seed; the values are a counter-based hash of (seed, position) with 24 random bits each
    (compiled on the CPU, about 20x faster than ``torch.rand``, whose mt19937 stream was a fifth of a compact
    RigL update; the pure-torch twin elsewhere, bit for bit equal).
    """
    from sparseapps.core.kernels import reference

    seed = draw_seed(generator)
    if _compiled_on(tensor):
        return torch.ops.sparseapps.hashed_uniform(seed, tensor.numel()).view(tensor.shape)
    return reference.hashed_uniform_reference(seed, tensor.numel(), tensor.device).view(tensor.shape)


def add_tie_noise(
    scores: torch.Tensor, scale: float, generator: torch.Generator, *, in_place: bool = False
) -> torch.Tensor:
    """Scores plus ``U(0, scale * max|scores|)`` so that ties (e.g. many exact zeros) break at random.

    The noise is relative to the largest score, so it never reorders scores that differ by more than
    ``scale`` of the range. With ``scale == 0`` the scores are returned as they are. The noise is
    :func:`uniform_like`'s (one draw from ``generator``), added without a temporary where the scores may be
    overwritten (``in_place``: a float32 tensor nobody else holds, e.g. a criterion's fresh result).
    """
    from sparseapps.core.kernels import reference

    scores = scores.float()
    if scale <= 0:
        return scores
    low, high = torch.aminmax(scores)  # max |score| without an |scores| copy (a large share of an update)
    factor = noise_factor(low, high, scale)  # a float32 value
    seed = draw_seed(generator)
    out = scores if in_place and scores.is_contiguous() else scores.contiguous().clone()
    if _compiled_on(out):
        return torch.ops.sparseapps.add_hashed_uniform_(out, seed, factor)
    return reference.add_hashed_uniform_reference(out, seed, factor)


def uniform_at(positions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The values :func:`uniform_like` would give at ``positions [K]`` (int64, flat) with the same draw.

    Example:
        >>> a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        >>> torch.equal(uniform_at(torch.tensor([5, 2]), a), uniform_like(torch.zeros(8), b)[[5, 2]])
        True
    """
    from sparseapps.core.kernels import reference

    seed = draw_seed(generator)
    if _compiled_on(positions):
        return torch.ops.sparseapps.hashed_uniform_at(seed, positions)
    return reference.hashed_uniform_at_reference(seed, positions)


def noise_factor(low: torch.Tensor, high: torch.Tensor, scale: float) -> float:
    """``scale * max(|low|, |high|)`` as a float32 value (``scale`` alone if both are 0): the tie-noise width."""
    magnitude = torch.maximum(low.abs(), high.abs())
    if magnitude == 0:
        magnitude = torch.ones((), device=magnitude.device)
    return float(magnitude * scale)


def add_tie_noise_at(
    scores: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    generator: torch.Generator,
    *,
    any_inactive: bool,
) -> torch.Tensor:
    """:func:`add_tie_noise` of a dense score tensor, at ``positions`` only, in place into ``scores [K]`` (float32).

    The dense tensor's other entries score 0 (``any_inactive``: there are some), which counts in the noise scale.

    Example:
        >>> dense, g1, g2 = torch.tensor([0.0, 2.0, 0.0, 3.0]), torch.Generator(), torch.Generator()
        >>> full = add_tie_noise(dense, 0.1, g1.manual_seed(0))
        >>> at = add_tie_noise_at(dense[[1, 3]].clone(), torch.tensor([1, 3]), 0.1, g2.manual_seed(0),
        ...                       any_inactive=True)
        >>> torch.equal(full[[1, 3]], at)
        True
    """
    from sparseapps.core.kernels import reference

    low, high = torch.aminmax(scores) if scores.numel() else (torch.zeros(()), torch.zeros(()))
    if any_inactive:
        low, high = torch.minimum(low, torch.zeros(())), torch.maximum(high, torch.zeros(()))
    factor = noise_factor(low, high, scale)
    seed = draw_seed(generator)
    if _compiled_on(positions):
        noise = torch.ops.sparseapps.hashed_uniform_at(seed, positions)
    else:
        noise = reference.hashed_uniform_at_reference(seed, positions)
    return scores.add_(noise.mul_(factor))


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``|w|`` (RigL, SET, GMP): small weights are dropped first."""
    return weight.detach().abs().float()


def signed_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SET's drop score: rank among the active weights of the same sign, counted from zero outwards.

    Dropping the lowest scores takes the smallest positive and the largest negative weights in turns, so half
    of the dropped entries come from each side (more from one side when the other runs out).

    Example:
        >>> signed_magnitude(torch.tensor([0.1, 0.5, -0.2, -0.9]), torch.ones(4, dtype=torch.bool))
        tensor([0., 1., 0., 1.])
    """
    w = weight.detach().reshape(-1).float()
    active = mask.reshape(-1)
    scores = torch.full_like(w, float(w.numel()))
    for side in (active & (w > 0), active & (w <= 0)):
        index = side.nonzero().squeeze(1)
        order = torch.argsort(w[index].abs(), stable=True)
        scores[index[order]] = torch.arange(index.numel(), dtype=torch.float32, device=w.device)
    return scores.reshape(weight.shape)


def weight_gradient(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|w * g|``, the first-order saliency (SNIP's score when used at initialization)."""
    return (weight.detach() * grad).abs().float()


def gradient(grad: torch.Tensor) -> torch.Tensor:
    """``|g|`` of the dense gradient (RigL's growth)."""
    return grad.abs().float()


def momentum(momentum_buffer: torch.Tensor) -> torch.Tensor:
    """``|m|`` of the gradient momentum (Sparse Momentum / SNFS growth)."""
    return momentum_buffer.abs().float()


def unfired(ever_active: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random order with every never-active entry ahead of every entry that was active before.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bool((unfired(torch.tensor([True, False]), g)[1] > 1).item())
        True
    """
    return uniform_like(ever_active, generator) + (~ever_active).float() * 2.0


def cosine_similarity(inputs: torch.Tensor, outputs: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """CTRE's growth score: ``|cos|`` between each output neuron's and each input neuron's activations.

    Args:
        inputs: ``[B, in]`` (Linear) or ``[B, in, *spatial]`` (Conv, averaged over space) layer inputs.
        outputs: ``[B, out]`` or ``[B, out, *spatial]`` layer outputs for the same batch.
        weight_shape: the weight's shape, ``[out, in]`` or ``[out, in, *kernel]``; the score is broadcast over
            kernel positions.

    Returns:
        ``weight_shape`` scores in ``[0, 1]``.
    """
    x = inputs.detach().float().flatten(2).mean(2) if inputs.dim() > 2 else inputs.detach().float()
    y = outputs.detach().float().flatten(2).mean(2) if outputs.dim() > 2 else outputs.detach().float()
    if x.shape[1] != weight_shape[1] or y.shape[1] != weight_shape[0]:
        raise ValueError(
            f"activations [B, {x.shape[1]}] -> [B, {y.shape[1]}] do not match weight shape {tuple(weight_shape)}"
        )
    similarity = (F.normalize(y, dim=0).T @ F.normalize(x, dim=0)).abs()
    return (
        similarity.reshape(*similarity.shape, *([1] * (len(weight_shape) - 2))).expand(weight_shape).clone()
    )
