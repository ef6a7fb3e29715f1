"""Conditioning on an image: edit and structure models (InstructPix2Pix, CosXL edit, Flux.1
Canny/Depth) and inpainting models (SD inpainting, Flux.1 Fill) take an image's latent beside the
noisy one (sampling.concat builds those input channels); Flux.1 Kontext attends to reference
latents as extra tokens; Flux.1 Redux (a style model) appends an image's tokens to the prompt."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CONDITIONING, IMAGE, LATENT, MASK, VAE, SocketType

from ..architectures.style_models import StyleModelError, load_style_model
from ..components import Latent
from ..networks.flux_redux import ReduxImageEncoder
from ..sampling.guidance import Conditioning
from .common import CLIP_VISION_OUTPUT, InputError, run_device
from .images import as_image, as_mask
from .latent import _encodable, _vae
from .loading import ModelFileNode, model_file

STYLE_MODEL = SocketType("STYLE_MODEL", "Style model: image tokens for the prompt (Flux.1 Redux).", "#c9a0dc")


def _with_concat(conditioning: Conditioning, **values: object) -> Conditioning:
    return tuple(entry.with_(**values) for entry in conditioning)


class _ImageConditioningInputs(NodeInputs):
    """What a model is conditioned on an image with: both conditionings, the VAE and the image."""

    positive: CONDITIONING.annotation
    negative: CONDITIONING.annotation
    vae: VAE.annotation
    image: IMAGE.annotation


class _ImageConditioningOutputs(NodeOutputs):
    """Both conditionings with the image's latent beside the noisy one, and the latent to sample from."""

    positive: CONDITIONING.annotation
    negative: CONDITIONING.annotation
    latent: LATENT.annotation


class InstructPix2PixConditioning(Node):
    """Condition an image-edit or structure model on an image (ComfyUI's InstructPixToPixConditioning):
    InstructPix2Pix and SDXL/CosXL edit models edit the image as the prompt says; Flux.1 Canny and
    Depth follow its edges or depth map (connect a Canny or depth image). The image's latent goes
    beside the noisy latent at every step, on both sides; the latent output is an empty one of the
    image's size to sample from. Sizes that are not multiples of the VAE's factor are cropped."""

    category = "conditioning"

    Inputs = _ImageConditioningInputs
    Outputs = _ImageConditioningOutputs

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        image = _encodable(as_image(inputs.image), vae.downscale_factor, ctx)
        encoded = vae.encode(image)
        return self.Outputs(positive=_with_concat(inputs.positive, concat_latent=encoded),
                            negative=_with_concat(inputs.negative, concat_latent=encoded),
                            latent=Latent(torch.zeros_like(encoded), vae.downscale_factor))


class InpaintModelConditioning(Node):
    """Condition an inpainting model (SD inpainting, Flux.1 Fill) on an image and the mask of what to
    repaint (ComfyUI's InpaintModelConditioning): the image with the masked part made grey is
    encoded and goes beside the noisy latent with the mask, on both sides. The latent output is the
    whole image's, to sample from; noise_mask also gives it the mask as its noise mask, so only the
    masked part is resampled (some models do better without). The mask is resized to the image;
    sizes that are not multiples of the VAE's factor are cropped."""

    category = "conditioning"

    class Inputs(_ImageConditioningInputs):
        mask: MASK.annotation
        noise_mask: bool = Field(True, description="Resample only the masked part (the latent's noise mask).")

    Outputs = _ImageConditioningOutputs

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        image = as_image(inputs.image)
        mask = as_mask(inputs.mask)
        if mask.shape[0] not in (1, image.shape[0]):
            raise InputError("mask", f"{mask.shape[0]} masks for {image.shape[0]} images: give one mask, or one "
                                     "per image")
        mask = F.interpolate(mask[:, None], size=image.shape[1:3], mode="bilinear", align_corners=False)
        image = _encodable(image, vae.downscale_factor, ctx)
        mask = _encodable(mask.permute(0, 2, 3, 1), vae.downscale_factor, ctx).permute(0, 3, 1, 2)
        keep = 1.0 - mask.round().permute(0, 2, 3, 1)
        masked = (image - 0.5) * keep + 0.5  # the part to repaint made grey
        concat = {"concat_latent": vae.encode(masked), "concat_mask": mask}
        latent = Latent(vae.encode(image), vae.downscale_factor, noise_mask=mask if inputs.noise_mask else None)
        return self.Outputs(positive=_with_concat(inputs.positive, **concat),
                            negative=_with_concat(inputs.negative, **concat), latent=latent)


class ReferenceLatent(Node):
    """Give an edit model an image to work from (ComfyUI's ReferenceLatent; Flux.1 Kontext): the
    encoded image joins the conditioning as reference tokens the model attends to, at positions of
    their own. Chain several for several references (placed beside or below one another); without a
    latent the conditioning passes unchanged."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        latent: LATENT.annotation | None = None

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.latent is None:
            return self.Outputs(conditioning=inputs.conditioning)
        samples = inputs.latent.samples
        return self.Outputs(conditioning=tuple(entry.with_(reference_latents=(*entry.reference_latents, samples))
                                               for entry in inputs.conditioning))


class LoadStyleModel(ModelFileNode):
    """Load a style model from the style_models folder (ComfyUI's StyleModelLoader): Flux.1 Redux
    (flux1-redux-dev.safetensors), which turns a SigLIP image encoding into prompt tokens."""

    category = "loaders"
    model_kind = "style_models"

    class Inputs(NodeInputs):
        name: model_file("style_models")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        style_model: STYLE_MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            model = load_style_model(self.model_path(inputs.name), device=run_device(ctx))
        except StyleModelError as error:
            raise InputError("name", str(error)) from None
        return self.Outputs(style_model=model)


class ApplyStyleModel(Node):
    """Steer a Flux prompt with an image (ComfyUI's StyleModelApply; Flux.1 Redux): the image
    encoder's tokens (CLIPVisionEncode with a SigLIP encoder) go through the style model and are
    appended to every entry's text states, one token per image patch, all images of the batch in
    turn. strength scales them (multiply); attn_bias, which weights attention to them instead, is
    not supported at strengths other than 1."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        style_model: STYLE_MODEL.annotation
        clip_vision_output: CLIP_VISION_OUTPUT.annotation
        strength: float = Field(1.0, ge=0.0, le=10.0)
        strength_type: Literal["multiply", "attn_bias"] = "multiply"

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: ReduxImageEncoder = inputs.style_model
        if inputs.strength_type == "attn_bias" and inputs.strength != 1.0:
            raise InputError("strength_type", "attn_bias at a strength other than 1 needs attention masks, which "
                                              "this pack's Flux does not take; use multiply")
        hidden = inputs.clip_vision_output.last_hidden_state
        if hidden.shape[-1] != model.config.image_dim:
            raise InputError("clip_vision_output", f"image tokens {hidden.shape[-1]} wide; this style model takes "
                                                   f"{model.config.image_dim} (its SigLIP image encoder's)")
        weight = model.redux_up.weight
        with torch.no_grad():
            tokens = model(hidden.to(weight.device, weight.dtype)).float().cpu()
        tokens = tokens.flatten(0, 1)[None]  # every image's tokens in one sequence
        if inputs.strength_type == "multiply":
            tokens = tokens * inputs.strength
        out = []
        for entry in inputs.conditioning:
            if entry.context is None or entry.context.shape[-1] != tokens.shape[-1]:
                width = None if entry.context is None else entry.context.shape[-1]
                raise InputError("conditioning", f"text states {width} wide; this style model's tokens are "
                                                 f"{tokens.shape[-1]} wide (a Flux prompt's T5 states)")
            mask = entry.context_mask
            out.append(entry.with_(context=torch.cat([entry.context, tokens.to(entry.context.dtype)], dim=1),
                                   context_mask=None if mask is None else F.pad(mask, (0, tokens.shape[1]), value=1)))
        return self.Outputs(conditioning=tuple(out))


NODES = [InstructPix2PixConditioning, InpaintModelConditioning, ReferenceLatent, LoadStyleModel, ApplyStyleModel]
