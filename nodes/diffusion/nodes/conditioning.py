"""Conditioning nodes: prompts (and DiT's class labels) to conditioning, and where, when and how strongly it applies."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONDITIONING, CONTROL_NET, IMAGE, MASK, MODEL, VAE

from ..architectures.controlnets import AnyControlNet, LoadedTransformerControlNet
from ..architectures.detection import ModelFamily
from ..architectures.stable_diffusion import LoadedControlNet
from ..components import DiffusionModel, MissingTextEncoderError, TextEncoders, VAEModel
from ..networks.dit import DiTConfig
from ..text.embeddings import EmbeddingNotFoundError
from ..sampling.guidance import (
    DEFAULT_DISTILLED_GUIDANCE,
    CondEntry,
    Conditioning,
    ControlSpec,
    GuidanceError,
    LatentHint,
    learned_unconditional,
)
from ..sampling.unclip import ImagePrompt
from ..vision.clip_vision import CLIPVisionEncoderModel, CLIPVisionOutput, clip_preprocess
from .common import CLIP_VISION, CLIP_VISION_OUTPUT, InputError


def _text_encoders(clip: TextEncoders | None) -> TextEncoders:
    if clip is None:
        raise InputError("clip", "this checkpoint has no text encoders; load them with LoadTextEncoders "
                                 "(DualCLIPLoader / TripleCLIPLoader) or LoadTextEncoder")
    return clip


def _encode(clip: TextEncoders | None, text: str, input_name: str, **options: object) -> Conditioning:
    clip = _text_encoders(clip)
    try:
        return (clip.encode(text, **options),)  # type: ignore[arg-type]
    except EmbeddingNotFoundError as error:
        raise InputError(input_name, str(error)) from None
    except MissingTextEncoderError as error:
        raise InputError("clip", str(error)) from None


class TextEncode(Node):
    """Encode a prompt with the model's text encoder(s): SD1.x/SD2.x/SDXL CLIPs, SD3's CLIP-L, CLIP-G
    and T5-XXL, Flux's CLIP-L and T5-XXL (every encoder gets the same prompt) or PixArt's T5-XXL. Supports
    (word:1.2) emphasis, long prompts (in 75-token chunks) and embedding:name for textual-inversion
    embeddings in the embeddings folder. For SDXL the size conditioning is the sampled image's size
    (crop 0), as in ComfyUI and diffusers; TextEncodeSDXL sets it explicitly."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        text: str = Field("", description="The prompt.", json_schema_extra={"multiline": True})

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=_encode(inputs.clip, inputs.text, "text"))


def _check_family(clip: TextEncoders, node: str, families: str, latent_family: str) -> None:
    if clip.family.latent_family != latent_family:
        raise InputError("clip", f"{node} needs {families} text encoders, got {clip.family.label}'s")


_GUIDANCE = Field(DEFAULT_DISTILLED_GUIDANCE, ge=0.0, le=100.0,
                  description="Guidance strength a guidance-distilled model (Flux.1-dev) is told; it "
                              "replaces classifier-free guidance (keep cfg at 1).")


class TextEncodeSD3(Node):
    """Encode a prompt for SD3 with one text per encoder: CLIP-L, CLIP-G and T5-XXL. empty_padding
    none leaves an empty prompt out instead of encoding it as padding (both CLIP prompts empty: no
    CLIP states; empty T5 prompt: T5's end token alone), as ComfyUI's CLIPTextEncodeSD3 does."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        clip_l: str = Field("", description="Prompt for CLIP-L.", json_schema_extra={"multiline": True})
        clip_g: str = Field("", description="Prompt for CLIP-G.", json_schema_extra={"multiline": True})
        t5xxl: str = Field("", description="Prompt for T5-XXL.", json_schema_extra={"multiline": True})
        empty_padding: Literal["none", "empty_prompt"] = Field(
            "none", description="none: leave empty prompts out; empty_prompt: encode them as the empty prompt.")

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        clip = _text_encoders(inputs.clip)
        _check_family(clip, "TextEncodeSD3", "SD3", "sd3")
        try:
            entry = clip.encode_sd3(inputs.clip_l, inputs.clip_g, inputs.t5xxl,
                                    empty_padding=inputs.empty_padding == "empty_prompt")
        except EmbeddingNotFoundError as error:
            raise InputError("clip_l", str(error)) from None
        except MissingTextEncoderError as error:
            raise InputError("clip", str(error)) from None
        return self.Outputs(conditioning=(entry,))


class TextEncodeFlux(Node):
    """Encode a prompt for Flux.1 with one text per encoder (CLIP-L gives the pooled vector, T5-XXL
    the text states) and the guidance strength a guidance-distilled model (dev) is told."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        clip_l: str = Field("", description="Prompt for CLIP-L.", json_schema_extra={"multiline": True})
        t5xxl: str = Field("", description="Prompt for T5-XXL.", json_schema_extra={"multiline": True})
        guidance: float = _GUIDANCE

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        clip = _text_encoders(inputs.clip)
        _check_family(clip, "TextEncodeFlux", "Flux.1", "flux")
        (entry,) = _encode(clip, inputs.t5xxl, "t5xxl", text_secondary=inputs.clip_l)
        return self.Outputs(conditioning=(entry.with_(guidance=inputs.guidance),))


class FluxGuidance(Node):
    """Set the guidance strength a guidance-distilled model (Flux.1-dev) is told, on every entry of a
    conditioning. It takes the place of classifier-free guidance: sample with cfg 1 (BasicGuider)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        guidance: float = _GUIDANCE

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=tuple(e.with_(guidance=inputs.guidance) for e in inputs.conditioning))


class TextEncodeSDXL(Node):
    """Encode a prompt for SDXL with both text encoders and the size/crop conditioning."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        text_g: str = Field("", description="Prompt for the OpenCLIP bigG encoder.", json_schema_extra={"multiline": True})
        text_l: str = Field("", description="Prompt for the CLIP-L encoder (empty: same as text_g).",
                            json_schema_extra={"multiline": True})
        width: int = Field(1024, ge=8, le=16384, description="Original image width the model is told about.")
        height: int = Field(1024, ge=8, le=16384, description="Original image height.")
        crop_left: int = Field(0, ge=0, le=16384)
        crop_top: int = Field(0, ge=0, le=16384)
        target_width: int = Field(1024, ge=8, le=16384)
        target_height: int = Field(1024, ge=8, le=16384)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        clip = _text_encoders(inputs.clip)
        if clip.family not in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
            raise InputError("clip", f"TextEncodeSDXL needs SDXL text encoders, got {clip.family.value}'s")
        return self.Outputs(conditioning=_encode(
            clip, inputs.text_g, "text_g", text_secondary=inputs.text_l or None,
            size=(inputs.height, inputs.width), crop=(inputs.crop_top, inputs.crop_left),
            target_size=(inputs.target_height, inputs.target_width),
        ))


class SetClipSkip(Node):
    """Condition on an earlier text-encoder layer: 1 = the last layer, 2 = the penultimate, ..."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        clip_skip: int = Field(1, ge=1, le=24, description="How many layers from the end to take the states from.")

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            return self.Outputs(clip=_text_encoders(inputs.clip).with_clip_skip(inputs.clip_skip))
        except ValueError as error:
            raise InputError("clip_skip", str(error)) from None


def _unconditional(model: DiffusionModel) -> Conditioning:
    try:
        return (learned_unconditional(model.network),)
    except GuidanceError as error:
        raise InputError("model", f"{model.family.label} model: {error}") from None


class ClassLabel(Node):
    """Condition a class-conditional DiT on one class (ImageNet's 0..999 for the released models).
    `unconditional` is the model's null class, the negative for classifier-free guidance."""

    category = "conditioning"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        class_index: int = Field(0, ge=0, le=1_000_000, description="The class, 0 .. the model's classes - 1.")

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation
        unconditional: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        config = model.network.config
        if not isinstance(config, DiTConfig):
            raise InputError("model", f"class labels condition class-conditional DiT models; this is a "
                                      f"{model.family.label} model (encode a prompt with TextEncode)")
        if inputs.class_index >= config.num_classes:
            raise InputError("class_index", f"{inputs.class_index} is not a class of this DiT model, which has "
                                            f"classes 0..{config.num_classes - 1}")
        return self.Outputs(conditioning=(CondEntry(class_label=inputs.class_index),),
                            unconditional=_unconditional(model))


class UnconditionalConditioning(Node):
    """The unconditional input a model learned for classifier-free guidance: DiT's null class or
    PixArt's null caption (the original PixArt's negative; ComfyUI and diffusers encode an empty
    prompt instead). PixArt weights converted from diffusers have no null caption."""

    category = "conditioning"

    class Inputs(NodeInputs):
        model: MODEL.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=_unconditional(inputs.model))


def _text_entry(entry: CondEntry, input_name: str, node: str) -> Tensor:
    """An entry's text states; a class label (DiT) has none."""
    if entry.context is None:
        raise InputError(input_name, f"{node} works on text conditioning; class {entry.class_label} is a "
                                     "class label (DiT)")
    return entry.context


class ConditioningCombine(Node):
    """Both conditionings apply: their predictions are averaged (by area, mask and strength)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        a: CONDITIONING.annotation
        b: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=tuple(inputs.a) + tuple(inputs.b))


class ConditioningConcat(Node):
    """Append the text states of `source` (its first entry) to every entry of `target` (one longer prompt)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        target: CONDITIONING.annotation
        source: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        source = inputs.source[0]
        extra = _text_entry(source, "source", "ConditioningConcat")
        out = []
        for entry in inputs.target:
            context = _text_entry(entry, "target", "ConditioningConcat")
            if context.shape[-1] != extra.shape[-1]:
                raise InputError("source", f"text states of width {extra.shape[-1]} cannot be appended to width "
                                           f"{context.shape[-1]} (different models)")
            changes: dict[str, object] = {"context": torch.cat([context, extra], dim=1)}
            if entry.context_mask is not None or source.context_mask is not None:
                # Masked states (PixArt) keep their masks, the appended part after the target's.
                masks = [e.context_mask if e.context_mask is not None else torch.ones(e.context.shape[:2])
                         for e in (entry, source)]  # type: ignore[union-attr]
                changes["context_mask"] = torch.cat(masks, dim=1)
            out.append(entry.with_(**changes))
        return self.Outputs(conditioning=tuple(out))


class ConditioningSetArea(Node):
    """Restrict a conditioning to a rectangle of the image (pixels, multiples of 8)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        width: int = Field(64, ge=8, le=16384, multiple_of=8)
        height: int = Field(64, ge=8, le=16384, multiple_of=8)
        x: int = Field(0, ge=0, le=16384, multiple_of=8)
        y: int = Field(0, ge=0, le=16384, multiple_of=8)
        strength: float = Field(1.0, ge=0.0, le=10.0)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        area = (inputs.height, inputs.width, inputs.y, inputs.x)
        return self.Outputs(conditioning=tuple(
            e.with_(area=area, strength=inputs.strength) for e in inputs.conditioning))


class ConditioningSetMask(Node):
    """Restrict a conditioning to a mask (resized to the latent when sampling)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        mask: MASK.annotation
        strength: float = Field(1.0, ge=0.0, le=10.0)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        mask = inputs.mask if inputs.mask.ndim == 3 else inputs.mask[None]
        return self.Outputs(conditioning=tuple(
            e.with_(mask=mask, mask_strength=inputs.strength) for e in inputs.conditioning))


class ConditioningSetTimestepRange(Node):
    """Make a conditioning act only between two points of sampling (0 = start, 1 = end)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        start: float = Field(0.0, ge=0.0, le=1.0)
        end: float = Field(1.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.end < inputs.start:
            raise InputError("end", f"end ({inputs.end}) is before start ({inputs.start})")
        return self.Outputs(conditioning=tuple(
            e.with_(start=inputs.start, end=inputs.end) for e in inputs.conditioning))


class ConditioningZeroOut(Node):
    """All-zero text states and pooled output (a neutral negative for some models)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        out = []
        for e in inputs.conditioning:
            context = _text_entry(e, "conditioning", "ConditioningZeroOut")
            pooled = None if e.pooled is None else torch.zeros_like(e.pooled)
            y = e.y
            if y is not None and e.pooled is not None:
                # Only the pooled-text part of SDXL's vector conditioning is zeroed; sizes stay.
                y = torch.cat([torch.zeros_like(e.pooled), y[:, e.pooled.shape[-1]:]], dim=-1)
            out.append(e.with_(context=torch.zeros_like(context), pooled=pooled, y=y))
        return self.Outputs(conditioning=tuple(out))


class ApplyControlNet(Node):
    """Guide sampling with a ControlNet and a control image, on both the positive and the negative
    conditioning, between start and end (fractions of sampling). Chain to stack several. SD3 and Flux
    ControlNets read the control image as latents of the model's VAE: connect it (XLabs' Flux
    ControlNets and SD1.x/SDXL ones need none)."""

    category = "conditioning"

    class Inputs(NodeInputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        control_net: CONTROL_NET.annotation
        image: IMAGE.annotation
        strength: float = Field(1.0, ge=0.0, le=10.0)
        start: float = Field(0.0, ge=0.0, le=1.0)
        end: float = Field(1.0, ge=0.0, le=1.0)
        vae: VAE.annotation | None = Field(None, description="The model's VAE, which encodes the control image "
                                                             "for SD3 and Flux ControlNets.")

    class Outputs(NodeOutputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.end < inputs.start:
            raise InputError("end", f"end ({inputs.end}) is before start ({inputs.start})")
        apply = _control_applier(inputs.control_net, inputs.image, inputs.strength, inputs.start, inputs.end,
                                 to_negative=False, vae=inputs.vae)
        positive = apply(inputs.positive, "positive", "ApplyControlNet")
        negative = apply(inputs.negative, "negative", "ApplyControlNet")
        return self.Outputs(positive=positive, negative=negative)


def _latent_hint(control: LoadedTransformerControlNet, vae: VAEModel | None) -> LatentHint:
    """How the VAE turns the control image into the latents `control` reads (encoded when sampling
    first needs them at a size)."""
    if vae is None:
        raise InputError("vae", f"this {control.family.label} ControlNet reads the control image as latents: "
                                "connect the model's VAE")
    if vae.latent_format.channels != control.latent_channels:
        raise InputError("vae", f"this ControlNet reads {control.latent_channels}-channel latents, the VAE makes "
                                f"{vae.latent_format.channels} (inpainting ControlNets, which add a mask channel, "
                                "are not supported)")
    scaling = vae.scaling
    # InstantX's SD3 ControlNets read the scaled latents without the VAE's shift.
    unshift = 0.0 if control.shifted_latents else scaling.shift_factor * scaling.scaling_factor

    def encode(pixels: Tensor) -> Tensor:
        latents = vae.encode(pixels.permute(0, 2, 3, 1))
        return latents + unshift if unshift else latents

    return LatentHint(encode, vae.downscale_factor)


def _control_applier(
    control: AnyControlNet, image: Tensor, strength: float, start: float, end: float, to_negative: bool,
    vae: VAEModel | None = None,
) -> Callable[[Conditioning, str, str], Conditioning]:
    """A function adding one ControlNet (image: (B, H, W, 3)) to conditionings, after those already
    on their entries. At strength 0 it checks and returns them unchanged."""
    hint = image.permute(0, 3, 1, 2).contiguous()
    mode = latent_hint = None
    if isinstance(control, LoadedControlNet):
        context_dim: int | None = control.config.unet.context_dim
    else:
        context_dim, mode, hint = control.context_dim, control.mode, control.vae_input(hint)
        if control.latent_input:
            latent_hint = _latent_hint(control, vae)
    # One spec per earlier stack, so conditionings that share one share one ControlNet call per step.
    specs: dict[int, ControlSpec] = {}

    def spec_after(previous: ControlSpec | None) -> ControlSpec:
        if id(previous) not in specs:
            specs[id(previous)] = ControlSpec(control.controlnet, hint, strength, start, end, previous=previous,
                                              mode=mode, latent_hint=latent_hint)
        return specs[id(previous)]

    def apply(conditioning: Conditioning, input_name: str, node: str) -> Conditioning:
        for entry in conditioning:
            width = _text_entry(entry, input_name, node).shape[-1]
            if context_dim is not None and width != context_dim:
                raise InputError(input_name, f"conditioning of width {entry.context.shape[-1]} does not fit this "
                                             f"{control.family.value} ControlNet (width {context_dim})")
        if strength == 0.0:
            return conditioning
        return tuple(e.with_(control=spec_after(e.control), control_to_negative=to_negative) for e in conditioning)

    return apply


class ApplyControlNetSimple(Node):
    """Guide sampling with a ControlNet and a control image on one conditioning (ComfyUI's older
    ControlNetApply), for all of sampling. Its ControlNet also guides the negative side where that
    has none of its own, as in ComfyUI. Chain to stack several."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        control_net: CONTROL_NET.annotation
        image: IMAGE.annotation
        strength: float = Field(1.0, ge=0.0, le=10.0)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if isinstance(inputs.control_net, LoadedTransformerControlNet) and inputs.control_net.latent_input:
            raise InputError("control_net", "this ControlNet reads the control image as latents of the model's VAE: "
                                            "apply it with ApplyControlNet and the VAE")
        apply = _control_applier(inputs.control_net, inputs.image, inputs.strength, 0.0, 1.0, to_negative=True)
        return self.Outputs(conditioning=apply(inputs.conditioning, "conditioning", "ApplyControlNetSimple"))


# ComfyUI's control-type names (comfy/cldm/control_types.py) -> the index a union ControlNet embeds:
# the first eight are xinsir's SDXL ControlNet++ types, the "(InstantX)" ones InstantX's and
# Shakker-Labs' Flux union ControlNets'.
UNION_CONTROLNET_TYPES = {
    "openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2, "canny/lineart/anime_lineart/mlsd": 3, "normal": 4,
    "segment": 5, "tile": 6, "repaint": 7, "canny (InstantX)": 0, "tile (InstantX)": 1, "depth (InstantX)": 2,
    "blur (InstantX)": 3, "pose (InstantX)": 4, "gray (InstantX)": 5, "lq (InstantX)": 6,
}


class SetUnionControlNetType(Node):
    """Tell a union ControlNet (one model for several kinds of control image, as InstantX's and
    Shakker-Labs' Flux union ControlNets) which kind its control image is; auto tells it none."""

    category = "conditioning"

    class Inputs(NodeInputs):
        control_net: CONTROL_NET.annotation
        type: Literal[("auto", *UNION_CONTROLNET_TYPES)] = "auto"  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        control_net: CONTROL_NET.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        control = inputs.control_net
        mode = UNION_CONTROLNET_TYPES.get(inputs.type)
        if mode is None:
            if isinstance(control, LoadedTransformerControlNet):
                control = replace(control, mode=None)
            return self.Outputs(control_net=control)
        modes = control.num_modes if isinstance(control, LoadedTransformerControlNet) else 0
        if not modes:
            raise InputError("control_net", f"{control.path} is not a union ControlNet (or a kind not supported "
                                            "here, such as SDXL's ControlNet++): it takes no control type; use auto")
        if mode >= modes:
            raise InputError("type", f"{inputs.type!r} is type {mode}, but this union ControlNet knows {modes} types "
                                     f"(0..{modes - 1})")
        return self.Outputs(control_net=replace(control, mode=mode))


class CLIPVisionEncode(Node):
    """Encode images with a CLIP image encoder, for image prompts (UnclipConditioning). crop center
    takes the centre square after scaling the short side to the encoder's size; none squashes the
    whole image to a square."""

    category = "conditioning"

    class Inputs(NodeInputs):
        clip_vision: CLIP_VISION.annotation
        image: IMAGE.annotation
        crop: Literal["center", "none"] = "center"

    class Outputs(NodeOutputs):
        clip_vision_output: CLIP_VISION_OUTPUT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: CLIPVisionEncoderModel = inputs.clip_vision
        weight = model.visual_projection.weight
        pixels = clip_preprocess(inputs.image, model.config.image_size, crop=inputs.crop == "center")
        with torch.no_grad():
            output = model(pixels.to(weight.device, weight.dtype))
        return self.Outputs(clip_vision_output=CLIPVisionOutput(
            *(t.float().cpu() for t in (output.last_hidden_state, output.penultimate_hidden_states,
                                        output.image_embeds))))


class UnclipConditioning(Node):
    """Add images (their CLIP encoding) to a conditioning as prompts: for SD2.1-unCLIP models, and for
    SDXL in place of the pooled text vector ("revision"). noise_augmentation blurs the image's
    meaning (0: as it is, 1: pure noise); several add up, each with its strength."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        clip_vision_output: CLIP_VISION_OUTPUT.annotation
        strength: float = Field(1.0, ge=-10.0, le=10.0)
        noise_augmentation: float = Field(0.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.strength == 0.0:
            return self.Outputs(conditioning=inputs.conditioning)
        prompt = ImagePrompt(inputs.clip_vision_output.image_embeds, inputs.strength, inputs.noise_augmentation)
        return self.Outputs(conditioning=tuple(e.with_(image_prompts=(*e.image_prompts, prompt))
                                               for e in inputs.conditioning))


NODES = [TextEncode, TextEncodeSDXL, TextEncodeSD3, TextEncodeFlux, FluxGuidance, ClassLabel,
         UnconditionalConditioning, SetClipSkip, ConditioningCombine, ConditioningConcat, ConditioningSetArea,
         ConditioningSetMask, ConditioningSetTimestepRange, ConditioningZeroOut, ApplyControlNet,
         ApplyControlNetSimple, SetUnionControlNetType, CLIPVisionEncode, UnclipConditioning]
