"""Style models (ComfyUI's StyleModelLoader): image encoders whose tokens join a prompt's text
states. Flux.1 Redux loads (networks.flux_redux); T2I-Adapter style models are named and refused."""

from __future__ import annotations

import os

import torch

from ..networks.flux_redux import ReduxImageEncoder, is_redux_layout, redux_config_from_shapes
from ..weights.files import open_weights
from ..weights.loading import instantiate, target_device_dtype
from ..weights.safetensors_io import CheckpointError


class StyleModelError(CheckpointError):
    """A style-model file this library cannot use (names the file and what it holds)."""


# T2I-Adapter's style adapter keeps its learned style tokens here (ComfyUI loads it as a StyleAdapter).
_T2I_STYLE_KEY = "style_embedding"


def load_style_model(path: str | os.PathLike[str], device: str | torch.device = "auto") -> ReduxImageEncoder:
    """The style model in a weight file: a Flux.1 Redux image encoder (flux1-redux-dev.safetensors)."""
    path = str(path)
    weights = open_weights(path)
    shapes = weights.shapes()
    if _T2I_STYLE_KEY in shapes:
        raise StyleModelError(path, "a T2I-Adapter style model; only Flux.1 Redux style models are supported")
    if not is_redux_layout(shapes):
        raise StyleModelError(path, "no style model this library knows (Flux.1 Redux: redux_up / redux_down weights)")
    config = redux_config_from_shapes(shapes)
    target_device, dtype = target_device_dtype(device, None, "text_encoder")
    state = {key: weights.tensor(key).to(target_device, dtype) for key in shapes}
    model, _ = instantiate(lambda: ReduxImageEncoder(config), state, "style model", path, strict=True)
    return model  # type: ignore[return-value]
