"""Difference ControlNets: ControlNet files that store their weights as differences to the U-Net they were trained from.

Some early ControlNets (the "diff_control_sd15_*" files) hold, for every weight the ControlNet
shares with the U-Net (time embedding, input blocks, middle block), the ControlNet's weight minus
the base model's, and carry a ``difference`` marker key. Added to the weights of the model they are
used with, they become a ControlNet fitted to that model (ComfyUI's DiffControlNetLoader does the
same). A file without the marker is an ordinary ControlNet and loads as one.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..weights.loading import StateDictMismatchError
from .stable_diffusion import LoadedControlNet, load_controlnet

logger = logging.getLogger(__name__)

# The key that marks a ControlNet file as holding differences to its base model.
DIFFERENCE_MARKER = "difference"


def load_difference_controlnet(path: str | os.PathLike[str], model: nn.Module,
                               device: str | torch.device = "auto") -> LoadedControlNet:
    """A ControlNet from `path` fitted to `model` (a U-Net holding the weights it runs with): the
    file's differences plus the model's weights of the same names. A file without the marker loads
    unchanged. Raises StateDictMismatchError when a difference has no weight of its shape in the model
    or the file has other keys no ControlNet has."""
    loaded = load_controlnet(path, device=device, strict=False)
    unexpected = [key for key in loaded.unexpected_keys if key != DIFFERENCE_MARKER]
    if unexpected:
        raise StateDictMismatchError(loaded.path, f"{len(unexpected)} key(s) belong to no component: "
                                                  f"{', '.join(unexpected[:5])}")
    if len(unexpected) == len(loaded.unexpected_keys):
        logger.info("%s holds no %r marker: an ordinary ControlNet, loaded as it is", loaded.path, DIFFERENCE_MARKER)
        return loaded
    base = dict(model.named_parameters())
    added = 0
    with torch.no_grad():
        for name, param in loaded.controlnet.named_parameters():
            weight = base.get(name)
            if weight is None:
                continue
            if weight.shape != param.shape:
                raise StateDictMismatchError(loaded.path, f"difference {name} has shape {tuple(param.shape)}, the "
                                                          f"model's weight {tuple(weight.shape)}: it was made for "
                                                          "another model")
            param.add_(weight.detach().to(param.device, param.dtype))
            added += 1
    if not added:
        raise StateDictMismatchError(loaded.path, "no weight of the model matches the ControlNet's differences")
    logger.info("%s: %d difference weights added to the model's", loaded.path, added)
    return loaded
