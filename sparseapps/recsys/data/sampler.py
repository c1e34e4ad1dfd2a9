"""The BPR sampler: (user, positive, negative) batches whose order is a pure function of the seed and the epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from sparseapps.core.validation import check_int
from sparseapps.recsys.data.splits import InteractionSplit, index_dtype


class BPRSampler:
    """Batches of (user, positive item, negative item) for BPR, one pass over the train pairs per epoch.

    Each train pair appears once per epoch in a seeded random order; each gets one negative drawn uniformly from
    all items and redrawn until it is not one of the user's train items. Epoch ``e`` draws from
    ``(seed, e)`` alone, so a resumed run reproduces the same batches.

    Example:
        >>> from sparseapps.recsys.data import DataConfig, load_split
        >>> split = load_split(DataConfig(dataset="synthetic-ml-100k"))
        >>> sampler = BPRSampler(split, batch_size=4096, seed=0)
        >>> users, positives, negatives = next(iter(sampler))
        >>> users.shape, users.dtype
        (torch.Size([4096]), torch.int64)
    """

    def __init__(
        self,
        split: InteractionSplit,
        *,
        batch_size: int = 2048,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed, low=0)
        if len(split.train) == 0:
            raise ValueError("the split has no train interactions to sample from")
        full = np.flatnonzero(split.train_items.counts() >= split.n_items)
        if len(full):
            raise ValueError(
                f"user {int(full[0])} has every one of the {split.n_items} items as a train positive, so no "
                "negative exists; filter such users out"
            )
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else None
        self._epoch = 0

    def __len__(self) -> int:
        n = len(self.split.train)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(sampler)`` will produce."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next ``iter(sampler)`` produce ``epoch`` (for resuming)."""
        check_int("epoch", epoch, low=0)
        self._epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The sampler's position, for checkpoints."""
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`; the seed must match."""
        if state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint sampler seed {state.get('seed')!r} differs from this sampler's {self.seed}"
            )
        self.set_epoch(int(state["epoch"]))

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[B]`` uniform items, none of them a train positive of the matching user."""
        train = self.split.train_items
        negatives = rng.integers(0, self.split.n_items, size=len(users), dtype=np.int64)
        redo = np.flatnonzero(train.contains(users, negatives))
        while len(redo):
            negatives[redo] = rng.integers(0, self.split.n_items, size=len(redo), dtype=np.int64)
            redo = redo[train.contains(users[redo], negatives[redo])]
        return negatives

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch: ``(users, positives, negatives)``, each ``[B]`` int64."""
        check_int("epoch", epoch, low=0)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        train = self.split.train
        # ``rng.permutation(n)`` shuffles an int64 ``arange``; the same shuffle of an int32 one is the same order in
        # half the bytes (the epoch's largest array: 20M pairs at ML-25M scale).
        order = np.arange(len(train), dtype=index_dtype(len(train)))
        rng.shuffle(order)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            users, positives = train[index, 0], train[index, 1]
            negatives = self.sample_negatives(users, rng)
            tensors = tuple(torch.from_numpy(array) for array in (users, positives, negatives))
            if self.device is not None:
                tensors = tuple(tensor.to(self.device, non_blocking=True) for tensor in tensors)
            yield tensors

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self.iter_epoch(epoch)
