"""SparseProp peer worker: runs inside the side environment (``.peers-venv``), never in the package's ``.venv``.

Reads one JSON request per line on stdin and answers one JSON line on stdout (``{"ok": true, ...}`` or
``{"ok": false, "error": ..., "traceback": ...}``); anything else the process prints goes to stderr. It holds
any number of models by ``"name"`` (default ``"default"``), so one process can interleave a dense torch model
and a SparseProp model step by step.

Requests (any request may carry ``"threads": t``, applied with ``torch.set_num_threads`` before it runs; torch
and SparseProp's kernels share one OpenMP runtime in this process, so that setting governs both):

- ``{"op": "build", "model": "mlp"|"block", "widths": [...], "batch": B, "sparsity": s, "threads": t,
  "seed": k}``, optional ``"name"``, ``"dense": true`` (plain torch, every weight trained), ``"nnz": [...]`` (exact
  nonzeros per Linear layer, in order; else split by ``"distribution"``: ``"erk"`` (default, the static/RigL
  presets' default in sparseapps) or ``"uniform"``), ``"swap": "all"|"auto"``, ``"adamw"`` (keyword arguments of
  ``torch.optim.AdamW``, default ``{"lr": 1e-3}`` as in bench_training; e.g. ``{"fused": true}``).
  Builds the model of ``scripts/bench_training.py`` (same init under ``torch.manual_seed(seed)``, same fixed batch
  drawn from ``torch.Generator().manual_seed(seed)``): ``mlp`` = Linear/ReLU stack over ``widths`` (784-4096-4096-10,
  quick 784-256-256-10) with cross-entropy; ``block`` = ``x + W2 gelu(W1 LN(x))`` with ``widths`` =
  ``[d, hidden, d]`` (768-3072-768, quick 128-512-128) with squared error. Each Linear weight gets a random
  unstructured static mask with its nnz; with ``swap="all"`` every layer below full density becomes a
  ``sparseprop.modules.SparseLinear`` (CSR values + int32 indices; a layer that the distribution leaves dense
  stays ``nn.Linear``); ``swap="auto"`` is SparseProp's own rule (``swap_modules_with_sparse``): a layer over 80%
  sparse, if SparseProp's forward+backward is faster than dense on one random batch (a layer kept dense then
  trains its zeros). AdamW over ``model.parameters()``.
- ``{"op": "steps", "n": k}``: k training steps on the fixed batch; answers ``"ms"`` (per step, perf_counter around
  zero_grad(set_to_none) + forward + loss + backward + optimizer.step, the order of bench_training),
  ``"optimizer_ms"`` (the optimizer.step part of each) and ``"loss"`` (after the last step).
- ``{"op": "memory"}``: bytes of ``params``, ``grads``, ``optimizer`` (AdamW state as stored: nnz-sized for the
  sparse layers), and ``structure`` (CSR indptr + indices of the sparse layers, and buffers), plus ``nnz``.
- ``{"op": "info"}``: versions, CPU, threads. ``{"op": "drop"}``: forget a model. ``{"op": "quit"}``.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence

# The protocol owns the original stdout; everything else printed (Python or C) lands on stderr.
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402  (torch first: SparseProp's extension then binds to torch's OpenMP runtime)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# isort: split
import sparseprop  # noqa: E402,F401
from sparseprop.modules import SparseLinear, sparsify_if_faster  # noqa: E402


def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process (torch's bundled libgomp, which SparseProp's kernels use too)."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libgomp" in line and "/" in line})
    try:
        return ctypes.CDLL(paths[0]) if len(paths) == 1 else None
    except OSError:
        return None


GOMP = _libgomp()


def omp_max_threads() -> int | None:
    return int(GOMP.omp_get_max_threads()) if GOMP is not None else None


# ---- per-layer nonzeros: a copy of sparseapps.core.distributions.target_nnz (this venv lacks sparseapps) ----
def _largest_remainder(ideal: Mapping[int, float], caps: Mapping[int, int], total: int) -> dict[int, int]:
    counts = {k: min(caps[k], math.floor(v)) for k, v in ideal.items()}
    missing = total - sum(counts.values())
    order = sorted(ideal, key=lambda k: (-(ideal[k] - math.floor(ideal[k])), k))
    while missing > 0:
        progressed = False
        for k in order:
            if missing == 0:
                break
            if counts[k] < caps[k]:
                counts[k] += 1
                missing -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total} nonzeros in tensors holding {sum(caps.values())}")
    return counts


def target_nnz(shapes: Sequence[Sequence[int]], density: float, distribution: str) -> list[int]:
    """Nonzeros per tensor, global count ``round(density * total)``; ERK caps tensors at dense and re-solves."""
    sizes = {i: math.prod(s) for i, s in enumerate(shapes)}
    budget = round(density * sum(sizes.values()))
    if distribution == "uniform":
        ideal = {i: density * n for i, n in sizes.items()}
    elif distribution == "erk":
        raw = {i: sum(s) / math.prod(s) for i, s in enumerate(shapes)}
        dense: set[int] = set()
        epsilon = 0.0
        while True:
            free = budget - sum(sizes[i] for i in dense)
            weighted = sum(raw[i] * sizes[i] for i in sizes if i not in dense)
            if weighted == 0:
                break
            epsilon = free / weighted
            over = {i for i in sizes if i not in dense and epsilon * raw[i] > 1.0}
            if not over:
                break
            dense |= over
        ideal = {i: float(sizes[i]) if i in dense else epsilon * raw[i] * sizes[i] for i in sizes}
    else:
        raise ValueError(f"distribution must be 'erk' or 'uniform', got {distribution!r}")
    counts = _largest_remainder(ideal, sizes, budget)
    return [counts[i] for i in range(len(shapes))]


# ---- the models of scripts/bench_training.py ----
class Block(nn.Module):
    """A transformer's MLP block on tokens ``[B, d]``: ``x + W2 gelu(W1 LN(x))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def make_task(kind: str, widths: Sequence[int], batch: int, seed: int):
    """Model builder, fixed batch and loss, as ``bench_training.make_task`` draws them."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        if len(widths) < 2:
            raise ValueError(f"mlp needs at least 2 widths, got {widths}")
        x = torch.randn(batch, widths[0], generator=generator)
        y = torch.randint(0, widths[-1], (batch,), generator=generator)

        def mlp() -> nn.Module:
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(itertools.pairwise(widths)):
                if i:
                    layers.append(nn.ReLU())
                layers.append(nn.Linear(a, b))
            return nn.Sequential(*layers)

        return mlp, x, y, F.cross_entropy
    if kind == "block":
        if len(widths) != 3 or widths[0] != widths[2]:
            raise ValueError(f"block needs widths [d, hidden, d], got {widths}")
        width, hidden = widths[0], widths[1]
        x = torch.randn(batch, width, generator=generator)
        return (lambda: Block(width, hidden)), x, torch.randn(batch, width, generator=generator), F.mse_loss
    raise ValueError(f"model must be 'mlp' or 'block', got {kind!r}")


def _set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, leaf = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def sparsify(model: nn.Module, nnz: Sequence[int], swap: str, batch: int, seed: int) -> list[dict]:
    """Random static masks with ``nnz`` entries per Linear (in order), then SparseProp's layers in their place."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(nnz) != len(linears):
        raise ValueError(f"expected {len(linears)} nnz counts (one per Linear), got {len(nnz)}")
    layers = []
    for i, ((fqn, linear), count) in enumerate(zip(linears, nnz, strict=True)):
        numel = linear.weight.numel()
        if not 0 < count <= numel:
            raise ValueError(f"{fqn}: nnz must be in [1, {numel}], got {count}")
        new: nn.Module = linear
        if count < numel:
            generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
            keep = torch.randperm(numel, generator=generator)[:count]
            with torch.no_grad():
                flat = linear.weight.view(-1)
                kept = flat[keep]
                # SparseProp's CSR conversion keeps nonzeros only: an initial weight of exactly 0 would be lost.
                kept[kept == 0] = 1e-8
                flat.zero_()
                flat[keep] = kept
            if swap == "all":
                new = SparseLinear.from_dense(linear)
            elif swap == "auto":
                if 1.0 - count / numel > 0.8:  # swap_modules_with_sparse's own threshold
                    new = sparsify_if_faster(linear, (batch, linear.in_features))
            else:
                raise ValueError(f"swap must be 'all' or 'auto', got {swap!r}")
        if new is not linear:
            if len(new.W_val) != count:
                raise RuntimeError(f"{fqn}: SparseProp kept {len(new.W_val)} nonzeros, expected {count}")
            _set_module(model, fqn, new)
        layers.append(
            {"fqn": fqn, "shape": list(linear.weight.shape), "nnz": count, "sparseprop": new is not linear}
        )
    return layers


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Trainer:
    def __init__(self, req: dict) -> None:
        kind, widths = req["model"], [int(w) for w in req["widths"]]
        batch, seed = int(req["batch"]), int(req.get("seed", 0))
        build, self.x, self.y, self.loss_fn = make_task(kind, widths, batch, seed)
        torch.manual_seed(seed)
        self.model = build()
        self.dense = bool(req.get("dense", False))
        self.layers: list[dict] = []
        if not self.dense:
            shapes = [m.weight.shape for m in self.model.modules() if isinstance(m, nn.Linear)]
            if "nnz" in req:
                nnz = [int(n) for n in req["nnz"]]
            else:
                sparsity = float(req["sparsity"])
                if not 0.0 < sparsity < 1.0:
                    raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
                nnz = target_nnz(shapes, 1.0 - sparsity, req.get("distribution", "erk"))
            self.layers = sparsify(self.model, nnz, req.get("swap", "all"), batch, seed)
        adamw = {"lr": 1e-3, **req.get("adamw", {})}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **adamw)

    def step(self) -> tuple[float, float, torch.Tensor]:
        """Seconds of one whole step and of its optimizer.step alone, and the loss."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        middle = time.perf_counter()
        self.optimizer.step()
        end = time.perf_counter()
        return end - start, end - middle, loss

    def memory(self) -> dict:
        params = list(self.model.parameters())
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        index = [t for m in self.model.modules() if isinstance(m, SparseLinear) for t in m.W_idx]
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": tensor_bytes(state),
            "structure": tensor_bytes(index) + tensor_bytes(self.model.buffers()),
            "nnz": sum(m.W_val.numel() for m in self.model.modules() if isinstance(m, SparseLinear)),
        }


def info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "torch": torch.__version__,
        "sparseprop": version("sparseprop"),
        "python": platform.python_version(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "omp_max_threads": omp_max_threads(),
    }


def handle(req: dict, trainers: dict[str, Trainer]) -> dict:
    op = req.get("op")
    if "threads" in req:
        threads = int(req["threads"])
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    name = str(req.get("name", "default"))
    if op == "build":
        trainers.pop(name, None)
        trainer = trainers[name] = Trainer(req)
        return {
            "layers": trainer.layers,
            "threads": torch.get_num_threads(),
            "omp_max_threads": omp_max_threads(),
        }
    if op == "steps":
        if name not in trainers:
            raise ValueError(f"no model named {name!r}: send a build first")
        n = int(req.get("n", 1))
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        times, optimizer, loss = [], [], None
        for _ in range(n):
            elapsed, in_optimizer, loss = trainers[name].step()
            times.append(elapsed * 1e3)
            optimizer.append(in_optimizer * 1e3)
        return {"ms": times, "optimizer_ms": optimizer, "loss": float(loss.detach())}
    if op == "memory":
        if name not in trainers:
            raise ValueError(f"no model named {name!r}: send a build first")
        return trainers[name].memory()
    if op == "drop":
        trainers.pop(name, None)
        return {}
    if op == "info":
        return info()
    if op == "quit":
        return {}
    raise ValueError(f"unknown op {op!r}; expected build, steps, memory, info, drop or quit")


def main() -> None:
    trainers: dict[str, Trainer] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request must be a JSON object")
            answer = {"ok": True, **handle(req, trainers)}
        except Exception as exc:  # answered, not fatal: the client raises it
            req = {}
            answer = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        _PROTO.write(json.dumps(answer) + "\n")
        _PROTO.flush()
        if isinstance(req, dict) and req.get("op") == "quit":
            break


if __name__ == "__main__":
    main()
