"""What the diffusion nodes share: the input error type and the compute device of a run."""

from __future__ import annotations

import torch

from nodegraph.node import RunContext

from ..weights.devices import pick_device


class InputError(ValueError):
    """An input value a node cannot use; the message names the input (the engine adds the node)."""

    def __init__(self, input_name: str, message: str) -> None:
        super().__init__(f"input {input_name!r}: {message}")
        self.input_name = input_name


def run_device(ctx: RunContext) -> torch.device:
    """The device this run computes on ("auto": CUDA, then MPS, then the CPU)."""
    return pick_device(ctx.device)
