"""Weights kept in their storage dtype (fp8, fp16, bf16) and upcast layer by layer at compute, so a model needs about its file size in memory.

Most Flux and T5 files are distributed in ``float8_e4m3fn`` (some ``float8_e5m2``), which torch
cannot multiply with on most devices. Converting the whole model to the compute dtype costs two
(bf16) to four (fp32) times the file size. :func:`compute_in` instead leaves every parameter in
its storage dtype and makes each module that owns one hand out an upcast copy whenever the
tensor is read as an attribute (``self.weight`` inside ``nn.Linear.forward``, ``self.scale``
inside a custom norm, ``self.shared.weight`` in a parent's forward): the copy lives for that one
computation. ``state_dict()``, ``parameters()`` and ``load_state_dict`` still see the stored
tensors under their usual names, and the networks need no change. Reading a whole vocabulary
table as an attribute upcasts all of it; ``nn.Embedding``'s own forward gathers the rows first.

"Scaled fp8" files store ``W / s`` in fp8 with a per-layer scale ``s`` next to the weight:
ComfyUI's ``<layer>.scale_weight`` (with a ``scaled_fp8`` marker entry and an ignorable
``<layer>.scale_input``), or ``<layer>.weight_scale`` (with ``<layer>.input_scale`` and, in
ComfyUI's newer layout, a ``<layer>.comfy_quant`` JSON entry). :func:`split_weight_scales` takes
them out of a state dict before the module is built; :func:`compute_in` applies them
(``weight.to(dtype) * scale.to(dtype)``, scalar or one scale per output channel).

Weight patches (LoRA) on an upcast parameter are never written into the stored tensor (fp8
cannot hold ``W + delta``): :mod:`.patching` registers them here and they are added, in the
compute dtype, to the upcast copy — removing them restores nothing because nothing changed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .safetensors_io import CheckpointError

if TYPE_CHECKING:
    from .patching import WeightDelta

logger = logging.getLogger(__name__)

FLOAT8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
# Dtypes torch computes in; storage dtypes are anything floating.
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# <layer>.<suffix> -> the scale of <layer>.weight. ComfyUI's "scaled fp8" spelling, then the
# one of ComfyUI's newer layout, diffusers and NVIDIA ModelOpt exports.
WEIGHT_SCALE_SUFFIXES: tuple[str, ...] = ("scale_weight", "weight_scale")
# Activation scales for fp8 matrix multiplication kernels; the product in a wider compute dtype
# does not use them.
INPUT_SCALE_SUFFIXES: tuple[str, ...] = ("scale_input", "input_scale")
SCALED_FP8_MARKER = "scaled_fp8"  # an empty entry whose dtype names the fp8 format (ComfyUI)
QUANT_CONFIG_SUFFIX = "comfy_quant"  # per-layer JSON {"format": ...} as uint8 bytes (ComfyUI)
_FP8_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")

# Attributes this module keeps in a module's __dict__ (never parameters, never in state_dict()).
_DTYPE_ATTR = "_storage_compute_dtype"
_UPCAST_ATTR = "_storage_upcast"
_PATCHES_ATTR = "_storage_patches"
_SCALE_BUFFER_PREFIX = "_storage_scale_"

Patch = tuple["WeightDelta", float]


class StorageError(ValueError):
    """A compute dtype or scale that cannot be used with a module; the message names the parameter."""


class WeightScaleError(CheckpointError):
    """A scaled-fp8 entry of a weight file that does not fit its weight (names the key)."""


def is_scale_key(name: str) -> bool:
    """Whether ``name`` is one of the per-layer entries of a scaled-fp8 file rather than a weight."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in (*WEIGHT_SCALE_SUFFIXES, *INPUT_SCALE_SUFFIXES, SCALED_FP8_MARKER, QUANT_CONFIG_SUFFIX)


def split_weight_scales(
    state_dict: Mapping[str, Tensor], path: str = "<state dict>"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate a scaled-fp8 state dict (prefix removed) into weights and their scales.

    Returns ``(weights, scales)``: ``weights`` without any scaled-fp8 entry, ``scales`` mapping a
    parameter name (``"double_blocks.0.img_attn.qkv.weight"``) to its scale, as
    :func:`compute_in` takes them. Input scales and the ``scaled_fp8`` marker are dropped; a
    ``comfy_quant`` entry must name an fp8 format. Raises :class:`WeightScaleError` naming the key
    for a scale without its weight, a scale whose size is neither 1 nor the weight's output
    channels, two scales for one weight, or a quantisation format other than fp8.
    """
    weights: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    dropped = 0
    for key, tensor in state_dict.items():
        layer, _, leaf = key.rpartition(".")
        target = f"{layer}.weight" if layer else "weight"
        if leaf in WEIGHT_SCALE_SUFFIXES:
            if target in scales:
                raise WeightScaleError(path, f"{key!r}: {target!r} has a second scale entry")
            scales[target] = tensor
        elif leaf in INPUT_SCALE_SUFFIXES or leaf == SCALED_FP8_MARKER:
            dropped += 1
        elif leaf == QUANT_CONFIG_SUFFIX:
            _check_quant_config(path, key, tensor)
            dropped += 1
        else:
            weights[key] = tensor
    for target, scale in scales.items():
        weight = weights.get(target)
        if weight is None:
            raise WeightScaleError(path, f"scale for {target!r} but the file has no such weight")
        problem = _scale_problem(target, scale, tuple(weight.shape))
        if problem:
            raise WeightScaleError(path, problem)
    if scales or dropped:
        logger.info("%s: %d weight scales, %d scaled-fp8 entries without effect on the result left out",
                    path, len(scales), dropped)
    return weights, scales


def _check_quant_config(path: str, key: str, tensor: Tensor) -> None:
    if tensor.is_meta:
        return  # shapes-only loading: nothing to read
    try:
        config = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a too-long integer, too deep
        raise WeightScaleError(path, f"{key!r} is not a JSON quantisation config: {type(exc).__name__}: {exc}") from None
    found = config.get("format") if isinstance(config, dict) else None
    if found not in _FP8_QUANT_FORMATS:
        raise WeightScaleError(
            path, f"{key!r}: quantisation format {found!r} is not supported (supported: {', '.join(_FP8_QUANT_FORMATS)})"
        )


def _scale_problem(target: str, scale: Tensor, weight_shape: tuple[int, ...]) -> str | None:
    if scale.numel() == 1 or (weight_shape and scale.numel() == weight_shape[0]):
        return None
    return (f"scale of {target!r} has shape {tuple(scale.shape)}; expected one value or one per output "
            f"channel ({weight_shape[0] if weight_shape else 1}) of the weight {weight_shape}")


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``weight`` in ``dtype``, times ``scale`` (one value, or one per output channel) when given.

    weight: (out, ...); scale: () / (1,) / (out,) / (out, 1, ...). The scale is cast to ``dtype``
    first, so the product is the one a layer computes with.
    """
    upcast = weight.to(dtype)
    if scale is None:
        return upcast
    factor = scale.to(device=upcast.device, dtype=dtype)
    if factor.numel() == 1:
        return upcast * factor.reshape(())
    return upcast * factor.reshape(-1, *([1] * (upcast.ndim - 1)))


# --------------------------------------------------------------------------- compute_in


def compute_in(module: nn.Module, dtype: torch.dtype, scales: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Run ``module`` in ``dtype`` while its parameters stay in their storage dtype; returns ``module``.

    Every floating parameter or buffer whose dtype is not ``dtype`` (or that has a scale) is read
    as an upcast copy by the code of the module that owns it, for that computation only; nothing
    is converted in place and no second copy of the model is made. Inputs must be given in
    ``dtype`` (see :func:`compute_dtype`). ``scales``: parameter name -> scale, from
    :func:`split_weight_scales`; kept as non-persistent buffers, so ``state_dict()`` keys do not
    change and ``module.to(device)`` moves them. Calling it again changes the compute dtype.

    Raises :class:`StorageError` for a dtype torch does not compute in or a scale naming a
    parameter the module does not have.
    """
    if dtype not in COMPUTE_DTYPES:
        raise StorageError(f"compute dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {dtype}")
    scales = dict(scales or {})
    params = dict(module.named_parameters())
    unknown = [name for name in scales if name not in params]
    if unknown:
        raise StorageError(
            f"scales name parameters this {type(module).__name__} does not have: {', '.join(sorted(unknown)[:10])}"
        )
    for name, scale in scales.items():
        problem = _scale_problem(name, scale, tuple(params[name].shape))
        if problem:
            raise StorageError(problem)
    for prefix, owner in module.named_modules(remove_duplicate=False):
        owner.__dict__[_DTYPE_ATTR] = dtype
        for leaf in owner._parameters:
            scale = scales.get(f"{prefix}.{leaf}" if prefix else leaf)
            if scale is not None:
                owner.register_buffer(_SCALE_BUFFER_PREFIX + leaf, scale, persistent=False)
        scaled = {name[len(_SCALE_BUFFER_PREFIX):] for name in owner._buffers if name.startswith(_SCALE_BUFFER_PREFIX)}
        upcast = frozenset(
            leaf
            for leaf, tensor in (*owner._parameters.items(), *owner._buffers.items())
            if tensor is not None and tensor.is_floating_point() and not leaf.startswith(_SCALE_BUFFER_PREFIX)
            and (tensor.dtype != dtype or leaf in scaled)
        )
        if upcast or _UPCAST_ATTR in owner.__dict__:
            owner.__dict__[_UPCAST_ATTR] = upcast
            owner.__dict__.setdefault(_PATCHES_ATTR, {})
            owner.__class__ = _upcasting_class(type(owner))
    return module


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: the one given to :func:`compute_in`, else its first floating parameter's.

    What callers should cast inputs to; ``next(module.parameters()).dtype`` is the storage dtype.
    """
    chosen = module.__dict__.get(_DTYPE_ATTR)
    if chosen is not None:
        return chosen
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def upcasts(owner: nn.Module, leaf: str) -> bool:
    """Whether ``owner``'s parameter ``leaf`` (a direct one) is upcast at compute by :func:`compute_in`."""
    return leaf in owner.__dict__.get(_UPCAST_ATTR, ())


def add_weight_patches(owner: nn.Module, leaf: str, parts: Iterable[Patch]) -> Callable[[], None]:
    """Add ``(delta, strength)`` contributions to the upcast copy of ``owner.<leaf>``; returns the undo.

    The stored tensor is not touched: the sum is formed in float32 (or the wider compute dtype)
    at each read, added to the dequantized weight, and cast to the compute dtype.
    """
    if not upcasts(owner, leaf):
        raise StorageError(f"{type(owner).__name__}.{leaf} is not upcast at compute (call compute_in first)")
    added = list(parts)
    entries: list[Patch] = owner.__dict__[_PATCHES_ATTR].setdefault(leaf, [])
    entries.extend(added)

    def remove() -> None:
        for part in added:
            for i in range(len(entries) - 1, -1, -1):
                if entries[i] is part:
                    del entries[i]
                    break
        if not entries:
            owner.__dict__[_PATCHES_ATTR].pop(leaf, None)

    return remove


def _upcast(owner: nn.Module, leaf: str) -> Tensor:
    """The stored tensor ``leaf`` of ``owner`` as its code should see it: dequantized, patched, in the compute dtype."""
    stored = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
    dtype: torch.dtype = owner.__dict__[_DTYPE_ATTR]
    scale = owner._buffers.get(_SCALE_BUFFER_PREFIX + leaf)
    patches = owner.__dict__[_PATCHES_ATTR].get(leaf)
    if not patches:
        return dequantize(stored, scale, dtype)
    wide = torch.promote_types(dtype, torch.float32)
    total = torch.zeros(stored.shape, dtype=wide, device=stored.device)
    for delta, strength in patches:
        total.add_(delta.tensor(stored.shape, wide, stored.device), alpha=strength)
    return (dequantize(stored, scale, wide) + total).to(dtype)


_UPCASTING_CLASSES: dict[type, type] = {}


def _upcasting_class(cls: type) -> type:
    """A subclass of ``cls`` whose instances hand out upcast copies of the tensors listed in their ``_storage_upcast``.

    nn.Module resolves parameters and buffers in ``__getattr__`` (they are not instance
    attributes), so overriding it there covers every read by the module's own code.
    """
    if cls.__dict__.get("_upcasts_storage", False):
        return cls
    made = _UPCASTING_CLASSES.get(cls)
    if made is not None:
        return made
    base_getattr = cls.__getattr__

    def __getattr__(self: nn.Module, name: str) -> object:
        if name in self.__dict__.get(_UPCAST_ATTR, ()):
            return _upcast(self, name)
        return base_getattr(self, name)

    namespace: dict[str, object] = {"__getattr__": __getattr__, "_upcasts_storage": True, "__module__": cls.__module__}
    if issubclass(cls, nn.Embedding):
        namespace["forward"] = _embedding_forward
    # The same name keeps printed models and error messages as they were.
    made = type(cls.__name__, (cls,), namespace)
    _UPCASTING_CLASSES[cls] = made
    return made


def _embedding_forward(self: nn.Embedding, input: Tensor) -> Tensor:
    """Gather the rows first, then upcast only them (a vocabulary table is the largest tensor of a text encoder)."""
    stored = self._parameters["weight"]
    scale = self._buffers.get(_SCALE_BUFFER_PREFIX + "weight")
    per_row_scale = scale is not None and scale.numel() != 1
    if not upcasts(self, "weight") or self.max_norm is not None or self.__dict__[_PATCHES_ATTR].get("weight") or per_row_scale:
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
    rows = F.embedding(input, stored, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
    return dequantize(rows, scale, self.__dict__[_DTYPE_ATTR])


def storage_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take as stored (the memory :func:`compute_in` keeps)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(math.prod(t.shape) * t.element_size() for t in tensors.values())
