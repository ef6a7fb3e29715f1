"""Loader nodes: checkpoints, VAEs, LoRAs and ControlNets from the model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONTROL_NET, MODEL, VAE, Choices

from ..architectures.detection import ModelFamily
from ..architectures.stable_diffusion import load_checkpoint, load_controlnet, load_vae
from ..architectures import lora
from ..components import DiffusionModel, TextEncoders, VAEModel
from ..sampling.model_sampling import ModelSampling
from ..text.clip_tokenizer import CLIPTokenizer
from . import folders
from .common import InputError, run_device


def _file_fingerprint(kind: str, name: Any) -> str | None:
    try:
        stat = folders.resolve(kind, str(name)).stat()
    except (OSError, folders.ModelFolderError):
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _model_file(kind: str) -> Any:
    return Annotated[str, Choices(lambda: folders.list_files(kind), kind=kind),
                     Field(description=f"A file under the {kind} model folder(s).")]


def _resolve(kind: str, name: str, input_name: str = "name") -> Path:
    try:
        return folders.resolve(kind, name)
    except folders.ModelFolderError as error:
        raise InputError(input_name, str(error)) from None


class LoadCheckpoint(Node):
    """Load a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL; single file or diffusers folder): the
    diffusion model, its text encoders and its VAE. The architecture is detected from the weights."""

    category = "loaders"

    class Inputs(NodeInputs):
        name: _model_file("checkpoints")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        clip: CLIP.annotation
        vae: VAE.annotation

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint("checkpoints", literals.get("name"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = _resolve("checkpoints", inputs.name)
        loaded = load_checkpoint(path, device=run_device(ctx))
        ctx.log.info("%s: %s", inputs.name, loaded.detection.describe())
        model = DiffusionModel(
            network=loaded.unet,
            family=loaded.family,
            sampling=ModelSampling.for_prediction(loaded.prediction),
            latent_format=loaded.latent_format,
            name=inputs.name,
        )
        clip = TextEncoders(
            encoders=loaded.text_encoders,
            tokenizer=CLIPTokenizer.from_default(),
            family=loaded.family,
            embeddings_dirs=tuple(str(folder) for folder in folders.search_folders("embeddings")),
        )
        vae = None if loaded.vae is None else VAEModel(loaded.vae, loaded.latent_format, inputs.name)
        return self.Outputs(model=model, clip=clip, vae=vae)


class LoadVAE(Node):
    """Load a standalone VAE (to replace a checkpoint's own). Its latent space is taken as SD1/SD2's
    unless the file says otherwise; pair SDXL VAEs with `family` = sdxl."""

    category = "loaders"

    class Inputs(NodeInputs):
        name: _model_file("vae")  # type: ignore[valid-type]
        family: ModelFamily = Field(ModelFamily.SD1, description="Latent space the VAE serves.")

    class Outputs(NodeOutputs):
        vae: VAE.annotation

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint("vae", literals.get("name"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        loaded = load_vae(_resolve("vae", inputs.name), family=inputs.family, device=run_device(ctx))
        assert loaded.latent_format is not None
        return self.Outputs(vae=VAEModel(loaded.vae, loaded.latent_format, inputs.name))


class LoadLora(Node):
    """Apply a LoRA (kohya, diffusers/PEFT or LoCon format) to a model and its text encoders, with
    separate strengths. The base weights are not changed: the LoRA is applied while the model runs.
    Chain several to stack them; leave `clip` unconnected to patch the diffusion model only."""

    category = "loaders"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        clip: Optional[CLIP.annotation] = None
        name: _model_file("loras")  # type: ignore[valid-type]
        strength_model: float = Field(1.0, ge=-20.0, le=20.0, description="Strength on the diffusion model.")
        strength_clip: float = Field(1.0, ge=-20.0, le=20.0, description="Strength on the text encoders.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        clip: Optional[CLIP.annotation]

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint("loras", literals.get("name"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = _resolve("loras", inputs.name)
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
        unet_deltas, _ = lora_file.deltas("unet", model.network.state_dict())
        used = {delta.source for delta in unet_deltas.values()}
        clip_deltas = {}
        for slot, encoder in (clip.encoders.items() if clip is not None else ()):
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


class LoadControlNet(Node):
    """Load a ControlNet (original or diffusers layout) for SD1.x or SDXL."""

    category = "loaders"

    class Inputs(NodeInputs):
        name: _model_file("controlnet")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        control_net: CONTROL_NET.annotation

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint("controlnet", literals.get("name"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        loaded = load_controlnet(_resolve("controlnet", inputs.name), device=run_device(ctx))
        return self.Outputs(control_net=loaded)


NODES = [LoadCheckpoint, LoadVAE, LoadLora, LoadControlNet]
