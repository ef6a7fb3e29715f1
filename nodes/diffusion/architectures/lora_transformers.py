"""LoRA files for the transformer denoisers (SD3/SD3.5 MMDiT, Flux.1) and text encoders, on this library's weights.

The networks keep the original single-file layouts, which fuse layers that diffusers keeps
apart: q, k and v in one ``qkv`` weight (rows q, k, v), and in Flux's single blocks q, k, v and
the MLP input in one ``linear1``. A LoRA module trained on one of diffusers' separate layers
patches its rows of the fused weight (:class:`~.lora.FusedLoraDelta`); an adaLN projection that
diffusers stores as (scale, shift) and the original as (shift, scale) gets its product's halves
exchanged. The formats read (factors ``lora_down``/``lora_up`` or ``lora_A``/``lora_B``, scale
``alpha / rank`` as :mod:`.lora` describes):

- kohya sd-scripts / ComfyUI, original names: ``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1`` (Flux), ``lora_unet_joint_blocks_0_x_block_attn_qkv``
  (SD3); ``diffusion_model.double_blocks.0.img_attn.qkv`` (ComfyUI, BFL's names). A fused weight
  is patched whole.
- diffusers / PEFT names (ai-toolkit, diffusers' trainers, SimpleTuner, OneTrainer):
  ``transformer.transformer_blocks.0.attn.to_q``, ``transformer.single_transformer_blocks.0.proj_mlp``;
  the same under ``base_model.model.``, bare (``save_lora_adapter``), under ``lora_unet_`` (ai-toolkit's
  kohya-style export), ``lora_transformer_`` (OneTrainer) or ``lycoris_`` (SimpleTuner) with
  underscores.
- XLabs (Flux): ``double_blocks.0.processor.qkv_lora1`` / ``proj_lora1`` (image stream),
  ``qkv_lora2`` / ``proj_lora2`` (text stream), ``single_blocks.0.processor.qkv_lora`` (the q, k, v
  rows of ``linear1``).
- text encoders: CLIP-L ``lora_te1_`` / ``lora_te_`` / ``text_encoder.`` /
  ``text_encoders.clip_l.transformer.``; SD3's CLIP-G ``lora_te2_`` / ``text_encoder_2.``; T5
  ``lora_te3_`` (sd-scripts) and ``text_encoder_3.`` (SD3) or ``text_encoder_2.`` (Flux); sd-scripts'
  older Flux files and OneTrainer's call Flux's T5 ``lora_te2_``; ComfyUI's
  ``text_encoders.t5xxl.transformer.``.

diffusers' module names come from the networks' own diffusers key mappings (Flux's
:func:`~..networks.flux.flux_diffusers_sources`, MMDiT's renaming tables); nothing here spells them
a second time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..networks import flux as flux_module
from ..networks import mmdit as mmdit_module
from .detection import ModelFamily
from .lora import LoraFile, Placement, WeightLoraDelta, underscored, weight_index

DIFFUSION_MODEL = "diffusion_model"

# target -> the file sections that feed it (as lora.py names them: "unet" = the denoiser in any
# naming, "te*" = a text encoder by the training tool's count, or by its slot).
_SECTIONS_BY_FAMILY: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "sd3": {
        DIFFUSION_MODEL: ("unet",),
        "clip_l": ("te", "te1", "clip_l"),
        "clip_g": ("te2", "clip_g"),
        "t5xxl": ("te3", "t5xxl"),
    },
    "flux": {
        DIFFUSION_MODEL: ("unet",),
        "clip_l": ("te", "te1", "clip_l"),
        "t5xxl": ("te2", "te3", "t5xxl"),
    },
}
# The model families whose LoRAs match here (the others' through LoraFile.deltas).
TRANSFORMER_FAMILIES = frozenset(family for family in ModelFamily if family.latent_family in _SECTIONS_BY_FAMILY)

Shapes = Mapping[str, tuple[int, ...]]
# our weight parameter -> the diffusers modules it is made of, in row order
DiffusersPlan = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class LoraMatch:
    """A LoRA file matched to one model's parts.

    deltas: target (``diffusion_model``, ``clip_l``, ``clip_g``, ``t5xxl``) -> parameter name -> delta,
    for every target asked about (empty when nothing matched it). used: the file's modules that
    patch something; unmatched: the file's modules that patch nothing among the targets asked about
    (a module for a text encoder that was not given, a layer the model does not have, a shape
    that does not fit), by their names in the file.
    """

    deltas: dict[str, dict[str, WeightLoraDelta]]
    used: tuple[str, ...]
    unmatched: tuple[str, ...]


def match_lora(
    lora: LoraFile,
    family: ModelFamily | str,
    targets: Mapping[str, Mapping[str, Tensor | Sequence[int]]],
) -> LoraMatch:
    """Match ``lora`` to the parts of an SD3 or Flux model.

    family: the model's family (``ModelFamily.SD3``, ``FLUX``, ``FLUX_SCHNELL`` or their values).
    targets: part -> its state dict (or parameter name -> shape): ``diffusion_model`` (the MMDiT or
    Flux network) and any of the family's text-encoder slots (SD3: ``clip_l``, ``clip_g``,
    ``t5xxl``; Flux: ``clip_l``, ``t5xxl``). Apply ``deltas[part]`` with
    :func:`~..weights.patching.patched` (a ``WeightPatches`` entry) on that part.
    Raises ``ValueError`` for a family or target that is not one of these, and
    :class:`~.lora.LoraFormatError` when two modules of the file patch the same rows.
    """
    deltas = {target: transformer_deltas(lora, family, target, params)[0] for target, params in targets.items()}
    used = {source for per_target in deltas.values() for delta in per_target.values() for source in delta.sources}
    unmatched = tuple(name for name in lora.module_names if name not in used)
    return LoraMatch(deltas, tuple(name for name in lora.module_names if name in used), unmatched)


def transformer_deltas(
    lora: LoraFile,
    family: ModelFamily | str,
    target: str,
    params: Mapping[str, Tensor | Sequence[int]],
) -> tuple[dict[str, WeightLoraDelta], list[str]]:
    """The file's modules for one ``target`` of an SD3 or Flux model, placed on its parameters.

    Like :meth:`~.lora.LoraFile.deltas` for U-Net models; ``params`` must carry shapes (a state
    dict or name -> shape), since a module on a fused weight is placed by rows.
    Returns (parameter name -> delta, names of the file's modules for ``target`` that match nothing).
    """
    sections = _sections(family)
    if target not in sections:
        raise ValueError(
            f"a {ModelFamily(family).label} model has no LoRA target {target!r}; expected one of {', '.join(sections)}"
        )
    shapes = {name: tuple(value.shape) if isinstance(value, Tensor) else tuple(value) for name, value in params.items()}
    if target == DIFFUSION_MODEL:
        resolve = _denoiser_resolver(ModelFamily(family).latent_family, shapes)
    else:
        index = weight_index(shapes)

        def resolve(name: str) -> Placement | None:
            param = index.get(name)
            return None if param is None else Placement(param)

    return lora.match_modules(target, sections[target], resolve, shapes)


def _sections(family: ModelFamily | str) -> Mapping[str, tuple[str, ...]]:
    try:
        key = ModelFamily(family).latent_family
    except ValueError:
        raise ValueError(f"unknown model family {family!r}") from None
    if key not in _SECTIONS_BY_FAMILY:
        raise ValueError(
            f"{ModelFamily(family).label} is not a transformer family (SD3, Flux); "
            "its LoRAs match through LoraFile.deltas"
        )
    return _SECTIONS_BY_FAMILY[key]


# --------------------------------------------------------------------------- the denoisers


def _denoiser_resolver(family: str, shapes: Shapes) -> Callable[[str], Placement | None]:
    """underscored module name -> placement on an MMDiT or Flux network's parameters.

    Original names (kohya, ComfyUI), XLabs' (Flux), then diffusers'; the namings share no module
    name but ``context_embedder``, which is the same layer in both.
    """
    index = weight_index(shapes)
    plan, swapped = _mmdit_plan(shapes) if family == "sd3" else _flux_plan(shapes)
    diffusers = _diffusers_placements(plan, swapped, shapes)

    def resolve(name: str) -> Placement | None:
        param = index.get(name)
        if param is not None:
            return Placement(param)
        if family == "flux":
            xlabs = _xlabs_placement(name, shapes)
            if xlabs is not None:
                return xlabs
        return diffusers.get(name)

    return resolve


def _diffusers_placements(plan: DiffusersPlan, swapped: Collection[str], shapes: Shapes) -> dict[str, Placement]:
    """underscored diffusers module -> where it lies among our parameters."""
    table: dict[str, Placement] = {}
    for param, sources in plan.items():
        if param not in shapes or len(shapes[param]) < 2:
            continue  # a norm's scale, or a layer this model does not have (guidance_in in schnell)
        rows = _fused_rows(shapes[param], len(sources))
        if rows is None:
            continue
        for source, part in zip(sources, rows):
            table[underscored(source)] = Placement(param, part, param in swapped)
    return table


def _fused_rows(shape: tuple[int, ...], count: int) -> list[tuple[int, int] | None] | None:
    """The rows of each of ``count`` layers fused, in order, into a weight of ``shape`` (out, in, ...).

    Every fused layer of these layouts but the last is a q, k or v projection as wide as the
    layer's input; the last (v, or the MLP input of a Flux single block) takes the remaining rows.
    None when the shape leaves the last layer nothing.
    """
    if count == 1:
        return [None]
    out, width = shape[0], shape[1]
    if out <= (count - 1) * width:
        return None
    bounds = [index * width for index in range(count)] + [out]
    return [(bounds[index], bounds[index + 1]) for index in range(count)]


def _block_indices(shapes: Shapes, pattern: re.Pattern[str]) -> list[int]:
    return sorted({int(match.group(1)) for name in shapes if (match := pattern.match(name))})


_JOINT_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")
# mmdit_keys_from_diffusers swaps the halves of these (diffusers' (scale, shift) adaLN order).
_MMDIT_SWAPPED_FINAL = "final_layer.adaLN_modulation.1.weight"
_MMDIT_CONTEXT_MODULATION = "joint_blocks.{}.context_block.adaLN_modulation.1.weight"
_MMDIT_CONTEXT_PROJ = "joint_blocks.{}.context_block.attn.proj.weight"


def _mmdit_plan(shapes: Shapes) -> tuple[DiffusersPlan, frozenset[str]]:
    """MMDiT weights -> diffusers' ``SD3Transformer2DModel`` modules, from mmdit's renaming tables;
    and the weights whose halves diffusers stores swapped: the final adaLN and the context adaLN
    of a pre-only block (one without a context ``attn.proj``), as :func:`mmdit_keys_from_diffusers` does."""
    plan: DiffusersPlan = {
        f"{ours}.weight": (theirs,) for theirs, ours in mmdit_module._DIFFUSERS_TOP_LEVEL.items()
    }
    blocks = _block_indices(shapes, _JOINT_BLOCK)
    for block in blocks:
        ours_prefix, theirs_prefix = f"joint_blocks.{block}.", f"transformer_blocks.{block}."
        for theirs, ours in mmdit_module._DIFFUSERS_BLOCK.items():
            plan[f"{ours_prefix}{ours}.weight"] = (theirs_prefix + theirs,)
        for group, ours in mmdit_module._DIFFUSERS_FUSED_QKV.items():
            plan[f"{ours_prefix}{ours}.weight"] = tuple(theirs_prefix + theirs for theirs in group)
    swapped = {_MMDIT_SWAPPED_FINAL} | {
        _MMDIT_CONTEXT_MODULATION.format(block) for block in blocks if _MMDIT_CONTEXT_PROJ.format(block) not in shapes
    }
    return plan, frozenset(swapped)


_DOUBLE_BLOCK = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE_BLOCK = re.compile(r"^single_blocks\.(\d+)\.")


def _flux_plan(shapes: Shapes) -> tuple[DiffusersPlan, frozenset[str]]:
    """Flux weights -> diffusers' ``FluxTransformer2DModel`` modules, from :func:`flux_diffusers_sources`
    asked about every diffusers layer of a model with this many blocks; and :data:`SWAPPED_HALVES`."""
    layers = list(flux_module._TOP_LEVEL.values())
    layers += [
        tuple(f"transformer_blocks.{block}.{source}" for source in sources)
        for block in range(len(_block_indices(shapes, _DOUBLE_BLOCK)))
        for sources in flux_module._DOUBLE_BLOCK.values()
    ]
    layers += [
        tuple(f"single_transformer_blocks.{block}.{source}" for source in sources)
        for block in range(len(_block_indices(shapes, _SINGLE_BLOCK)))
        for sources in flux_module._SINGLE_BLOCK.values()
    ]
    keys = [f"{source}.weight" for sources in layers for source in sources]
    plan = {
        target: tuple(source[: -len(".weight")] for source in sources)
        for target, sources in flux_module.flux_diffusers_sources(keys).items()
        if target.endswith(".weight")
    }
    return plan, flux_module.SWAPPED_HALVES


# XLabs' processors: (layer, stream) -> the double block's module; stream 1 = image, 2 = text.
_XLABS_NAME = re.compile(r"^(double|single)_blocks_(\d+)_processor_(qkv|proj)_lora(\d?)$")
_XLABS_DOUBLE = {
    ("qkv", "1"): "img_attn.qkv", ("proj", "1"): "img_attn.proj",
    ("qkv", "2"): "txt_attn.qkv", ("proj", "2"): "txt_attn.proj",
}


def _xlabs_placement(name: str, shapes: Shapes) -> Placement | None:
    """An XLabs processor module on a Flux weight. A single block's ``qkv_lora`` adds to the q, k, v
    part of ``linear1``'s output; its ``proj_lora`` has no one weight here to go to (None)."""
    match = _XLABS_NAME.match(name)
    if not match:
        return None
    kind, block, layer, stream = match.groups()
    if kind == "double":
        module = _XLABS_DOUBLE.get((layer, stream))
        param = f"double_blocks.{block}.{module}.weight"
        return Placement(param) if module is not None and param in shapes else None
    param = f"single_blocks.{block}.linear1.weight"
    if layer != "qkv" or stream or param not in shapes:
        return None
    width = shapes[param][1]
    return Placement(param, (0, 3 * width))
