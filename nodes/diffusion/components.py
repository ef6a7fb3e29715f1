"""The values that flow between the diffusion nodes: a diffusion model with its weight patches, the
text encoders with their tokenizer, a VAE, latents, and a seeded noise source.

They wrap the loaded modules without copying them: applying a LoRA makes a new value that shares
the base module and adds a patch, so a graph with and one without the LoRA share one checkpoint.
Patches touch the weights only inside `patched_*()` blocks and are undone exactly afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import Tensor, nn

from .weights import patching
from .weights.patching import Deltas, WeightPatches
from .architectures.detection import ModelFamily
from .architectures.stable_diffusion import LatentFormat
from .sampling.model_sampling import ModelSampling
from .text.embeddings import EmbeddingFolder
from .sampling.guidance import CondEntry
from .text.clip import HIDDEN_STATE_BY_FAMILY, CLIPTextEncoder
from .text.clip_tokenizer import PAD_ID_BY_ENCODER, CLIPTokenizer, TokenChunk
from .networks.unet import UNet, sdxl_vector_conditioning
from .vae.autoencoder import AutoencoderKL, LatentScaling


@contextlib.contextmanager
def _patched(module: nn.Module, patches: WeightPatches) -> Iterator[nn.Module]:
    if not len(patches):
        yield module
        return
    with patching.patched(module, patches):
        yield module


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """A U-Net with how to drive it; `patches` are LoRA deltas applied while it runs."""

    unet: UNet
    family: ModelFamily
    sampling: ModelSampling
    latent_format: LatentFormat
    name: str = ""
    patches: WeightPatches = WeightPatches()

    def with_patch(self, deltas: Deltas, strength: float) -> DiffusionModel:
        return replace(self, patches=self.patches.plus(deltas, strength))

    @contextlib.contextmanager
    def patched_unet(self) -> Iterator[UNet]:
        with _patched(self.unet, self.patches) as unet:
            yield unet  # type: ignore[misc]

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting U-Net: latent + mask + masked-image latent."""
        return self.unet.config.in_channels == 2 * self.latent_format.channels + 1


@dataclass(frozen=True, eq=False)
class TextEncoders:
    """The text encoders of a checkpoint (slot -> encoder, in conditioning order) and how to use them.

    clip_skip: None = the family's usual layer; 1 = last layer, 2 = penultimate, ...
    patches: slot -> LoRA patches for that encoder.
    """

    encoders: dict[str, CLIPTextEncoder]
    tokenizer: CLIPTokenizer
    family: ModelFamily
    embeddings_dirs: tuple[str, ...] = ()
    clip_skip: int | None = None
    patches: dict[str, WeightPatches] = field(default_factory=dict)

    def with_clip_skip(self, clip_skip: int) -> TextEncoders:
        for slot, encoder in self.encoders.items():
            layers = encoder.config.layers
            if not 1 <= clip_skip <= layers:
                raise ValueError(f"clip skip {clip_skip} is out of range: the {slot} encoder has {layers} layers")
        return replace(self, clip_skip=clip_skip)

    def with_patches(self, deltas: dict[str, Deltas], strength: float) -> TextEncoders:
        """Add one LoRA's deltas (slot -> deltas) at one strength."""
        merged = dict(self.patches)
        for slot, slot_deltas in deltas.items():
            merged[slot] = merged.get(slot, WeightPatches()).plus(slot_deltas, strength)
        return replace(self, patches=merged)

    def _hidden(self, slot: str, encoder: CLIPTextEncoder, chunks: list[TokenChunk]) -> tuple[Tensor, Tensor]:
        """Encode chunks with one encoder -> (hidden (1, 77 * chunks, W), pooled (1, P) of the first chunk)."""
        choice = HIDDEN_STATE_BY_FAMILY[self.family.latent_family]
        clip_skip = self.clip_skip if self.clip_skip is not None else choice.clip_skip
        device = module_device(encoder)
        ids = torch.tensor([chunk.ids for chunk in chunks], device=device)
        with _patched(encoder, self.patches.get(slot, WeightPatches())), torch.no_grad():
            embedded = encoder.embed_tokens(ids)
            embedded = torch.stack([chunk.splice_embeddings(e) for chunk, e in zip(chunks, embedded)])
            out = encoder(ids, token_embeddings=embedded, clip_skip=clip_skip, final_norm=choice.final_norm)
        hidden = out.hidden_state.float()
        weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=torch.float32)
        if not torch.all(weights == 1.0):
            # Emphasis: scale each position, then restore the original mean so the overall level stays.
            mean = hidden.mean()
            hidden = hidden * weights[..., None]
            hidden = hidden * (mean / hidden.mean())
        return hidden.reshape(1, -1, hidden.shape[-1]).cpu(), out.pooled[:1].float().cpu()

    def encode(
        self,
        text: str,
        *,
        text_secondary: str | None = None,
        size: tuple[int, int] = (1024, 1024),
        crop: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
    ) -> CondEntry:
        """A prompt -> one conditioning entry.

        SDXL: `text` goes to CLIP-G and `text_secondary` (default: the same) to CLIP-L; the states
        are concatenated and the pooled CLIP-G embedding with the size conditioning forms `y`.
        Sizes are (height, width) in pixels; crop is (top, left).
        """
        hidden_parts: list[Tensor] = []
        pooled: Tensor | None = None
        chunk_counts = []
        for slot, encoder in self.encoders.items():
            prompt = text_secondary if (slot == "clip_l" and self.family.latent_family == "sdxl"
                                        and text_secondary is not None) else text
            lookup = None
            if self.embeddings_dirs:
                lookup = EmbeddingFolder(self.embeddings_dirs, encoder=slot, width=encoder.config.width)
            chunks = self.tokenizer.tokenize_prompt(prompt, pad_id=PAD_ID_BY_ENCODER[slot], embeddings=lookup)
            chunk_counts.append(len(chunks))
            hidden, slot_pooled = self._hidden(slot, encoder, chunks)
            hidden_parts.append(hidden)
            pooled = slot_pooled  # the last encoder's pooled output (CLIP-G for SDXL, CLIP-L/H otherwise)
        if len(set(chunk_counts)) > 1:
            # Two prompts of different lengths (SDXL): pad the shorter with repeats of its last chunk.
            longest = max(part.shape[1] for part in hidden_parts)
            hidden_parts = [torch.cat([p] + [p[:, -77:]] * ((longest - p.shape[1]) // 77), dim=1) for p in hidden_parts]
        context = torch.cat(hidden_parts, dim=-1)
        y = None
        if self.family is ModelFamily.SDXL:
            y = sdxl_vector_conditioning(pooled, size, crop, target_size or size)  # type: ignore[arg-type]
        elif self.family is ModelFamily.SDXL_REFINER:
            y = sdxl_vector_conditioning(pooled, size, crop, aesthetic_score=aesthetic_score)  # type: ignore[arg-type]
        return CondEntry(context=context, pooled=pooled, y=y)


@dataclass(frozen=True, eq=False)
class VAEModel:
    """An autoencoder with the latent space it maps to."""

    vae: AutoencoderKL
    latent_format: LatentFormat
    name: str = ""

    @property
    def downscale_factor(self) -> int:
        return self.latent_format.downscale_factor

    @property
    def scaling(self) -> LatentScaling:
        return LatentScaling(self.latent_format.scaling_factor, self.latent_format.shift_factor)

    @torch.no_grad()
    def encode(self, image: Tensor, tile_size: int | None = None, overlap: int = 64) -> Tensor:
        """image: (B, H, W, 3) in [0, 1] -> diffusion latents (B, C, H/f, W/f) on the CPU (posterior mean)."""
        device, dtype = module_device(self.vae), module_dtype(self.vae)
        x = image.permute(0, 3, 1, 2).to(device, dtype) * 2.0 - 1.0
        posterior = self.vae.encode(x) if tile_size is None else self.vae.encode_tiled(x, tile_size, overlap)
        return self.scaling.to_diffusion(posterior.mean.float()).cpu()

    @torch.no_grad()
    def decode(self, latents: Tensor, tile_size: int | None = None, overlap: int = 64) -> Tensor:
        """latents: (B, C, h, w) diffusion latents -> image (B, h*f, w*f, 3) in [0, 1] on the CPU."""
        device, dtype = module_device(self.vae), module_dtype(self.vae)
        z = self.scaling.to_vae(latents.to(device, torch.float32)).to(dtype)
        x = self.vae.decode(z) if tile_size is None else self.vae.decode_tiled(z, tile_size, overlap)
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()


@dataclass(frozen=True, eq=False)
class Latent:
    """A latent batch in the diffusion model's space.

    samples: (B, C, h, w) on the CPU; noise_mask: (B or 1, 1, h', w') in [0, 1] (1 = repaint) at any
    resolution, or None; downscale_factor: image pixels per latent cell.
    """

    samples: Tensor
    downscale_factor: int = 8
    noise_mask: Tensor | None = None

    def with_(self, **changes: object) -> Latent:
        return replace(self, **changes)

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the images this latent decodes to."""
        return self.samples.shape[-2] * self.downscale_factor, self.samples.shape[-1] * self.downscale_factor


@dataclass(frozen=True)
class NoiseSource:
    """Gaussian noise from a seed, drawn on the CPU so a seed gives the same image on every device."""

    seed: int

    def generate(self, shape: tuple[int, ...]) -> Tensor:
        """-> (shape) float32 standard normal noise on the CPU."""
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def sampler_generator(self) -> torch.Generator:
        """A CPU generator for the noise stochastic samplers draw during sampling (independent of the start noise)."""
        return torch.Generator("cpu").manual_seed(self.seed + 1)


@dataclass(frozen=True)
class ZeroNoise(NoiseSource):
    """No added noise (continuing from a partially denoised latent)."""

    seed: int = 0

    def generate(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, dtype=torch.float32)
