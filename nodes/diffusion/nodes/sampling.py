"""The sampling loop as composable nodes (noise, sigmas, sampler, guider, sample) plus the
one-node convenience samplers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CONDITIONING, GUIDER, LATENT, MODEL, NOISE, SAMPLER, SIGMAS

from ..sampling import schedules
from ..components import DiffusionModel, Latent, NoiseSource, ZeroNoise
from ..sampling.concat import ConcatError, concat_channels
from ..sampling.guidance import CFGGuider, Conditioning, DualCFGGuider, GuidanceError, check_conditioning
from ..sampling.model_sampling import ModelSampling, ModelSamplingError, Prediction
from ..sampling.unclip import ImagePromptError, with_image_prompts
from ..vae.previews import preview_image
from ..weights.devices import COMPILE_MODES, compile_mode, compiled, cpu_threads, network_work
from ..sampling.run import (
    KSAMPLER_EXTRA_STEP_SAMPLERS,
    SAMPLER_NAMES,
    SamplerChoice,
    StepMask,
    differential_mask,
    resize_mask,
    sample,
)
from .common import InputError

# ComfyUI's KSampler.SAMPLERS and KSampler.SCHEDULERS, every one implemented under its name.
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]
SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                   "linear_quadratic", "kl_optimal")
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
_SEED = Field(0, ge=0, le=2**63 - 1, description="Random seed; the same seed gives the same noise on every device.")


def schedule_sigmas(model: DiffusionModel, scheduler: str, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas of the named scheduler for a model, ending in 0."""
    schedule = model.sampling.schedule
    lo, hi = model.sampling.sigma_min, model.sampling.sigma_max
    makers: dict[str, Callable[[int], torch.Tensor]] = {
        "normal": lambda n: schedules.sigmas_normal(schedule, n),
        "karras": lambda n: schedules.sigmas_karras(n, lo, hi),
        "exponential": lambda n: schedules.sigmas_exponential(n, lo, hi),
        "sgm_uniform": lambda n: schedules.sigmas_sgm_uniform(schedule, n),
        "simple": lambda n: schedules.sigmas_simple(schedule, n),
        "ddim_uniform": lambda n: schedules.sigmas_ddim_uniform(schedule, n),
        "beta": lambda n: schedules.sigmas_beta(schedule, n),
        "linear_quadratic": lambda n: schedules.sigmas_linear_quadratic(n, hi),
        "kl_optimal": lambda n: schedules.sigmas_kl_optimal(n, lo, hi),
    }
    return makers[scheduler](steps).to(torch.float32)


def ksampler_sigmas(model: DiffusionModel, scheduler: str, sampler: str, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas as ComfyUI's KSampler makes them: for the samplers of
    KSAMPLER_EXTRA_STEP_SAMPLERS one step more with the second-to-last sigma dropped."""
    if sampler in KSAMPLER_EXTRA_STEP_SAMPLERS:
        return schedules.without_penultimate_sigma(schedule_sigmas(model, scheduler, steps + 1))
    return schedule_sigmas(model, scheduler, steps)


@dataclass(frozen=True, eq=False)
class Guidance:
    """A GUIDER value: the model and conditioning that classifier-free guidance combines.

    middle: DualCFGGuider's second conditioning (None: plain CFG), guided from the negative by
    cfg_middle, the positive guided from it by cfg; nested: DualCFGGuider's nested form.
    """

    model: DiffusionModel
    positive: Conditioning
    negative: Conditioning
    cfg: float
    middle: Conditioning | None = None
    cfg_middle: float = 1.0
    nested: bool = False

    def sides(self) -> dict[str, Conditioning]:
        """The conditionings by the input names they came in as."""
        sides = {"positive": self.positive, "negative": self.negative}
        if self.middle is not None:
            sides["middle"] = self.middle
        return sides

    def guider(self, network: torch.nn.Module) -> CFGGuider:
        """The denoiser that guides `network` (this model's, patched and maybe compiled)."""
        model = self.model
        downscale = model.latent_format.downscale_factor
        if self.middle is None:
            return CFGGuider(network, model.sampling, self.positive, self.negative, self.cfg, downscale=downscale)
        return DualCFGGuider(network, model.sampling, self.positive, self.middle, self.negative, self.cfg,
                             self.cfg_middle, nested=self.nested, downscale=downscale)


def _check_guidance(model: DiffusionModel, positive: Conditioning, negative: Conditioning,
                    positive_name: str = "positive") -> None:
    """Refuse conditioning not made for the model, naming the input it came in by."""
    for name, conditioning in ((positive_name, positive), ("negative", negative)):
        try:
            # Image prompts as they will be when sampling (their width does not depend on the seed).
            check_conditioning(model.network, with_image_prompts(model.network.config, model.family.latent_family,
                                                                 conditioning, seed=0))
        except (GuidanceError, ImagePromptError) as error:
            raise InputError(name, str(error)) from None


def _with_image_prompts(guidance: Guidance, seed: int) -> Guidance:
    """The guidance with its image prompts made into the model's vector conditioning; their noise is
    seeded by the sampling seed, as in ComfyUI."""
    config, family = guidance.model.network.config, guidance.model.family.latent_family
    return replace(guidance, **{name: with_image_prompts(config, family, conditioning, seed)
                                for name, conditioning in guidance.sides().items()})


def _with_image_inputs(guidance: Guidance, latent: Latent) -> Guidance:
    """The guidance with each entry's extra input channels for image-conditioned models (inpainting,
    InstructPix2Pix, Flux Fill/Canny/Depth: sampling.concat) made for this latent."""
    model = guidance.model
    fmt = model.latent_format
    # Continuous-time (EDM) U-Nets, CosXL edit among them, take an edit image's latent scaled.
    scaled_image = not isinstance(model.sampling.schedule, (schedules.DiscreteSchedule, schedules.FlowSchedule))

    def complete(conditioning: Conditioning, name: str) -> Conditioning:
        out = []
        for entry in conditioning:
            try:
                concat = concat_channels(model.network.config, latent.samples, image_latent=entry.concat_latent,
                                         mask=entry.concat_mask, noise_mask=latent.noise_mask,
                                         scaling=(fmt.scaling_factor, fmt.shift_factor),
                                         downscale=fmt.downscale_factor, scaled_image=scaled_image)
            except ConcatError as error:
                raise InputError(name, str(error)) from None
            out.append(entry if concat is None else entry.with_(concat=concat))
        return tuple(out)

    return replace(guidance, **{name: complete(conditioning, name)
                                for name, conditioning in guidance.sides().items()})


def _step_mask(model: DiffusionModel, sigmas: torch.Tensor) -> StepMask | None:
    """DifferentialDiffusion's per-step noise mask for this run's schedule, if the model has it."""
    strength = model.differential_diffusion
    if strength is None:
        return None
    sampling = model.sampling
    return lambda sigma, mask: differential_mask(mask, sigma, sigmas, sampling.timestep, sampling.sigma_min, strength)


def run_sampling(ctx: RunContext, guidance: Guidance, sampler: SamplerChoice, sigmas: torch.Tensor,
                 latent: Latent, noise: NoiseSource) -> tuple[Latent, Latent]:
    """Sample a latent with guidance; reports progress with previews. Returns (result, last denoised)."""
    guidance = _with_image_inputs(_with_image_prompts(guidance, noise.seed), latent)
    model = guidance.model
    samples = latent.samples
    if sampler.uses_uncond and not guidance.negative:
        raise InputError("guider", f"sampler {sampler.name!r} re-noises with the unconditional prediction, which "
                                   "a guider without negative conditioning (BasicGuider) does not make: use "
                                   "CFGGuider with a negative prompt (cfg 1 works)")
    if samples.shape[1] != model.latent_format.channels:
        raise InputError("latent", f"{samples.shape[1]} latent channels; this model works on "
                                   f"{model.latent_format.channels}")
    start_noise = noise.generate(tuple(samples.shape))
    mask = None
    if latent.noise_mask is not None:
        mask = resize_mask(latent.noise_mask, samples.shape[0], samples.shape[2], samples.shape[3])
    device = next(model.network.parameters()).device
    last = {"denoised": samples}
    # Positive and negative share one batched call unless cfg 1 skips the negative.
    calls = 3 if guidance.middle is not None else 2 if guidance.negative and guidance.cfg != 1 else 1
    work = network_work(model.network, calls * samples.shape[0] * samples.shape[2] * samples.shape[3])
    mode = model.compile_mode or compile_mode()
    with cpu_threads(device, work), model.patched_network() as network:
        colours = model.preview_colours()  # the first time, fitted through the VAE: under the same policy
        if mode is not None:
            network = compiled(network, mode)
        guider = guidance.guider(network)

        def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            last["denoised"] = denoised
            ctx.progress(i + 1, total, preview_image(denoised, colours))

        result = sample(guider, sampler, sigmas, samples, start_noise, noise_mask=mask,
                        generator=noise.sampler_generator(), device=device, callback=on_step,
                        noise_form=model.sampling.noise_form, percent_to_sigma=model.sampling.percent_to_sigma,
                        step_mask=_step_mask(model, sigmas), sigma_max=model.sampling.sigma_max)
    denoised = last["denoised"].float().cpu()
    return latent.with_(samples=result), latent.with_(samples=denoised)


class RandomNoise(Node):
    """Seeded Gaussian noise, generated on the CPU: the same seed gives the same image on any device."""

    category = "sampling"

    class Inputs(NodeInputs):
        seed: int = _SEED

    class Outputs(NodeOutputs):
        noise: NOISE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(noise=NoiseSource(inputs.seed))


class DisableNoise(Node):
    """No noise: continue sampling a latent that still holds noise (the second half of a split schedule)."""

    category = "sampling"

    class Outputs(NodeOutputs):
        noise: NOISE.annotation

    def run(self, inputs: NodeInputs, ctx: RunContext) -> Outputs:
        return self.Outputs(noise=ZeroNoise())


class Scheduler(Node):
    """The noise levels (sigmas) to sample through. denoise < 1 keeps the last part of a longer
    schedule, so img2img starts at the noise level that its strength implies."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        scheduler: SchedulerName = "normal"
        steps: int = Field(20, ge=1, le=10000)
        denoise: float = Field(1.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        sigmas: SIGMAS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        sigmas = schedules.sigmas_for_denoise(lambda n: schedule_sigmas(inputs.model, inputs.scheduler, n),
                                              inputs.steps, inputs.denoise)
        return self.Outputs(sigmas=sigmas)


class SDTurboScheduler(Node):
    """The noise levels SD-Turbo and SDXL-Turbo were distilled for: timesteps 999, 899, ... 99, one
    per step (1 to 10 steps). denoise < 1 starts further down (0.5: at timestep 499) for img2img."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        steps: int = Field(1, ge=1, le=10)
        denoise: float = Field(1.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        sigmas: SIGMAS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        sigmas = schedules.sigmas_sd_turbo(inputs.model.sampling.schedule, inputs.steps, inputs.denoise)
        return self.Outputs(sigmas=sigmas)


class SetFirstSigma(Node):
    """Replace the first noise level of a schedule (ComfyUI's SetFirstSigma), e.g. a very high one
    that one-step models such as Lotus read as their starting timestep."""

    category = "sampling"

    class Inputs(NodeInputs):
        sigmas: SIGMAS.annotation
        sigma: float = Field(136.0, ge=0.0, le=20000.0)

    class Outputs(NodeOutputs):
        sigmas: SIGMAS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        sigmas = inputs.sigmas.clone()
        if not len(sigmas):
            raise InputError("sigmas", "an empty schedule has no first sigma")
        sigmas[0] = inputs.sigma
        return self.Outputs(sigmas=sigmas)


class SplitSigmas(Node):
    """Split a schedule at a step: the high-noise part and the low-noise rest (they share the boundary)."""

    category = "sampling"

    class Inputs(NodeInputs):
        sigmas: SIGMAS.annotation
        step: int = Field(0, ge=0, le=10000)

    class Outputs(NodeOutputs):
        high: SIGMAS.annotation
        low: SIGMAS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            high, low = schedules.split_sigmas(inputs.sigmas, inputs.step)
        except schedules.ScheduleError as error:
            raise InputError("step", str(error)) from None
        return self.Outputs(high=high, low=low)


class SelectSampler(Node):
    """A sampling algorithm. eta and s_noise apply to the ancestral and SDE samplers."""

    category = "sampling"

    class Inputs(NodeInputs):
        sampler_name: SamplerName = "euler"
        eta: float = Field(1.0, ge=0.0, le=10.0, description="Amount of fresh noise per step (stochastic samplers).")

    class Outputs(NodeOutputs):
        sampler: SAMPLER.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(sampler=SamplerChoice.with_supported(inputs.sampler_name, eta=inputs.eta))


class Guider(Node):
    """Classifier-free guidance: cfg x (positive - negative) on top of negative. At cfg 1 only the
    positive prompt is evaluated (half the work)."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        cfg: float = Field(7.0, ge=0.0, le=100.0)

    class Outputs(NodeOutputs):
        guider: GUIDER.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.positive, inputs.negative)
        return self.Outputs(guider=Guidance(inputs.model, tuple(inputs.positive), tuple(inputs.negative), inputs.cfg))


class BasicGuider(Node):
    """Guide by the positive conditioning alone (cfg 1, no negative prompt): for guidance-distilled
    models such as Flux.1 (dev takes its guidance strength from FluxGuidance) and for other models
    sampled without classifier-free guidance. Half the work of Guider."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        conditioning: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        guider: GUIDER.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.conditioning, ())
        return self.Outputs(guider=Guidance(inputs.model, tuple(inputs.conditioning), (), 1.0))


class DualGuider(Node):
    """Guidance by two conditionings and a negative (ComfyUI's DualCFGGuider), for edit models: cond1
    (the edit prompt with the image) is guided from cond2 (the image alone) by cfg_conds, and cond2 from
    the negative by cfg_cond2_negative. regular: n + cfg_cond2_negative * (c2 - n) + cfg_conds * (c1 - c2);
    nested: n + cfg_cond2_negative * (c2 + cfg_conds * (c1 - c2) - n)."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        cond1: CONDITIONING.annotation
        cond2: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        cfg_conds: float = Field(8.0, ge=0.0, le=100.0, description="Scale from cond2 towards cond1.")
        cfg_cond2_negative: float = Field(8.0, ge=0.0, le=100.0, description="Scale from negative towards cond2.")
        style: Literal["regular", "nested"] = "regular"

    class Outputs(NodeOutputs):
        guider: GUIDER.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.cond1, inputs.negative, positive_name="cond1")
        _check_guidance(inputs.model, inputs.cond2, (), positive_name="cond2")
        guidance = Guidance(inputs.model, tuple(inputs.cond1), tuple(inputs.negative), inputs.cfg_conds,
                            middle=tuple(inputs.cond2), cfg_middle=inputs.cfg_cond2_negative,
                            nested=inputs.style == "nested")
        return self.Outputs(guider=guidance)


def _flow_multiplier(model: DiffusionModel, node: str) -> float:
    """The timestep multiplier of a rectified-flow model (SD3 1000, Flux 1), kept when its shift changes."""
    schedule = model.sampling.schedule
    if not isinstance(schedule, schedules.FlowSchedule):
        raise InputError("model", f"{node} applies to rectified-flow models (SD3, Flux.1); this model is "
                                  f"{model.family.label}")
    return schedule.multiplier


def _flow_sampling(make: Callable[[], ModelSampling], input_name: str) -> ModelSampling:
    try:
        return make()
    except ModelSamplingError as error:
        raise InputError(input_name, str(error)) from None


class ModelSamplingSD3(Node):
    """Sample a rectified-flow model (SD3, SD3.5) with a constant timestep shift: larger values spend
    more steps at high noise (3.0 is SD3's default; some use 6 or more at high resolutions)."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        shift: float = Field(3.0, gt=0.0, le=100.0, description="sigma' = shift*sigma / (1 + (shift-1)*sigma).")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        multiplier = _flow_multiplier(inputs.model, "ModelSamplingSD3")
        sampling = _flow_sampling(lambda: ModelSampling.flow(shift=inputs.shift, multiplier=multiplier), "shift")
        return self.Outputs(model=inputs.model.with_sampling(sampling))


class ModelSamplingFlux(Node):
    """Sample Flux.1 with its resolution-dependent timestep shift, set for an image of width x
    height: the shift exponent grows linearly with the image's token count, from base_shift at
    256 tokens (256x256 pixels) to max_shift at 4096 (1024x1024)."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        max_shift: float = Field(1.15, ge=0.0, le=100.0, description="Shift exponent at 4096 image tokens.")
        base_shift: float = Field(0.5, ge=0.0, le=100.0, description="Shift exponent at 256 image tokens.")
        width: int = Field(1024, ge=16, le=16384, multiple_of=8, description="Image width in pixels.")
        height: int = Field(1024, ge=16, le=16384, multiple_of=8, description="Image height in pixels.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        multiplier = _flow_multiplier(inputs.model, "ModelSamplingFlux")
        mu = schedules.flux_mu(inputs.width, inputs.height, base_shift=inputs.base_shift, max_shift=inputs.max_shift)
        sampling = _flow_sampling(lambda: ModelSampling.flux(mu=mu, multiplier=multiplier), "max_shift")
        return self.Outputs(model=inputs.model.with_sampling(sampling))


class DifferentialDiffusion(Node):
    """Repaint a soft noise mask gradually: each cell joins the repainting at the step its mask value
    says (1: from the first step, 0.5: from halfway, in the model's timesteps), so edits blend into
    what is kept. Affects sampling with a noise mask (SetLatentNoiseMask, InpaintModelConditioning);
    strength < 1 blends the thresholded mask with the mask itself."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        strength: float = Field(1.0, ge=0.0, le=1.0, description="1: the thresholded mask alone.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(model=replace(inputs.model, differential_diffusion=inputs.strength))


class CompileModel(Node):
    """Run the model's denoiser through torch.compile (inductor) in a mode, as `--compile` does for
    every model (ComfyUI's TorchCompileModel): its first run compiles, later runs of the same loaded
    model reuse the compiled code."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        mode: Literal[COMPILE_MODES] = "default"  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(model=replace(inputs.model, compile_mode=inputs.mode))


# ComfyUI's names for the predictions ModelSamplingDiscrete sets.
DISCRETE_PREDICTIONS = {"eps": Prediction.EPS, "v_prediction": Prediction.V, "lcm": Prediction.LCM,
                        "x0": Prediction.X0}


class ModelSamplingDiscrete(Node):
    """Sample a discrete-time model (SD1.x, SD2.x, SDXL, DiT, PixArt) as another prediction type than
    its file says: eps, v_prediction, lcm (a latent-consistency model or LoRA: its boundary condition
    on its 50 distilled timesteps; sample with the lcm sampler) or x0 (the network outputs the
    denoised image). zsnr rescales the noise schedule to zero terminal SNR, for models fine-tuned on
    it (usually with v_prediction)."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        sampling: Literal[tuple(DISCRETE_PREDICTIONS)] = "eps"  # type: ignore[valid-type]
        zsnr: bool = Field(False, description="Rescale the schedule to zero terminal SNR (Lin et al. 2024).")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        schedule = model.sampling.schedule
        if not isinstance(schedule, schedules.DiscreteSchedule):
            raise InputError("model", f"ModelSamplingDiscrete applies to discrete-time models (SD1.x, SD2.x, SDXL, "
                                      f"DiT, PixArt); {model.family.label} is a rectified-flow model "
                                      "(ModelSamplingSD3 / ModelSamplingFlux set its shift)")
        sampling = ModelSampling.discrete(schedule, DISCRETE_PREDICTIONS[inputs.sampling], inputs.zsnr)
        return self.Outputs(model=model.with_sampling(sampling))


class Sample(Node):
    """Run a sampler: noise + guider + sampler + sigmas on a latent. Outputs the result and the
    model's last denoised estimate."""

    category = "sampling"

    class Inputs(NodeInputs):
        noise: NOISE.annotation
        guider: GUIDER.annotation
        sampler: SAMPLER.annotation
        sigmas: SIGMAS.annotation
        latent: LATENT.annotation

    class Outputs(NodeOutputs):
        latent: LATENT.annotation
        denoised: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        result, denoised = run_sampling(ctx, inputs.guider, inputs.sampler, inputs.sigmas, inputs.latent, inputs.noise)
        return self.Outputs(latent=result, denoised=denoised)


class DenoiseStep(Node):
    """One guided model evaluation: the denoised estimate of a latent that holds noise of level sigma."""

    category = "sampling"

    class Inputs(NodeInputs):
        guider: GUIDER.annotation
        latent: LATENT.annotation
        sigma: float = Field(1.0, gt=0.0, le=1000.0)

    class Outputs(NodeOutputs):
        denoised: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        guidance: Guidance = _with_image_inputs(_with_image_prompts(inputs.guider, seed=0), inputs.latent)
        model = guidance.model
        device = next(model.network.parameters()).device
        with model.patched_network() as network, torch.no_grad():
            guider = guidance.guider(network)
            x = inputs.latent.samples.to(device, torch.float32)
            denoised = guider(x, torch.full((x.shape[0],), inputs.sigma, device=device))
        return self.Outputs(denoised=inputs.latent.with_(samples=denoised.float().cpu()))


class SamplerCustom(Node):
    """Sample with a chosen sampler and schedule (SelectSampler, Scheduler or SDTurboScheduler) and
    classifier-free guidance in one node. add_noise off continues a latent that still holds its noise
    (the seed then only drives the sampler's own noise). Outputs the result and the model's last
    denoised estimate."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        add_noise: bool = True
        noise_seed: int = _SEED
        cfg: float = Field(8.0, ge=0.0, le=100.0)
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        sampler: SAMPLER.annotation
        sigmas: SIGMAS.annotation
        latent: LATENT.annotation

    class Outputs(NodeOutputs):
        latent: LATENT.annotation
        denoised: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.positive, inputs.negative)
        guidance = Guidance(inputs.model, tuple(inputs.positive), tuple(inputs.negative), inputs.cfg)
        noise = NoiseSource(inputs.noise_seed) if inputs.add_noise else ZeroNoise(inputs.noise_seed)
        result, denoised = run_sampling(ctx, guidance, inputs.sampler, inputs.sigmas, inputs.latent, noise)
        return self.Outputs(latent=result, denoised=denoised)


class KSampler(Node):
    """Sample in one node: seed, steps, cfg, sampler, scheduler and denoise strength (1 = text-to-image,
    less = img2img from the given latent)."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        latent: LATENT.annotation
        seed: int = _SEED
        steps: int = Field(20, ge=1, le=10000)
        cfg: float = Field(7.0, ge=0.0, le=100.0)
        sampler_name: SamplerName = "euler"
        scheduler: SchedulerName = "normal"
        denoise: float = Field(1.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.positive, inputs.negative)
        sigmas = schedules.sigmas_for_denoise(
            lambda n: ksampler_sigmas(inputs.model, inputs.scheduler, inputs.sampler_name, n), inputs.steps,
            inputs.denoise)
        guidance = Guidance(inputs.model, tuple(inputs.positive), tuple(inputs.negative), inputs.cfg)
        result, _ = run_sampling(ctx, guidance, SamplerChoice(inputs.sampler_name), sigmas, inputs.latent,
                                 NoiseSource(inputs.seed))
        return self.Outputs(latent=result)


class KSamplerAdvanced(Node):
    """Sample a range of steps of a schedule: for multi-pass graphs (base then refiner) and for
    continuing from a latent that still holds noise."""

    category = "sampling"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        latent: LATENT.annotation
        add_noise: bool = True
        seed: int = _SEED
        steps: int = Field(20, ge=1, le=10000)
        cfg: float = Field(7.0, ge=0.0, le=100.0)
        sampler_name: SamplerName = "euler"
        scheduler: SchedulerName = "normal"
        start_at_step: int = Field(0, ge=0, le=10000)
        end_at_step: int = Field(10000, ge=0, le=10000)
        return_with_leftover_noise: bool = False

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        _check_guidance(inputs.model, inputs.positive, inputs.negative)
        sigmas = ksampler_sigmas(inputs.model, inputs.scheduler, inputs.sampler_name, inputs.steps)
        end = min(inputs.end_at_step, inputs.steps)
        if inputs.start_at_step >= end:
            raise InputError("start_at_step", f"{inputs.start_at_step} leaves no steps before end_at_step {end}")
        sigmas = sigmas[inputs.start_at_step: end + 1].clone()
        if end < inputs.steps and not inputs.return_with_leftover_noise:
            sigmas[-1] = 0.0
        guidance = Guidance(inputs.model, tuple(inputs.positive), tuple(inputs.negative), inputs.cfg)
        noise = NoiseSource(inputs.seed) if inputs.add_noise else ZeroNoise(inputs.seed)
        result, _ = run_sampling(ctx, guidance, SamplerChoice(inputs.sampler_name), sigmas, inputs.latent, noise)
        return self.Outputs(latent=result)


NODES = [RandomNoise, DisableNoise, Scheduler, SDTurboScheduler, SplitSigmas, SelectSampler, Guider, BasicGuider,
         DualGuider, Sample, SamplerCustom, DenoiseStep, KSampler, KSamplerAdvanced, ModelSamplingSD3,
         ModelSamplingFlux, ModelSamplingDiscrete, DifferentialDiffusion, SetFirstSigma, CompileModel]
