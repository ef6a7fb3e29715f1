"""Transformer diffusion checkpoints (SD3/SD3.5 MMDiT, Flux.1): the network with whatever VAE and text encoders the file carries.

Files come as the whole model (``model.diffusion_model.`` + ``first_stage_model.``/``vae.`` +
``text_encoders.<slot>.transformer.``), as the diffusion model alone (bare keys or the same
prefix; ComfyUI's ``models/diffusion_models``), or as a diffusers folder (``transformer/``,
``vae/``, ``text_encoder*/``). Text encoders may also come from their own files
(:func:`load_text_encoder_file`). The network runs in the flow-matching parameterisation: it
predicts the velocity ``noise - x0`` at noise level sigma in [0, 1].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..networks import flux as flux_module
from ..networks import mmdit as mmdit_module
from ..vae import autoencoder as vae_module
from ..weights.files import DiffusersFolder, WeightFile
from ..weights.loading import StateDictMismatchError, WrongModelKindError, instantiate, key_list, target_device_dtype
from .detection import (
    TEXT_ENCODER_SLOTS,
    ComponentKeys,
    Detection,
    FileKind,
    ModelFamily,
    component_errors,
    open_source,
    original_shapes,
    to_original_keys,
)
from .parts import (
    finish_stored,
    folder_activation,
    load_clip_component,
    load_t5_component,
    load_vae_component,
    stored_component,
)
from .stable_diffusion import LatentFormat

logger = logging.getLogger(__name__)

# Every SD3 and Flux VAE is f8.
_DOWNSCALE = 8


@dataclass(frozen=True)
class TransformerFamily:
    """How to build one transformer denoiser from its original-layout shapes.

    from_diffusers_config: what a diffusers folder's ``transformer/config.json`` says that the
    shapes cannot (keyword arguments for `config_from_shapes`).
    """

    config_from_shapes: Callable[..., object]
    build: Callable[[object], nn.Module]
    from_diffusers_config: Callable[[Mapping[str, object]], dict[str, object]] = lambda config: {}


def _flux_rope_axes(config: Mapping[str, object]) -> dict[str, object]:
    axes = config.get("axes_dims_rope")
    return {"axes_dim": tuple(axes)} if isinstance(axes, (list, tuple)) else {}  # type: ignore[arg-type]


TRANSFORMER_FAMILIES: Mapping[str, TransformerFamily] = {
    "mmdit": TransformerFamily(mmdit_module.mmdit_config_from_shapes, mmdit_module.MMDiT),  # type: ignore[arg-type]
    "flux": TransformerFamily(flux_module.flux_config_from_shapes, flux_module.Flux, _flux_rope_axes),  # type: ignore[arg-type]
}


@dataclass
class LoadedTransformer:
    """A loaded transformer diffusion model and what its file carried besides.

    network: the denoiser (:class:`~nodegraph_diffusion.networks.mmdit.MMDiT` or
    :class:`~nodegraph_diffusion.networks.flux.Flux`); text_encoders: slot (``clip_l``,
    ``clip_g``, ``t5xxl``) -> encoder, in conditioning order; vae: None when the file has none.
    """

    path: str
    detection: Detection
    family: ModelFamily
    network: nn.Module
    network_config: object
    latent_format: LatentFormat
    vae: vae_module.AutoencoderKL | None = None
    text_encoders: dict[str, nn.Module] = field(default_factory=dict)
    unexpected_keys: list[str] = field(default_factory=list)


def _latent_format(family: ModelFamily, channels: int, vae_config: vae_module.VAEConfig | None) -> LatentFormat:
    if vae_config is not None:
        return LatentFormat(vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor,
                            vae_config.downscale_factor)
    scaling = vae_module.latent_scaling_for(family.latent_family)
    return LatentFormat(channels, scaling.scaling_factor, scaling.shift_factor, _DOWNSCALE)


# OpenAI's CLIP-L is 768 wide; OpenCLIP ViT-H (1024) and bigG (1280) are wider.
_OPENAI_CLIP_WIDTH = 768


def _is_openclip_in_hf_names(source: WeightFile, slot: str, keys: ComponentKeys) -> bool:
    """CLIP-G (OpenCLIP bigG, trained with exact GELU) stored in transformers' naming, as SD3 files and
    ComfyUI's clip_g.safetensors keep it. A lone CLIP file is told by its width."""
    if keys.layout != "hf":
        return False
    if slot != "text_encoder":
        return slot == "clip_g"
    widths = [shape[1] for key, shape in source.shapes().items()
              if key.startswith(keys.prefix) and key.endswith("embeddings.token_embedding.weight")]
    return bool(widths) and widths[0] > _OPENAI_CLIP_WIDTH


def load_text_encoder_component(
    source: WeightFile, detection: Detection, slot: str, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool,
) -> tuple[nn.Module, list[str]]:
    """One text encoder of any kind (CLIP in either naming, T5) from where `keys` says it lies."""
    if keys.layout == "t5":
        module, _, unexpected = load_t5_component(source, detection, slot, keys, device, dtype, strict)
        return module, unexpected
    activation = folder_activation(source, keys) or ("gelu" if _is_openclip_in_hf_names(source, slot, keys) else None)
    module, _, unexpected = load_clip_component(source, detection, slot, keys, device, dtype, strict, activation)
    return module, unexpected


def load_transformer(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedTransformer:
    """Load an SD3 or Flux model file or diffusers folder: the network, and the VAE and text encoders it carries."""
    source, detection = open_source(path)
    component = detection.denoiser
    if detection.kind not in (FileKind.CHECKPOINT, FileKind.DIFFUSION_MODEL) or component not in TRANSFORMER_FAMILIES:
        raise WrongModelKindError(detection.path, f"expected an SD3 or Flux model, but this is {detection.describe()}")
    assert detection.family is not None
    if detection.unclaimed_keys and strict:
        raise StateDictMismatchError(
            detection.path, f"{len(detection.unclaimed_keys)} key(s) belong to no component: "
            f"{key_list(list(detection.unclaimed_keys))} (pass strict=False to load anyway)")
    unexpected = list(detection.unclaimed_keys)
    keys = detection.components[component]
    family_spec = TRANSFORMER_FAMILIES[component]
    extra_config = {}
    if isinstance(source, DiffusersFolder):
        extra_config = family_spec.from_diffusers_config(source.configs.get(keys.prefix.rstrip("/"), {}))
    with component_errors(detection.path, component):
        config = family_spec.config_from_shapes(original_shapes(source.shapes(), component, keys, detection.path),
                                                **extra_config)
    target_device, target_dtype = target_device_dtype(device, dtype, "unet")
    # fp8 files (most Flux downloads) stay fp8 in memory; layers upcast one at a time when they run.
    state_dict, scales = stored_component(source, keys, target_device, target_dtype, detection.path)
    state_dict = to_original_keys(component, keys, state_dict, detection.path)
    network, extra = instantiate(lambda: family_spec.build(config), state_dict, component, detection.path, strict)
    finish_stored(network, target_dtype, scales)
    unexpected += extra

    vae = vae_config = None
    if "vae" in detection.components:
        vae, vae_config, extra = load_vae_component(
            source, detection, detection.components["vae"], detection.family, device, dtype, strict)
        unexpected += extra
    text_encoders: dict[str, nn.Module] = {}
    for slot, slot_keys in detection.components.items():
        if slot in TEXT_ENCODER_SLOTS:
            text_encoders[slot], extra = load_text_encoder_component(
                source, detection, slot, slot_keys, device, dtype, strict)
            unexpected += extra
    latent_format = _latent_format(detection.family, config.out_channels, vae_config)  # type: ignore[attr-defined]
    logger.info("%s: %s", detection.path, detection.describe())
    return LoadedTransformer(detection.path, detection, detection.family, network, config, latent_format, vae,
                             text_encoders, unexpected)


def load_text_encoder_file(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> dict[str, nn.Module]:
    """The text encoders of a text-encoder file (``models/text_encoders``, ``models/clip``) or of a
    checkpoint's ``text_encoders.*`` part, keyed by slot. A lone CLIP file's slot is ``text_encoder``
    (which CLIP it is, the caller knows from where it goes); a T5 file's is ``t5xxl``."""
    source, detection = open_source(path)
    slots = {slot: keys for slot, keys in detection.components.items()
             if slot in TEXT_ENCODER_SLOTS or slot == "text_encoder"}
    if not slots:
        raise WrongModelKindError(detection.path, f"expected a text encoder, but this is {detection.describe()}")
    return {slot: load_text_encoder_component(source, detection, slot, keys, device, dtype, strict)[0]
            for slot, keys in slots.items()}
