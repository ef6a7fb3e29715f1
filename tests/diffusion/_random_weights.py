"""Random weights for parity tests: reference libraries zero-init some layers, which would let a
wrong wiring pass, so every parameter gets a random value."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Fill every parameter (matrices scaled by fan-in, norms around 1, biases by `scale`) and
    switch to eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name:
                param.copy_(1 + scale * noise)
            else:
                param.copy_(scale * noise)
    return module.eval()
