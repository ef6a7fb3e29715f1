"""Generate the key/shape manifests of real Stable Diffusion files in tests/diffusion/manifests/ (run by hand, not by the suite).

    /work/venv/bin/python tests/diffusion/make_manifests.py

Each manifest lists every tensor name and shape of a well-known single file as it is distributed:

- the diffusion U-Net, VAE and ControlNets come from diffusers/transformers models built on the
  meta device from the published configs (written below as data), renamed to the single-file LDM
  layout through *our* mappings (``ldm_unet_keys_from_diffusers``, ``ldm_vae_keys_from_diffusers``,
  ``ldm_controlnet_keys_from_diffusers``) and then cross-checked independently: diffusers' own
  single-file converter (``diffusers.loaders.single_file_utils``) must turn our manifest back into
  exactly the diffusers names and shapes;
- text encoders are written in their original layouts (HF CLIP under ``cond_stage_model.transformer.``
  / ``conditioner.embedders.0.transformer.``, OpenCLIP under ``cond_stage_model.model.`` /
  ``conditioner.embedders.N.model.``), OpenCLIP names generated from the tower's config and
  cross-checked the same way against transformers' CLIPTextModel(WithProjection);
- plus the non-weight entries real files carry (noise-schedule buffers, HF position ids,
  OpenCLIP's logit_scale), which a loader must recognise and skip.

The SDXL ControlNet is distributed in the diffusers layout, so its manifest keeps that layout
(and is cross-checked through our mapping and diffusers' converter in turn).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nodegraph_diffusion.networks.controlnet import ldm_controlnet_keys_from_diffusers
from nodegraph_diffusion.text.clip import hf_clip_keys_from_openclip
from nodegraph_diffusion.networks.unet import ldm_unet_keys_from_diffusers
from nodegraph_diffusion.vae.autoencoder import ldm_vae_keys_from_diffusers

OUT = Path(__file__).parent / "manifests"

# ---------------------------------------------------------------- published configs (data)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CONTROLNET_HINT = dict(conditioning_embedding_out_channels=(16, 32, 96, 256))
_CONTROLNET_DROP = ("out_channels", "up_block_types", "sample_size")

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab=49408, width=1024, layers=24, context=77, projection=1024)
OPENCLIP_BIGG = dict(vocab=49408, width=1280, layers=32, context=77, projection=1280)

# Noise-schedule buffers LDM saves with every SD1/SD2 checkpoint (1000 training steps).
LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

Shapes = dict[str, tuple[int, ...]]


# ---------------------------------------------------------------- helpers

def meta_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def same(label: str, ours: Shapes, reference: Shapes) -> None:
    if ours != reference:
        missing = sorted(set(reference) - set(ours))[:5]
        extra = sorted(set(ours) - set(reference))[:5]
        wrong = sorted(k for k in set(ours) & set(reference) if ours[k] != reference[k])[:5]
        sys.exit(f"{label}: cross-check failed; missing {missing}, extra {extra}, shape differs {wrong}")
    print(f"  cross-check {label}: {len(ours)} tensors agree")


def prefixed(prefix: str, shapes: Mapping[str, tuple[int, ...]]) -> Shapes:
    return {prefix + k: tuple(v) for k, v in shapes.items()}


# ---------------------------------------------------------------- components

def unet_ldm(config: dict, prefix: str = "model.diffusion_model.") -> Shapes:
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    reference = meta_state_dict(model)
    ours = prefixed(prefix, shapes_of(ldm_unet_keys_from_diffusers(reference)))
    back = sfu.convert_ldm_unet_checkpoint({k: torch.empty(s, device="meta") for k, s in ours.items()}, dict(model.config))
    same("unet", shapes_of(back), shapes_of(reference))
    return ours


def vae_ldm(prefix: str = "first_stage_model.") -> Shapes:
    with torch.device("meta"):
        model = AutoencoderKL(**SD_VAE)
    reference = meta_state_dict(model)
    ours = shapes_of(ldm_vae_keys_from_diffusers(reference))
    # LDM stores the mid-block attention projections as 1x1 convolutions.
    for key, shape in ours.items():
        if ".mid.attn_1." in key and key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and key.endswith(".weight"):
            ours[key] = (*shape, 1, 1)
    ours = prefixed(prefix, ours)
    back = sfu.convert_ldm_vae_checkpoint({k: torch.empty(s, device="meta") for k, s in ours.items()}, dict(model.config))
    same("vae", shapes_of(back), shapes_of(reference))
    return ours


def clip_hf(prefix: str) -> Shapes:
    """CLIP-L as SD files keep it: HF names with the text_model level, plus the position-id buffer."""
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    reference = shapes_of(meta_state_dict(model))
    # transformers >= 5.6 drops the text_model level from CLIPTextModel; SD files have it.
    ours = {("text_model." + k if not k.startswith("text_model.") else k): s for k, s in reference.items()}
    ours = prefixed(prefix, ours)
    back = sfu.convert_ldm_clip_checkpoint({k: torch.empty(s, device="meta") for k, s in ours.items()}, prefix)
    same("clip_l", {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()},
         {k.removeprefix("text_model."): s for k, s in reference.items()})
    ours[prefix + "text_model.embeddings.position_ids"] = (1, CLIP_L["max_position_embeddings"])
    return ours


def openclip(tower: dict, prefix: str, reference_layers: int, with_projection: bool) -> Shapes:
    """An OpenCLIP text tower in its own layout, written from the config."""
    w, n = tower["width"], tower["layers"]
    ours: Shapes = {
        "token_embedding.weight": (tower["vocab"], w),
        "positional_embedding": (tower["context"], w),
        "ln_final.weight": (w,),
        "ln_final.bias": (w,),
        "text_projection": (w, tower["projection"]),
        "logit_scale": (),
    }
    for i in range(n):
        block = f"transformer.resblocks.{i}."
        ours.update({
            block + "ln_1.weight": (w,), block + "ln_1.bias": (w,),
            block + "attn.in_proj_weight": (3 * w, w), block + "attn.in_proj_bias": (3 * w,),
            block + "attn.out_proj.weight": (w, w), block + "attn.out_proj.bias": (w,),
            block + "ln_2.weight": (w,), block + "ln_2.bias": (w,),
            block + "mlp.c_fc.weight": (4 * w, w), block + "mlp.c_fc.bias": (4 * w,),
            block + "mlp.c_proj.weight": (w, 4 * w), block + "mlp.c_proj.bias": (w,),
        })
    ours = prefixed(prefix, ours)
    hf = dict(vocab_size=tower["vocab"], hidden_size=w, intermediate_size=4 * w, num_attention_heads=w // 64,
              max_position_embeddings=tower["context"], hidden_act="gelu", projection_dim=tower["projection"])
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        reference_model = cls(CLIPTextConfig(**hf, num_hidden_layers=reference_layers))
        full_model = CLIPTextModelWithProjection(CLIPTextConfig(**hf, num_hidden_layers=n))
    meta = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    back = shapes_of(sfu.convert_open_clip_checkpoint(reference_model, meta, prefix=prefix))
    reference = shapes_of(meta_state_dict(reference_model))
    strip = lambda d: {k.removeprefix("text_model."): v for k, v in d.items()}  # noqa: E731
    if not with_projection:
        back.pop("text_projection.weight", None)
    same(f"openclip {prefix}", strip(back), strip(reference))
    # And our own renaming gives transformers' names for the full tower.
    mine = shapes_of(hf_clip_keys_from_openclip({k[len(prefix):]: v for k, v in meta.items()}))
    same(f"openclip {prefix} (ours)", strip(mine), strip(shapes_of(meta_state_dict(full_model))))
    return ours


def controlnet_diffusers(unet_config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    config = {k: v for k, v in unet_config.items() if k not in _CONTROLNET_DROP} | CONTROLNET_HINT
    with torch.device("meta"):
        model = ControlNetModel(**config)
    return dict(model.config), meta_state_dict(model)


def controlnet_ldm(unet_config: dict) -> Shapes:
    config, reference = controlnet_diffusers(unet_config)
    ours = shapes_of(ldm_controlnet_keys_from_diffusers(reference))
    back = sfu.convert_controlnet_checkpoint({k: torch.empty(s, device="meta") for k, s in ours.items()}, config)
    same("controlnet", shapes_of(back), shapes_of(reference))
    return ours


def controlnet_diffusers_layout(unet_config: dict) -> Shapes:
    config, reference = controlnet_diffusers(unet_config)
    ldm = ldm_controlnet_keys_from_diffusers(reference)
    back = sfu.convert_controlnet_checkpoint(dict(ldm), config)
    # diffusers' converter skips an SDXL ControlNet's vector embedding (those ship in diffusers
    # layout only); its name table for that embedding checks ours instead.
    for diffusers_key, ldm_key in sfu.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if ldm_key in ldm:
            back[diffusers_key] = ldm[ldm_key]
    same("controlnet (diffusers layout, via ours)", shapes_of(back), shapes_of(reference))
    return shapes_of(reference)


def schedule_buffers() -> Shapes:
    return {name: (1000,) for name in LDM_SCHEDULE_BUFFERS}


# ---------------------------------------------------------------- manifests

def manifests() -> dict[str, tuple[dict, Shapes]]:
    print("sd15")
    sd15 = unet_ldm(SD15_UNET) | vae_ldm() | clip_hf("cond_stage_model.transformer.") | schedule_buffers()
    print("sd15_inpainting")
    sd15_inpaint = unet_ldm(dict(SD15_UNET, in_channels=9)) | vae_ldm() | clip_hf("cond_stage_model.transformer.") | schedule_buffers()
    print("sd21_768v")
    sd21 = (unet_ldm(SD21_UNET) | vae_ldm()
            | openclip(OPENCLIP_H, "cond_stage_model.model.", reference_layers=23, with_projection=False)
            | schedule_buffers())
    print("sdxl_base")
    sdxl = (unet_ldm(SDXL_UNET) | vae_ldm() | clip_hf("conditioner.embedders.0.transformer.")
            | openclip(OPENCLIP_BIGG, "conditioner.embedders.1.model.", reference_layers=32, with_projection=True))
    print("sdxl_refiner")
    refiner = (unet_ldm(SDXL_REFINER_UNET) | vae_ldm()
               | openclip(OPENCLIP_BIGG, "conditioner.embedders.0.model.", reference_layers=32, with_projection=True))
    print("sd15_controlnet")
    cn15 = controlnet_ldm(SD15_UNET)
    print("sdxl_controlnet")
    cnxl = controlnet_diffusers_layout(SDXL_UNET)

    def expect(kind: str, family: str, prediction: str | None, components: list[str], inpainting: bool = False) -> dict:
        return {"kind": kind, "family": family, "prediction": prediction, "inpainting": inpainting, "components": components}

    return {
        "sd15": (expect("checkpoint", "sd1", "eps", ["unet", "vae", "clip_l"]), sd15),
        "sd15_inpainting": (expect("checkpoint", "sd1", "eps", ["unet", "vae", "clip_l"], True), sd15_inpaint),
        "sd21_768v": (expect("checkpoint", "sd2", "v", ["unet", "vae", "clip_h"]), sd21),
        "sdxl_base": (expect("checkpoint", "sdxl", "eps", ["unet", "vae", "clip_l", "clip_g"]), sdxl),
        "sdxl_refiner": (expect("checkpoint", "sdxl_refiner", "eps", ["unet", "vae", "clip_g"]), refiner),
        "sd15_controlnet": (expect("controlnet", "sd1", None, ["controlnet"]), cn15),
        "sdxl_controlnet": (expect("controlnet", "sdxl", None, ["controlnet"]), cnxl),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (expected, shapes) in manifests().items():
        document = {
            "name": name,
            "expected": expected,
            # Weights are fp16 in the distributed files; these few entries are not.
            "dtype": "F16",
            "dtype_exceptions": {k: "I64" for k in shapes if k.endswith("position_ids")},
            "shapes": {k: list(v) for k, v in sorted(shapes.items())},
        }
        raw = json.dumps(document, separators=(",", ":")).encode()
        path = OUT / f"{name}.json.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        print(f"wrote {path.name}: {len(shapes)} tensors, {len(raw)} bytes JSON, {path.stat().st_size} bytes gzipped")


if __name__ == "__main__":
    main()
