"""Tests for nodegraph_diffusion.text.clip: parity with transformers CLIP, the OpenCLIP mapping, config from shapes, clip skip, embedding override."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from nodegraph_diffusion.text import clip as te
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig, TextEncoderLoadError

TOL = 1e-4
VOCAB = 320
EOS = VOCAB - 1
BOS = VOCAB - 2

# CLIP-L-like (quick_gelu, no projection) and OpenCLIP-like (gelu, projection), both tiny.
CLIP_L_LIKE = TextEncoderConfig(vocab_size=VOCAB, width=64, layers=3, heads=4, intermediate_size=96,
                                activation="quick_gelu", eos_token_id=EOS)
OPENCLIP_LIKE = TextEncoderConfig(vocab_size=VOCAB, width=64, layers=3, heads=4, intermediate_size=128,
                                  activation="gelu", projection_dim=48, eos_token_id=EOS)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (references zero-init some, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif param.ndim > 1 and "embedding" not in name:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.5 * noise)
    return module.eval()


def hf_config(config: TextEncoderConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or 512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        attention_dropout=0.0,
    )


def token_ids() -> Tensor:
    """Two prompts padded to 77 as SD1 does (with end-of-text) and as OpenCLIP does (with 0)."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB - 2, (2, 77), generator=generator)
    ids[:, 0] = BOS
    ids[0, 9:] = EOS
    ids[1, 30] = EOS
    ids[1, 31:] = 0
    return ids


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def openclip_from_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Test-only inverse of hf_clip_keys_from_openclip, written from the OpenCLIP layout's facts."""
    out: dict[str, Tensor] = {}
    layers = {int(k.split(".")[3]) for k in state_dict if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        hf = f"text_model.encoder.layers.{i}."
        oc = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state_dict[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[f"{oc}attn.out_proj.{kind}"] = state_dict[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{oc}ln_1.{kind}"] = state_dict[f"{hf}layer_norm1.{kind}"]
            out[f"{oc}ln_2.{kind}"] = state_dict[f"{hf}layer_norm2.{kind}"]
            out[f"{oc}mlp.c_fc.{kind}"] = state_dict[f"{hf}mlp.fc1.{kind}"]
            out[f"{oc}mlp.c_proj.{kind}"] = state_dict[f"{hf}mlp.fc2.{kind}"]
    out["token_embedding.weight"] = state_dict["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state_dict["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state_dict["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state_dict["text_model.final_layer_norm.bias"]
    out["text_projection"] = state_dict["text_projection.weight"].t().contiguous()
    out["logit_scale"] = torch.tensor(4.6052)
    return out


@pytest.fixture(scope="module")
def clip_l_pair():
    from transformers import CLIPTextModel

    reference = randomize_(CLIPTextModel(hf_config(CLIP_L_LIKE)), seed=1)
    # transformers 5 drops the ``text_model.`` level from CLIPTextModel; single files and
    # CLIPTextModelWithProjection keep it.
    state_dict = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    state_dict["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in SD1 files
    ours = CLIPTextEncoder(CLIP_L_LIKE).eval()
    ours.load_state_dict(te.text_encoder_state_dict(state_dict), strict=True)
    return reference, ours, state_dict


@pytest.fixture(scope="module")
def openclip_pair():
    from transformers import CLIPTextModelWithProjection

    reference = randomize_(CLIPTextModelWithProjection(hf_config(OPENCLIP_LIKE)), seed=2)
    openclip_state = openclip_from_hf(reference.state_dict())
    ours = CLIPTextEncoder(OPENCLIP_LIKE).eval()
    ours.load_state_dict(te.hf_clip_keys_from_openclip(openclip_state), strict=True)
    return reference, ours, openclip_state


@pytest.mark.parity
def test_clip_l_matches_transformers(clip_l_pair) -> None:
    reference, ours, _ = clip_l_pair
    ids = token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        last = ours(ids)
        penultimate = ours(ids, clip_skip=2, final_norm=False)
        penultimate_normed = ours(ids, clip_skip=2)
        third = ours(ids, clip_skip=3, final_norm=False)
        norm = reference.final_layer_norm
        assert max_err(last.last_hidden_state, expected.last_hidden_state) <= TOL
        assert last.hidden_state is last.last_hidden_state
        assert max_err(penultimate.hidden_state, expected.hidden_states[-2]) <= TOL
        assert max_err(penultimate_normed.hidden_state, norm(expected.hidden_states[-2])) <= TOL
        assert max_err(third.hidden_state, expected.hidden_states[-3]) <= TOL
        assert max_err(penultimate.last_hidden_state, expected.last_hidden_state) <= TOL
        assert max_err(last.pooled, expected.pooler_output) <= TOL
        assert last.pooled.shape == (2, CLIP_L_LIKE.width)
        # Layers really differ, so the comparisons above pin the layer index.
        assert max_err(expected.hidden_states[-2], expected.hidden_states[-3]) > 0.1


@pytest.mark.parity
def test_openclip_layout_matches_transformers_with_projection(openclip_pair) -> None:
    reference, ours, _ = openclip_pair
    ids = token_ids()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        out = ours(ids)
        sdxl_style = ours(ids, clip_skip=2, final_norm=False)
        sd2_style = ours(ids, clip_skip=2, final_norm=True)
        norm = reference.text_model.final_layer_norm
        assert max_err(out.last_hidden_state, expected.last_hidden_state) <= TOL
        assert max_err(sdxl_style.hidden_state, expected.hidden_states[-2]) <= TOL
        assert max_err(sd2_style.hidden_state, norm(expected.hidden_states[-2])) <= TOL
        assert out.pooled.shape == (2, OPENCLIP_LIKE.projection_dim)
        assert max_err(out.pooled, expected.text_embeds) <= TOL
        assert max_err(sdxl_style.pooled, expected.text_embeds) <= TOL
        assert expected.text_embeds.abs().max() > 0.1


def test_pool_reads_first_end_of_text(clip_l_pair) -> None:
    """SD1 pads with end-of-text, OpenCLIP with 0: either way the first end-of-text is read."""
    _, ours, _ = clip_l_pair
    ids = token_ids()
    with torch.no_grad():
        out = ours(ids)
    assert torch.equal(out.pooled[0], out.last_hidden_state[0, 9])
    assert torch.equal(out.pooled[1], out.last_hidden_state[1, 30])


def test_token_embeddings_override(clip_l_pair) -> None:
    _, ours, _ = clip_l_pair
    ids = token_ids()
    with torch.no_grad():
        plain = ours(ids, clip_skip=2)
        embeddings = ours.embed_tokens(ids)
        same = ours(ids, token_embeddings=embeddings, clip_skip=2)
        assert torch.equal(same.hidden_state, plain.hidden_state) and torch.equal(same.pooled, plain.pooled)
        # A textual-inversion vector at position 4 changes position 4 onwards only (causal attention).
        embeddings[:, 4] = torch.randn(CLIP_L_LIKE.width, generator=torch.Generator().manual_seed(9))
        changed = ours(ids, token_embeddings=embeddings, clip_skip=2).hidden_state
    assert torch.equal(changed[:, :4], plain.hidden_state[:, :4])
    assert (changed[:, 4:] - plain.hidden_state[:, 4:]).abs().amax(dim=-1).min() > 1e-4
    with pytest.raises(ValueError, match="token_embeddings must be"):
        ours(ids, token_embeddings=embeddings[:, :10])


def test_shorter_sequences_and_bad_arguments(clip_l_pair) -> None:
    reference, ours, _ = clip_l_pair
    ids = token_ids()[:, :12]
    with torch.no_grad():
        assert max_err(ours(ids).last_hidden_state, reference(ids).last_hidden_state) <= TOL
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        ours(ids, clip_skip=4)
    with pytest.raises(ValueError, match="T <= 77"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_config_from_shapes_hf_layout(clip_l_pair) -> None:
    _, _, state_dict = clip_l_pair
    shapes = {k: v.shape for k, v in state_dict.items()}
    # 64-wide heads are what real CLIP towers have; the tiny test model uses 16.
    assert te.text_encoder_config_from_shapes(shapes, head_dim=16) == CLIP_L_LIKE
    assert te.text_encoder_config_from_shapes(shapes).heads == 1


def test_config_from_shapes_openclip_layout(openclip_pair) -> None:
    _, _, openclip_state = openclip_pair
    shapes = {k: v.shape for k, v in openclip_state.items()}
    assert te.text_encoder_config_from_shapes(shapes, head_dim=16) == OPENCLIP_LIKE
    # Renamed to the HF layout, the projection survives; the activation then has to be stated.
    hf_shapes = {k: v.shape for k, v in te.hf_clip_keys_from_openclip(openclip_state).items()}
    assert te.text_encoder_config_from_shapes(hf_shapes, activation="gelu", head_dim=16) == OPENCLIP_LIKE


def test_config_from_shapes_of_real_sizes() -> None:
    """SD's three encoders, from shapes alone (no tensors allocated)."""
    def openclip_shapes(width: int, layers: int, proj: int) -> dict[str, tuple[int, ...]]:
        shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
                  "text_projection": (width, proj), "transformer.resblocks.0.mlp.c_fc.weight": (4 * width, width)}
        shapes.update({f"transformer.resblocks.{i}.ln_1.weight": (width,) for i in range(layers)})
        return shapes

    big_g = te.text_encoder_config_from_shapes(openclip_shapes(1280, 32, 1280))
    assert (big_g.heads, big_g.layers, big_g.activation, big_g.projection_dim, big_g.eos_token_id) == (20, 32, "gelu", 1280, 49407)
    vit_h = te.text_encoder_config_from_shapes(openclip_shapes(1024, 24, 1024))
    assert (vit_h.heads, vit_h.intermediate_size) == (16, 4096)
    clip_l = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.embeddings.position_embedding.weight": (77, 768),
              "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}
    clip_l.update({f"text_model.encoder.layers.{i}.layer_norm1.weight": (768,) for i in range(12)})
    assert te.text_encoder_config_from_shapes(clip_l) == TextEncoderConfig()


def test_load_text_encoder_from_openclip_state_dict(openclip_pair) -> None:
    reference, ours, openclip_state = openclip_pair
    loaded = te.load_text_encoder(openclip_state, config=OPENCLIP_LIKE)
    ids = token_ids()
    with torch.no_grad():
        assert max_err(loaded(ids).pooled, ours(ids).pooled) <= 1e-5
    # The mapping splits and transposes views; nothing was copied.
    assert loaded.text_projection.weight.data_ptr() == openclip_state["text_projection"].data_ptr()


def test_openclip_mapping_rejects_unknown_keys(openclip_pair) -> None:
    _, _, openclip_state = openclip_pair
    with pytest.raises(TextEncoderLoadError, match="transformer.resblocks.0.attn.bogus"):
        te.hf_clip_keys_from_openclip({**openclip_state, "transformer.resblocks.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(TextEncoderLoadError, match="visual.proj"):
        te.hf_clip_keys_from_openclip({**openclip_state, "visual.proj": torch.zeros(1)})


def test_load_text_encoder_reports_missing_keys(clip_l_pair) -> None:
    _, _, state_dict = clip_l_pair
    broken = {k: v for k, v in state_dict.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(TextEncoderLoadError, match="text_model.final_layer_norm.bias"):
        te.load_text_encoder(broken, config=CLIP_L_LIKE)

