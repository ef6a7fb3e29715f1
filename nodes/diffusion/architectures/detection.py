"""What a weight file or diffusers folder holds, told from its key names and shapes alone.

Kinds: SD1.x, SD2.x, SDXL base, SDXL refiner checkpoints and U-Nets (each possibly an inpainting
model: ``in_channels == 2 * out_channels + 1``), ControlNets (SD1/SD2/SDXL), VAEs, text encoders,
LoRA and textual-inversion embedding files. Family tests look at layout, never at sizes alone, so
scaled-down models of a layout are detected and loaded like the full ones:

- SDXL-type U-Net: it has the ``label_emb`` (ADM) vector embedding. Base vs refiner: the refiner
  carries only the OpenCLIP bigG encoder (``conditioner.embedders.0.model.``), the base CLIP-L
  and bigG; a U-Net alone is told by its ADM width (2560 refiner, else base).
- SD2 vs SD1: the text encoder is OpenCLIP (``cond_stage_model.model.``) vs HF CLIP
  (``cond_stage_model.transformer.``); a U-Net alone by its transformer ``proj_in`` being linear
  (SD2) or a 1x1 conv (SD1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from ..networks import controlnet as controlnet_module
from ..networks import unet as unet_module
from ..text import clip as text_encoder_module
from ..vae import autoencoder as vae_module
from ..weights.files import DiffusersFolder, WeightFile, open_weights
from ..weights.loading import StateDictMismatchError
from ..weights.safetensors_io import CheckpointError


class ModelFamily(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"

    @property
    def latent_family(self) -> str:
        """The family name the VAE and text-encoder modules key their tables by."""
        return "sdxl" if self is ModelFamily.SDXL_REFINER else self.value


class FileKind(str, Enum):
    CHECKPOINT = "checkpoint"  # a diffusion U-Net, usually with VAE and text encoders
    UNET = "unet"  # a diffusion U-Net alone
    CONTROLNET = "controlnet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    LORA = "lora"
    EMBEDDING = "embedding"  # textual inversion
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ComponentKeys:
    """Where one component's weights lie in a file: a key prefix and a naming layout.

    layout: ``ldm`` (U-Net/VAE/ControlNet in the original single-file naming), ``diffusers``,
    ``hf`` (transformers CLIP naming, with or without ``text_model.``) or ``openclip``.
    """

    prefix: str
    layout: str


# Entries of full checkpoints that hold no weights our modules use: LDM's noise-schedule buffers,
# EMA copies (the live weights are the ones under model.diffusion_model), SGM's sigma table, and
# marker keys some trainers add. They are reported as ignored, never as unexpected.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr",
})
_IGNORED_PREFIXES = ("model_ema.", "denoiser.",
                     *(f"{vae_prefix}{training}" for vae_prefix in ("first_stage_model.", "")
                       for training in vae_module.TRAINING_ONLY_PREFIXES))

V_PRED_MARKER = "v_pred"
# Adapter files: LoRA / LoCon (lora_up/down, PEFT lora_A/B), LoHa (hada_*), LoKr (lokr_*).
_LORA_KEY = re.compile(r"(^|\.|_)(lora_up|lora_down|lora_A|lora_B|hada_w[12]_[ab]|lokr_w[12](_[ab])?)(\.|$)")
_EMBEDDING_KEYS = ({"emb_params"}, {"string_to_param.*"}, {"clip_l", "clip_g"}, {"clip_g"}, {"clip_l"})

_TEXT_ENCODER_PREFIX = re.compile(r"^(cond_stage_model\.(transformer|model)\.|conditioner\.embedders\.(\d+)\.(transformer|model)\.)")

_SDXL_REFINER_ADM_CHANNELS = 2560  # pooled bigG (1280) + 5 x 256 size/aesthetic embeddings


@dataclass(frozen=True)
class Detection:
    """What a weight file (or diffusers folder) holds, from its keys and shapes alone.

    components: component name (``unet``, ``vae``, ``controlnet``, ``clip_l``, ``clip_h``,
    ``clip_g``) -> where its keys are. Text encoders are listed in conditioning order.
    unclaimed_keys: keys no component or ignore rule accounts for.
    """

    path: str
    kind: FileKind
    family: ModelFamily | None = None
    inpainting: bool = False
    components: dict[str, ComponentKeys] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()
    unclaimed_keys: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short phrase for messages: 'an SDXL refiner checkpoint (unet, vae, clip_g)'."""
        family = {
            ModelFamily.SD1: "SD1.x", ModelFamily.SD2: "SD2.x", ModelFamily.SDXL: "SDXL",
            ModelFamily.SDXL_REFINER: "SDXL refiner",
        }.get(self.family, "") if self.family else ""
        what = {
            FileKind.CHECKPOINT: "checkpoint", FileKind.UNET: "U-Net", FileKind.CONTROLNET: "ControlNet",
            FileKind.VAE: "VAE", FileKind.TEXT_ENCODER: "text encoder", FileKind.LORA: "LoRA/adapter",
            FileKind.EMBEDDING: "textual-inversion embedding", FileKind.UNKNOWN: "file of unknown kind",
        }[self.kind]
        words = " ".join(w for w in (family, "inpainting" if self.inpainting else "", what) if w)
        article = "an" if words.startswith("SD") else "a"
        parts = f" ({', '.join(self.components)})" if self.components else ""
        return f"{article} {words}{parts}"


# The model modules' own errors for weights that do not fit their layout.
_LAYOUT_ERRORS = (unet_module.UNetConfigError, vae_module.VAELoadError, text_encoder_module.TextEncoderLoadError)


@contextmanager
def component_errors(path: str | os.PathLike[str], component: str) -> Iterator[None]:
    """Re-raise a model module's layout error as a StateDictMismatchError naming the file and component."""
    try:
        yield
    except _LAYOUT_ERRORS as exc:
        raise StateDictMismatchError(path, f"{component}: {exc}") from exc


def meta_state_dict(shapes: Mapping[str, Sequence[int]], prefix: str = "") -> dict[str, Tensor]:
    """Shape-only tensors for keys under `prefix` (prefix removed): mappings run on these without data."""
    return {
        k[len(prefix):]: torch.empty(tuple(s), device="meta")
        for k, s in shapes.items()
        if k.startswith(prefix) and not is_ignored(k)
    }


def shapes_of(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def is_ignored(key: str) -> bool:
    return key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES)


def _has_prefix(keys: Sequence[str] | Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _text_encoder_components(keys: Sequence[str], path: str) -> dict[str, ComponentKeys]:
    """Text encoders of a single-file checkpoint, keyed by slot name, in conditioning order."""
    found: dict[str, ComponentKeys] = {}
    prefixes = sorted({m.group(1) for k in keys if (m := _TEXT_ENCODER_PREFIX.match(k))})
    for prefix in prefixes:
        openclip = prefix.endswith(".model.")
        if prefix.startswith("cond_stage_model."):
            slot = "clip_h" if openclip else "clip_l"
        else:
            slot = "clip_g" if openclip else "clip_l"
        if slot in found:
            raise CheckpointError(path, f"two text encoders claim slot {slot!r} ({found[slot].prefix}, {prefix})")
        found[slot] = ComponentKeys(prefix, "openclip" if openclip else "hf")
    order = {"clip_l": 0, "clip_h": 1, "clip_g": 2}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def unet_ldm_shapes(
    shapes: Mapping[str, Sequence[int]], keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    meta = meta_state_dict(shapes, keys.prefix)
    if keys.layout == "diffusers":
        with component_errors(path, "unet"):
            meta = unet_module.ldm_unet_keys_from_diffusers(meta)
    return shapes_of(meta)


def controlnet_ldm_shapes(
    shapes: Mapping[str, Sequence[int]], keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    meta = meta_state_dict(shapes, keys.prefix)
    if keys.layout == "diffusers":
        with component_errors(path, "controlnet"):
            meta = controlnet_module.ldm_controlnet_keys_from_diffusers(meta)
    return shapes_of(meta)


def _has_linear_proj_in(ldm_shapes: Mapping[str, Sequence[int]]) -> bool:
    proj_in = [s for k, s in ldm_shapes.items() if k.endswith(".proj_in.weight")]
    return bool(proj_in) and len(proj_in[0]) == 2


def _family_from_unet(
    ldm_shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str
) -> tuple[ModelFamily, bool]:
    """Family and inpainting flag of an LDM-layout U-Net (or ControlNet) from its layout."""
    if "input_blocks.0.0.weight" not in ldm_shapes:
        raise CheckpointError(path, "U-Net has no input_blocks.0.0.weight; not an SD U-Net layout")
    in_channels = ldm_shapes["input_blocks.0.0.weight"][1]
    out_conv = ldm_shapes.get("out.2.weight")
    inpainting = out_conv is not None and in_channels == 2 * out_conv[0] + 1
    if "label_emb.0.0.weight" in ldm_shapes:
        if text_encoders:
            refiner = list(text_encoders) == ["clip_g"]
        else:
            refiner = ldm_shapes["label_emb.0.0.weight"][1] == _SDXL_REFINER_ADM_CHANNELS
        return (ModelFamily.SDXL_REFINER if refiner else ModelFamily.SDXL), inpainting
    if "clip_h" in text_encoders:
        return ModelFamily.SD2, inpainting
    if "clip_l" in text_encoders:
        return ModelFamily.SD1, inpainting
    return (ModelFamily.SD2 if _has_linear_proj_in(ldm_shapes) else ModelFamily.SD1), inpainting


def _claim(keys: Sequence[str], components: Mapping[str, ComponentKeys]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ignored, unclaimed = [], []
    for key in keys:
        if is_ignored(key):
            ignored.append(key)
        elif not any(key.startswith(c.prefix) for c in components.values()):
            unclaimed.append(key)
    return tuple(ignored), tuple(unclaimed)


def _is_lora(keys: Sequence[str]) -> bool:
    return any(_LORA_KEY.search(k) for k in keys)


def _is_embedding(keys: Sequence[str]) -> bool:
    names = {("string_to_param.*" if k.startswith("string_to_param.") else k) for k in keys}
    return any(names == pattern for pattern in _EMBEDDING_KEYS)


def _standalone_component(keys: Sequence[str], path: str) -> tuple[FileKind, dict[str, ComponentKeys]] | None:
    """A file holding one bare component (no checkpoint prefix), or one with just its own prefix."""
    key_set = set(keys)
    for prefix in ("control_model.", ""):
        if f"{prefix}input_hint_block.0.weight" in key_set:
            return FileKind.CONTROLNET, {"controlnet": ComponentKeys(prefix, "ldm")}
    if "controlnet_cond_embedding.conv_in.weight" in key_set:
        return FileKind.CONTROLNET, {"controlnet": ComponentKeys("", "diffusers")}
    if "input_blocks.0.0.weight" in key_set and "time_embed.0.weight" in key_set:
        return FileKind.UNET, {"unet": ComponentKeys("", "ldm")}
    if "conv_in.weight" in key_set and "time_embedding.linear_1.weight" in key_set:
        return FileKind.UNET, {"unet": ComponentKeys("", "diffusers")}
    for prefix in ("first_stage_model.", "vae.", ""):
        if f"{prefix}encoder.conv_in.weight" in key_set and f"{prefix}decoder.conv_in.weight" in key_set:
            bare = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            layout = "diffusers" if vae_module.is_diffusers_vae_layout(bare) else "ldm"
            return FileKind.VAE, {"vae": ComponentKeys(prefix, layout)}
    text_encoders = _text_encoder_components(keys, path)
    if text_encoders:
        return FileKind.TEXT_ENCODER, text_encoders
    for prefix in ("", "text_model."):
        if f"{prefix}embeddings.token_embedding.weight" in key_set:
            return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "hf")}
    if "token_embedding.weight" in key_set and "positional_embedding" in key_set:
        return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "openclip")}
    return None


def detect_from_shapes(
    shapes: Mapping[str, Sequence[int]], path: str | os.PathLike[str] = "<shapes>"
) -> Detection:
    """Classify a single file's keys (full names, as stored) with their shapes."""
    path = str(path)
    keys = list(shapes)
    if _has_prefix(keys, "model.diffusion_model."):
        components: dict[str, ComponentKeys] = {"unet": ComponentKeys("model.diffusion_model.", "ldm")}
        if _has_prefix(keys, "first_stage_model."):
            bare = [k[len("first_stage_model."):] for k in keys if k.startswith("first_stage_model.")]
            layout = "diffusers" if vae_module.is_diffusers_vae_layout(bare) else "ldm"
            components["vae"] = ComponentKeys("first_stage_model.", layout)
        text_encoders = _text_encoder_components(keys, path)
        components.update(text_encoders)
        family, inpainting = _family_from_unet(unet_ldm_shapes(shapes, components["unet"], path), list(text_encoders), path)
        ignored, unclaimed = _claim(keys, components)
        return Detection(path, FileKind.CHECKPOINT, family, inpainting, components, ignored, unclaimed)
    if _is_lora(keys):
        return Detection(path, FileKind.LORA)
    if _is_embedding(keys):
        return Detection(path, FileKind.EMBEDDING)
    standalone = _standalone_component(keys, path)
    if standalone is None:
        return Detection(path, FileKind.UNKNOWN, unclaimed_keys=tuple(keys))
    kind, components = standalone
    family: ModelFamily | None = None
    inpainting = False
    if kind is FileKind.UNET:
        family, inpainting = _family_from_unet(unet_ldm_shapes(shapes, components["unet"], path), [], path)
    elif kind is FileKind.CONTROLNET:
        family, _ = _family_from_unet(controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)
    ignored, unclaimed = _claim(keys, components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed)


def _detect_folder(folder: DiffusersFolder) -> Detection:
    shapes = folder.shapes()
    path = str(folder.path)
    subs = folder.subfolders
    if subs == ["."]:
        inner = detect_from_shapes({k[2:]: s for k, s in shapes.items()}, path)
        components = {n: ComponentKeys("./" + c.prefix, c.layout) for n, c in inner.components.items()}
        return replace(inner, components=components)
    components: dict[str, ComponentKeys] = {}
    if "unet" in subs:
        components["unet"] = ComponentKeys("unet/", "diffusers")
    if "controlnet" in subs and "unet" not in subs:
        components["controlnet"] = ComponentKeys("controlnet/", "diffusers")
    if "vae" in subs:
        components["vae"] = ComponentKeys("vae/", "diffusers")
    unet_ldm = unet_ldm_shapes(shapes, components["unet"], path) if "unet" in components else {}
    sdxl_type = "label_emb.0.0.weight" in unet_ldm
    # diffusers names encoders by position; which CLIP each is follows from the pipeline type.
    if "text_encoder" in subs:
        slot = "clip_l" if sdxl_type or not _has_linear_proj_in(unet_ldm) else "clip_h"
        components[slot] = ComponentKeys("text_encoder/", "hf")
    if "text_encoder_2" in subs:
        components["clip_g"] = ComponentKeys("text_encoder_2/", "hf")
    if "unet" in components:
        text_encoders = [n for n in components if n.startswith("clip_")]
        family, inpainting = _family_from_unet(unet_ldm, text_encoders, path)
        kind = FileKind.CHECKPOINT
    elif "controlnet" in components:
        family, _ = _family_from_unet(controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)
        inpainting, kind = False, FileKind.CONTROLNET
    else:
        raise CheckpointError(path, f"diffusers folder has no unet/ or controlnet/ (found: {', '.join(subs)})")
    ignored, unclaimed = _claim(list(shapes), components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed)


def open_source(path: str | os.PathLike[str] | WeightFile) -> tuple[WeightFile, Detection]:
    if not isinstance(path, (str, os.PathLike)):
        return path, detect_from_shapes(path.shapes(), path.path)
    path = Path(path)
    if path.is_dir():
        folder = DiffusersFolder(path)
        return folder, _detect_folder(folder)
    source = open_weights(path)
    return source, detect_from_shapes(source.shapes(), path)


def detect(path: str | os.PathLike[str]) -> Detection:
    """What the file or diffusers folder at `path` holds (reads safetensors headers only)."""
    return open_source(path)[1]
