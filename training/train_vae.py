"""Train the tiny-shapes VAE (SD1 AutoencoderKL layout, f=4, 4 latent channels), then rescale its latents.

Run from the repository root: ``python -m training.train_vae``. Resumes from
``STATE_DIR/vae.pt`` when present. The result, ``STATE_DIR/vae_final.pt``, has its latent space
rescaled so that encoded means times SD1's fixed 0.18215 have unit standard deviation.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nodegraph_diffusion.vae import AutoencoderKL, latent_scaling_for

from . import shapes
from .architecture import FAMILY, STATE_DIR, VAE_CONFIG, configure_torch

logger = logging.getLogger(__name__)

DATASET_SIZE = 24000
DATASET_SEED = 1
SEED = 11
STEPS = 700
BATCH = 16
LR = 1.5e-3
WARMUP = 50
# Small enough that reconstructions stay sharp, large enough to keep the posterior tame.
KL_WEIGHT = 1e-6
INITIAL_LOGVAR = -8.0
DECODER_STEPS = 600
DECODER_LR = 5e-4


def images_to_tensor(images: np.ndarray) -> Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_images() -> Tensor:
    """The rendered training set shared by the VAE and the U-Net: (N, 3, 64, 64) in [-1, 1]."""
    data = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR, with_silhouettes=True)
    return images_to_tensor(data.images)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def rescale_latents(vae: AutoencoderKL, images: Tensor, batch: int = 256) -> float:
    """Reparametrise ``vae`` in place so encoded means * the SD1 scaling factor have unit std.

    Multiplies the mean half of ``quant_conv`` by ``k`` (and adds log k^2 to the log-variance
    half, so the posterior scales with it) and divides ``post_quant_conv``'s input weights by
    ``k``: the decoder sees exactly the same tensor. Returns ``k``.
    """
    scaling = latent_scaling_for(FAMILY).scaling_factor
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)])
        k = 1.0 / (float(means.std()) * scaling)
        channels = vae.config.latent_channels
        assert vae.quant_conv is not None and vae.post_quant_conv is not None
        vae.quant_conv.weight[:channels] *= k
        vae.quant_conv.bias[:channels] *= k
        vae.quant_conv.bias[channels:] += 2 * math.log(k)
        vae.post_quant_conv.weight *= 1.0 / k
    return k


def train(steps: int = STEPS) -> AutoencoderKL:
    configure_torch()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    images = training_images()
    torch.manual_seed(SEED)
    # channels_last: about 25% faster convolutions on this CPU
    vae = AutoencoderKL(VAE_CONFIG).to(memory_format=torch.channels_last)
    # Start the posterior nearly deterministic: with the default log-variance of 0 the sampled
    # latents are mostly noise and the decoder learns nothing until the encoder shrinks it.
    assert vae.quant_conv is not None
    with torch.no_grad():
        vae.quant_conv.bias[VAE_CONFIG.latent_channels:] = INITIAL_LOGVAR
    optimizer = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    start = 0
    state_path = STATE_DIR / "vae.pt"
    if state_path.exists():
        state = torch.load(state_path)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
        logger.info("resumed VAE training at step %d", start)
    began = time.time()
    vae.train()
    running = None
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, LR, WARMUP)
        index = torch.randint(len(images), (BATCH,), generator=generator)
        x = images[index].contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x)
        z = posterior.sample(generator)
        recon = vae.decode(z)
        mse = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        loss = mse + 0.1 * F.l1_loss(recon, x) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(mse.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % 50 == 0 or step + 1 == steps:
            logger.info("step %d/%d mse %.4f (avg %.4f) kl %.2f %.1fs", step + 1, steps, value, running,
                        float(kl.detach()), time.time() - began)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step + 1}, state_path)
    vae.eval()
    k = rescale_latents(vae, images[:4096])
    with torch.no_grad():
        x = images[-512:]
        recon = vae.decode(vae.encode(x).mean)
        mse = float(F.mse_loss(recon, x))
        std = float(vae.latents_to_diffusion(vae.encode(images[:1024]).mean).std())
    logger.info("final: reconstruction mse %.4f on 512 images, latent rescale k=%.4f, scaled latent std %.3f",
                mse, k, std)
    torch.save({"model": vae.state_dict(), "rescale": k, "mse": mse, "seconds": time.time() - began},
               STATE_DIR / "vae_final.pt")
    # A new first stage invalidates any decoder fine-tuning of the previous one.
    for stale in ("vae_stage1.pt", "vae_decoder.pt"):
        (STATE_DIR / stale).unlink(missing_ok=True)
    return vae


def finetune_decoder(steps: int = DECODER_STEPS) -> AutoencoderKL:
    """Second stage: train only the decoder (and post_quant_conv) on the frozen encoder's posterior means.

    The encoder, and so the latent space the U-Net is trained in, stays bit-identical: this stage
    may run before, during or after :mod:`training.train_base`. Overwrites ``vae_final.pt``
    (the first-stage result is kept as ``vae_stage1.pt``).
    """
    configure_torch()
    final_path, stage1_path = STATE_DIR / "vae_final.pt", STATE_DIR / "vae_stage1.pt"
    if not stage1_path.exists():
        stage1_path.write_bytes(final_path.read_bytes())
    stage1 = torch.load(stage1_path)
    vae = AutoencoderKL(VAE_CONFIG)
    vae.load_state_dict(stage1["model"])
    vae.eval()
    images = training_images()
    latents_path = STATE_DIR / "latents.pt"
    with torch.no_grad():
        if latents_path.exists():
            # The U-Net's training latents are these same means, scaled; encoding 24k images again takes minutes.
            means = vae.latents_from_diffusion(torch.load(latents_path))
        else:
            means = torch.cat([vae.encode(images[i:i + 256]).mean for i in range(0, len(images), 256)])
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    vae.decoder.train()
    vae = vae.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(trainable, lr=DECODER_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 1)
    start, state_path = 0, STATE_DIR / "vae_decoder.pt"
    if state_path.exists():
        state = torch.load(state_path)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
    began, running = time.time(), None
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, DECODER_LR, WARMUP)
        index = torch.randint(len(images), (BATCH,), generator=generator)
        x = images[index].contiguous(memory_format=torch.channels_last)
        recon = vae.decode(means[index])
        mse = F.mse_loss(recon, x)
        loss = mse + 0.1 * F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(mse.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % 50 == 0 or step + 1 == steps:
            logger.info("decoder step %d/%d mse %.4f (avg %.4f) %.1fs", step + 1, steps, value, running,
                        time.time() - began)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step + 1}, state_path)
    vae.eval()
    with torch.no_grad():
        mse = float(F.mse_loss(vae.decode(means[-512:]), images[-512:]))
    logger.info("decoder fine-tuned: reconstruction mse %.4f on 512 images", mse)
    torch.save({"model": vae.state_dict(), "rescale": stage1["rescale"], "mse": mse,
                "seconds": stage1["seconds"] + time.time() - began}, final_path)
    return vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--finetune-decoder", action="store_true",
                        help="second stage: train the decoder alone on the frozen encoder's latents")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.finetune_decoder:
        finetune_decoder(args.steps or DECODER_STEPS)
    else:
        train(args.steps or STEPS)


if __name__ == "__main__":
    main()
