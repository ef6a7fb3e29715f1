"""Read LoRA files (kohya, diffusers/PEFT, LoCon) into weight deltas on this library's parameter names, and write kohya files.

What a LoRA module holds and what it adds to the weight ``W`` it targets:

- ``down`` (r, in) and ``up`` (out, r): ``delta = up @ down`` (linear layers);
- LoCon conv layers: ``down`` (r, in, kh, kw) and ``up`` (out, r, 1, 1): ``delta[o] = sum_a up[o, a] down[a]``;
- LoCon with a Tucker core (``lora_mid`` (r, r, kh, kw)), ``down`` (r, in, 1, 1), ``up`` (out, r, 1, 1):
  ``delta[o, i, h, w] = sum_{a, b} up[o, a] mid[a, b, h, w] down[b, i]``;

each times ``alpha / r`` (``alpha`` stored beside the module; missing: 1). A linear LoRA on a 1x1 conv
(SD1's ``proj_in``) or a 1x1-conv LoRA on a linear layer is the same product, reshaped.

Module names the files use, all reduced here to this library's names (LDM U-Net layout, HF CLIP
text encoders):

- kohya: ``lora_unet_<module>`` with dots as underscores; SD1/SD2 files name U-Net modules by
  their diffusers path (``lora_unet_down_blocks_0_attentions_0_proj_in``), SDXL files by their
  LDM path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); both are accepted
  for every family. Text encoders: ``lora_te_`` (the single encoder of SD1/SD2), ``lora_te1_`` /
  ``lora_te2_`` (SDXL's CLIP-L / OpenCLIP bigG), HF module names.
- diffusers/PEFT: ``unet.<diffusers module>`` / ``text_encoder.`` / ``text_encoder_2.`` with
  ``lora_A``/``lora_B`` (PEFT), ``lora.down``/``lora.up``, ``lora_linear_layer.down``/``.up``, or the
  attention-processor form ``attn1.processor.to_q_lora.down``.

The diffusers <-> LDM U-Net renaming is :func:`unet.ldm_key_from_diffusers`; the tables here are
derived from it, never written out a second time.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import unet as unet_module
from .checkpoint import ModelFamily, open_weights
from .safetensors_io import CheckpointError

logger = logging.getLogger(__name__)

TARGETS = ("unet", "clip_l", "clip_h", "clip_g")

# Which file sections feed each target. ``te`` is the only encoder of an SD1 (CLIP-L) or SD2
# (OpenCLIP-H) LoRA; SDXL files split into ``te1`` (CLIP-L) and ``te2`` (bigG).
_SECTIONS_BY_TARGET: dict[str, tuple[str, ...]] = {
    "unet": ("unet",),
    "clip_l": ("te", "te1"),
    "clip_h": ("te",),
    "clip_g": ("te2",),
}

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te_": "te"}
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder_2.": "te2", "text_encoder.": "te"}
# A diffusers U-Net LoRA saved without the ``unet.`` prefix (older pytorch_lora_weights files).
_BARE_UNET_STARTS = ("down_blocks.", "mid_block.", "up_blocks.")

# Key ending -> what the tensor is, for every LoRA flavour read here.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA: ``<attn>.processor.to_q_lora.down.weight`` patches ``<attn>.to_q``.
_PROCESSOR_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# Other LyCORIS algorithms: recognised so a file using them is refused by name, not half-applied.
_UNSUPPORTED = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|dora_scale|diff|diff_b|w_norm|b_norm)$")


class LoraFormatError(CheckpointError):
    """A LoRA file that cannot be used; the message names the file and what is wrong with it."""


class LoraShapeError(ValueError):
    """A LoRA module whose product does not fit the weight it was matched to."""


# --------------------------------------------------------------------------- deltas


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """The low-rank update of one weight.

    source: the module's name in the file (as listed in :attr:`LoraFile.module_names`).
    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1); mid: None or (r, r, kh, kw).
    """

    source: str
    down: Tensor
    up: Tensor
    mid: Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank; 1 when the file stores no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def natural_shape(self) -> tuple[int, ...]:
        """The shape of the product before it is fitted to a weight: (out, in) or (out, in, kh, kw)."""
        out = int(self.up.shape[0])
        if self.mid is not None:
            return (out, int(self.down.shape[1]), *self.mid.shape[2:])
        return (out, *self.down.shape[1:])

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the product can be added to a weight of ``shape`` (same output rows, same size)."""
        natural = self.natural_shape()
        return len(shape) > 0 and shape[0] == natural[0] and _numel(shape) == _numel(natural)

    def tensor(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """The full delta for a weight of ``shape`` (scale applied, strength not): computed in fp32, returned in ``dtype``."""
        if not self.fits(shape):
            raise LoraShapeError(
                f"LoRA module {self.source!r} makes a {tuple(self.natural_shape())} delta; "
                f"it cannot be added to a weight of shape {tuple(shape)}"
            )
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32)
        if self.mid is None:
            product = up @ down.flatten(1)
        else:
            mid = self.mid.to(device=device, dtype=torch.float32)
            product = torch.einsum("ab...,oa,bi->oi...", mid, up, down.flatten(1))
        return (product * self.scale).reshape(tuple(shape)).to(dtype)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


# --------------------------------------------------------------------------- U-Net module names


def _underscored(name: str) -> str:
    return name.replace(".", "_")


# Stands for "the rest of the path" when probing where diffusers puts an attention block: the
# renaming passes the part after the block prefix through unchanged.
_REST = "lora_rest"


@dataclass(frozen=True)
class _DiffusersModuleNames:
    """Diffusers U-Net module names <-> LDM module names for one U-Net layout, probed from
    :func:`unet.ldm_key_from_diffusers`.

    modules: diffusers module -> LDM module (res-block layers, samplers, top-level layers).
    block_prefixes: diffusers attention-block prefix -> LDM prefix, both ending in ".";
    everything below an attention block keeps its name.
    """

    modules: dict[str, str]
    block_prefixes: dict[str, str]

    @classmethod
    def probe(cls, layout: unet_module.DiffusersUNetLayout, levels: int) -> _DiffusersModuleNames:
        # The renaming's own vocabulary: which res-block and top-level layer names exist.
        resnet_parts = tuple(unet_module._DIFFUSERS_RESNET)
        top_level = tuple(unet_module._DIFFUSERS_TOP_LEVEL)
        blocks: list[tuple[str, str]] = []  # (prefix, kind)
        for level in range(levels):
            for index in range(layout.res_blocks):
                blocks += [(f"down_blocks.{level}.resnets.{index}", "resnets"),
                           (f"down_blocks.{level}.attentions.{index}", "attentions")]
            blocks.append((f"down_blocks.{level}.downsamplers.0", "sampler"))
            for index in range(layout.res_blocks + 1):
                blocks += [(f"up_blocks.{level}.resnets.{index}", "resnets"),
                           (f"up_blocks.{level}.attentions.{index}", "attentions")]
            blocks.append((f"up_blocks.{level}.upsamplers.0", "sampler"))
        blocks += [("mid_block.resnets.0", "resnets"), ("mid_block.resnets.1", "resnets"),
                   ("mid_block.attentions.0", "attentions")]
        modules: dict[str, str] = {}
        block_prefixes: dict[str, str] = {}
        for prefix, kind in blocks:
            if kind == "attentions":
                ldm = unet_module.ldm_key_from_diffusers(f"{prefix}.{_REST}.weight", layout)
                block_prefixes[f"{prefix}."] = ldm[: -len(f"{_REST}.weight")]
                continue
            names = [f"{prefix}.{part}" for part in resnet_parts] if kind == "resnets" else [f"{prefix}.conv"]
            for name in names:
                modules[name] = unet_module.ldm_key_from_diffusers(f"{name}.weight", layout)[: -len(".weight")]
        for name in top_level:
            modules[name] = unet_module.ldm_key_from_diffusers(f"{name}.weight", layout)[: -len(".weight")]
        return cls(modules, block_prefixes)

    def ldm_module(self, diffusers_module: str) -> str | None:
        """The LDM name of a dotted diffusers module name; None if it is not a U-Net module."""
        if diffusers_module in self.modules:
            return self.modules[diffusers_module]
        for prefix, ldm_prefix in self.block_prefixes.items():
            if diffusers_module.startswith(prefix):
                return ldm_prefix + diffusers_module[len(prefix):]
        return None

    def diffusers_module(self, ldm_module: str) -> str | None:
        """The dotted diffusers name of an LDM module name; None if diffusers has no such module."""
        for diffusers, ldm in self.modules.items():
            if ldm == ldm_module:
                return diffusers
        for prefix, ldm_prefix in self.block_prefixes.items():
            if ldm_module.startswith(ldm_prefix):
                return prefix + ldm_module[len(ldm_prefix):]
        return None

    def underscored_to_ldm(self) -> dict[str, str]:
        """Underscored diffusers module or attention-block prefix -> dotted LDM module or prefix."""
        table = {_underscored(k): v for k, v in self.modules.items()}
        table.update({_underscored(k): v for k, v in self.block_prefixes.items()})
        return table


@lru_cache(maxsize=16)
def _probed(layout: unet_module.DiffusersUNetLayout, levels: int) -> _DiffusersModuleNames:
    return _DiffusersModuleNames.probe(layout, levels)


def _layout_of_config(config: unet_module.UNetConfig) -> tuple[unet_module.DiffusersUNetLayout, int]:
    per_level = config.num_res_blocks + 1
    depths = config.output_depths
    levels = len(config.channel_mult)
    with_attention = frozenset(
        level for level in range(levels) if any(depths[level * per_level:(level + 1) * per_level])
    )
    return unet_module.DiffusersUNetLayout(config.num_res_blocks, with_attention), levels


_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.(\w+)")
_OUTPUT_BLOCK = re.compile(r"^output_blocks\.(\d+)\.(\d+)\.(\w+)")


def _layout_of_names(names: Collection[str]) -> tuple[unet_module.DiffusersUNetLayout, int] | None:
    """The diffusers layout of a U-Net from its LDM parameter names: res blocks per level from where
    the first downsampler sits, attention levels on the up side from which output blocks hold a
    transformer. None when the names are not a U-Net's."""
    input_blocks: set[int] = set()
    downsamplers: set[int] = set()
    attention_outputs: set[int] = set()
    for name in names:
        match = _INPUT_BLOCK.match(name)
        if match:
            input_blocks.add(int(match.group(1)))
            if match.group(3) == "op":
                downsamplers.add(int(match.group(1)))
            continue
        match = _OUTPUT_BLOCK.match(name)
        if match and match.group(2) == "1" and match.group(3) != "conv":
            attention_outputs.add(int(match.group(1)))
    if not input_blocks:
        return None
    res_blocks = (min(downsamplers) if downsamplers else max(input_blocks) + 1) - 1
    if res_blocks < 1:
        return None
    per_level = res_blocks + 1
    layout = unet_module.DiffusersUNetLayout(res_blocks, frozenset(b // per_level for b in attention_outputs))
    return layout, len(downsamplers) + 1


# --------------------------------------------------------------------------- writing kohya files

_TEXT_PREFIX_BY_FAMILY: dict[ModelFamily, dict[str, str]] = {
    ModelFamily.SD1: {"clip_l": "lora_te_"},
    ModelFamily.SD2: {"clip_h": "lora_te_"},
    ModelFamily.SDXL: {"clip_l": "lora_te1_", "clip_g": "lora_te2_"},
    ModelFamily.SDXL_REFINER: {"clip_g": "lora_te2_"},
}
_DEFAULT_UNET_CONFIG = {
    ModelFamily.SD1: unet_module.SD1_CONFIG,
    ModelFamily.SD2: unet_module.SD2_CONFIG,
}

LoraFactors = tuple[Tensor, Tensor, "float | Tensor | None"]


def kohya_state_dict(
    unet: Mapping[str, LoraFactors],
    text: Mapping[str, Mapping[str, LoraFactors]],
    family: ModelFamily | str,
    unet_config: unet_module.UNetConfig | None = None,
) -> dict[str, Tensor]:
    """A kohya-format LoRA state dict (save it with ``safetensors.torch.save_file``).

    unet: our U-Net parameter name (``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``)
    -> (down (r, in[, kh, kw]), up (out, r[, 1, 1]), alpha or None).
    text: text-encoder slot (``clip_l``, ``clip_h``, ``clip_g``) -> {HF CLIP parameter name -> factors}.
    family: SD1/SD2 files name U-Net modules by their diffusers path, SDXL files by their LDM path.
    unet_config: the U-Net's config, to place SD1/SD2 modules in diffusers' layout; defaults to the
    family's full-size U-Net (only the upsampler convs depend on it beyond ``num_res_blocks``).
    """
    family = ModelFamily(family)
    result: dict[str, Tensor] = {}
    if unet:
        if family in (ModelFamily.SD1, ModelFamily.SD2):
            config = unet_config or _DEFAULT_UNET_CONFIG[family]
            names = _probed(*_layout_of_config(config))
            for param, factors in unet.items():
                module = _module_of(param)
                diffusers = names.diffusers_module(module)
                if diffusers is None:
                    raise ValueError(f"U-Net parameter {param!r} has no diffusers counterpart, so no kohya {family.value} name")
                _put(result, "lora_unet_" + _underscored(diffusers), factors, param)
        else:
            for param, factors in unet.items():
                _put(result, "lora_unet_" + _underscored(_module_of(param)), factors, param)
    prefixes = _TEXT_PREFIX_BY_FAMILY[family]
    for slot, params in text.items():
        if slot not in prefixes:
            raise ValueError(f"a {family.value} model has no text encoder {slot!r}; expected one of {sorted(prefixes)}")
        for param, factors in params.items():
            _put(result, prefixes[slot] + _underscored(_module_of(param)), factors, param)
    return result


def _module_of(param: str) -> str:
    if not param.endswith(".weight"):
        raise ValueError(f"LoRA factors are for weights; {param!r} is not a '.weight' parameter")
    return param[: -len(".weight")]


def _put(result: dict[str, Tensor], module: str, factors: LoraFactors, param: str) -> None:
    down, up, alpha = factors
    if down.shape[0] != up.shape[1]:
        raise ValueError(f"LoRA factors for {param!r}: down has rank {down.shape[0]}, up has rank {up.shape[1]}")
    if module + ".lora_down.weight" in result:
        raise ValueError(f"two parameters map to the kohya module {module!r} (the second is {param!r})")
    result[module + ".lora_down.weight"] = down.detach().contiguous()
    result[module + ".lora_up.weight"] = up.detach().contiguous()
    if alpha is not None:
        result[module + ".alpha"] = torch.as_tensor(alpha, dtype=torch.float32).detach().reshape(()).clone()
