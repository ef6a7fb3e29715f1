"""The diffusion node pack: every Stable Diffusion pipeline stage as a typed node.

Loaded through the `nodegraph.nodes` entry point like any third-party pack; the model library
(`nodegraph_diffusion.unet`, ...) does not depend on this package or on the engine.
"""

from . import hooks, photomaker
from . import (comfyui, conditioning, continuous, diff_controlnet, edit_conditioning, gligen, hypernetwork,
               image_layout, images, latent, loading, merging, sampling)

NODES = [*loading.NODES, *conditioning.NODES, *latent.NODES, *sampling.NODES, *images.NODES,
         *edit_conditioning.NODES, *merging.NODES, *continuous.NODES, *image_layout.NODES,
         *diff_controlnet.NODES, *hypernetwork.NODES, *gligen.NODES]
NODES += [*hooks.NODES, *photomaker.NODES]

# Converters of ComfyUI workflows (API and UI formats) into workflows of these nodes.
IMPORTERS = comfyui.IMPORTERS
