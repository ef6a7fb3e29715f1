"""End-to-end parity of SD3/SD3.5 and Flux.1-dev graphs with diffusers' pipelines.

Tiny diffusers components with random values in every parameter (SD3Transformer2DModel with and
without RMS qk-norm + dual attention, FluxTransformer2DModel with guidance, a 16-channel
AutoencoderKL, CLIP-L/G, T5) are written as ONE single file in the original key layout (the
network through our diffusers -> original mappings, the VAE in LDM names, the text encoders in
transformers naming under ``text_encoders.<slot>.transformer.``), as Stability's and ComfyUI's
files are. A ComfyUI API-format graph, imported as a user's file is, loads that file and samples;
diffusers' StableDiffusion3Pipeline / FluxPipeline run the same modules on the same start noise.
The decoded images must agree within 3/255 at every pixel and 1/255 on average, at a square and a
non-square size; the stages in between (prompt states, pooled vectors, sigmas, final latent) are
compared as well so that a failure says where the two diverge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import prefixed, write_safetensors
from _hf_tokenizers import clip_tokenizer, t5_tokenizer
from _pipeline_fixtures import folder_executor
from _random_weights import randomize_
from _transformer_fixtures import (
    CLIP_G,
    CLIP_L,
    FLUX_DEV,
    SD3,
    SD35,
    T5,
    TEXT_ENCODER_PREFIX,
    VAE16,
)
from nodegraph_diffusion.components import NoiseSource
from nodegraph_diffusion.networks import flux as flux_module
from nodegraph_diffusion.networks import mmdit as mmdit_module
from nodegraph_diffusion.nodes import comfyui
from nodegraph_diffusion.nodes.sampling import schedule_sigmas
from nodegraph_diffusion.text.clip import TextEncoderConfig
from nodegraph_diffusion.vae import autoencoder as vae_module
from torch import Tensor, nn

from nodegraph.executor import Executor

pytestmark = [pytest.mark.slow, pytest.mark.parity]

API = comfyui.IMPORTERS[0]
PROMPT = "a red circle on a blue background"
# The acceptance bounds on images in [0, 1].
MAX_ERROR, MEAN_ERROR = 3 / 255, 1 / 255
# Prompt states and pooled vectors go through the same float32 maths on both sides.
TEXT_TOL = 1e-4
# Latent scaling and shift of the 16-channel VAEs (the diffusers repos' vae/config.json).
VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
# T5 pad length in the graph (ComfyUI's choice, components.T5_LENGTH_BY_FAMILY); diffusers takes it
# as max_sequence_length.
T5_LENGTH = {"sd3": 77, "flux": 256}
CLIP_BOS, CLIP_EOS = 49406, 49407


# --------------------------------------------------------------------------- diffusers components


def _clip_config(config: TextEncoderConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=config.vocab_size, hidden_size=config.width,
                          intermediate_size=config.intermediate_size, num_hidden_layers=config.layers,
                          num_attention_heads=config.heads, max_position_embeddings=config.max_positions,
                          hidden_act=config.activation, projection_dim=config.projection_dim or config.width,
                          bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS, attention_dropout=0.0)


def clip_with_projection(config: TextEncoderConfig, seed: int) -> nn.Module:
    """CLIPTextModelWithProjection (SD3's CLIP-L and CLIP-G: projected pooled output)."""
    from transformers import CLIPTextModelWithProjection

    return randomize_(CLIPTextModelWithProjection(_clip_config(config)), seed)


def clip_without_projection(config: TextEncoderConfig, seed: int) -> nn.Module:
    """CLIPTextModel (Flux's CLIP-L: unprojected pooled output)."""
    from transformers import CLIPTextModel

    return randomize_(CLIPTextModel(_clip_config(config)), seed)


def t5_encoder(seed: int) -> nn.Module:
    """T5EncoderModel in the T5 v1.1 form (gated GELU, no biases, relative position buckets)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=T5.vocab_size, d_model=T5.width, d_kv=T5.head_dim, d_ff=T5.ff_width,
                      num_layers=T5.layers, num_heads=T5.heads, relative_attention_num_buckets=T5.relative_buckets,
                      relative_attention_max_distance=T5.relative_max_distance, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=T5.norm_eps, dropout_rate=0.0, is_encoder_decoder=False)
    return randomize_(T5EncoderModel(config), seed)


def sd3_transformer(config: mmdit_module.MMDiTConfig, seed: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=2 * config.pos_embed_max_size, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim, out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.dual_attention_layers,
        qk_norm="rms_norm" if config.qk_norm else None)
    randomize_(model, seed)
    # The position table is a buffer; random values (stored in the file) catch a wrong crop.
    generator = torch.Generator().manual_seed(seed + 1)
    model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=generator))
    return model


def flux_transformer(config: flux_module.FluxConfig, seed: int) -> nn.Module:
    """FluxTransformer2DModel with the rotary split the loader assumes for a single file (which cannot
    record it): networks.flux.default_axes_dim of the head width."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=config.packed_in_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embed,
        axes_dims_rope=flux_module.default_axes_dim(config.head_dim))
    return randomize_(model, seed)


def vae16(family: str, seed: int) -> nn.Module:
    """The 16-channel AutoencoderKL of SD3/Flux (no quant convs) with the family's latent scaling."""
    from diffusers import AutoencoderKL

    levels = len(VAE16.ch_mult)
    scaling, shift = VAE_SCALING[family]
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=VAE16.block_channels,
        layers_per_block=VAE16.num_res_blocks, latent_channels=VAE16.latent_channels, norm_num_groups=VAE16.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift)
    return randomize_(model, seed)


@dataclass
class Components:
    """One model's diffusers components (what the pipeline is built from) and its single file's name."""

    family: str  # "sd3" or "flux"
    file_name: str
    transformer: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module] = field(default_factory=dict)  # slot -> transformers model


def _transformers_state(module: nn.Module) -> dict[str, Tensor]:
    """A transformers text model's weights under the names single files use (transformers 5 drops
    CLIPTextModel's ``text_model.`` level, which the files keep)."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if module.__class__.__name__ == "CLIPTextModel" and not any(k.startswith("text_model.") for k in state):
        state = prefixed("text_model.", state)
    return state


def _ldm_vae_state(vae: nn.Module) -> dict[str, Tensor]:
    state = vae_module.ldm_vae_keys_from_diffusers(vae.state_dict())
    for key in list(state):  # LDM files keep the mid attention projections as 1x1 convs
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            state[key] = state[key][:, :, None, None]
    return state


def single_file(components: Components) -> dict[str, Tensor]:
    """The components in the original single-file layout: SD3 as Stability ships
    sd3_medium_incl_clips_t5 (``first_stage_model.``), Flux as ComfyUI saves an all-in-one file (``vae.``)."""
    diffusers_state = components.transformer.state_dict()
    if components.family == "sd3":
        network, vae_prefix = mmdit_module.mmdit_keys_from_diffusers(diffusers_state), "first_stage_model."
    else:
        network, vae_prefix = flux_module.flux_keys_from_diffusers(diffusers_state), "vae."
    weights = prefixed("model.diffusion_model.", {k: v.detach().clone() for k, v in network.items()})
    weights |= prefixed(vae_prefix, _ldm_vae_state(components.vae))
    for slot, encoder in components.text_encoders.items():
        weights |= prefixed(TEXT_ENCODER_PREFIX.format(slot=slot), _transformers_state(encoder))
    return weights


def sd3_components(config: mmdit_module.MMDiTConfig, file_name: str, seed: int) -> Components:
    return Components("sd3", file_name, sd3_transformer(config, seed), vae16("sd3", seed + 1), {
        "clip_l": clip_with_projection(CLIP_L, seed + 2), "clip_g": clip_with_projection(CLIP_G, seed + 3),
        "t5xxl": t5_encoder(seed + 4)})


def flux_components(config: flux_module.FluxConfig, file_name: str, seed: int) -> Components:
    return Components("flux", file_name, flux_transformer(config, seed), vae16("flux", seed + 1), {
        "clip_l": clip_without_projection(CLIP_L, seed + 2), "t5xxl": t5_encoder(seed + 3)})


MODELS = {
    "sd3": lambda: sd3_components(SD3, "sd3_parity.safetensors", 100),
    "sd35": lambda: sd3_components(SD35, "sd35_parity.safetensors", 200),
    "flux_dev": lambda: flux_components(FLUX_DEV, "flux_dev_parity.safetensors", 300),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Components]]:
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    built = {name: make() for name, make in MODELS.items()}
    for components in built.values():
        write_safetensors(root / "checkpoints" / components.file_name, single_file(components), dtype=None)
    return root, built


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"clip_l": clip_tokenizer(folder / "clip_l"), "clip_g": clip_tokenizer(folder / "clip_g", pad_token="!"),
            "t5xxl": t5_tokenizer(folder / "t5")}


@pytest.fixture(scope="module")
def executor(models, tmp_path_factory: pytest.TempPathFactory):
    """One executor for the module, so each file loads once (as in a long-running server)."""
    root, _ = models
    with folder_executor(root, tmp_path_factory.mktemp("out")) as executor:
        yield executor


# --------------------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class Case:
    model: str  # a MODELS key
    width: int
    height: int
    sampler: str = "euler"
    steps: int = 4
    seed: int = 7

    @property
    def id(self) -> str:
        return f"{self.model}-{self.sampler}-{self.width}x{self.height}"


CASES = [
    Case("sd3", 64, 64, steps=6),
    Case("sd3", 48, 80, steps=6),
    Case("sd35", 64, 64, steps=6),
    Case("sd35", 80, 48, steps=6),
    # ComfyUI's "lcm" sampler is the flow-matching Euler step with fresh noise (FlowMatchEulerDiscreteScheduler's
    # stochastic_sampling); both draw one latent-shaped noise per step.
    Case("sd3", 48, 80, sampler="lcm", steps=6),
    # No stochastic Flux case: FluxPipeline's scheduler draws its step noise in the packed token layout
    # (1, tokens, 64), the graph's samplers in the latent layout (1, 16, h, w), so the draws cannot agree.
    Case("flux_dev", 64, 64),
    Case("flux_dev", 48, 80),
    Case("flux_dev", 80, 112, steps=8),
]

SD3_CFG, FLUX_GUIDANCE = 7.0, 3.5


def sd3_graph(case: Case, file_name: str) -> dict:
    """SD3 as ComfyUI's example builds it: checkpoint with text encoders, ModelSamplingSD3, KSampler with cfg."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": case.width, "height": case.height,
                                                              "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": case.seed, "steps": case.steps, "cfg": SD3_CFG, "sampler_name": case.sampler,
            "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sd3_parity"}},
    }


def flux_graph(case: Case, file_name: str) -> dict:
    """Flux.1-dev as ComfyUI's example builds it: FluxGuidance, ModelSamplingFlux for the image size,
    BasicGuider (no CFG), RandomNoise and SamplerCustomAdvanced."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": FLUX_GUIDANCE}},
        "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                            "width": case.width, "height": case.height}},
        "5": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["3", 0]}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": case.seed, "control_after_generate": "fixed"}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": case.sampler}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": case.steps,
                                                         "denoise": 1.0}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": case.width, "height": case.height,
                                                              "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["5", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "flux_parity"}},
    }


@dataclass
class Side:
    """What one side produced, stage by stage (latents (1, 16, h, w), image (1, 3, H, W) in [0, 1])."""

    context: Tensor
    pooled: Tensor
    sigmas: Tensor
    latent: Tensor
    image: Tensor
    negative_context: Tensor | None = None
    negative_pooled: Tensor | None = None


def run_graph(executor: Executor, case: Case, components: Components) -> Side:
    """Import the ComfyUI graph as a user's file is imported and run it to its SaveImage."""
    sd3 = components.family == "sd3"
    graph = (sd3_graph if sd3 else flux_graph)(case, components.file_name)
    save, decode, sampled = ("8", "7", "6") if sd3 else ("12", "11", "10")
    result = executor.run(API.convert(graph), outputs=[save, decode])
    assert result.status == "succeeded", result.error
    assert any(f.endswith(".png") for f in result.files), result.files

    def out(node: str, name: str):
        return getattr(result.results[node].outputs, name)

    positive = out("3", "conditioning")[0]
    assert len(out("3", "conditioning")) == 1
    if sd3:
        negative = out("4", "conditioning")[0]
        sigmas = schedule_sigmas(out("2", "model"), "normal", case.steps)
    else:
        assert positive.guidance == FLUX_GUIDANCE
        negative = None
        sigmas = out("8", "sigmas")
    return Side(context=positive.context, pooled=positive.pooled, sigmas=sigmas,
                latent=out(sampled, "latent").samples, image=out(decode, "image").permute(0, 3, 1, 2),
                negative_context=None if negative is None else negative.context,
                negative_pooled=None if negative is None else negative.pooled)


def start_noise(case: Case) -> tuple[Tensor, torch.Generator]:
    """The graph's start noise (RandomNoise / KSampler: components.NoiseSource) for this case's latent,
    and the generator its stochastic samplers draw from."""
    source = NoiseSource(case.seed)
    shape = (1, VAE16.latent_channels, case.height // VAE16.downscale_factor, case.width // VAE16.downscale_factor)
    return source.generate(shape), source.sampler_generator()


def run_pipeline(case: Case, components: Components, tokenizers: dict[str, object]) -> Side:
    """The same modules through diffusers' pipeline on the same start noise."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )

    noise, sampler_generator = start_noise(case)
    latents: list[Tensor] = []

    def keep_latents(pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    common = {"height": case.height, "width": case.width, "num_inference_steps": case.steps, "output_type": "pt",
              "callback_on_step_end": keep_latents, "callback_on_step_end_tensor_inputs": ["latents"],
              "max_sequence_length": T5_LENGTH[components.family]}
    encoders = components.text_encoders
    if components.family == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                    stochastic_sampling=case.sampler == "lcm")
        pipe = StableDiffusion3Pipeline(
            transformer=components.transformer, scheduler=scheduler, vae=components.vae,
            text_encoder=encoders["clip_l"], tokenizer=tokenizers["clip_l"], text_encoder_2=encoders["clip_g"],
            tokenizer_2=tokenizers["clip_g"], text_encoder_3=encoders["t5xxl"], tokenizer_3=tokenizers["t5xxl"])
        with torch.no_grad():
            context, negative_context, pooled, negative_pooled = pipe.encode_prompt(
                PROMPT, PROMPT, PROMPT, negative_prompt="", do_classifier_free_guidance=True,
                max_sequence_length=T5_LENGTH["sd3"])
        # The pipeline hands the scheduler no generator: its stochastic step draws from torch's global
        # generator, which is set to the state the graph's sampler generator starts from.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(sampler_generator.get_state())
            image = pipe(PROMPT, negative_prompt="", guidance_scale=SD3_CFG, latents=noise.clone(), **common).images
        final = latents[-1]
    else:
        assert case.sampler == "euler", "FluxPipeline draws noise in its packed layout: only Euler compares"
        # FLUX.1-dev's scheduler config: the shift follows the image's token count (mu).
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=components.vae, text_encoder=encoders["clip_l"],
                            tokenizer=tokenizers["clip_l"], text_encoder_2=encoders["t5xxl"],
                            tokenizer_2=tokenizers["t5xxl"], transformer=components.transformer)
        with torch.no_grad():
            context, pooled, _ = pipe.encode_prompt(PROMPT, max_sequence_length=T5_LENGTH["flux"])
        negative_context = negative_pooled = None
        packed = FluxPipeline._pack_latents(noise.clone(), *noise.shape)
        image = pipe(PROMPT, guidance_scale=FLUX_GUIDANCE, latents=packed, **common).images
        final = FluxPipeline._unpack_latents(latents[-1], case.height, case.width, pipe.vae_scale_factor)
    assert len(latents) == case.steps
    return Side(context=context, pooled=pooled, sigmas=pipe.scheduler.sigmas, latent=final, image=image,
                negative_context=negative_context, negative_pooled=negative_pooled)


def stage_errors(ours: Side, reference: Side) -> dict[str, float]:
    """Max abs difference per stage, in pipeline order (where the two first part is where to look)."""
    errors = {}
    for stage in ("context", "pooled", "negative_context", "negative_pooled", "sigmas", "latent", "image"):
        a, b = getattr(ours, stage), getattr(reference, stage)
        if a is None and b is None:
            continue
        assert a.shape == b.shape, f"{stage}: graph {tuple(a.shape)} vs diffusers {tuple(b.shape)}"
        errors[stage] = (a.double() - b.double().cpu()).abs().max().item()
    return errors


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_comfyui_graph_matches_diffusers_pipeline(case: Case, models, executor, tokenizers) -> None:
    _, built = models
    components = built[case.model]
    ours = run_graph(executor, case, components)
    reference = run_pipeline(case, components, tokenizers)
    errors = stage_errors(ours, reference)
    difference = (ours.image.double() - reference.image.double()).abs()
    figures = f"{case.id}: image max {difference.max().item() * 255:.4f}/255 mean " \
              f"{difference.mean().item() * 255:.4f}/255; stages {errors}"
    print(figures)
    for stage in ("context", "pooled", "negative_context", "negative_pooled"):
        assert errors.get(stage, 0.0) <= TEXT_TOL, figures
    assert errors["sigmas"] <= 1e-6, figures
    # Same float32 maths step by step: the sampled latents differ by rounding alone (seen: <= 3.3e-4).
    assert errors["latent"] <= 2e-3, figures
    assert ours.image.std() > 0.05, figures  # a picture with content, not a flat image that would match anyway
    assert difference.max().item() <= MAX_ERROR, figures
    assert difference.mean().item() <= MEAN_ERROR, figures
