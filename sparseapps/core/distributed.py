"""Sparse training under ``torch.distributed`` (DDP): the same masks on every rank, checked at every update.

Under ``DistributedDataParallel`` every rank holds the same weights and, after the backward pass, the same
(all-reduced) gradients, so magnitude and gradient scores agree across ranks; random scores agree when every
engine's generator has the same state. :class:`DistributedSparsity` makes that hold and checks it:

- at attach time it checks that every rank has the same :class:`SparsityConfig`, ``total_steps`` and sparse
  tensor shapes (the error names the disagreeing rank), then copies rank 0's engine state (masks, generator,
  schedule position) and sparse weights to every other rank, so ``seed=None`` is safe;
- before each topology update is written (the engine's ``commit_hooks``), ``sync="verify"`` all-gathers a
  64-bit fingerprint of every new mask and of the step counter and raises :class:`MaskDivergenceError` naming
  the ranks and tensors that differ from rank 0; ``sync="broadcast"`` first overwrites every rank's new masks
  with rank 0's, then checks.

Collectives run on CPU tensors with gloo and on the current CUDA device with NCCL.

Example (run under ``torchrun --nproc_per_node=2``)::

    torch.distributed.init_process_group("gloo")
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = DistributedSparsity.attach(model, optimizer, SparsityConfig.preset("rigl", sparsity=0.9),
                                          total_steps=1000)
    # the training loop is unchanged; every topology update is checked across ranks
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sparseapps.core.config import SparsityConfig
from sparseapps.core.engine import DynamicSparsity

SyncMode = Literal["verify", "broadcast"]
SYNC_MODES = ("verify", "broadcast")


class MaskDivergenceError(RuntimeError):
    """Ranks hold different masks (or disagree on the step) at a topology update."""


class RankMismatchError(ValueError):
    """Ranks were set up with different sparsity configurations or tensor shapes."""


def require_process_group(group: dist.ProcessGroup | None = None) -> None:
    """Raises ``RuntimeError`` with the fix when no ``torch.distributed`` process group is initialized."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; install one with it")
    if not dist.is_initialized():
        raise RuntimeError(
            "no torch.distributed process group: call torch.distributed.init_process_group('gloo') on CPU or "
            "('nccl') on GPU first (launch with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fingerprint(tensor: torch.Tensor) -> int:
    """A signed 64-bit hash of a tensor's shape and contents (bool tensors are bit-packed first).

    Example:
        >>> a = torch.tensor([[True, False], [False, True]])
        >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(~a)
        (True, False)
    """
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bool:
        raw = np.packbits(data.numpy().reshape(-1)).tobytes()
    else:
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(f"{tuple(data.shape)} {data.dtype};".encode(), digest_size=8)
    digest.update(raw)
    return int.from_bytes(digest.digest(), "little", signed=True)


def gather_int64(values: Sequence[int], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gathers one int64 vector per rank: ``[world_size, len(values)]`` on CPU (lengths must agree)."""
    device = collective_device(group)
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered).cpu()


def disagreeing_ranks(table: torch.Tensor) -> list[int]:
    """Ranks (rows of ``table [world, n]``) whose row differs from rank 0's."""
    return [rank for rank in range(1, table.shape[0]) if not torch.equal(table[rank], table[0])]


def verify_same_tensors(
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int,
    what: str = "masks",
    group: dist.ProcessGroup | None = None,
) -> None:
    """All-gathers fingerprints of named tensors and a step counter; raises if any rank differs from rank 0.

    Every rank gets the same gathered table, so every rank raises together (no rank is left waiting). The
    names must be the same, in the same order, on every rank.

    Raises:
        MaskDivergenceError: naming each disagreeing rank and the tensors (or the step) it differs in.
    """
    names = list(tensors)
    table = gather_int64([step, *(fingerprint(tensors[name]) for name in names)], group)
    bad = disagreeing_ranks(table)
    if not bad:
        return
    details = []
    for rank in bad:
        if int(table[rank, 0]) != int(table[0, 0]):
            details.append(f"rank {rank} is at step {int(table[rank, 0])}, rank 0 at step {int(table[0, 0])}")
        differing = [names[i] for i in range(len(names)) if int(table[rank, i + 1]) != int(table[0, i + 1])]
        if differing:
            details.append(f"rank {rank} has other {what} than rank 0 for {differing}")
    raise MaskDivergenceError(
        f"{what} diverged across ranks at step {int(table[0, 0])}: " + "; ".join(details) + ". Use the same "
        "seed and data order on every rank, set tie_noise > 0 against float ties, or sync='broadcast'"
    )


def check_same_description(description: Mapping[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Raises :class:`RankMismatchError` naming the ranks whose JSON-able ``description`` differs from rank 0's.

    The message lists each differing top-level key (and each differing key of a nested ``"config"`` dict) with
    rank 0's and the rank's values.
    """
    text = json.dumps(description, sort_keys=True, default=str)
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
    table = gather_int64([digest], group)
    bad = disagreeing_ranks(table)
    if not bad:
        return
    descriptions: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(descriptions, dict(description), group=group)
    reference = descriptions[0]
    details = []
    for rank in bad:
        theirs = descriptions[rank]
        diff: dict[str, Any] = {}
        for key, value in reference.items():
            if key == "config" and isinstance(value, Mapping):
                diff.update({k: (v, theirs[key].get(k)) for k, v in value.items() if theirs[key].get(k) != v})
            elif theirs.get(key) != value:
                diff[key] = (value, theirs.get(key))
        details.append(f"rank {rank} differs from rank 0 in {diff} (rank 0's value, rank {rank}'s value)")
    raise RankMismatchError("ranks disagree on the sparsity setup: " + "; ".join(details))


def _config_description(engine: DynamicSparsity) -> dict[str, Any]:
    return {
        "config": engine.config.to_dict(),
        "total_steps": engine.total_steps,
        "shapes": {fqn: list(t.mask.shape) for fqn, t in engine.tensors.items()},
    }


def check_same_configuration(engine: DynamicSparsity, group: dist.ProcessGroup | None = None) -> None:
    """Raises :class:`RankMismatchError` naming the ranks whose config, total_steps or shapes differ from rank 0."""
    check_same_description(_config_description(engine), group)


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DDP / DataParallel / FSDP-like wrappers (parameter names lose ``module.``)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


class DistributedSparsity:
    """Keeps a :class:`DynamicSparsity` engine's topology identical on every rank, and proves it.

    Args:
        engine: the rank's engine, built on the same model on every rank (attach it to ``ddp.module``, or use
            :meth:`attach`, so tensor names match a single-process run).
        sync: ``"verify"`` (default): every rank decides its masks from the same scores and a checksum proves
            they agree; ``"broadcast"``: rank 0's masks are copied to every rank at each update, then checked.
        group: the process group (default: the world).

    Raises:
        RuntimeError: no process group is initialized.
        RankMismatchError: ranks have different configs, ``total_steps`` or tensor shapes (names the ranks).
        MaskDivergenceError: at an update, ranks computed different masks or are at different steps.

    Example (under ``torchrun``)::

        sparsity = DistributedSparsity(DynamicSparsity(ddp.module, optimizer, config, 1000))
        ...  # train; sparsity.checks counts the cross-rank verifications done
    """

    def __init__(
        self, engine: DynamicSparsity, *, sync: SyncMode = "verify", group: dist.ProcessGroup | None = None
    ) -> None:
        if not isinstance(engine, DynamicSparsity):
            raise TypeError(f"engine must be a DynamicSparsity, got {type(engine).__name__}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(map(repr, SYNC_MODES))}, got {sync!r}")
        require_process_group(group)
        self.engine = engine
        self.sync: SyncMode = sync
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.checks = 0
        check_same_configuration(engine, group)
        self._copy_from_rank0()
        self.verify()
        engine.commit_hooks.append(self._on_commit)

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        total_steps: int,
        *,
        sync: SyncMode = "verify",
        group: dist.ProcessGroup | None = None,
        initial_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> DistributedSparsity:
        """Builds the engine on ``model`` (a DDP wrapper is unwrapped, so names match single-process runs)."""
        require_process_group(group)
        engine = DynamicSparsity(_unwrap(model), optimizer, config, total_steps, initial_masks=initial_masks)
        return cls(engine, sync=sync, group=group)

    def remove(self) -> None:
        """Stops the cross-rank checks and detaches the engine's own hooks."""
        if self._on_commit in self.engine.commit_hooks:
            self.engine.commit_hooks.remove(self._on_commit)
        self.engine.remove()

    # ------------------------------------------------------------------ checks
    def verify(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """All-gathers mask fingerprints and the step; raises :class:`MaskDivergenceError` on any difference."""
        masks = self.engine.masks if masks is None else masks
        verify_same_tensors(
            {fqn: masks[fqn] for fqn in self.engine.tensors}, step=self.engine.step, group=self.group
        )
        self.checks += 1

    # ------------------------------------------------------------------ synchronization
    def _broadcast_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        device = collective_device(self.group)
        names = list(self.engine.tensors)
        flat = torch.cat([masks[fqn].reshape(-1).to(device=device, dtype=torch.uint8) for fqn in names])
        dist.broadcast(flat, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        offset = 0
        for fqn in names:
            mask = masks[fqn]
            mask.copy_(flat[offset : offset + mask.numel()].reshape(mask.shape).to(mask.device, torch.bool))
            offset += mask.numel()

    def _on_commit(self, new_masks: Mapping[str, torch.Tensor]) -> None:
        if self.sync == "broadcast":
            self._broadcast_masks(new_masks)
        self.verify(new_masks)

    def _copy_from_rank0(self) -> None:
        """Rank 0's engine state and sparse weights on every rank (masks, generator, schedule, momentum)."""
        source = dist.get_global_rank(self.group, 0) if self.group else 0
        state: list[Any] = [self.engine.state_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(state, src=source, group=self.group)
        if self.rank != 0:
            self.engine.load_state_dict(state[0])
        device = collective_device(self.group)
        with torch.no_grad():
            for t in self.engine.tensors.values():
                buffer = t.param.detach().to(device).contiguous()
                dist.broadcast(buffer, src=source, group=self.group)
                if self.rank != 0:
                    t.param.copy_(buffer.to(t.param.device))
        self.engine.apply_masks()
