"""Sinusoidal embedding of diffusion timesteps, shared by every denoiser family."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cosines first: timesteps (N,) -> (N, dim) float32.

    Frequencies ``max_period ** (-i / (dim // 2))``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    # Same operation order as the original, so the float32 rounding (visible at t ~ 1000) agrees.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding
