"""Train the tiny-shapes text encoder and U-Net jointly (epsilon prediction, SD1 schedule, CFG dropout).

Run from the repository root after :mod:`training.train_vae`: ``python -m training.train_base``.
The training images are encoded to latents once with the trained VAE's posterior means (scaled
by SD1's 0.18215), and the diffusion loss is the plain epsilon MSE on the SD "scaled_linear"
1000-step schedule, with the U-Net fed integer timesteps exactly as the product's denoiser feeds
fractional ones. Captions are tokenized with the real CLIP tokenizer; 10% of them are replaced by
the empty prompt so the model learns the unconditional branch classifier-free guidance needs.
Resumes from ``STATE_DIR/base.pt``; the result (EMA weights) is ``STATE_DIR/base_final.pt``.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from torch import Tensor, nn

from nodegraph_diffusion.sampling.schedules import sd_discrete_schedule
from nodegraph_diffusion.text.clip import CLIPTextEncoder
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL

from . import shapes
from .architecture import STATE_DIR, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG, PromptEncoder, configure_torch
from .loop import Schedule, save_atomically, train_steps
from .train_vae import DATASET_SEED, DATASET_SIZE, training_images

logger = logging.getLogger(__name__)

SEED = 21
STEPS = 4000
BATCH = 32
LR = 8e-4
WARMUP = 100
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.995
# Min-SNR loss weighting (Hang et al. 2023): eps-loss weight min(SNR, gamma) / SNR, so the nearly
# noise-free timesteps, whose loss says little about the image, stop dominating the gradient.
MIN_SNR_GAMMA = 5.0
# CLIP's own initialisation scale for token and position embeddings.
EMBEDDING_INIT_STD = 0.02


def load_trained_vae() -> AutoencoderKL:
    """The rescaled VAE written by :mod:`training.train_vae`."""
    vae = AutoencoderKL(VAE_CONFIG)
    vae.load_state_dict(torch.load(STATE_DIR / "vae_final.pt")["model"])
    return vae.eval()


def encode_latents(vae: AutoencoderKL, images: Tensor, batch: int = 256) -> Tensor:
    """images: (N, 3, 64, 64) in [-1, 1] -> diffusion-space latents (N, 4, 16, 16) (posterior means).

    Contiguous (NCHW): the encoder's convolutions may hand back channels-last tensors, and a U-Net
    fed those with NCHW weights trains several times slower on the CPU.
    """
    with torch.no_grad():
        return torch.cat([
            vae.latents_to_diffusion(vae.encode(images[i:i + batch]).mean) for i in range(0, len(images), batch)
        ]).contiguous()


def cached_latents() -> Tensor:
    """The training set's latents, encoded once and kept in ``STATE_DIR``."""
    path = STATE_DIR / "latents.pt"
    if path.exists():
        return torch.load(path).contiguous()
    latents = encode_latents(load_trained_vae(), training_images())
    torch.save(latents, path)
    return latents


def new_text_encoder() -> CLIPTextEncoder:
    encoder = CLIPTextEncoder(TEXT_ENCODER_CONFIG)
    embeddings = encoder.text_model.embeddings
    nn.init.normal_(embeddings.token_embedding.weight, std=EMBEDDING_INIT_STD)
    nn.init.normal_(embeddings.position_embedding.weight, std=EMBEDDING_INIT_STD)
    return encoder


class DiffusionLoss:
    """Epsilon-prediction loss on the SD1 discrete schedule, min-SNR weighted."""

    def __init__(self) -> None:
        self.alphas_cumprod = sd_discrete_schedule().alphas_cumprod.to(torch.float32)

    def noisy(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, which equals the product's c_in * (x0 + sigma eps)."""
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * latents + (1 - abar).sqrt() * noise

    def __call__(self, prediction: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Min-SNR-weighted epsilon MSE, averaged over the batch."""
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        per_sample = (prediction - noise).square().mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()


def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, 1 - decay)


def train(steps: int = STEPS) -> tuple[UNet, CLIPTextEncoder]:
    configure_torch()
    latents = cached_latents()
    captions = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR, with_silhouettes=True).captions
    prompts = PromptEncoder()
    ids = prompts.ids(captions)
    empty_ids = prompts.ids([""])[0]
    logger.info("latents %s std %.3f; %d distinct captions", tuple(latents.shape), float(latents.std()), len(set(captions)))

    torch.manual_seed(SEED)
    unet = UNet(UNET_CONFIG)
    text_encoder = new_text_encoder()
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = DiffusionLoss()

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        index = torch.randint(len(latents), (BATCH,), generator=generator)
        x0 = latents[index]
        batch_ids = ids[index].clone()
        drop = torch.rand(BATCH, generator=generator) < CAPTION_DROPOUT
        batch_ids[drop] = empty_ids
        t = torch.randint(0, 1000, (BATCH,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        context = prompts.encode(text_encoder, batch_ids)
        loss = loss_fn(unet(loss_fn.noisy(x0, noise, t), t.float(), context), noise, t)
        return loss, float(loss.detach()), ""

    def after_step(step: int) -> None:
        # Early EMA averages over fewer steps so the average is not dominated by the random init.
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)

    outcome = train_steps("base", STATE_DIR / "base.pt",
                          Schedule(steps, LR, WARMUP, log_every=50, save_every=200, smoothing=0.02), optimizer,
                          {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text,
                           "generator": generator}, step_fn, after_step)
    save_atomically({"unet": ema_unet.state_dict(), "text_encoder": ema_text.state_dict(),
                     "raw_unet": unet.state_dict(), "raw_text_encoder": text_encoder.state_dict(),
                     "loss": outcome.running_loss, "seconds": outcome.seconds}, STATE_DIR / "base_final.pt")
    return ema_unet.eval(), ema_text.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.steps)


if __name__ == "__main__":
    main()
