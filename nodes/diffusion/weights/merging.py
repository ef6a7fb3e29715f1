"""Model merging as weight patches: one model's weights blended into another's while it runs, no merged copy made.

A merge is ComfyUI's ``add_patches(other_weights, strength_patch, strength_model)``: each merged
parameter becomes ``strength_model * W1 + strength_patch * W2``, where W1 is the first model's
weight with the patches it carried before the merge (a LoRA applied to it) and W2 the second
model's with its own patches. Patches add up (:mod:`.patching`), so the merge is the delta
``(strength_model - 1) * W1 + strength_patch * W2`` (:class:`MergedWeight`): it holds references to
both models' modules and computes from their current weights when :func:`.patching.patched` asks,
so neither model is changed or copied and a later LoRA adds on top of the merged weight.

Weighted sum (ratio r of the first model): strength_model r, strength_patch 1 - r; add: 1, 1;
difference scaled by m: m, -m.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .patching import WeightDelta, WeightPatches
from .storage import FLOAT8_DTYPES

logger = logging.getLogger(__name__)

# (strength_patch, strength_model) for one parameter name; None leaves that parameter alone.
Strengths = Callable[[str], "tuple[float, float] | None"]


class MergeError(ValueError):
    """Two models (or text encoders) that cannot be merged; the message says why."""


def _effective(module: nn.Module, name: str, patches: Sequence[tuple[WeightDelta, float]],
               dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """Parameter `name` of `module` plus its patches (strength * delta), in dtype on device."""
    weight = module.get_parameter(name).detach().to(device=device, dtype=dtype)
    if not patches:
        return weight
    total = weight.clone()
    for delta, strength in patches:
        total.add_(delta.tensor(weight.shape, dtype, device), alpha=strength)
    return total


def _patches_on(patches: WeightPatches, name: str) -> tuple[tuple[WeightDelta, float], ...]:
    """The (delta, strength) pairs of `patches` that touch parameter `name`, in order (strength 0 left out)."""
    return tuple((deltas[name], strength) for deltas, strength in patches if strength != 0 and name in deltas)


@dataclass(frozen=True, eq=False)
class MergedWeight:
    """The delta of one merged parameter: (strength_model - 1) * W1 + strength_patch * W2.

    W1: parameter `name` of `base` with `base_patches`; W2: parameter `name` of `other` with
    `other_patches`. Read when the delta is asked for, so the models' current devices are used.
    """

    source: str
    name: str
    base: nn.Module
    base_patches: tuple[tuple[WeightDelta, float], ...]
    other: nn.Module
    other_patches: tuple[tuple[WeightDelta, float], ...]
    strength_patch: float
    strength_model: float

    def tensor(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        """The delta (shape) in dtype on device."""
        result = _effective(self.other, self.name, self.other_patches, dtype, device)
        if tuple(result.shape) != tuple(shape):
            raise MergeError(f"{self.source}: {self.name} has shape {tuple(result.shape)}, the merged model's "
                             f"{tuple(shape)}")
        result = result * self.strength_patch
        if self.strength_model != 1.0:
            base = _effective(self.base, self.name, self.base_patches, dtype, device)
            result.add_(base, alpha=self.strength_model - 1.0)
        return result


@dataclass(frozen=True)
class MergePlan:
    """What a merge patches: the deltas by parameter name, and the names it skipped because the
    two modules' shapes differ (an inpainting U-Net's input conv merged with a plain one's)."""

    deltas: dict[str, MergedWeight]
    mismatched: tuple[str, ...]


def merge_deltas(
    base: nn.Module,
    base_patches: WeightPatches,
    other: nn.Module,
    other_patches: WeightPatches,
    strengths: Strengths,
    source: str,
    skip: Callable[[str], bool] = lambda name: False,
) -> MergePlan:
    """Deltas that merge `other` (with its patches) into `base` (with its patches so far).

    Every parameter both modules have under the same name is merged with the (strength_patch,
    strength_model) `strengths` gives for its name (None: not merged); one of another shape is
    skipped (as ComfyUI does) and listed, and so is one `skip` names. Raises :class:`MergeError`
    when the modules share no parameter of the same shape (different architectures) or one of
    them is stored in 8-bit floats.
    """
    base_params = dict(base.named_parameters())
    other_params = dict(other.named_parameters())
    for module, params in ((base, base_params), (other, other_params)):
        stored = {p.dtype for p in params.values()} & set(FLOAT8_DTYPES)
        if stored:
            raise MergeError(f"{source}: a {type(module).__name__} stored in {sorted(map(str, stored))[0]} cannot be "
                             "merged; load it with its weights in 16 or 32 bits")
    shared = [name for name in other_params if name in base_params and not skip(name)]
    mismatched = {name for name in shared if base_params[name].shape != other_params[name].shape}
    if len(mismatched) == len(shared):
        raise MergeError(f"{source}: the two models share no weight of the same name and shape "
                         f"({len(base_params)} and {len(other_params)} weights): they are of different architectures")
    deltas: dict[str, MergedWeight] = {}
    for name in shared:
        pair = strengths(name)
        if pair is None or name in mismatched:
            continue
        strength_patch, strength_model = pair
        deltas[name] = MergedWeight(source, name, base, _patches_on(base_patches, name), other,
                                    _patches_on(other_patches, name), float(strength_patch), float(strength_model))
    if mismatched:
        logger.warning("%s: %d weight(s) of different shapes are not merged (%s%s)", source, len(mismatched),
                       ", ".join(sorted(mismatched)[:3]), ", ..." if len(mismatched) > 3 else "")
    return MergePlan(deltas, tuple(name for name in shared if name in mismatched))


def uniform(strength_patch: float, strength_model: float) -> Strengths:
    """The same strengths for every parameter."""
    pair = (strength_patch, strength_model)
    return lambda name: pair


def weighted_sum(ratio_of: Callable[[str], float]) -> Strengths:
    """ratio_of(name) of the first model, the rest of the second: strengths (1 - r, r)."""

    def strengths(name: str) -> tuple[float, float]:
        ratio = ratio_of(name)
        return 1.0 - ratio, ratio

    return strengths


def prefix_ratio(ratios: Mapping[str, float], default: float) -> Callable[[str], float]:
    """The ratio of the longest key of `ratios` that a parameter name starts with, else `default`
    (ComfyUI's ModelMergeBlocks: "input", "middle", "out" against input_blocks., middle_block.,
    out. and output_blocks.)."""
    ordered = sorted(ratios.items(), key=lambda item: -len(item[0]))

    def ratio_of(name: str) -> float:
        for prefix, ratio in ordered:
            if name.startswith(prefix):
                return ratio
        return default

    return ratio_of


# ComfyUI leaves these out of text-encoder merges: constants, not learned weights.
TEXT_ENCODER_UNMERGED_SUFFIXES = (".position_ids", ".logit_scale")


def text_encoder_skipped(name: str) -> bool:
    """Whether a text encoder's parameter is left out of merges."""
    return ("." + name).endswith(TEXT_ENCODER_UNMERGED_SUFFIXES)

