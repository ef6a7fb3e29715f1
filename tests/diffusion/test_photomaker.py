"""PhotoMaker v1 on tiny random models: the ID embedding is the CLIP vision tower's pooled class token
through both projections (against transformers' CLIPVisionModelWithProjection with the same weights),
the fuse module equals its formula written out, PhotoMakerEncode changes the text states at the
class-word position alone, and files load through safe reading only."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from nodegraph.node import CancelToken, RunContext
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.components import TextEncoders
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.photomaker import LoadPhotoMaker, PhotoMakerEncode
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from nodegraph_diffusion.vision.clip_vision import CLIPVisionConfig, clip_preprocess
from nodegraph_diffusion.vision.photomaker import PhotoMakerIDEncoder, trigger_position

from _random_weights import randomize_

# SDXL's text states are CLIP-L's beside CLIP-G's; the ID embedding has their total width.
CLIP_L = TextEncoderConfig(width=24, layers=2, heads=2, intermediate_size=48)
CLIP_G = TextEncoderConfig(width=40, layers=2, heads=2, intermediate_size=80, activation="gelu", projection_dim=16)
VISION = CLIPVisionConfig(image_size=224, patch_size=32, width=64, layers=2, heads=1, intermediate_size=96,
                          activation="quick_gelu", projection_dim=24)
PROJECTION_2 = CLIP_L.width + CLIP_G.width - VISION.projection_dim


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


@pytest.fixture(scope="module")
def photomaker() -> PhotoMakerIDEncoder:
    return randomize_(PhotoMakerIDEncoder(VISION, PROJECTION_2), seed=1)


@pytest.fixture(scope="module")
def sdxl_clip() -> TextEncoders:
    return TextEncoders({"clip_l": randomize_(CLIPTextEncoder(CLIP_L), seed=2),
                         "clip_g": randomize_(CLIPTextEncoder(CLIP_G), seed=3)},
                        CLIPTokenizer.from_default(), ModelFamily.SDXL)


def face(seed: int = 4, batch: int = 1) -> Tensor:
    return torch.rand(batch, 100, 80, 3, generator=torch.Generator().manual_seed(seed))


def layer_norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mlp(x: Tensor, module, residual: bool) -> Tensor:
    hidden = gelu(layer_norm(x, module.layernorm) @ module.fc1.weight.T + module.fc1.bias)
    out = hidden @ module.fc2.weight.T + module.fc2.bias
    return out + x if residual else out


def fused_written_out(model: PhotoMakerIDEncoder, prompt: Tensor, id_embed: Tensor) -> Tensor:
    """h = mlp1([p, e]) + p; out = LayerNorm(mlp2(h) + h)."""
    fuse = model.fuse_module
    h = mlp(torch.cat([prompt, id_embed], -1), fuse.mlp1, residual=False) + prompt
    return layer_norm(mlp(h, fuse.mlp2, residual=True), fuse.layer_norm)


def test_id_embedding_is_the_pooled_class_token_through_both_projections(photomaker):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=VISION.width, intermediate_size=VISION.intermediate_size,
                                           num_hidden_layers=VISION.layers, num_attention_heads=VISION.heads,
                                           image_size=VISION.image_size, patch_size=VISION.patch_size,
                                           projection_dim=VISION.projection_dim, hidden_act="quick_gelu")
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    own = {k: v for k, v in photomaker.state_dict().items()
           if not k.startswith(("fuse_module.", "visual_projection_2."))}
    missing, unexpected = reference.load_state_dict(own, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids"}
    pixels = clip_preprocess(face(batch=2))
    with torch.no_grad():
        out = reference(pixel_values=pixels)
        pooled = reference.vision_model(pixel_values=pixels).pooler_output
        expected = torch.cat([out.image_embeds, pooled @ photomaker.visual_projection_2.weight.T], dim=-1)
        got = photomaker.id_embeds(pixels)
    err = float((got - expected).abs().max())
    print(f"ID embedding vs transformers' CLIPVisionModelWithProjection: max {err:.2e}")
    assert got.shape == (2, CLIP_L.width + CLIP_G.width) and err < 1e-5


def test_fuse_module_equals_its_formula_written_out(photomaker):
    generator = torch.Generator().manual_seed(5)
    prompt, id_embed = torch.randn(3, 64, generator=generator), torch.randn(3, 64, generator=generator)
    with torch.no_grad():
        got = photomaker.fuse_module(prompt, id_embed)
        expected = fused_written_out(photomaker, prompt, id_embed)
    err = float((got - expected).abs().max())
    print(f"fuse module vs its formula: max {err:.2e}")
    assert err < 1e-5 and float((got - prompt).abs().max()) > 0.1


def test_trigger_position_is_the_triggers_word_index_as_comfyui_counts_it():
    assert trigger_position("a photo of a man photomaker") == 5  # start token 0, "man" 5
    assert trigger_position("photograph of photomaker") == 2  # the corpus file: "of"
    assert trigger_position("photomaker, a man") is None  # a word followed by a comma is another word
    assert trigger_position("a  man photomaker") == 3  # split at single spaces: "" counts as a word


def test_encode_changes_exactly_the_class_word_position(photomaker, sdxl_clip, tmp_path):
    text = "a photo of a man photomaker in a garden"
    node = PhotoMakerEncode()
    image = face()
    with torch.no_grad():
        entry = node.run(PhotoMakerEncode.Inputs(photomaker=photomaker, image=image, clip=sdxl_clip, text=text),
                         ctx(tmp_path)).conditioning[0]
        plain = sdxl_clip.encode(text)
        id_embed = photomaker.id_embeds(clip_preprocess(image))
        expected = fused_written_out(photomaker, plain.context[0, 5:6], id_embed)
    changed = (entry.context != plain.context).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [5]  # "man", before the trigger word
    assert float((entry.context[0, 5:6] - expected).abs().max()) < 1e-5
    assert torch.equal(entry.pooled, plain.pooled) and entry.size_from_latent == plain.size_from_latent
    # Without the trigger word the prompt is encoded as it is; a batch uses its first image.
    bare = node.run(PhotoMakerEncode.Inputs(photomaker=photomaker, image=image, clip=sdxl_clip, text="a man"),
                    ctx(tmp_path)).conditioning[0]
    assert torch.equal(bare.context, sdxl_clip.encode("a man").context)
    two = node.run(PhotoMakerEncode.Inputs(photomaker=photomaker, image=torch.cat([image, face(9)]), clip=sdxl_clip,
                                           text=text), ctx(tmp_path)).conditioning[0]
    assert torch.equal(two.context, entry.context)


def test_encode_refuses_text_encoders_of_another_width(photomaker, tmp_path):
    sd1_clip = TextEncoders({"clip_l": randomize_(CLIPTextEncoder(CLIP_L), seed=2)}, CLIPTokenizer.from_default(),
                            ModelFamily.SD1)
    with pytest.raises(InputError, match="width 64"):
        PhotoMakerEncode().run(PhotoMakerEncode.Inputs(photomaker=photomaker, image=face(), clip=sd1_clip,
                                                       text="a man photomaker"), ctx(tmp_path))


def test_loader_reads_v1_files_safely_and_refuses_others(photomaker, tmp_path, monkeypatch):
    folder = tmp_path / "photomaker"
    folder.mkdir()
    state = {k: v.clone() for k, v in photomaker.state_dict().items()}
    lora = {"unet.down_blocks.0.lora.down.weight": torch.zeros(2, 4)}
    torch.save({"id_encoder": state, "lora_weights": lora}, folder / "photomaker-v1.bin")
    save_file(state, folder / "converted.safetensors")
    torch.save({"id_encoder": state | {"qformer_perceiver.token_proj.0.weight": torch.zeros(2, 2)}},
               folder / "photomaker-v2.bin")
    torch.save({"id_encoder": state, "config": argparse.Namespace(rank=4)}, folder / "unsafe.bin")
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path))
    for name in ("photomaker-v1.bin", "converted.safetensors"):
        loaded = LoadPhotoMaker().run(LoadPhotoMaker.Inputs(name=name), ctx(tmp_path)).photomaker
        assert loaded.config == VISION and loaded.width == 64
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(InputError, match="PhotoMaker v2"):
        LoadPhotoMaker().run(LoadPhotoMaker.Inputs(name="photomaker-v2.bin"), ctx(tmp_path))
    with pytest.raises(InputError, match="refused to unpickle"):
        LoadPhotoMaker().run(LoadPhotoMaker.Inputs(name="unsafe.bin"), ctx(tmp_path))
