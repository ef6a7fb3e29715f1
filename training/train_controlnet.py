"""Train the tiny-shapes silhouette ControlNet on the frozen base model.

Run from the repository root after :mod:`training.train_base`: ``python -m training.train_controlnet``.
The control image is the shape's silhouette, white on black (3 channels, values in [0, 1]). The
ControlNet starts as a copy of the U-Net's encoder with its zero convs at zero, so at step 0 it
changes nothing. The prompt often names a different shape than
the silhouette, or is empty, so the control image alone decides the outline of the shape.
Resumes from ``STATE_DIR/controlnet.pt``; writes ``STATE_DIR/controlnet_final.pt`` and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
import torch
from torch import Tensor, nn

from nodegraph_diffusion.networks.controlnet import ControlNet, ControlNetConfig

from . import shapes
from .architecture import STATE_DIR, UNET_CONFIG, PromptEncoder, configure_torch
from .export import export_controlnet, trained_base
from .sampling import TinyModel
from .train_base import DiffusionLoss, cached_latents
from .loop import Schedule, save_atomically, train_steps
from .train_vae import DATASET_SEED, DATASET_SIZE

logger = logging.getLogger(__name__)

SEED = 31
STEPS = 300
BATCH = 32
LR = 1e-3
WARMUP = 30
HINT_BLOCK_CHANNELS = (16, 32, 64)
EMPTY_PROMPT_PROBABILITY = 0.2
OTHER_SHAPE_PROBABILITY = 0.3
CONTROLNET_CONFIG = ControlNetConfig(unet=UNET_CONFIG, hint_channels=3, hint_block_channels=HINT_BLOCK_CHANNELS)


def silhouettes_to_hints(silhouettes: np.ndarray | Tensor) -> Tensor:
    """(N, 64, 64) coverage in [0, 1] -> (N, 3, 64, 64) white-on-black control images."""
    s = torch.as_tensor(silhouettes, dtype=torch.float32)
    return s.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def new_controlnet(unet: nn.Module) -> ControlNet:
    """A ControlNet holding a copy of ``unet``'s encoder, every output conv at zero."""
    controlnet = ControlNet(CONTROLNET_CONFIG)
    missing, unexpected = controlnet.load_state_dict(unet.state_dict(), strict=False)
    copied = [k for k in controlnet.state_dict() if k not in missing]
    if unexpected and not all(k.startswith(("output_blocks.", "out.")) for k in unexpected):
        raise RuntimeError(f"unexpected U-Net keys when copying the encoder: {unexpected[:5]}")
    logger.info("copied %d encoder tensors from the U-Net", len(copied))
    with torch.no_grad():
        # The hint embedder's last conv keeps its random init (the original zeroes it too): with
        # both it and the zero convs at zero, neither gets a gradient until the other moves,
        # which costs thousands of steps this CPU budget does not have.
        zeroed = [*controlnet.zero_convs, controlnet.middle_block_out]
        for module in zeroed:
            for p in module.parameters():
                p.zero_()
    return controlnet


def control_caption(sample: shapes.Sample, rng: np.random.Generator) -> str:
    """The sample's caption, sometimes empty or naming another shape (the hint must win)."""
    draw = rng.random()
    if draw < EMPTY_PROMPT_PROBABILITY:
        return ""
    if draw < EMPTY_PROMPT_PROBABILITY + OTHER_SHAPE_PROBABILITY:
        others = [s for s in shapes.SHAPES if s != sample.combo.shape]
        combo = dataclasses.replace(sample.combo, shape=others[int(rng.integers(len(others)))])
        return shapes.caption_for(combo, sample.position)
    return sample.caption


def train(steps: int = STEPS) -> TinyModel:
    configure_torch()
    base = trained_base()
    for module in (base.unet, base.text_encoder, base.vae):
        module.requires_grad_(False)
    latents = cached_latents()
    data = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR, with_silhouettes=True)
    hints = silhouettes_to_hints(data.silhouettes)
    prompts = PromptEncoder()
    torch.manual_seed(SEED)
    controlnet = new_controlnet(base.unet)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    loss_fn = DiffusionLoss()

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        index = torch.randint(len(latents), (BATCH,), generator=generator)
        x0 = latents[index]
        captions = [control_caption(data.samples[int(i)], rng) for i in index]
        with torch.no_grad():
            context = prompts.encode(base.text_encoder, prompts.ids(captions))
        t = torch.randint(0, 1000, (BATCH,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = loss_fn.noisy(x0, noise, t)
        control = controlnet(x_t, hints[index], t.float(), context)
        loss = loss_fn(base.unet(x_t, t.float(), context, control=control), noise, t)
        return loss, float(loss.detach()), ""

    outcome = train_steps("ControlNet", STATE_DIR / "controlnet.pt",
                          Schedule(steps, LR, WARMUP, log_every=25, save_every=100), optimizer,
                          {"controlnet": controlnet, "generator": generator, "rng": rng}, step_fn)
    save_atomically({"controlnet": controlnet.state_dict(), "loss": outcome.running_loss,
                     "seconds": outcome.seconds}, STATE_DIR / "controlnet_final.pt")
    return TinyModel(base.unet, base.vae, base.text_encoder, controlnet.eval())


def trained_controlnet_model() -> TinyModel:
    """The base model with the trained ControlNet attached (fp32, from ``STATE_DIR``)."""
    base = trained_base()
    controlnet = ControlNet(CONTROLNET_CONFIG)
    controlnet.load_state_dict(torch.load(STATE_DIR / "controlnet_final.pt")["controlnet"])
    return TinyModel(base.unet, base.vae, base.text_encoder, controlnet.eval())


def check_hints() -> Tensor:
    """Control images for the export check: a square and a circle, (2, 3, 64, 64)."""
    rng = np.random.default_rng(0)
    samples = [shapes.random_sample(rng, [shapes.Combo("red", "square", "blue")]),
               shapes.random_sample(rng, [shapes.Combo("yellow", "circle", "black")])]
    return silhouettes_to_hints(np.stack([shapes.silhouette(s) for s in samples]))


def export_trained() -> dict[str, float]:
    return export_controlnet(trained_controlnet_model(), check_hints())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.steps)
    export_trained()


if __name__ == "__main__":
    main()
