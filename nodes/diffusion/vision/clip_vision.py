"""CLIP vision encoders (ViT) with HF transformers names: OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and bigG/14.

Module names equal the Hugging Face ``CLIPVisionModelWithProjection`` keys
(``vision_model.embeddings.patch_embedding.weight``, ``vision_model.pre_layrnorm.weight`` (sic),
``vision_model.encoder.layers.N.self_attn.q_proj.weight``, ``vision_model.post_layernorm.weight``,
``visual_projection.weight``), the layout of ComfyUI's ``models/clip_vision`` files. Files in
OpenCLIP's layout (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``, ``visual.proj``),
as SD2.1-unCLIP checkpoints keep theirs under ``embedder.model.visual.``, are renamed by
:func:`clip_vision_state_dict`.

An image becomes patch tokens after a class token, with learned positions; a pre-LayerNorm, the
transformer blocks of the CLIP text tower without the causal mask, then the class token through
the post-LayerNorm and the projection gives the image embedding. :func:`clip_preprocess` makes
the 224x224 input as ComfyUI's CLIPVisionEncode does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..text.clip import LAYER_NORM_EPS, Activation, CLIPEncoderLayer, hf_clip_keys_from_openclip
from ..weights.files import WeightFile, open_weights
from ..weights.loading import target_device_dtype

# CLIP's image normalisation (OpenAI's training statistics, kept by OpenCLIP and ComfyUI).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# The released towers Stable Diffusion models use all have 16 heads (64-, 80- and 104-wide);
# OpenAI's ViT-L/14 (width 1024) alone was trained with quick_gelu.
_HEADS_BY_WIDTH = {1024: 16, 1280: 16, 1664: 16}
_QUICK_GELU_WIDTHS = frozenset({1024})


class CLIPVisionLoadError(ValueError):
    """A state dict is no CLIP vision tower this module can build (names what is wrong)."""


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP vision transformer (defaults: OpenAI CLIP ViT-L/14).

    width/heads/intermediate_size/activation are named as in the text tower's config, whose
    transformer block this one shares.
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate_size: int = 4096
    activation: Activation = "quick_gelu"
    projection_dim: int = 768

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"CLIPVisionConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image size {self.image_size} is not a multiple of the patch "
                             f"size {self.patch_size}")

    @property
    def positions(self) -> int:
        """The class token and one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


# --------------------------------------------------------------------------- layouts

# HF's position-id buffer (older transformers saved it); positions are always 0..N here.
_IGNORED_KEYS = frozenset({"vision_model.embeddings.position_ids"})
_OPENCLIP_TOP_RENAMES = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def is_openclip_vision_layout(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether vision-tower keys (prefix removed) are in OpenCLIP's layout rather than HF's."""
    return "conv1.weight" in keys or "transformer.resblocks.0.attn.in_proj_weight" in keys


def clip_vision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A vision-tower state dict in HF or OpenCLIP layout (prefix removed) -> the HF names this module uses.

    OpenCLIP's blocks are the text tower's blocks, so they are renamed by the text tower's mapping
    (its fused q/k/v split into views) and moved from ``text_model.`` to ``vision_model.``;
    ``proj`` (width, proj), applied as ``x @ P``, becomes the Linear weight ``P.T``.
    """
    if not is_openclip_vision_layout(state_dict):
        return {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    out: dict[str, Tensor] = {}
    blocks: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _OPENCLIP_TOP_RENAMES:
            out[_OPENCLIP_TOP_RENAMES[key]] = tensor
        elif key == "proj":
            out["visual_projection.weight"] = tensor.t()
        elif key.startswith("transformer.resblocks."):
            blocks[key] = tensor
        else:
            raise CLIPVisionLoadError(f"OpenCLIP vision key {key!r} has no HF equivalent")
    for key, tensor in hf_clip_keys_from_openclip(blocks).items():
        out["vision_model." + key.removeprefix("text_model.")] = tensor
    return out


def clip_vision_config_from_shapes(shapes: Mapping[str, Sequence[int]], heads: int | None = None,
                                   activation: Activation | None = None) -> CLIPVisionConfig:
    """A :class:`CLIPVisionConfig` from HF-layout key names and shapes (see :func:`clip_vision_state_dict`).

    The shapes cannot show the head count or the activation: heads are 16 for the released towers
    (width 1024, 1280, 1664), else width / 64; quick_gelu for width 1024 (OpenAI's ViT-L/14), GELU
    otherwise (OpenCLIP's H and bigG). Either can be given.
    """

    def shape(key: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key])
        except KeyError:
            raise CLIPVisionLoadError(f"CLIP vision state dict has no {key!r}") from None

    width, channels, patch, _ = shape("vision_model.embeddings.patch_embedding.weight")
    if channels != 3:
        raise CLIPVisionLoadError(f"CLIP vision patch embedding takes {channels} channels, expected 3 (RGB)")
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise CLIPVisionLoadError(f"{positions} positions are no class token plus a square grid of patches")
    layer_ids = {int(m.group(1)) for k in shapes if (m := _HF_LAYER.match(k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise CLIPVisionLoadError(f"CLIP vision layers are not numbered 0..N-1: {sorted(layer_ids)}")
    heads = heads or _HEADS_BY_WIDTH.get(width, width // 64)
    return CLIPVisionConfig(
        image_size=side * patch, patch_size=patch, width=width, layers=len(layer_ids), heads=heads,
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        activation=activation or ("quick_gelu" if width in _QUICK_GELU_WIDTHS else "gelu"),
        projection_dim=shape("visual_projection.weight")[0],
    )


# --------------------------------------------------------------------------- modules


class CLIPVisionEmbeddings(nn.Module):
    """Patches (a strided convolution without bias) after a learned class token, plus learned positions."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.positions, config.width)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (B, 3, S, S) -> (B, 1 + (S / patch)^2, W)"""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal=False) for _ in range(config.layers))  # type: ignore[arg-type]


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre-LayerNorm, the layer stack and the post-LayerNorm (HF's ``vision_model``)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.encoder = CLIPVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)


@dataclass(frozen=True, eq=False)
class CLIPVisionOutput:
    """What one pass yields (ComfyUI's CLIP_VISION_OUTPUT).

    last_hidden_state: (B, N, W) the last layer's tokens (no post-LayerNorm);
    penultimate_hidden_states: (B, N, W) the second-to-last layer's tokens;
    image_embeds: (B, P) the class token through the post-LayerNorm and the projection.
    """

    last_hidden_state: Tensor
    penultimate_hidden_states: Tensor
    image_embeds: Tensor


class CLIPVisionEncoderModel(nn.Module):
    """A CLIP vision tower with its projection (HF's ``CLIPVisionModelWithProjection``)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> CLIPVisionOutput:
        """pixel_values: (B, 3, S, S) normalised as :func:`clip_preprocess` makes them, S = config.image_size."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        penultimate = x
        layers = tower.encoder.layers
        for i, layer in enumerate(layers):
            x = layer(x)
            if i == len(layers) - 2:
                penultimate = x
        embeds = self.visual_projection(tower.post_layernorm(x[:, 0]))
        return CLIPVisionOutput(last_hidden_state=x, penultimate_hidden_states=penultimate, image_embeds=embeds)


def load_clip_vision(state_dict: Mapping[str, Tensor], *, config: CLIPVisionConfig | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CLIPVisionEncoderModel:
    """Build a :class:`CLIPVisionEncoderModel` from a state dict in HF or OpenCLIP layout (prefix removed).

    The config comes from the shapes unless given. Built on the meta device and takes the given
    tensors, so no time goes into random initialisation.
    """
    state_dict = clip_vision_state_dict(state_dict)
    if config is None:
        config = clip_vision_config_from_shapes({k: v.shape for k, v in state_dict.items()})
    with torch.device("meta"):
        model = CLIPVisionEncoderModel(config)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise CLIPVisionLoadError(f"CLIP vision state dict does not fit {config}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise CLIPVisionLoadError(f"CLIP vision state dict does not fit {config}: missing {result.missing_keys[:8]}, "
                                  f"unexpected {result.unexpected_keys[:8]}")
    return model.to(device=device, dtype=dtype).eval()


# Where files keep a vision tower: ComfyUI's clip_vision files and HF CLIP models (which may hold the
# text tower too) in the HF layout, OpenCLIP / OpenAI models under `visual.`, SD2.1-unCLIP checkpoints
# under `embedder.model.visual.`.
_HF_VISION_PREFIXES = ("vision_model.", "visual_projection.")
OPENCLIP_VISION_PREFIX = "visual."
UNCLIP_CHECKPOINT_VISION_PREFIX = "embedder.model.visual."


def vision_prefix(names: Sequence[str] | Mapping[str, object]) -> str | None:
    """The key prefix of the vision tower in a file ('' for the HF layout), or None if it holds none."""
    for prefix in (UNCLIP_CHECKPOINT_VISION_PREFIX, OPENCLIP_VISION_PREFIX):
        if f"{prefix}conv1.weight" in names:
            return prefix
    if "vision_model.embeddings.patch_embedding.weight" in names:
        return ""
    return None


def load_clip_vision_file(source: str | WeightFile, device: str | torch.device = "auto",
                          dtype: str | torch.dtype | None = None) -> CLIPVisionEncoderModel:
    """The CLIP vision tower of a weight file (a path or an open file): a ComfyUI clip_vision file, a
    whole HF or OpenCLIP CLIP model (its text tower is left out) or an SD2.1-unCLIP checkpoint.
    Raises CLIPVisionLoadError naming the file when it holds none or it does not fit."""
    weights = open_weights(source) if isinstance(source, str) else source
    names = weights.shapes()
    prefix = vision_prefix(names)
    if prefix is None:
        raise CLIPVisionLoadError(f"{weights.path}: holds no CLIP vision model (no vision_model.embeddings, "
                                  "visual.conv1 or embedder.model.visual.conv1 weights)")
    keep = (lambda k: k.startswith(prefix)) if prefix else (lambda k: k.startswith(_HF_VISION_PREFIXES))
    target_device, target_dtype = target_device_dtype(device, dtype, "text_encoder")
    state = {k[len(prefix):]: weights.tensor(k).to(target_dtype) for k in names if keep(k)}
    try:
        return load_clip_vision(state, device=target_device, dtype=target_dtype)
    except CLIPVisionLoadError as error:
        raise CLIPVisionLoadError(f"{weights.path}: {error}") from None


def clip_preprocess(image: Tensor, size: int = 224, crop: bool = True) -> Tensor:
    """image: (B, H, W, C) in [0, 1] (C >= 3; extra channels such as alpha are dropped) ->
    (B, 3, size, size) CLIP input, as ComfyUI's CLIPVisionEncode makes it.

    crop: scale the short side to `size` (rounded) and cut the centre square; otherwise squash
    the whole image to size x size. Bicubic with antialiasing; the result is rounded to 8-bit levels
    before normalising with :data:`CLIP_IMAGE_MEAN` / :data:`CLIP_IMAGE_STD`.
    """
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image must be (B, H, W, C) with C >= 3, got {tuple(image.shape)}")
    x = image[..., :3].movedim(-1, 1).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            target = (round(scale * height), round(scale * width))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[:, :, top: top + size, left: left + size]
    x = (x * 255.0).clamp(0, 255).round() / 255.0
    mean = torch.tensor(CLIP_IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
