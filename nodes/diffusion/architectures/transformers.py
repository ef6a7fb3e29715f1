"""Transformer diffusion checkpoints (SD3/SD3.5 MMDiT, Flux.1, DiT, PixArt-α/Σ): the network with whatever VAE
and text encoders the file carries.

Files come as the whole model (``model.diffusion_model.`` + ``first_stage_model.``/``vae.`` +
``text_encoders.<slot>.transformer.``), as the diffusion model alone (bare keys or the same
prefix; ComfyUI's ``models/diffusion_models``), or as a diffusers folder (``transformer/``,
``vae/``, ``text_encoder*/``). Text encoders may also come from their own files
(:func:`load_text_encoder_file`). SD3 and Flux run in the flow-matching parameterisation: they
predict the velocity ``noise - x0`` at noise level sigma in [0, 1]. DiT and PixArt are discrete-time
eps models on the linear beta schedule (1e-4 to 0.02, 1000 steps) with a learned variance beside the
eps; their released files hold the network alone (DiT's ``.pt``, PixArt's ``.pth``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..networks import dit as dit_module
from ..networks import flux as flux_module
from ..networks import mmdit as mmdit_module
from ..networks import pixart as pixart_module
from ..sampling.model_sampling import ModelSampling, Prediction
from ..sampling.schedules import linear_discrete_schedule
from ..text import clip as clip_module
from ..vae import autoencoder as vae_module
from ..weights.files import DiffusersFolder, WeightFile
from ..weights.loading import StateDictMismatchError, WrongModelKindError, instantiate, key_list, target_device_dtype
from ..weights.storage import compute_in
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
    text_encoder_shapes,
)
from .stable_diffusion import LatentFormat

logger = logging.getLogger(__name__)

# Every SD3 and Flux VAE is f8.
_DOWNSCALE = 8


@dataclass(frozen=True)
class TransformerFamily:
    """How to build one transformer denoiser from its original-layout shapes.

    from_diffusers_config: (a diffusers folder's ``transformer/config.json``, the detected family)
    -> what they say that the shapes cannot (keyword arguments for `config_from_shapes`).
    """

    config_from_shapes: Callable[..., object]
    build: Callable[[object], nn.Module]
    from_diffusers_config: Callable[[Mapping[str, object], ModelFamily], dict[str, object]] = (
        lambda config, family: {})


def _flux_rope_axes(config: Mapping[str, object], family: ModelFamily) -> dict[str, object]:
    axes = config.get("axes_dims_rope")
    return {"axes_dim": tuple(axes)} if isinstance(axes, (list, tuple)) else {}  # type: ignore[arg-type]


def _config_int(config: Mapping[str, object], key: str) -> dict[str, object]:
    value = config.get(key)
    return {} if value is None else {key: int(value)}  # type: ignore[call-overload]


def _dit_diffusers_config(config: Mapping[str, object], family: ModelFamily) -> dict[str, object]:
    # diffusers keeps no positional table, whose grid gives the trained size in original files.
    extra = _config_int(config, "sample_size")
    if config.get("num_attention_heads") is not None:
        extra["num_heads"] = int(config["num_attention_heads"])  # type: ignore[call-overload]
    return extra


# T5 tokens a PixArt prompt is padded to in training (diffusers' pipelines: max_sequence_length).
PIXART_T5_TOKENS = {ModelFamily.PIXART_ALPHA: pixart_module.ALPHA_TOKENS,
                    ModelFamily.PIXART_SIGMA: pixart_module.SIGMA_TOKENS}


def _pixart_diffusers_config(config: Mapping[str, object], family: ModelFamily) -> dict[str, object]:
    extra = _dit_diffusers_config(config, family)
    extra["max_token_length"] = PIXART_T5_TOKENS[family]
    sample_size = extra.get("sample_size")
    if isinstance(sample_size, int):
        # What diffusers' PixArtTransformer2DModel takes when config.json leaves the scale out.
        scale = config.get("interpolation_scale")
        extra["interpolation_scale"] = float(scale) if scale is not None else max(sample_size // 64, 1)  # type: ignore[arg-type]
    return extra


TRANSFORMER_FAMILIES: Mapping[str, TransformerFamily] = {
    "mmdit": TransformerFamily(mmdit_module.mmdit_config_from_shapes, mmdit_module.MMDiT),  # type: ignore[arg-type]
    "flux": TransformerFamily(flux_module.flux_config_from_shapes, flux_module.Flux, _flux_rope_axes),  # type: ignore[arg-type]
    "dit": TransformerFamily(dit_module.dit_config_from_shapes, dit_module.DiT, _dit_diffusers_config),  # type: ignore[arg-type]
    "pixart": TransformerFamily(pixart_module.pixart_config_from_shapes, pixart_module.PixArt,  # type: ignore[arg-type]
                                _pixart_diffusers_config),
}


def model_sampling_for(family: ModelFamily) -> ModelSampling:
    """How a transformer family is driven unless a graph says otherwise (ComfyUI's defaults, which
    ModelSamplingSD3 / ModelSamplingFlux change): SD3 a constant shift of 3 with timesteps sigma * 1000;
    Flux.1-dev Flux's resolution shift at 1024x1024 (mu 1.15); Flux.1-schnell no shift. Flux takes
    sigma itself (multiplier 1). DiT and PixArt: eps on the linear beta schedule (ComfyUI's
    "sqrt_linear" 1e-4..0.02), timesteps 0..999 as trained."""
    if family in (ModelFamily.DIT, ModelFamily.PIXART_ALPHA, ModelFamily.PIXART_SIGMA):
        return ModelSampling(linear_discrete_schedule(), Prediction.EPS)
    if family is ModelFamily.SD3:
        return ModelSampling.flow(shift=3.0, multiplier=1000.0)
    if family is ModelFamily.FLUX:
        return ModelSampling.flux(mu=1.15, multiplier=1.0)
    if family is ModelFamily.FLUX_SCHNELL:
        return ModelSampling.flow(shift=1.0, multiplier=1.0)
    raise ValueError(f"{family.label} is not a transformer family")


@dataclass
class LoadedTransformer:
    """A loaded transformer diffusion model and what its file carried besides.

    network: the denoiser (:class:`~nodegraph_diffusion.networks.mmdit.MMDiT`,
    :class:`~nodegraph_diffusion.networks.flux.Flux`, :class:`~nodegraph_diffusion.networks.dit.DiT`
    or :class:`~nodegraph_diffusion.networks.pixart.PixArt`); text_encoders: slot (``clip_l``,
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

    @property
    def sampling(self) -> ModelSampling:
        """The family's default model sampling (:func:`model_sampling_for`)."""
        return model_sampling_for(self.family)


def _latent_channels(config: object) -> int:
    """The latent width a network samples: its output's, but a learned-sigma output (DiT, PixArt) is twice it."""
    if getattr(config, "learn_sigma", False):
        return config.in_channels  # type: ignore[attr-defined]
    return config.out_channels  # type: ignore[attr-defined]


def _latent_format(family: ModelFamily, channels: int, vae_config: vae_module.VAEConfig | None) -> LatentFormat:
    if vae_config is not None:
        return LatentFormat(vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor,
                            vae_config.downscale_factor)
    scaling = vae_module.latent_scaling_for(family.latent_family)
    return LatentFormat(channels, scaling.scaling_factor, scaling.shift_factor, _DOWNSCALE)


# OpenAI's CLIP-L is 768 wide; OpenCLIP ViT-H (1024) and bigG (1280) are wider.
_OPENAI_CLIP_WIDTH = 768
_OPENCLIP_H_WIDTH = 1024
_OPENCLIP_SLOTS = ("clip_h", "clip_g")


def _is_openclip_in_hf_names(source: WeightFile, slot: str, keys: ComponentKeys) -> bool:
    """CLIP-G (OpenCLIP bigG, trained with exact GELU) stored in transformers' naming, as SD3 files and
    ComfyUI's clip_g.safetensors keep it. A lone CLIP file is told by its width."""
    if keys.layout != "hf":
        return False
    if slot != "text_encoder":
        return slot in _OPENCLIP_SLOTS
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
    storage_dtype: torch.dtype | None = None,
) -> LoadedTransformer:
    """Load an SD3, Flux, DiT or PixArt model file or diffusers folder: the network, and the VAE and
    text encoders it carries.

    storage_dtype: keep the network's weights in this dtype (``torch.float8_e4m3fn``: a quarter of
    float32's memory), each layer upcast to the compute dtype when it runs; None keeps fp8 files as
    stored and converts the rest to the compute dtype.
    """
    source, detection = open_source(path)
    component = detection.denoiser
    if detection.kind not in (FileKind.CHECKPOINT, FileKind.DIFFUSION_MODEL) or component not in TRANSFORMER_FAMILIES:
        raise WrongModelKindError(detection.path, "expected a transformer model (SD3, Flux, DiT, PixArt), but this is "
                                                  f"{detection.describe()}")
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
        extra_config = family_spec.from_diffusers_config(source.configs.get(keys.prefix.rstrip("/"), {}),
                                                         detection.family)
    with component_errors(detection.path, component):
        config = family_spec.config_from_shapes(original_shapes(source.shapes(), component, keys, detection.path),
                                                **extra_config)
    target_device, target_dtype = target_device_dtype(device, dtype, "unet")
    # fp8 files (most Flux downloads) stay fp8 in memory; layers upcast one at a time when they run.
    state_dict, scales = stored_component(source, keys, target_device, storage_dtype or target_dtype, detection.path)
    state_dict = to_original_keys(component, keys, state_dict, detection.path)
    network, extra = instantiate(lambda: family_spec.build(config), state_dict, component, detection.path, strict)
    if storage_dtype is not None and storage_dtype != target_dtype:
        compute_in(network, target_dtype, scales)
    else:
        finish_stored(network, target_dtype, scales)
    unexpected += extra

    vae = vae_config = None
    if "vae" in detection.components:
        vae, vae_config, extra = load_vae_component(
            source, detection, detection.components["vae"], detection.family, device, dtype, strict,
            network_channels=config.out_channels)  # type: ignore[attr-defined]
        unexpected += extra
    text_encoders: dict[str, nn.Module] = {}
    for slot, slot_keys in detection.components.items():
        if slot in TEXT_ENCODER_SLOTS:
            text_encoders[slot], extra = load_text_encoder_component(
                source, detection, slot, slot_keys, device, dtype, strict)
            unexpected += extra
    latent_format = _latent_format(detection.family, _latent_channels(config), vae_config)
    logger.info("%s: %s", detection.path, detection.describe())
    return LoadedTransformer(detection.path, detection, detection.family, network, config, latent_format, vae,
                             text_encoders, unexpected)


class TextEncoderSetError(ValueError):
    """Text-encoder files that cannot be used together (two of one kind, CLIP towers that cannot be told apart)."""


@dataclass(frozen=True)
class TextEncoderFile:
    """What a text-encoder file holds, read from its header.

    components: component name -> where its keys are: the slot a file names itself (``t5xxl``, or
    ``clip_l``/``clip_g`` in a checkpoint's ``text_encoders.*``), ``text_encoder`` for a lone CLIP
    tower. clip_size: (width, layers) of the lone CLIP tower, None when there is none.
    """

    path: str
    detection: Detection
    components: dict[str, ComponentKeys]
    clip_size: tuple[int, int] | None = None


def read_text_encoder_file(path: str | os.PathLike[str] | WeightFile) -> TextEncoderFile:
    """What the text-encoder file (or checkpoint) at `path` holds; raises WrongModelKindError when it holds none."""
    source, detection = open_source(path)
    components = {name: keys for name, keys in detection.components.items()
                  if name in TEXT_ENCODER_SLOTS or name == "text_encoder"}
    if not components:
        raise WrongModelKindError(detection.path, f"expected a text encoder, but this is {detection.describe()}")
    size = None
    if "text_encoder" in components:
        with component_errors(detection.path, "text_encoder"):
            config = clip_module.text_encoder_config_from_shapes(
                text_encoder_shapes(source.shapes(), components["text_encoder"]))
        size = (config.width, config.layers)
    return TextEncoderFile(detection.path, detection, components, size)


def _lone_clip_slot(width: int) -> str:
    """Which CLIP a lone tower is by its width: OpenAI ViT-L (768 or less), OpenCLIP ViT-H, else bigG."""
    if width <= _OPENAI_CLIP_WIDTH:
        return "clip_l"
    return "clip_h" if width == _OPENCLIP_H_WIDTH else "clip_g"


def assign_text_encoder_slots(files: Sequence[TextEncoderFile]) -> list[dict[str, str]]:
    """The slot each component of each file fills when the files are used together (ComfyUI's
    DualCLIPLoader / TripleCLIPLoader): -> per file, component name -> slot.

    T5 files fill ``t5xxl`` and slots a file names itself are kept. Lone CLIP towers are told
    apart by size: of two, the wider (then the deeper) is CLIP-G and the other CLIP-L, as bigG is
    to ViT-L; a single one is CLIP-L up to 768 wide, CLIP-H at 1024, else CLIP-G. Raises
    TextEncoderSetError naming the files when two fill one slot, two CLIPs have the same size or
    more than two are lone CLIPs.
    """
    slots = [{name: name for name in file.components} for file in files]
    lone = [index for index, file in enumerate(files) if file.clip_size is not None]
    if len(lone) > 2:
        raise TextEncoderSetError(f"{len(lone)} CLIP text encoders ({', '.join(files[i].path for i in lone)}); "
                                  "at most two (CLIP-L and CLIP-G) condition one model")
    if len(lone) == 1:
        slots[lone[0]]["text_encoder"] = _lone_clip_slot(files[lone[0]].clip_size[0])  # type: ignore[index]
    elif len(lone) == 2:
        first, second = (files[i] for i in lone)
        if first.clip_size == second.clip_size:
            raise TextEncoderSetError(
                f"{first.path} and {second.path} are CLIP towers of the same size {first.clip_size} (width, layers): "
                "CLIP-L and CLIP-G cannot be told apart")
        larger = max(lone, key=lambda i: files[i].clip_size)  # type: ignore[arg-type, return-value]
        for index in lone:
            slots[index]["text_encoder"] = "clip_g" if index == larger else "clip_l"
    holder: dict[str, str] = {}
    for file, file_slots in zip(files, slots):
        for slot in file_slots.values():
            if slot in holder:
                raise TextEncoderSetError(f"{holder[slot]} and {file.path} are both a {slot} text encoder")
            holder[slot] = file.path
    return slots


def load_text_encoder_file(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
    slots: Mapping[str, str] | None = None,
) -> dict[str, nn.Module]:
    """The text encoders of a text-encoder file (``models/text_encoders``, ``models/clip``) or of a
    checkpoint's ``text_encoders.*`` part, keyed by slot. A lone CLIP file's slot is ``text_encoder``
    unless `slots` (component name -> slot, from :func:`assign_text_encoder_slots`) says which CLIP
    it is, which also decides its activation (CLIP-G and CLIP-H: exact GELU); a T5 file's is ``t5xxl``."""
    source, detection = open_source(path)
    components = {name: keys for name, keys in detection.components.items()
                  if name in TEXT_ENCODER_SLOTS or name == "text_encoder"}
    if not components:
        raise WrongModelKindError(detection.path, f"expected a text encoder, but this is {detection.describe()}")
    targets = {name: (slots or {}).get(name, name) for name in components}
    return {targets[name]: load_text_encoder_component(source, detection, targets[name], keys, device, dtype, strict)[0]
            for name, keys in components.items()}
