"""SD3/SD3.5 and Flux ControlNet files: detection from keys and shapes, loading through the one
ControlNet loader, the apply and union-type nodes' checks, and refusals that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import TINY_SD1_UNET, controlnet_weights, write_safetensors
from nodegraph_diffusion.architectures.controlnets import LoadedTransformerControlNet, load_any_controlnet
from nodegraph_diffusion.architectures.detection import FileKind, ModelFamily, detect
from nodegraph_diffusion.architectures.stable_diffusion import LoadedControlNet
from nodegraph_diffusion.components import VAEModel
from nodegraph_diffusion.networks.flux_controlnet import FluxControlNet
from nodegraph_diffusion.networks.mmdit_controlnet import SD3ControlNet, sd3_controlnet_keys_from_diffusers
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.conditioning import ApplyControlNet, ApplyControlNetSimple, SetUnionControlNetType
from nodegraph_diffusion.sampling.guidance import CFGGuider, CondEntry, ControlSpec, GuidanceError
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.weights.loading import StateDictMismatchError, WrongModelKindError
from test_transformer_controlnets import (
    SD3_MAIN,
    SD35_MAIN,
    flux_diffusers_controlnet,
    flux_main_config,
    sd3_joint_controlnet,
    sd35_image_controlnet,
    stability_sd35_state,
    xlabs_state,
)
from torch import Tensor


def state(module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def files(root: Path) -> dict[str, Path]:
    """One file per layout people download (float32, so tensors compare exactly)."""
    made = {
        "instantx_sd3": state(sd3_joint_controlnet(SD3_MAIN, seed=1)),
        "stability_sd35_canny": stability_sd35_state(state(sd35_image_controlnet(SD35_MAIN, seed=2))),
        "diffusers_sd35": state(sd35_image_controlnet(SD35_MAIN, seed=3)),
        "instantx_flux_union": state(flux_diffusers_controlnet(flux_main_config(), seed=4, single=0, modes=3)),
        "instantx_flux_schnell": state(flux_diffusers_controlnet(flux_main_config(False), seed=5)),
        "xlabs_flux": xlabs_state(state(flux_diffusers_controlnet(flux_main_config(), seed=6, single=0, xlabs=True))),
        "sd1": controlnet_weights(TINY_SD1_UNET),
    }
    return {name: write_safetensors(root / f"{name}.safetensors", weights, dtype=None)
            for name, weights in made.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return files(tmp_path_factory.mktemp("controlnets"))


EXPECTED = {  # file -> (component, layout, family)
    "instantx_sd3": ("sd3_controlnet", "diffusers", ModelFamily.SD3),
    "stability_sd35_canny": ("sd3_controlnet", "original", ModelFamily.SD3),
    "diffusers_sd35": ("sd3_controlnet", "diffusers", ModelFamily.SD3),
    "instantx_flux_union": ("flux_controlnet", "diffusers", ModelFamily.FLUX),
    "instantx_flux_schnell": ("flux_controlnet", "diffusers", ModelFamily.FLUX_SCHNELL),
    # XLabs' files have an input_hint_block like SD ControlNets: told apart by their Flux blocks.
    "xlabs_flux": ("flux_controlnet", "original", ModelFamily.FLUX),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformer_controlnet_files_are_detected_by_layout(written, name: str) -> None:
    component, layout, family = EXPECTED[name]
    detection = detect(written[name])
    assert detection.kind is FileKind.CONTROLNET and detection.family is family
    assert {k: (v.prefix, v.layout) for k, v in detection.components.items()} == {component: ("", layout)}
    assert detection.unclaimed_keys == ()
    assert "ControlNet" in detection.describe()


def test_each_layout_loads_through_the_one_controlnet_loader(written) -> None:
    loaded = {name: load_any_controlnet(written[name], device="cpu") for name in written}
    assert isinstance(loaded["sd1"], LoadedControlNet) and loaded["sd1"].family is ModelFamily.SD1
    sd3 = loaded["instantx_sd3"]
    assert isinstance(sd3, LoadedTransformerControlNet) and isinstance(sd3.controlnet, SD3ControlNet)
    assert sd3.controlnet.config.joint and not sd3.shifted_latents and sd3.context_dim == SD3_MAIN.context_dim
    reference = sd3_controlnet_keys_from_diffusers(state(sd3_joint_controlnet(SD3_MAIN, seed=1)))
    assert all(torch.equal(sd3.controlnet.state_dict()[k], v) for k, v in reference.items())
    canny = loaded["stability_sd35_canny"]
    assert canny.control_type == "canny" and canny.shifted_latents and canny.context_dim is None
    assert loaded["diffusers_sd35"].control_type is None
    union = loaded["instantx_flux_union"]
    assert isinstance(union.controlnet, FluxControlNet) and union.num_modes == 3 and union.latent_input
    xlabs = loaded["xlabs_flux"]
    assert not xlabs.latent_input and xlabs.num_modes == 0
    for name, value in loaded.items():
        assert all(not t.is_meta for t in value.controlnet.state_dict().values()), name


def test_canny_and_depth_control_images_reach_the_vae_as_trained(written) -> None:
    image = torch.tensor([0.0, 0.25, 1.0]).reshape(1, 3, 1, 1)
    canny = load_any_controlnet(written["stability_sd35_canny"], device="cpu")
    # Stability's reference and model card: edges x enter the VAE (which takes [-1, 1]) as x * 127.5 + 0.5.
    assert torch.allclose(canny.vae_input(image) * 2 - 1, image * 127.5 + 0.5)
    from dataclasses import replace

    assert torch.equal(replace(canny, control_type="depth").vae_input(image), 1 - image)
    assert torch.equal(replace(canny, control_type="blur").vae_input(image), image)


def test_unknown_keys_and_wrong_kinds_are_named(written, tmp_path: Path) -> None:
    weights = stability_sd35_state(state(sd35_image_controlnet(SD35_MAIN, seed=3)))
    weights["stray.weight"] = torch.zeros(2)
    path = write_safetensors(tmp_path / "stray.safetensors", weights, dtype=None)
    with pytest.raises(StateDictMismatchError, match="stray.weight"):
        load_any_controlnet(path, device="cpu")
    assert load_any_controlnet(path, device="cpu", strict=False).unexpected_keys == ["sd3_controlnet:stray.weight"]
    del weights["stray.weight"], weights["controlnet_blocks.1.weight"]
    with pytest.raises(StateDictMismatchError, match=r"transformer_blocks \[0, 1\] but controlnet_blocks \[0\]"):
        load_any_controlnet(write_safetensors(tmp_path / "gap.safetensors", weights, dtype=None), device="cpu")
    with pytest.raises(WrongModelKindError, match="expected a ControlNet"):
        load_any_controlnet(write_safetensors(tmp_path / "vae.safetensors", {"x": torch.zeros(1)}, dtype=None))


def test_mistoline_controlnets_are_named_as_unsupported(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "mistoline.safetensors",
                             {"controlnet_blocks.0.linear.weight": torch.zeros(4, 4)}, dtype=None)
    detection = detect(path)
    assert detection.kind is FileKind.UNSUPPORTED and "MistoLine" in detection.describe()


# --------------------------------------------------------------------------- nodes


def run(node_class, **inputs):
    """Run a node that reads nothing of its context."""
    return node_class().run(node_class.Inputs(**inputs), None)  # type: ignore[arg-type]


def text(width: int) -> tuple[CondEntry, ...]:
    return (CondEntry(context=torch.zeros(1, 3, width), pooled=torch.zeros(1, 8)),)


IMAGE = torch.rand(1, 16, 16, 3)


def vae16() -> VAEModel:
    from _transformer_fixtures import VAE16
    from nodegraph_diffusion.architectures.stable_diffusion import LatentFormat
    from nodegraph_diffusion.vae.autoencoder import AutoencoderKL

    return VAEModel(AutoencoderKL(VAE16), LatentFormat(16, 1.5305, 0.0609, VAE16.downscale_factor))


def test_union_type_is_set_on_union_controlnets_only(written) -> None:
    union = load_any_controlnet(written["instantx_flux_union"], device="cpu")
    typed = run(SetUnionControlNetType, control_net=union, type="depth (InstantX)").control_net
    assert typed.mode == 2 and union.mode is None and typed.controlnet is union.controlnet
    assert run(SetUnionControlNetType, control_net=typed, type="auto").control_net.mode is None
    with pytest.raises(InputError) as error:
        run(SetUnionControlNetType, control_net=union, type="lq (InstantX)")  # 6: it knows 3
    assert error.value.input_name == "type"
    for name in ("xlabs_flux", "sd1"):
        plain = load_any_controlnet(written[name], device="cpu")
        assert run(SetUnionControlNetType, control_net=plain, type="auto").control_net is not None
        with pytest.raises(InputError, match="not a union ControlNet"):
            run(SetUnionControlNetType, control_net=plain, type="canny (InstantX)")


def test_latent_controlnets_need_the_vae_and_xlabs_ones_do_not(written) -> None:
    sd3 = load_any_controlnet(written["instantx_sd3"], device="cpu")
    conditioning = text(SD3_MAIN.context_dim)
    with pytest.raises(InputError) as error:
        run(ApplyControlNet, positive=conditioning, negative=conditioning, control_net=sd3, image=IMAGE)
    assert error.value.input_name == "vae"
    with pytest.raises(InputError, match="ApplyControlNet and the VAE"):
        run(ApplyControlNetSimple, conditioning=conditioning, control_net=sd3, image=IMAGE)
    with pytest.raises(InputError, match="width 7 does not fit"):
        run(ApplyControlNet, positive=text(7), negative=conditioning, control_net=sd3, image=IMAGE, vae=vae16())
    spec = run(ApplyControlNet, positive=conditioning, negative=conditioning, control_net=sd3, image=IMAGE,
               vae=vae16()).positive[0].control
    assert spec.latent_hint is not None and spec.latent_hint.downscale == 8
    xlabs = load_any_controlnet(written["xlabs_flux"], device="cpu")
    out = run(ApplyControlNet, positive=text(40), negative=text(40), control_net=xlabs, image=IMAGE, strength=0.5)
    spec = out.positive[0].control
    assert spec.latent_hint is None and spec.strength == 0.5 and out.negative[0].control is spec


def test_a_controlnet_of_another_family_is_refused_when_sampling(written) -> None:
    from nodegraph_diffusion.networks import mmdit as mmdit_module

    network = mmdit_module.MMDiT(SD3_MAIN)
    flux = load_any_controlnet(written["xlabs_flux"], device="cpu")
    entry = CondEntry(context=torch.zeros(1, 3, SD3_MAIN.context_dim), y=torch.zeros(1, SD3_MAIN.pooled_dim),
                      control=ControlSpec(flux.controlnet, IMAGE.permute(0, 3, 1, 2)))
    with pytest.raises(GuidanceError, match="a Flux ControlNet cannot guide this SD3"):
        CFGGuider(network, ModelSampling.flow(shift=3.0, multiplier=1000.0), [entry], [entry], 1.0)
    sd3 = load_any_controlnet(written["instantx_sd3"], device="cpu")
    entry = entry.with_(control=ControlSpec(sd3.controlnet, IMAGE.permute(0, 3, 1, 2)))
    with pytest.raises(GuidanceError, match="with a VAE"):
        CFGGuider(network, ModelSampling.flow(shift=3.0, multiplier=1000.0), [entry], [entry], 1.0)


def test_vae_of_other_latent_width_is_refused(written) -> None:
    from nodegraph_diffusion.architectures.stable_diffusion import LatentFormat
    from nodegraph_diffusion.vae.autoencoder import AutoencoderKL, VAEConfig

    sd3 = load_any_controlnet(written["instantx_sd3"], device="cpu")
    four = VAEModel(AutoencoderKL(VAEConfig(channels=8, ch_mult=(1,), num_res_blocks=1, norm_groups=4)),
                    LatentFormat(4, 0.18215, 0.0, 1))  # an SD1-like VAE
    conditioning = text(SD3_MAIN.context_dim)
    with pytest.raises(InputError, match="16-channel latents, the VAE makes 4"):
        run(ApplyControlNet, positive=conditioning, negative=conditioning, control_net=sd3, image=IMAGE, vae=four)
