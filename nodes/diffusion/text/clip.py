"""CLIP text encoders of Stable Diffusion (OpenAI CLIP-L, OpenCLIP ViT-H and bigG) in one module with HF transformers names.

Module names equal the Hugging Face ``CLIPTextModel(WithProjection)`` keys
(``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.N.self_attn.q_proj.weight``,
``text_model.final_layer_norm.weight``, ``text_projection.weight``). Where single files keep them:

- SD1: CLIP-L under ``cond_stage_model.transformer.`` (HF layout).
- SD2: OpenCLIP ViT-H under ``cond_stage_model.model.`` (OpenCLIP layout).
- SDXL: CLIP-L under ``conditioner.embedders.0.transformer.`` (HF layout) and OpenCLIP bigG under
  ``conditioner.embedders.1.model.`` (OpenCLIP layout); the SDXL refiner has only bigG, under
  ``conditioner.embedders.0.model.``.

OpenCLIP-layout state dicts are renamed with :func:`hf_clip_keys_from_openclip`.

Which hidden state conditions the U-Net (``clip_skip`` counts layers from the end, 1 = last):

- SD1: the last layer after the final LayerNorm; "clip skip 2" takes the penultimate layer and
  still applies the final LayerNorm (as A1111, ComfyUI and diffusers do).
- SD2: the penultimate layer *with* the final LayerNorm (LDM's ``FrozenOpenCLIPEmbedder`` runs all
  blocks but the last, then ``ln_final``).
- SDXL: the penultimate layer of both encoders *without* the final LayerNorm (SGM's
  ``layer="penultimate"``, non-legacy; diffusers uses ``hidden_states[-2]`` raw), while the pooled
  bigG vector comes from the last layer after the final LayerNorm, projected.

:data:`HIDDEN_STATE_BY_FAMILY` holds these choices as data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["quick_gelu", "gelu"]

# Every CLIP text tower used by Stable Diffusion (L/14, H/14, bigG/14) has 64-wide heads.
CLIP_HEAD_DIM = 64
LAYER_NORM_EPS = 1e-5


class TextEncoderLoadError(ValueError):
    """A text-encoder state dict does not fit the expected layout (names the offending keys)."""


@dataclass(frozen=True)
class HiddenStateChoice:
    """Which layer's output conditions the U-Net, and whether the final LayerNorm is applied to it."""

    clip_skip: int
    final_norm: bool


HIDDEN_STATE_BY_FAMILY: Mapping[str, HiddenStateChoice] = MappingProxyType(
    {
        "sd1": HiddenStateChoice(clip_skip=1, final_norm=True),
        "sd2": HiddenStateChoice(clip_skip=2, final_norm=True),
        "sdxl": HiddenStateChoice(clip_skip=2, final_norm=False),
        "sd3": HiddenStateChoice(clip_skip=2, final_norm=False),
        # Flux reads only CLIP-L's pooled output; its hidden states are not used.
        "flux": HiddenStateChoice(clip_skip=1, final_norm=True),
    }
)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text transformer (defaults: OpenAI CLIP ViT-L/14, SD1's encoder).

    ``eos_token_id`` marks where the pooled vector is read (first occurrence per row); in CLIP's
    vocabulary it is the last id, so it coincides with LDM/OpenCLIP's ``argmax(input_ids)``.
    """

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    activation: Activation = "quick_gelu"
    max_positions: int = 77
    projection_dim: int | None = None
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoderConfig: activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")


# --------------------------------------------------------------------------- layouts

# Entries that carry nothing our module needs: HF's position-id buffer (positions are always
# 0..T-1 here; some merged SD1 files even hold corrupted float copies), OpenCLIP's contrastive
# temperature and its causal-mask buffer.
_IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "logit_scale", "attn_mask"})

_OPENCLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENCLIP_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def is_openclip_layout(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether state-dict keys (prefix removed) are in the OpenCLIP layout rather than HF's."""
    return "positional_embedding" in keys or "token_embedding.weight" in keys


def hf_clip_keys_from_openclip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an OpenCLIP text-tower state dict (prefix removed) to the HF names this module uses.

    The fused ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v stacked on dim 0) split into
    ``q_proj``/``k_proj``/``v_proj`` views; ``text_projection`` (width, proj), applied as
    ``x @ P``, becomes the Linear weight ``P.T``. No tensor data is copied.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _IGNORED_KEYS:
            continue
        if key in _OPENCLIP_TOP_RENAMES:
            out[_OPENCLIP_TOP_RENAMES[key]] = tensor
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.t()
        elif m := _OPENCLIP_BLOCK.match(key):
            layer = f"text_model.encoder.layers.{m.group(1)}."
            rest = m.group(2)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part
            elif rest in _OPENCLIP_BLOCK_RENAMES:
                out[layer + _OPENCLIP_BLOCK_RENAMES[rest]] = tensor
            else:
                raise TextEncoderLoadError(f"OpenCLIP text encoder key {key!r} has no HF equivalent")
        else:
            raise TextEncoderLoadError(f"OpenCLIP text encoder key {key!r} has no HF equivalent")
    return out


_V = TypeVar("_V")
_HF_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def with_text_model_level(entries: Mapping[str, _V]) -> dict[str, _V]:
    """HF CLIP keys with the ``text_model.`` level that older SD1 files and transformers >= 5.6 omit
    (other keys, OpenCLIP's included, unchanged)."""
    return {("text_model." + k if k.startswith(_HF_TEXT_MODEL_PARTS) else k): v for k, v in entries.items()}


def text_encoder_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A text-encoder state dict in either layout (prefix removed) -> keys ready for strict loading."""
    if is_openclip_layout(state_dict):
        return hf_clip_keys_from_openclip(state_dict)
    return {k: v for k, v in with_text_model_level(state_dict).items() if k not in _IGNORED_KEYS}


_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def text_encoder_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    activation: Activation | None = None,
    head_dim: int = CLIP_HEAD_DIM,
) -> TextEncoderConfig:
    """Derive a :class:`TextEncoderConfig` from key names and shapes of either layout (prefix removed).

    What the shapes cannot show:

    - the activation. Single files in the HF layout only ever hold OpenAI CLIP-L (SD1, SDXL),
      trained with quick_gelu; OpenCLIP-layout files hold ViT-H / bigG, trained with exact GELU.
      So the layout decides, unless ``activation`` is given (e.g. a diffusers-folder SD2 text
      encoder is HF layout but GELU; its config.json says so).
    - the head count: ``width // head_dim``, with 64-wide heads as in all SD text towers.
    - the end-of-text id: the last vocabulary entry, as in CLIP's tokenizer.
    """
    openclip = is_openclip_layout(shapes)
    shapes = with_text_model_level(shapes)

    def shape(key: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key])
        except KeyError:
            raise TextEncoderLoadError(f"text encoder state dict has no {key!r}") from None

    if openclip:
        vocab_size, width = shape("token_embedding.weight")
        max_positions = shape("positional_embedding")[0]
        layer_ids = {int(m.group(1)) for k in shapes if (m := _OPENCLIP_BLOCK.match(k))}
        intermediate = shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection = shapes.get("text_projection")
        projection_dim = int(projection[1]) if projection is not None else None
    else:
        vocab_size, width = shape("text_model.embeddings.token_embedding.weight")
        max_positions = shape("text_model.embeddings.position_embedding.weight")[0]
        layer_ids = {int(m.group(1)) for k in shapes if (m := _HF_LAYER.match(k))}
        intermediate = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
        projection = shapes.get("text_projection.weight")
        projection_dim = int(projection[0]) if projection is not None else None
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise TextEncoderLoadError(f"text encoder layers are not numbered 0..N-1: {sorted(layer_ids)}")
    if width % head_dim:
        raise TextEncoderLoadError(f"text encoder width {width} is not a multiple of head_dim {head_dim}")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        width=width,
        layers=len(layer_ids),
        heads=width // head_dim,
        intermediate_size=intermediate,
        activation=activation or ("gelu" if openclip else "quick_gelu"),
        max_positions=max_positions,
        projection_dim=projection_dim,
        eos_token_id=vocab_size - 1,
    )


# --------------------------------------------------------------------------- modules


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, token_embeddings: Tensor) -> Tensor:
        """token_embeddings: (B, T, W) -> (B, T, W) with positions 0..T-1 added."""
        return token_embeddings + self.position_embedding.weight[: token_embeddings.shape[1]]


class CLIPAttention(nn.Module):
    """Multi-head self-attention: causal in the text tower, over all positions in the vision tower."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True) -> None:
        super().__init__()
        self.heads = config.heads
        self.causal = causal
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, W) -> (B, T, W)"""
        b, t, w = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(attended.transpose(1, 2).reshape(b, t, w))


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.width)
        self.activation = quick_gelu if config.activation == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, W) -> (B, T, W)"""
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block (the text and the vision tower share it; only the text's is causal)."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, W) -> (B, T, W)"""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, the layer stack and the final LayerNorm (HF's ``text_model``)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)


@dataclass
class TextEncoderOutput:
    """What one pass yields.

    last_hidden_state: (B, T, W) last layer after the final LayerNorm.
    hidden_state: (B, T, W) the ``clip_skip`` layer's output, final LayerNorm applied if asked
        (the same tensor as ``last_hidden_state`` for ``clip_skip=1`` with the norm).
    pooled: (B, P) the final-normed last-layer state at the end-of-text token, through
        ``text_projection`` when the model has one (P = projection_dim), else (B, W).
    """

    last_hidden_state: Tensor
    hidden_state: Tensor
    pooled: Tensor


class CLIPTextEncoder(nn.Module):
    """A CLIP text transformer, with ``text_projection`` when the config has a projection dim."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (
            nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim else None
        )

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) -> token embeddings (B, T, W), before positions are added.

        Start from this to splice textual-inversion vectors in, then pass the result as
        ``token_embeddings`` to :meth:`forward`.
        """
        return self.text_model.embeddings.token_embedding(input_ids)

    def forward(
        self,
        input_ids: Tensor,
        token_embeddings: Tensor | None = None,
        clip_skip: int = 1,
        final_norm: bool = True,
        project_pooled: bool = True,
    ) -> TextEncoderOutput:
        """Encode token ids.

        input_ids: (B, T), T <= max_positions; always used to find the end-of-text position.
        token_embeddings: optional (B, T, W) replacing ``embed_tokens(input_ids)`` (textual inversion).
        clip_skip: 1 = last layer, 2 = penultimate, ... (see :data:`HIDDEN_STATE_BY_FAMILY`).
        final_norm: apply the final LayerNorm to ``hidden_state``.
        project_pooled: pass ``pooled`` through ``text_projection`` when the model has one (Flux
            reads CLIP-L's pooled state unprojected).
        """
        layers = self.text_model.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"input_ids must be (B, T) with T <= {self.config.max_positions}, got {tuple(input_ids.shape)}"
            )
        if token_embeddings is None:
            token_embeddings = self.embed_tokens(input_ids)
        elif token_embeddings.shape != (*input_ids.shape, self.config.width):
            raise ValueError(
                f"token_embeddings must be (B, T, {self.config.width}) matching input_ids "
                f"{tuple(input_ids.shape)}, got {tuple(token_embeddings.shape)}"
            )
        x = self.text_model.embeddings(token_embeddings)
        skipped_index = len(layers) - clip_skip
        skipped = x
        for i, layer in enumerate(layers):
            x = layer(x)
            if i == skipped_index:
                skipped = x
        norm = self.text_model.final_layer_norm
        last = norm(x)
        if clip_skip == 1:
            hidden = last if final_norm else x
        else:
            hidden = norm(skipped) if final_norm else skipped
        pooled = self.pool(last, input_ids, project=project_pooled)
        return TextEncoderOutput(last_hidden_state=last, hidden_state=hidden, pooled=pooled)

    def pool(self, last_hidden_state: Tensor, input_ids: Tensor, project: bool = True) -> Tensor:
        """The state at each row's first end-of-text token, projected when the model has a projection (and `project`).

        last_hidden_state: (B, T, W); input_ids: (B, T) -> (B, P) or (B, W). A row without the
        end-of-text id reads position 0.
        """
        eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device),
                                   eos_position.to(last_hidden_state.device)]
        return pooled if self.text_projection is None or not project else self.text_projection(pooled)


def load_text_encoder(
    state_dict: Mapping[str, Tensor],
    *,
    config: TextEncoderConfig | None = None,
    activation: Activation | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPTextEncoder:
    """Build a :class:`CLIPTextEncoder` from a state dict in HF or OpenCLIP layout (prefix removed).

    The config comes from the shapes unless given (``activation`` overrides the layout's default).
    Built on the meta device and takes the given tensors, so no time goes into random initialisation.
    """
    if config is None:
        config = text_encoder_config_from_shapes({k: v.shape for k, v in state_dict.items()}, activation=activation)
    state_dict = text_encoder_state_dict(state_dict)
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise TextEncoderLoadError(f"text encoder state dict does not fit {config}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise TextEncoderLoadError(
            f"text encoder state dict does not fit {config}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model.to(device=device, dtype=dtype).eval()
