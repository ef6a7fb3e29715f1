"""Image prompts: CLIP image embeddings, noise-augmented, as a U-Net's vector conditioning.

SD2.1-unCLIP U-Nets take, in place of a class label, a CLIP image embedding noised on the cosine
schedule to a chosen noise level, followed by the sinusoidal embedding of that level (so y is
2 x the embedding width: 2048 for the ViT-H model, 1536 for ViT-L); a prompt without an image gets
zeros. SDXL (base and refiner) takes the noised embedding of a ViT-bigG image (1280 wide) in place of
its pooled text vector ("revision"). Several images (or one prompt with several) are each noised
and weighted by their strength, summed, and the sum noised once more at the merge level. This is
ComfyUI's unCLIPConditioning, and for one image diffusers' StableUnCLIPImg2ImgPipeline
(``noise_image_embeddings``); neither model carries embedding statistics (the normaliser is the
identity), so none are applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ..networks.timestep import timestep_embedding
from ..networks.unet import UNetConfig
from .schedules import cosine_discrete_schedule

if TYPE_CHECKING:
    from .guidance import CondEntry

# Noise levels 0 .. IMAGE_NOISE_LEVELS - 1 (the cosine schedule's timesteps); augmentation a in
# [0, 1] is level round((IMAGE_NOISE_LEVELS - 1) * a).
IMAGE_NOISE_LEVELS = 1000
# ComfyUI re-noises the sum of several SD2.1-unCLIP image prompts at augmentation 0.05 (SDXL: 0).
UNCLIP_MERGE_AUGMENTATION = 0.05
# ComfyUI seeds the embedding noise with the sampling seed minus this.
IMAGE_NOISE_SEED_OFFSET = 10


class ImagePromptError(ValueError):
    """Image prompts that do not fit the model they condition (names what was expected)."""


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """One CLIP image encoding used as a prompt. image_embeds: (N, D), one row per image (each is its
    own prompt); strength: its weight; noise_augmentation: 0 (the image as it is) .. 1 (pure noise)."""

    image_embeds: Tensor
    strength: float = 1.0
    noise_augmentation: float = 0.0


def noise_level(augmentation: float) -> int:
    """The cosine schedule's timestep for an augmentation amount in [0, 1]."""
    if not 0.0 <= augmentation <= 1.0:
        raise ImagePromptError(f"noise augmentation must be in [0, 1], got {augmentation}")
    return round((IMAGE_NOISE_LEVELS - 1) * augmentation)


def noise_image_embedding(embeds: Tensor, level: int, noise: Tensor) -> Tensor:
    """embeds, noise: (B, D) -> (B, 2D): the embedding noised to `level` on the cosine schedule,
    sqrt(abar) * x + sqrt(1 - abar) * noise, then the level's sinusoidal embedding (cosines first)."""
    alpha_bar = cosine_discrete_schedule(IMAGE_NOISE_LEVELS).alphas_cumprod[level]
    noised = alpha_bar.sqrt().to(embeds.dtype) * embeds + (1 - alpha_bar).sqrt().to(embeds.dtype) * noise
    levels = torch.full((embeds.shape[0],), level, device=embeds.device)
    return torch.cat([noised, timestep_embedding(levels, embeds.shape[1]).to(embeds.dtype)], dim=1)


def image_prompt_vector(prompts: Sequence[ImagePrompt], seed: int,
                        merge_augmentation: float = UNCLIP_MERGE_AUGMENTATION) -> Tensor:
    """The vector conditioning of image prompts -> (1, 2D). Each image is noised at its prompt's
    level with noise drawn from a CPU generator seeded with `seed` (the same draw for each, as
    ComfyUI reseeds per image) and weighted by its strength; two or more are summed and the first
    D values of the sum noised again at the merge level (ComfyUI draws that noise unseeded; here it
    is seeded too, so a run repeats)."""
    rows = [(embeds[None].float(), prompt) for prompt in prompts for embeds in prompt.image_embeds]
    if not rows:
        raise ImagePromptError("no image embeddings to condition on")

    def draw(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)

    vectors = [noise_image_embedding(x, noise_level(p.noise_augmentation), draw(x)) * p.strength for x, p in rows]
    if len(vectors) == 1:
        return vectors[0]
    total = torch.stack(vectors).sum(0)
    head = total[:, : total.shape[1] // 2]
    return noise_image_embedding(head, noise_level(merge_augmentation), draw(head))


@dataclass(frozen=True)
class ImageConditioning:
    """How a U-Net takes image prompts: as its whole vector ("vector", SD2.1-unCLIP: y of twice the
    embedding width, zeros without an image) or in place of its pooled text vector ("pooled", SDXL:
    embeddings as wide as the pooled vector)."""

    kind: Literal["vector", "pooled"]
    width: int | None  # the image embedding width D ("vector"); "pooled": the entry's pooled width
    merge_augmentation: float


def image_conditioning_of(config: object, family: str) -> ImageConditioning | None:
    """Whether and how a denoiser takes image prompts, from its family (the latent family's name:
    SDXL base and refiner are "sdxl") and config: SDXL U-Nets take them as the pooled vector, SD2
    U-Nets with a vector input are unCLIP (1536: ViT-L, 2048: ViT-H embeddings). Others take none."""
    if not isinstance(config, UNetConfig) or config.adm_in_channels is None:
        return None
    if family == "sdxl":
        return ImageConditioning("pooled", None, 0.0)
    if family == "sd2":
        return ImageConditioning("vector", config.adm_in_channels // 2, UNCLIP_MERGE_AUGMENTATION)
    return None


def with_image_prompts(config: object, family: str, entries: Sequence[CondEntry], seed: int) -> tuple[CondEntry, ...]:
    """Entries with their image prompts turned into the vector conditioning of the denoiser (its
    config and family, see :func:`image_conditioning_of`): y for an unCLIP U-Net (zeros for entries
    without prompts), the pooled vector for SDXL (and y's pooled part when y is already built).
    seed: the sampling seed. Raises ImagePromptError for prompts on a model that takes none, or of
    the wrong width."""
    target = image_conditioning_of(config, family)
    out = []
    for entry in entries:
        if target is None:
            if entry.image_prompts:
                raise ImagePromptError("image prompts (unCLIPConditioning) condition SD2.1-unCLIP and SDXL models; "
                                       "this model takes none")
            out.append(entry)
            continue
        width = target.width if target.kind == "vector" else (None if entry.pooled is None else entry.pooled.shape[-1])
        if not entry.image_prompts:
            if target.kind == "vector" and entry.y is None:
                entry = entry.with_(y=torch.zeros(1, 2 * width))
            out.append(entry)
            continue
        widths = {int(prompt.image_embeds.shape[-1]) for prompt in entry.image_prompts}
        if widths != {width}:
            raise ImagePromptError(f"image embeddings of width {sorted(widths)} do not fit this model, which takes "
                                   f"{width} (a CLIP vision model of another size?)")
        vector = image_prompt_vector(entry.image_prompts, seed - IMAGE_NOISE_SEED_OFFSET, target.merge_augmentation)
        if target.kind == "vector":
            out.append(entry.with_(y=vector, image_prompts=()))
        else:
            pooled = vector[:, :width]
            y = None if entry.y is None else torch.cat([pooled, entry.y[:, width:]], dim=1)
            out.append(entry.with_(pooled=pooled, y=y, image_prompts=()))
    return tuple(out)
