"""Train the tiny-shapes MMDiT (SD3 layout) with rectified flow on the shipped tiny-shapes VAE and CLIP, both frozen.

Run from the repository root: ``python -m training.train_mmdit`` (``--probe N`` measures the
current state on N held-out images instead). Everything the network sees comes from the product:

- latents: the shipped VAE, carried into the SD3 file with its latent space refitted so that the
  SD3 scaling the loader applies ((z - 0.0609) * 1.5305) gives exactly the U-Net's latents
  (:func:`sd3_vae`); the training images are encoded once and cached in ``STATE_DIR``;
- text: every distinct caption goes once through the product's SD3 conditioning
  (:meth:`TextEncoders.encode` with the shipped CLIP as ``clip_l``: penultimate states, no final
  norm, zero-padded to 4096; pooled = CLIP-L pooled + 1280 zeros). The columns the product fills
  with zeros are checked to be zero and cached narrow, then re-padded per batch.

Flow matching as SD3 trains it: x_t = (1 - t) x0 + t eps, target velocity eps - x0, t drawn
logit-normal(0, 1), the network told t * 1000. 10% of captions are replaced by the empty prompt
(classifier-free guidance). Resumes from ``STATE_DIR/mmdit.pt``; the EMA weights end in
``STATE_DIR/mmdit_final.pt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint
from nodegraph_diffusion.components import SD3_CONTEXT_WIDTH, NoiseSource, TextEncoders
from nodegraph_diffusion.networks.mmdit import MMDiT, MMDiTConfig, mmdit_config_from_shapes
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.samplers import sample_euler
from nodegraph_diffusion.sampling.schedules import sigmas_normal
from nodegraph_diffusion.text.clip import CLIPTextEncoder
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL, latent_scaling_for

from . import detector, shapes
from .architecture import (
    CHECKPOINT_PATH,
    MMDIT_CONFIG,
    SD3_POOLED_DIM,
    STATE_DIR,
    configure_torch,
    mmdit_config,
)
from .loop import Schedule, save_atomically, train_steps
from .sampling import images_to_uint8
from .train_base import CAPTION_DROPOUT, ema_update, encode_latents
from .train_vae import DATASET_SEED, DATASET_SIZE, training_images

logger = logging.getLogger(__name__)

SEED = 51
# The shipped run: 4400 steps, then resumed to 8000 with this schedule (training/README.md).
STEPS = 8000
BATCH = 32
LR = 6e-4
WARMUP = 200
EMA_DECAY = 0.999
# Matrix products in bfloat16 (autocast, float32 weights and loss): about twice as fast on a CPU with
# AVX-512 BF16, and what the product samples with in float32 is the same network.
AUTOCAST_DTYPE = torch.bfloat16
# SD3's timestep density: logit-normal with mean 0 and std 1.
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0
# The network reads timesteps on SD3's 0..1000 scale.
TIMESTEP_SCALE = 1000.0
# Probe sampling: the txt2img workflow's sampler settings (Euler, "normal" scheduler).
PROBE_STEPS = 20
PROBE_CFG = 5.0
PROBE_SHIFT = 1.0


# --------------------------------------------------------------------------- the frozen parts


def sd3_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """A copy of the SD1-scaled tiny-shapes VAE whose raw latents read the same under SD3's scaling.

    The loader gives every VAE in an SD3 file SD3's (z - 0.0609) * 1.5305. With z' = k z + 0.0609,
    k = 0.18215 / 1.5305, that equals the U-Net's 0.18215 z: the mean half of ``quant_conv`` is
    scaled by k and shifted (log-variance + log k^2, so the posterior scales with it) and
    ``post_quant_conv`` undoes both, so the decoder sees exactly the same tensor.
    """
    before, after = vae.config.latent_scaling, latent_scaling_for(ModelFamily.SD3.latent_family)
    if before.shift_factor:
        raise ValueError(f"expected an unshifted VAE latent scaling, got {before}")
    k = before.scaling_factor / after.scaling_factor
    shift = after.shift_factor
    out = AutoencoderKL(replace(vae.config, scaling_factor=after.scaling_factor, shift_factor=shift))
    out.load_state_dict(vae.state_dict())
    channels = out.config.latent_channels
    assert out.quant_conv is not None and out.post_quant_conv is not None
    with torch.no_grad():
        out.quant_conv.weight[:channels] *= k
        out.quant_conv.bias[:channels] = out.quant_conv.bias[:channels] * k + shift
        out.quant_conv.bias[channels:] += 2 * math.log(k)
        out.post_quant_conv.weight /= k
        out.post_quant_conv.bias -= out.post_quant_conv.weight.sum(dim=(1, 2, 3)) * shift
    return out.eval().requires_grad_(False)


@dataclass
class FrozenParts:
    """The shipped tiny-shapes VAE (refitted to SD3's latent scaling) and CLIP, in float32."""

    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder

    @classmethod
    def from_shipped(cls) -> FrozenParts:
        loaded = load_checkpoint(CHECKPOINT_PATH, device="cpu", dtype=torch.float32)
        if loaded.vae is None or "clip_l" not in loaded.text_encoders:
            raise ValueError(f"{CHECKPOINT_PATH}: expected a VAE and a clip_l text encoder")
        text_encoder = loaded.text_encoders["clip_l"].eval().requires_grad_(False)
        return cls(sd3_vae(loaded.vae), text_encoder)  # type: ignore[arg-type]


def cached_latents(vae: AutoencoderKL) -> Tensor:
    """The training set's latents under SD3 scaling, (N, 4, 16, 16), encoded once into ``STATE_DIR``."""
    path = STATE_DIR / "mmdit_latents.pt"
    if path.exists():
        return torch.load(path).contiguous()
    latents = encode_latents(vae, training_images())
    torch.save(latents, path)
    return latents


class Conditioning:
    """Captions -> (context, pooled) exactly as the product conditions an SD3 model, cached per caption.

    With one CLIP-L and no CLIP-G or T5, only the leading columns of the product's tensors carry
    values (CLIP-L's width; the rest are the zeros of the absent encoders and of T5's width). They
    are checked to be the only non-zero ones and kept narrow: :meth:`batch` hands back
    (context (B, 77, narrow), pooled (B, narrow)), and :meth:`full` the product's own widths.
    """

    def __init__(self, text_encoder: CLIPTextEncoder, context_dim: int = SD3_CONTEXT_WIDTH,
                 pooled_dim: int = SD3_POOLED_DIM) -> None:
        self.encoders = TextEncoders({"clip_l": text_encoder}, CLIPTokenizer.from_default(), ModelFamily.SD3)
        self.width = text_encoder.config.width
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def narrow(self, caption: str) -> tuple[Tensor, Tensor]:
        """caption -> (context (77, width), pooled (width,)), the product's tensors without their zero columns."""
        if caption not in self._cache:
            entry = self.encoders.encode(caption)
            context, pooled = entry.context[0], entry.y[0]  # type: ignore[index]
            if context.shape[-1] != self.context_dim or pooled.shape[-1] != self.pooled_dim:
                raise ValueError(f"product conditioning is {tuple(context.shape)} / {tuple(pooled.shape)}, "
                                 f"expected widths {self.context_dim} / {self.pooled_dim}")
            if context[:, self.width:].any() or pooled[self.width:].any():
                raise ValueError("product SD3 conditioning has values beyond CLIP-L's columns")
            self._cache[caption] = (context[:, :self.width].clone(), pooled[:self.width].clone())
        return self._cache[caption]

    def batch(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions -> (context (B, 77, width), pooled (B, width))."""
        parts = [self.narrow(c) for c in captions]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    def full(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions -> (context (B, 77, context_dim), pooled (B, pooled_dim)), as the product feeds the network."""
        context, pooled = self.batch(captions)
        return (F.pad(context, (0, self.context_dim - self.width)), F.pad(pooled, (0, self.pooled_dim - self.width)))


def training_config(config: MMDiTConfig, text_width: int) -> MMDiTConfig:
    """The shipped ``config`` with the conditioning inputs cut to the columns that carry values.

    The product's zero columns contribute nothing to ``context_embedder`` and ``y_embedder.mlp.0``
    whatever their weights, so training without them (about 15% of a step saved) and zero-filling
    those weights at export (:func:`shipped_state_dict`) gives the very function trained.
    """
    return replace(config, context_dim=text_width, pooled_dim=text_width)


def shipped_state_dict(net: MMDiT, config: MMDiTConfig) -> dict[str, Tensor]:
    """The trained (narrow-input) network's weights at the shipped ``config``'s input widths, zero-filled."""
    state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    for key, width in (("context_embedder.weight", config.context_dim), ("y_embedder.mlp.0.weight", config.pooled_dim)):
        state[key] = F.pad(state[key], (0, width - state[key].shape[1]))
    return state


# --------------------------------------------------------------------------- the network


def new_mmdit(config: MMDiTConfig) -> MMDiT:
    """An MMDiT initialised as DiT/SD3 are: Xavier-uniform linears with zero biases, patch embedding
    like a linear, N(0, 0.02) timestep/pooled embedders, and adaLN-Zero (every modulation and the
    final layer's output start at zero, so each block starts as the identity)."""
    net = MMDiT(config)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = net.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for embedder in (net.t_embedder, net.y_embedder):
        for index in (0, 2):
            nn.init.normal_(embedder.mlp[index].weight, std=0.02)
    for module in net.modules():
        if hasattr(module, "adaLN_modulation"):
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
    nn.init.zeros_(net.final_layer.linear.weight)
    nn.init.zeros_(net.final_layer.linear.bias)
    return net


def logit_normal_t(batch: int, generator: torch.Generator) -> Tensor:
    """(batch,) noise levels t in (0, 1), logit-normal (SD3's timestep density)."""
    return torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(batch, generator=generator))


def flow_loss(net: MMDiT, x0: Tensor, noise: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
    """Rectified-flow velocity MSE. x0, noise: (B, C, H, W); t: (B,) in (0, 1)."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    return F.mse_loss(net(x_t, t * TIMESTEP_SCALE, context, pooled).float(), noise - x0)


# --------------------------------------------------------------------------- probing


def sample(net: MMDiT, vae: AutoencoderKL, conditioning: Conditioning, captions: list[str], seeds: list[int],
           steps: int = PROBE_STEPS, cfg: float = PROBE_CFG, shift: float = PROBE_SHIFT) -> np.ndarray:
    """Sample as the txt2img workflow does, through the product's flow model sampling (constant
    ``shift``, ModelSamplingSD3), "normal" scheduler, Euler and classifier-free guidance against the
    empty prompt -> (B, 64, 64, 3) uint8, one seed per row (its noise drawn like the sampler node's)."""
    sampling = ModelSampling.flow(shift)
    with torch.no_grad():
        both_captions = captions + [""] * len(captions)
        narrow = net.config.context_dim == conditioning.width
        context, pooled = (conditioning.batch if narrow else conditioning.full)(both_captions)
        denoise_both = sampling.denoiser(lambda x, t: net(x, t, context, pooled))

        def guided(x: Tensor, sigma: Tensor) -> Tensor:
            positive, negative = denoise_both(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
            return negative + cfg * (positive - negative)

        size = 64 // vae.config.downscale_factor
        noise = torch.cat([NoiseSource(seed).generate((1, vae.config.latent_channels, size, size)) for seed in seeds])
        sigmas = sigmas_normal(sampling.schedule, steps).to(torch.float32)
        latents = sample_euler(guided, sampling.noise_latent(torch.zeros_like(noise), noise, sigmas[0]), sigmas,
                               noise_form=sampling.noise_form)
        return images_to_uint8(vae.decode(vae.latents_from_diffusion(latents)))


def probe(net: MMDiT, parts: FrozenParts, conditioning: Conditioning, count: int,
          **sampling: float) -> dict[str, float]:
    """Detector accuracies on ``count`` held-out (combination, seed) images sampled from ``net``."""
    held = shapes.held_out_combos()
    pairs = [(held[i % len(held)], i // len(held)) for i in range(count)]
    captions = [shapes.caption_for(c) for c, _ in pairs]
    images = np.concatenate([
        sample(net, parts.vae, conditioning, captions[i:i + 34], [s for _, s in pairs[i:i + 34]], **sampling)  # type: ignore[arg-type]
        for i in range(0, count, 34)])
    found = [detector.detect(image) for image in images]
    return {
        "images": count,
        "shape": sum(d.shape == c.shape for d, (c, _) in zip(found, pairs)) / count,
        "colour": sum(d.colour == c.colour for d, (c, _) in zip(found, pairs)) / count,
        "background": sum(d.background == c.background for d, (c, _) in zip(found, pairs)) / count,
    }


# --------------------------------------------------------------------------- training


def train(config: MMDiTConfig = MMDIT_CONFIG, steps: int = STEPS, lr: float = LR, state_name: str = "mmdit") -> MMDiT:
    configure_torch()
    parts = FrozenParts.from_shipped()
    latents = cached_latents(parts.vae)
    captions = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR, with_silhouettes=True).captions
    conditioning = Conditioning(parts.text_encoder, config.context_dim, config.pooled_dim)
    config = training_config(config, conditioning.width)
    for caption in sorted(set(captions)) + [""]:
        conditioning.narrow(caption)
    logger.info("latents %s mean %.3f std %.3f; %d distinct captions", tuple(latents.shape), float(latents.mean()),
                float(latents.std()), len(set(captions)))

    torch.manual_seed(SEED)
    net = new_mmdit(config)
    ema = copy.deepcopy(net).requires_grad_(False)
    logger.info("MMDiT %s: %.2f M parameters", config, sum(p.numel() for p in net.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(SEED)

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        index = torch.randint(len(latents), (BATCH,), generator=generator)
        drop = torch.rand(BATCH, generator=generator) < CAPTION_DROPOUT
        batch_captions = ["" if d else captions[int(i)] for i, d in zip(index, drop)]
        context, pooled = conditioning.batch(batch_captions)
        t = logit_normal_t(BATCH, generator)
        noise = torch.randn((BATCH, *latents.shape[1:]), generator=generator)
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
            loss = flow_loss(net, latents[index], noise, t, context, pooled)
        return loss, float(loss.detach()), ""

    def after_step(step: int) -> None:
        ema_update(ema, net, min(EMA_DECAY, (1 + step) / (10 + step)))

    outcome = train_steps(state_name, STATE_DIR / f"{state_name}.pt",
                          Schedule(steps, lr, WARMUP, log_every=50, save_every=200, smoothing=0.02), optimizer,
                          {"net": net, "ema": ema, "generator": generator}, step_fn, after_step)
    save_atomically({"net": ema.state_dict(), "raw_net": net.state_dict(),
                     "loss": outcome.running_loss, "seconds": outcome.seconds},
                    STATE_DIR / f"{state_name}_final.pt")
    return ema.eval()


def load_state(state_name: str = "mmdit", raw: bool = False) -> tuple[MMDiT, MMDiTConfig]:
    """The EMA (or raw) network from a training state (``<name>.pt``, mid-run) or its final file;
    the config is read from the weights' shapes, as the product's loader does."""
    final = STATE_DIR / f"{state_name}_final.pt"
    if final.exists():
        weights = torch.load(final)["raw_net" if raw else "net"]
    else:
        weights = torch.load(STATE_DIR / f"{state_name}.pt")["net" if raw else "ema"]
    config = mmdit_config_from_shapes({key: tuple(value.shape) for key, value in weights.items()})
    net = MMDiT(config)
    net.load_state_dict(weights)
    return net.eval(), config


def export_trained(state_name: str = "mmdit") -> dict[str, float]:
    """Write ``models/checkpoints/tiny-shapes.sd3.safetensors`` from the EMA weights of a run."""
    from .export import export_mmdit

    net, _ = load_state(state_name)
    parts = FrozenParts.from_shipped()
    return export_mmdit(net, parts.vae, parts.text_encoder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--depth", type=int, default=MMDIT_CONFIG.depth)
    parser.add_argument("--width", type=int, default=MMDIT_CONFIG.hidden_size)
    parser.add_argument("--patch", type=int, default=MMDIT_CONFIG.patch_size)
    parser.add_argument("--name", default="mmdit", help="state file name in STATE_DIR (trials side by side)")
    parser.add_argument("--probe", type=int, default=0, help="measure the saved state on this many held-out images")
    parser.add_argument("--raw", action="store_true", help="probe the raw weights instead of the EMA")
    parser.add_argument("--shift", type=float, default=PROBE_SHIFT)
    parser.add_argument("--cfg", type=float, default=PROBE_CFG)
    parser.add_argument("--sample-steps", type=int, default=PROBE_STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.probe:
        configure_torch()
        net, _ = load_state(args.name, args.raw)
        parts = FrozenParts.from_shipped()
        conditioning = Conditioning(parts.text_encoder)
        print(json.dumps(probe(net, parts, conditioning, args.probe, shift=args.shift, cfg=args.cfg,
                               steps=args.sample_steps)))
        return
    train(mmdit_config(args.depth, args.width, args.patch), args.steps, args.lr, args.name)


if __name__ == "__main__":
    main()
