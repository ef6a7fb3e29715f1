"""Train the tiny-shapes VAE (SD1 AutoencoderKL layout, f=4, 4 latent channels), then rescale its latents.

Run from the repository root: ``python -m training.train_vae``. Resumes from
``STATE_DIR/vae.pt`` when present. The result, ``STATE_DIR/vae_final.pt``, has its latent space
rescaled so that encoded means times SD1's fixed 0.18215 have unit standard deviation.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nodegraph_diffusion.vae.autoencoder import AutoencoderKL, latent_scaling_for

from . import shapes
from .architecture import FAMILY, STATE_DIR, VAE_CONFIG, configure_torch
from .loop import Schedule, save_atomically, train_steps

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
# The "outlined" renders (the LoRA's style): the decoder also learns to draw them, since the first
# stage saw only filled shapes and blurred outlines into fills (it kept their colour 45% of the time).
OUTLINED_COUNT = 3000
OUTLINED_SEED = 3
OUTLINED_PER_BATCH = 4


def images_to_tensor(images: np.ndarray) -> Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_images() -> Tensor:
    """The rendered training set shared by the VAE and the U-Net: (N, 3, 64, 64) in [-1, 1]."""
    data = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR, with_silhouettes=True)
    return images_to_tensor(data.images)


def outlined_renders() -> shapes.RenderedSet:
    """The outlined training renders shared by the decoder fine-tune and the LoRA (cached in ``STATE_DIR``)."""
    return shapes.render_dataset(OUTLINED_COUNT, OUTLINED_SEED, outlined=True, cache_dir=STATE_DIR)


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
    vae.train()

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        index = torch.randint(len(images), (BATCH,), generator=generator)
        x = images[index].contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator))
        mse = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        return mse + 0.1 * F.l1_loss(recon, x) + KL_WEIGHT * kl, float(mse.detach()), f"kl {float(kl.detach()):.2f}"

    outcome = train_steps("VAE", STATE_DIR / "vae.pt",
                          Schedule(steps, LR, WARMUP, log_every=50, save_every=200, clip_norm=None),
                          optimizer, {"model": vae, "generator": generator}, step_fn)
    vae.eval()
    k = rescale_latents(vae, images[:4096])
    with torch.no_grad():
        x = images[-512:]
        recon = vae.decode(vae.encode(x).mean)
        mse = float(F.mse_loss(recon, x))
        std = float(vae.latents_to_diffusion(vae.encode(images[:1024]).mean).std())
    logger.info("final: reconstruction mse %.4f on 512 images, latent rescale k=%.4f, scaled latent std %.3f",
                mse, k, std)
    save_atomically({"model": vae.state_dict(), "rescale": k, "mse": mse, "seconds": outcome.seconds},
                    STATE_DIR / "vae_final.pt")
    # A new first stage invalidates any decoder fine-tuning of the previous one.
    for stale in ("vae_stage1.pt", "vae_decoder.pt"):
        (STATE_DIR / stale).unlink(missing_ok=True)
    return vae


def finetune_decoder(steps: int = DECODER_STEPS) -> AutoencoderKL:
    """Second stage: train only the decoder (and post_quant_conv) on the frozen encoder's posterior means,
    of the training images and (:data:`OUTLINED_PER_BATCH` of each batch) of the outlined renders.

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
        outlined = images_to_tensor(outlined_renders().images)
        outlined_means = torch.cat([vae.encode(outlined[i:i + 256]).mean for i in range(0, len(outlined), 256)])
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    vae.decoder.train()
    vae = vae.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(trainable, lr=DECODER_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 1)

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        index = torch.randint(len(images), (BATCH - OUTLINED_PER_BATCH,), generator=generator)
        styled = torch.randint(len(outlined), (OUTLINED_PER_BATCH,), generator=generator)
        x = torch.cat([images[index], outlined[styled]]).contiguous(memory_format=torch.channels_last)
        recon = vae.decode(torch.cat([means[index], outlined_means[styled]]))
        mse = F.mse_loss(recon, x)
        return mse + 0.1 * F.l1_loss(recon, x), float(mse.detach()), ""

    outcome = train_steps("VAE decoder", STATE_DIR / "vae_decoder.pt",
                          Schedule(steps, DECODER_LR, WARMUP, log_every=50, save_every=100, clip_norm=None),
                          optimizer, {"model": vae, "generator": generator}, step_fn)
    vae.eval()
    with torch.no_grad():
        mse = float(F.mse_loss(vae.decode(means[-512:]), images[-512:]))
        outlined_mse = float(F.mse_loss(vae.decode(outlined_means[-512:]), outlined[-512:]))
    logger.info("decoder fine-tuned: reconstruction mse %.4f on 512 images, %.4f on 512 outlined", mse, outlined_mse)
    save_atomically({"model": vae.state_dict(), "rescale": stage1["rescale"], "mse": mse,
                     "seconds": stage1["seconds"] + outcome.seconds}, final_path)
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
