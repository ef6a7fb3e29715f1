"""Read LoRA files (kohya, diffusers/PEFT, LoCon) as weight deltas on this library's parameter names; write kohya files.

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
  attention-processor forms ``attn1.processor.to_q_lora.down`` / ``self_attn.to_q_lora.down``.
- plain LDM names under ``diffusion_model.`` (as some tools save them).

The diffusers <-> LDM U-Net renaming is :func:`unet.ldm_key_from_diffusers`; the tables here are
derived from it, never written out a second time.

Files for the transformer denoisers (SD3 MMDiT, Flux) are parsed here too (``transformer.``,
``lora_transformer_``, ``lycoris_``, ``base_model.model.`` diffusers names, XLabs' processor names,
``lora_te3_`` / ``text_encoder_3.`` for T5, ComfyUI's ``text_encoders.<slot>.transformer.``) and
matched by :mod:`.lora_transformers`, which places a module trained on one of diffusers' separate
q/k/v layers on its rows of this library's fused weight (:class:`FusedLoraDelta`).

Scale: ``alpha / rank`` with the file's ``.alpha`` entry; a diffusers file without one may carry
PEFT's adapter config in its ``lora_adapter_metadata`` header entry (``lora_alpha``,
``alpha_pattern``, ``use_rslora``, per component); with neither the scale is 1, diffusers'
convention for PEFT files (``W + lora_B @ lora_A``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..networks import unet as unet_module
from ..weights.files import open_weights
from ..weights.safetensors_io import CheckpointError
from .detection import ModelFamily

logger = logging.getLogger(__name__)

TARGETS = ("unet", "clip_l", "clip_h", "clip_g")

# Which file sections feed each target. ``te`` is the only encoder of an SD1 (CLIP-L) or SD2
# (OpenCLIP-H) LoRA; SDXL files split into ``te1`` (CLIP-L) and ``te2`` (bigG). ComfyUI names the
# slot itself (``text_encoders.clip_l.transformer.``).
_SECTIONS_BY_TARGET: dict[str, tuple[str, ...]] = {
    "unet": ("unet",),
    "clip_l": ("te", "te1", "clip_l"),
    "clip_h": ("te", "clip_h"),
    "clip_g": ("te2", "clip_g"),
}

# Sections: "unet" = the denoiser (U-Net or transformer), in the library's own (original) module
# names or diffusers' (the resolvers take both); "te"/"te1"/"te2"/"te3" = a text encoder by its
# position in the training tool; "clip_l"/"clip_g"/"clip_h"/"t5xxl" = a text encoder by slot.
_KOHYA_PREFIXES = {
    "lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te3_": "te3", "lora_te_": "te",
    # OneTrainer and SimpleTuner's LyCORIS files: diffusers names, dots as underscores.
    "lora_transformer_": "unet", "lycoris_": "unet",
}
# diffusers/PEFT names, and the plain original names some tools write (``diffusion_model.input_blocks...``).
_DOTTED_PREFIXES = {
    "unet.": "unet", "text_encoder_3.": "te3", "text_encoder_2.": "te2", "text_encoder.": "te",
    "diffusion_model.": "unet", "transformer.": "unet", "base_model.model.": "unet",
    "text_encoders.clip_l.transformer.": "clip_l", "text_encoders.clip_g.transformer.": "clip_g",
    "text_encoders.clip_h.transformer.": "clip_h", "text_encoders.t5xxl.transformer.": "t5xxl",
}
# Denoiser modules saved without a prefix: a diffusers U-Net LoRA (older pytorch_lora_weights files),
# XLabs' Flux files (``double_blocks.0.processor.qkv_lora1.down.weight``), a diffusers transformer
# LoRA saved by ``save_lora_adapter``.
_BARE_UNET_STARTS = (
    "down_blocks.", "mid_block.", "up_blocks.", "double_blocks.", "single_blocks.", "transformer_blocks.",
    "single_transformer_blocks.",
)

# Key ending -> what the tensor is, for every LoRA flavour read here.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),  # PEFT's adapter name left in by some exporters
    (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA: ``<attn>.processor.to_q_lora.down.weight`` patches ``<attn>.to_q``
# in the U-Net, ``self_attn.to_q_lora.down.weight`` patches ``self_attn.q_proj`` in a CLIP text encoder.
_PROCESSOR_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_PROCESSOR_KEY = re.compile(r"^(.+\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_CLIP_ATTENTION_LAYERS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# XLabs' Flux LoRA processors: ``<block>.processor.qkv_lora1.down.weight`` (see lora_transformers).
_XLABS_KEY = re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora\d?)\.(down|up)\.weight$")
# Other LyCORIS algorithms, DoRA and LoRA biases: recognised so a file using them is refused by
# name, not half-applied.
_UNSUPPORTED = re.compile(
    r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|dora_scale|diff|diff_b|w_norm|b_norm"
    r"|lora_magnitude_vector(\.weight)?|lora_B\.bias)$"
)
# diffusers' safetensors header entry holding PEFT's LoraConfig as JSON.
PEFT_METADATA_KEY = "lora_adapter_metadata"


# Prefixes of metadata values naming the base model (ModelSpec architecture ids, kohya's version
# names), first match wins: Flux.2 is another architecture than Flux.1.
_FAMILY_MARKERS = (
    ("stable-diffusion-xl", "sdxl"), ("sdxl", "sdxl"),
    ("stable-diffusion-v2", "sd2"), ("sd_v2", "sd2"),
    ("stable-diffusion-v1", "sd1"), ("sd_v1", "sd1"),
    ("stable-diffusion-3", "sd3"), ("sd3", "sd3"),
    ("flux-2", "flux2"), ("flux.2", "flux2"), ("flux2", "flux2"),
    ("flux-1", "flux"), ("flux1", "flux"), ("flux", "flux"),
)
# Denoiser module names only one transformer family has, and ones SD3 and Flux share (diffusers').
_FAMILY_MODULE_STARTS = (
    ("double_blocks_", "flux"), ("single_blocks_", "flux"), ("single_transformer_blocks_", "flux"),
    ("joint_blocks_", "sd3"),
)
_TRANSFORMER_MODULE_START = "transformer_blocks_"


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
    def sources(self) -> tuple[str, ...]:
        """The file's modules this delta is made of (one)."""
        return (self.source,)

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
        """Whether the product can be added to a weight of ``shape``: the same shape, up to 1x1
        kernel dimensions (a linear LoRA on a 1x1 conv, or the reverse)."""
        return _without_unit_kernel(shape) == _without_unit_kernel(self.natural_shape())

    def tensor(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """The full delta for a weight of ``shape`` (scale applied, strength not).

        Computed in fp32 on ``device``, returned in ``dtype``; raises :class:`LoraShapeError` if it does not fit.
        """
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


def _without_unit_kernel(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(size) for size in shape)
    return shape[:2] if all(size == 1 for size in shape[2:]) else shape


@dataclass(frozen=True, eq=False)
class FusedLoraDelta:
    """LoRA modules trained on layers that this library keeps fused into one weight (diffusers'
    separate ``to_q``/``to_k``/``to_v`` in a ``qkv`` weight), each adding to its own rows.

    parts: (first row, delta) pairs, sorted and not overlapping; rows no part covers get nothing.
    """

    parts: tuple[tuple[int, LoraDelta], ...]

    @property
    def source(self) -> str:
        return " + ".join(self.sources)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(delta.source for _, delta in self.parts)

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether every part fits its rows of a weight of ``shape``."""
        return all(
            start + delta.natural_shape()[0] <= shape[0] and delta.fits((delta.natural_shape()[0], *shape[1:]))
            for start, delta in self.parts
        )

    def tensor(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """The full delta for a weight of ``shape`` (zeros outside the parts' rows), like :meth:`LoraDelta.tensor`."""
        if not self.fits(shape):
            raise LoraShapeError(
                f"LoRA modules {self.source!r} make rows "
                f"{[(start, start + delta.natural_shape()[0]) for start, delta in self.parts]}; "
                f"they cannot be added to a weight of shape {tuple(shape)}"
            )
        total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        for start, delta in self.parts:
            rows = delta.natural_shape()[0]
            total[start:start + rows] = delta.tensor((rows, *shape[1:]), torch.float32, device)
        return total.to(dtype)


WeightLoraDelta = LoraDelta | FusedLoraDelta


@dataclass(frozen=True)
class Placement:
    """Where one LoRA module's product goes.

    param: the weight parameter; rows: (start, stop) of the rows it fills when the library fuses the
    module's layer with others, None for the whole weight; swap_halves: the layer's two output halves
    are stored the other way round here (diffusers' (scale, shift) adaLN vs the original (shift, scale)).
    """

    param: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def _halves_swapped(delta: LoraDelta) -> LoraDelta:
    """``delta`` with the two halves of its output rows exchanged (the rows of ``up`` carry them)."""
    first, second = delta.up.chunk(2, dim=0)
    return LoraDelta(delta.source, delta.down, torch.cat((second, first), dim=0), delta.mid, delta.alpha)


# --------------------------------------------------------------------------- U-Net module names


def underscored(name: str) -> str:
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
        resnet_parts = tuple(unet_module.DIFFUSERS_RESNET_LAYERS)
        top_level = tuple(unet_module.DIFFUSERS_TOP_LEVEL_LAYERS)
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
        table = {underscored(k): v for k, v in self.modules.items()}
        table.update({underscored(k): v for k, v in self.block_prefixes.items()})
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
                    raise ValueError(
                        f"U-Net parameter {param!r} has no diffusers counterpart, so no kohya {family.value} name"
                    )
                _put(result, "lora_unet_" + underscored(diffusers), factors, param)
        else:
            for param, factors in unet.items():
                _put(result, "lora_unet_" + underscored(_module_of(param)), factors, param)
    prefixes = _TEXT_PREFIX_BY_FAMILY[family]
    for slot, params in text.items():
        if slot not in prefixes:
            raise ValueError(f"a {family.value} model has no text encoder {slot!r}; expected one of {sorted(prefixes)}")
        for param, factors in params.items():
            _put(result, prefixes[slot] + underscored(_module_of(param)), factors, param)
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


# --------------------------------------------------------------------------- reading LoRA files


@dataclass(frozen=True, eq=False)
class _LoraModule:
    """One module of a file: which section of the model it belongs to and its factors."""

    section: str  # "unet", "te", "te1", "te2"
    name: str  # the module path below its section, dots as underscores
    delta: LoraDelta


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA: its modules by their names in the file, matched to a model by :meth:`deltas`.

    ignored_keys: entries that belong to no LoRA module (training extras such as embeddings); they
    are logged when the file is read and otherwise left alone.
    """

    path: str
    modules: Mapping[str, _LoraModule]
    metadata: Mapping[str, str] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], path: str | os.PathLike[str] = "<state dict>",
        metadata: Mapping[str, str] | None = None,
    ) -> LoraFile:
        """Parse LoRA tensors already in memory (what :func:`kohya_state_dict` returns, or a file's contents).

        Raises :class:`LoraFormatError` naming ``path`` when the tensors are not a usable LoRA.
        """
        path = str(path)
        factors: dict[str, dict[str, Tensor]] = {}
        ignored: list[str] = []
        for key, tensor in state_dict.items():
            if _UNSUPPORTED.search(key):
                raise LoraFormatError(
                    path, f"key {key!r} belongs to a LyCORIS/DoRA variant that is not supported; "
                    "supported: LoRA and LoCon (lora_down/lora_up[/lora_mid], lora_A/lora_B)"
                )
            split = _split_key(key)
            if split is None:
                ignored.append(key)
                continue
            module, role = split
            if role in factors.setdefault(module, {}):
                raise LoraFormatError(path, f"module {module!r} has its {role} factor twice (key {key!r})")
            factors[module][role] = tensor
        peft_alpha = _peft_alphas(path, metadata or {})
        modules: dict[str, _LoraModule] = {}
        for source, parts in factors.items():
            section = _section(source)
            if section is None:
                ignored.extend(f"{source} ({role})" for role in parts)
                continue
            delta = _delta(path, source, parts)
            if delta.alpha is None:
                alpha = peft_alpha(source, delta.rank)
                if alpha is not None:
                    delta = LoraDelta(delta.source, delta.down, delta.up, delta.mid, alpha)
            modules[source] = _LoraModule(section[0], section[1], delta)
        if not modules:
            shown = ", ".join(repr(k) for k in list(state_dict)[:5]) + (", ..." if len(state_dict) > 5 else "")
            raise LoraFormatError(
                path, f"no LoRA modules found among its {len(state_dict)} keys ({shown}); "
                "expected kohya (lora_unet_*/lora_te*_* with lora_down/lora_up) or diffusers/PEFT "
                "(unet.*/transformer.*/text_encoder*.* with lora_A/lora_B) keys"
            )
        if ignored:
            logger.warning("%s: %d keys are not LoRA factors and are ignored (first: %s)",
                           path, len(ignored), ignored[0])
        return cls(path, modules, dict(metadata or {}), tuple(ignored))

    @property
    def family(self) -> str | None:
        """The model family the LoRA was made for ("sd1", "sd2", "sdxl", "sd3", "flux"; "flux2" for
        Flux.2, which this library does not run), None when the file does not say.

        From the training tools' metadata (``modelspec.architecture``, kohya's ``ss_base_model_version``),
        else from module names only one family has (Flux's ``double_blocks``/``single_blocks``/
        ``single_transformer_blocks``, SD3's ``joint_blocks``), else from its sections: of the U-Net
        families only SDXL LoRAs have two text encoders. Name matching cannot always tell: SD1 and SDXL
        share many layer names and some shapes (their CLIP-L is the same model), SD3 and Flux share
        diffusers' ``transformer_blocks`` names.
        """
        for key in ("modelspec.architecture", "ss_base_model_version"):
            value = self.metadata.get(key, "").lower()
            for marker, family in _FAMILY_MARKERS:
                if value.startswith(marker):
                    return family
        modules = self.modules.values()
        denoiser = [module.name for module in modules if module.section == "unet"]
        for start, family in _FAMILY_MODULE_STARTS:
            if any(name.startswith(start) for name in denoiser):
                return family
        sections = {module.section for module in modules}
        if sections & {"te3", "t5xxl"} or any(name.startswith(_TRANSFORMER_MODULE_START) for name in denoiser):
            return None  # SD3 or Flux
        # CLIP text encoders by position: two of them (or one beside a U-Net) is SDXL; Flux's kohya
        # files also call CLIP-L te1, and older ones call T5 (``encoder_block_...``) te2.
        clip_sections = {module.section for module in modules
                         if module.section in ("te1", "te2") and module.name.startswith("text_model_")}
        if "te2" in clip_sections or ("te1" in clip_sections and "unet" in sections):
            return "sdxl"
        return None

    @property
    def module_names(self) -> list[str]:
        """Every LoRA module in the file, by its name there (``lora_unet_..._to_q``, ``unet.down_blocks...to_q``)."""
        return list(self.modules)

    def deltas(
        self, target: str, params: Mapping[str, Tensor | Sequence[int]] | Collection[str]
    ) -> tuple[dict[str, LoraDelta], list[str]]:
        """Match the file's modules for ``target`` of a U-Net model (SD1, SD2, SDXL) to its parameters.

        target: ``unet`` or a text-encoder slot (``clip_l``, ``clip_h``, ``clip_g``).
        params: the model's parameter names, or better its state dict / name -> shape mapping, so
        that a module whose product has another shape (a LoRA for another architecture with the
        same layer names) counts as unmatched instead of failing when applied.
        Returns (parameter name -> delta, names of the file's modules for ``target`` that match nothing).
        SD3 and Flux models: :func:`.lora_transformers.match_lora`.
        """
        if target not in _SECTIONS_BY_TARGET:
            raise ValueError(f"unknown LoRA target {target!r}; expected one of {', '.join(TARGETS)}")
        names = list(params)
        by_name = _unet_resolver(names) if target == "unet" else weight_index(names).get

        def resolve(name: str) -> Placement | None:
            param = by_name(name)
            return None if param is None else Placement(param)

        shapes = _shapes_of(params) if isinstance(params, Mapping) else None
        matched, unmatched = self.match_modules(target, _SECTIONS_BY_TARGET[target], resolve, shapes)
        return matched, unmatched  # type: ignore[return-value]  # no rows: every delta is a LoraDelta

    def match_modules(
        self,
        target: str,
        sections: Collection[str],
        resolve: Callable[[str], Placement | None],
        shapes: Mapping[str, tuple[int, ...]] | None,
    ) -> tuple[dict[str, WeightLoraDelta], list[str]]:
        """Place the file's modules of ``sections`` on a model's parameters.

        resolve: module name below its section, dots as underscores -> where its product goes,
        None when the model has no such layer. shapes: parameter name -> shape; a module whose
        product does not fit its place counts as unmatched (required for placements with rows).
        Modules placed on rows of one weight become one :class:`FusedLoraDelta`.
        Returns (parameter name -> delta, names of the file's modules of ``sections`` that match nothing).
        Raises :class:`LoraFormatError` when two modules patch the same weight (rows).
        """
        pieces: dict[str, list[tuple[tuple[int, int] | None, LoraDelta]]] = {}
        unmatched: list[str] = []
        for source, module in self.modules.items():
            if module.section not in sections:
                continue
            place = resolve(module.name)
            delta = module.delta
            if place is not None and place.swap_halves:
                delta = _halves_swapped(delta)
            if place is None or (shapes is not None and not _fits_place(delta, place, shapes[place.param])):
                unmatched.append(source)
                continue
            if place.rows is not None and shapes is None:
                raise ValueError(f"placing {source!r} on rows of {place.param!r} needs the parameters' shapes")
            placed = pieces.setdefault(place.param, [])
            for rows, other in placed:
                if rows is None or place.rows is None or (rows[0] < place.rows[1] and place.rows[0] < rows[1]):
                    raise LoraFormatError(
                        self.path, f"modules {other.source!r} and {source!r} both patch {target} parameter "
                        f"{place.param!r}" + ("" if rows is None or place.rows is None else
                                              f" (rows {rows[0]}:{rows[1]} and {place.rows[0]}:{place.rows[1]})"),
                    )
            placed.append((place.rows, delta))
        matched: dict[str, WeightLoraDelta] = {}
        for param, placed in pieces.items():
            if len(placed) == 1 and placed[0][0] is None:
                matched[param] = placed[0][1]
            else:
                matched[param] = FusedLoraDelta(tuple(sorted(
                    ((rows[0], delta) for rows, delta in placed if rows is not None), key=lambda part: part[0])))
        if unmatched:
            logger.info("%s: %d of %d %s modules match no parameter (first: %s)", self.path, len(unmatched),
                        len(unmatched) + sum(len(placed) for placed in pieces.values()), target, unmatched[0])
        return matched, unmatched


def _fits_place(delta: LoraDelta, place: Placement, shape: tuple[int, ...]) -> bool:
    if place.rows is None:
        return delta.fits(shape)
    start, stop = place.rows
    return 0 <= start < stop <= shape[0] and delta.fits((stop - start, *shape[1:]))


def load_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA file: ``.safetensors``, or ``.pt``/``.ckpt``/... through ``torch.load(weights_only=True)``.

    Raises :class:`LoraFormatError` naming the file when it cannot be read or holds no usable LoRA.
    """
    try:
        weights = open_weights(Path(path))
        tensors = {name: weights.tensor(name) for name in weights.shapes()}
    except LoraFormatError:
        raise
    except CheckpointError as error:
        raise LoraFormatError(error.path, error.problem) from None
    return LoraFile.from_state_dict(tensors, path, weights.metadata)


def _split_key(key: str) -> tuple[str, str] | None:
    """key -> (module name in the file, factor role), None for a key that is no LoRA factor."""
    match = _PROCESSOR_KEY.match(key)
    if match:
        owner, layer, role = match.groups()
        # diffusers' attention output projection is a ModuleList whose first entry is the linear layer.
        return f"{owner}.{'to_out.0' if layer == 'to_out' else layer}", role
    match = _TEXT_PROCESSOR_KEY.match(key)
    if match:
        owner, layer, role = match.groups()
        return f"{owner}.{_CLIP_ATTENTION_LAYERS[layer]}", role
    match = _XLABS_KEY.match(key)
    if match:
        return match.group(1), match.group(2)
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _section(source: str) -> tuple[str, str] | None:
    """module name in the file -> (model section, underscored module path below it)."""
    for prefix, section in _KOHYA_PREFIXES.items():
        if source.startswith(prefix):
            return section, source[len(prefix):]
    for prefix, section in _DOTTED_PREFIXES.items():
        if source.startswith(prefix):
            return section, underscored(source[len(prefix):])
    if source.startswith(_BARE_UNET_STARTS):
        return "unet", underscored(source)
    return None


def _delta(path: str, source: str, parts: Mapping[str, Tensor]) -> LoraDelta:
    missing = [role for role in ("down", "up") if role not in parts]
    if missing:
        raise LoraFormatError(path, f"module {source!r} lacks its {' and '.join(missing)} factor")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    for role, tensor in parts.items():
        if role != "alpha" and not tensor.is_floating_point():
            raise LoraFormatError(
                path, f"module {source!r}: {role} factor has dtype {tensor.dtype}, expected a float type"
            )
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or any(size != 1 for size in up.shape[2:]):
        raise LoraFormatError(
            path, f"module {source!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not LoRA factors "
            "(expected down (r, in) or (r, in, kh, kw) and up (out, r) or (out, r, 1, 1))"
        )
    rank = down.shape[0]
    if mid is None:
        if up.shape[1] != rank:
            raise LoraFormatError(path, f"module {source!r}: down has rank {rank}, up has rank {up.shape[1]}")
    elif (mid.ndim != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != rank or down.ndim != 4
          or any(size != 1 for size in down.shape[2:])):
        raise LoraFormatError(
            path, f"module {source!r}: lora_mid {tuple(mid.shape)} does not join down {tuple(down.shape)} "
            f"and up {tuple(up.shape)} (expected down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1))"
        )
    alpha = None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(
                path, f"module {source!r}: alpha has shape {tuple(parts['alpha'].shape)}, expected a scalar"
            )
        alpha = float(parts["alpha"].item())
    return LoraDelta(source, down, up, mid, alpha)


def _shapes_of(params: Mapping[str, Tensor | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) if isinstance(value, Tensor) else tuple(value) for name, value in params.items()}


def weight_index(names: Collection[str]) -> dict[str, str]:
    """underscored module path (``double_blocks_0_img_attn_qkv``) -> its ``.weight`` parameter name."""
    return {underscored(name[: -len(".weight")]): name for name in names if name.endswith(".weight")}


def _peft_alphas(path: str, metadata: Mapping[str, str]) -> Callable[[str, int], float | None]:
    """source module name, rank -> alpha from PEFT's LoraConfig in diffusers' header entry, None without one.

    The config is per component (``transformer.lora_alpha``, ``text_encoder.alpha_pattern``, ...) in
    pipeline-saved files, unprefixed in files saved from one model (whose keys have no prefix).
    ``alpha_pattern`` keys name modules below the component, exactly or as a regular expression
    matching the end of the name (PEFT's rule); ``use_rslora`` scales by alpha / sqrt(rank).
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return lambda source, rank: None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraFormatError(path, f"header entry {PEFT_METADATA_KEY!r} is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise LoraFormatError(path, f"header entry {PEFT_METADATA_KEY!r} is not a JSON object")

    def alpha(source: str, rank: int) -> float | None:
        component, _, below = source.partition(".")
        if f"{component}.lora_alpha" in config:
            settings = {key[len(component) + 1:]: value for key, value in config.items()
                        if key.startswith(component + ".")}
            module = below
        elif "lora_alpha" in config:
            settings, module = config, source
        else:
            return None
        patterns = settings.get("alpha_pattern") or {}
        value = patterns.get(module)
        if value is None:
            for pattern, pattern_alpha in patterns.items():
                try:
                    if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                        value = pattern_alpha
                        break
                except re.error as error:
                    raise LoraFormatError(path, f"{PEFT_METADATA_KEY}: alpha_pattern {pattern!r}: {error}") from None
        try:
            value = float(settings["lora_alpha"] if value is None else value)
        except (TypeError, ValueError):
            raise LoraFormatError(path, f"{PEFT_METADATA_KEY}: alpha of {source!r} is not a number") from None
        # LoraDelta scales by alpha / rank; rsLoRA by alpha / sqrt(rank).
        return value * math.sqrt(rank) if settings.get("use_rslora") else value

    return alpha


@lru_cache(maxsize=16)
def _underscored_table(layout: unet_module.DiffusersUNetLayout, levels: int) -> dict[str, str]:
    return _probed(layout, levels).underscored_to_ldm()


def _unet_resolver(names: Collection[str]) -> Callable[[str], str | None]:
    """A function from an underscored module path (LDM or diffusers naming) to our U-Net parameter name."""
    index = weight_index(names)
    found = _layout_of_names(names)
    table = _underscored_table(*found) if found else {}

    def resolve(name: str) -> str | None:
        if name in index:
            return index[name]
        if name in table:
            return index.get(underscored(table[name]))
        # An attention-block prefix ends at an underscore; what follows keeps its name in LDM.
        for position, char in enumerate(name):
            if char == "_" and name[: position + 1] in table:
                return index.get(underscored(table[name[: position + 1]]) + name[position + 1:])
        return None

    return resolve
