"""What a weight file or diffusers folder holds, told from its key names and shapes alone.

Kinds: SD1.x, SD2.x, SDXL base, SDXL refiner checkpoints and U-Nets (each possibly an inpainting
model: ``in_channels == 2 * out_channels + 1``), ControlNets (SD1/SD2/SDXL; SD3/SD3.5 and Flux ones in
:data:`CONTROLNETS`), VAEs, text encoders,
LoRA and textual-inversion embedding files. Family tests look at layout, never at sizes alone, so
scaled-down models of a layout are detected and loaded like the full ones:

- SDXL-type U-Net: it has the ``label_emb`` (ADM) vector embedding. Base vs refiner: the refiner
  carries only the OpenCLIP bigG encoder (``conditioner.embedders.0.model.``), the base CLIP-L
  and bigG; a U-Net alone is told by its ADM width (2560 refiner, else base).
- SD2 vs SD1: the text encoder is OpenCLIP (``cond_stage_model.model.``) vs HF CLIP
  (``cond_stage_model.transformer.``); a U-Net alone by its transformer ``proj_in`` being linear
  (SD2) or a 1x1 conv (SD1).
- SD2.1-unCLIP: SD2's layout with a ``label_emb`` vector (the noised CLIP image embedding) and the
  OpenCLIP-H text encoder, its image encoder under ``embedder.model.visual.`` (component
  ``image_encoder``); a U-Net alone is told from SDXL by attention at its first level.

Transformer denoisers (SD3 MMDiT, Flux, DiT, PixArt) register their layout tests in
:data:`DENOISERS`. PixArt-α vs Σ: the learned null caption ``y_embedder.y_embedding`` has α's 120
or Σ's 300 T5 tokens, and only α 1024-MS has micro-conditions (``csize_embedder``); diffusers
folders drop the null caption, so there the pipeline class in ``model_index.json`` says which.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from ..networks import controlnet as controlnet_module
from ..networks import dit as dit_module
from ..networks import flux as flux_module
from ..networks import flux_controlnet as flux_controlnet_module
from ..networks import mmdit as mmdit_module
from ..networks import mmdit_controlnet as mmdit_controlnet_module
from ..networks import pixart as pixart_module
from ..networks import unet as unet_module
from ..sampling.concat import FLUX_FILL_MASK_CHANNELS, ConcatError, ImageInput, classify_image_input
from ..text import clip as text_encoder_module
from ..text import t5 as t5_module
from ..vae import autoencoder as vae_module
from ..vision.clip_vision import UNCLIP_CHECKPOINT_VISION_PREFIX
from ..weights.files import DiffusersFolder, WeightFile, open_weights
from ..weights.loading import StateDictMismatchError
from ..weights.safetensors_io import CheckpointError


class ModelFamily(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"
    SD3 = "sd3"  # SD3 medium, SD3.5 medium / large / large-turbo (MMDiT)
    FLUX = "flux"  # Flux.1-dev and its guidance-distilled derivatives
    FLUX_SCHNELL = "flux_schnell"
    DIT = "dit"  # class-conditional DiT (facebookresearch/DiT): ImageNet labels, SD's VAE
    PIXART_ALPHA = "pixart_alpha"  # T5-conditioned DiT, SD's VAE, 120 T5 tokens
    PIXART_SIGMA = "pixart_sigma"  # T5-conditioned DiT, SDXL's VAE, 300 T5 tokens

    @property
    def latent_family(self) -> str:
        """The family name the VAE and text-encoder modules key their tables by: families that share
        another's latent space (DiT and PixArt-α SD1's, PixArt-Σ SDXL's) go by that family's name."""
        return _LATENT_FAMILIES.get(self, self.value)

    @property
    def label(self) -> str:
        """How people name the family: 'SD1.x', 'Flux.1-schnell'."""
        return _FAMILY_LABELS[self]


_FAMILY_LABELS = {
    ModelFamily.SD1: "SD1.x", ModelFamily.SD2: "SD2.x", ModelFamily.SDXL: "SDXL",
    ModelFamily.SDXL_REFINER: "SDXL refiner", ModelFamily.SD3: "SD3", ModelFamily.FLUX: "Flux.1-dev",
    ModelFamily.FLUX_SCHNELL: "Flux.1-schnell", ModelFamily.DIT: "DiT", ModelFamily.PIXART_ALPHA: "PixArt-α",
    ModelFamily.PIXART_SIGMA: "PixArt-Σ",
}
_LATENT_FAMILIES = {
    ModelFamily.SDXL_REFINER: "sdxl", ModelFamily.FLUX_SCHNELL: "flux", ModelFamily.DIT: "sd1",
    ModelFamily.PIXART_ALPHA: "sd1", ModelFamily.PIXART_SIGMA: "sdxl",
}


class FileKind(str, Enum):
    CHECKPOINT = "checkpoint"  # a denoising network, usually with VAE and text encoders
    DIFFUSION_MODEL = "diffusion_model"  # a denoising network alone (U-Net, MMDiT, Flux, DiT, PixArt)
    CONTROLNET = "controlnet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    LORA = "lora"
    EMBEDDING = "embedding"  # textual inversion
    UNSUPPORTED = "unsupported"  # a known architecture this library cannot build (named in the detection)
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ComponentKeys:
    """Where one component's weights lie in a file: a key prefix and a naming layout.

    layout: ``ldm`` (U-Net/VAE/ControlNet in the original single-file naming), ``original``
    (a transformer denoiser in its authors' naming), ``diffusers``, ``hf`` (transformers CLIP
    naming, with or without ``text_model.``), ``openclip`` or ``t5`` (transformers T5 naming).
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

# SD2.1-unCLIP files keep LDM's image-embedding noise schedule (buffers) and, beside the vision
# tower they use, what their image embedder kept of its CLIP model (text parts, statistics).
_UNCLIP_IGNORED_PREFIXES = ("noise_augmentor.", "embedder.")

V_PRED_MARKER = "v_pred"
# Adapter files: LoRA / LoCon (lora_up/down, PEFT lora_A/B), LoHa (hada_*), LoKr (lokr_*).
_LORA_KEY = re.compile(r"(^|\.|_)(lora_up|lora_down|lora_A|lora_B|hada_w[12]_[ab]|lokr_w[12](_[ab])?)(\.|$)")
_EMBEDDING_KEYS = ({"emb_params"}, {"string_to_param.*"}, {"clip_l", "clip_g"}, {"clip_g"}, {"clip_l"})

_TEXT_ENCODER_PREFIX = re.compile(r"^(cond_stage_model\.(transformer|model)\.|conditioner\.embedders\.(\d+)\.(transformer|model)\.)")
# SD3 and Flux single files keep each encoder under its slot name (CLIP-G in the HF layout there).
_SLOT_TEXT_ENCODER_PREFIX = re.compile(r"^text_encoders\.(clip_l|clip_g|t5xxl)\.transformer\.")
# Conditioning order of the text-encoder slots.
TEXT_ENCODER_SLOTS = ("clip_l", "clip_h", "clip_g", "t5xxl")
# The prefixes a single file's VAE is found under (Flux files from ComfyUI use ``vae.``).
_VAE_PREFIXES = ("first_stage_model.", "vae.")
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."

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
    architecture: str = ""  # for UNSUPPORTED files: what they hold ('AuraFlow')
    # What the denoiser takes beside the noisy latent: an image (InstructPix2Pix, Flux.1 Canny/Depth)
    # or a mask and image (inpainting: SD inpainting, Flux.1 Fill, also flagged `inpainting`).
    image_input: ImageInput = ImageInput.NONE

    @property
    def denoiser(self) -> str | None:
        """The component name of the denoising network (``unet``, ``mmdit``, ``flux``, ``dit``, ``pixart``), if any."""
        return next((d.component for d in DENOISERS if d.component in self.components), None)

    def describe(self) -> str:
        """A short phrase for messages: 'an SDXL refiner checkpoint (unet, vae, clip_g)'."""
        if self.kind is FileKind.UNSUPPORTED:
            return f"a {self.architecture} model, an architecture nodegraph cannot run yet"
        family = self.family.label if self.family else ""
        what = {
            FileKind.CHECKPOINT: "checkpoint",
            FileKind.DIFFUSION_MODEL: "U-Net" if self.denoiser == "unet" else "diffusion model",
            FileKind.CONTROLNET: "ControlNet", FileKind.VAE: "VAE", FileKind.TEXT_ENCODER: "text encoder",
            FileKind.LORA: "LoRA/adapter", FileKind.EMBEDDING: "textual-inversion embedding",
            FileKind.UNKNOWN: "file of unknown kind",
        }[self.kind]
        variant = "inpainting" if self.inpainting else "image-conditioned" if self.image_input is ImageInput.IMAGE else ""
        words = " ".join(w for w in (family, variant, what) if w)
        article = "an" if words.startswith("SD") else "a"
        parts = f" ({', '.join(self.components)})" if self.components else ""
        return f"{article} {words}{parts}"


# The model modules' own errors for weights that do not fit their layout.
_LAYOUT_ERRORS = (
    unet_module.UNetConfigError, mmdit_module.MMDiTConfigError, flux_module.FluxConfigError,
    dit_module.DiTConfigError, pixart_module.PixArtConfigError, vae_module.VAELoadError, text_encoder_module.TextEncoderLoadError, t5_module.T5LoadError,
)


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
    return (key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES)
            or (key.startswith(_UNCLIP_IGNORED_PREFIXES) and not key.startswith(UNCLIP_CHECKPOINT_VISION_PREFIX)))


def _has_prefix(keys: Sequence[str] | Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _text_encoder_components(keys: Sequence[str], path: str) -> dict[str, ComponentKeys]:
    """Text encoders of a single-file checkpoint, keyed by slot name, in conditioning order."""
    found: dict[str, ComponentKeys] = {}

    def claim(slot: str, keys: ComponentKeys) -> None:
        if slot in found:
            raise CheckpointError(path, f"two text encoders claim slot {slot!r} ({found[slot].prefix}, {keys.prefix})")
        found[slot] = keys

    for prefix in sorted({m.group(1) for k in keys if (m := _TEXT_ENCODER_PREFIX.match(k))}):
        openclip = prefix.endswith(".model.")
        if prefix.startswith("cond_stage_model."):
            slot = "clip_h" if openclip else "clip_l"
        else:
            slot = "clip_g" if openclip else "clip_l"
        claim(slot, ComponentKeys(prefix, "openclip" if openclip else "hf"))
    for prefix, slot in sorted({(m.group(0), m.group(1)) for k in keys if (m := _SLOT_TEXT_ENCODER_PREFIX.match(k))}):
        claim(slot, ComponentKeys(prefix, "t5" if slot == "t5xxl" else "hf"))
    return dict(sorted(found.items(), key=lambda item: TEXT_ENCODER_SLOTS.index(item[0])))


def unet_ldm_shapes(
    shapes: Mapping[str, Sequence[int]], keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    return original_shapes(shapes, "unet", keys, path)


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
        # SD2.1-unCLIP: SD2's text encoder, or (a U-Net alone) attention at the first level, which SDXL has not.
        if "clip_h" in text_encoders or (not text_encoders and _has_prefix(ldm_shapes, "input_blocks.1.1.")):
            return ModelFamily.SD2, inpainting
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


def _family_of_mmdit(shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str) -> tuple[ModelFamily, bool]:
    return ModelFamily.SD3, False


def _family_of_flux(shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str) -> tuple[ModelFamily, bool]:
    # Guidance distillation (dev) leaves the guidance embedder; schnell (timestep-distilled) has none.
    return (ModelFamily.FLUX if "guidance_in.in_layer.weight" in shapes else ModelFamily.FLUX_SCHNELL), False


def _family_of_dit(
    shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str
) -> tuple[ModelFamily, bool]:
    return ModelFamily.DIT, False


# The pipeline classes of diffusers' PixArt folders (model_index.json), which keep no null caption.
_PIXART_PIPELINES = {"PixArtAlphaPipeline": ModelFamily.PIXART_ALPHA, "PixArtSigmaPipeline": ModelFamily.PIXART_SIGMA}


def _family_of_pixart(
    shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str
) -> tuple[ModelFamily, bool]:
    if "csize_embedder.mlp.0.weight" in shapes:
        return ModelFamily.PIXART_ALPHA, False  # micro-conditions: α 1024-MS only
    null_caption = shapes.get("y_embedder.y_embedding")
    if null_caption is not None:
        alpha = null_caption[0] == pixart_module.ALPHA_TOKENS
        return (ModelFamily.PIXART_ALPHA if alpha else ModelFamily.PIXART_SIGMA), False
    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointError(path, f"model_index.json cannot be read: {error}") from error
        if pipeline in _PIXART_PIPELINES:
            return _PIXART_PIPELINES[pipeline], False
    # Nothing tells: Σ, the PixArt people run today (α 256/512 folders look the same).
    return ModelFamily.PIXART_SIGMA, False


def _is_ldm_unet(keys: Collection[str]) -> bool:
    return "input_blocks.0.0.weight" in keys and "time_embed.0.weight" in keys


def _is_diffusers_unet(keys: Collection[str]) -> bool:
    return "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys


@dataclass(frozen=True)
class DenoiserLayout:
    """How one family of denoising networks shows in weight files.

    component: its name in :attr:`Detection.components`; is_original / is_diffusers: tests on a
    component's key names (prefix removed) in its authors' and in diffusers' naming;
    to_original: diffusers names -> the authors' (the layout the network modules load);
    family: (original-layout shapes, text-encoder slots in the file, path) -> (family, inpainting);
    folder_slots: a diffusers folder's text-encoder subfolders -> slots (diffusers names encoders by
    position; the pipeline type says which is which); None: the U-Net's rule (SD1/SD2/SDXL).
    """

    component: str
    original_layout: str
    is_original: Callable[[Collection[str]], bool]
    is_diffusers: Callable[[Collection[str]], bool]
    to_original: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    family: Callable[[Mapping[str, Sequence[int]], Sequence[str], str], tuple[ModelFamily, bool]]
    folder_slots: Mapping[str, str] | None = None


# The registry of denoiser families: adding an architecture adds one line here (and its loader).
DENOISERS: tuple[DenoiserLayout, ...] = (
    DenoiserLayout("unet", "ldm", _is_ldm_unet, _is_diffusers_unet, unet_module.ldm_unet_keys_from_diffusers,
                   _family_from_unet),
    DenoiserLayout("mmdit", "original", mmdit_module.is_mmdit_layout, mmdit_module.is_diffusers_mmdit_layout,
                   mmdit_module.mmdit_keys_from_diffusers, _family_of_mmdit,
                   {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}),
    DenoiserLayout("flux", "original", flux_module.is_flux_layout, flux_module.is_diffusers_flux_layout,
                   flux_module.flux_keys_from_diffusers, _family_of_flux,
                   {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}),
    DenoiserLayout("dit", "original", dit_module.is_dit_layout, dit_module.is_diffusers_dit_layout,
                   dit_module.dit_keys_from_diffusers, _family_of_dit, {}),
    DenoiserLayout("pixart", "original", pixart_module.is_pixart_layout, pixart_module.is_diffusers_pixart_layout,
                   pixart_module.pixart_keys_from_diffusers, _family_of_pixart, {"text_encoder": "t5xxl"}),
)
_DENOISER_BY_COMPONENT = {d.component: d for d in DENOISERS}


@dataclass(frozen=True)
class ControlNetLayout:
    """How one family of transformer ControlNets shows in weight files.

    component: its name in :attr:`Detection.components`; layout: a test on key names (prefix removed)
    -> the layout they are in (``original``, ``diffusers``) or None; to_module: layout -> the mapping
    of its keys to the names the network module loads; family: key names -> the family it guides.
    """

    component: str
    layout: Callable[[Collection[str]], str | None]
    to_module: Mapping[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]]
    family: Callable[[Collection[str]], ModelFamily]


def _family_of_flux_controlnet(keys: Collection[str]) -> ModelFamily:
    guided = {"guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"}
    return ModelFamily.FLUX if guided & set(keys) else ModelFamily.FLUX_SCHNELL


# The registry of transformer ControlNets (SD1/SD2/SDXL ones are told by their U-Net layout): one line each.
CONTROLNETS: tuple[ControlNetLayout, ...] = (
    ControlNetLayout("sd3_controlnet", mmdit_controlnet_module.sd3_controlnet_layout,
                     {"original": mmdit_controlnet_module.sd3_controlnet_keys_from_original,
                      "diffusers": mmdit_controlnet_module.sd3_controlnet_keys_from_diffusers},
                     lambda keys: ModelFamily.SD3),
    ControlNetLayout("flux_controlnet", flux_controlnet_module.flux_controlnet_layout,
                     {"original": dict, "diffusers": flux_controlnet_module.flux_controlnet_keys_from_diffusers},
                     _family_of_flux_controlnet),
)
CONTROLNET_BY_COMPONENT = {c.component: c for c in CONTROLNETS}

# Architectures people run that this library cannot build yet, each told by a key of its own
# (without the ``model.diffusion_model.`` prefix some files add); named instead of "unknown".
UNSUPPORTED_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("AuraFlow", "double_layers.0.attn.w1q.weight"),
    ("Chroma", "distilled_guidance_layer.in_proj.bias"),
    ("Flux.2", "single_stream_modulation.lin.weight"),
    ("HiDream", "double_stream_blocks.0.block.adaLN_modulation.1.bias"),
    ("HunyuanVideo", "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias"),
    ("Lumina 2", "cap_embedder.0.weight"),
    ("LTX-Video", "patchify_proj.weight"),
    ("MistoLine Flux ControlNet", "controlnet_blocks.0.linear.weight"),
    ("Mochi", "blocks.0.attn.qkv_x.weight"),
    ("Wan", "head.modulation"),
    ("Qwen-Image", "txt_in.text_norm.weight"),
    ("Stable Cascade", "clip_txt_mapper.weight"),
)


def _unsupported_architecture(keys: Collection[str]) -> str | None:
    for name, marker in UNSUPPORTED_ARCHITECTURES:
        if marker in keys or DIFFUSION_MODEL_PREFIX + marker in keys:
            return name
    return None


def denoiser_keys(keys: Collection[str]) -> tuple[str, str] | None:
    """(component, layout) of the denoising network whose key names (prefix removed) these are."""
    for denoiser in DENOISERS:
        if denoiser.is_original(keys):
            return denoiser.component, denoiser.original_layout
        if denoiser.is_diffusers(keys):
            return denoiser.component, "diffusers"
    return None


def original_shapes(
    shapes: Mapping[str, Sequence[int]], component: str, keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    """A denoiser's shapes under the names its network module loads (diffusers names mapped)."""
    meta = meta_state_dict(shapes, keys.prefix)
    if keys.layout == "diffusers":
        with component_errors(path, component):
            meta = _DENOISER_BY_COMPONENT[component].to_original(meta)
    return shapes_of(meta)


def to_original_keys(component: str, keys: ComponentKeys, state_dict: Mapping[str, Tensor], path: str) -> Mapping[str, Tensor]:
    """A denoiser's tensors (prefix removed) under the names its network module loads."""
    if keys.layout != "diffusers":
        return state_dict
    with component_errors(path, component):
        return _DENOISER_BY_COMPONENT[component].to_original(state_dict)


def _denoiser_family(
    shapes: Mapping[str, Sequence[int]], component: str, keys: ComponentKeys, text_encoders: Sequence[str], path: str
) -> tuple[ModelFamily, bool, ImageInput]:
    """(family, inpainting, what the network takes beside the noisy latent) of a denoiser."""
    original = original_shapes(shapes, component, keys, path)
    family, inpainting = _DENOISER_BY_COMPONENT[component].family(original, text_encoders, path)
    image_input = _image_input(component, original, path)
    return family, inpainting or image_input is ImageInput.INPAINT, image_input


# Where a denoiser's first and last layers tell its (packed) input and output channels, and how
# many channels its inpainting variant gives the mask.
_CHANNEL_KEYS = {"unet": ("input_blocks.0.0.weight", "out.2.weight", 1, 1),
                 "flux": ("img_in.weight", "final_layer.linear.weight", flux_module.PATCH_SIZE**2,
                          FLUX_FILL_MASK_CHANNELS)}


def _image_input(component: str, original: Mapping[str, Sequence[int]], path: str) -> ImageInput:
    """Plain, image-conditioned (InstructPix2Pix, Flux.1 Canny/Depth) or inpainting (SD inpainting,
    Flux.1 Fill), from the channel counts of a U-Net's or Flux's first and last layers."""
    if component not in _CHANNEL_KEYS:
        return ImageInput.NONE
    in_key, out_key, packing, mask_channels = _CHANNEL_KEYS[component]
    if in_key not in original or out_key not in original:
        return ImageInput.NONE  # the network module names what is missing when it loads
    try:
        return classify_image_input(original[in_key][1] // packing, original[out_key][0] // packing, mask_channels)
    except ConcatError as error:
        raise CheckpointError(path, f"{component}: {error}") from None


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


def _vae_component(keys: Sequence[str], prefixes: Sequence[str]) -> ComponentKeys | None:
    key_set = set(keys)
    for prefix in prefixes:
        if f"{prefix}encoder.conv_in.weight" in key_set and f"{prefix}decoder.conv_in.weight" in key_set:
            bare = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            return ComponentKeys(prefix, "diffusers" if vae_module.is_diffusers_vae_layout(bare) else "ldm")
    return None


def _standalone_component(keys: Sequence[str], path: str) -> tuple[FileKind, dict[str, ComponentKeys]] | None:
    """A file holding one bare component (no checkpoint prefix), or one with just its own prefix."""
    key_set = set(keys)
    # Before the SD ControlNet tests: XLabs' Flux ControlNets also have an input_hint_block.
    for controlnet in CONTROLNETS:
        layout = controlnet.layout(key_set)
        if layout is not None:
            return FileKind.CONTROLNET, {controlnet.component: ComponentKeys("", layout)}
    for prefix in ("control_model.", ""):
        if f"{prefix}input_hint_block.0.weight" in key_set:
            return FileKind.CONTROLNET, {"controlnet": ComponentKeys(prefix, "ldm")}
    if "controlnet_cond_embedding.conv_in.weight" in key_set:
        return FileKind.CONTROLNET, {"controlnet": ComponentKeys("", "diffusers")}
    denoiser = denoiser_keys(key_set)
    if denoiser is not None:
        component, layout = denoiser
        return FileKind.DIFFUSION_MODEL, {component: ComponentKeys("", layout)}
    vae = _vae_component(keys, (*_VAE_PREFIXES, ""))
    if vae is not None:
        return FileKind.VAE, {"vae": vae}
    text_encoders = _text_encoder_components(keys, path)
    if text_encoders:
        return FileKind.TEXT_ENCODER, text_encoders
    for prefix in ("", "text_model."):
        if f"{prefix}embeddings.token_embedding.weight" in key_set:
            return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "hf")}
    if "token_embedding.weight" in key_set and "positional_embedding" in key_set:
        return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "openclip")}
    if t5_module.is_t5_layout(key_set):
        return FileKind.TEXT_ENCODER, {"t5xxl": ComponentKeys("", "t5")}
    return None


def detect_from_shapes(
    shapes: Mapping[str, Sequence[int]], path: str | os.PathLike[str] = "<shapes>"
) -> Detection:
    """Classify a single file's keys (full names, as stored) with their shapes."""
    path = str(path)
    keys = list(shapes)
    unsupported = _unsupported_architecture(shapes)
    if unsupported is not None:
        return Detection(path, FileKind.UNSUPPORTED, architecture=unsupported, unclaimed_keys=tuple(keys))
    if _has_prefix(keys, DIFFUSION_MODEL_PREFIX):
        prefix = DIFFUSION_MODEL_PREFIX
        denoiser = denoiser_keys({k[len(prefix):] for k in keys if k.startswith(prefix)})
        if denoiser is None:
            return Detection(path, FileKind.UNKNOWN, unclaimed_keys=tuple(keys))
        component, layout = denoiser
        components: dict[str, ComponentKeys] = {component: ComponentKeys(prefix, layout)}
        vae = _vae_component(keys, _VAE_PREFIXES)
        if vae is not None:
            components["vae"] = vae
        text_encoders = _text_encoder_components(keys, path)
        components.update(text_encoders)
        if f"{UNCLIP_CHECKPOINT_VISION_PREFIX}conv1.weight" in shapes:
            components["image_encoder"] = ComponentKeys(UNCLIP_CHECKPOINT_VISION_PREFIX, "openclip")
        family, inpainting, image_input = _denoiser_family(shapes, component, components[component],
                                                           list(text_encoders), path)
        ignored, unclaimed = _claim(keys, components)
        return Detection(path, FileKind.CHECKPOINT, family, inpainting, components, ignored, unclaimed,
                         image_input=image_input)
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
    image_input = ImageInput.NONE
    if kind is FileKind.DIFFUSION_MODEL:
        (component, component_keys), = components.items()
        family, inpainting, image_input = _denoiser_family(shapes, component, component_keys, [], path)
    elif kind is FileKind.CONTROLNET:
        family = _controlnet_family(shapes, components, path)
    ignored, unclaimed = _claim(keys, components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed, image_input=image_input)


def _controlnet_family(shapes: Mapping[str, Sequence[int]], components: Mapping[str, ComponentKeys],
                       path: str) -> ModelFamily:
    """The family a ControlNet file guides: an SD one's from its U-Net layout, a transformer one's from its registry line."""
    if "controlnet" in components:
        return _family_from_unet(controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)[0]
    (component, keys), = components.items()
    return CONTROLNET_BY_COMPONENT[component].family({k[len(keys.prefix):] for k in shapes if k.startswith(keys.prefix)})


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
    if "transformer" in subs:
        transformer_keys = {k[len("transformer/"):] for k in shapes if k.startswith("transformer/")}
        denoiser = denoiser_keys(transformer_keys)
        if denoiser is None:
            unsupported = _unsupported_architecture(transformer_keys)
            if unsupported is not None:
                return Detection(path, FileKind.UNSUPPORTED, architecture=unsupported)
            raise CheckpointError(path, "transformer/ holds no denoiser layout this library knows")
        components[denoiser[0]] = ComponentKeys("transformer/", "diffusers")
    if "controlnet" in subs and not components:
        components["controlnet"] = ComponentKeys("controlnet/", "diffusers")
    if "vae" in subs:
        components["vae"] = ComponentKeys("vae/", "diffusers")
    # diffusers names encoders by position; which encoder each is follows from the pipeline type.
    layout = next((d for d in DENOISERS if d.component in components), None)
    if layout is not None and layout.folder_slots is not None:
        slots = dict(layout.folder_slots)
    else:
        unet_ldm = unet_ldm_shapes(shapes, components["unet"], path) if "unet" in components else {}
        sdxl_type = "label_emb.0.0.weight" in unet_ldm
        slots = {"text_encoder": "clip_l" if sdxl_type or not _has_linear_proj_in(unet_ldm) else "clip_h",
                 "text_encoder_2": "clip_g"}
    for sub, slot in slots.items():
        if sub in subs:
            components[slot] = ComponentKeys(f"{sub}/", "t5" if slot == "t5xxl" else "hf")
    denoiser_name = next((d.component for d in DENOISERS if d.component in components), None)
    if denoiser_name is not None:
        text_encoders = [n for n in components if n in TEXT_ENCODER_SLOTS]
        family, inpainting, image_input = _denoiser_family(shapes, denoiser_name, components[denoiser_name],
                                                           text_encoders, path)
        kind = FileKind.CHECKPOINT
    elif "controlnet" in components:
        family, _ = _family_from_unet(controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)
        inpainting, kind, image_input = False, FileKind.CONTROLNET, ImageInput.NONE
    else:
        raise CheckpointError(path, f"diffusers folder has no unet/, transformer/ or controlnet/ (found: {', '.join(subs)})")
    ignored, unclaimed = _claim(list(shapes), components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed, image_input=image_input)


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
