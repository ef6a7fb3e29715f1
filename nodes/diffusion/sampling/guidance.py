"""Conditioning and classifier-free guidance: prompts, class labels, areas, masks, timestep ranges and
ControlNets turned into one denoiser `model(x, sigma) -> denoised` for the samplers.

A conditioning is a tuple of :class:`CondEntry`; each entry is one encoded prompt (or, for DiT, one
class label) with where and when it applies. At every step the entries active at that sigma are
evaluated, batched into as few network calls as their shapes allow (the positive and negative prompt
of a plain graph share one call), and their predictions are averaged with their area/mask weights.
Guidance then combines the two sides: uncond + cfg * (cond - uncond); at cfg 1 the negative side is
not evaluated.

The network's config says how it is called: a U-Net (text states, SDXL's vector, ControlNets), an
MMDiT or Flux (text states and pooled vector, Flux-dev's distilled guidance, their ControlNets), a DiT (class labels;
its unconditional input is the null class) or a PixArt (masked T5 states; its unconditional input
is the learned null caption, :func:`learned_unconditional`). DiT and PixArt output a learned
variance beside the eps, which the guider drops.

SDXL's vector conditioning of a prompt encoded without sizes (a plain TextEncode) is completed here,
from the latent being sampled: :class:`SizeFromLatent`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.controlnet import ControlNet
from ..networks.dit import DiTConfig
from ..networks.flux import FluxConfig
from ..networks.flux_controlnet import FluxControlNet
from ..networks.gligen import GligenError, Grounding, grounded
from ..networks.mmdit import MMDiTConfig
from ..networks.mmdit_controlnet import SD3ControlNet
from ..networks.pixart import PixArtConfig, PixArtInputError
from ..networks.transformer_control import TransformerControl
from ..networks.unet import ControlResiduals, UNetConfig, sdxl_vector_conditioning
from ..weights.storage import compute_dtype
from .hooks import HookError, Hooks, HookSchedule, combined, hook_deltas
from .model_sampling import ModelSampling, learned_sigma_prediction
from .unclip import ImagePrompt


class GuidanceError(ValueError):
    """Conditioning that cannot be applied to this model or latent (names what does not fit)."""


@dataclass(frozen=True)
class LatentHint:
    """How a ControlNet that reads its control image as latents (SD3, Flux) gets them.

    encode: (B, 3, H, W) control image in [0, 1] -> (B, C, H / downscale, W / downscale) latents in
    the ControlNet's scaling (the model's VAE, encoding when first needed at a latent size).
    """

    encode: Callable[[Tensor], Tensor]
    downscale: int


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet applied to a conditioning; `previous` is the ControlNet applied before it (stacked).

    hint: (B or 1, 3, H, W) control image in [0, 1], resized to the latent's pixel size when used.
    start/end: the part of sampling it acts in, as fractions of the way from noise to image.
    mode: a union ControlNet's control type (Flux), None for none. latent_hint: for ControlNets that
    read latents, how the (resized) control image becomes them.
    """

    controlnet: ControlNet | SD3ControlNet | FluxControlNet
    hint: Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    previous: ControlSpec | None = None
    mode: int | None = None
    latent_hint: LatentHint | None = None

    def chain(self) -> list[ControlSpec]:
        specs, spec = [], self
        while spec is not None:
            specs.append(spec)
            spec = spec.previous
        return specs[::-1]


# The aesthetic score the SDXL refiner is told on each side when the prompt does not say (ComfyUI's and
# diffusers' defaults: a good image wanted, a poor one guided away from).
REFINER_AESTHETIC_SCORE = {"positive": 6.0, "negative": 2.5}


@dataclass(frozen=True)
class SizeFromLatent:
    """SDXL's size conditioning of a prompt that gave no sizes, completed at sampling time.

    The original and target size are the pixel size of the latent being sampled and the crop is
    (0, 0), as ComfyUI (a conditioning without width/height takes the noise's size x 8) and
    diffusers (original_size = target_size = (height, width)) do. refiner: the refiner's form,
    original size, crop and an aesthetic score (:data:`REFINER_AESTHETIC_SCORE` by side).
    """

    refiner: bool = False

    def vector(self, pooled: Tensor, pixel_size: tuple[int, int], negative: bool) -> Tensor:
        """pooled: (1, P), pixel_size: (height, width) -> y (1, P + 256 * 6) (refiner: 5 values)."""
        if self.refiner:
            score = REFINER_AESTHETIC_SCORE["negative" if negative else "positive"]
            return sdxl_vector_conditioning(pooled, pixel_size, (0, 0), aesthetic_score=score)
        return sdxl_vector_conditioning(pooled, pixel_size, (0, 0), target_size=pixel_size)


@dataclass(frozen=True)
class CondEntry:
    """One encoded prompt (or class label) and where/when it applies.

    context: (1, T, D) text-encoder hidden states (T a multiple of 77 for long CLIP prompts), None
    for a class label. context_mask: (1, T), nonzero for the positions the model attends to (PixArt's
    T5 prompt and EOS; the padding after them is inert), None = every position.
    class_label: the class a class-conditional model (DiT) is told, its null class for the
    unconditional side; None for text conditioning.
    pooled: (1, P) pooled text embedding or None; y: (1, adm) the vector conditioning of models
    that take one (SDXL: pooled + size embeddings), else None.
    size_from_latent: set (with y None) when SDXL's sizes are the sampled latent's; the guider builds
    y from `pooled` (:class:`SizeFromLatent`).
    area: (height, width, top, left) in image pixels, or None for the whole image.
    mask: (H, W) or (1, H, W) in [0, 1] at any resolution (resized to the latent), or None.
    strength: weight of this entry where several overlap.
    start/end: the fraction of sampling (0 = first step, 1 = last) the entry is active in.
    control_to_negative: the entry's ControlNet also applies to the negative side when that has
    none of its own (ComfyUI's one-conditioning ControlNetApply), see :func:`controls_for_negative`.
    image_prompts: CLIP image embeddings for models that take them (SD2.1-unCLIP, SDXL revision),
    turned into y or the pooled vector before sampling by :func:`.unclip.with_image_prompts`.
    guidance: the guidance strength a guidance-distilled model (Flux.1-dev) is told (FluxGuidance);
    None = :data:`DEFAULT_DISTILLED_GUIDANCE`.
    concat_latent: (b, C, h, w) an image's latent (diffusion space) for image-conditioned models
    (InstructPix2Pix, Flux Canny/Depth: the image; inpainting models: the masked image);
    concat_mask: (b, 1, H, W) in [0, 1] their inpainting mask at any resolution; both turned into
    `concat` before sampling (:func:`.concat.concat_channels`). concat: (b, K, h, w) the model's
    extra input channels for this entry, at the sampled latent's size, or None.
    reference_latents: (b, C, h, w) latents (diffusion space) an edit model attends to as extra
    tokens (Flux.1 Kontext: ReferenceLatent), in order.
    hooks: LoRA hooks that patch the denoiser for the network calls evaluating this entry alone
    (ComfyUI's hook nodes, :mod:`.hooks`); entries with other hooks are evaluated in calls of their own.
    grounding: GLIGEN's phrases in boxes (GLIGENTextBoxApply), which ground this entry's U-Net
    calls only; None for none.
    """

    context: Tensor | None = None
    pooled: Tensor | None = None
    y: Tensor | None = None
    context_mask: Tensor | None = None
    class_label: int | None = None
    area: tuple[int, int, int, int] | None = None
    mask: Tensor | None = None
    mask_strength: float = 1.0
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control: ControlSpec | None = None
    control_to_negative: bool = False
    image_prompts: tuple[ImagePrompt, ...] = ()
    guidance: float | None = None
    size_from_latent: SizeFromLatent | None = None
    concat_latent: Tensor | None = None
    concat_mask: Tensor | None = None
    concat: Tensor | None = None
    reference_latents: tuple[Tensor, ...] = ()
    hooks: Hooks = ()
    grounding: Grounding | None = None

    def with_(self, **changes: object) -> CondEntry:
        return replace(self, **changes)

    def sized(self, pixel_size: tuple[int, int], negative: bool) -> CondEntry:
        """The entry with its vector conditioning for an image of pixel_size (height, width); an
        entry whose y does not depend on the image is returned as it is."""
        if self.size_from_latent is None or self.pooled is None:
            return self
        return replace(self, y=self.size_from_latent.vector(self.pooled, pixel_size, negative), size_from_latent=None)


Conditioning = tuple[CondEntry, ...]

# What a guidance-distilled model is told when the conditioning does not say (ComfyUI's and
# diffusers' default for Flux.1-dev).
DEFAULT_DISTILLED_GUIDANCE = 3.5


@dataclass
class _Work:
    """One entry's model input at one step: the region of x it sees and its weight there."""

    entry: CondEntry
    side: int  # 0 = positive; the others (negative, DualCFGGuider's middle) are told as negative
    region: tuple[int, int, int, int]  # top, left, height, width in latent cells
    weight: Tensor  # (1 or B, 1, h, w)


def _latent_region(entry: CondEntry, height: int, width: int, factor: int) -> tuple[int, int, int, int]:
    if entry.area is None:
        return 0, 0, height, width
    area_h, area_w, top, left = entry.area
    top, left = min(top // factor, height - 1), min(left // factor, width - 1)
    h = max(1, min(area_h // factor, height - top))
    w = max(1, min(area_w // factor, width - left))
    return top, left, h, w


def _entry_weight(entry: CondEntry, region: tuple[int, int, int, int], height: int, width: int,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    top, left, h, w = region
    weight = torch.full((1, 1, h, w), float(entry.strength), device=device, dtype=dtype)
    if entry.mask is not None:
        mask = entry.mask.to(device=device, dtype=dtype)
        mask = mask.reshape(-1, 1, *mask.shape[-2:])
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        weight = weight * mask[:, :, top: top + h, left: left + w] * entry.mask_strength
    return weight


def conditioning_widths(network: nn.Module) -> tuple[int | None, int | None]:
    """(text-state width, vector-conditioning width) that a denoising network takes; None for what
    it does not take (DiT takes class labels, neither text states nor a vector)."""
    config = network.config
    if isinstance(config, UNetConfig):
        return config.context_dim, config.adm_in_channels
    if isinstance(config, DiTConfig):
        return None, None
    if isinstance(config, PixArtConfig):
        return config.caption_dim, None
    return config.context_dim, config.pooled_dim


def _check_class_labels(config: DiTConfig, entries: Sequence[CondEntry]) -> None:
    for entry in entries:
        if entry.class_label is None:
            raise GuidanceError("this DiT model is conditioned on class labels, not text: use ClassLabel "
                                "(its unconditional output, the null class, for the negative side)")
        if not 0 <= entry.class_label <= config.null_class:
            raise GuidanceError(f"class label {entry.class_label} does not fit this DiT model: classes are "
                                f"0..{config.num_classes - 1}, its null class is {config.null_class}")


def _check_hooks(network: nn.Module, entries: Sequence[CondEntry]) -> None:
    """Refuse LoRA hooks that cannot act on this network (each hook's LoRA matched once)."""
    for hook in combined(*(entry.hooks for entry in entries)):
        try:
            hook_deltas(network, hook)
        except HookError as error:
            raise GuidanceError(str(error)) from None


def check_conditioning(network: nn.Module, entries: Sequence[CondEntry]) -> None:
    """Raise GuidanceError if any entry was not made for this network (U-Net, MMDiT, Flux, DiT, PixArt)."""
    _check_hooks(network, entries)
    if isinstance(network.config, DiTConfig):
        _check_class_labels(network.config, entries)
        return
    context_dim, vector_dim = conditioning_widths(network)
    for entry in entries:
        if entry.context is None:
            raise GuidanceError(f"class-label conditioning (class {entry.class_label}) is for class-conditional "
                                "DiT models; this model is conditioned on text: encode a prompt for it")
        if entry.context.ndim != 3 or entry.context.shape[-1] != context_dim:
            raise GuidanceError(
                f"conditioning of shape {tuple(entry.context.shape)} does not fit this model, which expects "
                f"(1, T, {context_dim}) text states (a prompt encoded for another model family?)"
            )
        # The width a vector completed at sampling time will have does not depend on the image size.
        y = entry.sized((1024, 1024), negative=False).y
        if vector_dim is not None and (y is None or y.shape[-1] != vector_dim):
            got = None if y is None else tuple(y.shape)
            raise GuidanceError(
                f"this model needs vector conditioning (pooled text, SDXL sizes) of width {vector_dim}, got {got}: "
                "encode the prompt with this model's text encoders"
            )
        if entry.context_mask is not None and entry.context_mask.shape != entry.context.shape[:2]:
            raise GuidanceError(f"conditioning mask of shape {tuple(entry.context_mask.shape)} does not fit its "
                                f"text states {tuple(entry.context.shape)}: expected (1, T)")
        if entry.control is not None:
            _check_controls(network, entry.control)
        if entry.reference_latents and not isinstance(network.config, FluxConfig):
            raise GuidanceError("reference latents (ReferenceLatent) are for Flux.1 Kontext models")
        if entry.grounding is not None:
            try:
                entry.grounding.model.check_fits(network)
            except GligenError as error:
                raise GuidanceError(str(error)) from None


# Which ControlNets guide which networks: (network config, ControlNet module, what the model is).
_CONTROLNETS_FOR = ((UNetConfig, ControlNet, "SD1.x/SD2.x/SDXL U-Net"), (MMDiTConfig, SD3ControlNet, "SD3 (MMDiT)"),
                    (FluxConfig, FluxControlNet, "Flux"))
_CONTROLNET_KINDS = {ControlNet: "an SD1.x/SD2.x/SDXL", SD3ControlNet: "an SD3", FluxControlNet: "a Flux"}


def _check_controls(network: nn.Module, control: ControlSpec) -> None:
    for config_type, controlnet_type, model in _CONTROLNETS_FOR:
        if isinstance(network.config, config_type):
            for spec in control.chain():
                if not isinstance(spec.controlnet, controlnet_type):
                    raise GuidanceError(f"{_CONTROLNET_KINDS[type(spec.controlnet)]} ControlNet cannot guide this "
                                        f"{model} model: load a ControlNet made for it")
                if controlnet_type is not ControlNet and spec.latent_hint is None and not getattr(
                        spec.controlnet.config, "image_input", False):
                    raise GuidanceError("this ControlNet reads its control image as latents: apply it with a VAE")
            return
    raise GuidanceError("ControlNets guide U-Net (SD1.x, SD2.x, SDXL), SD3 and Flux models only")


def learned_unconditional(network: nn.Module) -> CondEntry:
    """The unconditional input a model learned for classifier-free guidance, as a conditioning entry:
    DiT's null class, PixArt's null caption (``y_embedder.y_embedding``, all positions attended).
    Raises GuidanceError for models without one (U-Nets, MMDiT, Flux, and PixArt weights that were
    converted to the diffusers layout, which drops the null caption)."""
    config = network.config
    if isinstance(config, DiTConfig):
        return CondEntry(class_label=config.null_class)
    if isinstance(config, PixArtConfig):
        try:
            caption = network.null_context(1)
        except PixArtInputError as error:
            raise GuidanceError(str(error)) from None
        return CondEntry(context=caption.detach().float().cpu().clone())
    raise GuidanceError("only DiT (null class) and PixArt (null caption) models carry a learned unconditional "
                        "input; encode an empty prompt as the negative instead")


def controls_for_negative(positive: Sequence[CondEntry], negative: Sequence[CondEntry]) -> tuple[CondEntry, ...]:
    """The negative side with the positive side's ControlNets that also apply to it (ComfyUI's rule
    for ControlNetApply, which conditions one prompt): only when no negative entry for the whole
    image has a ControlNet of its own, the ControlNet of the k-th positive whole-image entry marked
    `control_to_negative` goes onto whole-image negative entry k (cycling; a later one replaces an
    earlier one on the same entry). Entries restricted to an area take no part."""
    targets = [i for i, entry in enumerate(negative) if entry.area is None]
    if any(negative[i].control is not None for i in targets):
        return tuple(negative)
    controls = [entry.control for entry in positive
                if entry.area is None and entry.control is not None and entry.control_to_negative]
    out = list(negative)
    for k, control in enumerate(controls if targets else []):
        i = targets[k % len(targets)]
        out[i] = negative[i].with_(control=control)
    return tuple(out)


def fit_caption(entry: CondEntry, length: int) -> CondEntry:
    """A masked text entry padded or trimmed to `length` positions where only masked (inert)
    positions change, so the model's result is the same and entries of one length batch together
    (a prompt padded to Σ's 300 T5 tokens beside α's 120-token null caption). An entry whose
    attended positions do not fit in `length` is returned as it is (the model takes any length)."""
    context = entry.context
    if context is None or context.shape[1] == length:
        return entry
    tokens = context.shape[1]
    mask = entry.context_mask if entry.context_mask is not None else torch.ones(1, tokens)
    if tokens > length:
        if bool(mask[:, length:].any()):
            return entry
        return entry.with_(context=context[:, :length], context_mask=mask[:, :length])
    pad = length - tokens
    return entry.with_(context=F.pad(context, (0, 0, 0, pad)), context_mask=F.pad(mask, (0, pad)))


class CFGGuider:
    """Classifier-free guidance of one model by a positive and a negative conditioning.

    network: the (already patched) denoiser (U-Net, MMDiT, Flux, DiT, PixArt); model_sampling: how it is driven;
    downscale: image pixels per latent cell (areas and control images are given in pixels).
    concat: optional (B, K, H, W) extra input channels (inpainting models' mask + masked latent).
    """

    def __init__(
        self,
        network: nn.Module,
        model_sampling: ModelSampling,
        positive: Sequence[CondEntry],
        negative: Sequence[CondEntry],
        cfg: float,
        downscale: int = 8,
        concat: Tensor | None = None,
    ) -> None:
        if not positive:
            raise GuidanceError("the positive conditioning is empty")
        if cfg != 1.0 and not negative:
            raise GuidanceError("the negative conditioning is empty (needed when cfg is not 1)")
        self.network = network
        self.model_sampling = model_sampling
        if isinstance(network.config, PixArtConfig):
            positive = [fit_caption(entry, network.config.max_token_length) for entry in positive]
            negative = [fit_caption(entry, network.config.max_token_length) for entry in negative]
        self.positive = tuple(positive)
        self.negative = controls_for_negative(self.positive, negative)
        self.cfg = float(cfg)
        self.downscale = downscale
        self.concat = concat
        self.model_calls = 0  # network forward passes so far (each batched over entries)
        check_conditioning(network, self.positive + self.negative)
        # Entries completed for the latent's size, once per (entry, side, pixel size); the entries are
        # held by self.positive / self.negative, so their ids stay theirs.
        self._sized: dict[tuple[int, int, tuple[int, int]], CondEntry] = {}
        # Control images encoded to latents, once per (spec, pixel size).
        self._hint_latents: dict[tuple[int, int, int], Tensor] = {}
        # The LoRA hooks of the entries: their keyframe walks over this run and their matched LoRAs.
        self._hooks = HookSchedule(network, model_sampling.percent_to_sigma)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x: (B, C, H, W) noisy latents, sigma: (B,) -> guided denoised estimate (B, C, H, W)."""
        if self.cfg == 1.0:
            return self._predictions(x, sigma, [self.positive])[0]
        cond, uncond = self._predictions(x, sigma, [self.positive, self.negative])
        return uncond + self.cfg * (cond - uncond)

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, unconditional) denoised estimates, each (B, C, H, W), for samplers that re-noise
        with the unconditional prediction (CFG++); the negative side is evaluated at cfg 1 too."""
        if not self.negative:
            raise GuidanceError("this sampler needs the unconditional prediction: give a negative conditioning")
        cond, uncond = self._predictions(x, sigma, [self.positive, self.negative])
        return uncond + self.cfg * (cond - uncond), uncond

    def _predictions(self, x: Tensor, sigma: Tensor, sides: list[tuple[CondEntry, ...]]) -> list[Tensor]:
        """Each side's (positive, negative) area/mask-weighted denoised estimate (B, C, H, W)."""
        level = float(sigma.reshape(-1)[0])
        height, width = x.shape[-2:]
        pixel_size = (height * self.downscale, width * self.downscale)
        work: list[_Work] = []
        for side, entries in enumerate(sides):
            # A side whose entries' timestep ranges all exclude this step falls back to all of them.
            active = [e for e in entries if self._in_range(e.start, e.end, level)] or list(entries)
            for entry in active:
                entry = self._sized_entry(entry, side, pixel_size)
                region = _latent_region(entry, height, width, self.downscale)
                work.append(_Work(entry, side, region, _entry_weight(entry, region, height, width, x.device, x.dtype)))

        totals = [torch.zeros_like(x) for _ in sides]
        weights = [torch.zeros((x.shape[0], 1, height, width), device=x.device, dtype=x.dtype) for _ in sides]
        for group in _groups(work):
            with self._hooks.applied(group[0].entry.hooks, level):  # a group's hooks patch its call alone
                outputs = self._run_group(group, x, sigma)
            for item, output in zip(group, outputs):
                top, left, h, w = item.region
                totals[item.side][:, :, top: top + h, left: left + w] += output * item.weight
                weights[item.side][:, :, top: top + h, left: left + w] += item.weight
        # Where no entry covers a cell (areas/masks that leave gaps) the cell keeps x as its estimate.
        return [torch.where(wt > 0, tot / wt.clamp_min(1e-8), x) for tot, wt in zip(totals, weights)]

    def _sized_entry(self, entry: CondEntry, side: int, pixel_size: tuple[int, int]) -> CondEntry:
        """The entry with SDXL's sizes taken from the latent where its prompt left them open."""
        if entry.size_from_latent is None:
            return entry
        key = (id(entry), side, pixel_size)
        if key not in self._sized:
            self._sized[key] = entry.sized(pixel_size, negative=side > 0)
        return self._sized[key]

    def _run_group(self, group: list[_Work], x: Tensor, sigma: Tensor) -> list[Tensor]:
        """One batched network call for entries sharing region and shapes -> each entry's denoised (B, C, h, w)."""
        top, left, h, w = group[0].region
        batch = x.shape[0]
        x_in = x[:, :, top: top + h, left: left + w]
        n = len(group)
        xs = x_in.repeat(n, 1, 1, 1)
        sigmas = sigma.repeat(n)
        c_in = self.model_sampling.input_scale(sigmas).to(x.dtype).reshape(-1, 1, 1, 1)
        model_in = xs * c_in
        extras = [self.concat if item.entry.concat is None else item.entry.concat for item in group]
        if extras[0] is not None:
            extra = torch.cat([e[:, :, top: top + h, left: left + w].to(x.device, x.dtype).expand(batch, -1, -1, -1)
                               for e in extras])  # type: ignore[index]
            model_in = torch.cat([model_in, extra], dim=1)
        timesteps = self.model_sampling.timestep(sigmas).to(x.device)
        # The network may run in half precision; the sampler's arithmetic stays in x's dtype.
        dtype = compute_dtype(self.network)
        config = self.network.config
        if isinstance(config, DiTConfig):
            labels = [item.entry.class_label for item in group for _ in range(batch)]
            output = self.network(model_in.to(dtype), timesteps, torch.tensor(labels, device=x.device))
        elif isinstance(config, PixArtConfig):
            context, mask = self._masked_context(group, batch, x.device)
            output = self.network(model_in.to(dtype), timesteps, context.to(dtype), mask)
        else:
            context = torch.cat([item.entry.context.to(x.device, x.dtype).expand(batch, -1, -1)  # type: ignore[union-attr]
                                 for item in group]).to(dtype)
            y = None
            if conditioning_widths(self.network)[1] is not None:
                y = torch.cat([item.entry.y.to(x.device, x.dtype).expand(batch, -1)  # type: ignore[union-attr]
                               for item in group]).to(dtype)
            control = self._control(group, (xs * c_in).to(dtype), timesteps, context, y,
                                    float(sigma.reshape(-1)[0]), (top, left, h, w),
                                    self._distilled_guidance(group, batch, x))
            if isinstance(config, UNetConfig):
                with grounded(self.network, [item.entry.grounding for item in group], batch, (h, w), self.downscale):
                    output = self.network(model_in.to(dtype), timesteps, context, y, control)
            else:
                extra = self._guidance_input(group, batch, x)
                if control is not None:
                    extra["control"] = control
                if group[0].entry.reference_latents:
                    extra["reference_latents"] = self._reference_latents(group, batch, x)
                output = self.network(model_in.to(dtype), timesteps, context, y, **extra)
        self.model_calls += 1
        output = output.to(x.dtype)
        if getattr(config, "learn_sigma", False):
            output = learned_sigma_prediction(output, xs.shape[1])
        denoised = self.model_sampling.denoised(xs, sigmas, output)
        return list(denoised.chunk(n))

    @staticmethod
    def _masked_context(group: list[_Work], batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The group's text states (n * B, T, D) and their mask (n * B, T) bool, None when every position counts."""
        context = torch.cat([item.entry.context.to(device).expand(batch, -1, -1)  # type: ignore[union-attr]
                             for item in group])
        if all(item.entry.context_mask is None for item in group):
            return context, None
        rows = []
        for item in group:
            mask = item.entry.context_mask
            if mask is None:
                mask = torch.ones(item.entry.context.shape[:2])  # type: ignore[union-attr]
            rows.append(mask.to(device).bool().expand(batch, -1))
        return context, torch.cat(rows)

    @staticmethod
    def _reference_latents(group: list[_Work], batch: int, x: Tensor) -> list[Tensor]:
        """Each reference latent of the group's entries for every row of the batched call: (n * B, C, h, w)."""
        count = len(group[0].entry.reference_latents)
        return [torch.cat([item.entry.reference_latents[i].to(x.device, x.dtype).expand(batch, -1, -1, -1)
                           for item in group]) for i in range(count)]

    def _guidance_input(self, group: list[_Work], batch: int, x: Tensor) -> dict[str, Tensor]:
        """The guidance strength guidance-distilled networks (Flux.1-dev) take, per row of the batched call."""
        if not getattr(self.network.config, "guidance_embed", False):
            return {}
        return {"guidance": self._distilled_guidance(group, batch, x)}

    @staticmethod
    def _distilled_guidance(group: list[_Work], batch: int, x: Tensor) -> Tensor:
        """(n * B,) the guidance strength each row is told (FluxGuidance; Flux ControlNets take it too)."""
        values = [DEFAULT_DISTILLED_GUIDANCE if item.entry.guidance is None else item.entry.guidance
                  for item in group for _ in range(batch)]
        return torch.tensor(values, device=x.device, dtype=torch.float32)

    def _in_range(self, start: float, end: float, level: float) -> bool:
        return self.model_sampling.percent_to_sigma(end) <= level <= self.model_sampling.percent_to_sigma(start)

    def _control(self, group: list[_Work], x_in: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None,
                 level: float, region: tuple[int, int, int, int],
                 guidance: Tensor) -> ControlResiduals | TransformerControl | None:
        """Summed residuals of every active ControlNet of the group's entries, one call per ControlNet.
        guidance: (n * B,) distilled guidance per row, which Flux ControlNets take."""
        batch = x_in.shape[0] // len(group)
        users: dict[int, tuple[ControlSpec, list[int]]] = {}
        for index, item in enumerate(group):
            for spec in item.entry.control.chain() if item.entry.control is not None else []:
                if self._in_range(spec.start, spec.end, level):
                    rows = list(range(index * batch, (index + 1) * batch))
                    users.setdefault(id(spec), (spec, []))[1].extend(rows)
        total: ControlResiduals | TransformerControl | None = None
        for spec, rows in users.values():
            index = torch.tensor(rows, device=x_in.device)
            hint = self._hint(spec, len(rows), region, x_in)
            rows_y = None if y is None else y[index]
            if isinstance(spec.controlnet, ControlNet):
                residuals = spec.controlnet(x_in[index], hint, timesteps[index], context[index], rows_y, spec.strength)
            else:
                # Transformer ControlNets take the network they guide (SD3.5-large ones use its patch
                # embedding; all spread their outputs over its blocks).
                extra = {}
                if isinstance(spec.controlnet, FluxControlNet):
                    extra = {"guidance": guidance[index], "mode": spec.mode}
                residuals = spec.controlnet(x_in[index], hint, timesteps[index], context[index], rows_y, spec.strength,
                                            base=self.network, **extra)
            full = _scatter_rows(residuals, index, x_in.shape[0])
            total = full if total is None else total + full
        return total

    def _hint(self, spec: ControlSpec, batch: int, region: tuple[int, int, int, int], x_in: Tensor) -> Tensor:
        top, left, h, w = region
        # The hint is at the ControlNet's own scale (usually the VAE's 8x, but it is the ControlNet's call);
        # a latent-reading ControlNet's image is resized to the latent's pixel size, then encoded.
        if spec.latent_hint is not None:
            f = spec.latent_hint.downscale
        elif isinstance(spec.controlnet, ControlNet):
            f = spec.controlnet.controlnet_config.hint_downscale
        else:
            f = spec.controlnet.config.hint_downscale  # type: ignore[union-attr]
        hint = spec.hint.to(x_in.device, x_in.dtype)
        full_h, full_w = h * f, w * f
        if tuple(hint.shape[-2:]) != (full_h, full_w):
            hint = F.interpolate(hint, size=(full_h, full_w), mode="bilinear", align_corners=False)
        if spec.latent_hint is not None:
            key = (id(spec), full_h, full_w)
            if key not in self._hint_latents:
                self._hint_latents[key] = spec.latent_hint.encode(hint.float())
            hint = self._hint_latents[key].to(x_in.device, x_in.dtype)
        if hint.shape[0] != batch:
            if batch % hint.shape[0]:
                raise GuidanceError(f"control image batch {hint.shape[0]} does not divide the latent batch {batch}")
            hint = hint.repeat(batch // hint.shape[0], 1, 1, 1)
        return hint


class DualCFGGuider(CFGGuider):
    """Guidance by two conditionings and a negative (ComfyUI's DualCFGGuider, for edit models: the
    edit prompt with the image, the image alone, nothing).

    With predictions p (positive, ComfyUI's cond1), m (middle, cond2) and n (negative):
    regular: n + cfg_middle * (m - n) + cfg * (p - m); nested: n + cfg_middle * (m + cfg * (p - m) - n).
    Regular skips the sides its scales make irrelevant (n at cfg_middle 1, then m too at cfg 1), which
    leaves the result unchanged. The middle side is told as a negative prompt (SDXL refiner scores).
    """

    def __init__(
        self,
        network: nn.Module,
        model_sampling: ModelSampling,
        positive: Sequence[CondEntry],
        middle: Sequence[CondEntry],
        negative: Sequence[CondEntry],
        cfg: float,
        cfg_middle: float,
        nested: bool = False,
        downscale: int = 8,
        concat: Tensor | None = None,
    ) -> None:
        if not middle or not negative:
            raise GuidanceError("DualCFGGuider needs a middle (cond2) and a negative conditioning")
        super().__init__(network, model_sampling, positive, negative, cfg, downscale, concat)
        if isinstance(network.config, PixArtConfig):
            middle = [fit_caption(entry, network.config.max_token_length) for entry in middle]
        self.middle = controls_for_negative(self.positive, middle)
        self.cfg_middle = float(cfg_middle)
        self.nested = nested
        check_conditioning(network, self.middle)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x: (B, C, H, W) noisy latents, sigma: (B,) -> guided denoised estimate (B, C, H, W)."""
        return self.denoise_with_uncond(x, sigma)[0]

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, unconditional) denoised estimates, each (B, C, H, W); the unconditional one is
        what the outer guidance step starts from (regular: the negative's, nested: the middle's)."""
        if self.nested:
            positive, middle, negative = self._predictions(x, sigma, [self.positive, self.middle, self.negative])
            text = middle + self.cfg * (positive - middle)
            return negative + self.cfg_middle * (text - negative), middle
        if self.cfg_middle == 1.0:
            if self.cfg == 1.0:
                positive = self._predictions(x, sigma, [self.positive])[0]
                return positive, positive
            positive, middle = self._predictions(x, sigma, [self.positive, self.middle])
            return middle + self.cfg * (positive - middle), middle
        positive, middle, negative = self._predictions(x, sigma, [self.positive, self.middle, self.negative])
        return negative + self.cfg_middle * (middle - negative) + self.cfg * (positive - middle), negative


def _scatter_rows(residuals: ControlResiduals | TransformerControl, rows: Tensor,
                  total_rows: int) -> ControlResiduals | TransformerControl:
    """Residuals computed for some rows of a batched call -> zeros elsewhere in the whole batch."""
    if isinstance(residuals, TransformerControl):
        return residuals.scattered(rows, total_rows)

    def pad(t: Tensor) -> Tensor:
        return t.new_zeros((total_rows, *t.shape[1:])).index_copy(0, rows, t)

    return ControlResiduals([pad(t) for t in residuals.down], pad(residuals.middle))


def _groups(work: list[_Work]) -> list[list[_Work]]:
    """Entries that can share one network call: same region, context/vector shapes and LoRA hooks."""
    groups: dict[tuple, list[_Work]] = {}
    for item in work:
        key = (item.region, None if item.entry.context is None else tuple(item.entry.context.shape),
               None if item.entry.y is None else tuple(item.entry.y.shape),
               None if item.entry.concat is None else tuple(item.entry.concat.shape[1:]),
               tuple(tuple(latent.shape[1:]) for latent in item.entry.reference_latents), item.entry.hooks)
        groups.setdefault(key, []).append(item)
    return list(groups.values())

