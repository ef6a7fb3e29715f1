"""Checkpoint reading, detection and loading: manifests of the real files, tiny random files of each layout, and bad files."""

from __future__ import annotations

import ctypes
import json
import math
import os
import pathlib
import pickle
import struct
from pathlib import Path

import pytest
import torch

from nodegraph_diffusion.architectures import stable_diffusion as ck
from nodegraph_diffusion.architectures.detection import ComponentKeys, FileKind, ModelFamily, detect, detect_from_shapes
from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.sampling.model_sampling import Prediction
from nodegraph_diffusion.text import clip as text_encoder
from nodegraph_diffusion.vae import autoencoder as vae
from nodegraph_diffusion.weights.files import ShapeOnlyWeights, UnsafeCheckpointError
from nodegraph_diffusion.weights.loading import StateDictMismatchError, WrongModelKindError
from nodegraph_diffusion.weights.safetensors_io import CheckpointError, SafetensorsFile, read_safetensors_header

import _checkpoint_fixtures as fx

# --------------------------------------------------------------------------- manifests of real files

REFERENCE_UNET_CONFIGS = {
    "sd15": unet.SD1_CONFIG,
    "sd21_768v": unet.SD2_CONFIG,
    "sdxl_base": unet.SDXL_CONFIG,
    "sdxl_refiner": unet.SDXL_REFINER_CONFIG,
}


@pytest.mark.parametrize("name", fx.manifest_names())
def test_manifest_is_detected(name: str) -> None:
    manifest = fx.read_manifest(name)
    expected = manifest["expected"]
    detection = detect_from_shapes(manifest["shapes"], name)
    assert detection.kind.value == expected["kind"]
    assert detection.family is not None and detection.family.value == expected["family"]
    assert detection.inpainting == expected["inpainting"]
    assert list(detection.components) == expected["components"]
    assert detection.unclaimed_keys == ()


@pytest.mark.parametrize("name", fx.manifest_names())
def test_manifest_components_instantiate_with_no_missing_or_extra_keys(name: str) -> None:
    manifest = fx.read_manifest(name)
    shapes = manifest["shapes"]
    weights = ShapeOnlyWeights(shapes, path=name)
    detection = detect_from_shapes(shapes, name)
    if detection.kind is FileKind.CONTROLNET:
        loaded = ck.load_controlnet(weights, device="meta", dtype=torch.float16)
        assert len(loaded.controlnet.state_dict()) == len(shapes)
        assert loaded.family.value == manifest["expected"]["family"]
        return
    loaded = ck.load_checkpoint(weights, device="meta", dtype=torch.float16)
    assert loaded.prediction.value == manifest["expected"]["prediction"]
    modules = [loaded.unet, loaded.vae, *loaded.text_encoders.values()]
    # Every weight of the file went into a module (OpenCLIP's fused q/k/v become three tensors,
    # so count elements), except the known non-weight entries.
    skipped = {k for k in shapes if k.endswith(("position_ids", "logit_scale"))} | set(loaded.ignored_keys)
    file_elements = sum(math.prod(s) for k, s in shapes.items() if k not in skipped)
    assert sum(t.numel() for m in modules for t in m.state_dict().values()) == file_elements
    assert all(t.dtype == torch.float16 for m in modules for t in m.state_dict().values())
    if name in REFERENCE_UNET_CONFIGS:
        assert loaded.unet_config == REFERENCE_UNET_CONFIGS[name]
    assert loaded.latent_format.downscale_factor == 8 and loaded.latent_format.channels == 4


def test_manifest_latent_scaling_and_hidden_state_follow_family() -> None:
    sd15 = ck.load_checkpoint(ShapeOnlyWeights(fx.read_manifest("sd15")["shapes"]), device="meta")
    sdxl = ck.load_checkpoint(ShapeOnlyWeights(fx.read_manifest("sdxl_base")["shapes"]), device="meta")
    assert sd15.latent_format.scaling_factor == vae.latent_scaling_for("sd1").scaling_factor
    assert sdxl.latent_format.scaling_factor == vae.latent_scaling_for("sdxl").scaling_factor
    assert sdxl.hidden_state == text_encoder.HIDDEN_STATE_BY_FAMILY["sdxl"]
    assert sdxl.text_encoder_configs["clip_g"].projection_dim == 1280
    assert sdxl.text_encoder_configs["clip_l"].activation == "quick_gelu"
    assert sdxl.text_encoder_configs["clip_g"].activation == "gelu"


@pytest.mark.parametrize(
    ("name", "family"),
    [("sd15", ModelFamily.SD1), ("sd21_768v", ModelFamily.SD2), ("sdxl_base", ModelFamily.SDXL),
     ("sdxl_refiner", ModelFamily.SDXL_REFINER)],
)
def test_unet_alone_is_classified_from_its_own_layout(name: str, family: ModelFamily) -> None:
    prefix = "model.diffusion_model."
    shapes = {k[len(prefix):]: v for k, v in fx.read_manifest(name)["shapes"].items() if k.startswith(prefix)}
    detection = detect_from_shapes(shapes)
    assert (detection.kind, detection.family) == (FileKind.DIFFUSION_MODEL, family)


def test_prefixed_original_controlnet_is_detected() -> None:
    shapes = {"control_model." + k: v for k, v in fx.read_manifest("sd15_controlnet")["shapes"].items()}
    detection = detect_from_shapes(shapes)
    assert detection.kind is FileKind.CONTROLNET and detection.family is ModelFamily.SD1
    assert detection.components["controlnet"] == ComponentKeys("control_model.", "ldm")


# --------------------------------------------------------------------------- tiny files, real data


def _assert_same(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype).reshape(state[key].shape)), key


def test_sd1_checkpoint_loads_the_file_weights(tmp_path: Path) -> None:
    weights = fx.sd1_checkpoint()
    path = fx.write_safetensors(tmp_path / "tiny-sd1.safetensors", weights, dtype=torch.float32)
    loaded = ck.load_checkpoint(path, device="cpu")
    assert (loaded.family, loaded.prediction, loaded.inpainting) == (ModelFamily.SD1, Prediction.EPS, False)
    assert loaded.unet_config == fx.TINY_SD1_UNET
    part = lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}  # noqa: E731
    _assert_same(loaded.unet, part("model.diffusion_model."))
    vae_expected = {k: v.flatten(1) if v.ndim == 4 and ".attn_1." in k else v for k, v in part("first_stage_model.").items()}
    _assert_same(loaded.vae, vae_expected)
    clip = part("cond_stage_model.transformer.")
    clip.pop("text_model.embeddings.position_ids")
    _assert_same(loaded.text_encoders["clip_l"], clip)
    assert sorted(loaded.ignored_keys) == ["alphas_cumprod", "betas"]
    assert loaded.unexpected_keys == []
    assert loaded.latent_format == ck.LatentFormat(4, 0.18215, 0.0, fx.TINY_VAE.downscale_factor)


def test_same_dtype_load_maps_the_file_without_copying(tmp_path: Path) -> None:
    path = fx.write_safetensors(tmp_path / "tiny.safetensors", fx.sd1_checkpoint(), dtype=torch.float16)
    source = SafetensorsFile(path)
    tensor = source.tensor("model.diffusion_model.out.2.weight")
    mapping = source._mapping()
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    assert base <= tensor.data_ptr() < base + len(mapping)
    loaded = ck.load_checkpoint(source, device="cpu", dtype=torch.float16)
    assert base <= loaded.unet.out[2].weight.data_ptr() < base + len(mapping)
    # Converting copies, and the copy is what the module holds.
    converted = ck.load_checkpoint(SafetensorsFile(path), device="cpu", dtype=torch.float32)
    assert converted.unet.out[2].weight.dtype == torch.float32
    assert torch.equal(converted.unet.out[2].weight, tensor.float())


def test_dtype_policy_applies_per_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fx.write_safetensors(tmp_path / "tiny.safetensors", fx.sd1_checkpoint(), dtype=torch.float16)
    loaded = ck.load_checkpoint(path, device="cpu")  # CPU policy: fp32
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    loaded = ck.load_checkpoint(path, device="cpu", dtype="bf16")
    assert {p.dtype for m in (loaded.unet, loaded.vae, loaded.text_encoders["clip_l"]) for p in m.parameters()} == {torch.bfloat16}


def test_sd2_checkpoint_openclip_is_split_into_hf_projections(tmp_path: Path) -> None:
    weights = fx.sd2_checkpoint()
    path = fx.write_safetensors(tmp_path / "tiny-sd2.safetensors", weights, dtype=torch.float32)
    loaded = ck.load_checkpoint(path, device="cpu")
    assert (loaded.family, loaded.prediction) == (ModelFamily.SD2, Prediction.V)
    assert loaded.prediction_source.startswith("SD2 default")
    encoder = loaded.text_encoders["clip_h"]
    w = fx.TINY_OPENCLIP["width"]
    fused = weights["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    attn = encoder.text_model.encoder.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, fused[:w]) and torch.equal(attn.v_proj.weight, fused[2 * w:])
    assert torch.equal(encoder.text_projection.weight, weights["cond_stage_model.model.text_projection"].t())
    assert encoder.config.activation == "gelu" and loaded.hidden_state.clip_skip == 2


def test_sdxl_and_refiner_are_told_apart_by_their_text_encoders(tmp_path: Path) -> None:
    base = ck.load_checkpoint(fx.write_safetensors(tmp_path / "xl.safetensors", fx.sdxl_checkpoint()), device="cpu")
    refiner = ck.load_checkpoint(fx.write_safetensors(tmp_path / "ref.safetensors", fx.sdxl_refiner_checkpoint()), device="cpu")
    assert base.family is ModelFamily.SDXL and list(base.text_encoders) == ["clip_l", "clip_g"]
    assert refiner.family is ModelFamily.SDXL_REFINER and list(refiner.text_encoders) == ["clip_g"]
    assert base.unet_config == fx.TINY_SDXL_UNET and refiner.unet_config == fx.TINY_REFINER_UNET
    assert base.latent_format.scaling_factor == refiner.latent_format.scaling_factor == 0.13025


def test_inpainting_variant(tmp_path: Path) -> None:
    path = fx.write_safetensors(tmp_path / "inpaint.safetensors", fx.sd1_checkpoint(in_channels=9))
    loaded = ck.load_checkpoint(path, device="cpu")
    assert loaded.inpainting and loaded.unet_config.in_channels == 9
    assert "inpainting" in loaded.detection.describe()


def test_prediction_sources_in_order(tmp_path: Path) -> None:
    weights = fx.sd2_checkpoint()
    path = fx.write_safetensors(tmp_path / "m.safetensors", weights)
    assert ck.load_checkpoint(path, device="cpu", prediction="eps").prediction is Prediction.EPS
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    loaded = ck.load_checkpoint(path, device="cpu")
    assert (loaded.prediction, loaded.prediction_source) == (Prediction.EPS, "sidecar m.yaml")
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # no parameterization: LDM's eps
    assert ck.load_checkpoint(path, device="cpu").prediction is Prediction.EPS
    spec = fx.write_safetensors(tmp_path / "spec.safetensors", weights, metadata={"modelspec.prediction_type": "epsilon"})
    assert ck.load_checkpoint(spec, device="cpu").prediction is Prediction.EPS
    sd1_v = fx.write_safetensors(tmp_path / "sd1v.safetensors", fx.sd1_checkpoint() | {"v_pred": torch.zeros(0)})
    loaded = ck.load_checkpoint(sd1_v, device="cpu")
    assert (loaded.prediction, loaded.prediction_source) == (Prediction.V, "marker key 'v_pred'")
    with pytest.raises(CheckpointError, match="unknown prediction type 'x0'"):
        ck.load_checkpoint(path, device="cpu", prediction="x0")


def test_pickle_checkpoint_loads_through_weights_only(tmp_path: Path) -> None:
    weights = fx.sd2_checkpoint()
    path = tmp_path / "sd2-base.ckpt"
    torch.save({"state_dict": weights, "global_step": 875000}, path)
    loaded = ck.load_checkpoint(path, device="cpu")
    assert loaded.family is ModelFamily.SD2
    assert (loaded.prediction, loaded.prediction_source) == (Prediction.EPS, "global_step 875000 (SD2-base release)")
    assert torch.equal(loaded.unet.out[2].bias, weights["model.diffusion_model.out.2.bias"])


class _TouchOnLoad:
    """Unpickling this runs Path.touch(marker): the observable side effect a safe loader must not cause."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "hook": _TouchOnLoad(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # Sanity check of the fixture itself: a plain unpickle would create the marker.
    error = UnsafeCheckpointError if zip_format else CheckpointError
    for call in (detect, ck.load_checkpoint, ck.load_vae):
        with pytest.raises(error) as info:
            call(path)
        assert str(path) in str(info.value)
        assert not marker.exists()
    if zip_format:
        assert "Nothing in it was run" in str(info.value)
    else:
        assert "not a zip-format torch file" in str(info.value)
    pickle.loads(pickle.dumps(_TouchOnLoad(marker)))
    assert marker.exists()


def test_vae_files(tmp_path: Path) -> None:
    ldm = fx.write_safetensors(tmp_path / "vae.safetensors", fx.vae_weights())
    loaded = ck.load_vae(ldm, family="sdxl", device="cpu")
    assert loaded.latent_format == ck.LatentFormat(4, 0.13025, 0.0, 2) and loaded.config.ch_mult == (1, 2)
    unknown = ck.load_vae(ldm, device="cpu")
    assert unknown.latent_format is None and unknown.family is None
    prefixed = fx.write_safetensors(tmp_path / "vae2.safetensors", fx.prefixed("first_stage_model.", fx.vae_weights()))
    assert detect(prefixed).components["vae"] == ComponentKeys("first_stage_model.", "ldm")
    assert torch.equal(ck.load_vae(prefixed, device="cpu").vae.decoder.conv_out.weight,
                       loaded.vae.decoder.conv_out.weight.float())


def test_controlnet_files(tmp_path: Path) -> None:
    weights = fx.controlnet_weights(fx.TINY_SD1_UNET)
    for prefix in ("", "control_model."):
        path = fx.write_safetensors(tmp_path / f"cn{prefix}.safetensors", fx.prefixed(prefix, weights), dtype=torch.float32)
        loaded = ck.load_controlnet(path, device="cpu")
        assert loaded.family is ModelFamily.SD1 and loaded.config.hint_block_channels == (16, 32)
        _assert_same(loaded.controlnet, weights)
    xl = fx.write_safetensors(tmp_path / "cnxl.safetensors", fx.controlnet_weights(fx.TINY_SDXL_UNET))
    assert ck.load_controlnet(xl, device="cpu").family is ModelFamily.SDXL


# --------------------------------------------------------------------------- diffusers folders


@pytest.mark.parity
def test_diffusers_folder_loads_and_matches_diffusers(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    reference.save_pretrained(tmp_path / "unet")
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1).save_pretrained(tmp_path / "vae")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=49, pad_token_id=1, hidden_act="gelu"))
    clip.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))

    loaded = ck.load_checkpoint(tmp_path, device="cpu")
    assert loaded.family is ModelFamily.SD1 and list(loaded.text_encoders) == ["clip_l"]
    assert (loaded.prediction, loaded.prediction_source) == (Prediction.V, "scheduler/scheduler_config.json")
    assert loaded.text_encoder_configs["clip_l"].activation == "gelu"  # from config.json, not the layout default
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10.0])
    context = torch.randn(1, 5, 64)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        actual = loaded.unet(x, t, context)
    assert (actual - expected).abs().max() <= 1e-4
    ids = torch.tensor([[0, 5, 7, 49]])
    with torch.no_grad():
        assert (loaded.text_encoders["clip_l"](ids).last_hidden_state - clip(ids).last_hidden_state).abs().max() <= 1e-4

    # The VAE subfolder alone is a VAE folder (its config.json gives the scaling); its weight file alone is a
    # diffusers-layout VAE whose latent space the weights cannot tell.
    vae_folder = ck.load_vae(tmp_path / "vae", device="cpu")
    assert vae_folder.latent_format is not None and vae_folder.latent_format.scaling_factor == 0.18215
    vae_file = ck.load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", device="cpu")
    assert vae_file.latent_format is None
    assert torch.equal(vae_file.vae.decoder.conv_in.weight, loaded.vae.decoder.conv_in.weight)
    with pytest.raises(WrongModelKindError, match="expected a VAE, but this is an SD1.x U-Net"):
        ck.load_vae(tmp_path / "unet")


# --------------------------------------------------------------------------- what other files are


def test_other_kinds_are_reported_as_such(tmp_path: Path) -> None:
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    cases = {
        "lora": (lora, FileKind.LORA),
        "ti": ({"emb_params": torch.zeros(2, 768)}, FileKind.EMBEDDING),
        "te": (fx.prefixed("cond_stage_model.transformer.", fx.clip_hf_weights()), FileKind.TEXT_ENCODER),
        "bare_te": (fx.clip_hf_weights(), FileKind.TEXT_ENCODER),
        "openclip": (fx.openclip_weights(), FileKind.TEXT_ENCODER),
        "junk": ({"foo.bar": torch.zeros(1)}, FileKind.UNKNOWN),
    }
    for name, (weights, kind) in cases.items():
        detection = detect(fx.write_safetensors(tmp_path / f"{name}.safetensors", weights))
        assert detection.kind is kind, name
    with pytest.raises(WrongModelKindError, match="expected a diffusion checkpoint, but this is a LoRA"):
        ck.load_checkpoint(tmp_path / "lora.safetensors")


def test_wrong_kind_given_as_vae_names_file_expected_and_detected(tmp_path: Path) -> None:
    unet_only = fx.write_safetensors(tmp_path / "unet.safetensors", fx.unet_weights(fx.TINY_SD1_UNET))
    with pytest.raises(WrongModelKindError) as info:
        ck.load_vae(unet_only)
    message = str(info.value)
    assert str(unet_only) in message and "expected a VAE" in message and "an SD1.x U-Net" in message
    full = fx.write_safetensors(tmp_path / "full.safetensors", fx.sd1_checkpoint())
    with pytest.raises(WrongModelKindError, match="expected a VAE, but this is an SD1.x checkpoint .* load_checkpoint"):
        ck.load_vae(full)
    with pytest.raises(WrongModelKindError, match="expected a ControlNet, but this is an SD1.x checkpoint"):
        ck.load_controlnet(full)
    vae_file = fx.write_safetensors(tmp_path / "vae.safetensors", fx.vae_weights())
    with pytest.raises(WrongModelKindError, match="expected a diffusion checkpoint, but this is a VAE"):
        ck.load_checkpoint(vae_file)


def test_strict_load_names_unexpected_keys(tmp_path: Path) -> None:
    weights = fx.sd1_checkpoint() | {"model.diffusion_model.extra_head.weight": torch.zeros(3),
                                      "mystery.tensor": torch.zeros(1)}
    path = fx.write_safetensors(tmp_path / "extra.safetensors", weights)
    with pytest.raises(StateDictMismatchError, match=r"belong to no component: mystery\.tensor"):
        ck.load_checkpoint(path, device="cpu")
    loaded_unclaimed = fx.write_safetensors(tmp_path / "extra2.safetensors", {k: v for k, v in weights.items() if k != "mystery.tensor"})
    with pytest.raises(StateDictMismatchError, match=r"unet has 1 unexpected key\(s\): extra_head\.weight"):
        ck.load_checkpoint(loaded_unclaimed, device="cpu")
    loaded = ck.load_checkpoint(path, device="cpu", strict=False)
    assert sorted(loaded.unexpected_keys) == ["mystery.tensor", "unet:extra_head.weight"]


def test_missing_or_misshapen_weights_are_errors_naming_keys(tmp_path: Path) -> None:
    weights = fx.sd1_checkpoint()
    del weights["model.diffusion_model.out.2.bias"]
    path = fx.write_safetensors(tmp_path / "missing.safetensors", weights)
    with pytest.raises(StateDictMismatchError, match=r"unet is missing 1 key\(s\): out\.2\.bias"):
        ck.load_checkpoint(path, device="cpu", strict=False)
    weights = fx.sd1_checkpoint()
    weights["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    path = fx.write_safetensors(tmp_path / "shape.safetensors", weights)
    with pytest.raises(StateDictMismatchError, match=r"vae weights do not fit.*decoder\.conv_out\.bias"):
        ck.load_checkpoint(path, device="cpu")


# --------------------------------------------------------------------------- corrupt files


def _raw_safetensors(path: Path, header: object, data: bytes = b"", declared_length: int | None = None) -> Path:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    length = len(encoded) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + encoded + data)
    return path


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = fx.write_safetensors(tmp_path / "t.safetensors", fx.sd1_checkpoint())
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated file: tensor .* data_offsets .* run past the end") as info:
        ck.load_checkpoint(path)
    assert info.value.path == str(path)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="header length .* runs past the end of the file"):
        detect(path)
    with open(path, "r+b") as f:
        f.truncate(3)
    with pytest.raises(CheckpointError, match="too short"):
        detect(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"{not json", b"", "not valid UTF-8 JSON"),
        ([1, 2], b"", "header is a JSON list"),
        ({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0", "unknown dtype 'F12'"),
        ({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0", "needs 6 bytes"),
        ({"w": {"dtype": "F16", "shape": [1]}}, b"\0\0", "needs dtype, shape and data_offsets"),
        ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
          "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, b"\0" * 6, "overlap"),
    ],
)
def test_corrupt_safetensors_headers(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_header_is_read_without_touching_data(tmp_path: Path) -> None:
    path = _raw_safetensors(
        tmp_path / "h.safetensors",
        {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}},
        data=torch.arange(4, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(),
    )
    header = read_safetensors_header(path)
    assert header.tensors["w"].shape == (2, 2) and header.tensors["w"].dtype == torch.bfloat16
    assert header.metadata == {"format": "pt"}
    assert torch.equal(SafetensorsFile(path).tensor("w"), torch.arange(4, dtype=torch.bfloat16).view(2, 2))


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        detect(tmp_path / "nope.safetensors")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unknown weight file type '.gguf'"):
        detect(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not in diffusers format"):
        detect(tmp_path / "empty")
    corrupt = tmp_path / "c.ckpt"
    torch.save({"a": torch.zeros(3)}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=f"{corrupt.name}"):
        detect(corrupt)
    assert os.path.exists(corrupt)
