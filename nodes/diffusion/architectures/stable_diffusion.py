"""Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL): their prediction type, and loading their U-Net, VAE, text encoders and ControlNets.

What a file holds comes from :mod:`.detection`. Prediction type (eps vs v) is not in the weights.
In order of precedence: the ``prediction`` argument; a ``v_pred`` marker key in the file;
``modelspec.prediction_type`` in safetensors metadata; a sidecar ``<name>.yaml`` next to the file
(LDM config, ``parameterization: "v"``; no such line means eps); a diffusers folder's
``scheduler/scheduler_config.json``; for ``.ckpt`` files ``global_step == 875000`` (the SD2-base 512
release, eps); else the family default: v for SD2.x non-inpainting (the 768-v layout is the common
SD2 file; give ``prediction="eps"`` for SD2-base), eps for everything else.
:attr:`LoadedCheckpoint.prediction_source` says which rule decided.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..networks import controlnet as controlnet_module
from ..networks import unet as unet_module
from ..sampling.model_sampling import Prediction
from ..text import clip as text_encoder_module
from ..vae import autoencoder as vae_module
from ..weights.files import DiffusersFolder, TorchPickleFile, WeightFile
from ..weights.loading import Materializer, StateDictMismatchError, WrongModelKindError, instantiate, key_list, target_device_dtype
from ..weights.safetensors_io import CheckpointError
from .detection import (
    V_PRED_MARKER,
    ComponentKeys,
    Detection,
    FileKind,
    ModelFamily,
    component_errors,
    controlnet_ldm_shapes,
    is_ignored,
    open_source,
    unet_ldm_shapes,
)
from .parts import folder_activation, load_clip_component, load_vae_component

logger = logging.getLogger(__name__)


_YAML_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?([A-Za-z_]+)[\"']?\s*(#.*)?$", re.MULTILINE)
_SD2_BASE_GLOBAL_STEP = 875000


def sidecar_config_path(path: Path) -> Path:
    """Where an LDM config for a single-file checkpoint is looked for: same name, ``.yaml``."""
    return path.with_suffix(".yaml")


def _prediction_from_name(value: str, where: str) -> Prediction:
    value = value.strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return Prediction.V
    if value in ("eps", "epsilon"):
        return Prediction.EPS
    raise CheckpointError(where, f"unknown prediction type {value!r}; expected 'eps'/'epsilon' or 'v'/'v_prediction'")


def resolve_prediction(
    detection: Detection, source: WeightFile, override: Prediction | str | None = None
) -> tuple[Prediction, str]:
    """The prediction type and which rule gave it (see the module docstring for the order)."""
    if override is not None:
        return (override if isinstance(override, Prediction) else _prediction_from_name(override, "prediction argument")), "argument"
    if V_PRED_MARKER in detection.ignored_keys:
        return Prediction.V, f"marker key {V_PRED_MARKER!r}"
    spec = source.metadata.get("modelspec.prediction_type")
    if spec:
        return _prediction_from_name(spec, f"{detection.path} metadata"), "metadata modelspec.prediction_type"
    path = Path(detection.path)
    if path.is_file():
        sidecar = sidecar_config_path(path)
        if sidecar.is_file():
            match = _YAML_PARAMETERIZATION.search(sidecar.read_text(encoding="utf-8", errors="replace"))
            prediction = _prediction_from_name(match.group(1), str(sidecar)) if match else Prediction.EPS
            return prediction, f"sidecar {sidecar.name}"
    if isinstance(source, DiffusersFolder) and "prediction_type" in source.scheduler_config:
        return (
            _prediction_from_name(str(source.scheduler_config["prediction_type"]), f"{path}/scheduler"),
            "scheduler/scheduler_config.json",
        )
    if isinstance(source, TorchPickleFile) and detection.family is ModelFamily.SD2:
        if source.extras.get("global_step") == _SD2_BASE_GLOBAL_STEP:
            return Prediction.EPS, f"global_step {_SD2_BASE_GLOBAL_STEP} (SD2-base release)"
    if detection.family is ModelFamily.SD2 and not detection.inpainting:
        return Prediction.V, "SD2 default (768-v layout)"
    return Prediction.EPS, "family default"


@dataclass(frozen=True)
class LatentFormat:
    """The latent space the diffusion model works in.

    channels: latent channels; downscale_factor: image pixels per latent cell along a side;
    diffusion latents = (vae latents - shift_factor) * scaling_factor.
    """

    channels: int
    scaling_factor: float
    shift_factor: float
    downscale_factor: int


# Every SD1/SD2/SDXL VAE is f8; used only when a checkpoint carries no VAE to measure.
_FAMILY_DOWNSCALE = 8


@dataclass
class LoadedCheckpoint:
    """A loaded diffusion checkpoint.

    text_encoders: slot name (``clip_l``, ``clip_h``, ``clip_g``) -> encoder, in conditioning order.
    hidden_state: which text-encoder layer conditions the U-Net (see :mod:`text_encoder`); differs
    from the family's usual choice for diffusers SD2 folders, whose encoder had its last layer cut.
    unexpected_keys: keys nothing used (only non-empty when loaded with ``strict=False``).
    ignored_keys: known non-weight entries (schedule buffers, EMA copies, markers).
    """

    path: str
    detection: Detection
    family: ModelFamily
    prediction: Prediction
    prediction_source: str
    unet: unet_module.UNet
    unet_config: unet_module.UNetConfig
    vae: vae_module.AutoencoderKL | None
    vae_config: vae_module.VAEConfig | None
    text_encoders: dict[str, text_encoder_module.CLIPTextEncoder]
    text_encoder_configs: dict[str, text_encoder_module.TextEncoderConfig]
    latent_format: LatentFormat
    hidden_state: text_encoder_module.HiddenStateChoice
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def inpainting(self) -> bool:
        return self.detection.inpainting


@dataclass
class LoadedVAE:
    """A standalone VAE. latent_format is None when neither the file nor the caller says the family
    (the scaling factor then must come from the diffusion model it is paired with)."""

    path: str
    vae: vae_module.AutoencoderKL
    config: vae_module.VAEConfig
    family: ModelFamily | None
    latent_format: LatentFormat | None
    unexpected_keys: list[str] = field(default_factory=list)


@dataclass
class LoadedControlNet:
    path: str
    controlnet: controlnet_module.ControlNet
    config: controlnet_module.ControlNetConfig
    family: ModelFamily
    unexpected_keys: list[str] = field(default_factory=list)


def _load_unet(
    source: WeightFile, detection: Detection, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool,
) -> tuple[nn.Module, object, list[str]]:
    with component_errors(detection.path, "unet"):
        config = unet_module.unet_config_from_shapes(unet_ldm_shapes(source.shapes(), keys, detection.path))
    target_device, target_dtype = target_device_dtype(device, dtype, "unet")
    state_dict = Materializer(source, target_device, target_dtype).state_dict(keys.prefix, is_ignored)
    if keys.layout == "diffusers":
        with component_errors(detection.path, "unet"):
            state_dict = unet_module.ldm_unet_keys_from_diffusers(state_dict)
    module, unexpected = instantiate(lambda: unet_module.UNet(config), state_dict, "unet", detection.path, strict)
    return module, config, unexpected


def _expect(detection: Detection, expected: FileKind, what: str) -> None:
    if detection.kind is not expected:
        hint = ""
        if detection.kind is FileKind.CHECKPOINT and expected is FileKind.VAE and "vae" in detection.components:
            hint = " (its VAE loads with load_checkpoint)"
        raise WrongModelKindError(detection.path, f"expected {what}, but this is {detection.describe()}{hint}")


def _reject_unclaimed(detection: Detection, strict: bool) -> list[str]:
    if detection.unclaimed_keys and strict:
        raise StateDictMismatchError(
            detection.path,
            f"{len(detection.unclaimed_keys)} key(s) belong to no component: {key_list(list(detection.unclaimed_keys))} "
            "(pass strict=False to load anyway)",
        )
    return list(detection.unclaimed_keys)


def load_checkpoint(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    prediction: Prediction | str | None = None,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a diffusion checkpoint (single file or diffusers folder): U-Net, VAE, text encoders.

    device: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda:0"``, ...; dtype: ``None``/``"auto"``
    for the per-component policy of :func:`devices.default_dtype`, or one dtype for all.
    prediction: overrides the detected prediction type (``"eps"`` or ``"v"``).
    strict: keys nothing uses are an error (default); with ``False`` they are listed in
    ``unexpected_keys``. Missing weights are always an error.
    """
    source, detection = open_source(path)
    if detection.kind not in (FileKind.CHECKPOINT, FileKind.DIFFUSION_MODEL) or detection.denoiser != "unet":
        raise WrongModelKindError(detection.path, f"expected a diffusion checkpoint, but this is {detection.describe()}")
    assert detection.family is not None
    unexpected = _reject_unclaimed(detection, strict)
    family = detection.family
    unet, unet_config, extra = _load_unet(source, detection, detection.components["unet"], device, dtype, strict)
    unexpected += extra

    vae = vae_config = None
    if "vae" in detection.components:
        scaling = None
        if isinstance(source, DiffusersFolder) and "scaling_factor" in source.configs.get("vae", {}):
            scaling = float(source.configs["vae"]["scaling_factor"])
        vae, vae_config, extra = load_vae_component(
            source, detection, detection.components["vae"], family, device, dtype, strict, scaling
        )
        unexpected += extra
    else:
        logger.warning("%s: no VAE in this checkpoint; load one with load_vae", detection.path)

    text_encoders, text_encoder_configs = {}, {}
    for slot, keys in detection.components.items():
        if not slot.startswith("clip_"):
            continue
        encoder, config, extra = load_clip_component(
            source, detection, slot, keys, device, dtype, strict, folder_activation(source, keys)
        )
        text_encoders[slot], text_encoder_configs[slot] = encoder, config
        unexpected += extra

    hidden_state = text_encoder_module.HIDDEN_STATE_BY_FAMILY[family.latent_family]
    if isinstance(source, DiffusersFolder) and family is ModelFamily.SD2:
        # diffusers exports SD2's OpenCLIP tower without its last layer, so its last layer is SD2's penultimate.
        hidden_state = replace(hidden_state, clip_skip=1)

    scaling = vae_module.latent_scaling_for(family.latent_family)
    if vae_config is not None:
        latent_format = LatentFormat(
            vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor, vae_config.downscale_factor
        )
    else:
        out_channels = unet_config.out_channels
        latent_format = LatentFormat(out_channels, scaling.scaling_factor, scaling.shift_factor, _FAMILY_DOWNSCALE)

    predicted, prediction_source = resolve_prediction(detection, source, prediction)
    logger.info(
        "%s: %s, %s prediction (%s)", detection.path, detection.describe(), predicted.value, prediction_source
    )
    return LoadedCheckpoint(
        path=detection.path,
        detection=detection,
        family=family,
        prediction=predicted,
        prediction_source=prediction_source,
        unet=unet,
        unet_config=unet_config,
        vae=vae,
        vae_config=vae_config,
        text_encoders=text_encoders,
        text_encoder_configs=text_encoder_configs,
        latent_format=latent_format,
        hidden_state=hidden_state,
        unexpected_keys=unexpected,
        ignored_keys=list(detection.ignored_keys),
    )


def load_vae(
    path: str | os.PathLike[str] | WeightFile,
    family: ModelFamily | str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedVAE:
    """Load a standalone VAE file (LDM or diffusers layout) or diffusers VAE folder.

    The weights do not say which latent space the VAE serves (SD1 and SDXL VAEs have the same
    shapes): give `family` for the scaling factor, or use the checkpoint's latent format.
    A diffusers folder's ``config.json`` ``scaling_factor`` is used when present.
    """
    source, detection = open_source(path)
    _expect(detection, FileKind.VAE, "a VAE")
    unexpected = _reject_unclaimed(detection, strict)
    resolved_family = ModelFamily(family) if family is not None else None
    scaling = None
    if isinstance(source, DiffusersFolder) and "scaling_factor" in source.configs.get(".", {}):
        scaling = float(source.configs["."]["scaling_factor"])
    vae, config, extra = load_vae_component(
        source, detection, detection.components["vae"], resolved_family, device, dtype, strict, scaling
    )
    known = resolved_family is not None or scaling is not None
    latent_format = (
        LatentFormat(config.latent_channels, config.scaling_factor, config.shift_factor, config.downscale_factor)
        if known else None
    )
    return LoadedVAE(detection.path, vae, config, resolved_family, latent_format, unexpected + extra)


def load_controlnet(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedControlNet:
    """Load a ControlNet: original layout (``control_model.*`` or bare keys) or diffusers layout/folder."""
    source, detection = open_source(path)
    _expect(detection, FileKind.CONTROLNET, "a ControlNet")
    assert detection.family is not None
    unexpected = _reject_unclaimed(detection, strict)
    keys = detection.components["controlnet"]
    with component_errors(detection.path, "controlnet"):
        config = controlnet_module.controlnet_config_from_shapes(controlnet_ldm_shapes(source.shapes(), keys, detection.path))
    target_device, target_dtype = target_device_dtype(device, dtype, "controlnet")
    state_dict = Materializer(source, target_device, target_dtype).state_dict(keys.prefix, is_ignored)
    if keys.layout == "diffusers":
        with component_errors(detection.path, "controlnet"):
            state_dict = controlnet_module.ldm_controlnet_keys_from_diffusers(state_dict)
    module, extra = instantiate(
        lambda: controlnet_module.ControlNet(config), state_dict, "controlnet", detection.path, strict
    )
    return LoadedControlNet(detection.path, module, config, detection.family, unexpected + extra)
