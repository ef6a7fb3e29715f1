"""ControlNet files of every family: SD1.x/SD2.x/SDXL ones through :func:`.stable_diffusion.load_controlnet`,
SD3/SD3.5 and Flux ones (the transformer ControlNets of :data:`.detection.CONTROLNETS`) built here.

Transformer ControlNets mostly read their control image as latents of the model's VAE, which the
node applying them encodes; :class:`LoadedTransformerControlNet` says how (the latent shift, the
image transform Stability's SD3.5 files ask for) and carries a union ControlNet's control type.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..networks import flux_controlnet as flux_controlnet_module
from ..networks import mmdit_controlnet as mmdit_controlnet_module
from ..weights.files import DiffusersFolder, WeightFile
from ..weights.loading import StateDictMismatchError, WrongModelKindError, instantiate, key_list, target_device_dtype
from .detection import (
    CONTROLNET_BY_COMPONENT,
    Detection,
    FileKind,
    ModelFamily,
    component_errors,
    meta_state_dict,
    open_source,
    shapes_of,
)
from .parts import finish_stored, stored_component
from .stable_diffusion import LoadedControlNet, load_controlnet

logger = logging.getLogger(__name__)

# Stability's SD3.5 ControlNet files say which control image they were trained on (``control_type``).
SD35_CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}


@dataclass(frozen=True)
class ControlNetBuild:
    """How one transformer ControlNet family is built from shapes in its module's names."""

    config_from_shapes: Callable[..., object]
    build: Callable[[object], nn.Module]


CONTROLNET_BUILDS: Mapping[str, ControlNetBuild] = {
    "sd3_controlnet": ControlNetBuild(mmdit_controlnet_module.sd3_controlnet_config_from_shapes,
                                      mmdit_controlnet_module.SD3ControlNet),  # type: ignore[arg-type]
    "flux_controlnet": ControlNetBuild(flux_controlnet_module.flux_controlnet_config_from_shapes,
                                       flux_controlnet_module.FluxControlNet),  # type: ignore[arg-type]
}


@dataclass
class LoadedTransformerControlNet:
    """A loaded SD3/SD3.5 or Flux ControlNet.

    control_type: what a Stability SD3.5 file says it was trained on (``blur``, ``canny``, ``depth``),
    None for other files. mode: a union ControlNet's control type (SetUnionControlNetType), None for
    none (ComfyUI's "auto": no type token).
    """

    path: str
    controlnet: mmdit_controlnet_module.SD3ControlNet | flux_controlnet_module.FluxControlNet
    family: ModelFamily
    control_type: str | None = None
    mode: int | None = None
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def latent_input(self) -> bool:
        """True when the control image enters as VAE latents (every kind but XLabs' Flux ControlNets)."""
        config = self.controlnet.config
        return not getattr(config, "image_input", False)

    @property
    def latent_channels(self) -> int:
        """Channels of the control latents it reads (an inpainting ControlNet's include a mask channel)."""
        return self.controlnet.config.hint_channels

    @property
    def shifted_latents(self) -> bool:
        """Whether its control latents carry the VAE's shift: InstantX's SD3 ControlNets were trained
        without it (ComfyUI and diffusers' pipeline leave it out for them), every other kind with it."""
        config = self.controlnet.config
        return not getattr(config, "joint", False)

    @property
    def context_dim(self) -> int | None:
        """The text-state width it reads, None when it reads none (SD3.5-large ControlNets)."""
        config = self.controlnet.config
        if isinstance(config, flux_controlnet_module.FluxControlNetConfig):
            return config.flux.context_dim
        return config.context_dim

    @property
    def num_modes(self) -> int:
        """How many control types a union ControlNet knows (0: not a union ControlNet)."""
        return getattr(self.controlnet.config, "num_modes", 0)

    def vae_input(self, image: Tensor) -> Tensor:
        """image: (B, 3, H, W) control image in [0, 1] -> what the VAE encodes, in [0, 1] terms (the
        VAE maps 0..1 to -1..1). Stability's canny SD3.5 ControlNet takes its edges into the VAE as
        ``x * 127.5 + 0.5`` instead of ``2x - 1`` (its reference code and model card; ComfyUI passes
        that through its own ``2x - 1`` as well, doubling it: here Stability's values). Depth maps are
        inverted for the depth one, as ComfyUI does, so ComfyUI's depth images mean what they mean there."""
        if self.control_type == "canny":
            return (image * 127.5 + 1.5) / 2.0
        if self.control_type == "depth":
            return 1.0 - image
        return image


def _config_extra(source: WeightFile, component: str) -> dict[str, object]:
    """What a diffusers folder's config.json says that shapes cannot (Flux's rotary split)."""
    if component != "flux_controlnet" or not isinstance(source, DiffusersFolder):
        return {}
    axes = source.configs.get(".", {}).get("axes_dims_rope")
    return {"axes_dim": tuple(axes)} if isinstance(axes, (list, tuple)) else {}


def load_transformer_controlnet(
    source: WeightFile,
    detection: Detection,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedTransformerControlNet:
    """Build the transformer ControlNet a detected file holds (fp8 files stay fp8 in memory)."""
    (component, keys), = detection.components.items()
    layout = CONTROLNET_BY_COMPONENT[component]
    to_module = layout.to_module[keys.layout]
    if detection.unclaimed_keys and strict:
        raise StateDictMismatchError(detection.path, f"{len(detection.unclaimed_keys)} key(s) belong to no component: "
                                     f"{key_list(list(detection.unclaimed_keys))} (pass strict=False to load anyway)")
    build = CONTROLNET_BUILDS[component]
    with component_errors(detection.path, component):
        shapes = shapes_of(to_module(meta_state_dict(source.shapes(), keys.prefix)))
        config = build.config_from_shapes(shapes, **_config_extra(source, component))
    target_device, target_dtype = target_device_dtype(device, dtype, "controlnet")
    state_dict, scales = stored_component(source, keys, target_device, target_dtype, detection.path)
    control_type = None
    if mmdit_controlnet_module.CONTROL_TYPE_KEY in state_dict and component == "sd3_controlnet":
        code = round(float(state_dict[mmdit_controlnet_module.CONTROL_TYPE_KEY]))
        if code not in SD35_CONTROL_TYPES:
            raise StateDictMismatchError(detection.path, f"control_type {code} is none of Stability's SD3.5 "
                                                         f"ControlNet types {SD35_CONTROL_TYPES}")
        control_type = SD35_CONTROL_TYPES[code]
    with component_errors(detection.path, component):
        state_dict = to_module(state_dict)
    module, unexpected = instantiate(lambda: build.build(config), state_dict, component, detection.path, strict)
    finish_stored(module, target_dtype, scales)
    logger.info("%s: %s%s", detection.path, detection.describe(), f", {control_type}" if control_type else "")
    return LoadedTransformerControlNet(detection.path, module, detection.family,  # type: ignore[arg-type]
                                       control_type, None, list(detection.unclaimed_keys) + unexpected)


AnyControlNet = LoadedControlNet | LoadedTransformerControlNet


def load_any_controlnet(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> AnyControlNet:
    """Load a ControlNet of any family: SD1.x/SD2.x/SDXL (original or diffusers layout), SD3/SD3.5
    (InstantX, Stability) or Flux (InstantX, Shakker-Labs union, XLabs)."""
    source, detection = open_source(path)
    if detection.kind is FileKind.CONTROLNET and any(name in CONTROLNET_BUILDS for name in detection.components):
        return load_transformer_controlnet(source, detection, device, dtype, strict=strict)
    if detection.kind is not FileKind.CONTROLNET:
        raise WrongModelKindError(detection.path, f"expected a ControlNet, but this is {detection.describe()}")
    return load_controlnet(source, device, dtype, strict=strict)
