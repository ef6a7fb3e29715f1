"""Add weight deltas (LoRA) to a module's parameters for the length of a ``with`` block, then restore them bit for bit.

A loaded model is shared by every graph that uses it, with or without a LoRA; so patches are not
baked into the weights. :func:`patched` adds them in place (no second copy of the model), keeps
a copy of each parameter it touches, and copies those back when the block ends, also on an
exception. Outside ``patched(...)`` the module holds its base weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .storage import FLOAT8_DTYPES, add_weight_patches, upcasts


class WeightDelta(Protocol):
    """Something that adds to one weight (a :class:`lora.LoraDelta`)."""

    source: str

    def tensor(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> Tensor: ...


# parameter name (as in ``module.named_parameters()``) -> its delta
Deltas = Mapping[str, WeightDelta]
Patch = tuple[Deltas, float]


class PatchError(ValueError):
    """Patches that do not fit the module they are applied to."""


@dataclass(frozen=True)
class WeightPatches:
    """The patches one model carries: (deltas, strength) pairs, applied in order and summed.

    Immutable: :meth:`plus` returns a new value, so a graph that adds a LoRA never changes what
    another graph holding the same model sees.
    """

    entries: tuple[Patch, ...] = ()

    def plus(self, deltas: Deltas, strength: float) -> WeightPatches:
        return WeightPatches(self.entries + ((deltas, float(strength)),))

    def __iter__(self) -> Iterator[Patch]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _contributions(
    module: nn.Module, params: Mapping[str, nn.Parameter], patches: WeightPatches | Iterable[Patch]
) -> dict[str, list[tuple[WeightDelta, float]]]:
    """parameter name -> its (delta, strength) contributions, strength-0 ones left out.

    Raises :class:`PatchError` for a parameter the module does not have or a strength that is not finite.
    """
    contributions: dict[str, list[tuple[WeightDelta, float]]] = {}
    for deltas, strength in patches:
        if not math.isfinite(strength):
            raise PatchError(f"patch strength must be a finite number, got {strength}")
        # Strength 0 must leave the weights bit-identical: skip rather than add 0 * delta.
        if strength == 0:
            continue
        for name, delta in deltas.items():
            if name not in params:
                raise PatchError(
                    f"patch from {getattr(delta, 'source', '?')!r} targets parameter {name!r}, "
                    f"which this {type(module).__name__} does not have"
                )
            contributions.setdefault(name, []).append((delta, strength))
    return contributions


@contextlib.contextmanager
def patched(
    module: nn.Module,
    patches: WeightPatches | Iterable[Patch],
    backup_device: torch.device | str | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every touched parameter ``W`` holds ``W + sum(strength * delta)``.

    The sum is formed in float32 (or the parameter's wider dtype) and the result cast to the
    parameter's dtype. backup_device: where the copies of the original weights wait (default: the
    parameter's own device; "cpu" saves accelerator memory at the price of two transfers).

    A parameter kept in a storage dtype by :func:`.storage.compute_in` (fp8 above all, which
    cannot hold ``W + delta``) is not written: its patches are added to the upcast copy each
    layer computes with, in the compute dtype, and it needs no backup. An fp8 parameter that is
    not upcast that way is refused (:class:`PatchError`) rather than rounded.
    """
    params = dict(module.named_parameters())
    contributions = _contributions(module, params, patches)
    backups: dict[str, Tensor] = {}
    undo: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            for name, parts in contributions.items():
                param = params[name]
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if upcasts(owner, leaf):
                    for delta, _ in parts:  # a delta that does not fit fails here, not mid-sampling
                        delta.tensor(param.shape, torch.float32, param.device)
                    undo.append(add_weight_patches(owner, leaf, parts))
                    continue
                if param.dtype in FLOAT8_DTYPES:
                    raise PatchError(
                        f"parameter {name!r} is stored in {param.dtype}, which cannot hold a patched weight; "
                        "run the model through weights.storage.compute_in so patches apply at compute"
                    )
                compute = torch.promote_types(param.dtype, torch.float32)
                total = torch.zeros(param.shape, dtype=compute, device=param.device)
                for delta, strength in parts:
                    total.add_(delta.tensor(param.shape, compute, param.device), alpha=strength)
                backups[name] = param.detach().to(backup_device or param.device, copy=True)
                param.copy_((param.to(compute) + total).to(param.dtype))
        yield module
    finally:
        with torch.no_grad():
            for name, backup in backups.items():
                params[name].copy_(backup)
        for remove in reversed(undo):
            remove()
