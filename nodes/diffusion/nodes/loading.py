"""Loader nodes: checkpoints, VAEs, LoRAs and ControlNets from the model folders."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional

import torch
from pydantic import Field

from nodegraph.node import InputProblem, Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONTROL_NET, MODEL, VAE, Choices

from ..architectures import lora
from ..architectures import lora_transformers
from ..architectures.detection import TEXT_ENCODER_SLOTS, Detection, FileKind, ModelFamily, detect
from ..architectures.controlnets import load_any_controlnet
from ..architectures.stable_diffusion import LatentFormat, load_checkpoint, load_vae
from ..architectures.transformers import (
    TRANSFORMER_FAMILIES,
    TextEncoderSetError,
    assign_text_encoder_slots,
    load_text_encoder_file,
    load_transformer,
    read_text_encoder_file,
)
from ..components import DiffusionModel, TextEncoders, VAEModel
from ..sampling.model_sampling import ModelSampling
from ..text.clip_tokenizer import CLIPTokenizer
from ..vae.autoencoder import latent_scaling_for
from ..vision.clip_vision import CLIPVisionLoadError, load_clip_vision_file
from ..weights.safetensors_io import CheckpointError
from . import folders
from .common import CLIP_VISION, InputError, run_device

logger = logging.getLogger(__name__)


def _file_fingerprint(kind: str, name: Any) -> str | None:
    try:
        stat = folders.resolve(kind, str(name)).stat()
    except (OSError, folders.ModelFolderError):
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _model_files(kind: str) -> Choices:
    """The files of `kind`; a name not among them is explained by the folders searched."""
    return Choices(lambda: folders.list_files(kind), kind=kind,
                   explain_missing=lambda name: folders.missing_file_message(kind, name))


def model_file(kind: str) -> Any:
    """The annotation of an input naming a file of `kind` (a model folder kind: "loras", ...)."""
    return Annotated[str, _model_files(kind), Field(description=f"A file under the {kind} model folder(s).")]


def _optional_model_file(kind: str) -> Any:
    # Choices outside Optional, so that a name given is checked against the folder like a required one.
    return Annotated[Optional[str], _model_files(kind),
                     Field(description=f"A file under the {kind} model folder(s), or none.")]


def _resolve(kind: str, name: str, input_name: str = "name") -> Path:
    try:
        return folders.resolve(kind, name)
    except folders.ModelFolderError as error:
        raise InputError(input_name, str(error)) from None


class ModelFileNode(Node):
    """A node that reads one file of a model kind (`model_kind`, a model folder kind), named by its
    `name` input (declared `name: model_file(model_kind)`). The file's size and mtime are the
    node's fingerprint, so a changed file runs it again."""

    model_kind: ClassVar[str]

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint(cls.model_kind, literals.get("name"))

    def model_path(self, name: str) -> Path:
        """The file `name` of this node's kind; a name not in its folders is an InputError on `name`."""
        return _resolve(self.model_kind, name)


def _detect(path: Path, name: str, input_name: str) -> Detection:
    """What a model file holds; an architecture this library cannot build is refused by name."""
    try:
        detection = detect(path)
    except CheckpointError as error:
        raise InputError(input_name, str(error)) from None
    if detection.kind is FileKind.UNSUPPORTED:
        raise InputError(input_name, f"{name} is {detection.describe()}")
    return detection


@functools.lru_cache(maxsize=64)
def _detect_header(path: str, size: int, mtime_ns: int) -> Detection:
    """detect() of a safetensors file, once per version of the file (size and mtime are the key):
    validation asks on every run."""
    return detect(path)


def _architecture_problems(kind: str, name: Any, input_name: str = "name") -> list[InputProblem]:
    """A model file whose safetensors header shows an architecture this library cannot build (or
    that is no readable weight file), refused at validation. Pickles and diffusers folders are
    checked when they load: reading what they hold costs as much as loading them."""
    try:
        path = folders.resolve(kind, str(name))
    except folders.ModelFolderError:
        return []  # a name not in the folders is reported by the input's choices
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return []
    stat = path.stat()
    try:
        detection = _detect_header(str(path), stat.st_size, stat.st_mtime_ns)
    except CheckpointError as error:
        return [InputProblem(input_name, str(error), "invalid_model_file", {"kind": kind})]
    if detection.kind is FileKind.UNSUPPORTED:
        return [InputProblem(input_name, f"{name} is {detection.describe()}", "unsupported_architecture",
                             {"kind": kind, "architecture": detection.architecture})]
    return []


def _text_encoders(encoders: dict[str, torch.nn.Module], family: ModelFamily) -> TextEncoders:
    return TextEncoders(
        encoders=encoders,
        tokenizer=CLIPTokenizer.from_default(),
        family=family,
        embeddings_dirs=tuple(str(folder) for folder in folders.search_folders("embeddings")),
    )


def _load_model_file(
    path: Path, name: str, input_name: str, ctx: RunContext, storage_dtype: torch.dtype | None = None,
) -> tuple[DiffusionModel, TextEncoders | None, VAEModel | None]:
    """A U-Net checkpoint, an SD3/Flux/DiT/PixArt single file or a diffusion model alone -> (model, its
    text encoders or None when the file has none, its VAE or None)."""
    detection = _detect(path, name, input_name)
    if detection.denoiser in TRANSFORMER_FAMILIES:
        loaded = load_transformer(path, device=run_device(ctx), storage_dtype=storage_dtype)
        network, sampling, encoders = loaded.network, loaded.sampling, loaded.text_encoders
    else:
        if storage_dtype is not None:
            ctx.log.warning("%s: weights are kept in %s for transformer models (SD3, Flux, DiT, PixArt) only; "
                            "this U-Net loads in its default dtype", name, storage_dtype)
        loaded = load_checkpoint(path, device=run_device(ctx))  # type: ignore[assignment]
        network, sampling, encoders = loaded.unet, ModelSampling.for_prediction(loaded.prediction), loaded.text_encoders
    ctx.log.info("%s: %s", name, loaded.detection.describe())
    vae = None if loaded.vae is None else VAEModel(loaded.vae, loaded.latent_format, name)
    model = DiffusionModel(network=network, family=loaded.family, sampling=sampling,
                           latent_format=loaded.latent_format, name=name, preview_vae=vae)
    clip = _text_encoders(encoders, loaded.family) if encoders else None
    return model, clip, vae


class LoadCheckpoint(ModelFileNode):
    """Load a checkpoint: SD1.x, SD2.x, SDXL, SD3/SD3.5, Flux.1, DiT or PixArt-α/Σ, as a single file
    or a diffusers folder. The architecture is detected from the weights. Outputs the diffusion model
    and, when the file holds them, its text encoders and VAE (SD3.5, most Flux files and the released
    DiT and PixArt files have none: load them with LoadTextEncoder(s) and LoadVAE)."""

    category = "loaders"
    model_kind = "checkpoints"
    version = 2

    class Inputs(NodeInputs):
        name: model_file("checkpoints")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        clip: CLIP.annotation
        vae: VAE.annotation

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        return _architecture_problems("checkpoints", literals["name"])

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model, clip, vae = _load_model_file(self.model_path(inputs.name), inputs.name, "name", ctx)
        return self.Outputs(model=model, clip=clip, vae=vae)


# ComfyUI's UNETLoader choices. Weights are then stored in the 8-bit format and each layer is
# upcast when it runs; "fast" (fp8 matrix products on recent GPUs in ComfyUI) computes the same way here.
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
WeightDtype = Literal["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


class LoadDiffusionModel(ModelFileNode):
    """Load a diffusion model alone (no VAE, no text encoders): a Flux.1, SD3, DiT or PixArt
    transformer or an SD U-Net from the diffusion_models (or unet) folder. weight_dtype fp8 keeps a
    transformer's weights in 8 bits (a quarter of float32's memory), each layer upcast when it runs;
    "default" keeps the file's own storage (fp8 files stay fp8)."""

    category = "loaders"
    model_kind = "diffusion_models"

    class Inputs(NodeInputs):
        name: model_file("diffusion_models")  # type: ignore[valid-type]
        weight_dtype: WeightDtype = Field("default", description="How the weights are stored in memory.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        return _architecture_problems("diffusion_models", literals["name"])

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = self.model_path(inputs.name)
        model, _, _ = _load_model_file(path, inputs.name, "name", ctx, WEIGHT_DTYPES[inputs.weight_dtype])
        return self.Outputs(model=model)


# What each ComfyUI text-encoder type takes (slots that must / may be filled) and the model family
# it conditions. A single CLIP under "stable_diffusion" conditions the family its size tells. A T5
# under "pixart" conditions either PixArt: Σ's 300-token padding holds α's 120 tokens, and the
# padding is masked, so the result is the same (only prompts over 119 tokens keep more for α).
_SINGLE_CLIP_FAMILY = {"clip_l": ModelFamily.SD1, "clip_h": ModelFamily.SD2, "clip_g": ModelFamily.SDXL_REFINER}
_TEXT_ENCODER_TYPES: dict[str, tuple[frozenset[str], ModelFamily | None]] = {
    "stable_diffusion": (frozenset({"clip_l", "clip_h", "clip_g"}), None),
    "sd3": (frozenset({"clip_l", "clip_g", "t5xxl"}), ModelFamily.SD3),
    "sdxl": (frozenset({"clip_l", "clip_g"}), ModelFamily.SDXL),
    "flux": (frozenset({"clip_l", "t5xxl"}), ModelFamily.FLUX),
    "pixart": (frozenset({"t5xxl"}), ModelFamily.PIXART_SIGMA),
}
# Families whose conditioning needs every slot of its type (SD3 fills a missing encoder with zeros).
_ALL_SLOTS_NEEDED = {ModelFamily.SDXL, ModelFamily.FLUX}
SingleTextEncoderType = Literal["stable_diffusion", "sd3", "pixart"]
DualTextEncoderType = Literal["sdxl", "sd3", "flux"]
LoadDevice = Literal["default", "cpu"]


def _load_text_encoders(names: list[tuple[str, str]], encoder_type: str, device: str,
                        ctx: RunContext) -> TextEncoders:
    """(input name, file name) pairs -> one CLIP value of the family `encoder_type` conditions."""
    files = []
    for input_name, name in names:
        try:
            files.append(read_text_encoder_file(_resolve("text_encoders", name, input_name)))
        except CheckpointError as error:
            raise InputError(input_name, str(error)) from None
    try:
        slots = assign_text_encoder_slots(files)
    except TextEncoderSetError as error:
        raise InputError(names[0][0], str(error)) from None
    allowed, family = _TEXT_ENCODER_TYPES[encoder_type]
    for (input_name, name), file_slots in zip(names, slots):
        wrong = [slot for slot in file_slots.values() if slot not in allowed]
        if wrong:
            raise InputError(input_name, f"{name} is a {wrong[0]} text encoder, which type {encoder_type!r} does "
                                         f"not take (it takes {', '.join(sorted(allowed))})")
    filled = {slot for file_slots in slots for slot in file_slots.values()}
    if family is None:
        (slot,) = filled  # a single-file type
        family = _SINGLE_CLIP_FAMILY[slot]
    missing = sorted(allowed - filled)
    if family in _ALL_SLOTS_NEEDED and missing:
        raise InputError(names[0][0], f"type {encoder_type!r} needs {', '.join(sorted(allowed))}; "
                                      f"missing: {', '.join(missing)}")
    target = "cpu" if device == "cpu" else run_device(ctx)
    encoders: dict[str, torch.nn.Module] = {}
    for (input_name, name), file, file_slots in zip(names, files, slots):
        encoders.update(load_text_encoder_file(file.path, device=target, slots=file_slots))
        ctx.log.info("%s: %s", name, ", ".join(sorted(set(file_slots.values()))))
    # Conditioning order (SDXL concatenates CLIP-L's states before CLIP-G's), whatever the file order.
    return _text_encoders(dict(sorted(encoders.items(), key=lambda item: TEXT_ENCODER_SLOTS.index(item[0]))), family)


class LoadTextEncoder(ModelFileNode):
    """Load one text encoder from the text_encoders (or clip) folder. type: what it conditions:
    stable_diffusion (a CLIP for SD1.x/SD2.x), sd3 (one of SD3's CLIP-L, CLIP-G or T5-XXL; the
    others count as empty) or pixart (T5-XXL for PixArt-α and Σ)."""

    category = "loaders"
    model_kind = "text_encoders"

    class Inputs(NodeInputs):
        name: model_file("text_encoders")  # type: ignore[valid-type]
        type: SingleTextEncoderType = Field("stable_diffusion", description="The model family it conditions.")
        device: LoadDevice = Field("default", description="cpu: keep the encoder on the CPU (saves GPU memory).")

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(clip=_load_text_encoders([("name", inputs.name)], inputs.type, inputs.device, ctx))


class LoadTextEncoders(Node):
    """Load two or three text encoders into one: SDXL (CLIP-L + CLIP-G), SD3 (any of CLIP-L, CLIP-G,
    T5-XXL; all three for TripleCLIPLoader) or Flux.1 (CLIP-L + T5-XXL). Which file is which is
    read from the weights (T5 vs CLIP; of two CLIPs the larger is CLIP-G), so the order does not matter."""

    category = "loaders"

    class Inputs(NodeInputs):
        name1: model_file("text_encoders")  # type: ignore[valid-type]
        name2: model_file("text_encoders")  # type: ignore[valid-type]
        name3: _optional_model_file("text_encoders") = None  # type: ignore[valid-type]
        type: DualTextEncoderType = Field("sdxl", description="The model family they condition.")
        device: LoadDevice = Field("default", description="cpu: keep the encoders on the CPU (saves GPU memory).")

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        parts = [_file_fingerprint("text_encoders", literals.get(name)) for name in ("name1", "name2", "name3")]
        return "|".join(str(part) for part in parts)

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        names = [(key, value) for key, value in (("name1", inputs.name1), ("name2", inputs.name2),
                                                  ("name3", inputs.name3)) if value is not None]
        return self.Outputs(clip=_load_text_encoders(names, inputs.type, inputs.device, ctx))


VAEFamily = Literal["auto", "sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux", "flux_schnell", "dit",
                    "pixart_alpha", "pixart_sigma"]


class LoadVAE(ModelFileNode):
    """Load a standalone VAE (to replace a checkpoint's own, or for models that come without one).
    family: the latent space it serves, which sets its latent scaling. auto: from the latent
    channels, 4 = SD1/SD2 and 16 = Flux.1 (ae.safetensors); pair SDXL VAEs with sdxl (or
    pixart_sigma, which samples in SDXL's latent space) and SD3's 16-channel VAE with sd3. DiT and
    PixArt-α use SD1's."""

    category = "loaders"
    model_kind = "vae"
    version = 2

    class Inputs(NodeInputs):
        name: model_file("vae")  # type: ignore[valid-type]
        family: VAEFamily = Field("auto", description="Latent space the VAE serves.")

    class Outputs(NodeOutputs):
        vae: VAE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = self.model_path(inputs.name)
        try:
            loaded = load_vae(path, family=None if inputs.family == "auto" else inputs.family,
                              device=run_device(ctx))
        except CheckpointError as error:
            raise InputError("name", str(error)) from None
        latent_format = loaded.latent_format
        if latent_format is None:
            family = ModelFamily.FLUX if loaded.config.latent_channels == 16 else ModelFamily.SD1
            ctx.log.info("%s: %d latent channels, taken as a %s VAE", inputs.name, loaded.config.latent_channels,
                         family.label)
            scaling = latent_scaling_for(family.latent_family)
            latent_format = LatentFormat(loaded.config.latent_channels, scaling.scaling_factor,
                                         scaling.shift_factor, loaded.config.downscale_factor)
        return self.Outputs(vae=VAEModel(loaded.vae, latent_format, inputs.name))


class LoadLora(ModelFileNode):
    """Apply a LoRA (kohya, diffusers/PEFT or LoCon format; for SD3 and Flux also ComfyUI/BFL,
    ai-toolkit and XLabs names) to a model and its text encoders, with separate strengths. The base
    weights are not changed: the LoRA is applied while the model runs. Chain several to stack them;
    leave `clip` unconnected to patch the diffusion model only."""

    category = "loaders"
    model_kind = "loras"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        clip: Optional[CLIP.annotation] = None
        name: model_file("loras")  # type: ignore[valid-type]
        strength_model: float = Field(1.0, ge=-20.0, le=20.0, description="Strength on the diffusion model.")
        strength_clip: float = Field(1.0, ge=-20.0, le=20.0, description="Strength on the text encoders.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        clip: Optional[CLIP.annotation]

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = self.model_path(inputs.name)
        try:
            lora_file = lora.load_lora(path)
        except lora.LoraFormatError as error:
            raise InputError("name", str(error)) from None
        model: DiffusionModel = inputs.model
        clip: TextEncoders | None = inputs.clip
        family = model.family.latent_family
        if lora_file.family is not None and lora_file.family != family:
            raise InputError("name", f"LoRA {inputs.name} was made for {lora_file.family} models, this is a "
                                     f"{family} model ({len(lora_file.module_names)} LoRA modules)")
        encoders = dict(clip.encoders) if clip is not None else {}
        if model.family in lora_transformers.TRANSFORMER_FAMILIES:
            try:
                targets = {"diffusion_model": model.network.state_dict(),
                           **{slot: encoder.state_dict() for slot, encoder in encoders.items()}}
                match = lora_transformers.match_lora(lora_file, model.family, targets)
            except lora.LoraFormatError as error:
                raise InputError("name", str(error)) from None
            except ValueError as error:  # text encoders of another family
                raise InputError("clip", str(error)) from None
            unet_deltas = match.deltas.pop("diffusion_model")
            clip_deltas = {slot: deltas for slot, deltas in match.deltas.items() if deltas}
            used = set(match.used)
        else:
            unet_deltas, _ = lora_file.deltas("unet", model.network.state_dict())
            used = {delta.source for delta in unet_deltas.values()}
            clip_deltas = {}
            for slot, encoder in encoders.items():
                deltas, _ = lora_file.deltas(slot, encoder.state_dict())
                used |= {delta.source for delta in deltas.values()}
                if deltas:
                    clip_deltas[slot] = deltas
        total = len(lora_file.module_names)
        if not used:
            raise InputError(
                "name",
                f"LoRA {inputs.name} matches none of this {model.family.value} model's layers "
                f"(0 of {total} LoRA modules matched): it was made for another architecture",
            )
        if len(used) < total:
            ctx.log.warning("LoRA %s: %d of %d modules matched this %s model; the rest are ignored",
                            inputs.name, len(used), total, model.family.value)
        if unet_deltas:
            model = model.with_patch(unet_deltas, inputs.strength_model)
        if clip is not None and clip_deltas:
            clip = clip.with_patches(clip_deltas, inputs.strength_clip)
        return self.Outputs(model=model, clip=clip)


class LoadControlNet(ModelFileNode):
    """Load a ControlNet: SD1.x, SD2.x or SDXL (original or diffusers layout), SD3/SD3.5 (InstantX,
    Stability's SD3.5-large canny/depth/blur) or Flux.1 (InstantX, Shakker-Labs union, XLabs)."""

    category = "loaders"
    model_kind = "controlnet"

    class Inputs(NodeInputs):
        name: model_file("controlnet")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        control_net: CONTROL_NET.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        loaded = load_any_controlnet(self.model_path(inputs.name), device=run_device(ctx))
        return self.Outputs(control_net=loaded)


class LoadCLIPVision(ModelFileNode):
    """Load a CLIP image encoder (OpenAI ViT-L/14, OpenCLIP ViT-H/14 or bigG/14) from the clip_vision
    folder, for image prompts (UnclipConditioning): a ComfyUI clip_vision file, or a whole CLIP model
    in the HF or OpenCLIP layout (its text tower is left out)."""

    category = "loaders"
    model_kind = "clip_vision"

    class Inputs(NodeInputs):
        name: model_file("clip_vision")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        clip_vision: CLIP_VISION.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = self.model_path(inputs.name)
        try:
            model = load_clip_vision_file(str(path), device=run_device(ctx))
        except (CLIPVisionLoadError, CheckpointError) as error:
            raise InputError("name", str(error)) from None
        ctx.log.info("%s: CLIP vision, width %d, %d layers, embeddings of %d", inputs.name, model.config.width,
                     model.config.layers, model.config.projection_dim)
        return self.Outputs(clip_vision=model)


class LoadUnclipCheckpoint(ModelFileNode):
    """Load an unCLIP checkpoint (SD2.1-unCLIP: Stability's unclip-h/-l and models fine-tuned from them)
    with the CLIP image encoder it carries: the diffusion model, text encoders and VAE as
    LoadCheckpoint, and the image encoder for CLIPVisionEncode (the image prompts go in through
    UnclipConditioning)."""

    category = "loaders"
    model_kind = "checkpoints"

    class Inputs(NodeInputs):
        name: model_file("checkpoints")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        clip: CLIP.annotation
        vae: VAE.annotation
        clip_vision: CLIP_VISION.annotation

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        return _architecture_problems("checkpoints", literals["name"])

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = self.model_path(inputs.name)
        if "image_encoder" not in _detect(path, inputs.name, "name").components:
            raise InputError("name", f"{inputs.name} holds no CLIP image encoder (embedder.model.visual.): it is no "
                                     "unCLIP checkpoint; load it with LoadCheckpoint and an encoder with LoadCLIPVision")
        model, clip, vae = _load_model_file(path, inputs.name, "name", ctx)
        try:
            vision = load_clip_vision_file(str(path), device=run_device(ctx))
        except (CLIPVisionLoadError, CheckpointError) as error:
            raise InputError("name", str(error)) from None
        return self.Outputs(model=model, clip=clip, vae=vae, clip_vision=vision)


NODES = [LoadCheckpoint, LoadDiffusionModel, LoadTextEncoder, LoadTextEncoders, LoadVAE, LoadLora,
         LoadControlNet, LoadCLIPVision, LoadUnclipCheckpoint]
