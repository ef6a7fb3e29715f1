"""Our VAE decoder against diffusers' AutoencoderKL: decode time at 512x512, full-size SD1.5 VAE, CPU fp32.

Prints JSON. Both models carry the same random weights (diffusers' moved through our key mapping,
storage shared), so the run also reports how far apart the decoded images are at full size.

Time: one warm-up decode each, then ``--repeats`` decodes alternating between the two models (so
drifting machine load hits both alike), under ``torch.inference_mode``. Each decode is timed by
the wall clock and by the process's CPU time; on a shared machine the CPU time leaves out the
time other processes held the core, so its ratio is the steadier one. Reported: the median per
model and the ratio of medians, and the ratio of the fastest runs (the least disturbed ones),
with the load average before and after.

    python bench/vae.py --threads 1               # the measurement in the README
    python bench/vae.py --size 256 --repeats 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

# bench/unet.py, beside this script: the same random weights, alternation, report head and timing summary.
from unet import alternate, cpu_report, fill_random_, timing_summary

from nodegraph_diffusion.vae import autoencoder

# The SD1.5 VAE (runwayml/stable-diffusion-v1-5's vae/config.json) as far as it differs from
# diffusers' AutoencoderKL defaults.
SD15_DIFFUSERS_VAE_CONFIG = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "sample_size": 512,
}


def build_diffusers(seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**SD15_DIFFUSERS_VAE_CONFIG)
    return fill_random_(model.to_empty(device="cpu"), seed)


def ours_from(reference: nn.Module) -> autoencoder.AutoencoderKL:
    """Our VAE sharing the reference's weight storage (no copy), through our key mapping."""
    with torch.device("meta"):
        ours = autoencoder.AutoencoderKL(autoencoder.VAEConfig())
    state = autoencoder.ldm_vae_keys_from_diffusers(reference.state_dict())
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels (latent: size / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    reference = build_diffusers(0)
    ours = ours_from(reference)
    latent = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    runners = {"ours": lambda: ours.decode(latent), "diffusers": lambda: reference.decode(latent).sample}
    load_before = os.getloadavg()[0]
    outputs, _, wall, cpu = alternate(runners, args.repeats)

    report = {
        **cpu_report("vae_decode_sd15"),
        "batch": args.batch,
        "image": [args.size, args.size],
        "repeats": args.repeats,
        **timing_summary(wall, cpu),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "max_abs_diff_vs_diffusers": (outputs["ours"] - outputs["diffusers"]).abs().max().item(),
        "output_abs_max": outputs["diffusers"].abs().max().item(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
