"""GLIGEN on tiny random models: the fuser and the position net against diffusers' GatedSelfAttentionDense
and GLIGENTextBoundingboxProjection, a GLIGEN file on our U-Net against diffusers' UNet2DConditionModel
with attention_type="gated", ComfyUI's box coordinates, the guider grounding only the conditioning that
carries the boxes, and the nodes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _random_weights import randomize_
from _unet_fixtures import _diffusers_common_kwargs
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.components import TextEncoders
from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.networks.gligen import (
    MAX_OBJECTS,
    GatedSelfAttention,
    Gligen,
    GligenError,
    Grounding,
    GroundingBox,
    PositionNet,
    fuser_heads,
    transformer_blocks,
)
from nodegraph_diffusion.networks.unet import UNet, UNetConfig
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.gligen import ApplyGligenTextBox, LoadGligen
from nodegraph_diffusion.sampling.guidance import CFGGuider, CondEntry, GuidanceError
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from safetensors.torch import save_file
from torch import Tensor

from nodegraph.node import CancelToken, RunContext

TOL = 1e-4
TOKEN_DIM = 32  # the tiny U-Net's context width, which GLIGEN's tokens have
# 64-wide heads, as the fusers of a GLIGEN whose tokens are not 768 wide have (fuser_heads).
TINY_GLIGEN_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                              transformer_depth_middle=1, num_heads=None, head_dim=64, context_dim=TOKEN_DIM)


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


def with_open_gates(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gates near tanh(1) instead of randomize_'s small values, so the fusers change the result plainly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                param.copy_(0.8 + 0.4 * torch.rand((), generator=generator))
    return module


def grounding_inputs(batch: int, phrase_dim: int, boxes: int, seed: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """(boxes (B, 30, 4), masks (B, 30), phrases (B, 30, P)): `boxes` used slots, the rest padding."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, MAX_OBJECTS, 2, 2, generator=generator).sort(dim=2).values.transpose(2, 3)
    corners = corners.reshape(batch, MAX_OBJECTS, 4)  # x1 < x2, y1 < y2
    masks = torch.zeros(batch, MAX_OBJECTS)
    masks[:, :boxes] = 1.0
    phrases = torch.randn(batch, MAX_OBJECTS, phrase_dim, generator=generator)
    return corners * masks[..., None], masks, phrases * masks[..., None]


def gligen_file_state(block_paths: list[str], widths: list[int], phrase_dim: int, token_dim: int,
                      seed: int = 3) -> dict[str, Tensor]:
    """A random GLIGEN in the file layout (ComfyUI's gligen_sd14_textbox_pruned keys) for these blocks."""
    fusers = [GatedSelfAttention(width, token_dim, *fuser_heads(width, token_dim)) for width in widths]
    model = with_open_gates(randomize_(Gligen(block_paths, fusers, PositionNet(phrase_dim, token_dim, 48, 8)), seed),
                            seed)
    state = {f"position_net.{name}": tensor for name, tensor in model.position_net.state_dict().items()}
    for path, fuser in zip(block_paths, model.fusers):
        state |= {f"{path}.fuser.{name}": tensor for name, tensor in fuser.state_dict().items()}
    return {key: tensor.contiguous() for key, tensor in state.items()}


def gligen_for(network: UNet, phrase_dim: int = 24, seed: int = 3) -> Gligen:
    blocks = transformer_blocks(network)
    state = gligen_file_state(list(blocks), [block.norm1.normalized_shape[0] for block in blocks.values()], phrase_dim,
                              network.config.context_dim, seed)
    return Gligen.from_state(state, "tiny.safetensors")


@pytest.mark.parametrize("dim, token_dim, heads", [(64, 768, 8), (128, 40, 2)])
def test_fuser_matches_diffusers(dim, token_dim, heads):
    from diffusers.models.attention import GatedSelfAttentionDense

    assert fuser_heads(dim, token_dim) == (heads, dim // heads)  # SD1's 8 heads for CLIP-L's tokens, else 64 wide
    reference = with_open_gates(randomize_(GatedSelfAttentionDense(dim, token_dim, heads, dim // heads), seed=1), 1)
    ours = GatedSelfAttention(dim, token_dim, *fuser_heads(dim, token_dim))
    ours.load_state_dict(reference.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(2)
    x, tokens = torch.randn(2, 48, dim, generator=generator), torch.randn(2, MAX_OBJECTS, token_dim, generator=generator)
    with torch.no_grad():
        expected, got = reference(x, tokens), ours(x, tokens)
    error = (got - expected).abs().max().item()
    print(f"fuser {dim}/{token_dim}: max |ours - diffusers| {error:.2e}, change by the fuser {(expected - x).abs().max():.3f}")
    assert error <= TOL and (expected - x).abs().max() > 0.1


def test_position_net_matches_diffusers():
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    reference = randomize_(GLIGENTextBoundingboxProjection(positive_len=40, out_dim=TOKEN_DIM), seed=4)
    ours = PositionNet(40, TOKEN_DIM, 512, 8)
    ours.load_state_dict(reference.state_dict(), strict=True)
    boxes, masks, phrases = grounding_inputs(2, 40, 3)
    with torch.no_grad():
        expected = reference(boxes, masks, positive_embeddings=phrases)
        got = ours(boxes, masks, phrases)
    error = (got - expected).abs().max().item()
    print(f"position net: max |ours - diffusers| {error:.2e}")
    assert error <= TOL and expected.abs().max() > 0.1
    assert torch.equal(got[:, 3], got[:, 4])  # the padding slots are the learned null token


def diffusers_gated_unet(config: UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    kwargs = _diffusers_common_kwargs(config)
    kwargs["up_block_types"] = tuple("CrossAttnUpBlock2D" if depth else "UpBlock2D"
                                     for depth in reversed(config.transformer_depth))
    model = UNet2DConditionModel(**kwargs, out_channels=config.out_channels, attention_type="gated")
    return with_open_gates(randomize_(model, seed), seed)


@pytest.fixture(scope="module")
def gated_pair(tmp_path_factory) -> tuple[object, UNet, Gligen]:
    """A random diffusers gated U-Net; ours with its U-Net weights and its fusers and position net
    read back from a GLIGEN file in ComfyUI's layout."""
    reference = diffusers_gated_unet(TINY_GLIGEN_UNET)
    state = reference.state_dict()
    layout = unet.DiffusersUNetLayout.of(state)
    grounding_keys = {key for key in state if ".fuser." in key or key.startswith("position_net.")}
    ours = UNet(TINY_GLIGEN_UNET).eval()
    ours.load_state_dict(unet.ldm_unet_keys_from_diffusers({k: v for k, v in state.items() if k not in grounding_keys}),
                         strict=True)
    # A prefix before the block paths, as full-model GLIGEN checkpoints have, is allowed.
    file_state = {(f"model.diffusion_model.{unet.ldm_key_from_diffusers(key, layout)}" if ".fuser." in key else key):
                  state[key].contiguous() for key in grounding_keys}
    path = tmp_path_factory.mktemp("gligen") / "tiny-gligen.safetensors"
    save_file(file_state, path)
    gligen = Gligen.load(path, device="cpu")
    assert len(gligen.fusers) == 7  # a block per down level, the middle's, two per up level
    return reference, ours, gligen


def test_gligen_on_our_unet_matches_diffusers_gated_unet(gated_pair):
    reference, ours, gligen = gated_pair
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 12, 16, generator=generator)
    timesteps = torch.tensor([811.0, 93.0])
    context = torch.randn(2, 7, TOKEN_DIM, generator=generator)
    boxes, masks, phrases = grounding_inputs(2, TOKEN_DIM, 2)
    with torch.no_grad():
        expected = reference(x, timesteps, encoder_hidden_states=context, cross_attention_kwargs={
            "gligen": {"boxes": boxes, "masks": masks, "positive_embeddings": phrases}}).sample
        plain = reference(x, timesteps, encoder_hidden_states=context).sample
        tokens = gligen.position_net(boxes, masks, phrases)
        with gligen.installed(ours, tokens):
            got = ours(x, timesteps, context)
        after = ours(x, timesteps, context)
        # Row 1 grounded alone (a guider's batched call with the negative prompt in row 0).
        with gligen.installed(ours, tokens[1:], rows=torch.tensor([1])):
            mixed = ours(x, timesteps, context)
    error = (got - expected).abs().max().item()
    print(f"gated U-Net: max |ours - diffusers| {error:.2e}; grounding changes the output by "
          f"{(expected - plain).abs().max():.3f}; rows grounded alone {(mixed[1] - expected[1]).abs().max():.2e}")
    assert error <= TOL and (expected - plain).abs().max() > 0.05
    assert (after - plain).abs().max() <= TOL  # the fusers act only while installed
    assert all(not block.middle_hooks for block in transformer_blocks(ours).values())
    assert (mixed[1] - expected[1]).abs().max() <= TOL and (mixed[0] - plain[0]).abs().max() <= TOL


def test_box_corners_follow_comfyuis_formula():
    # ComfyUI stores (height // 8, width // 8, y // 8, x // 8) and divides by the latent's cells:
    # x1 = x / w, y1 = y / h, x2 = (x + width) / w, y2 = (y + height) / h, unclamped.
    bottle = GroundingBox(torch.zeros(4), height=304, width=192, top=272, left=176)  # the corpus example, 768x768
    assert bottle.corners((96, 96), 8) == (22 / 96, 34 / 96, 46 / 96, 72 / 96)
    sun = GroundingBox(torch.zeros(4), height=144, width=144, top=16, left=416)
    assert sun.corners((60, 100), 8) == (52 / 100, 2 / 60, 70 / 100, 20 / 60)  # width across, height down
    beyond = GroundingBox(torch.zeros(4), height=64, width=96, top=40, left=40)
    assert beyond.corners((8, 8), 8) == (5 / 8, 5 / 8, 17 / 8, 13 / 8)  # past the edge: not clamped


def test_tokens_place_the_boxes_then_null_slots():
    network = UNet(TINY_GLIGEN_UNET).eval()
    gligen = gligen_for(network)
    phrases = torch.randn(2, 24, generator=torch.Generator().manual_seed(0))
    boxes = (GroundingBox(phrases[0], 64, 32, 8, 16), GroundingBox(phrases[1], 16, 48, 0, 40))
    tokens = gligen.tokens(boxes, (12, 10), 8)
    corners = torch.zeros(1, MAX_OBJECTS, 4)
    corners[0, 0] = torch.tensor([2 / 10, 1 / 12, 6 / 10, 9 / 12])
    corners[0, 1] = torch.tensor([5 / 10, 0.0, 11 / 10, 2 / 12])
    masks = torch.zeros(1, MAX_OBJECTS)
    masks[0, :2] = 1
    padded = torch.zeros(1, MAX_OBJECTS, 24)
    padded[0, :2] = phrases
    with torch.no_grad():
        assert torch.allclose(tokens, gligen.position_net(corners, masks, padded), atol=1e-6)
    with pytest.raises(GligenError, match="at most 30"):
        gligen.tokens(boxes * 16, (12, 10), 8)
    with pytest.raises(GligenError, match=r"takes \(24,\)"):
        gligen.tokens((GroundingBox(torch.zeros(7), 8, 8, 0, 0),), (12, 10), 8)


def test_the_guider_grounds_only_the_conditioning_with_boxes():
    """cond + cfg * (cond - uncond) with the positive call grounded and the negative one the plain
    U-Net (ComfyUI: the unconditional side has no GLIGEN); an area conditioning's boxes are fractions
    of its area."""
    network = randomize_(UNet(TINY_GLIGEN_UNET), seed=11)
    gligen = gligen_for(network)
    generator = torch.Generator().manual_seed(8)
    phrase = torch.randn(24, generator=generator)
    grounding = Grounding(gligen, (GroundingBox(phrase, 48, 64, 16, 8),))
    positive = CondEntry(context=torch.randn(1, 7, TOKEN_DIM, generator=generator), grounding=grounding)
    negative = CondEntry(context=torch.randn(1, 7, TOKEN_DIM, generator=generator))
    sampling = ModelSampling.for_prediction("eps")
    x = torch.randn(2, 4, 12, 16, generator=generator) * 3
    sigma = torch.full((2,), 3.0)

    def denoised(x_in: Tensor, entry: CondEntry, latent_size: tuple[int, int] | None) -> Tensor:
        batch = x_in.shape[0]
        model_in = x_in * sampling.input_scale(sigma[:batch]).reshape(-1, 1, 1, 1)
        call = (lambda: network(model_in, sampling.timestep(sigma[:batch]), entry.context.expand(batch, -1, -1)))
        if latent_size is None:
            return sampling.denoised(x_in, sigma[:batch], call())
        with gligen.installed(network, gligen.tokens(grounding.boxes, latent_size, 8).expand(batch, -1, -1)):
            return sampling.denoised(x_in, sigma[:batch], call())

    with torch.no_grad():
        guider = CFGGuider(network, sampling, [positive], [negative], cfg=4.0)
        got = guider(x, sigma)
        cond, uncond = denoised(x, positive, (12, 16)), denoised(x, negative, None)
        plain = denoised(x, positive.with_(grounding=None), None)
        # An area of 8x8 cells at (4, 8): the box is read in that area's cells.
        area = positive.with_(area=(64, 64, 32, 64))
        in_area = CFGGuider(network, sampling, [area], [], cfg=1.0)(x, sigma)
        crop = denoised(x[:, :, 4:12, 8:16], area, (8, 8))
    expected = uncond + 4.0 * (cond - uncond)
    error = (got - expected).abs().max().item()
    print(f"guider: max |got - written out| {error:.2e}; the boxes change the positive prediction by "
          f"{(cond - plain).abs().max():.3f}")
    assert error <= 1e-5 and (cond - plain).abs().max() > 1e-2
    assert guider.model_calls == 1  # both sides still share one batched call
    assert (in_area[:, :, 4:12, 8:16] - crop).abs().max() <= 1e-5
    assert all(not block.middle_hooks for block in transformer_blocks(network).values())


def test_a_gligen_for_another_unet_is_refused_before_sampling():
    gligen = gligen_for(UNet(TINY_GLIGEN_UNET).eval())
    other = UNet(replace(TINY_GLIGEN_UNET, transformer_depth=(0, 1))).eval()
    entry = CondEntry(context=torch.zeros(1, 7, TOKEN_DIM),
                      grounding=Grounding(gligen, (GroundingBox(torch.zeros(24), 8, 8, 0, 0),)))
    with pytest.raises(GuidanceError, match=r"tiny.safetensors: this GLIGEN was made for another U-Net: fusers for "
                                            r"input_blocks.1.1.transformer_blocks.0, output_blocks.2.1"):
        CFGGuider(other, ModelSampling.for_prediction("eps"), [entry], [entry], cfg=2.0)


def test_files_that_are_no_text_box_gligen_are_named(tmp_path):
    network = UNet(TINY_GLIGEN_UNET).eval()
    blocks = transformer_blocks(network)
    state = gligen_file_state(list(blocks), [b.norm1.normalized_shape[0] for b in blocks.values()], 24, 32)
    for name, broken, message in (
            ("unet.safetensors", {k: v for k, v in state.items() if "fuser" not in k}, "not a GLIGEN file"),
            ("image.safetensors", state | {"position_net.linears_text.0.weight": torch.zeros(1)}, "text-and-image"),
            ("half.safetensors", {k: v for k, v in state.items() if not k.endswith("fuser.norm2.bias")},
             "the fuser of input_blocks.1.1.transformer_blocks.0 lacks norm2.bias")):
        save_file(broken, tmp_path / name)
        with pytest.raises(GligenError, match=message):
            Gligen.load(tmp_path / name, device="cpu")


def tiny_clip(seed: int = 0) -> TextEncoders:
    config = TextEncoderConfig(width=24, layers=2, heads=2, intermediate_size=48, projection_dim=16)
    return TextEncoders({"clip_l": randomize_(CLIPTextEncoder(config), seed=seed)}, CLIPTokenizer.from_default(),
                        ModelFamily.SD1)


def test_text_box_node_adds_the_phrase_in_its_box_to_every_entry(tmp_path):
    clip = tiny_clip().with_clip_skip(2)
    gligen = gligen_for(UNet(TINY_GLIGEN_UNET).eval())
    conditioning = (CondEntry(context=torch.zeros(1, 77, 32)), CondEntry(context=torch.ones(1, 77, 32)))
    node = ApplyGligenTextBox()
    first = node.run(ApplyGligenTextBox.Inputs(conditioning=conditioning, clip=clip, gligen=gligen, text="a red ball",
                                               width=192, height=304, x=176, y=272), ctx(tmp_path)).conditioning
    both = node.run(ApplyGligenTextBox.Inputs(conditioning=first, clip=clip, gligen=gligen, text="sun", width=144,
                                              height=144, x=416, y=16), ctx(tmp_path)).conditioning
    encoder = clip.encoders["clip_l"]
    ids = torch.tensor([clip.tokenizer.tokenize_prompt("a red ball", pad_id=49407)[0].ids])
    with torch.no_grad():
        # ComfyUI's unprojected pooled output: the last layer's, whatever the clip skip.
        expected = encoder(ids, clip_skip=1, project_pooled=False).pooled[0]
    for entry, original in zip(both, conditioning):
        assert torch.equal(entry.context, original.context) and entry.grounding.model is gligen
        (ball, sun) = entry.grounding.boxes
        assert (ball.height, ball.width, ball.top, ball.left) == (304, 192, 272, 176)
        assert (sun.height, sun.width, sun.top, sun.left) == (144, 144, 16, 416)
        assert torch.allclose(ball.phrase, expected, atol=1e-6) and not torch.allclose(sun.phrase, ball.phrase)
    with pytest.raises(InputError, match="24 wide; the GLIGEN model takes 40"):
        wide = gligen_for(UNet(TINY_GLIGEN_UNET).eval(), phrase_dim=40)
        node.run(ApplyGligenTextBox.Inputs(conditioning=conditioning, clip=clip, gligen=wide, text="x"), ctx(tmp_path))
    full = tuple(entry.with_(grounding=Grounding(gligen, first[0].grounding.boxes * MAX_OBJECTS)) for entry in first)
    with pytest.raises(InputError, match="at most 30"):
        node.run(ApplyGligenTextBox.Inputs(conditioning=full, clip=clip, gligen=gligen, text="x"), ctx(tmp_path))


def test_loader_node_reads_the_gligen_folder(tmp_path, monkeypatch):
    from nodegraph_diffusion.nodes import folders

    network = UNet(TINY_GLIGEN_UNET).eval()
    blocks = transformer_blocks(network)
    (tmp_path / "gligen").mkdir()
    save_file(gligen_file_state(list(blocks), [b.norm1.normalized_shape[0] for b in blocks.values()], 24, 32),
              tmp_path / "gligen" / "tiny.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "gligen" / "other.safetensors")
    monkeypatch.setenv(folders.MODELS_ENV, str(tmp_path))
    monkeypatch.delenv(folders.CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    gligen = LoadGligen().run(LoadGligen.Inputs(name="tiny.safetensors"), ctx(tmp_path)).gligen
    assert gligen.block_paths == tuple(sorted(blocks)) and gligen.phrase_dim == 24
    with pytest.raises(InputError, match="other.safetensors: no GLIGEN fusers"):
        LoadGligen().run(LoadGligen.Inputs(name="other.safetensors"), ctx(tmp_path))
