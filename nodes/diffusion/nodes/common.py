"""What the diffusion nodes share: the input error type, the compute device of a run, the pack's socket types."""

from __future__ import annotations

import torch

from nodegraph.node import RunContext
from nodegraph.types import SocketType

from ..weights.devices import pick_device


# The pack's own socket types (the engine registers them from the nodes that use them).
CLIP_VISION = SocketType("CLIP_VISION", "CLIP image encoder.", "#a1887f")
CLIP_VISION_OUTPUT = SocketType("CLIP_VISION_OUTPUT", "CLIP encoding of images.", "#ad7452")


class InputError(ValueError):
    """An input value a node cannot use; the message names the input (the engine adds the node)."""

    def __init__(self, input_name: str, message: str) -> None:
        super().__init__(f"input {input_name!r}: {message}")
        self.input_name = input_name


def run_device(ctx: RunContext) -> torch.device:
    """The device this run computes on ("auto": CUDA, then MPS, then the CPU)."""
    return pick_device(ctx.device)
