"""Diffusion transformers: our MMDiT (SD3), Flux and PixArt transformers against diffusers' SD3Transformer2DModel, FluxTransformer2DModel and PixArtTransformer2DModel: forward time on the same weights, CPU fp32.

Prints JSON. The layers are full size (SD3-medium: width 1536, 24 heads of 64, context 4096,
pooled 2048; Flux.1: width 3072, 24 heads of 128, context 4096, pooled 768; PixArt-Σ XL: width
1152, 16 heads of 72, T5 context 4096 of which 300 tokens, 40 of them unmasked), the depth is cut
(``--depth``; default 4 joint blocks for SD3, 2 double + 4 single for Flux, 4 blocks for PixArt)
so two copies fit in memory; time per block is what the depth scales. PixArt's blocks are DiT's
(self-attention and MLP under adaLN) with a masked cross-attention to the caption between them. Both models carry the same random weights
(diffusers' moved through our key mapping), so the run also reports how far apart the outputs are.

Time: one warm-up forward each, then ``--repeats`` forwards alternating between the two models
(so drifting machine load hits both alike), under ``torch.inference_mode``; each forward timed by
the wall clock and by the process's CPU time (which leaves out the time other processes held the
core), medians per model and the ratios of the medians and of the fastest runs.

    python bench/dit_forward.py                           # SD3 and Flux, 512x512 images
    python bench/dit_forward.py --family flux --repeats 1 # a quick look
    python bench/dit_forward.py --family pixart           # or all
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
from torch import nn

from unet import alternate, cpu_report, fill_random_, timing_summary  # bench/unet.py: shared helpers

from nodegraph_diffusion.networks import flux, mmdit, pixart

# ComfyUI's T5 pad lengths (SD3 adds CLIP's 77); PixArt-Σ's 300-token captions.
TEXT_TOKENS = {"sd3": 77 + 77, "flux": 256, "pixart": 300}
PIXART_PROMPT_TOKENS = 40  # the caption's unmasked tokens (prompt and EOS)


def sd3_pair(depth: int, latent: int, seed: int) -> tuple[nn.Module, nn.Module, Callable, Callable, tuple]:
    from diffusers import SD3Transformer2DModel

    reference = fill_random_(SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), seed)
    with torch.device("meta"):
        ours = mmdit.MMDiT(mmdit.MMDiTConfig(depth=depth))
    ours.load_state_dict(mmdit.mmdit_keys_from_diffusers(reference.state_dict()), strict=True, assign=True)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, latent, latent, generator=generator)
    t = torch.tensor([500.0])
    context = torch.randn(1, TEXT_TOKENS["sd3"], 4096, generator=generator)
    pooled = torch.randn(1, 2048, generator=generator)

    def run_reference() -> torch.Tensor:
        return reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample

    def run_ours() -> torch.Tensor:
        return ours(x, t, context, pooled)

    return reference, ours.eval(), run_reference, run_ours, (1, 16, latent, latent)


def flux_pair(depth: int, latent: int, seed: int) -> tuple[nn.Module, nn.Module, Callable, Callable, tuple]:
    from diffusers import FluxTransformer2DModel

    double, single = depth // 2, depth
    reference = fill_random_(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=flux.FLUX_AXES_DIM), seed)
    with torch.device("meta"):
        ours = flux.Flux(flux.FluxConfig(depth=double, depth_single_blocks=single))
    ours.load_state_dict(flux.flux_keys_from_diffusers(reference.state_dict()), strict=True, assign=True)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, latent, latent, generator=generator)
    sigma, guidance = torch.tensor([0.5]), torch.tensor([3.5])
    context = torch.randn(1, TEXT_TOKENS["flux"], 4096, generator=generator)
    pooled = torch.randn(1, 768, generator=generator)
    rows, cols = latent // 2, latent // 2
    packed = x.reshape(1, 16, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, rows * cols, 64)
    image_ids = flux.image_position_ids(rows, cols)
    text_ids = torch.zeros(TEXT_TOKENS["flux"], 3)

    def run_reference() -> torch.Tensor:
        tokens = reference(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigma, img_ids=image_ids, txt_ids=text_ids, guidance=guidance).sample
        return tokens.reshape(1, rows, cols, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, latent, latent)

    def run_ours() -> torch.Tensor:
        return ours(x, sigma, context, pooled, guidance)

    return reference, ours.eval(), run_reference, run_ours, (1, 16, latent, latent)


def pixart_pair(depth: int, latent: int, seed: int) -> tuple[nn.Module, nn.Module, Callable, Callable, tuple]:
    from diffusers import PixArtTransformer2DModel

    config = pixart.PixArtConfig(depth=depth, sample_size=latent, micro_conditions=False, max_token_length=300,
                                 null_caption=False, interpolation_scale=pixart.pixart_interpolation_scale(latent))
    reference = fill_random_(PixArtTransformer2DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_channels,
        out_channels=config.out_channels, num_layers=depth, cross_attention_dim=config.hidden_size,
        sample_size=latent, patch_size=config.patch_size, caption_channels=config.caption_dim,
        interpolation_scale=config.interpolation_scale, use_additional_conditions=False), seed)
    with torch.device("meta"):
        ours = pixart.PixArt(config)
    ours.load_state_dict(pixart.pixart_keys_from_diffusers(reference.state_dict()), strict=True, assign=True)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, latent, latent, generator=generator)
    t = torch.tensor([500.0])
    context = torch.randn(1, TEXT_TOKENS["pixart"], config.caption_dim, generator=generator)
    mask = (torch.arange(TEXT_TOKENS["pixart"]) < PIXART_PROMPT_TOKENS)[None].long()

    def run_reference() -> torch.Tensor:
        return reference(x, encoder_hidden_states=context, timestep=t, encoder_attention_mask=mask,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def run_ours() -> torch.Tensor:
        return ours(x, t, context, context_mask=mask)

    return reference, ours.eval(), run_reference, run_ours, (1, config.in_channels, latent, latent)


PAIRS = {"sd3": sd3_pair, "flux": flux_pair, "pixart": pixart_pair}


def measure(family: str, depth: int, latent: int, repeats: int) -> dict:
    _reference, ours, run_reference, run_ours, shape = PAIRS[family](depth, latent, seed=0)
    outputs, _, wall, cpu = alternate({"ours": run_ours, "diffusers": run_reference}, repeats)
    return {
        "family": family,
        "depth": {"double": depth // 2, "single": depth} if family == "flux" else depth,
        "parameters_ours": sum(p.numel() for p in ours.parameters()),
        "latent": list(shape),
        "text_tokens": TEXT_TOKENS[family],
        **timing_summary(wall, cpu),
        "max_abs_diff_vs_diffusers": (outputs["ours"] - outputs["diffusers"]).abs().max().item(),
        "output_abs_max": outputs["diffusers"].abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*PAIRS, "both", "all"], default="both", help="both: sd3 and flux")
    parser.add_argument("--depth", type=int, default=4,
                        help="SD3 joint blocks; Flux single blocks (double = half); PixArt blocks")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64 = 512x512 pixels)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    families = {"both": ["sd3", "flux"], "all": list(PAIRS)}.get(args.family, [args.family])
    report = {
        **cpu_report("transformer_forward"),
        "repeats": args.repeats,
        "load_average_1min_before": os.getloadavg()[0],
        "results": [measure(family, args.depth, args.latent, args.repeats) for family in families],
        "load_average_1min_after": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
