"""End-to-end parity of SD1, SD2 (v-prediction) and SDXL graphs with diffusers' pipelines.

Tiny diffusers/transformers components with random values in every parameter (UNet2DConditionModel,
a four-level AutoencoderKL, CLIPTextModel / CLIPTextModelWithProjection) are written as ONE single
file in the original LDM layout each (the U-Net and VAE through the library's diffusers -> LDM
mappings, SD1's and SDXL's CLIP-L in transformers naming, SD2's OpenCLIP-H and SDXL's OpenCLIP-bigG
in the OpenCLIP layout), as the released checkpoints are. SD2's file holds one text-encoder layer
more than diffusers' CLIPTextModel gets: SD2 conditions on the penultimate layer, which diffusers'
SD2 repos realise by dropping the last one. A ComfyUI API-format graph, imported as a user's file
is, loads the file and samples with KSampler; diffusers' StableDiffusionPipeline /
StableDiffusionXLPipeline run the same modules from the same start noise.

Schedule: diffusers' EulerDiscreteScheduler default spacing ("linspace": timesteps evenly spaced
from 999 to 0, sigma interpolated in the training table) is the graph's "normal" scheduler, and its
init_noise_sigma for that spacing is sigma_max, by which the pipeline multiplies the latents it is
given. The graph starts a full denoise as ComfyUI does, at noise x sqrt(1 + sigma_max^2) (diffusers'
own 'leading' spacing uses the same sqrt(sigma^2 + 1) as its init_noise_sigma), so the pipeline is
handed noise x sqrt(1 + sigma_max^2) / sigma_max (:func:`comfyui_start`). The step counts make the timesteps whole numbers (999 / (steps - 1) an integer),
where diffusers' interpolation (linear in sigma) and the graph's (linear in log-sigma, as ComfyUI's)
agree; between whole timesteps they differ by some 3e-5 of sigma (seen at 8, 20 and 30 steps).
Ancestral sampling: EulerAncestralDiscreteScheduler draws one latent-shaped standard normal per step
from the pipeline's generator, as the graph's sampler draws from its seed's sampler generator, so
handing the pipeline that generator aligns every draw (diffusers draws once more on the last step,
where the noise is multiplied by 0; the graph skips that draw).

The decoded images must agree within 3/255 at every pixel and 1/255 on average at a non-square
size; the stages in between (prompt states, pooled vectors, SDXL's vector conditioning as the
networks receive it, sigmas, final latent) are compared as well so that a failure says where the two
diverge. SDXL's non-square case is the size conditioning of a plain CLIPTextEncode: diffusers tells
the model original = target = (height, width), crop (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import prefixed, write_safetensors
from _hf_tokenizers import clip_tokenizer
from _random_weights import randomize_
from _transformer_fixtures import CLIP_G, CLIP_L
from _unet_fixtures import diffusers_unet
from nodegraph_diffusion.components import NoiseSource
from nodegraph_diffusion.networks import unet as unet_module
from nodegraph_diffusion.networks.unet import SDXL_VECTOR_EMBED_DIM, UNetConfig
from nodegraph_diffusion.nodes import comfyui
from nodegraph_diffusion.nodes.sampling import schedule_sigmas
from nodegraph_diffusion.text.clip import TextEncoderConfig
from test_text_encoder import openclip_from_hf
from test_transformer_pipelines import _clip_config, _ldm_vae_state, _transformers_state
from torch import Tensor, nn

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry

pytestmark = [pytest.mark.slow, pytest.mark.parity]

API = comfyui.IMPORTERS[0]
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, grey"
CFG = 7.0
# The acceptance bounds on images in [0, 1].
MAX_ERROR, MEAN_ERROR = 3 / 255, 1 / 255
# Prompt states and pooled vectors go through the same float32 maths on both sides.
TEXT_TOL = 1e-4
# SD1's and SD2's latent scaling, and SDXL's (the diffusers repos' vae/config.json).
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
LATENT_CHANNELS, VAE_LEVELS, VAE_WIDTH = 4, 4, 32
DOWNSCALE = 2 ** (VAE_LEVELS - 1)

# OpenCLIP-H's form (gelu, a projection) at CLIP-L's tiny width; SD2 conditions on its penultimate layer.
CLIP_H = TextEncoderConfig(vocab_size=CLIP_L.vocab_size, width=64, layers=3, heads=1, intermediate_size=256,
                           activation="gelu", max_positions=CLIP_L.max_positions, projection_dim=64,
                           eos_token_id=CLIP_L.eos_token_id)
SD1_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      context_dim=CLIP_L.width)
SD2_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      num_heads=None, head_dim=64, context_dim=CLIP_H.width, use_linear_projection=True)
# SDXL's form: no attention on the first level, two blocks deeper down, CLIP-L and bigG states side by
# side, y = bigG's projected pooled output + six 256-wide size embeddings.
SDXL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
                       transformer_depth_middle=2, num_heads=None, head_dim=64,
                       context_dim=CLIP_L.width + CLIP_G.width, use_linear_projection=True,
                       adm_in_channels=CLIP_G.projection_dim + 6 * SDXL_VECTOR_EMBED_DIM)


# --------------------------------------------------------------------------- diffusers components


def clip_model(config: TextEncoderConfig, seed: int, projection: bool = False) -> nn.Module:
    """transformers' CLIPTextModel (CLIPTextModelWithProjection: SDXL's bigG) with random values."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize_(model_class(_clip_config(config)), seed)


def without_last_layer(model: nn.Module, config: TextEncoderConfig) -> nn.Module:
    """The same CLIPTextModel one layer shorter (diffusers' SD2 text encoder: its last layer is SD2's
    penultimate, the final LayerNorm then applied to it)."""
    from transformers import CLIPTextModel

    shorter = CLIPTextModel(_clip_config(replace(config, layers=config.layers - 1))).eval()
    missing, unexpected = shorter.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(f"layers.{config.layers - 1}." in key for key in unexpected), (missing, unexpected)
    return shorter


def vae(family: str, seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * VAE_LEVELS, block_out_channels=(VAE_WIDTH,) * VAE_LEVELS,
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=32, scaling_factor=VAE_SCALING[family])
    return randomize_(model, seed)


@dataclass
class Components:
    """One model's diffusers components (what the pipeline is built from) and its single file's name."""

    family: str  # "sd1", "sd2" or "sdxl"
    file_name: str
    unet: nn.Module
    vae: nn.Module
    file_text_encoders: dict[str, nn.Module]  # slot -> the transformers model whose weights the file holds
    pipeline_text_encoders: list[nn.Module] = field(default_factory=list)  # text_encoder(, text_encoder_2)


def _openclip_state(model: nn.Module) -> dict[str, Tensor]:
    """A transformers CLIP model's weights in the OpenCLIP layout (SD2's and SDXL's files); a model
    without a projection (SD2's) gets a random one, as the file has it and nothing reads it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not any(k.startswith("text_model.") for k in state):
        state = prefixed("text_model.", state)
    if "text_projection.weight" not in state:
        width = state["text_model.final_layer_norm.weight"].shape[0]
        state["text_projection.weight"] = torch.randn(width, width, generator=torch.Generator().manual_seed(0))
    return openclip_from_hf(state)


def single_file(components: Components) -> dict[str, Tensor]:
    """The components as the released single files lay them out: SD1 (CLIP-L under
    cond_stage_model.transformer.), SD2 (OpenCLIP-H under cond_stage_model.model.), SDXL (CLIP-L
    under conditioner.embedders.0.transformer., OpenCLIP-bigG under conditioner.embedders.1.model.)."""
    network = unet_module.ldm_unet_keys_from_diffusers(components.unet.state_dict())
    weights = prefixed("model.diffusion_model.", {k: v.detach().clone() for k, v in network.items()})
    weights |= prefixed("first_stage_model.", _ldm_vae_state(components.vae))
    encoders = components.file_text_encoders
    if components.family == "sd1":
        weights |= prefixed("cond_stage_model.transformer.", _transformers_state(encoders["clip_l"]))
    elif components.family == "sd2":
        weights |= prefixed("cond_stage_model.model.", _openclip_state(encoders["clip_h"]))
    else:
        weights |= prefixed("conditioner.embedders.0.transformer.", _transformers_state(encoders["clip_l"]))
        weights |= prefixed("conditioner.embedders.1.model.", _openclip_state(encoders["clip_g"]))
    return weights


def sd1_components(seed: int = 400) -> Components:
    clip_l = clip_model(CLIP_L, seed + 2)
    return Components("sd1", "sd1_parity.safetensors", diffusers_unet(SD1_UNET, seed), vae("sd1", seed + 1),
                      {"clip_l": clip_l}, [clip_l])


def sd2_components(seed: int = 500) -> Components:
    clip_h = clip_model(CLIP_H, seed + 2)
    return Components("sd2", "sd2_parity.safetensors", diffusers_unet(SD2_UNET, seed), vae("sd2", seed + 1),
                      {"clip_h": clip_h}, [without_last_layer(clip_h, CLIP_H)])


def sdxl_components(seed: int = 600) -> Components:
    clip_l, clip_g = clip_model(CLIP_L, seed + 2), clip_model(CLIP_G, seed + 3, projection=True)
    return Components("sdxl", "sdxl_parity.safetensors", diffusers_unet(SDXL_UNET, seed), vae("sdxl", seed + 1),
                      {"clip_l": clip_l, "clip_g": clip_g}, [clip_l, clip_g])


MODELS = {"sd1": sd1_components, "sd2": sd2_components, "sdxl": sdxl_components}


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
    """CLIP-L's tokenizer pads with the end token, SD2's and SDXL's OpenCLIP ones with "!" (id 0)."""
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"end": clip_tokenizer(folder / "end"), "zero": clip_tokenizer(folder / "zero", pad_token="!")}


@pytest.fixture(scope="module")
def new_executor(models, tmp_path_factory: pytest.TempPathFactory):
    """Makes an executor with an empty cache: each graph runs whole, whatever ran before it (the
    SDXL runs watch the U-Net's input, which a cached result would not show)."""
    root, _ = models
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        registry, problems = build_registry()
        assert not problems, problems
        output_dir = tmp_path_factory.mktemp("out")
        yield lambda: Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu", output_dir=output_dir)


# --------------------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class Case:
    model: str  # a MODELS key
    width: int
    height: int
    sampler: str = "euler"
    steps: int = 10  # 999 / 9 = 111: whole timesteps
    seed: int = 11

    @property
    def id(self) -> str:
        return f"{self.model}-{self.sampler}-{self.width}x{self.height}"


CASES = [
    Case("sd1", 96, 64),
    Case("sd1", 64, 96, sampler="euler_ancestral"),
    Case("sd2", 64, 96),
    Case("sd2", 96, 64, sampler="euler_ancestral", steps=4),  # 999 / 3 = 333
    Case("sdxl", 96, 64),
    Case("sdxl", 64, 112, sampler="euler_ancestral"),
]


def api_graph(case: Case, file_name: str, prompt_node: str = "CLIPTextEncode") -> dict:
    """txt2img as ComfyUI's default workflow builds it; prompt_node CLIPTextEncodeSDXL tells SDXL
    1024x1024 explicitly (that node's defaults)."""

    def prompt(text: str) -> dict:
        if prompt_node == "CLIPTextEncode":
            return {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}
        return {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], "text_g": text, "text_l": text, "width": 1024, "height": 1024, "crop_w": 0,
            "crop_h": 0, "target_width": 1024, "target_height": 1024}}

    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": prompt(PROMPT),
        "3": prompt(NEGATIVE),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": case.width, "height": case.height,
                                                           "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": case.seed, "steps": case.steps, "cfg": CFG, "sampler_name": case.sampler,
            "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sd_parity"}},
    }


@dataclass
class Side:
    """What one side produced, stage by stage (latent (1, 4, h, w), image (1, 3, H, W) in [0, 1]).
    y: SDXL's vector conditioning as the network received it at the first step, (positive, negative)."""

    context: Tensor
    negative_context: Tensor
    sigmas: Tensor
    latent: Tensor
    image: Tensor
    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None
    y: Tensor | None = None


class FirstInput:
    """Records the first tensor a module is called with (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        if self.value is None:
            self.value = args[0].detach().clone()

    def remove(self) -> Tensor | None:
        self._handle.remove()
        return self.value


def run_graph(executor: Executor, case: Case, components: Components, prompt_node: str = "CLIPTextEncode",
              graph: dict | None = None) -> Side:
    """Import the ComfyUI graph (default: :func:`api_graph`'s) as a user's file is imported and run
    it to its SaveImage (on a fresh executor, so that nothing comes from a cache)."""
    document = API.convert(graph or api_graph(case, components.file_name, prompt_node))
    y_input = None
    if components.family == "sdxl":
        # Load first (the executor keeps the loaded model for the run), to watch the vector the U-Net receives.
        loaded = executor.run(document, outputs=["1"])
        assert loaded.status == "succeeded", loaded.error
        y_input = FirstInput(loaded.results["1"].outputs.model.network.label_emb)
    try:
        result = executor.run(document, outputs=["7", "6"])
    finally:
        y = y_input.remove() if y_input is not None else None
    assert result.status == "succeeded", result.error
    assert any(f.endswith(".png") for f in result.files), result.files
    assert (y is not None) == (components.family == "sdxl")

    def out(node: str, name: str):
        return getattr(result.results[node].outputs, name)

    (positive,), (negative,) = out("2", "conditioning"), out("3", "conditioning")
    return Side(context=positive.context, negative_context=negative.context,
                sigmas=schedule_sigmas(out("1", "model"), "normal", case.steps), latent=out("5", "latent").samples,
                image=out("6", "image").permute(0, 3, 1, 2), pooled=positive.pooled,
                negative_pooled=negative.pooled if components.family == "sdxl" else None, y=y)


def start_noise(case: Case) -> tuple[Tensor, torch.Generator]:
    """The graph's start noise (KSampler: components.NoiseSource) for this case's latent, and the
    generator its stochastic samplers draw from."""
    source = NoiseSource(case.seed)
    shape = (1, LATENT_CHANNELS, case.height // DOWNSCALE, case.width // DOWNSCALE)
    return source.generate(shape), source.sampler_generator()


def comfyui_start(noise: Tensor, init_noise_sigma: float) -> Tensor:
    """The latents that a pipeline multiplying them by init_noise_sigma (sigma_max, 'linspace'
    spacing) starts from as ComfyUI's full denoise does: noise x sqrt(1 + sigma_max^2). noise: (B, C, h, w)."""
    return noise * (math.sqrt(1.0 + init_noise_sigma**2) / init_noise_sigma)


def scheduler(case: Case, family: str):
    """The SD training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) with diffusers'
    default timestep spacing; SD2 predicts v. steps_offset 1 is the released repos' value (the
    pipelines insist on it); it moves only the "leading" spacing."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    scheduler_class = EulerAncestralDiscreteScheduler if case.sampler == "euler_ancestral" else EulerDiscreteScheduler
    made = scheduler_class(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1,
                           prediction_type="v_prediction" if family == "sd2" else "epsilon")
    assert made.config.timestep_spacing == "linspace"
    return made


def run_pipeline(case: Case, components: Components, tokenizers: dict[str, object]) -> Side:
    """The same modules through diffusers' pipeline on the same start noise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    noise, sampler_generator = start_noise(case)
    latents: list[Tensor] = []

    def keep_latents(pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    common = {"height": case.height, "width": case.width, "num_inference_steps": case.steps,
              "guidance_scale": CFG, "negative_prompt": NEGATIVE, "output_type": "pt",
              "generator": sampler_generator, "callback_on_step_end": keep_latents,
              "callback_on_step_end_tensor_inputs": ["latents"]}
    sigma_max = float(scheduler(case, components.family).init_noise_sigma)
    start = comfyui_start(noise, sigma_max)
    encoders = components.pipeline_text_encoders
    y = pooled = negative_pooled = None
    if components.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers["end"],
            tokenizer_2=tokenizers["zero"], unet=components.unet, scheduler=scheduler(case, "sdxl"),
            force_zeros_for_empty_prompt=False, add_watermarker=False)
        with torch.no_grad():
            context, negative_context, pooled, negative_pooled = pipe.encode_prompt(
                PROMPT, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
        y_input = FirstInput(components.unet.add_embedding)
        try:
            image = pipe(PROMPT, latents=start, **common).images
        finally:
            batched = y_input.remove()
        assert batched is not None, "the U-Net's add_embedding was never called"
        negative_y, positive_y = batched.chunk(2)  # diffusers batches (negative, positive)
        y = torch.cat([positive_y, negative_y])
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=encoders[0],
            tokenizer=tokenizers["end" if components.family == "sd1" else "zero"], unet=components.unet,
            scheduler=scheduler(case, components.family), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        with torch.no_grad():
            context, negative_context = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
        image = pipe(PROMPT, latents=start, **common).images
    # The pipeline multiplied `start` by sigma_max: the graph's start, noise x sqrt(1 + sigma_max^2).
    assert pipe.scheduler.init_noise_sigma == pipe.scheduler.sigmas.max() == sigma_max
    assert len(latents) == case.steps
    return Side(context=context, negative_context=negative_context, sigmas=pipe.scheduler.sigmas,
                latent=latents[-1], image=image, pooled=pooled, negative_pooled=negative_pooled, y=y)


STAGES = ("context", "negative_context", "pooled", "negative_pooled", "y", "sigmas", "latent", "image")


def stage_errors(ours: Side, reference: Side) -> dict[str, float]:
    """Max abs difference per stage, in pipeline order (where the two first part is where to look)."""
    errors = {}
    for stage in STAGES:
        a, b = getattr(ours, stage), getattr(reference, stage)
        if a is None and b is None:
            continue
        if stage == "pooled" and ours.negative_pooled is None:  # SD1/SD2: no pooled vector is used
            continue
        assert a is not None and b is not None, stage
        assert a.shape == b.shape, f"{stage}: graph {tuple(a.shape)} vs diffusers {tuple(b.shape)}"
        errors[stage] = (a.double() - b.double().cpu()).abs().max().item()
    return errors


def image_figures(ours: Side, reference: Side) -> tuple[float, float]:
    difference = (ours.image.double() - reference.image.double()).abs()
    return difference.max().item(), difference.mean().item()


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def references(models, tokenizers) -> dict[Case, Side]:
    """diffusers' side per case, computed once (the SDXL size test reuses the Euler case's)."""
    _, built = models
    return {case: run_pipeline(case, built[case.model], tokenizers) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_comfyui_graph_matches_diffusers_pipeline(case: Case, models, new_executor, references) -> None:
    _, built = models
    ours, reference = run_graph(new_executor(), case, built[case.model]), references[case]
    errors = stage_errors(ours, reference)
    worst, mean = image_figures(ours, reference)
    figures = f"{case.id}: image max {worst * 255:.4f}/255 mean {mean * 255:.4f}/255; stages " \
              + ", ".join(f"{stage} {error:.2e}" for stage, error in errors.items())
    print(figures)
    for stage in ("context", "negative_context", "pooled", "negative_pooled"):
        assert errors.get(stage, 0.0) <= TEXT_TOL, figures
    if case.model == "sdxl":
        # Original and target size are the image's (height, width), crop (0, 0), on both sides.
        assert errors["y"] <= 1e-5, figures
    assert errors["sigmas"] <= 1e-5 * reference.sigmas.max().item(), figures
    assert errors["latent"] <= 2e-3, figures
    assert ours.image.std() > 0.05, figures  # a picture with content, not a flat image that would match anyway
    assert worst <= MAX_ERROR, figures
    assert mean <= MEAN_ERROR, figures


def test_sdxl_size_conditioning_is_what_separates_the_images(models, new_executor, references) -> None:
    """The SDXL case above fails when the model is told 1024x1024 (the old plain-prompt behaviour,
    here through CLIPTextEncodeSDXL's defaults), and telling it the image's size explicitly gives
    exactly the plain prompt's image."""
    _, built = models
    case = CASES[4]
    assert case.model == "sdxl" and case.width != case.height
    reference = references[case]
    told_1024 = run_graph(new_executor(), case, built["sdxl"], prompt_node="CLIPTextEncodeSDXL")
    worst, mean = image_figures(told_1024, reference)
    y_error = stage_errors(told_1024, reference)["y"]
    print(f"{case.id} told 1024x1024: image max {worst * 255:.4f}/255 mean {mean * 255:.4f}/255; y {y_error:.2e}")
    assert y_error > 0.1
    assert worst > MAX_ERROR

    explicit = api_graph(case, built["sdxl"].file_name, prompt_node="CLIPTextEncodeSDXL")
    for node in ("2", "3"):
        explicit[node]["inputs"] |= {"width": case.width, "height": case.height, "target_width": case.width,
                                     "target_height": case.height}
    told_size = run_graph(new_executor(), case, built["sdxl"], graph=explicit)
    plain = run_graph(new_executor(), case, built["sdxl"])
    assert torch.equal(told_size.y, plain.y)
    assert torch.equal(told_size.image, plain.image)
