"""Tests for detecting and loading transformer diffusion files (SD3 MMDiT, Flux.1) from keys and shapes alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nodegraph_diffusion.architectures.detection import FileKind, ModelFamily, detect, detect_from_shapes
from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint
from nodegraph_diffusion.architectures.transformers import load_text_encoder_file, load_transformer
from nodegraph_diffusion.networks.flux import Flux, FluxConfig
from nodegraph_diffusion.networks.mmdit import MMDiT, MMDiTConfig
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.t5 import T5Config, T5Encoder
from nodegraph_diffusion.weights.loading import WrongModelKindError

from _checkpoint_fixtures import prefixed, write_safetensors
from _random_weights import randomize_

SD35 = MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=2, hidden_size=128, num_heads=2,
                   pos_embed_max_size=8, context_dim=48, pooled_dim=40, qk_norm=True, dual_attention_layers=(0,))
# 16-wide heads: the rotary split a file of them gets is default_axes_dim(16) = (4, 6, 6).
FLUX_DEV = FluxConfig(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, context_dim=48, pooled_dim=24,
                      axes_dim=(4, 6, 6))
FLUX_SCHNELL = FluxConfig(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, context_dim=48, pooled_dim=24,
                          axes_dim=(4, 6, 6), guidance_embed=False)
# CLIP towers have 64-wide heads (what config-from-shapes assumes).
CLIP_L = TextEncoderConfig(vocab_size=50, width=64, layers=2, heads=1, intermediate_size=32, max_positions=16,
                           eos_token_id=49, projection_dim=16)
CLIP_G = TextEncoderConfig(vocab_size=50, width=128, layers=3, heads=2, intermediate_size=32, max_positions=16,
                           eos_token_id=49, projection_dim=24)
T5 = T5Config(vocab_size=60, width=48, heads=2, head_dim=8, ff_width=32, layers=2)


def weights(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in randomize_(module, seed).state_dict().items()}


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize(("config", "build", "family", "component"), [
    (SD35, MMDiT, ModelFamily.SD3, "mmdit"),
    (FLUX_DEV, Flux, ModelFamily.FLUX, "flux"),
    (FLUX_SCHNELL, Flux, ModelFamily.FLUX_SCHNELL, "flux"),
])
def test_diffusion_model_alone_and_prefixed(config, build, family, component) -> None:
    with torch.device("meta"):
        network_shapes = shapes(build(config).state_dict())
    alone = detect_from_shapes(network_shapes, "model.safetensors")
    assert (alone.kind, alone.family, alone.denoiser) == (FileKind.DIFFUSION_MODEL, family, component)
    assert alone.describe().endswith("diffusion model (" + component + ")")
    full = detect_from_shapes({f"model.diffusion_model.{k}": s for k, s in network_shapes.items()}, "full.safetensors")
    assert (full.kind, full.family, full.denoiser) == (FileKind.CHECKPOINT, family, component)
    assert not full.unclaimed_keys


def test_sd3_single_file_with_text_encoders_names_every_slot(tmp_path: Path) -> None:
    state = {
        **prefixed("model.diffusion_model.", weights(MMDiT(SD35))),
        **prefixed("text_encoders.clip_l.transformer.", weights(CLIPTextEncoder(CLIP_L), 1)),
        **prefixed("text_encoders.clip_g.transformer.", weights(CLIPTextEncoder(CLIP_G), 2)),
        **prefixed("text_encoders.t5xxl.transformer.", weights(T5Encoder(T5), 3)),
    }
    path = write_safetensors(tmp_path / "sd35.safetensors", state)
    detection = detect(path)
    assert detection.kind is FileKind.CHECKPOINT and detection.family is ModelFamily.SD3
    assert list(detection.components) == ["mmdit", "clip_l", "clip_g", "t5xxl"]
    assert detection.components["t5xxl"].layout == "t5"

    loaded = load_transformer(path, device="cpu")
    assert isinstance(loaded.network, MMDiT) and loaded.network_config == SD35
    assert loaded.vae is None and list(loaded.text_encoders) == ["clip_l", "clip_g", "t5xxl"]
    # CLIP-G is bigG: exact GELU even in transformers' naming; CLIP-L keeps quick_gelu.
    assert loaded.text_encoders["clip_g"].config.activation == "gelu"
    assert loaded.text_encoders["clip_l"].config.activation == "quick_gelu"
    assert loaded.latent_format.channels == 16
    assert loaded.latent_format.scaling_factor == pytest.approx(1.5305)
    assert loaded.latent_format.shift_factor == pytest.approx(0.0609)
    for key, value in weights(MMDiT(SD35)).items():
        assert torch.equal(loaded.network.state_dict()[key], value.half().float()), key  # the file holds fp16
    x = torch.randn(1, 16, 4, 6)
    out = loaded.network(x, torch.tensor([500.0]), torch.randn(1, 5, 48), torch.randn(1, 40))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flux_diffusion_model_file_loads_and_is_not_an_sd_checkpoint(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "flux1-dev.safetensors", weights(Flux(FLUX_DEV)))
    loaded = load_transformer(path, device="cpu")
    assert loaded.family is ModelFamily.FLUX and loaded.network_config == FLUX_DEV
    assert loaded.latent_format.scaling_factor == pytest.approx(0.3611)
    with pytest.raises(WrongModelKindError, match="Flux.1-dev diffusion model"):
        load_checkpoint(path, device="cpu")


def test_lone_text_encoder_files(tmp_path: Path) -> None:
    t5_path = write_safetensors(tmp_path / "t5xxl.safetensors", weights(T5Encoder(T5)))
    assert detect(t5_path).kind is FileKind.TEXT_ENCODER
    (slot, encoder), = load_text_encoder_file(t5_path, device="cpu").items()
    assert slot == "t5xxl" and isinstance(encoder, T5Encoder) and encoder.config == T5
    clip_path = write_safetensors(tmp_path / "clip_l.safetensors", weights(CLIPTextEncoder(CLIP_L)))
    (slot, encoder), = load_text_encoder_file(clip_path, device="cpu").items()
    assert slot == "text_encoder" and encoder.config.activation == "quick_gelu"


def test_diffusers_flux_folder(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                       pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    folder = tmp_path / "flux-schnell"
    randomize_(reference).save_pretrained(folder / "transformer")
    detection = detect(folder)
    assert (detection.kind, detection.family, detection.denoiser) == (FileKind.CHECKPOINT, ModelFamily.FLUX_SCHNELL, "flux")
    loaded = load_transformer(folder, device="cpu")
    x, context, pooled = torch.randn(1, 16, 4, 6), torch.randn(1, 5, 48), torch.randn(1, 24)
    ours = loaded.network(x, torch.tensor([0.4]), context, pooled)
    packed = x.reshape(1, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, 64)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(3.0), indexing="ij"), -1).reshape(6, 3)
    with torch.no_grad():
        theirs = reference(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=torch.tensor([0.4]), img_ids=img_ids, txt_ids=torch.zeros(5, 3)).sample
    unpacked = theirs.reshape(1, 2, 3, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 4, 6)
    assert (ours - unpacked).abs().max() <= 1e-4


@pytest.mark.parametrize(("name", "key"), [
    ("AuraFlow", "model.diffusion_model.double_layers.0.attn.w1q.weight"),
    ("Chroma", "distilled_guidance_layer.in_proj.bias"),
    ("Lumina 2", "cap_embedder.0.weight"),
])
def test_architectures_we_cannot_build_are_named(tmp_path: Path, name: str, key: str) -> None:
    path = write_safetensors(tmp_path / "other.safetensors", {key: torch.zeros(2, 2), "x.weight": torch.zeros(2)})
    detection = detect(path)
    assert detection.kind is FileKind.UNSUPPORTED and detection.architecture == name
    with pytest.raises(WrongModelKindError, match=f"{name} model, an architecture nodegraph cannot run yet"):
        load_transformer(path, device="cpu")


def test_fp8_files_stay_fp8_and_compute_as_their_upcast(tmp_path: Path) -> None:
    """Most Flux downloads are float8_e4m3fn: kept so in memory, upcast layer by layer when run."""
    state = weights(Flux(FLUX_DEV))
    path = write_safetensors(tmp_path / "flux1-dev-fp8.safetensors", state, dtype=torch.float8_e4m3fn)
    loaded = load_transformer(path, device="cpu")
    assert {p.dtype for p in loaded.network.parameters()} == {torch.float8_e4m3fn}
    upcast = Flux(FLUX_DEV).eval()
    upcast.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in state.items()})
    x, context, pooled = torch.randn(1, 16, 4, 6), torch.randn(1, 5, 48), torch.randn(1, 24)
    with torch.no_grad():
        args = (x, torch.tensor([0.7]), context, pooled, torch.tensor([3.5]))
        assert torch.equal(loaded.network(*args), upcast(*args))
    assert {p.dtype for p in loaded.network.parameters()} == {torch.float8_e4m3fn}
