"""What ControlNets add to a diffusion transformer (MMDiT, Flux): one residual per block of the main network.

A transformer ControlNet computes one output per block of its own (fewer blocks than the model it
guides) and spreads them over the main network's blocks; :class:`TransformerControl` holds the
result already spread, so the residuals of several ControlNets add up block by block and the main
network only adds ``double[i]`` after its i-th joint/double-stream block and ``single[i]`` after its
i-th single-stream block (Flux), to the image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor


class ControlShapeError(ValueError):
    """Residuals that do not fit each other or the network they are added to (names what was expected)."""


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass
class TransformerControl:
    """Residuals for a transformer's image tokens, one entry per block of the main network.

    double[i]: (B, L_img, D) added after joint (MMDiT) / double-stream (Flux) block i, None = nothing;
    single[i]: the same after Flux's single-stream block i (empty for MMDiT).
    """

    double: list[Tensor | None]
    single: list[Tensor | None] = field(default_factory=list)

    def __add__(self, other: TransformerControl) -> TransformerControl:
        if len(self.double) != len(other.double) or len(self.single) != len(other.single):
            raise ControlShapeError(
                f"cannot add ControlNet residuals for {len(self.double)}+{len(self.single)} blocks to ones for "
                f"{len(other.double)}+{len(other.single)} blocks (ControlNets made for different models?)")
        return TransformerControl([_add(a, b) for a, b in zip(self.double, other.double)],
                                  [_add(a, b) for a, b in zip(self.single, other.single)])

    def scattered(self, rows: Tensor, total_rows: int) -> TransformerControl:
        """Residuals computed for some rows (rows: (R,) indices) of a batch of total_rows -> zeros in the others."""

        def pad(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.new_zeros((total_rows, *t.shape[1:])).index_copy(0, rows, t)

        return TransformerControl([pad(t) for t in self.double], [pad(t) for t in self.single])

    def check_fits(self, double_blocks: int, single_blocks: int = 0) -> None:
        """Raise ControlShapeError unless there is one entry per block of a network of this depth."""
        if len(self.double) != double_blocks or len(self.single) != single_blocks:
            raise ControlShapeError(
                f"ControlNet residuals for {len(self.double)} + {len(self.single)} blocks do not fit a network of "
                f"{double_blocks} + {single_blocks} blocks")


def spread(samples: Sequence[Tensor], blocks: int, *, cyclic: bool = False, skip_last: bool = False,
           stride: int | None = None) -> list[Tensor | None]:
    """A ControlNet's per-block outputs spread over `blocks` blocks of the main network.

    Block i takes ``samples[floor(i / (blocks / M))]`` for M samples (each sample serves consecutive
    blocks, as diffusers' SD3 transformer reads them), or ``samples[i // stride]`` with an explicit
    stride (Flux: ceil(blocks / M)), or ``samples[i % M]`` when `cyclic` (XLabs' Flux ControlNets
    repeat their few blocks over the whole depth). `skip_last`: the last block takes nothing (SD3's
    last block updates no text stream and is left uncontrolled).
    """
    if not samples:
        return [None] * blocks
    count = len(samples)
    out: list[Tensor | None] = []
    for i in range(blocks):
        if cyclic:
            index = i % count
        elif stride is not None:
            index = i // stride
        else:
            index = int(i / (blocks / count))
        out.append(samples[index] if index < count else None)
    if skip_last and out:
        out[-1] = None
    return out
