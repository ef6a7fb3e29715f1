"""Hypernetworks (the A1111 / ComfyUI format): small MLPs that change what the U-Net's attention layers attend to.

A hypernetwork file holds, per attention input width (320, 640, 1280 for SD1's self-attention, 768
for its cross-attention over the text), two MLPs: one for the key input and one for the value input
of every attention layer whose key/value input has that width. With strength s, a layer computes its
keys from ``k + s * mlp_k(k)`` and its values from ``v + s * mlp_v(v)`` (the query is unchanged).

File layout (a torch pickle, read with ``weights_only=True``): integer keys (the widths) -> a list of
two state dicts of ``linear.N.weight``/``.bias`` (Linear layers, and LayerNorms between them when
``is_layer_norm``), plus options: ``activation_func`` (linear, relu, leakyrelu, elu, swish, tanh,
sigmoid, softsign, mish), ``is_layer_norm``, ``activate_output``. Dropout options act in training only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .attention import CrossAttention

logger = logging.getLogger(__name__)

# Activation names of the format; "swish" is the hard swish, as the format's trainer builds it.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}


class HypernetworkError(ValueError):
    """A hypernetwork file that cannot be used; the message names the file and what is wrong."""


def _mlp(weights: Mapping[str, Tensor], activation: str, layer_norm: bool, activate_output: bool,
         where: str) -> nn.Sequential:
    """One MLP from its state dict: Linear layers in order, each followed by the activation (not
    after the last entry unless activate_output) and, with layer_norm, by the LayerNorm stored after it."""
    names = [key[: -len(".weight")] for key in weights if key.endswith(".weight")]
    layers: list[nn.Module] = []
    i = 0
    while i < len(names):
        # As ComfyUI counts it: with layer norms the last linear is not the last entry, so it is activated too.
        last = i == len(names) - 1
        weight, bias = weights[f"{names[i]}.weight"], weights.get(f"{names[i]}.bias")
        if weight.ndim != 2 or bias is None:
            raise HypernetworkError(f"{where}: {names[i]} is no linear layer (weight {tuple(weight.shape)})")
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers.append(linear)
        if activation != "linear" and (not last or activate_output):
            layers.append(ACTIVATIONS[activation]())
        if layer_norm:
            i += 1
            if i >= len(names):
                raise HypernetworkError(f"{where}: layer norm expected after {names[i - 1]}")
            norm = nn.LayerNorm(weights[f"{names[i]}.weight"].shape[0])
            norm.load_state_dict({"weight": weights[f"{names[i]}.weight"], "bias": weights[f"{names[i]}.bias"]})
            layers.append(norm)
        i += 1
    if not layers:
        raise HypernetworkError(f"{where}: no layers")
    return nn.Sequential(*layers)


@dataclass(frozen=True, eq=False)
class Hypernetwork:
    """The key and value MLPs of a hypernetwork by attention input width."""

    mlps: dict[int, tuple[nn.Module, nn.Module]]
    source: str = ""

    @classmethod
    def from_state(cls, state: Mapping[Any, Any], source: str = "") -> Hypernetwork:
        """From a loaded file's contents (see the module docstring)."""
        activation = state.get("activation_func", "linear") or "linear"
        if activation not in ACTIVATIONS:
            raise HypernetworkError(f"{source}: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        layer_norm, activate_output = bool(state.get("is_layer_norm", False)), bool(state.get("activate_output", False))
        mlps = {}
        for key, pair in state.items():
            if not isinstance(key, int):
                continue
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise HypernetworkError(f"{source}: width {key} holds {type(pair).__name__}, expected a key and a value MLP")
            mlps[key] = tuple(_mlp(weights, activation, layer_norm, activate_output, f"{source} [{key}][{i}]").eval()
                              for i, weights in enumerate(pair))
        if not mlps:
            raise HypernetworkError(f"{source}: no MLPs (integer keys) in this file: not a hypernetwork")
        return cls(mlps, source)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Hypernetwork:
        """Read a hypernetwork file (.pt/.pth: tensors and plain values only, nothing executed)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  # torch raises many kinds for a file it cannot read safely
            raise HypernetworkError(f"{path}: cannot be read as a hypernetwork file ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if not isinstance(state, Mapping):
            raise HypernetworkError(f"{path}: holds a {type(state).__name__}, not a hypernetwork")
        return cls.from_state(state, str(path))

    def key_value_hook(self, strength: float, device: torch.device, dtype: torch.dtype):  # noqa: ANN201
        """The attention hook: (k, v) -> (k + s * mlp_k(k), v + s * mlp_v(v)) for widths it has MLPs for."""
        mlps = {width: (k.to(device, dtype), v.to(device, dtype)) for width, (k, v) in self.mlps.items()}

        def hook(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
            pair = mlps.get(key.shape[-1])
            if pair is None:
                return key, value
            return key + pair[0](key) * strength, value + pair[1](value) * strength

        return hook


@dataclass(frozen=True, eq=False)
class HypernetworkHook:
    """A hypernetwork at a strength, installed on every attention layer of a network while it runs
    (a :class:`..components.NetworkHook`)."""

    hypernetwork: Hypernetwork
    strength: float

    @contextlib.contextmanager
    def installed(self, network: nn.Module) -> Iterator[None]:
        layers = [module for module in network.modules() if isinstance(module, CrossAttention)]
        if not layers:
            raise HypernetworkError(f"{self.hypernetwork.source}: the model has no attention layers to apply it to")
        weight = layers[0].to_k.weight
        hook = self.hypernetwork.key_value_hook(self.strength, weight.device, weight.dtype)
        for layer in layers:
            layer.kv_hooks.append(hook)
        try:
            yield
        finally:
            for layer in layers:
                layer.kv_hooks.remove(hook)
