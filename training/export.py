"""Write the trained tiny-shapes models as the files users get: SD1 single-file checkpoint, ControlNet, LoRA,
and the SD3-layout MMDiT single file.

``python -m training.export base|controlnet|lora|mmdit`` reads the final training state from
``STATE_DIR``, writes fp16 safetensors under ``models/``, loads the file back through the
product's generic loaders and checks that it samples like the fp32 training copy.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint, load_controlnet
from nodegraph_diffusion.sampling.model_sampling import Prediction
from nodegraph_diffusion.text.clip import CLIPTextEncoder
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL

from .architecture import CHECKPOINT_PATH, CONTROLNET_PATH, MMDIT_CHECKPOINT_PATH, STATE_DIR, configure_torch
from .sampling import TinyModel, generate

logger = logging.getLogger(__name__)

MAX_CHECKPOINT_BYTES = 40 * 1024 * 1024
# The original SD1 single-file prefixes, which the generic loader recognises.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
CONTROLNET_PREFIX = "control_model."
# SD3's single-file prefix for its text encoders (the VAE and network share the SD1 prefixes).
SD3_TEXT_ENCODER_PREFIX = "text_encoders.{slot}.transformer."
LICENSE = "Apache-2.0"
# fp16 rounding through 20 sampling steps: pixels may move by a few levels out of 255.
FP16_MAX_MEAN_PIXEL_ERROR = 4.0
CHECK_PROMPTS = ("a red circle on a blue background", "a yellow triangle on a black background, left")


class ExportError(RuntimeError):
    """An exported file failed its size or reload check; the message says which and by how much."""


def checkpoint_state_dict(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextEncoder) -> dict[str, Tensor]:
    """The SD1 single-file layout of the three parts, in fp16."""
    out: dict[str, Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_ENCODER_PREFIX, text_encoder)):
        for key, tensor in module.state_dict().items():
            out[prefix + key] = tensor.detach().to(torch.float16).contiguous()
    return out


def _write(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(path), metadata=dict(metadata))
    return path.stat().st_size


def compare_samples(reference: np.ndarray, reloaded: np.ndarray, what: str) -> float:
    """Mean pixel error between images sampled from the trained weights and from the written file
    ``what``; raises :class:`ExportError` above :data:`FP16_MAX_MEAN_PIXEL_ERROR`."""
    error = float(np.abs(reference.astype(np.float32) - reloaded.astype(np.float32)).mean())
    if error > FP16_MAX_MEAN_PIXEL_ERROR:
        raise ExportError(f"{what}: the fp16 file samples differently from the fp32 weights "
                          f"(mean pixel error {error:.2f} > {FP16_MAX_MEAN_PIXEL_ERROR})")
    return error


def export_base(model: TinyModel, path: Path = CHECKPOINT_PATH) -> dict[str, float]:
    """Write the base checkpoint and verify it through :func:`load_checkpoint`."""
    size = _write(checkpoint_state_dict(model.unet, model.vae, model.text_encoder), path,
                  {"format": "pt", "modelspec.architecture": "stable-diffusion-v1", "license": LICENSE,
                   "description": "tiny-shapes: a tiny SD1-layout model trained by nodegraph on procedural shapes"})
    if size > MAX_CHECKPOINT_BYTES:
        raise ExportError(f"{path}: {size} bytes is over the {MAX_CHECKPOINT_BYTES} byte budget")
    loaded = load_checkpoint(path, device="cpu", dtype=torch.float32)
    if loaded.family is not ModelFamily.SD1 or loaded.prediction is not Prediction.EPS:
        raise ExportError(f"{path}: detected as {loaded.family.value}/{loaded.prediction.value}, expected sd1/eps")
    if loaded.vae is None or list(loaded.text_encoders) != ["clip_l"]:
        raise ExportError(f"{path}: expected a VAE and one clip_l text encoder, got {list(loaded.text_encoders)}")
    reloaded = TinyModel(loaded.unet, loaded.vae, loaded.text_encoders["clip_l"])
    seeds = list(range(len(CHECK_PROMPTS)))
    error = compare_samples(generate(model, list(CHECK_PROMPTS), seeds),
                            generate(reloaded, list(CHECK_PROMPTS), seeds), str(path))
    logger.info("wrote %s (%.1f MB), reload mean pixel error %.2f", path, size / 2**20, error)
    return {"bytes": float(size), "reload_mean_pixel_error": error}


def export_controlnet(model: TinyModel, hints: Tensor, path: Path = CONTROLNET_PATH) -> dict[str, float]:
    """Write the ControlNet in the original ``control_model.*`` layout and verify it through :func:`load_controlnet`.

    hints: (B, 3, 64, 64) control images in [0, 1] used for the reload check (B = len(CHECK_PROMPTS)).
    """
    assert model.controlnet is not None
    state = {CONTROLNET_PREFIX + k: v.detach().to(torch.float16).contiguous()
             for k, v in model.controlnet.state_dict().items()}
    size = _write(state, path, {"format": "pt", "license": LICENSE,
                                "description": "tiny-shapes silhouette ControlNet: white shape on black"})
    loaded = load_controlnet(path, device="cpu", dtype=torch.float32)
    if loaded.family is not ModelFamily.SD1:
        raise ExportError(f"{path}: detected as {loaded.family.value}, expected sd1")
    reloaded = TinyModel(model.unet, model.vae, model.text_encoder, loaded.controlnet, model.control_strength)
    seeds = list(range(len(CHECK_PROMPTS)))
    error = compare_samples(generate(model, list(CHECK_PROMPTS), seeds, hints=hints),
                            generate(reloaded, list(CHECK_PROMPTS), seeds, hints=hints), str(path))
    logger.info("wrote %s (%.1f MB), reload mean pixel error %.2f", path, size / 2**20, error)
    return {"bytes": float(size), "reload_mean_pixel_error": error}


def export_mmdit(network: torch.nn.Module, vae: AutoencoderKL, text_encoder: CLIPTextEncoder,
                 path: Path = MMDIT_CHECKPOINT_PATH) -> dict[str, float]:
    """Write the SD3-layout single file (MMDiT + VAE + CLIP-L) in fp16 and verify it through the
    generic :func:`load_transformer`: family, the network's config read back from the file, and
    samples equal to those of the fp32 weights trained (``network``, at its training input widths)."""
    from nodegraph_diffusion.architectures.transformers import load_transformer

    from .architecture import MMDIT_CONFIG
    from .train_mmdit import Conditioning, sample, shipped_state_dict

    state = {UNET_PREFIX + key: value for key, value in shipped_state_dict(network, MMDIT_CONFIG).items()}
    for prefix, module in ((VAE_PREFIX, vae), (SD3_TEXT_ENCODER_PREFIX.format(slot="clip_l"), text_encoder)):
        state.update({prefix + key: value.detach() for key, value in module.state_dict().items()})
    size = _write({key: value.to(torch.float16).contiguous() for key, value in state.items()}, path,
                  {"format": "pt", "license": LICENSE,
                   "description": "tiny-shapes MMDiT: a tiny SD3-layout rectified-flow model trained by nodegraph "
                                  "on procedural shapes (CLIP-L slot only)"})
    if size > MAX_CHECKPOINT_BYTES:
        raise ExportError(f"{path}: {size} bytes is over the {MAX_CHECKPOINT_BYTES} byte budget")
    loaded = load_transformer(path, device="cpu", dtype=torch.float32)
    if loaded.family is not ModelFamily.SD3 or loaded.network_config != MMDIT_CONFIG:
        raise ExportError(f"{path}: read back as {loaded.family.value} {loaded.network_config}, "
                          f"expected sd3 {MMDIT_CONFIG}")
    if loaded.vae is None or list(loaded.text_encoders) != ["clip_l"] or loaded.unexpected_keys:
        raise ExportError(f"{path}: expected a VAE and one clip_l text encoder and nothing else, got "
                          f"{list(loaded.text_encoders)}, unexpected {loaded.unexpected_keys}")
    seeds = list(range(len(CHECK_PROMPTS)))
    conditioning = Conditioning(text_encoder)
    reloaded = sample(loaded.network, loaded.vae, Conditioning(loaded.text_encoders["clip_l"]),  # type: ignore[arg-type]
                      list(CHECK_PROMPTS), seeds)
    error = compare_samples(sample(network, vae, conditioning, list(CHECK_PROMPTS), seeds), reloaded,  # type: ignore[arg-type]
                            str(path))
    logger.info("wrote %s (%.1f MB), reload mean pixel error %.2f", path, size / 2**20, error)
    return {"bytes": float(size), "reload_mean_pixel_error": error}


def load_base_state(final: Mapping[str, Mapping[str, Tensor]]) -> TinyModel:
    """The fp32 model from training states (``vae_final.pt`` + ``base_final.pt``)."""
    from .architecture import TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG

    unet, vae, text = UNet(UNET_CONFIG), AutoencoderKL(VAE_CONFIG), CLIPTextEncoder(TEXT_ENCODER_CONFIG)
    unet.load_state_dict(final["unet"])
    vae.load_state_dict(final["vae"])
    text.load_state_dict(final["text_encoder"])
    return TinyModel(unet.eval(), vae.eval(), text.eval())


def trained_base() -> TinyModel:
    base = torch.load(STATE_DIR / "base_final.pt")
    vae = torch.load(STATE_DIR / "vae_final.pt")
    return load_base_state({"unet": base["unet"], "text_encoder": base["text_encoder"], "vae": vae["model"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["base", "controlnet", "lora", "mmdit"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_torch()
    if args.what == "base":
        export_base(trained_base())
    elif args.what == "mmdit":
        from .train_mmdit import export_trained as export_trained_mmdit
        export_trained_mmdit()
    elif args.what == "controlnet":
        from .train_controlnet import export_trained
        export_trained()
    else:
        from .train_lora import export_trained
        export_trained()


if __name__ == "__main__":
    main()
