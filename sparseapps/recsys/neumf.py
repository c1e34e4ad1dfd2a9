"""NeuMF's dense layers: a GMF branch and an MLP tower over the columns of one table row per user and item."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core.validation import check_int

#: NeuMF full ranking: most elements of one ``[B, items, width]`` block of MLP activations (16 MB in float32).
SCORE_CHUNK_ELEMENTS = 1 << 22


def neumf_widths(dim: int, gmf_dim: int | None = None, mlp_layers: int = 3) -> tuple[int, tuple[int, ...]]:
    """NeuMF's sizes for tables of width ``D``: ``(G, (h_1, ..., h_L))``.

    ``G`` columns feed GMF (``D // 2`` when ``gmf_dim`` is None) and ``M = D - G`` feed the MLP, whose input
    is ``[e_u ; e_i]`` (``2M``) and whose ``L`` ReLU layers have widths ``h_k = M // 2^(k-1)``, each at least 1.

    Example:
        >>> neumf_widths(64)
        (32, (32, 16, 8))
        >>> neumf_widths(8, mlp_layers=4)
        Traceback (most recent call last):
        ...
        ValueError: mlp_layers must be at most 3 for 4 MLP columns (widths 4, 2, 1), got 4
    """
    check_int("dim", dim, low=1)
    if dim < 2:
        raise ValueError(f"dim must be >= 2 for neumf (GMF and MLP columns), got {dim}")
    gmf = dim // 2 if gmf_dim is None else gmf_dim
    check_int("gmf_dim", gmf, low=1, high=dim - 1)
    check_int("mlp_layers", mlp_layers, low=1)
    mlp = dim - gmf
    most = mlp.bit_length()
    if mlp_layers > most:
        widths = ", ".join(str(mlp >> k) for k in range(most))
        raise ValueError(
            f"mlp_layers must be at most {most} for {mlp} MLP columns (widths {widths}), got {mlp_layers}"
        )
    return gmf, tuple(mlp >> k for k in range(mlp_layers))


def gmf_column_mask(dim: int, gmf_dim: int) -> torch.Tensor:
    """``[D]`` bool: the ``G`` columns that feed NeuMF's GMF branch, spread evenly (the others feed the MLP).

    Column ``d`` is GMF's when ``⌈(d + 1)G / D⌉ > ⌈dG / D⌉``, so every prefix of ``k`` columns holds
    ``⌈kG / D⌉`` of them: the prefix and nested masks of DSL give both branches their share of each row.

    Example:
        >>> gmf_column_mask(6, 3).int().tolist()
        [1, 0, 1, 0, 1, 0]
    """
    columns = torch.arange(dim + 1) * gmf_dim
    ceil = -torch.div(-columns, dim, rounding_mode="floor")
    return ceil[1:] > ceil[:-1]


class NeuMFHead(nn.Module):
    """NeuMF's dense layers over table rows of width ``D``: a GMF branch, an MLP tower and the output layer.

    With ``G`` GMF columns (:func:`gmf_column_mask`), the other ``M`` MLP columns ``e^M`` and
    ``a = ReLU``, a user and an item score

    ``s(u, i) = w_G · (e_u^G ⊙ e_i^G) + w_M · a(W_L ... a(W_1 [e_u^M ; e_i^M] + b_1) ... + b_L)``,

    with ``W_1 : 2M -> M`` and each later layer halving the width (:func:`neumf_widths`). The output layer has
    no bias: the BPR loss only sees score differences, so a bias would never get a gradient.

    Full ranking uses that the first layer splits into a user and an item part, ``W_1 [e_u ; e_i] =
    W_1^u e_u + W_1^i e_i``: the item part is computed once per item (:meth:`item_hidden`), and
    :meth:`rank_scores` adds the user part and runs the rest of the tower on blocks of items, so memory stays
    ``O(B · block · M)``. Both accept the item table as a dense tensor or as a sparse CSR matrix (compact
    serving).

    Args:
        dim: table width ``D``.
        gmf_dim: ``G``; ``None`` is ``D // 2``.
        mlp_layers: ``L``, the ReLU layers of the tower.

    Example:
        >>> head = NeuMFHead(8)
        >>> head.gmf_dim, [layer.out_features for layer in head.mlp]
        (4, [4, 2, 1])
        >>> users, items = torch.randn(2, 8), torch.randn(5, 8)
        >>> head.rank_scores(users, items).shape
        torch.Size([2, 5])
        >>> pairs = head.pair_scores(users.repeat_interleave(5, 0), items.repeat(2, 1)).reshape(2, 5)
        >>> torch.allclose(pairs, head.rank_scores(users, items), atol=1e-6)
        True
    """

    gmf_columns: torch.Tensor
    mlp_columns: torch.Tensor

    def __init__(self, dim: int, gmf_dim: int | None = None, mlp_layers: int = 3) -> None:
        super().__init__()
        gmf, widths = neumf_widths(dim, gmf_dim, mlp_layers)
        self.dim, self.gmf_dim, self.mlp_dim = dim, gmf, dim - gmf
        is_gmf = gmf_column_mask(dim, gmf)
        self.register_buffer("gmf_columns", is_gmf.nonzero().flatten(), persistent=False)
        self.register_buffer("mlp_columns", (~is_gmf).nonzero().flatten(), persistent=False)
        inputs = (2 * self.mlp_dim, *widths[:-1])
        self.mlp = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(inputs, widths, strict=True))
        self.output = nn.Linear(gmf + widths[-1], 1, bias=False)

    def _tower(self, first: torch.Tensor) -> torch.Tensor:
        """``[..., h_1]`` pre-activations of the first layer -> ``[..., h_L]`` output of the tower."""
        hidden = F.relu(first)
        for layer in self.mlp[1:]:
            hidden = F.relu(layer(hidden))
        return hidden

    def pair_scores(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """``user_rows [N, D]``, ``item_rows [N, D]`` -> ``[N]``: the score of each (user, item) pair."""
        gmf = user_rows[:, self.gmf_columns] * item_rows[:, self.gmf_columns]
        mlp_input = torch.cat([user_rows[:, self.mlp_columns], item_rows[:, self.mlp_columns]], dim=1)
        mlp = self._tower(self.mlp[0](mlp_input))
        return self.output(torch.cat([gmf, mlp], dim=1)).squeeze(1)

    def _padded(self, matrix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``[n, len(columns)]`` -> ``[n, D]`` with the values in ``columns`` and zeros elsewhere."""
        out = matrix.new_zeros(matrix.shape[0], self.dim)
        out[:, columns] = matrix
        return out

    def item_hidden(self, items: torch.Tensor) -> torch.Tensor:
        """``items [I, D]`` (dense or sparse CSR) -> ``[I, h_1]``: the item part ``W_1^i e_i^M`` of layer 1."""
        item_weight = self.mlp[0].weight[:, self.mlp_dim :]
        return items @ self._padded(item_weight, self.mlp_columns).t()

    def rank_scores(
        self,
        user_rows: torch.Tensor,
        items: torch.Tensor,
        item_hidden: torch.Tensor | None = None,
        *,
        chunk_elements: int = SCORE_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        """Scores of every user against every item, the MLP run on blocks of items.

        Args:
            user_rows: ``[B, D]``.
            items: ``[I, D]`` item table, dense or sparse CSR.
            item_hidden: ``[I, h_1]`` from :meth:`item_hidden` (computed here when None).
            chunk_elements: most elements of one ``[B, block, h_1]`` activation block.

        Returns:
            ``[B, I]``.
        """
        check_int("chunk_elements", chunk_elements, low=1)
        if item_hidden is None:
            item_hidden = self.item_hidden(items)
        weight = self.output.weight[0]
        gmf_query = self._padded(user_rows[:, self.gmf_columns] * weight[: self.gmf_dim], self.gmf_columns)
        scores = (items @ gmf_query.t()).t().contiguous()
        user_weight, bias = self.mlp[0].weight[:, : self.mlp_dim], self.mlp[0].bias
        user_hidden = (user_rows[:, self.mlp_columns] @ user_weight.t() + bias).unsqueeze(1)
        mlp_weight = weight[self.gmf_dim :]
        block = max(1, chunk_elements // max(1, user_hidden.shape[0] * user_hidden.shape[2]))
        for start in range(0, item_hidden.shape[0], block):
            first = user_hidden + item_hidden[start : start + block].unsqueeze(0)
            scores[:, start : start + block] += self._tower(first) @ mlp_weight
        return scores

    def to_dict(self) -> dict[str, Any]:
        """Sizes and weights, for compact export and ``torch.save``."""
        state = {name: tensor.detach().to("cpu").clone() for name, tensor in self.state_dict().items()}
        return {"dim": self.dim, "gmf_dim": self.gmf_dim, "mlp_layers": len(self.mlp), "state": state}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NeuMFHead:
        """Inverse of :meth:`to_dict`."""
        head = cls(int(values["dim"]), int(values["gmf_dim"]), int(values["mlp_layers"]))
        head.load_state_dict(values["state"])
        return head.eval()
