"""The values that flow between the diffusion nodes: a diffusion model with its weight patches, the
text encoders with their tokenizer, a VAE, latents, and a seeded noise source.

They wrap the loaded modules without copying them: applying a LoRA makes a new value that shares
the base module and adds a patch, so a graph with and one without the LoRA share one checkpoint.
Patches touch the weights only inside `patched_*()` blocks and are undone exactly afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import ContextManager, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import patching
from .weights.patching import Deltas, WeightPatches
from .weights.storage import compute_dtype
from .weights.devices import cpu_threads, module_device, network_work
from .architectures.detection import ModelFamily
from .architectures.stable_diffusion import LatentFormat
from .architectures.transformers import PIXART_T5_TOKENS
from .sampling.model_sampling import ModelSampling
from .text.embeddings import EmbeddingFolder
from .sampling.guidance import REFINER_AESTHETIC_SCORE, CondEntry, SizeFromLatent
from .sampling.hooks import Hooks
from .text.clip import HIDDEN_STATE_BY_FAMILY, CLIPTextEncoder
from .text.clip_tokenizer import PAD_ID_BY_ENCODER, CLIPTokenizer, TokenChunk
from .text.t5_tokenizer import T5Tokenizer
from .networks.unet import UNet, sdxl_vector_conditioning
from .vae.autoencoder import AutoencoderKL, LatentScaling
from .vae.previews import LatentColours, latent_colours


@contextlib.contextmanager
def _patched(module: nn.Module, patches: WeightPatches) -> Iterator[nn.Module]:
    if not len(patches):
        yield module
        return
    with patching.patched(module, patches):
        yield module


class NetworkHook(Protocol):
    """A change to how a network computes, in effect while it is installed (a hypernetwork's MLPs
    on the attention inputs); like weight patches, it leaves the shared network as it was."""

    def installed(self, network: nn.Module) -> ContextManager[None]: ...


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """A denoising network (U-Net, MMDiT, Flux, DiT, PixArt) with how to drive it; `patches` are LoRA deltas
    applied while it runs."""

    network: nn.Module
    family: ModelFamily
    sampling: ModelSampling
    latent_format: LatentFormat
    name: str = ""
    patches: WeightPatches = WeightPatches()
    preview_vae: VAEModel | None = None  # the VAE the model's file came with: step previews' colours
    hooks: tuple[NetworkHook, ...] = ()  # installed, in order, while the network runs
    # DifferentialDiffusion's strength: a noise mask is thresholded anew at every step (sampling.run).
    differential_diffusion: float | None = None
    # A torch.compile mode for the denoiser (CompileModel), else the run's --compile setting.
    compile_mode: str | None = None

    def with_patch(self, deltas: Deltas, strength: float) -> DiffusionModel:
        return replace(self, patches=self.patches.plus(deltas, strength))

    def with_hook(self, hook: NetworkHook) -> DiffusionModel:
        """The same model with `hook` installed after those it has while it runs."""
        return replace(self, hooks=self.hooks + (hook,))

    def with_sampling(self, sampling: ModelSampling) -> DiffusionModel:
        """The same network driven another way (a flow model's shift: ModelSamplingSD3/Flux)."""
        return replace(self, sampling=sampling)

    def preview_colours(self) -> LatentColours | None:
        """The latent -> RGB map of step previews, fitted once on the VAE the model came with (None: no VAE)."""
        if self.preview_vae is None:
            return None
        return latent_colours(self.preview_vae.vae, self.preview_vae.scaling)

    @contextlib.contextmanager
    def patched_network(self) -> Iterator[nn.Module]:
        with _patched(self.network, self.patches) as network, contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.installed(network))
            yield network

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting U-Net: latent + mask + masked-image latent."""
        return isinstance(self.network, UNet) and self.network.config.in_channels == 2 * self.latent_format.channels + 1


# T5 prompts are padded to this many tokens, as ComfyUI does (diffusers pads to 256 for SD3 and
# 512 for Flux-dev); T5 attends to the padding in both, so the length changes the result. PixArt
# masks the padding (so its length changes nothing) and pads to its training length, α 120 and Σ 300
# tokens (:data:`PIXART_T5_TOKENS`), truncating longer prompts there as its pipelines do.
T5_LENGTH_BY_FAMILY = {"sd3": 77, "flux": 256}
# SD3 zero-pads the CLIP states to T5's width; without a T5 the width is the real T5-XXL's.
SD3_CONTEXT_WIDTH = 4096
# Widths of the CLIP states and pooled vectors SD3 zero-fills when an encoder is left out.
SD3_CLIP_WIDTHS = {"clip_l": 768, "clip_g": 1280}


class MissingTextEncoderError(ValueError):
    """The text encoders cannot condition their family: one it needs is missing (names which)."""


def _emphasize(hidden: Tensor, weights: Tensor) -> Tensor:
    """Prompt weights: scale each position, then restore the original mean so the overall level stays."""
    if torch.all(weights == 1.0):
        return hidden
    mean = hidden.mean()
    hidden = hidden * weights[..., None]
    return hidden * (mean / hidden.mean())


@dataclass(frozen=True, eq=False)
class TextEncoders:
    """The text encoders of a model (slot -> encoder, in conditioning order) and how to use them.

    Slots: ``clip_l``, ``clip_h``, ``clip_g`` (CLIP encoders) and ``t5xxl`` (a T5 encoder).
    clip_skip: None = the family's usual layer; 1 = last layer, 2 = penultimate, ...
    patches: slot -> LoRA patches for that encoder. t5_length: T5 pad length (None: the
    family's, :data:`T5_LENGTH_BY_FAMILY` or :data:`PIXART_T5_TOKENS`).
    hook_patches: slot -> the CLIP patches of the LoRA hooks SetClipHooks set (a later SetClipHooks
    replaces them; applied after `patches`). cond_hooks: the LoRA hooks every conditioning encoded
    here carries to the sampler.
    """

    encoders: dict[str, nn.Module]
    tokenizer: CLIPTokenizer
    family: ModelFamily
    embeddings_dirs: tuple[str, ...] = ()
    clip_skip: int | None = None
    patches: dict[str, WeightPatches] = field(default_factory=dict)
    t5_tokenizer: T5Tokenizer | None = None
    t5_length: int | None = None
    hook_patches: dict[str, WeightPatches] = field(default_factory=dict)
    cond_hooks: Hooks = ()

    def with_clip_skip(self, clip_skip: int) -> TextEncoders:
        for slot, encoder in self.encoders.items():
            if not isinstance(encoder, CLIPTextEncoder):
                continue
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

    def with_hooks(self, hook_patches: dict[str, WeightPatches], cond_hooks: Hooks | None) -> TextEncoders:
        """These encoders with LoRA hooks (SetClipHooks): `hook_patches` replace those of earlier hooks;
        cond_hooks None keeps the hooks conditionings carried before."""
        return replace(self, hook_patches=hook_patches,
                       cond_hooks=self.cond_hooks if cond_hooks is None else cond_hooks)

    def _slot_patches(self, slot: str) -> WeightPatches:
        """The patches one encoder runs with: its LoRAs,thenitshooks."""
        return WeightPatches(self.patches.get(slot, WeightPatches()).entries
                             + self.hook_patches.get(slot, WeightPatches()).entries)

    def _chunks(self, slot: str, encoder: CLIPTextEncoder, prompt: str) -> list[TokenChunk]:
        lookup = None
        if self.embeddings_dirs:
            lookup = EmbeddingFolder(self.embeddings_dirs, encoder=slot, width=encoder.config.width)
        return self.tokenizer.tokenize_prompt(prompt, pad_id=PAD_ID_BY_ENCODER[slot], embeddings=lookup)

    def _hidden(self, slot: str, encoder: CLIPTextEncoder, chunks: list[TokenChunk],
                project_pooled: bool = True) -> tuple[Tensor, Tensor]:
        """Encode chunks with one encoder -> (hidden (1, 77 * chunks, W), pooled (1, P) of the first chunk)."""
        choice = HIDDEN_STATE_BY_FAMILY[self.family.latent_family]
        clip_skip = self.clip_skip if self.clip_skip is not None else choice.clip_skip
        device = module_device(encoder)
        ids = torch.tensor([chunk.ids for chunk in chunks], device=device)
        with cpu_threads(device, network_work(encoder, ids.numel())), \
                _patched(encoder, self._slot_patches(slot)), torch.no_grad():
            embedded = encoder.embed_tokens(ids)
            embedded = torch.stack([chunk.splice_embeddings(e) for chunk, e in zip(chunks, embedded)])
            out = encoder(ids, token_embeddings=embedded, clip_skip=clip_skip, final_norm=choice.final_norm,
                          project_pooled=project_pooled)
        weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=torch.float32)
        hidden = _emphasize(out.hidden_state.float(), weights)
        return hidden.reshape(1, -1, hidden.shape[-1]).cpu(), out.pooled[:1].float().cpu()

    def _t5_hidden(self, text: str, padded: bool = True) -> Tensor:
        """The T5 encoder's states for a prompt -> (1, T, W), padded to the T5 length (`padded`) or not."""
        length = (self.t5_length or T5_LENGTH_BY_FAMILY[self.family.latent_family]) if padded else None
        return self._t5_states(text, length, masked=False)[0]

    def _t5_states(self, text: str, length: int | None, masked: bool) -> tuple[Tensor, Tensor]:
        """T5's states for a prompt padded to `length` -> (hidden (1, T, W), mask (1, T): 1 for the
        prompt and EOS). masked: the encoder attends to the prompt and EOS only, and prompt weights
        keep the mean of those positions (the padding is inert to a model that masks it too)."""
        encoder = self.encoders["t5xxl"]
        tokenizer = self.t5_tokenizer or T5Tokenizer.from_default()
        tokens = tokenizer.tokenize_prompt(text, length=length)
        device = module_device(encoder)
        ids = torch.tensor([tokens.ids], device=device)
        mask = torch.tensor([tokens.attention_mask])
        with cpu_threads(device, network_work(encoder, ids.numel())), \
                _patched(encoder, self.patches.get("t5xxl", WeightPatches())), torch.no_grad():
            hidden = encoder(ids, attention_mask=mask.to(device) if masked else None).float()
        weights = torch.tensor([tokens.weights], device=device)
        if not masked:
            return _emphasize(hidden, weights).cpu(), mask
        used = tokens.length
        emphasized = _emphasize(hidden[:, :used], weights[:, :used])
        return torch.cat([emphasized, hidden[:, used:]], dim=1).cpu(), mask

    def _encode_pixart(self, text: str) -> CondEntry:
        """PixArt: T5's states of the prompt padded to the family's length, T5 and the model masked
        to the prompt and EOS (the original's and diffusers' pipelines; ComfyUI leaves the padding
        out, which gives the same result). The original's negative is the model's learned null
        caption (:func:`~.sampling.guidance.learned_unconditional`), not an encoded prompt."""
        if "t5xxl" not in self.encoders:
            raise MissingTextEncoderError(f"{self.family.label} conditioning needs a T5 text encoder (t5xxl); "
                                          f"these are {', '.join(self.encoders) or 'none'}")
        context, mask = self._t5_states(text, self.t5_length or PIXART_T5_TOKENS[self.family], masked=True)
        return CondEntry(context=context, context_mask=mask)

    def encode_sd3(self, clip_l: str, clip_g: str, t5xxl: str, *, empty_padding: bool = True) -> CondEntry:
        """SD3 conditioning from one prompt per encoder (ComfyUI's CLIPTextEncodeSD3).

        CLIP-L's and CLIP-G's penultimate states side by side, zero-padded to T5's width, then T5's
        states after them; the pooled vector is CLIP-L's and CLIP-G's projected pooled outputs. An
        encoder the model lacks contributes zeros (the states of both CLIPs are left out when
        neither is there). When the two CLIP prompts need different numbers of 77-token chunks, the
        shorter is continued with chunks of the empty prompt.

        empty_padding False (ComfyUI's "none"): an empty prompt is left out rather than encoded as
        padding: with both CLIP prompts empty the CLIP states are left out and the pooled vector is
        zero; an empty T5 prompt gives T5's states of the end token alone (one position). With
        nothing left at all the context is zeros (1, 77, width).
        """
        skip = {slot: not empty_padding and text == "" for slot, text in
                (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl))}
        t5 = self._t5_hidden(t5xxl, padded=not skip["t5xxl"]) if "t5xxl" in self.encoders else None
        width = t5.shape[-1] if t5 is not None else SD3_CONTEXT_WIDTH
        pooled = [torch.zeros(1, clip_width) for clip_width in SD3_CLIP_WIDTHS.values()]
        parts = []
        present = [slot for slot in SD3_CLIP_WIDTHS if slot in self.encoders]
        if present and not (skip["clip_l"] and skip["clip_g"]):
            prompts = {"clip_l": clip_l, "clip_g": clip_g}
            chunks = {slot: [] if skip[slot] else self._chunks(slot, self.encoders[slot],  # type: ignore[arg-type]
                                                                   prompts[slot])
                      for slot in present}
            count = max(len(slot_chunks) for slot_chunks in chunks.values())
            states: dict[str, Tensor] = {}
            for index, slot in enumerate(SD3_CLIP_WIDTHS):
                if slot not in chunks:
                    continue
                encoder = self.encoders[slot]
                empty = self._chunks(slot, encoder, "")  # type: ignore[arg-type]
                slot_chunks = chunks[slot] + empty * (count - len(chunks[slot]))
                states[slot], pooled[index] = self._hidden(slot, encoder, slot_chunks)  # type: ignore[arg-type]
            length = next(iter(states.values())).shape[1]
            lg = torch.cat([states.get(slot, torch.zeros(1, length, w)) for slot, w in SD3_CLIP_WIDTHS.items()], dim=-1)
            parts.append(F.pad(lg, (0, width - lg.shape[-1])))
        if t5 is not None:
            parts.append(t5)
        if not present and t5 is None:
            raise MissingTextEncoderError("SD3 conditioning needs at least one text encoder (clip_l, clip_g or t5xxl)")
        context = torch.cat(parts, dim=1) if parts else torch.zeros(1, 77, width)
        vector = torch.cat(pooled, dim=-1)
        return CondEntry(context=context, pooled=vector, y=vector)

    def _encode_flux(self, text: str, text_secondary: str | None) -> CondEntry:
        """Flux: T5's states are the context; CLIP-L's pooled output (unprojected) the vector.
        `text` goes to T5 and `text_secondary` (default: the same) to CLIP-L (CLIPTextEncodeFlux)."""
        if "t5xxl" not in self.encoders or "clip_l" not in self.encoders:
            missing = [slot for slot in ("clip_l", "t5xxl") if slot not in self.encoders]
            raise MissingTextEncoderError(f"Flux conditioning needs CLIP-L and T5; missing: {', '.join(missing)}")
        encoder = self.encoders["clip_l"]
        clip_prompt = text if text_secondary is None else text_secondary
        _, pooled = self._hidden("clip_l", encoder, self._chunks("clip_l", encoder, clip_prompt)[:1],  # type: ignore[arg-type]
                                 project_pooled=False)
        return CondEntry(context=self._t5_hidden(text), pooled=pooled, y=pooled)

    def encode(self, text: str, *, text_secondary: str | None = None, size: tuple[int, int] | None = None,
               crop: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
               aesthetic_score: float | None = None) -> CondEntry:
        """A prompt -> one conditioning entry (:meth:`_encode_prompt`) that carries the LoRA hooks
        SetClipHooks gave these encoders for conditionings."""
        entry = self._encode_prompt(text, text_secondary=text_secondary, size=size, crop=crop,
                                    target_size=target_size, aesthetic_score=aesthetic_score)
        return entry.with_(hooks=self.cond_hooks) if self.cond_hooks else entry

    def _encode_prompt(
        self,
        text: str,
        *,
        text_secondary: str | None = None,
        size: tuple[int, int] | None = None,
        crop: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
    ) -> CondEntry:
        """A prompt -> one conditioning entry.

        SDXL: `text` goes to CLIP-G and `text_secondary` (default: the same) to CLIP-L; the states
        are concatenated and the pooled CLIP-G embedding with the size conditioning forms `y`.
        Sizes are (height, width) in pixels; crop is (top, left); target_size defaults to size, the
        refiner's aesthetic_score to 6. Without a size, the sizes are the sampled latent's, crop
        (0, 0), and the refiner's score 6 on the positive side and 2.5 on the negative (ComfyUI's and
        diffusers' rule): `y` is left to the guider (:class:`~.sampling.guidance.SizeFromLatent`).
        SD3, Flux and PixArt: see
        :meth:`encode_sd3`, :meth:`_encode_flux` (Flux: `text` to T5, `text_secondary` to CLIP-L)
        and :meth:`_encode_pixart`.
        """
        if self.family in PIXART_T5_TOKENS:
            return self._encode_pixart(text)
        if self.family.latent_family == "sd3":
            return self.encode_sd3(text, text, text)
        if self.family.latent_family == "flux":
            return self._encode_flux(text, text_secondary)
        hidden_parts: list[Tensor] = []
        pooled: Tensor | None = None
        chunk_counts = []
        for slot, encoder in self.encoders.items():
            prompt = text_secondary if (slot == "clip_l" and self.family.latent_family == "sdxl"
                                        and text_secondary is not None) else text
            chunks = self._chunks(slot, encoder, prompt)  # type: ignore[arg-type]
            chunk_counts.append(len(chunks))
            hidden, slot_pooled = self._hidden(slot, encoder, chunks)
            hidden_parts.append(hidden)
            pooled = slot_pooled  # the last encoder's pooled output (CLIP-G for SDXL, CLIP-L/H otherwise)
        if len(set(chunk_counts)) > 1:
            # Two prompts of different lengths (SDXL): pad the shorter with repeats of its last chunk.
            longest = max(part.shape[1] for part in hidden_parts)
            hidden_parts = [torch.cat([p] + [p[:, -77:]] * ((longest - p.shape[1]) // 77), dim=1) for p in hidden_parts]
        context = torch.cat(hidden_parts, dim=-1)
        refiner = self.family is ModelFamily.SDXL_REFINER
        if self.family is not ModelFamily.SDXL and not refiner:
            return CondEntry(context=context, pooled=pooled)
        if size is None:
            if crop != (0, 0) or target_size is not None or aesthetic_score is not None:
                raise ValueError("SDXL crop, target_size and aesthetic_score apply with an explicit size; "
                                 "without one all sizes are the sampled image's")
            return CondEntry(context=context, pooled=pooled, size_from_latent=SizeFromLatent(refiner=refiner))
        if refiner:
            score = REFINER_AESTHETIC_SCORE["positive"] if aesthetic_score is None else aesthetic_score
            y = sdxl_vector_conditioning(pooled, size, crop, aesthetic_score=score)  # type: ignore[arg-type]
        else:
            y = sdxl_vector_conditioning(pooled, size, crop, target_size or size)  # type: ignore[arg-type]
        return CondEntry(context=context, pooled=pooled, y=y)

    def phrase_embedding(self, text: str) -> Tensor:
        """A phrase's pooled embedding, unprojected (GLIGEN's phrase input; ComfyUI's
        return_pooled="unprojected"): the last CLIP encoder's final-normed last-layer state at the
        end token of the phrase's first chunk, whatever the clip skip -> (1, W)."""
        slots = [slot for slot, encoder in self.encoders.items() if isinstance(encoder, CLIPTextEncoder)]
        if not slots:
            raise MissingTextEncoderError(f"a phrase embedding needs a CLIP text encoder; these are "
                                          f"{', '.join(self.encoders) or 'none'}")
        slot = slots[-1]
        encoder: CLIPTextEncoder = self.encoders[slot]  # type: ignore[assignment]
        return self._hidden(slot, encoder, self._chunks(slot, encoder, text)[:1], project_pooled=False)[1]


def _vae_work(half: nn.Module, image_shape: tuple[int, ...]) -> float:
    """The size of a VAE encode or decode for the CPU thread policy. image_shape: (B, 3, H, W). The
    wide blocks, which hold most weights, run at a fraction of the image's size, the narrow ones at
    all of it: one sixteenth of the pixels is about where the weights work."""
    return network_work(half, image_shape[0] * image_shape[2] * image_shape[3] // 16)


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
        device, dtype = module_device(self.vae), compute_dtype(self.vae)
        x = image.permute(0, 3, 1, 2).to(device, dtype) * 2.0 - 1.0
        with cpu_threads(device, _vae_work(self.vae.encoder, x.shape)):
            posterior = self.vae.encode(x) if tile_size is None else self.vae.encode_tiled(x, tile_size, overlap)
        return self.scaling.to_diffusion(posterior.mean.float()).cpu()

    @torch.no_grad()
    def decode(self, latents: Tensor, tile_size: int | None = None, overlap: int = 64) -> Tensor:
        """latents: (B, C, h, w) diffusion latents -> image (B, h*f, w*f, 3) in [0, 1] on the CPU."""
        device, dtype = module_device(self.vae), compute_dtype(self.vae)
        z = self.scaling.to_vae(latents.to(device, torch.float32)).to(dtype)
        b, _, h, w = z.shape
        f = self.downscale_factor
        with cpu_threads(device, _vae_work(self.vae.decoder, (b, 3, h * f, w * f))):
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
