"""Conditioning on an image: edit and structure models (InstructPix2Pix, CosXL edit, Flux.1
Canny/Depth) and inpainting models (SD inpainting, Flux.1 Fill) take an image's latent beside the
noisy one (sampling.concat builds those input channels)."""

from __future__ import annotations

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CONDITIONING, IMAGE, LATENT, VAE

import torch

from ..components import Latent
from ..sampling.guidance import Conditioning
from .images import as_image
from .latent import _encodable, _vae


def _with_concat(conditioning: Conditioning, **values: object) -> Conditioning:
    return tuple(entry.with_(**values) for entry in conditioning)


class InstructPix2PixConditioning(Node):
    """Condition an image-edit or structure model on an image (ComfyUI's InstructPixToPixConditioning):
    InstructPix2Pix and SDXL/CosXL edit models edit the image as the prompt says; Flux.1 Canny and
    Depth follow its edges or depth map (connect a Canny or depth image). The image's latent goes
    beside the noisy latent at every step, on both sides; the latent output is an empty one of the
    image's size to sample from. Sizes that are not multiples of the VAE's factor are cropped."""

    category = "conditioning"

    class Inputs(NodeInputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        vae: VAE.annotation
        image: IMAGE.annotation

    class Outputs(NodeOutputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        image = _encodable(as_image(inputs.image), vae.downscale_factor, ctx)
        encoded = vae.encode(image)
        return self.Outputs(positive=_with_concat(inputs.positive, concat_latent=encoded),
                            negative=_with_concat(inputs.negative, concat_latent=encoded),
                            latent=Latent(torch.zeros_like(encoded), vae.downscale_factor))


NODES = [InstructPix2PixConditioning]
