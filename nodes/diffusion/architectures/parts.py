"""Loading the parts that checkpoints of several families share: the VAE and the CLIP and T5 text encoders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..text import clip as text_encoder_module
from ..text import t5 as t5_module
from ..vae import autoencoder as vae_module
from ..weights.files import DiffusersFolder, WeightFile
from ..weights.loading import Materializer, instantiate, target_device_dtype
from ..weights.storage import FLOAT8_DTYPES, compute_in, split_weight_scales
from ..weights.safetensors_io import CheckpointError
from .detection import ComponentKeys, Detection, ModelFamily, component_errors, is_ignored, meta_state_dict, shapes_of


def text_encoder_shapes(shapes: Mapping[str, Sequence[int]], keys: ComponentKeys) -> dict[str, tuple[int, ...]]:
    return shapes_of(meta_state_dict(shapes, keys.prefix))


def load_vae_component(
    source: WeightFile, detection: Detection, keys: ComponentKeys, family: ModelFamily | None,
    device: str | torch.device, dtype: str | torch.dtype | None, strict: bool, scaling_override: float | None = None,
    network_channels: int | None = None,
) -> tuple[vae_module.AutoencoderKL, vae_module.VAEConfig, list[str]]:
    """network_channels: the latent width of the network the file carries this VAE with. A VAE of that
    width is that model's own latent space even where the family's usual width differs (a 4-channel
    network in the SD3 layout), and gets the family's scaling, as ComfyUI applies a model's latent
    format to whatever VAE it has; any other width must be the family's."""
    meta = meta_state_dict(source.shapes(), keys.prefix)
    with component_errors(detection.path, "vae"):
        if keys.layout == "diffusers":
            meta = vae_module.ldm_vae_keys_from_diffusers(meta)
        family_name = family.latent_family if family else None
        config = vae_module.vae_config_from_shapes(shapes_of(meta), family=None)
        if (family_name is None or network_channels is None or config.latent_channels != network_channels
                or network_channels == vae_module.LATENT_CHANNELS[family_name]):
            config = vae_module.vae_config_from_shapes(shapes_of(meta), family=family_name)
        else:
            scaling = vae_module.latent_scaling_for(family_name)
            config = replace(config, scaling_factor=scaling.scaling_factor, shift_factor=scaling.shift_factor)
    if scaling_override is not None:
        config = replace(config, scaling_factor=scaling_override)
    target_device, target_dtype = target_device_dtype(device, dtype, "vae")
    state_dict = Materializer(source, target_device, target_dtype).state_dict(keys.prefix, is_ignored)
    if keys.layout == "diffusers":
        with component_errors(detection.path, "vae"):
            state_dict = vae_module.ldm_vae_keys_from_diffusers(state_dict)
    module, unexpected = instantiate(lambda: vae_module.AutoencoderKL(config), state_dict, "vae", detection.path, strict)
    return module, config, unexpected  # type: ignore[return-value]


def load_clip_component(
    source: WeightFile, detection: Detection, slot: str, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool, activation: str | None,
) -> tuple[text_encoder_module.CLIPTextEncoder, text_encoder_module.TextEncoderConfig, list[str]]:
    with component_errors(detection.path, slot):
        config = text_encoder_module.text_encoder_config_from_shapes(
            text_encoder_shapes(source.shapes(), keys), activation=activation  # type: ignore[arg-type]
        )
    target_device, target_dtype = target_device_dtype(device, dtype, "text_encoder")
    state_dict = Materializer(source, target_device, target_dtype).state_dict(keys.prefix, is_ignored)
    with component_errors(detection.path, slot):
        state_dict = text_encoder_module.text_encoder_state_dict(state_dict)
    module, unexpected = instantiate(
        lambda: text_encoder_module.CLIPTextEncoder(config), state_dict, slot, detection.path, strict
    )
    return module, config, unexpected  # type: ignore[return-value]


def folder_activation(source: WeightFile, keys: ComponentKeys) -> str | None:
    """A diffusers text encoder's activation from its config.json (HF layout does not imply CLIP-L there)."""
    if not isinstance(source, DiffusersFolder):
        return None
    act = source.configs.get(keys.prefix.rstrip("/"), {}).get("hidden_act")
    if act is None:
        return None
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(source.path, f"text encoder activation {act!r} is not supported (quick_gelu or gelu)")
    return act


def stored_component(
    source: WeightFile, keys: ComponentKeys, device: torch.device, dtype: torch.dtype, path: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A component's tensors (prefix removed) with fp8 ones kept in their storage dtype, and the
    per-layer scales of scaled-fp8 files split off -> (weights, scales) for :func:`finish_stored`."""
    state_dict = Materializer(source, device, dtype, keep_dtypes=FLOAT8_DTYPES).state_dict(keys.prefix, is_ignored)
    return split_weight_scales(state_dict, path)


def finish_stored(module: nn.Module, dtype: torch.dtype, scales: Mapping[str, Tensor]) -> nn.Module:
    """Make a module built from :func:`stored_component` tensors compute in `dtype`, upcasting fp8
    weights layer by layer (nothing to do when every weight is already in `dtype`)."""
    if scales or any(p.dtype in FLOAT8_DTYPES for p in module.parameters()):
        compute_in(module, dtype, scales)
    return module


def load_t5_component(
    source: WeightFile, detection: Detection, slot: str, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool,
) -> tuple[t5_module.T5Encoder, t5_module.T5Config, list[str]]:
    """A T5 encoder stored under `keys` (transformers naming)."""
    with component_errors(detection.path, slot):
        state_shapes = text_encoder_shapes(source.shapes(), keys)
        config = t5_module.t5_config_from_shapes(shapes_of(t5_module.t5_encoder_state_dict(
            {k: torch.empty(v, device="meta") for k, v in state_shapes.items()})))
    target_device, target_dtype = target_device_dtype(device, dtype, "text_encoder")
    state_dict, scales = stored_component(source, keys, target_device, target_dtype, detection.path)
    with component_errors(detection.path, slot):
        state_dict = t5_module.t5_encoder_state_dict(state_dict)
    module, unexpected = instantiate(lambda: t5_module.T5Encoder(config), state_dict, slot, detection.path, strict)
    return finish_stored(module, target_dtype, scales), config, unexpected  # type: ignore[return-value]
