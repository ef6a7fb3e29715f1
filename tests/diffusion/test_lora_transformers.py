"""LoRA for the transformer denoisers (nodegraph_diffusion.architectures.lora_transformers): kohya,
ComfyUI, diffusers/PEFT (ai-toolkit), OneTrainer/SimpleTuner and XLabs files on tiny random MMDiT
and Flux models and their text encoders.

Three oracles: (1) per format, a file written here from known random factors must patch exactly
``W + strength * alpha / rank * up @ down`` on the rows and parameters an independent table in
this file names, the network's output must equal a copy whose weights were merged by hand, and
the weights must come back bit for bit; (2) a PEFT LoRA on every layer of diffusers'
FluxTransformer2DModel / SD3Transformer2DModel, merged into diffusers' weights and converted by
the networks' own diffusers key mappings, must equal our patched weights, and the merged
diffusers model's output our patched output; (3) the same LoRA made by peft and saved by diffusers
(alpha, alpha_pattern, rank_pattern, rsLoRA in its header) must give diffusers' own output with
the adapter loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest
import torch
from _random_weights import randomize_
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.lora import (
    FusedLoraDelta,
    LoraFile,
    LoraFormatError,
    load_lora,
)
from nodegraph_diffusion.architectures.lora_transformers import (
    DIFFUSION_MODEL,
    TRANSFORMER_FAMILIES,
    match_lora,
    transformer_deltas,
)
from nodegraph_diffusion.networks.flux import Flux, FluxConfig, flux_keys_from_diffusers
from nodegraph_diffusion.networks.mmdit import (
    MMDiT,
    MMDiTConfig,
    mmdit_keys_from_diffusers,
)
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.t5 import T5Config, T5Encoder
from nodegraph_diffusion.weights.patching import WeightPatches, patched
from nodegraph_diffusion.weights.storage import compute_in
from safetensors.torch import save_file
from torch import Tensor, nn

WEIGHT_TOL = 1e-6
# Outputs of the same weights reached by two float32 paths (patched in place vs merged by hand,
# or upcast on read): they differ by rounding only, a few ulps of outputs of size ~10 (2.4e-6 seen).
SAME_WEIGHTS_OUTPUT_TOL = 1e-5
OUTPUT_TOL = 1e-4  # our network against diffusers' (the networks' own parity tolerance)
RANK = 4

FLUX = FluxConfig(in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2,
                  context_dim=40, pooled_dim=24, guidance_embed=True, axes_dim=(4, 4, 8))
# SD3.5-like: RMS qk-norm, a dual-attention first block; the last block's context stream is pre-only.
MMDIT = MMDiTConfig(patch_size=2, in_channels=4, out_channels=4, depth=2, hidden_size=64, num_heads=2,
                    pos_embed_max_size=8, context_dim=40, pooled_dim=24, qk_norm=True, dual_attention_layers=(0,))
CLIP_L = TextEncoderConfig(vocab_size=64, width=32, layers=2, heads=2, intermediate_size=64, max_positions=16,
                           projection_dim=32, eos_token_id=63)
CLIP_G = TextEncoderConfig(vocab_size=64, width=48, layers=2, heads=2, intermediate_size=96, activation="gelu",
                           max_positions=16, projection_dim=48, eos_token_id=63)
T5 = T5Config(vocab_size=64, width=40, heads=2, head_dim=16, ff_width=64, layers=2)


# --------------------------------------------------------------------------- models


def flux_pair(seed: int = 0) -> tuple[FluxTransformer2DModel, Flux]:
    """diffusers' Flux with random weights, and ours loaded through flux_keys_from_diffusers."""
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=FLUX.packed_in_channels, num_layers=FLUX.depth,
        num_single_layers=FLUX.depth_single_blocks, attention_head_dim=FLUX.head_dim,
        num_attention_heads=FLUX.num_heads,
        joint_attention_dim=FLUX.context_dim, pooled_projection_dim=FLUX.pooled_dim, guidance_embeds=True,
        axes_dims_rope=FLUX.axes_dim,
    )
    randomize_(reference, seed=seed, scale=0.3)
    ours = Flux(FLUX)
    ours.load_state_dict(flux_keys_from_diffusers(reference.state_dict()), strict=True)
    return reference, ours.eval()


def mmdit_pair(seed: int = 0) -> tuple[SD3Transformer2DModel, MMDiT]:
    reference = SD3Transformer2DModel(
        sample_size=8, patch_size=MMDIT.patch_size, in_channels=MMDIT.in_channels, num_layers=MMDIT.depth,
        attention_head_dim=MMDIT.head_dim, num_attention_heads=MMDIT.num_heads, joint_attention_dim=MMDIT.context_dim,
        caption_projection_dim=MMDIT.hidden_size, pooled_projection_dim=MMDIT.pooled_dim,
        out_channels=MMDIT.out_channels, pos_embed_max_size=MMDIT.pos_embed_max_size,
        dual_attention_layers=MMDIT.dual_attention_layers, qk_norm="rms_norm",
    )
    randomize_(reference, seed=seed)
    ours = MMDiT(MMDIT)
    ours.load_state_dict(mmdit_keys_from_diffusers(reference.state_dict()), strict=True)
    return reference, ours.eval()


def flux_inputs(seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, FLUX.in_channels, 6, 8, generator=generator), "timesteps": torch.tensor([0.7, 0.2]),
            "context": torch.randn(2, 5, FLUX.context_dim, generator=generator),
            "y": torch.randn(2, FLUX.pooled_dim, generator=generator), "guidance": torch.tensor([3.5, 1.0])}


def mmdit_inputs(seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, MMDIT.in_channels, 8, 6, generator=generator),
            "timesteps": torch.tensor([700.0, 35.5]),
            "context": torch.randn(2, 5, MMDIT.context_dim, generator=generator),
            "y": torch.randn(2, MMDIT.pooled_dim, generator=generator)}


def flux_reference_forward(reference: FluxTransformer2DModel, inputs: dict[str, Tensor]) -> Tensor:
    """diffusers' Flux fed as FluxPipeline feeds it (packed latents, 2-D position ids)."""
    from diffusers import FluxPipeline

    x = inputs["x"]
    batch, channels, height, width = x.shape
    out = reference(
        hidden_states=FluxPipeline._pack_latents(x, batch, channels, height, width),
        encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"], timestep=inputs["timesteps"],
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype),
        txt_ids=torch.zeros(inputs["context"].shape[1], 3), guidance=inputs["guidance"], return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def mmdit_reference_forward(reference: SD3Transformer2DModel, inputs: dict[str, Tensor]) -> Tensor:
    return reference(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"]).sample


@dataclass
class Family:
    """One transformer family as the tests drive it."""

    family: ModelFamily
    pair: Callable[[], tuple[nn.Module, nn.Module]]
    inputs: Callable[[], dict[str, Tensor]]
    reference_forward: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    keys_from_diffusers: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    text_encoders: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)


FAMILIES = {
    "flux": Family(ModelFamily.FLUX, flux_pair, flux_inputs, flux_reference_forward, flux_keys_from_diffusers,
                   {"clip_l": lambda: CLIPTextEncoder(CLIP_L), "t5xxl": lambda: T5Encoder(T5)}),
    "sd3": Family(ModelFamily.SD3, mmdit_pair, mmdit_inputs, mmdit_reference_forward, mmdit_keys_from_diffusers,
                  {"clip_l": lambda: CLIPTextEncoder(CLIP_L), "clip_g": lambda: CLIPTextEncoder(CLIP_G),
                   "t5xxl": lambda: T5Encoder(T5)}),
}


def randomized(module: nn.Module, seed: int) -> nn.Module:
    return randomize_(module, seed=seed)


# --------------------------------------------------------------------------- LoRA files written here


def factors(shape: tuple[int, ...], seed: int, rank: int = RANK) -> tuple[Tensor, Tensor]:
    """Random (down, up) for a layer whose weight has ``shape`` (out, in) or (out, in, kh, kw)."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=generator) / 4
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=generator) / 4
    return down, up


@dataclass(frozen=True)
class Expect:
    """What one module of a file must do: add scale * up @ down to ``rows`` of ``param`` of ``target``,
    halves exchanged when ``swap`` (diffusers' (scale, shift) adaLN order)."""

    module: str  # the module's name in the file
    target: str
    param: str
    rows: tuple[int, int] | None
    down: Tensor
    up: Tensor
    scale: float
    swap: bool = False

    def product(self) -> Tensor:
        product = self.up.flatten(1) @ self.down.flatten(1)
        if self.swap:
            half = product.shape[0] // 2
            product = torch.cat((product[half:], product[:half]))
        return self.scale * product


@dataclass
class FileSpec:
    """A LoRA file being written: its tensors, and what each of its modules must patch."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    expected: list[Expect] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def add(self, module: str, target: str, param: str, shape: tuple[int, ...], *, rows: tuple[int, int] | None = None,
            style: str = "kohya", alpha: float | None = None, swap: bool = False, matched: bool = True) -> None:
        """A module for the layer whose own weight has ``shape``; ``style``: kohya (lora_down/lora_up),
        peft (lora_A/lora_B) or xlabs (down/up)."""
        down, up = factors(shape, seed=len(self.tensors))
        down_key, up_key = {"kohya": ("lora_down.weight", "lora_up.weight"),
                            "peft": ("lora_A.weight", "lora_B.weight"), "xlabs": ("down.weight", "up.weight")}[style]
        self.tensors[f"{module}.{down_key}"] = down
        self.tensors[f"{module}.{up_key}"] = up
        if alpha is not None:
            self.tensors[f"{module}.alpha"] = torch.tensor(alpha)
        if matched:
            scale = 1.0 if alpha is None else alpha / RANK
            self.expected.append(Expect(module, target, param, rows, down, up, scale, swap))
        else:
            self.unmatched.append(module)


D_FLUX, MLP_FLUX = FLUX.hidden_size, FLUX.mlp_hidden_dim
D_MMDIT = MMDIT.hidden_size
CLIP_Q = "text_model.encoder.layers.{}.self_attn.q_proj"


def flux_files() -> dict[str, FileSpec]:
    """Flux LoRA files in each format, with the parameters and rows their modules patch."""
    d, mlp, fused = D_FLUX, MLP_FLUX, 3 * D_FLUX + MLP_FLUX
    clip, t5 = CLIP_L.width, T5.width
    files: dict[str, FileSpec] = {}

    kohya = files["kohya sd-scripts"] = FileSpec()
    kohya.add("lora_unet_double_blocks_0_img_attn_qkv", DIFFUSION_MODEL, "double_blocks.0.img_attn.qkv.weight",
              (3 * d, d), alpha=8.0)
    kohya.add("lora_unet_single_blocks_1_linear1", DIFFUSION_MODEL, "single_blocks.1.linear1.weight", (fused, d),
              alpha=2.0)
    kohya.add("lora_unet_final_layer_adaLN_modulation_1", DIFFUSION_MODEL, "final_layer.adaLN_modulation.1.weight",
              (2 * d, d))  # original names: no swap
    kohya.add("lora_unet_guidance_in_in_layer", DIFFUSION_MODEL, "guidance_in.in_layer.weight", (d, 256), alpha=4.0)
    kohya.add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "clip_l", CLIP_Q.format(0) + ".weight",
              (clip, clip), alpha=1.0)
    kohya.add("lora_te3_encoder_block_1_layer_0_SelfAttention_v", "t5xxl",
              "encoder.block.1.layer.0.SelfAttention.v.weight", (T5.inner_width, t5), alpha=4.0)
    # sd-scripts' older Flux files and OneTrainer's number T5 second.
    kohya.add("lora_te2_encoder_block_0_layer_1_DenseReluDense_wo", "t5xxl",
              "encoder.block.0.layer.1.DenseReluDense.wo.weight", (t5, T5.ff_width), alpha=4.0)

    comfy = files["ComfyUI / BFL names"] = FileSpec()
    comfy.add("diffusion_model.double_blocks.1.txt_mlp.0", DIFFUSION_MODEL, "double_blocks.1.txt_mlp.0.weight",
              (mlp, d), alpha=2.0)
    comfy.add("diffusion_model.single_blocks.0.linear2", DIFFUSION_MODEL, "single_blocks.0.linear2.weight",
              (d, d + mlp), style="peft")
    comfy.add("text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2", "clip_l",
              "text_model.encoder.layers.1.mlp.fc2.weight", (clip, CLIP_L.intermediate_size))
    comfy.add("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.o", "t5xxl",
              "encoder.block.0.layer.0.SelfAttention.o.weight", (t5, T5.inner_width))

    peft = files["diffusers / PEFT (ai-toolkit)"] = FileSpec()
    for index, layer in enumerate(("to_q", "to_k", "to_v")):
        peft.add(f"transformer.transformer_blocks.0.attn.{layer}", DIFFUSION_MODEL,
                 "double_blocks.0.img_attn.qkv.weight", (d, d), rows=(index * d, (index + 1) * d), style="peft")
    peft.add("transformer.transformer_blocks.1.attn.add_v_proj", DIFFUSION_MODEL, "double_blocks.1.txt_attn.qkv.weight",
             (d, d), rows=(2 * d, 3 * d), style="peft")
    peft.add("transformer.single_transformer_blocks.0.attn.to_k", DIFFUSION_MODEL, "single_blocks.0.linear1.weight",
             (d, d), rows=(d, 2 * d), style="peft")
    peft.add("transformer.single_transformer_blocks.0.proj_mlp", DIFFUSION_MODEL, "single_blocks.0.linear1.weight",
             (mlp, d), rows=(3 * d, fused), style="peft")
    peft.add("transformer.single_transformer_blocks.1.proj_out", DIFFUSION_MODEL, "single_blocks.1.linear2.weight",
             (d, d + mlp), style="peft")
    peft.add("transformer.norm_out.linear", DIFFUSION_MODEL, "final_layer.adaLN_modulation.1.weight", (2 * d, d),
             style="peft", swap=True)
    peft.add("transformer.time_text_embed.guidance_embedder.linear_2", DIFFUSION_MODEL, "guidance_in.out_layer.weight",
             (d, d), style="peft")
    peft.add("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "clip_l",
             "text_model.encoder.layers.0.self_attn.k_proj.weight", (clip, clip), style="peft")
    peft.add("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", "t5xxl",
             "encoder.block.0.layer.0.SelfAttention.q.weight", (T5.inner_width, t5), style="peft")

    others = files["OneTrainer / SimpleTuner LyCORIS / ai-toolkit kohya-style"] = FileSpec()
    others.add("lora_transformer_single_transformer_blocks_1_attn_to_v", DIFFUSION_MODEL,
               "single_blocks.1.linear1.weight", (d, d), rows=(2 * d, 3 * d), alpha=1.0)
    others.add("lycoris_transformer_blocks_0_ff_context_net_2", DIFFUSION_MODEL, "double_blocks.0.txt_mlp.2.weight",
               (d, mlp), alpha=2.0)
    others.add("lora_unet_single_transformer_blocks_0_attn_to_q", DIFFUSION_MODEL, "single_blocks.0.linear1.weight",
               (d, d), rows=(0, d), alpha=8.0)

    xlabs = files["XLabs"] = FileSpec()
    xlabs.add("double_blocks.0.processor.qkv_lora1", DIFFUSION_MODEL, "double_blocks.0.img_attn.qkv.weight", (3 * d, d),
              style="xlabs")
    xlabs.add("double_blocks.1.processor.proj_lora2", DIFFUSION_MODEL, "double_blocks.1.txt_attn.proj.weight", (d, d),
              style="xlabs")
    xlabs.add("single_blocks.0.processor.qkv_lora", DIFFUSION_MODEL, "single_blocks.0.linear1.weight", (3 * d, d),
              rows=(0, 3 * d), style="xlabs")
    # A single block's proj_lora adds to the block's output: no one weight to patch.
    xlabs.add("single_blocks.1.processor.proj_lora", DIFFUSION_MODEL, "", (d, d), style="xlabs", matched=False)
    return files


def mmdit_files() -> dict[str, FileSpec]:
    d, qkv = D_MMDIT, 3 * D_MMDIT
    p, channels = MMDIT.patch_size, MMDIT.in_channels
    files: dict[str, FileSpec] = {}

    kohya = files["kohya sd-scripts"] = FileSpec()
    kohya.add("lora_unet_joint_blocks_0_x_block_attn_qkv", DIFFUSION_MODEL, "joint_blocks.0.x_block.attn.qkv.weight",
              (qkv, d), alpha=8.0)
    kohya.add("lora_unet_joint_blocks_0_x_block_attn2_proj", DIFFUSION_MODEL,
              "joint_blocks.0.x_block.attn2.proj.weight", (d, d), alpha=2.0)
    # The pre-only last block's context modulation in original names: no swap.
    kohya.add("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", DIFFUSION_MODEL,
              "joint_blocks.1.context_block.adaLN_modulation.1.weight", (2 * d, d), alpha=4.0)
    kohya.add("lora_unet_x_embedder_proj", DIFFUSION_MODEL, "x_embedder.proj.weight", (d, channels, p, p), alpha=4.0)
    kohya.add("lora_te1_" + CLIP_Q.format(1).replace(".", "_"), "clip_l", CLIP_Q.format(1) + ".weight",
              (CLIP_L.width, CLIP_L.width), alpha=2.0)
    kohya.add("lora_te2_text_model_encoder_layers_0_mlp_fc1", "clip_g", "text_model.encoder.layers.0.mlp.fc1.weight",
              (CLIP_G.intermediate_size, CLIP_G.width), alpha=2.0)
    kohya.add("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", "t5xxl",
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", (T5.ff_width, T5.width), alpha=2.0)

    peft = files["diffusers / PEFT"] = FileSpec()
    peft.add("transformer.transformer_blocks.0.attn.add_k_proj", DIFFUSION_MODEL,
             "joint_blocks.0.context_block.attn.qkv.weight", (d, d), rows=(d, 2 * d), style="peft")
    peft.add("transformer.transformer_blocks.0.attn2.to_v", DIFFUSION_MODEL, "joint_blocks.0.x_block.attn2.qkv.weight",
             (d, d), rows=(2 * d, qkv), style="peft")
    peft.add("transformer.transformer_blocks.0.norm1_context.linear", DIFFUSION_MODEL,
             "joint_blocks.0.context_block.adaLN_modulation.1.weight", (6 * d, d), style="peft")
    peft.add("transformer.transformer_blocks.1.norm1_context.linear", DIFFUSION_MODEL,
             "joint_blocks.1.context_block.adaLN_modulation.1.weight", (2 * d, d), style="peft", swap=True)
    peft.add("transformer.norm_out.linear", DIFFUSION_MODEL, "final_layer.adaLN_modulation.1.weight", (2 * d, d),
             style="peft", swap=True)
    peft.add("transformer.pos_embed.proj", DIFFUSION_MODEL, "x_embedder.proj.weight", (d, channels, p, p), style="peft")
    peft.add("base_model.model.transformer_blocks.1.attn.to_q", DIFFUSION_MODEL,
             "joint_blocks.1.x_block.attn.qkv.weight", (d, d), rows=(0, d), style="peft")
    peft.add("text_encoder.text_model.encoder.layers.0.mlp.fc2", "clip_l", "text_model.encoder.layers.0.mlp.fc2.weight",
             (CLIP_L.width, CLIP_L.intermediate_size), style="peft")
    peft.add("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj", "clip_g",
             "text_model.encoder.layers.1.self_attn.v_proj.weight", (CLIP_G.width, CLIP_G.width), style="peft")
    peft.add("text_encoder_3.encoder.block.1.layer.0.SelfAttention.k", "t5xxl",
             "encoder.block.1.layer.0.SelfAttention.k.weight", (T5.inner_width, T5.width), style="peft")

    comfy = files["ComfyUI / SAI names"] = FileSpec()
    comfy.add("diffusion_model.joint_blocks.1.x_block.mlp.fc2", DIFFUSION_MODEL,
              "joint_blocks.1.x_block.mlp.fc2.weight", (d, 4 * d), alpha=2.0)
    comfy.add("lora_transformer_transformer_blocks_1_attn_to_v", DIFFUSION_MODEL,
              "joint_blocks.1.x_block.attn.qkv.weight", (d, d), rows=(2 * d, qkv), alpha=1.0)
    comfy.add("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj", "clip_g",
              "text_model.encoder.layers.0.self_attn.out_proj.weight", (CLIP_G.width, CLIP_G.width))
    return files


FILES = {"flux": flux_files, "sd3": mmdit_files}
CASES = [(family, name) for family, files in FILES.items() for name in files()]


# --------------------------------------------------------------------------- (1) each format


def merged_by_hand(module: nn.Module, expected: list[Expect], target: str, strength: float) -> dict[str, Tensor]:
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    for entry in expected:
        if entry.target != target:
            continue
        weight = state[entry.param]
        rows = slice(None) if entry.rows is None else slice(*entry.rows)
        weight[rows] += strength * entry.product().reshape(weight[rows].shape)
    return state


def max_difference(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> float:
    return max((actual[name].float() - tensor.float()).abs().max().item() for name, tensor in expected.items())


@pytest.mark.parametrize("family_name, format_name", CASES)
@torch.no_grad()
def test_each_format_patches_the_rows_and_parameters_it_names(family_name: str, format_name: str) -> None:
    family = FAMILIES[family_name]
    spec = FILES[family_name]()[format_name]
    _, network = family.pair()
    parts: dict[str, nn.Module] = {DIFFUSION_MODEL: network}
    parts |= {slot: randomized(make(), seed=i + 1) for i, (slot, make) in enumerate(family.text_encoders.items())}
    lora = LoraFile.from_state_dict(spec.tensors, f"{format_name}.safetensors")
    match = match_lora(lora, family.family, {target: module.state_dict() for target, module in parts.items()})

    assert sorted(match.unmatched) == sorted(spec.unmatched)
    assert sorted(match.used) == sorted(entry.module for entry in spec.expected)
    for target, module in parts.items():
        wanted = {entry.param for entry in spec.expected if entry.target == target}
        assert set(match.deltas[target]) == wanted, target
    strength = 0.75
    before = {target: {k: v.clone() for k, v in module.state_dict().items()} for target, module in parts.items()}
    for target, module in parts.items():
        expected = merged_by_hand(module, spec.expected, target, strength)
        with patched(module, WeightPatches().plus(match.deltas[target], strength)):
            assert max_difference(module.state_dict(), expected) <= WEIGHT_TOL, target
            if target == DIFFUSION_MODEL:
                patched_output = module(**family.inputs())
        restored = module.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in before[target].items()), "not restored bit for bit"
        if target == DIFFUSION_MODEL:
            merged = type(module)(module.config).eval()
            merged.load_state_dict(expected)
            assert (patched_output - merged(**family.inputs())).abs().max().item() <= SAME_WEIGHTS_OUTPUT_TOL


def test_fused_q_k_v_modules_become_one_delta_on_their_rows() -> None:
    spec = flux_files()["diffusers / PEFT (ai-toolkit)"]
    _, network = flux_pair()
    deltas, unmatched = transformer_deltas(LoraFile.from_state_dict(spec.tensors), "flux", DIFFUSION_MODEL,
                                           network.state_dict())
    qkv = deltas["double_blocks.0.img_attn.qkv.weight"]
    assert isinstance(qkv, FusedLoraDelta)
    assert [start for start, _ in qkv.parts] == [0, D_FLUX, 2 * D_FLUX]
    assert qkv.sources == tuple(f"transformer.transformer_blocks.0.attn.{layer}" for layer in ("to_q", "to_k", "to_v"))
    linear1 = deltas["single_blocks.0.linear1.weight"].tensor((3 * D_FLUX + MLP_FLUX, D_FLUX))
    assert not linear1[: D_FLUX].any() and not linear1[2 * D_FLUX: 3 * D_FLUX].any()  # q and v untouched
    assert linear1[D_FLUX: 2 * D_FLUX].any() and linear1[3 * D_FLUX:].any()
    assert unmatched == [] and len(deltas) == 6  # 9 denoiser modules on 6 weights


# --------------------------------------------------------------------------- (2), (3) against diffusers


def every_layer_lora(reference: nn.Module, seed: int) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """A PEFT LoRA (``transformer.<module>.lora_A/B.weight``) on every linear and conv layer of a
    diffusers transformer; and module -> (down, up)."""
    layers = {name: module for name, module in reference.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    lora: dict[str, Tensor] = {}
    by_module: dict[str, tuple[Tensor, Tensor]] = {}
    for index, (name, layer) in enumerate(layers.items()):
        down, up = factors(tuple(layer.weight.shape), seed=seed + index)
        lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"] = down, up
        by_module[name] = (down, up)
    return lora, by_module


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@torch.no_grad()
def test_peft_lora_on_every_diffusers_layer_equals_merging_it_into_diffusers_weights(family_name: str) -> None:
    family = FAMILIES[family_name]
    reference, network = family.pair()
    lora, by_module = every_layer_lora(reference, seed=100)
    merged = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    for module, (down, up) in by_module.items():
        weight = merged[f"{module}.weight"]
        weight += (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)  # PEFT without alpha: scale 1
    expected = family.keys_from_diffusers(merged)  # the networks' own diffusers -> original mapping

    match = match_lora(LoraFile.from_state_dict(lora), family.family, {DIFFUSION_MODEL: network.state_dict()})
    assert match.unmatched == () and len(match.used) == len(by_module)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    touched = set(match.deltas[DIFFUSION_MODEL])
    with patched(network, [(match.deltas[DIFFUSION_MODEL], 1.0)]):
        assert max_difference(network.state_dict(), expected) <= WEIGHT_TOL
        ours = network(**family.inputs())
    assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items())
    assert touched == {name for name in expected if not torch.equal(expected[name], before[name])}

    reference.load_state_dict(merged)
    theirs = family.reference_forward(reference, family.inputs())
    assert (ours - theirs).abs().max().item() <= OUTPUT_TOL


PEFT_TARGETS = {
    # module name endings peft matches, covering fused q/k/v, Flux's proj_mlp and the swapped adaLN
    "flux": ["to_q", "to_k", "to_v", "add_v_proj", "proj_mlp", "norm_out.linear", "proj_out", "ff.net.2",
             "norm1_context.linear", "x_embedder"],
    "sd3": ["to_q", "to_k", "to_v", "add_k_proj", "norm1_context.linear", "norm_out.linear", "to_add_out",
            "ff_context.net.0.proj", "context_embedder"],
}


@pytest.mark.parametrize("family_name, rslora", [("flux", False), ("sd3", True)])
@torch.no_grad()
def test_lora_saved_by_diffusers_gives_diffusers_output_with_the_adapter(
    family_name: str, rslora: bool, tmp_path
) -> None:
    """peft adds the adapter (alpha 8 on rank 4, another alpha and rank for some layers, rsLoRA for
    SD3), diffusers' pipeline class saves it with its config in the header, we read the file."""
    pytest.importorskip("peft", reason="peft is needed to load a LoRA into diffusers' model")
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = FAMILIES[family_name]
    reference, network = family.pair()
    special = "proj_mlp" if family_name == "flux" else "add_k_proj"
    reference.add_adapter(LoraConfig(
        r=RANK, lora_alpha=8, target_modules=PEFT_TARGETS[family_name], init_lora_weights=False,
        rank_pattern={special: 2}, alpha_pattern={special: 6}, use_rslora=rslora,
    ))
    generator = torch.Generator().manual_seed(7)
    for name, param in reference.named_parameters():
        if ".lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) / 4)
    pipeline = FluxPipeline if family_name == "flux" else StableDiffusion3Pipeline
    pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(reference),
        transformer_lora_adapter_metadata=reference.peft_config["default"].to_dict(), weight_name="lora.safetensors",
    )
    lora = load_lora(tmp_path / "lora.safetensors")
    match = match_lora(lora, family.family, {DIFFUSION_MODEL: network.state_dict()})
    assert match.unmatched == () and match.used

    theirs = family.reference_forward(reference, family.inputs())
    reference.disable_adapters()
    base = family.reference_forward(reference, family.inputs())
    with patched(network, [(match.deltas[DIFFUSION_MODEL], 1.0)]):
        ours = network(**family.inputs())
    assert (ours - theirs).abs().max().item() <= OUTPUT_TOL
    assert (base - theirs).abs().max().item() > 100 * OUTPUT_TOL  # the adapter changes the output


def test_peft_header_alpha_pattern_and_rslora_set_the_scale() -> None:
    down, up = factors((6, 5), seed=0)
    tensors = {f"transformer.{name}.lora_{role}.weight": tensor
               for name in ("blocks.0.to_q", "blocks.0.proj_mlp") for role, tensor in (("A", down), ("B", up))}
    config = {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"proj_mlp": 2}}
    scales = {source: module.delta.scale for source, module in LoraFile.from_state_dict(
        tensors, metadata={"lora_adapter_metadata": json.dumps(config)}).modules.items()}
    assert scales == {"transformer.blocks.0.to_q": 8 / RANK, "transformer.blocks.0.proj_mlp": 2 / RANK}
    config["transformer.use_rslora"] = True
    rslora = LoraFile.from_state_dict(tensors, metadata={"lora_adapter_metadata": json.dumps(config)})
    assert rslora.modules["transformer.blocks.0.to_q"].delta.scale == pytest.approx(8 / RANK**0.5)
    plain = LoraFile.from_state_dict(tensors)  # no header: diffusers' convention, scale 1
    assert {module.delta.scale for module in plain.modules.values()} == {1.0}
    with pytest.raises(LoraFormatError, match="lora_adapter_metadata"):
        LoraFile.from_state_dict(tensors, "bad.safetensors", metadata={"lora_adapter_metadata": "{not json"})


# --------------------------------------------------------------------------- unmatched, conflicts, families


@torch.no_grad()
def test_modules_that_match_nothing_are_reported_by_name() -> None:
    _, network = flux_pair()
    spec = FileSpec()
    spec.add("lora_unet_double_blocks_0_img_attn_proj", DIFFUSION_MODEL, "double_blocks.0.img_attn.proj.weight",
             (D_FLUX, D_FLUX))
    spec.add("transformer.transformer_blocks.5.attn.to_q", DIFFUSION_MODEL, "", (D_FLUX, D_FLUX), style="peft",
             matched=False)  # no block 5
    spec.add("lora_unet_double_blocks_0_img_attn_rotary", DIFFUSION_MODEL, "", (D_FLUX, D_FLUX), matched=False)
    spec.add("lora_unet_img_in", DIFFUSION_MODEL, "", (D_FLUX, 7), matched=False)  # img_in takes 16 inputs
    # Flux has no CLIP-G: its te2 is T5.
    spec.add("lora_te2_text_model_encoder_layers_0_mlp_fc1", "clip_g", "", (96, 48), matched=False)
    spec.add("lora_te1_text_model_encoder_layers_0_mlp_fc1", "clip_l", "", (64, 32), matched=False)  # no clip given
    match = match_lora(LoraFile.from_state_dict(spec.tensors), "flux", {DIFFUSION_MODEL: network.state_dict()})
    assert match.used == ("lora_unet_double_blocks_0_img_attn_proj",)
    assert sorted(match.unmatched) == sorted(spec.unmatched)


def test_two_modules_on_the_same_rows_are_refused_by_name() -> None:
    _, network = flux_pair()
    spec = FileSpec()
    spec.add("lora_unet_double_blocks_0_img_attn_qkv", DIFFUSION_MODEL, "", (3 * D_FLUX, D_FLUX))
    spec.add("transformer.transformer_blocks.0.attn.to_k", DIFFUSION_MODEL, "", (D_FLUX, D_FLUX), style="peft")
    with pytest.raises(LoraFormatError, match="lora_unet_double_blocks_0_img_attn_qkv.*to_k"):
        match_lora(LoraFile.from_state_dict(spec.tensors, "twice.safetensors"), "flux",
                   {DIFFUSION_MODEL: network.state_dict()})


def test_unknown_family_or_target_is_refused() -> None:
    assert TRANSFORMER_FAMILIES == {ModelFamily.SD3, ModelFamily.FLUX, ModelFamily.FLUX_SCHNELL}
    lora = LoraFile.from_state_dict(flux_files()["kohya sd-scripts"].tensors)
    with pytest.raises(ValueError, match="not a transformer family"):
        transformer_deltas(lora, ModelFamily.SDXL, "unet", {})
    with pytest.raises(ValueError, match="no LoRA target 'clip_g'"):
        transformer_deltas(lora, "flux_schnell", "clip_g", {})


@pytest.mark.parametrize("family_name, format_name, family", [
    ("flux", "kohya sd-scripts", "flux"),  # CLIP-L as te1 beside double blocks is Flux, not SDXL
    ("flux", "XLabs", "flux"),
    ("flux", "OneTrainer / SimpleTuner LyCORIS / ai-toolkit kohya-style", "flux"),
    ("sd3", "kohya sd-scripts", "sd3"),
    ("sd3", "diffusers / PEFT", None),  # transformer_blocks: SD3 or Flux
])
def test_family_from_module_names(family_name: str, format_name: str, family: str | None) -> None:
    assert LoraFile.from_state_dict(FILES[family_name]()[format_name].tensors).family == family


@pytest.mark.parametrize("metadata, family", [
    ({"ss_base_model_version": "flux1"}, "flux"), ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"modelspec.architecture": "stable-diffusion-3.5-large/lora"}, "sd3"),
    ({"ss_base_model_version": "flux2_klein_4b"}, "flux2"), ({"modelspec.architecture": "flux.2-dev/lora"}, "flux2"),
])
def test_family_from_metadata(metadata: dict[str, str], family: str) -> None:
    spec = mmdit_files()["diffusers / PEFT"]
    assert LoraFile.from_state_dict(spec.tensors, metadata=metadata).family == family


def test_files_on_disk_in_each_format_load(tmp_path) -> None:
    for family_name, files in FILES.items():
        for index, spec in enumerate(files().values()):
            path = tmp_path / f"{family_name}{index}.safetensors"
            save_file({k: v.contiguous() for k, v in spec.tensors.items()}, str(path))
            assert sorted(load_lora(path).module_names) == sorted(
                [entry.module for entry in spec.expected] + spec.unmatched)


# --------------------------------------------------------------------------- fp8 storage


@torch.no_grad()
def test_fused_deltas_on_fp8_storage_equal_the_float32_model() -> None:
    """A Flux kept in float8 and upcast per layer (weights.storage.compute_in) takes the same fused
    deltas as its float32 upcast, without its stored bits changing."""
    _, network = flux_pair()
    stored = Flux(FLUX).eval()
    stored.load_state_dict(network.state_dict())
    for param in stored.parameters():
        param.data = param.data.to(torch.float8_e4m3fn)
    upcast = Flux(FLUX).eval()
    upcast.load_state_dict({k: v.float() for k, v in stored.state_dict().items()})
    compute_in(stored, torch.float32)
    spec = flux_files()["diffusers / PEFT (ai-toolkit)"]
    deltas = match_lora(LoraFile.from_state_dict(spec.tensors), "flux", {DIFFUSION_MODEL: stored.state_dict()}).deltas
    bits = {k: v.clone() for k, v in stored.state_dict().items()}
    with patched(stored, [(deltas[DIFFUSION_MODEL], 0.5)]), patched(upcast, [(deltas[DIFFUSION_MODEL], 0.5)]):
        assert stored.state_dict()["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
        difference = (stored(**flux_inputs()) - upcast(**flux_inputs())).abs().max().item()
    assert difference <= SAME_WEIGHTS_OUTPUT_TOL
    assert all(torch.equal(stored.state_dict()[k].view(torch.uint8), v.view(torch.uint8)) for k, v in bits.items()
               if v.dtype == torch.float8_e4m3fn)
