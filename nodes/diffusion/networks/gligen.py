"""GLIGEN: phrases placed in boxes steer an SD U-Net through gated self-attention over grounding tokens.

A GLIGEN file adds one gated self-attention layer (a "fuser") to every transformer block of the
U-Net, run between the block's self-attention and its cross-attention, and a position net that
turns each (phrase embedding, box) into one grounding token. A fuser projects the tokens to the
block's width, attends over the block's tokens and the grounding tokens together, keeps the block's
part, and adds it gated by ``tanh(alpha_attn)``; then a GEGLU feed-forward gated by
``tanh(alpha_dense)``. The position net embeds each box (x1, y1, x2, y2) with sines and cosines at
8 frequencies (``100 ** (i / 8)``) and maps [phrase, box features] through an MLP with SiLUs; the
slots after the boxes (up to :data:`MAX_OBJECTS`) take its learned null phrase and null box.

File keys (ComfyUI's gligen_sd14_textbox_pruned, and the original GLIGEN checkpoints): ``<block>.
transformer_blocks.<i>.fuser.{linear, attn.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2,
norm1, norm2, alpha_attn, alpha_dense}`` for the U-Net's LDM block paths (``input_blocks.1.1``,
``middle_block.1``, ...), any prefix before them allowed, and ``position_net.{linears.0/2/4,
null_positive_feature, null_position_feature}``. diffusers keeps the same names
(GatedSelfAttentionDense, GLIGENTextBoundingboxProjection).

As ComfyUI applies it: a conditioning's boxes ground the calls for that conditioning only (the
negative prompt runs the plain U-Net); a box is given in image pixels, taken in latent cells and
divided by the size of the latent being sampled (the area's, for an area conditioning), unclamped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..weights.files import open_weights
from ..weights.loading import instantiate, target_device_dtype
from ..weights.safetensors_io import CheckpointError
from .attention import BasicTransformerBlock, CrossAttention, FeedForward

logger = logging.getLogger(__name__)

# Grounding tokens per call: the boxes, then null slots (GLIGEN's training length; ComfyUI and diffusers).
MAX_OBJECTS = 30
# The box embedding's frequencies are FOURIER_BASE ** (i / count), i = 0..count-1.
FOURIER_BASE = 100.0
# Numbers per box in the position features: sin and cos of x1, y1, x2, y2 at each frequency.
BOX_FEATURES_PER_FREQUENCY = 2 * 4
# Grounding tokens of this width are SD1.x's (CLIP-L's 768): its fusers have 8 heads; other widths
# (SD2.x's 1024) 64-wide heads. ComfyUI's rule, which matches the U-Net blocks GLIGEN was trained in.
SD1_TOKEN_WIDTH = 768
SD1_HEADS = 8
HEAD_WIDTH = 64

_FUSER = ".fuser."
_POSITION_NET = "position_net."
_BLOCK_PATH = re.compile(r"(?:^|\.)((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)"
                         r"\.transformer_blocks\.(\d+)$")


class GligenError(CheckpointError):
    """A GLIGEN file that cannot be used, or one that does not fit the U-Net (names the file and why)."""


def box_features(boxes: Tensor, frequencies: int) -> Tensor:
    """boxes: (B, N, 4) as (x1, y1, x2, y2) -> (B, N, frequencies * 8): for each frequency the sines
    of the four coordinates, then their cosines."""
    scale = FOURIER_BASE ** (torch.arange(frequencies, device=boxes.device) / frequencies)
    angles = boxes[..., None, :] * scale.to(boxes.dtype)[:, None]  # (B, N, F, 4)
    return torch.stack([angles.sin(), angles.cos()], dim=-2).flatten(-3)


class PositionNet(nn.Module):
    """(boxes, which slots hold one, phrase embeddings) -> grounding tokens."""

    def __init__(self, phrase_dim: int, token_dim: int, hidden_dim: int, frequencies: int) -> None:
        super().__init__()
        self.frequencies = frequencies
        box_dim = frequencies * BOX_FEATURES_PER_FREQUENCY
        self.linears = nn.Sequential(nn.Linear(phrase_dim + box_dim, hidden_dim), nn.SiLU(),
                                     nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, token_dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(phrase_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(box_dim))

    def forward(self, boxes: Tensor, masks: Tensor, phrases: Tensor) -> Tensor:
        """boxes: (B, N, 4) in fractions of the image, masks: (B, N) 1 where a slot holds a box,
        phrases: (B, N, phrase_dim) -> tokens (B, N, token_dim)."""
        used = masks[..., None]
        position = box_features(boxes, self.frequencies)
        position = position * used + (1 - used) * self.null_position_feature
        phrases = phrases * used + (1 - used) * self.null_positive_feature
        return self.linears(torch.cat([phrases, position], dim=-1))


class GatedSelfAttention(nn.Module):
    """A fuser: the block's tokens attend over themselves and the grounding tokens; the block keeps
    its own tokens' result, gated, then a gated feed-forward."""

    def __init__(self, dim: int, token_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(token_dim, dim)
        self.attn = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        # Zero in a freshly added fuser, so training started from the U-Net as it was.
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        """x: (B, N, dim) the block's tokens, tokens: (B, M, token_dim) grounding tokens -> (B, N, dim)."""
        visual = x.shape[1]
        joint = torch.cat([x, self.linear(tokens)], dim=1)
        x = x + torch.tanh(self.alpha_attn) * self.attn(self.norm1(joint))[:, :visual]
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


def fuser_heads(dim: int, token_dim: int) -> tuple[int, int]:
    """(heads, head_dim) of a fuser of width `dim` taking grounding tokens `token_dim` wide."""
    if token_dim == SD1_TOKEN_WIDTH:
        return SD1_HEADS, dim // SD1_HEADS
    return dim // HEAD_WIDTH, HEAD_WIDTH


@dataclass(frozen=True, eq=False)
class GroundingBox:
    """One phrase in one box. phrase: (P,) the phrase's pooled text embedding; the box in image
    pixels, as an area conditioning gives it."""

    phrase: Tensor
    height: int
    width: int
    top: int
    left: int

    def corners(self, latent_size: tuple[int, int], downscale: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) as fractions of a latent of latent_size (height, width) cells: the box
        in whole cells (pixels // downscale), not clamped to the image (ComfyUI's rule)."""
        height, width = latent_size
        top, left = self.top // downscale, self.left // downscale
        return (left / width, top / height, (left + self.width // downscale) / width,
                (top + self.height // downscale) / height)


class Gligen(nn.Module):
    """A GLIGEN model: a fuser for each transformer block of the U-Net it was made for (by LDM
    block path) and the position net."""

    def __init__(self, block_paths: Sequence[str], fusers: Sequence[GatedSelfAttention], position_net: PositionNet,
                 source: str = "") -> None:
        super().__init__()
        self.block_paths = tuple(block_paths)
        self.fusers = nn.ModuleList(fusers)
        self.position_net = position_net
        self.source = source

    @property
    def phrase_dim(self) -> int:
        return self.position_net.null_positive_feature.shape[0]

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "auto") -> Gligen:
        """Read a GLIGEN file (.safetensors, or a .ckpt/.pt read with weights only) onto `device`
        in the U-Net's dtype there."""
        path = str(path)
        weights = open_weights(path)
        target_device, dtype = target_device_dtype(device, None, "unet")
        return cls.from_state({key: weights.tensor(key).to(target_device, dtype) for key in weights.shapes()}, path)

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], source: str = "") -> Gligen:
        """From a state dict in the file layout (see the module docstring); tensors are taken, not copied."""
        by_block: dict[str, dict[str, Tensor]] = {}
        position: dict[str, Tensor] = {}
        ignored = 0
        for key, tensor in state.items():
            if _FUSER in key:
                path, _, name = key.partition(_FUSER)
                match = _BLOCK_PATH.search(path)
                if match is None:
                    raise GligenError(source, f"fuser key {key!r} is not under a U-Net transformer block")
                by_block.setdefault(f"{match.group(1)}.transformer_blocks.{match.group(2)}", {})[name] = tensor
            elif _POSITION_NET in key:
                position[key.rpartition(_POSITION_NET)[2]] = tensor
            else:
                ignored += 1
        if not by_block or not position:
            raise GligenError(source, "no GLIGEN fusers (…transformer_blocks.N.fuser.*) and position net "
                                      "(position_net.*): not a GLIGEN file")
        if "linears_text.0.weight" in position:
            raise GligenError(source, "a text-and-image GLIGEN; only text-box GLIGEN models are supported")
        if ignored:
            logger.info("%s: %d keys that are neither fusers nor the position net left out", source, ignored)
        try:
            phrase_dim = position["null_positive_feature"].shape[0]
            box_dim = position["null_position_feature"].shape[0]
            hidden_dim = position["linears.0.weight"].shape[0]
            token_dim = position["linears.4.weight"].shape[0]
            widths = {path: fuser["linear.weight"].shape for path, fuser in by_block.items()}
        except KeyError as missing:
            raise GligenError(source, f"GLIGEN weight {missing.args[0]!r} is missing") from None
        if box_dim % BOX_FEATURES_PER_FREQUENCY:
            raise GligenError(source, f"position_net.null_position_feature has {box_dim} values; expected "
                                      f"{BOX_FEATURES_PER_FREQUENCY} per frequency")
        other = sorted(path for path, shape in widths.items() if shape[1] != token_dim)
        if other:
            raise GligenError(source, f"fusers of {', '.join(other)} take tokens of another width than the "
                                      f"position net's {token_dim}")
        paths = sorted(by_block)
        for path in paths:
            heads, head_dim = fuser_heads(widths[path][0], token_dim)
            if heads < 1 or heads * head_dim != widths[path][0]:
                raise GligenError(source, f"the fuser of {path} is {widths[path][0]} wide, which does not split "
                                          f"into {head_dim}-wide heads")

        def build() -> Gligen:
            fusers = [GatedSelfAttention(widths[path][0], token_dim, *fuser_heads(widths[path][0], token_dim))
                      for path in paths]
            frequencies = box_dim // BOX_FEATURES_PER_FREQUENCY
            return cls(paths, fusers, PositionNet(phrase_dim, token_dim, hidden_dim, frequencies), source)

        with torch.device("meta"):
            expected = build()
        for where, names, found in (
                *((f"the fuser of {path}", expected.fusers[0].state_dict(), by_block[path]) for path in paths),
                ("position_net", expected.position_net.state_dict(), position)):
            lacking = sorted(set(names) - set(found))
            if lacking:
                raise GligenError(source, f"{where} lacks {', '.join(lacking)}")
        ours = {f"position_net.{name}": tensor for name, tensor in position.items()}
        ours |= {f"fusers.{i}.{name}": tensor
                 for i, path in enumerate(paths) for name, tensor in by_block[path].items()}
        try:
            model, _ = instantiate(build, ours, "GLIGEN", source, strict=True)
        except CheckpointError as error:
            raise GligenError(source, error.problem) from None
        return model.eval()  # type: ignore[return-value]

    def check_fits(self, network: nn.Module) -> None:
        """Raise GligenError unless `network` has exactly the transformer blocks, of the widths,
        this GLIGEN has fusers for."""
        blocks = transformer_blocks(network)
        if not blocks:
            raise GligenError(self.source, "GLIGEN applies to SD U-Nets; this model has no U-Net transformer blocks")
        missing = sorted(set(blocks) - set(self.block_paths))
        extra = sorted(set(self.block_paths) - set(blocks))
        if missing or extra:
            detail = "; ".join(part for part in (
                f"the U-Net's {', '.join(missing)} without a fuser" if missing else "",
                f"fusers for {', '.join(extra)}, which the U-Net does not have" if extra else "") if part)
            raise GligenError(self.source, f"this GLIGEN was made for another U-Net: {detail}")
        for path, fuser in zip(self.block_paths, self.fusers):
            width = blocks[path].norm1.normalized_shape[0]
            if fuser.linear.out_features != width:
                raise GligenError(self.source, f"the fuser of {path} is {fuser.linear.out_features} wide; that "
                                               f"block of the U-Net is {width} wide")

    def tokens(self, boxes: Sequence[GroundingBox], latent_size: tuple[int, int], downscale: int) -> Tensor:
        """The grounding tokens of up to MAX_OBJECTS boxes for a latent of latent_size (height,
        width) cells -> (1, MAX_OBJECTS, token_dim) in this model's dtype."""
        if len(boxes) > MAX_OBJECTS:
            raise GligenError(self.source, f"{len(boxes)} boxes; GLIGEN takes at most {MAX_OBJECTS}")
        weight = self.position_net.null_positive_feature
        corners = torch.zeros(1, MAX_OBJECTS, 4)
        masks = torch.zeros(1, MAX_OBJECTS)
        phrases = torch.zeros(1, MAX_OBJECTS, self.phrase_dim)
        for i, box in enumerate(boxes):
            if box.phrase.shape != (self.phrase_dim,):
                raise GligenError(self.source, f"a phrase embedding of shape {tuple(box.phrase.shape)}; this GLIGEN "
                                               f"takes ({self.phrase_dim},)")
            corners[0, i] = torch.tensor(box.corners(latent_size, downscale))
            masks[0, i] = 1.0
            phrases[0, i] = box.phrase
        with torch.no_grad():
            return self.position_net(*(t.to(weight.device, weight.dtype) for t in (corners, masks, phrases)))

    @contextlib.contextmanager
    def installed(self, network: nn.Module, tokens: Tensor, rows: Tensor | None = None) -> Iterator[None]:
        """While inside, every transformer block of `network` runs its fuser over `tokens` (R,
        M, token_dim) on the rows `rows` (R,) of its batch (None: all rows, R the batch) after its
        self-attention; the other rows pass unchanged. Blocks are found by their LDM path."""
        blocks = transformer_blocks(network)
        weight = self.position_net.null_positive_feature
        tokens = tokens.to(weight.device, weight.dtype)
        hooks = []
        for path, fuser in zip(self.block_paths, self.fusers):
            hook = _fuser_hook(fuser, tokens, rows)
            blocks[path].middle_hooks.append(hook)
            hooks.append((blocks[path], hook))
        try:
            yield
        finally:
            for block, hook in hooks:
                block.middle_hooks.remove(hook)


def _fuser_hook(fuser: GatedSelfAttention, tokens: Tensor, rows: Tensor | None) -> Callable[[Tensor], Tensor]:
    """x (B, N, dim) -> x with the fuser applied to `rows`, in the fuser's device and dtype."""
    weight = fuser.linear.weight

    def hook(x: Tensor) -> Tensor:
        chosen = x if rows is None else x[rows.to(x.device)]
        fused = fuser(chosen.to(weight.device, weight.dtype), tokens).to(x.device, x.dtype)
        if rows is None:
            return fused
        return x.index_copy(0, rows.to(x.device), fused)

    return hook


def transformer_blocks(network: nn.Module) -> dict[str, BasicTransformerBlock]:
    """The transformer blocks of a network by module path (a U-Net's LDM paths)."""
    network = getattr(network, "_orig_mod", network)  # torch.compile's wrapper keeps the network there
    return {name: module for name, module in network.named_modules() if isinstance(module, BasicTransformerBlock)}


@dataclass(frozen=True, eq=False)
class Grounding:
    """A conditioning's GLIGEN boxes and the GLIGEN model that reads them (GLIGENTextBoxApply)."""

    model: Gligen
    boxes: tuple[GroundingBox, ...]


@contextlib.contextmanager
def grounded(network: nn.Module, groundings: Sequence[Grounding | None], batch: int,
             latent_size: tuple[int, int], downscale: int) -> Iterator[None]:
    """The network grounded for one batched call of len(groundings) entries of `batch` rows each:
    entry i's rows get its boxes' tokens; entries without grounding run the plain U-Net. latent_size:
    (height, width) cells of the latent the call sees."""
    by_model: dict[int, tuple[Gligen, list[int], list[Tensor]]] = {}
    for index, grounding in enumerate(groundings):
        if grounding is None:
            continue
        model, rows, tokens = by_model.setdefault(id(grounding.model), (grounding.model, [], []))
        rows.extend(range(index * batch, (index + 1) * batch))
        tokens.append(model.tokens(grounding.boxes, latent_size, downscale).expand(batch, -1, -1))
    with contextlib.ExitStack() as stack:
        for model, rows, tokens in by_model.values():
            every_row = len(rows) == len(groundings) * batch
            stack.enter_context(model.installed(network, torch.cat(tokens), None if every_row else torch.tensor(rows)))
        yield
