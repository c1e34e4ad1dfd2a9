"""sparseapps.rl: sparse deep-RL agents on Stable-Baselines3 whose topology adapts, drifting environments, and
diagnostics of adaptation.

Example:
    >>> from stable_baselines3 import SAC
    >>> from sparseapps.core import SparsityConfig
    >>> from sparseapps.rl import DynamicSparsityCallback
    >>> model = SAC("MlpPolicy", "Pendulum-v1")
    >>> callback = DynamicSparsityCallback(SparsityConfig.preset("rigl", sparsity=0.9))
    >>> # model.learn(50_000, callback=callback)
"""

from typing import Any

from sparseapps.rl import policies as _policies
from sparseapps.rl.callback import (
    SUPPORTED_ALGORITHMS,
    DynamicSparsityCallback,
    SparseNetwork,
    count_optimizer_steps,
    find_networks,
)
from sparseapps.rl.diagnostics import (
    DormantNeurons,
    MaskTurnover,
    ShiftRecovery,
    find_dormant_neurons,
    mask_turnover,
    shift_recovery,
)
from sparseapps.rl.drift import DriftSchedule, DriftWrapper, make_drifting_env
from sparseapps.rl.plasticity import (
    ContinualBackpropCallback,
    PermutedObservations,
    ReDoCallback,
    effective_rank,
    phase_metrics,
)
from sparseapps.rl.policies import (
    SparseActorCriticCnnPolicy,
    SparseActorCriticPolicy,
    SparseDQNPolicy,
    SparseMultiInputActorCriticPolicy,
    SparsePolicyClass,
    SparseSACPolicy,
    SparseTD3Policy,
    accept_masks,
    condense_policy,
    sparse_policy_class,
)
from sparseapps.rl.presets import RL_PRESETS, RLPreset, rl_preset
from sparseapps.rl.run_config import RLRun, make_sparsity_config
from sparseapps.rl.train import summarize, train_many, train_run

__all__ = [
    "RL_PRESETS",
    "SUPPORTED_ALGORITHMS",
    "ContinualBackpropCallback",
    "DormantNeurons",
    "DriftSchedule",
    "DriftWrapper",
    "DynamicSparsityCallback",
    "MaskTurnover",
    "PermutedObservations",
    "RLPreset",
    "RLRun",
    "ReDoCallback",
    "ShiftRecovery",
    "SparseActorCriticCnnPolicy",
    "SparseActorCriticPolicy",
    "SparseDQNPolicy",
    "SparseMultiInputActorCriticPolicy",
    "SparseNetwork",
    "SparsePolicyClass",
    "SparseSACPolicy",
    "SparseTD3Policy",
    "accept_masks",
    "condense_policy",
    "count_optimizer_steps",
    "effective_rank",
    "find_dormant_neurons",
    "find_networks",
    "make_drifting_env",
    "make_sparsity_config",
    "mask_turnover",
    "phase_metrics",
    "rl_preset",
    "shift_recovery",
    "sparse_policy_class",
    "summarize",
    "train_many",
    "train_run",
]


def __getattr__(name: str) -> Any:
    if name == "MaskAwarePolicy":  # deprecated: policies.__getattr__ warns
        return getattr(_policies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
