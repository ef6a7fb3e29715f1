"""PhotoMaker (TencentARC, v1): an ID encoder that fuses the CLIP image embedding of a face into the
text states of an SDXL prompt at its class word, so that the image shows that person.

The ID encoder is a CLIP ViT-L/14 vision tower (HF names, :mod:`.clip_vision`) whose post-LayerNormed
class token goes through two projections, ``visual_projection`` (1024 -> 768) and
``visual_projection_2`` (1024 -> 1280); side by side they make the ID embedding e (2048, the width of
SDXL's CLIP-L + CLIP-G text states). For the prompt's state p at the class word, the fuse module
computes

    h = mlp1([p, e]) + p,   out = LayerNorm(mlp2(h) + h)

with mlp(x) = fc2(GELU(fc1(LayerNorm(x)))) (mlp1: 4096 -> 2048 -> 2048; mlp2: 2048 -> 2048 -> 2048,
whose residual is the ``+ h``), and ``out`` replaces p.

Files (``photomaker-v1.bin``): a torch pickle ``{"id_encoder": {...}, "lora_weights": {...}}``, read
with ``torch.load(weights_only=True)``; or the ID encoder's tensors alone in a ``.safetensors``. The
LoRA part is not used (ComfyUI's loader leaves it out too). PhotoMaker v2 (an ID encoder fed with
InsightFace embeddings) is refused by name.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..weights.files import SAFETENSORS_SUFFIX, open_weights
from ..weights.loading import target_device_dtype
from ..weights.safetensors_io import CheckpointError
from .clip_vision import CLIPVisionConfig, CLIPVisionEncoderModel, clip_vision_config_from_shapes

# The word ComfyUI's PhotoMakerEncode looks for in the prompt.
TRIGGER_WORD = "photomaker"
# Keys only PhotoMaker v2's ID encoder has (its Q-Former over InsightFace embeddings).
_V2_MARKER = "qformer_perceiver."


class PhotoMakerError(ValueError):
    """A PhotoMaker file or input that cannot be used; the message names the file or what is wrong."""


class PhotoMakerMLP(nn.Module):
    """LayerNorm, Linear, GELU, Linear; with `residual` the input is added to the output."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool) -> None:
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP maps a width to itself, got {in_dim} -> {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_dim) -> (..., out_dim)"""
        out = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class FuseModule(nn.Module):
    """Fuses an ID embedding into a text state of the same width (see the module docstring)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp1 = PhotoMakerMLP(2 * width, width, width, residual=False)
        self.mlp2 = PhotoMakerMLP(width, width, width, residual=True)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, prompt_states: Tensor, id_embeds: Tensor) -> Tensor:
        """prompt_states, id_embeds: (N, W) -> the fused states (N, W)."""
        fused = self.mlp1(torch.cat([prompt_states, id_embeds], dim=-1)) + prompt_states
        return self.layer_norm(self.mlp2(fused))


class PhotoMakerIDEncoder(CLIPVisionEncoderModel):
    """The CLIP vision tower with its two projections and the fuse module (the file's key layout)."""

    def __init__(self, config: CLIPVisionConfig, projection_2_dim: int) -> None:
        super().__init__(config)
        self.visual_projection_2 = nn.Linear(config.width, projection_2_dim, bias=False)
        self.fuse_module = FuseModule(config.projection_dim + projection_2_dim)

    @property
    def width(self) -> int:
        """The width of the ID embedding and of the text states it fuses into."""
        return self.config.projection_dim + self.visual_projection_2.out_features

    def id_embeds(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (B, 3, S, S) as clip_vision.clip_preprocess makes them -> ID embeddings (B, W)."""
        shared = self.vision_model.post_layernorm(self(pixel_values).last_hidden_state[:, 0])
        return torch.cat([self.visual_projection(shared), self.visual_projection_2(shared)], dim=-1)

    def fused(self, context: Tensor, positions: list[int], pixel_values: Tensor) -> Tensor:
        """context: (1, T, W) text states -> a copy whose states at `positions` are fused with the ID
        embedding of the first image of pixel_values (B, 3, S, S), as ComfyUI uses one image."""
        if context.shape[-1] != self.width:
            raise PhotoMakerError(f"this PhotoMaker fuses into text states of width {self.width} (SDXL's); the "
                                  f"conditioning has width {context.shape[-1]}")
        dtype = self.visual_projection.weight.dtype
        id_embed = self.id_embeds(pixel_values[:1].to(self.visual_projection.weight.device, dtype))
        out = context.clone()
        rows = context[0, positions].to(id_embed.device, dtype)
        out[0, positions] = self.fuse_module(rows, id_embed.expand(len(positions), -1)).to(out.device, out.dtype)
        return out


def trigger_position(text: str, trigger: str = TRIGGER_WORD) -> int | None:
    """The token position whose state PhotoMakerEncode fuses, as ComfyUI finds it: the index of the
    first word of `text` split at single spaces that equals `trigger` (counting from 0, so with the
    start token at position 0 and one token per word it is the word before the trigger, the class
    word of PhotoMaker's prompts "a photo of a man photomaker"); None without the trigger."""
    words = text.split(" ")
    return words.index(trigger) if trigger in words else None


def photomaker_state_dict(loaded: Mapping[str, object], source: str) -> dict[str, Tensor]:
    """A file's contents -> the ID encoder's tensors (the ``id_encoder`` part, or the file itself)."""
    state = loaded.get("id_encoder", loaded)
    if not isinstance(state, Mapping):
        raise PhotoMakerError(f"{source}: 'id_encoder' holds a {type(state).__name__}, expected tensors")
    tensors = {str(k).removeprefix("id_encoder."): v for k, v in state.items() if isinstance(v, Tensor)}
    if any(key.startswith(_V2_MARKER) for key in tensors):
        raise PhotoMakerError(f"{source}: a PhotoMaker v2 file (its ID encoder takes InsightFace embeddings); "
                              "only PhotoMaker v1 files are supported")
    if "fuse_module.layer_norm.weight" not in tensors or "visual_projection_2.weight" not in tensors:
        raise PhotoMakerError(f"{source}: no PhotoMaker ID encoder in this file (no fuse_module / "
                              "visual_projection_2 weights)")
    return tensors


def build_photomaker(state_dict: Mapping[str, Tensor], config: CLIPVisionConfig | None = None,
                     source: str = "<state dict>") -> PhotoMakerIDEncoder:
    """The ID encoder from its tensors (HF key names, see the module docstring); the vision tower's
    config comes from the shapes (with ViT-L/14's quick_gelu) unless given."""
    state = {k: v for k, v in state_dict.items() if k != "vision_model.embeddings.position_ids"}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if "visual_projection_2.weight" not in shapes:
        raise PhotoMakerError(f"{source}: no visual_projection_2 weight: not a PhotoMaker ID encoder")
    try:
        # PhotoMaker's tower is OpenAI's ViT-L/14, trained with quick_gelu (16 heads: the width's rule).
        config = config or clip_vision_config_from_shapes(shapes, activation="quick_gelu")
    except ValueError as error:
        raise PhotoMakerError(f"{source}: {error}") from None
    projection_2 = shapes["visual_projection_2.weight"][0]
    with torch.device("meta"):
        model = PhotoMakerIDEncoder(config, projection_2)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shapes that do not fit
        raise PhotoMakerError(f"{source}: the tensors do not fit a PhotoMaker ID encoder: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise PhotoMakerError(f"{source}: the tensors do not fit a PhotoMaker ID encoder: missing "
                              f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
    return model.eval()


def load_photomaker(path: str | os.PathLike[str], device: str | torch.device = "auto",
                    dtype: str | torch.dtype | None = None) -> PhotoMakerIDEncoder:
    """Read a PhotoMaker v1 file: ``.safetensors``, or a torch pickle through ``torch.load(weights_only=True)``
    (tensors and plain data only; nothing in it runs). Device and dtype as for text encoders."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            weights = open_weights(path)
            loaded: Mapping[str, object] = {name: weights.tensor(name) for name in weights.shapes()}
        except CheckpointError as error:
            raise PhotoMakerError(str(error)) from None
    else:
        if not zipfile.is_zipfile(path):
            raise PhotoMakerError(f"{path}: not a zip-format torch file (nor .safetensors)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).splitlines()[0] if str(error) else "unsafe"
            raise PhotoMakerError(f"{path}: refused to unpickle: it needs code beyond tensors and plain data "
                                  f"({reason}); nothing in it was run") from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise PhotoMakerError(f"{path}: cannot be read as a torch file ({type(error).__name__})") from None
        if not isinstance(loaded, Mapping):
            raise PhotoMakerError(f"{path}: holds a {type(loaded).__name__}, not a PhotoMaker model")
    model = build_photomaker(photomaker_state_dict(loaded, str(path)), source=str(path))
    target_device, target_dtype = target_device_dtype(device, dtype, "text_encoder")
    return model.to(device=target_device, dtype=target_dtype)
