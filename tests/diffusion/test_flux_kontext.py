"""Flux.1 Kontext: reference latents as extra tokens of the Flux transformer (networks.flux
reference_tokens / reference_position_ids), against diffusers' FluxTransformer2DModel fed as
FluxKontextPipeline feeds it, and the placement of several references against ComfyUI's rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nodegraph_diffusion.networks.flux import FluxInputError, reference_position_ids
from test_flux import TOL, converted_flux, diffusers_flux, inputs, max_err, tiny_config


def kontext_reference_forward(reference, x: Tensor, t: Tensor, context: Tensor, y: Tensor, guidance: Tensor,
                              image: Tensor) -> Tensor:
    """diffusers' transformer fed as FluxKontextPipeline feeds it: the image's packed latent after the
    noisy one's tokens, its position ids those of a latent with index 1, the prediction cut to the
    noisy tokens."""
    from diffusers import FluxKontextPipeline

    batch, channels, height, width = x.shape
    packed = FluxKontextPipeline._pack_latents(x, batch, channels, height, width)
    image = image.expand(batch, -1, -1, -1)
    image_tokens = FluxKontextPipeline._pack_latents(image, batch, channels, *image.shape[-2:])
    ids = FluxKontextPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, image.shape[-2] // 2, image.shape[-1] // 2,
                                                              x.device, x.dtype)
    image_ids[..., 0] = 1
    out = reference(hidden_states=torch.cat([packed, image_tokens], dim=1), encoder_hidden_states=context,
                    pooled_projections=y, timestep=t, img_ids=torch.cat([ids, image_ids], dim=0),
                    txt_ids=torch.zeros(context.shape[1], 3), guidance=guidance, return_dict=False)[0]
    return FluxKontextPipeline._unpack_latents(out[:, : packed.shape[1]], height * 8, width * 8, 8)


@pytest.mark.parametrize(("size", "image_size", "image_batch"), [((8, 12), (8, 12), 1), ((6, 10), (10, 4), 2)],
                         ids=["same-size", "other-size-per-row"])
def test_reference_latent_matches_diffusers_kontext(size, image_size, image_batch) -> None:
    config = tiny_config(True)
    reference = diffusers_flux(config, seed=5)
    model = converted_flux(reference)
    args = inputs(config, *size)
    image = torch.randn(image_batch, config.in_channels, *image_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = kontext_reference_forward(reference, **args, image=image)
        got = model(args["x"], args["t"], args["context"], args["y"], args["guidance"], reference_latents=[image])
        plain = model(args["x"], args["t"], args["context"], args["y"], args["guidance"])
    assert got.shape == args["x"].shape
    assert max_err(got, expected) <= TOL
    assert max_err(got, plain) > 1e-3  # the reference is attended to


def comfy_offsets(sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """ComfyUI's Flux._forward "offset" placement, written out: (h_offset, w_offset) in latent cells."""
    h = w = 0
    out = []
    for height, width in sizes:
        h_offset = w_offset = 0
        if height + h > width + w:
            w_offset = w
        else:
            h_offset = h
        h, w = max(h, height + h_offset), max(w, width + w_offset)
        out.append((h_offset, w_offset))
    return out


def test_several_references_are_placed_as_comfyui_places_them() -> None:
    sizes = [(8, 12), (10, 6), (5, 7), (8, 8)]
    tables = reference_position_ids(sizes)
    for (height, width), (top, left), ids in zip(sizes, comfy_offsets(sizes), tables):
        rows, cols = (height + 1) // 2, (width + 1) // 2
        assert ids.shape == (rows * cols, 3)
        assert torch.all(ids[:, 0] == 1)
        grid = ids.view(rows, cols, 3)
        assert torch.equal(grid[:, 0, 1], torch.arange(rows) + (top + 1) // 2)
        assert torch.equal(grid[0, :, 2], torch.arange(cols) + (left + 1) // 2)
    assert comfy_offsets(sizes)[1] == (8, 0)  # below the first: as close to square as to its right
    assert comfy_offsets(sizes)[2] == (0, 12)  # below again would be taller than wide: to the right


def test_odd_sized_reference_is_padded_circularly_and_references_are_checked() -> None:
    config = tiny_config(True, depth=1, single=1)
    reference = diffusers_flux(config, seed=6)
    model = converted_flux(reference)
    args = inputs(config, 4, 4)
    image = torch.randn(1, config.in_channels, 5, 7)
    padded = F.pad(image, (0, 1, 0, 1), mode="circular")
    with torch.no_grad():
        got = model(args["x"], args["t"], args["context"], args["y"], args["guidance"], reference_latents=[image])
        expected = kontext_reference_forward(reference, **args, image=padded)
    assert max_err(got, expected) <= TOL
    with pytest.raises(FluxInputError, match="reference latent is"):
        model(args["x"], args["t"], args["context"], args["y"], args["guidance"], reference_latents=[image[:, :4]])
