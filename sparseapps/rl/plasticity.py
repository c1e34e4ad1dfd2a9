"""Plasticity under long drift: neuron recycling (ReDo, continual backprop) as SB3 callbacks, an observation-permuting
drift, and the metrics of a run that faces many shifts.

* **ReDo** (Sokar et al., ICML 2023; official code ``google/dopamine``, ``dopamine/labs/redo``): every
  ``interval`` gradient steps of a network, the hidden neurons that are tau-dormant on a batch
  (:func:`sparseapps.rl.diagnostics.dormant_mask`) are recycled: incoming weights re-drawn (the official code draws
  them Xavier-uniform), incoming bias set to 0, outgoing weights set to 0, and the optimizer's moments of those
  entries reset (the official code zeroes Adam's ``mu`` and ``nu`` and keeps its step count; so does this one).
  :class:`ReDoCallback` recycles at the end of the first rollout after each multiple of ``interval`` optimizer
  steps, on up to ``batch_size`` observations of the replay buffer (off-policy) or of the rollout just collected
  (on-policy); SB3 has run no gradient step between the rollout's end and that moment.
* **Continual backprop** (Dohare et al., Nature 2024, "Loss of plasticity in deep continual learning"; official
  code ``shibhansh/loss-of-plasticity``, ``lop/algos/gnt.py``): after every optimizer step, each hidden unit's
  contribution utility ``u <- eta * u + (1 - eta) * mean_batch|h| * sum_k |w_out[k]|`` and running mean activation
  ``f <- eta * f + (1 - eta) * mean_batch h`` are updated and its age increases by one; units older than the maturity
  threshold ``m`` are eligible; ``rho * n_eligible`` replacements accumulate per layer and the integer part is spent
  on the eligible units of lowest bias-corrected utility ``u / (1 - eta**age)``. A replaced unit gets fresh incoming
  weights (LeCun-uniform, the official RL default), bias 0, outgoing weights 0 with its bias-corrected mean
  activation times those weights moved into the next layer's bias (so the next layer's expected input is unchanged,
  as the official code does), age, utility and mean 0, and its optimizer entries reset. Defaults are the official
  configuration for PPO on Slippery Ant (``lop/rl/cfg/sant/cbp.yml``): ``rho = 1e-4``, ``m = 10000``,
  ``eta = 0.99`` (GnT's default decay), contribution utility. Differences: the official code rounds fractional
  replacements at random unless ``accumulate=True``; here they accumulate (deterministic); it averages ``|w_out|``
  over outgoing weights where the paper sums (the same ranking within a layer); torch's Adam keeps one step count
  per tensor, so a replaced unit's moments restart at zero under the tensor's bias correction (the official
  ``AdamGnT`` also resets per-entry step counts).
  :class:`ContinualBackpropCallback` updates after each optimizer step from the activations of that step's training
  forward (captured by hooks on the activation modules while the network is in training mode with gradients on).
* Both act on **dense** hidden layers: a network whose layers carry a sparsity mask or are compact (a
  :class:`~sparseapps.rl.callback.DynamicSparsityCallback` is attached) is refused with a ``ValueError``; the
  dense-network baselines are what the plasticity suite needs them for. **Target networks** are left to their own
  update (Polyak averaging in SAC / TD3, periodic copies in DQN), as in the official ReDo agents, whose targets are
  synced from the online parameters on their schedule: recycled neurons reach the target gradually (SAC, TD3) or at
  the next copy (DQN).
* **Metrics**: :func:`effective_rank` (srank of Kumar et al. 2021), :func:`weight_norms`, :func:`network_snapshot`
  (dormant fraction, effective rank of each hidden layer, weight norm of one network on a batch) and
  :func:`phase_metrics` (per drift phase: return over the last window, steps to recover, area under the curve).
* :class:`PermutedObservations`: a drift that permutes the observation vector, a new seeded permutation per phase.

Example:
    >>> from stable_baselines3 import DQN
    >>> model = DQN("MlpPolicy", "CartPole-v1", learning_starts=50, train_freq=4, seed=0)
    >>> redo = ReDoCallback(interval=10)
    >>> _ = model.learn(200, callback=redo)
    >>> [(entry["network"], entry["step"]) for entry in redo.history]
    [('q_net', 10), ('q_net', 20), ('q_net', 30)]
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparseapps.core.compact import CompactLinear
from sparseapps.core.masks import get_mask
from sparseapps.core.validation import check_choice, check_int, check_number
from sparseapps.rl.diagnostics import ACTIVATION_TYPES, DORMANT_TAU, dormant_mask, shift_recovery
from sparseapps.rl.drift import INFO_ENV_STEP, INFO_PHASE, DriftSchedule
from sparseapps.rl.networks import SparseNetwork, find_networks

__all__ = [
    "CBP_DECAY_RATE",
    "CBP_MATURITY_THRESHOLD",
    "CBP_REPLACEMENT_RATE",
    "INITS",
    "REDO_BATCH_SIZE",
    "REDO_INTERVAL",
    "SRANK_DELTA",
    "ContinualBackpropCallback",
    "HiddenLayer",
    "PermutedObservations",
    "PhaseMetrics",
    "ReDoCallback",
    "UnitUtility",
    "buffer_batch",
    "effective_rank",
    "find_hidden_layers",
    "network_inputs",
    "network_snapshot",
    "phase_metrics",
    "recycle_neurons",
    "select_replacements",
    "update_utility",
    "weight_norms",
]

#: ReDo's recycling period in gradient steps (Sokar et al. 2023).
REDO_INTERVAL = 1000
#: Observations ReDo scores neurons on (the official agents' ``batch_size_statistics``).
REDO_BATCH_SIZE = 256
#: Continual backprop's replacement rate, maturity threshold and utility decay (official Slippery-Ant PPO config).
CBP_REPLACEMENT_RATE = 1e-4
CBP_MATURITY_THRESHOLD = 10_000
CBP_DECAY_RATE = 0.99
#: Kumar et al. 2021's threshold of the srank.
SRANK_DELTA = 0.01

Init = Literal["xavier_uniform", "lecun_uniform", "torch_default"]
INITS = ("xavier_uniform", "lecun_uniform", "torch_default")


# ---------------------------------------------------------------------------------------------- metrics
def effective_rank(features: torch.Tensor, delta: float = SRANK_DELTA) -> int:
    """The srank of Kumar et al. 2021 ("Implicit under-parameterization"): the smallest ``k`` whose ``k`` largest
    singular values of ``features`` hold at least ``1 - delta`` of their sum (0 for an all-zero matrix).

    Args:
        features: ``[B, D]``, e.g. a hidden layer's activations on ``B`` observations.
        delta: the share of the singular-value sum that may be left out, in ``[0, 1)``.

    Example:
        >>> effective_rank(torch.eye(4)), effective_rank(torch.ones(5, 3)), effective_rank(torch.diag(torch.tensor([1.0, 0.005])))
        (4, 1, 1)
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a [B, D] tensor, got {shape}")
    delta = check_number("delta", delta, low=0.0, high=1.0, high_open=True)
    values = torch.linalg.svdvals(features.detach().double())
    total = float(values.sum())
    if total == 0.0:
        return 0
    shares = torch.cumsum(values, 0) / total
    return min(int((shares < 1.0 - delta - 1e-12).sum()) + 1, values.numel())


def weight_norms(model: BaseAlgorithm) -> dict[str, float]:
    """The L2 norm of all parameters (weights and biases) of each online network of ``model`` (names as
    :func:`~sparseapps.rl.networks.find_networks` gives them)."""
    norms = {}
    for network in find_networks(model):
        squares = sum(float(p.detach().double().pow(2).sum()) for p in network.network.parameters())
        norms[network.name] = math.sqrt(squares)
    return norms


# ---------------------------------------------------------------------------------------------- hidden layers
@dataclass(frozen=True, eq=False)
class HiddenLayer:
    """One layer of hidden neurons: the Linear layer that computes them, their activation module and the Linear
    layers that read them.

    Attributes:
        name: fqn of the activation module inside the traced network.
        incoming: the Linear layer whose outputs are the neurons' pre-activations (``weight [N, in]``).
        activation: the activation module.
        outgoing: the Linear layers whose input is the activation's output (``weight [out, N]`` each).
    """

    name: str
    incoming: nn.Linear
    activation: nn.Module
    outgoing: tuple[nn.Linear, ...]

    @property
    def width(self) -> int:
        """Neurons in the layer."""
        return self.incoming.out_features


@dataclass
class _Call:
    fqn: str
    module: nn.Module
    input: torch.Tensor | None
    output: torch.Tensor


def _check_dense(network: nn.Module, owner: str) -> None:
    for fqn, module in network.named_modules():
        masked = get_mask(module, "weight") is not None if isinstance(module, nn.Linear) else False
        if isinstance(module, CompactLinear) or masked:
            raise ValueError(
                f"{owner} recycles whole neurons of dense layers, but {fqn or type(network).__name__} is sparse "
                f"({'a compact layer' if isinstance(module, CompactLinear) else 'it carries a sparsity mask'}; a "
                "DynamicSparsityCallback is attached?): expected a dense network"
            )


def _as_inputs(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
    if args[0].dim() == 0 or args[0].shape[0] == 0:
        raise ValueError(f"inputs must be a batch [B, ...] with B >= 1, got shape {tuple(args[0].shape)}")
    return args


def trace_hidden_layers(
    network: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]
) -> list[tuple[HiddenLayer, torch.Tensor]]:
    """Runs ``network(*inputs)`` once (eval mode, no gradient, global RNG forked; modes restored) and returns every
    hidden layer it finds with its activations ``[B, N]`` on the batch.

    A hidden layer is an activation module (:data:`~sparseapps.rl.diagnostics.ACTIVATION_TYPES`) whose input is the
    output of a Linear layer and whose output is the input of at least one Linear layer (found by tensor identity,
    so the layers may sit in different submodules, as SB3's ``mlp_extractor`` and ``action_net`` do). Activations
    read by anything but Linear layers (a concatenation, say) would not have their readers reset: SB3's MLPs have
    none.

    Raises:
        ValueError: a reader's ``in_features`` differs from the layer's width, or no hidden layer ran.
    """
    args = _as_inputs(inputs)
    parameter = next(network.parameters(), None)
    if parameter is not None:
        args = tuple(a.to(parameter.device) for a in args)
    calls: list[_Call] = []
    watched = [
        (fqn, sub) for fqn, sub in network.named_modules() if isinstance(sub, (nn.Linear, *ACTIVATION_TYPES))
    ]

    def recorder(fqn: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, hook_inputs: tuple[Any, ...], output: Any) -> None:
            first = hook_inputs[0] if hook_inputs and isinstance(hook_inputs[0], torch.Tensor) else None
            if isinstance(output, torch.Tensor):
                calls.append(_Call(fqn, module, first, output))

        return hook

    training = {sub: sub.training for sub in network.modules()}
    handles = [sub.register_forward_hook(recorder(fqn)) for fqn, sub in watched]
    devices = [parameter.device] if parameter is not None and parameter.device.type == "cuda" else []
    try:
        network.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            network(*args)
    finally:
        for handle in handles:
            handle.remove()
        for sub, flag in training.items():
            sub.training = flag

    found: dict[int, tuple[HiddenLayer, torch.Tensor]] = {}
    for index, call in enumerate(calls):
        if not isinstance(call.module, ACTIVATION_TYPES) or call.input is None:
            continue
        sources = [c for c in calls[:index] if c.output is call.input and isinstance(c.module, nn.Linear)]
        readers = [
            c.module
            for c in calls[index + 1 :]
            if isinstance(c.module, nn.Linear) and c.input is call.output and c.module is not call.module
        ]
        if not sources or not readers:
            continue
        incoming = sources[-1].module
        assert isinstance(incoming, nn.Linear)
        for reader in readers:
            assert isinstance(reader, nn.Linear)
            if reader.in_features != incoming.out_features:
                raise ValueError(
                    f"{call.fqn}: a reader of {incoming.out_features} neurons has in_features "
                    f"{reader.in_features}; expected equal widths"
                )
        outgoing = tuple(dict.fromkeys(readers))  # type: ignore[arg-type]
        previous = found.get(id(incoming))
        if previous is not None:  # a layer called twice: one set of neurons, every reader
            outgoing = tuple(dict.fromkeys((*previous[0].outgoing, *outgoing)))
        layer = HiddenLayer(call.fqn, incoming, call.module, outgoing)
        found[id(incoming)] = (layer, call.output.reshape(call.output.shape[0], -1))
    if not found:
        raise ValueError(
            f"no hidden layer (Linear -> activation module -> Linear) ran in {type(network).__name__}'s forward"
        )
    return list(found.values())


def find_hidden_layers(
    network: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]
) -> list[HiddenLayer]:
    """The hidden layers of ``network`` (see :func:`trace_hidden_layers`), found by one forward of ``inputs``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [(layer.name, layer.width) for layer in find_hidden_layers(net, torch.randn(3, 4))]
        [('1', 8)]
    """
    return [layer for layer, _ in trace_hidden_layers(network, inputs)]


def _fresh_rows(layer: nn.Linear, rows: int, init: Init, generator: torch.Generator) -> torch.Tensor:
    fan_in, fan_out = layer.in_features, layer.out_features
    bound = {
        "xavier_uniform": math.sqrt(6.0 / (fan_in + fan_out)),
        "lecun_uniform": math.sqrt(3.0 / fan_in),
        "torch_default": 1.0 / math.sqrt(fan_in),
    }[init]
    fresh = torch.empty(rows, fan_in, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return fresh.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _reset_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: tuple[Any, ...]
) -> None:
    """Zeroes ``index`` of every per-entry optimizer state of ``param`` (Adam's moments, SGD's momentum, ...)."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[index] = 0


def recycle_neurons(
    layer: HiddenLayer,
    neurons: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    *,
    init: Init = "xavier_uniform",
    outgoing_bias_shift: torch.Tensor | None = None,
) -> int:
    """Re-initializes ``neurons`` of ``layer``: fresh incoming weights (``init``'s uniform bound), incoming bias 0,
    outgoing weights 0, and their optimizer state entries 0. Returns how many were recycled.

    Args:
        layer: the hidden layer.
        neurons: ``[N]`` bool, True for the neurons to recycle.
        optimizer: the optimizer that steps the layer (its per-entry states of those weights are zeroed), or None.
        generator: the random stream of the fresh weights (drawn on the CPU in float64, then cast).
        init: ``xavier_uniform`` (``U(+-sqrt(6 / (in + out)))``, ReDo's official code), ``lecun_uniform``
            (``U(+-sqrt(3 / in))``, continual backprop's RL default) or ``torch_default`` (``U(+-1 / sqrt(in))``,
            ``nn.Linear``'s own).
        outgoing_bias_shift: ``[N]`` values; when given, each outgoing layer's bias gains
            ``w_out[:, neurons] @ outgoing_bias_shift[neurons]`` before the weights are zeroed (continual backprop's
            mean correction).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> layer = find_hidden_layers(net, torch.randn(4, 2))[0]
        >>> recycle_neurons(layer, torch.tensor([True, False, False]), None, torch.Generator().manual_seed(0))
        1
        >>> float(net[2].weight.detach()[0, 0])
        0.0
    """
    check_choice("init", init, INITS)
    if (
        not isinstance(neurons, torch.Tensor)
        or neurons.dtype != torch.bool
        or neurons.shape != (layer.width,)
    ):
        shape = tuple(neurons.shape) if isinstance(neurons, torch.Tensor) else type(neurons).__name__
        raise ValueError(f"neurons must be a [{layer.width}] bool tensor, got {shape}")
    index = neurons.nonzero().flatten().to(layer.incoming.weight.device)
    if index.numel() == 0:
        return 0
    incoming = layer.incoming
    with torch.no_grad():
        incoming.weight[index] = _fresh_rows(incoming, layer.width, init, generator)[index.cpu()].to(
            incoming.weight.device
        )
        _reset_state(optimizer, incoming.weight, (index,))
        if incoming.bias is not None:
            incoming.bias[index] = 0.0
            _reset_state(optimizer, incoming.bias, (index,))
        for reader in layer.outgoing:
            if outgoing_bias_shift is not None and reader.bias is not None:
                shift = outgoing_bias_shift.to(reader.weight.device, reader.weight.dtype)[index]
                reader.bias += reader.weight[:, index] @ shift
            reader.weight[:, index] = 0.0
            _reset_state(optimizer, reader.weight, (slice(None), index))
    return int(index.numel())


# ---------------------------------------------------------------------------------------------- batches
def _space_batch(space: spaces.Space, size: int) -> torch.Tensor:
    if not isinstance(space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary):
        raise ValueError(f"expected a Box, Discrete, MultiDiscrete or MultiBinary space, got {space!r}")
    return torch.as_tensor(np.stack([np.asarray(space.sample()) for _ in range(size)]))


def buffer_batch(
    model: BaseAlgorithm, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Up to ``size`` stored observations (and actions, off-policy) of ``model``'s replay or rollout buffer, drawn
    with ``rng`` (SB3's global random stream is not touched); None while the buffer is empty.

    Raises:
        ValueError: dict observations (not supported).
    """
    check_int("size", size, low=1)
    if isinstance(model, OffPolicyAlgorithm):
        buffer: Any = model.replay_buffer
    else:
        buffer = getattr(model, "rollout_buffer", None)
    if buffer is None:
        return None
    if isinstance(buffer.observations, dict):
        raise ValueError("dict observation spaces are not supported; expected array observations")
    stored = buffer.buffer_size if buffer.full else buffer.pos
    if stored == 0:
        return None
    count = min(size, stored * buffer.n_envs)
    flat = rng.choice(stored * buffer.n_envs, size=count, replace=False)
    if getattr(
        buffer, "generator_ready", False
    ):  # a rollout buffer PPO / A2C already flattened to [T * n_envs, ...]
        observations = torch.as_tensor(buffer.observations[flat], device=model.device)
        return observations, None
    rows, envs = flat // buffer.n_envs, flat % buffer.n_envs
    observations = torch.as_tensor(buffer.observations[rows, envs], device=model.device)
    actions = (
        torch.as_tensor(buffer.actions[rows, envs], device=model.device)
        if isinstance(model, OffPolicyAlgorithm)
        else None
    )
    return observations, actions


def network_inputs(
    network: SparseNetwork, observations: torch.Tensor, actions: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """The positional inputs of ``network``'s forward: ``(observations,)``, or ``(observations, actions)`` for an
    SB3 continuous critic."""
    if network.name == "critic":
        if actions is None:
            raise ValueError("the critic's forward needs actions; expected an off-policy batch with actions")
        return (observations, actions.float())
    return (observations,)


def _example_inputs(
    model: BaseAlgorithm, network: SparseNetwork, *, draw: bool = True
) -> tuple[torch.Tensor, ...]:
    """Two inputs of ``network`` sampled from ``model``'s spaces; ``draw=False`` samples copies of the spaces, so
    their generators (SAC's and DQN's random actions draw from the action space's) are left where they are."""
    observation_space = model.observation_space if draw else copy.deepcopy(model.observation_space)
    observations = _space_batch(observation_space, 2).to(model.device)
    if observations.is_floating_point():
        observations = observations.float()
    action_space = model.action_space if draw else copy.deepcopy(model.action_space)
    actions = _space_batch(action_space, 2).to(model.device) if network.name == "critic" else None
    return network_inputs(network, observations, actions)


def network_snapshot(
    network: SparseNetwork,
    observations: torch.Tensor,
    actions: torch.Tensor | None = None,
    *,
    tau: float = DORMANT_TAU,
    delta: float = SRANK_DELTA,
) -> dict[str, Any]:
    """Plasticity diagnostics of one network on a batch: ReDo's dormant fraction over its hidden layers, each hidden
    layer's srank (:func:`effective_rank`) and width, and the L2 norm of all its parameters."""
    traced = trace_hidden_layers(network.network, network_inputs(network, observations, actions))
    dormant = [dormant_mask(activations, tau) for _, activations in traced]
    n_neurons = sum(mask.numel() for mask in dormant)
    squares = sum(float(p.detach().double().pow(2).sum()) for p in network.network.parameters())
    return {
        "dormant_fraction": sum(int(mask.sum()) for mask in dormant) / n_neurons,
        "dormant_per_layer": {
            layer.name: float(m.float().mean()) for (layer, _), m in zip(traced, dormant, strict=True)
        },
        "effective_rank": {layer.name: effective_rank(activations, delta) for layer, activations in traced},
        "width": {layer.name: layer.width for layer, _ in traced},
        "weight_norm": math.sqrt(squares),
    }


# ---------------------------------------------------------------------------------------------- recycler states
def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    return f"a {type(value).__name__}"


def _as_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key} must be a dict with string keys, got {_describe(value)}")
    return value


def _check_keys(value: Mapping[str, Any], expected: Iterable[str], key: str) -> None:
    expected = list(expected)
    missing, unknown = sorted(set(expected) - set(value)), sorted(set(value) - set(expected))
    if missing or unknown:
        raise ValueError(f"{key} must have the keys {expected}; missing {missing}, unknown {unknown}")


def _checked_state(
    state: Any, owner: str, keys: Sequence[str], settings: Mapping[str, Any]
) -> Mapping[str, Any]:
    """``state`` as a mapping of ``keys`` made by an ``owner`` of these ``settings`` (else a ValueError)."""
    state = _as_mapping(state, "state")
    if state.get("callback") != owner:
        raise ValueError(
            f"state['callback'] must be {owner!r} (a state of {owner}.state_dict()), got {state.get('callback')!r}"
        )
    _check_keys(state, keys, "state")
    saved = _as_mapping(state["settings"], "state['settings']")
    _check_keys(saved, settings, "state['settings']")
    differ = {name: (saved[name], value) for name, value in settings.items() if saved[name] != value}
    if differ:
        raise ValueError(
            f"the state was made by a {owner} of other settings; (saved, current) differ in {differ}"
        )
    return state


def _generator_state(generator: torch.Generator | None) -> torch.Tensor | None:
    return None if generator is None else generator.get_state()


def _generator_from(value: Any, key: str) -> torch.Generator | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(
            f"{key} must be a torch generator's state (a 1-D uint8 tensor) or None, got {_describe(value)}"
        )
    generator = torch.Generator()
    try:
        generator.set_state(value.clone())
    except RuntimeError as error:
        raise ValueError(
            f"{key} is not a CPU torch generator's state ({_describe(value)}): {error}"
        ) from None
    return generator


def _rng_state(rng: np.random.Generator | None) -> dict[str, Any] | None:
    """A PCG64 generator's state as plain ints and strings (``weights_only``-safe), or None."""
    if rng is None:
        return None
    state = rng.bit_generator.state
    return {
        "bit_generator": str(state["bit_generator"]),
        "state": {"state": int(state["state"]["state"]), "inc": int(state["state"]["inc"])},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def _rng_from(value: Any, key: str) -> np.random.Generator | None:
    if value is None:
        return None
    value = _as_mapping(value, key)
    _check_keys(value, ("bit_generator", "state", "has_uint32", "uinteger"), key)
    if value["bit_generator"] != "PCG64":
        raise ValueError(
            f"{key}['bit_generator'] must be 'PCG64' (numpy's default_rng), got {value['bit_generator']!r}"
        )
    inner = _as_mapping(value["state"], f"{key}['state']")
    _check_keys(inner, ("state", "inc"), f"{key}['state']")
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {
            "state": check_int(f"{key}['state']['state']", inner["state"], low=0, high=2**128 - 1),
            "inc": check_int(f"{key}['state']['inc']", inner["inc"], low=0, high=2**128 - 1),
        },
        "has_uint32": check_int(f"{key}['has_uint32']", value["has_uint32"], low=0, high=1),
        "uinteger": check_int(f"{key}['uinteger']", value["uinteger"], low=0, high=2**32 - 1),
    }
    return np.random.Generator(bit_generator)


def _check_tensor(value: Any, key: str, dtype: torch.dtype, width: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
        raise ValueError(f"{key} must be a 1-D {dtype} tensor, got {_describe(value)}")
    if width is not None and value.numel() != width:
        raise ValueError(f"{key} must have {width} entries (the layer's width), got {value.numel()}")
    return value


def _check_network_names(names: Iterable[str], model: BaseAlgorithm, key: str) -> list[SparseNetwork]:
    networks = find_networks(model)
    if sorted(names) != sorted(n.name for n in networks):
        raise ValueError(
            f"{key} names the networks {sorted(names)}, but this {type(model).__name__} has "
            f"{sorted(n.name for n in networks)}: a state of another algorithm?"
        )
    return networks


# ---------------------------------------------------------------------------------------------- ReDo
class ReDoCallback(BaseCallback):
    """Recycles dormant neurons of every online network of an SB3 agent (ReDo; see the module docstring).

    Args:
        interval: gradient steps (of each network's optimizer) between recycling rounds.
        tau: dormancy threshold (:func:`~sparseapps.rl.diagnostics.dormant_mask`).
        batch_size: observations the neurons are scored on.
        init: the incoming weights' distribution (see :func:`recycle_neurons`).
        seed: seed of the fresh weights and of the batch draws (None: the model's seed, or 0).
        verbose: SB3 verbosity.

    Attributes:
        history: one entry per recycling round: ``{"network", "step", "recycled": {layer: count},
            "dormant_fraction"}``.

    The generators are seeded at the first training start only: a later ``learn`` call (``reset_num_timesteps=False``)
    continues their streams and the step counters. :meth:`state_dict` and :meth:`load_state_dict` carry counters,
    history and generators across processes, so a resumed run continues bit for bit.
    """

    def __init__(
        self,
        interval: int = REDO_INTERVAL,
        *,
        tau: float = DORMANT_TAU,
        batch_size: int = REDO_BATCH_SIZE,
        init: Init = "xavier_uniform",
        seed: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.interval = check_int("interval", interval, low=1)
        self.tau = check_number("tau", tau, low=0.0)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        check_choice("init", init, INITS)
        self.init: Init = init
        self.seed = None if seed is None else check_int("seed", seed)
        self.history: list[dict[str, Any]] = []
        self.networks: dict[str, SparseNetwork] = {}
        self._steps: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self._generator: torch.Generator | None = None
        self._rng: np.random.Generator | None = None
        self._loaded_networks: list[str] | None = (
            None  # of a loaded state, checked at the next training start
        )

    @property
    def n_recycles(self) -> int:
        """Neurons recycled so far, over all networks and rounds."""
        return sum(sum(entry["recycled"].values()) for entry in self.history)

    def _settings(self) -> dict[str, Any]:
        return {"interval": self.interval, "tau": self.tau, "batch_size": self.batch_size, "init": self.init}

    def state_dict(self) -> dict[str, Any]:
        """Step counters, history and generators, as tensors, numbers, strings, lists and dicts (``torch.save`` it
        and read it back with ``weights_only=True``), with the settings it must be loaded under.

        Example:
            >>> from stable_baselines3 import DQN
            >>> model = DQN("MlpPolicy", "CartPole-v1", learning_starts=50, train_freq=4, seed=0)
            >>> redo = ReDoCallback(interval=10)
            >>> _ = model.learn(100, callback=redo)
            >>> again = ReDoCallback(interval=10)
            >>> again.load_state_dict(redo.state_dict())
            >>> again.history == redo.history, again.state_dict()["steps"]
            (True, {'q_net': 13})
        """
        return {
            "callback": "ReDoCallback",
            "settings": self._settings(),
            "steps": dict(self._steps),
            "next": dict(self._next),
            "history": copy.deepcopy(self.history),
            "generator": _generator_state(self._generator),
            "rng": _rng_state(self._rng),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, model: BaseAlgorithm | None = None) -> None:
        """Continues from :meth:`state_dict` (counters, history and generators replaced; seeded no more).

        Args:
            state: a state of a ReDoCallback of the same interval, tau, batch size and init.
            model: when given, the state's networks are checked against this model's now; they are checked against
                the trained model at the next training start in any case.

        Raises:
            ValueError: a key, value or type the state should not have (the message names it), other settings, or
                networks the model does not have.
        """
        keys = ("callback", "settings", "steps", "next", "history", "generator", "rng")
        state = _checked_state(state, "ReDoCallback", keys, self._settings())
        steps = {
            name: check_int(f"state['steps'][{name!r}]", value, low=0)
            for name, value in _as_mapping(state["steps"], "state['steps']").items()
        }
        next_steps = {
            name: check_int(f"state['next'][{name!r}]", value, low=self.interval)
            for name, value in _as_mapping(state["next"], "state['next']").items()
        }
        if sorted(steps) != sorted(next_steps):
            raise ValueError(
                f"state['steps'] and state['next'] must name the same networks, got {sorted(steps)} and "
                f"{sorted(next_steps)}"
            )
        for name, value in next_steps.items():
            if value % self.interval:
                raise ValueError(
                    f"state['next'][{name!r}] must be a multiple of interval {self.interval}, got {value}"
                )
        if not isinstance(state["history"], list):
            raise ValueError(f"state['history'] must be a list, got {_describe(state['history'])}")
        history = [
            self._checked_entry(entry, f"state['history'][{i}]", steps)
            for i, entry in enumerate(state["history"])
        ]
        generator = _generator_from(state["generator"], "state['generator']")
        rng = _rng_from(state["rng"], "state['rng']")
        if (generator is None) != (rng is None):
            raise ValueError(
                "state['generator'] and state['rng'] must both be set (training started) or both None, got "
                f"{_describe(state['generator'])} and {_describe(state['rng'])}"
            )
        if model is not None and steps:
            _check_network_names(steps, model, "state['steps']")
        self._steps, self._next, self.history = steps, next_steps, history
        self._generator, self._rng = generator, rng
        self._loaded_networks = list(steps) if steps else None

    @staticmethod
    def _checked_entry(entry: Any, key: str, steps: Mapping[str, int]) -> dict[str, Any]:
        entry = _as_mapping(entry, key)
        _check_keys(entry, ("network", "step", "recycled", "dormant_fraction"), key)
        if entry["network"] not in steps:
            raise ValueError(f"{key}['network'] must be one of {sorted(steps)}, got {entry['network']!r}")
        recycled = {
            layer: check_int(f"{key}['recycled'][{layer!r}]", count, low=0)
            for layer, count in _as_mapping(entry["recycled"], f"{key}['recycled']").items()
        }
        return {
            "network": entry["network"],
            "step": check_int(f"{key}['step']", entry["step"], low=0),
            "recycled": recycled,
            "dormant_fraction": check_number(
                f"{key}['dormant_fraction']", entry["dormant_fraction"], low=0.0, high=1.0
            ),
        }

    def _on_training_start(self) -> None:
        self._remove_hooks()
        if self._generator is None or self._rng is None:  # the first start: later ones continue the streams
            seed = self.seed if self.seed is not None else (self.model.seed or 0)
            self._generator = torch.Generator().manual_seed(int(seed))
            self._rng = np.random.default_rng(int(seed))
        if self._loaded_networks is not None:
            _check_network_names(self._loaded_networks, self.model, "the loaded state")
            self._loaded_networks = None
        self.networks = {network.name: network for network in find_networks(self.model)}
        for name, network in self.networks.items():
            _check_dense(network.network, "ReDo")
            self._steps.setdefault(name, 0)
            self._next.setdefault(name, self.interval)
            self._handles.append(network.optimizer.register_step_post_hook(self._counter(name)))

    def _counter(self, name: str) -> Callable[..., None]:
        def count(*_: Any) -> None:
            self._steps[name] += 1

        return count

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        due = [name for name in self.networks if self._steps[name] >= self._next[name]]
        if not due:
            return
        assert self._generator is not None and self._rng is not None  # seeded at the training start
        batch = buffer_batch(self.model, self.batch_size, self._rng)
        if batch is None:
            return
        for name in due:
            network = self.networks[name]
            _check_dense(network.network, "ReDo")
            steps = self._steps[name]
            self._next[name] = (steps // self.interval + 1) * self.interval
            traced = trace_hidden_layers(network.network, network_inputs(network, *batch))
            recycled: dict[str, int] = {}
            n_dormant = n_neurons = 0
            for layer, activations in traced:
                dormant = dormant_mask(activations, self.tau)
                n_dormant += int(dormant.sum())
                n_neurons += dormant.numel()
                recycled[layer.name] = recycle_neurons(
                    layer, dormant, network.optimizer, self._generator, init=self.init
                )
            self.history.append(
                {
                    "network": name,
                    "step": steps,
                    "recycled": recycled,
                    "dormant_fraction": n_dormant / n_neurons,
                }
            )
            self.logger.record(f"redo/{name}_dormant_fraction", n_dormant / n_neurons)
            self.logger.record(f"redo/{name}_recycled", sum(recycled.values()))

    def _on_training_end(self) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------- continual backprop
@dataclass
class UnitUtility:
    """Continual backprop's books for one hidden layer of ``N`` units.

    Attributes:
        utility: ``[N]`` running contribution utility (not bias-corrected).
        mean_activation: ``[N]`` running mean activation (not bias-corrected).
        age: ``[N]`` steps since each unit was (re)initialized.
        pending: replacements accumulated but not yet spent (``< 1`` after every step).
    """

    utility: torch.Tensor
    mean_activation: torch.Tensor
    age: torch.Tensor
    pending: float = 0.0

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu") -> UnitUtility:
        """Books of a fresh layer of ``width`` units."""
        zero = torch.zeros(width, dtype=torch.float64, device=device)
        return cls(zero.clone(), zero.clone(), torch.zeros(width, dtype=torch.long, device=device))


def update_utility(
    state: UnitUtility, activations: torch.Tensor, outgoing_weights: Sequence[torch.Tensor], decay_rate: float
) -> None:
    """One step of continual backprop's books, in place: ages + 1, then
    ``utility <- eta * utility + (1 - eta) * mean_B|h| * sum_k |w_out[k]|`` and
    ``mean_activation <- eta * mean_activation + (1 - eta) * mean_B h``.

    Args:
        state: the layer's books.
        activations: ``[B, N]`` the layer's activations on the step's batch.
        outgoing_weights: the readers' weights, ``[out, N]`` each (their absolute values are summed over all).
        decay_rate: ``eta``.

    Example:
        >>> state = UnitUtility.zeros(2)
        >>> update_utility(state, torch.tensor([[1.0, 0.0], [3.0, 2.0]]), [torch.tensor([[0.5, -1.0]])], 0.5)
        >>> state.utility.tolist(), state.mean_activation.tolist(), state.age.tolist()
        ([0.5, 0.5], [1.0, 0.5], [1, 1])
    """
    values = activations.detach().double().reshape(activations.shape[0], -1)
    weight_sum = sum(w.detach().double().abs().sum(dim=0) for w in outgoing_weights)
    state.age += 1
    state.utility.mul_(decay_rate).add_((1.0 - decay_rate) * values.abs().mean(0) * weight_sum)
    state.mean_activation.mul_(decay_rate).add_((1.0 - decay_rate) * values.mean(0))


def select_replacements(
    state: UnitUtility, replacement_rate: float, maturity_threshold: int, decay_rate: float
) -> torch.Tensor:
    """The units continual backprop replaces after this step: ``replacement_rate * n_eligible`` (units older than
    ``maturity_threshold``) is added to ``state.pending``; its integer part is spent on the eligible units of lowest
    bias-corrected utility ``utility / (1 - decay_rate ** age)`` (ties: lower index first). Returns ``[N]`` bool.

    Example:
        >>> state = UnitUtility.zeros(4)
        >>> state.utility[:], state.age[:] = torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.tensor([5, 5, 1, 5])
        >>> select_replacements(state, 0.5, 2, 0.5).tolist()  # 3 eligible: 1.5 replacements, one now
        [False, True, False, False]
        >>> state.pending
        0.5
    """
    eligible = state.age > maturity_threshold
    state.pending += replacement_rate * int(eligible.sum())
    count = int(state.pending)
    chosen = torch.zeros_like(eligible)
    if count == 0:
        return chosen
    state.pending -= count
    corrected = state.utility / (1.0 - decay_rate ** state.age.double().clamp(min=1))
    candidates = eligible.nonzero().flatten()
    order = torch.sort(corrected[candidates], stable=True).indices[:count]
    chosen[candidates[order]] = True
    return chosen


class ContinualBackpropCallback(BaseCallback):
    """Continual backprop for every online network of an SB3 agent (see the module docstring).

    Args:
        replacement_rate: ``rho``, replacements per eligible unit per step.
        maturity_threshold: ``m``, steps a unit is protected after (re)initialization.
        decay_rate: ``eta``, the utility's running-average decay.
        init: distribution of fresh incoming weights (see :func:`recycle_neurons`).
        seed: seed of the fresh weights (None: the model's seed, or 0).
        verbose: SB3 verbosity.

    Attributes:
        states: ``{network name: {layer name: UnitUtility}}``.
        n_replaced: units replaced so far, per network.

    The generator is seeded at the first training start only: a later ``learn`` call continues its stream and the
    books. :meth:`state_dict` and :meth:`load_state_dict` carry books, counts and generator across processes, so a
    resumed run continues bit for bit.
    """

    def __init__(
        self,
        *,
        replacement_rate: float = CBP_REPLACEMENT_RATE,
        maturity_threshold: int = CBP_MATURITY_THRESHOLD,
        decay_rate: float = CBP_DECAY_RATE,
        init: Init = "lecun_uniform",
        seed: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.replacement_rate = check_number("replacement_rate", replacement_rate, low=0.0, high=1.0)
        self.maturity_threshold = check_int("maturity_threshold", maturity_threshold, low=0)
        self.decay_rate = check_number("decay_rate", decay_rate, low=0.0, high=1.0, high_open=True)
        check_choice("init", init, INITS)
        self.init: Init = init
        self.seed = None if seed is None else check_int("seed", seed)
        self.states: dict[str, dict[str, UnitUtility]] = {}
        self.n_replaced: dict[str, int] = {}
        self.layers: dict[str, list[HiddenLayer]] = {}
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._generator: torch.Generator | None = None
        self._loaded = False  # a loaded state's layers are checked at the next training start

    def _settings(self) -> dict[str, Any]:
        return {
            "replacement_rate": self.replacement_rate,
            "maturity_threshold": self.maturity_threshold,
            "decay_rate": self.decay_rate,
            "init": self.init,
        }

    def state_dict(self) -> dict[str, Any]:
        """The books of every layer (``{"utility", "mean_activation", "age"}`` tensors and ``pending``), the
        replacement counts and the generator, as tensors, numbers, strings and dicts (``torch.save`` it and read
        it back with ``weights_only=True``), with the settings it must be loaded under.

        Example:
            >>> from stable_baselines3 import PPO
            >>> model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0)
            >>> cbp = ContinualBackpropCallback(replacement_rate=0.05, maturity_threshold=4)
            >>> _ = model.learn(128, callback=cbp)
            >>> again = ContinualBackpropCallback(replacement_rate=0.05, maturity_threshold=4)
            >>> again.load_state_dict(cbp.state_dict())
            >>> again.n_replaced == cbp.n_replaced, sorted(again.states["policy"])[0]
            (True, 'mlp_extractor.policy_net.1')
        """
        return {
            "callback": "ContinualBackpropCallback",
            "settings": self._settings(),
            "states": {
                network: {
                    layer: {
                        "utility": book.utility.detach().cpu().clone(),
                        "mean_activation": book.mean_activation.detach().cpu().clone(),
                        "age": book.age.detach().cpu().clone(),
                        "pending": float(book.pending),
                    }
                    for layer, book in books.items()
                }
                for network, books in self.states.items()
            },
            "n_replaced": dict(self.n_replaced),
            "generator": _generator_state(self._generator),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, model: BaseAlgorithm | None = None) -> None:
        """Continues from :meth:`state_dict` (books, counts and generator replaced; seeded no more).

        Args:
            state: a state of a ContinualBackpropCallback of the same replacement rate, maturity threshold, decay
                rate and init.
            model: when given, the state's networks, layers and widths are checked against this model's now; they
                are checked against the trained model at the next training start in any case.

        Raises:
            ValueError: a key, value or type the state should not have (the message names it), other settings, or
                networks, layers or widths the model does not have.
        """
        keys = ("callback", "settings", "states", "n_replaced", "generator")
        state = _checked_state(state, "ContinualBackpropCallback", keys, self._settings())
        states: dict[str, dict[str, UnitUtility]] = {}
        for network, books in _as_mapping(state["states"], "state['states']").items():
            states[network] = {}
            for layer, book in _as_mapping(books, f"state['states'][{network!r}]").items():
                key = f"state['states'][{network!r}][{layer!r}]"
                book = _as_mapping(book, key)
                _check_keys(book, ("utility", "mean_activation", "age", "pending"), key)
                utility = _check_tensor(book["utility"], f"{key}['utility']", torch.float64, None)
                width = utility.numel()
                mean = _check_tensor(
                    book["mean_activation"], f"{key}['mean_activation']", torch.float64, width
                )
                age = _check_tensor(book["age"], f"{key}['age']", torch.long, width)
                if bool((age < 0).any()):
                    raise ValueError(f"{key}['age'] must be >= 0, got {age.tolist()}")
                pending = check_number(
                    f"{key}['pending']", book["pending"], low=0.0, high=1.0, high_open=True
                )
                states[network][layer] = UnitUtility(
                    utility.clone(), mean.clone(), age.clone(), float(pending)
                )
        n_replaced = {
            name: check_int(f"state['n_replaced'][{name!r}]", value, low=0)
            for name, value in _as_mapping(state["n_replaced"], "state['n_replaced']").items()
        }
        if sorted(n_replaced) != sorted(states):
            raise ValueError(
                f"state['n_replaced'] and state['states'] must name the same networks, got {sorted(n_replaced)} and "
                f"{sorted(states)}"
            )
        generator = _generator_from(state["generator"], "state['generator']")
        if model is not None and states:
            found = {
                network.name: find_hidden_layers(network.network, _example_inputs(model, network, draw=False))
                for network in _check_network_names(states, model, "state['states']")
            }
            self._check_layers(states, found)
        self.states, self.n_replaced, self._generator = states, n_replaced, generator
        self._loaded = bool(states)

    @staticmethod
    def _check_layers(
        states: Mapping[str, Mapping[str, UnitUtility]], found: Mapping[str, list[HiddenLayer]]
    ) -> None:
        for network, layers in found.items():
            books = states[network]
            names = [layer.name for layer in layers]
            if sorted(books) != sorted(names):
                raise ValueError(
                    f"state['states'][{network!r}] names the layers {sorted(books)}, but the network's hidden layers "
                    f"are {sorted(names)}"
                )
            for layer in layers:
                if books[layer.name].utility.numel() != layer.width:
                    raise ValueError(
                        f"state['states'][{network!r}][{layer.name!r}] has {books[layer.name].utility.numel()} "
                        f"units, but the layer has {layer.width} neurons"
                    )

    def _on_training_start(self) -> None:
        self._remove_hooks()
        first = self._generator is None
        if first:  # the first start: later ones continue the stream (and leave the spaces' generators alone)
            seed = self.seed if self.seed is not None else (self.model.seed or 0)
            self._generator = torch.Generator().manual_seed(int(seed))
        networks = find_networks(self.model)
        if self._loaded:
            _check_network_names(self.states, self.model, "the loaded state")
        found: dict[str, list[HiddenLayer]] = {}
        for network in networks:
            _check_dense(network.network, "continual backprop")
            found[network.name] = find_hidden_layers(
                network.network, _example_inputs(self.model, network, draw=first)
            )
        if self._loaded:
            self._check_layers(self.states, found)
            self._loaded = False
        for network in networks:
            layers = found[network.name]
            self.layers[network.name] = layers
            books = self.states.setdefault(network.name, {})
            for layer in layers:
                device = layer.incoming.weight.device
                book = books.setdefault(layer.name, UnitUtility.zeros(layer.width, device))
                if book.utility.device != device:  # a state loaded on the CPU
                    books[layer.name] = UnitUtility(
                        book.utility.to(device),
                        book.mean_activation.to(device),
                        book.age.to(device),
                        book.pending,
                    )
                self._handles.append(layer.activation.register_forward_hook(self._capture))
            self.n_replaced.setdefault(network.name, 0)
            self._handles.append(network.optimizer.register_step_post_hook(self._after_step(network)))

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            self._captured[id(module)] = output.detach()

    def _after_step(self, network: SparseNetwork) -> Callable[..., None]:
        def step(*_: Any) -> None:
            generator = self._generator
            assert generator is not None  # seeded at the training start
            books = self.states[network.name]
            for layer in self.layers[network.name]:
                activations = self._captured.pop(id(layer.activation), None)
                if activations is None or activations.shape[-1] != layer.width:
                    continue
                state = books[layer.name]
                update_utility(
                    state,
                    activations.reshape(-1, layer.width),
                    [reader.weight for reader in layer.outgoing],
                    self.decay_rate,
                )
                chosen = select_replacements(
                    state, self.replacement_rate, self.maturity_threshold, self.decay_rate
                )
                if not bool(chosen.any()):
                    continue
                _check_dense(network.network, "continual backprop")
                corrected_mean = state.mean_activation / (1.0 - self.decay_rate ** state.age.double())
                self.n_replaced[network.name] += recycle_neurons(
                    layer,
                    chosen,
                    network.optimizer,
                    generator,
                    init=self.init,
                    outgoing_bias_shift=corrected_mean,
                )
                state.utility[chosen] = 0.0
                state.mean_activation[chosen] = 0.0
                state.age[chosen] = 0

        return step

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured.clear()


# ---------------------------------------------------------------------------------------------- observation drift
class PermutedObservations(gym.Wrapper):
    """A drift of the observation vector: phase 0 shows it as it is, each later phase through a fixed random
    permutation of its entries, drawn from ``(seed, phase)`` and different from the previous phase's.

    Phases follow ``schedule`` (its steps and timing; its factors are not used), counted in this wrapper's env
    steps, and every ``info`` carries ``drift_phase`` and ``drift_env_step`` like
    :class:`~sparseapps.rl.drift.DriftWrapper`. The observation space becomes a box whose every entry spans the
    widest bounds of the original entries, so every permutation lies inside it.

    Args:
        env: an environment with a 1-D ``Box`` observation space of at least 2 entries.
        schedule: when the permutation changes.
        seed: seed of the permutations.

    Example:
        >>> env = PermutedObservations(gym.make("Pendulum-v1"), DriftSchedule(shifts=[(2, 1.0)]), seed=0)
        >>> first, _ = env.reset(seed=0)
        >>> for _ in range(2):
        ...     _ = env.step(env.action_space.sample())
        >>> env.permutation(0).tolist(), env.permutation(1).tolist()
        ([0, 1, 2], [2, 0, 1])
    """

    def __init__(self, env: gym.Env, schedule: DriftSchedule, seed: int) -> None:
        if not isinstance(env, gym.Env):
            raise TypeError(f"env must be a gymnasium.Env, got {type(env).__name__}")
        if not isinstance(schedule, DriftSchedule):
            raise TypeError(f"schedule must be a DriftSchedule, got {type(schedule).__name__}")
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1 or space.shape[0] < 2:
            raise ValueError(f"expected a 1-D Box observation space of at least 2 entries, got {space!r}")
        super().__init__(env)
        self.schedule = schedule
        self.seed = check_int("seed", seed)
        low, high = float(np.min(space.low)), float(np.max(space.high))
        self.observation_space = spaces.Box(low=low, high=high, shape=space.shape, dtype=space.dtype)
        self._permutations: list[np.ndarray] = [np.arange(space.shape[0])]
        self._env_steps = 0
        self._phase = 0

    @property
    def phase(self) -> int:
        """The phase in effect."""
        return self._phase

    @property
    def env_steps(self) -> int:
        """Steps taken through this wrapper."""
        return self._env_steps

    def permutation(self, phase: int) -> np.ndarray:
        """The permutation of ``phase``: observation ``o`` is shown as ``o[permutation]``."""
        check_int("phase", phase, low=0)
        while len(self._permutations) <= phase:
            k = len(self._permutations)
            rng = np.random.default_rng([self.seed, k])
            drawn = rng.permutation(self._permutations[0].size)
            while np.array_equal(drawn, self._permutations[-1]):
                drawn = rng.permutation(self._permutations[0].size)
            self._permutations.append(drawn)
        return self._permutations[phase]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Moves to the phase due, then resets the inner environment."""
        self._phase = self.schedule.phase_at(self._env_steps)
        observation, info = self.env.reset(seed=seed, options=options)
        return self._show(observation), self._annotate(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """One step; with ``timing="immediate"`` the phase moves first."""
        if self.schedule.timing == "immediate":
            self._phase = self.schedule.phase_at(self._env_steps)
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._env_steps += 1
        return self._show(observation), reward, terminated, truncated, self._annotate(info)

    def _show(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation)[self.permutation(self._phase)].astype(self.observation_space.dtype)

    def _annotate(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, INFO_PHASE: self._phase, INFO_ENV_STEP: self._env_steps}


# ---------------------------------------------------------------------------------------------- per-phase metrics
@dataclass(frozen=True)
class PhaseMetrics:
    """Returns of one drift phase.

    Attributes:
        phase: the phase (0: before the first shift).
        start_step: env step at which it was scheduled to start.
        end_step: env step at which the next phase was scheduled (the run's end for the last phase).
        n_episodes: episodes that ended in it.
        final_return: mean return of its last ``window`` episodes (None without episodes).
        auc: the area under the return curve over its episodes divided by the steps they cover: each episode's
            return weighted by its length (None without episodes).
        steps_to_recover: env steps from the shift to the episode at which the moving average of returns came back
            to the target (see :func:`~sparseapps.rl.diagnostics.shift_recovery`); None for phase 0, or if the
            returns never recovered within the phase (then ``recovered`` is False).
        recovered: whether they did (None for phase 0 or a phase without episodes).
    """

    phase: int
    start_step: int
    end_step: int
    n_episodes: int
    final_return: float | None
    auc: float | None
    steps_to_recover: int | None
    recovered: bool | None


def phase_metrics(
    returns: Sequence[float],
    steps: Sequence[int],
    phases: Sequence[int],
    shift_steps: Sequence[int],
    total_steps: int,
    *,
    window: int = 10,
    fraction: float = 0.9,
    baseline: float = 0.0,
) -> list[PhaseMetrics]:
    """Per drift phase: return over the last ``window`` episodes, steps to recover, area under the curve.

    Args:
        returns: episode returns in the order the episodes ended, ``[E]``.
        steps: the environment's step count at each episode's end, ``[E]`` (non-decreasing).
        phases: the drift phase of each episode, ``[E]``.
        shift_steps: the scheduled env step of each shift, ``[K]`` (phase ``k`` starts at ``shift_steps[k - 1]``).
        total_steps: env steps of the run (the last phase's end).
        window: episodes of the final return and of the recovery's moving averages.
        fraction, baseline: the recovery target (see :func:`~sparseapps.rl.diagnostics.shift_recovery`).

    Returns:
        ``K + 1`` :class:`PhaseMetrics`, phase 0 first.

    Example:
        >>> metrics = phase_metrics([10, 20, 5, 20], [10, 30, 40, 60], [0, 0, 1, 1], [30], 60, window=1)
        >>> [(m.final_return, m.auc, m.steps_to_recover) for m in metrics]
        [(20.0, 16.666666666666668, None), (20.0, 15.0, 30)]
    """
    if not (len(returns) == len(steps) == len(phases)):
        raise ValueError(
            f"returns, steps and phases must have one entry per episode, got lengths "
            f"{len(returns)}, {len(steps)}, {len(phases)}"
        )
    check_int("window", window, low=1)
    total_steps = check_int("total_steps", total_steps, low=1)
    starts = [0]
    for index, step in enumerate(shift_steps):
        step = check_int(f"shift_steps[{index}]", step, low=1)
        if step <= starts[-1] or step >= total_steps:
            raise ValueError(
                f"shift_steps must increase strictly within (0, total_steps={total_steps}), got {list(shift_steps)}"
            )
        starts.append(step)
    values: list[float] = []
    for index, value in enumerate(returns):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"returns[{index}] must be a finite number, got {value!r}")
        values.append(float(value))
    for index, phase in enumerate(phases):
        if isinstance(phase, bool) or not isinstance(phase, numbers.Integral) or not 0 <= phase < len(starts):
            raise ValueError(f"phases[{index}] must be an integer in [0, {len(starts) - 1}], got {phase!r}")
    recoveries = shift_recovery(
        values,
        list(steps),
        list(phases),
        window=window,
        fraction=fraction,
        baseline=baseline,
        shift_steps={k: starts[k] for k in range(1, len(starts))},
    )
    recovered_by_phase = {r.phase_after: r for r in recoveries}
    lengths = [int(s) - int(p) for s, p in zip(steps, [0, *steps[:-1]], strict=True)]
    result = []
    for phase, start in enumerate(starts):
        end = starts[phase + 1] if phase + 1 < len(starts) else total_steps
        members = [i for i, p in enumerate(phases) if p == phase]
        if members:
            tail = [values[i] for i in members[-window:]]
            covered = sum(lengths[i] for i in members)
            auc = (
                sum(values[i] * lengths[i] for i in members) / covered
                if covered
                else sum(values[i] for i in members) / len(members)
            )
            final = sum(tail) / len(tail)
        else:
            auc = final = None
        recovery = recovered_by_phase.get(phase)
        result.append(
            PhaseMetrics(
                phase=phase,
                start_step=start,
                end_step=end,
                n_episodes=len(members),
                final_return=final,
                auc=auc,
                steps_to_recover=None if recovery is None else recovery.steps_to_recover,
                recovered=None if recovery is None else recovery.recovery_step is not None,
            )
        )
    return result
