"""Flux.1 Redux: a two-layer MLP that turns a SigLIP image encoder's tokens into text-width tokens,
appended to a Flux prompt's T5 states so the image steers generation (a "style model").

Module names equal the keys of ``flux1-redux-dev.safetensors`` (``redux_up``, ``redux_down``), which
diffusers' ``ReduxImageEncoder`` uses too, so one state dict loads into either.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


class ReduxConfigError(ValueError):
    """A state dict that is not a Redux image encoder (names what is missing or does not fit)."""


@dataclass(frozen=True)
class ReduxConfig:
    """image_dim: the image tokens' width (SigLIP so400m: 1152); hidden_dim: the MLP's (3 x text);
    text_dim: the text states' width they join (T5-XXL: 4096)."""

    image_dim: int = 1152
    hidden_dim: int = 3 * 4096
    text_dim: int = 4096


def is_redux_layout(keys: Collection[str]) -> bool:
    return {"redux_up.weight", "redux_down.weight"} <= set(keys)


def redux_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> ReduxConfig:
    """The :class:`ReduxConfig` of a Redux state dict, from its two weights' shapes."""
    if not is_redux_layout(shapes):
        raise ReduxConfigError("a Redux image encoder has redux_up.weight and redux_down.weight")
    hidden, image = shapes["redux_up.weight"]
    text, hidden_in = shapes["redux_down.weight"]
    if hidden_in != hidden:
        raise ReduxConfigError(f"redux_down takes {hidden_in} inputs but redux_up gives {hidden}")
    return ReduxConfig(image_dim=image, hidden_dim=hidden, text_dim=text)


class ReduxImageEncoder(nn.Module):
    """Image tokens (B, N, image_dim) -> text-width tokens (B, N, text_dim): up, SiLU, down."""

    def __init__(self, config: ReduxConfig) -> None:
        super().__init__()
        self.config = config
        self.redux_up = nn.Linear(config.image_dim, config.hidden_dim)
        self.redux_down = nn.Linear(config.hidden_dim, config.text_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(tokens)))
