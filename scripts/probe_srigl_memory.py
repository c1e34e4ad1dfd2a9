"""Probe: peak RSS and update time of the engine's SRigL on a compact 100k x 512 output layer, on active entries
(``ablation_threshold`` 0) or on dense views (> 0). One fresh process per call; one thread.

    .venv/bin/python scripts/probe_srigl_memory.py 0.0     # active entries
    .venv/bin/python scripts/probe_srigl_memory.py 0.3     # dense views (SRigL's ablation)
"""

import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import DynamicSparsity, SparsityConfig, to_compact
from sparseapps.core.compact import topology

torch.set_num_threads(1)
ablation = float(sys.argv[1])
C, H = 100_000, 512
model = nn.Sequential(nn.Linear(128, H), nn.ReLU(), nn.Linear(H, C))
config = SparsityConfig.preset(
    "srigl",
    sparsity=0.95,
    storage="compact",
    include=("2.weight",),
    update_interval=10,
    seed=0,
    ablation_threshold=ablation,
)
model = to_compact(model, config)
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
engine = DynamicSparsity(model, opt, config, total_steps=30)
print("entries path:", topology.applies(engine), topology.dense_view_reason(engine))
g = torch.Generator().manual_seed(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
for _ in range(30):
    x, y = torch.randn(128, 128, generator=g), torch.randint(C, (128,), generator=g)
    t = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(
    f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (after build {before:.0f} MB); "
    f"update steps {[round(times[i - 1], 2) for i in (10, 20)]} s, median step {sorted(times)[15]:.3f} s; history {len(engine.history)}"
)
