"""How sampling starts, through the KSampler node: as ComfyUI's noise scaling (its KSampler's
max_denoise), a full denoise of an eps / v / EDM-style model starts at latent + noise x
sqrt(1 + sigma_max^2), a partial one (denoise < 1) at latent + noise x sigmas[0], and a flow model at
(1 - sigma) x latent + sigma x noise either way. Checked on the first input the network receives,
which is the start times the model's input scale c_in = 1 / sqrt(sigma^2 + sigma_data^2) (1 for flow)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from nodegraph.node import CancelToken, RunContext
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.stable_diffusion import LatentFormat
from nodegraph_diffusion.components import DiffusionModel, Latent, NoiseSource
from nodegraph_diffusion.nodes.sampling import KSampler, KSamplerAdvanced, ksampler_sigmas
from nodegraph_diffusion.sampling import schedules
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.run import SamplerChoice, sample

from test_guidance import FakeUNet, entry

SEED, STEPS, SHAPE = 7, 4, (1, 4, 6, 5)
LATENT = LatentFormat(4, 0.18215, 0.0, 8)


class RecordingUNet(FakeUNet):
    """FakeUNet that keeps every input it is called with (x: (B, C, h, w), timesteps: (B,))."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, timesteps, context, y=None, control=None):
        self.inputs.append((x.detach().clone(), timesteps.detach().clone()))
        return super().forward(x, timesteps, context, y, control)


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


SAMPLINGS = {
    "eps": ModelSampling.for_prediction("eps"),
    "v": ModelSampling.for_prediction("v"),
    "edm": ModelSampling.continuous("edm", 0.002, 120.0, sigma_data=0.5),
    "flow": ModelSampling.flow(shift=3.0),
}


def first_start(sampling: ModelSampling, latent: torch.Tensor, tmp_path: Path, denoise: float = 1.0,
                scheduler: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Run KSampler (cfg 1, euler) and return (the start the network saw, the schedule it ran)."""
    network = RecordingUNet()
    model = DiffusionModel(network, ModelFamily.SD1, sampling, LATENT)
    inputs = KSampler.Inputs(model=model, positive=[entry(1.0)], negative=[entry(-1.0)], latent=Latent(latent),
                             seed=SEED, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler=scheduler,
                             denoise=denoise)
    KSampler().run(inputs, ctx(tmp_path))
    sigmas = schedules.sigmas_for_denoise(lambda n: ksampler_sigmas(model, scheduler, "euler", n), STEPS, denoise)
    x_in, _ = network.inputs[0]
    scale = float(sampling.input_scale(sigmas[:1].float())[0])
    return x_in / scale, sigmas


@pytest.fixture
def latent_and_noise() -> tuple[torch.Tensor, torch.Tensor]:
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    return latent, NoiseSource(SEED).generate(SHAPE)


@pytest.mark.parametrize("kind,scheduler", [("eps", "normal"), ("v", "normal"), ("eps", "karras"), ("edm", "karras")])
def test_a_full_denoise_starts_at_noise_times_sqrt_one_plus_sigma_max_squared(kind, scheduler, latent_and_noise,
                                                                               tmp_path) -> None:
    latent, noise = latent_and_noise
    sampling = SAMPLINGS[kind]
    start, sigmas = first_start(sampling, latent, tmp_path, scheduler=scheduler)
    sigma_max = sampling.sigma_max
    assert math.isclose(float(sigmas[0]), sigma_max, rel_tol=1e-5)
    expected = latent + noise * math.sqrt(1.0 + sigma_max**2)
    assert torch.allclose(start, expected, rtol=1e-5, atol=1e-4 * sigma_max)
    # Not the plain VE start: the two differ by the factor sqrt(1 + sigma_max^2) / sigma_max on the noise.
    plain = latent + noise * float(sigmas[0])
    assert (start - plain).abs().max() > 100 * (start - expected).abs().max()


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_a_partial_denoise_starts_at_noise_times_its_first_sigma(kind, latent_and_noise, tmp_path) -> None:
    latent, noise = latent_and_noise
    start, sigmas = first_start(SAMPLINGS[kind], latent, tmp_path, denoise=0.6)
    sigma = float(sigmas[0])
    assert sigma < 0.9 * SAMPLINGS[kind].sigma_max  # an img2img start, well below the top of the schedule
    assert torch.allclose(start, latent + noise * sigma, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_a_flow_model_starts_at_the_flow_mix_either_way(denoise, latent_and_noise, tmp_path) -> None:
    latent, noise = latent_and_noise
    start, sigmas = first_start(SAMPLINGS["flow"], latent, tmp_path, denoise=denoise)
    sigma = float(sigmas[0])
    assert torch.allclose(start, (1.0 - sigma) * latent + sigma * noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start_at_step,add_noise", [(0, True), (1, True), (0, False)])
def test_ksampler_advanced_scales_by_where_its_schedule_starts(start_at_step, add_noise, latent_and_noise,
                                                               tmp_path) -> None:
    """ComfyUI computes max_denoise from the schedule it samples: from step 0 the full-denoise start,
    from a later step (sigmas[0] below sigma_max) the plain one; add_noise off adds no noise at all."""
    latent, noise = latent_and_noise
    network = RecordingUNet()
    model = DiffusionModel(network, ModelFamily.SD1, SAMPLINGS["eps"], LATENT)
    inputs = KSamplerAdvanced.Inputs(model=model, positive=[entry(1.0)], negative=[entry(-1.0)],
                                     latent=Latent(latent), add_noise=add_noise, seed=SEED, steps=STEPS, cfg=1.0,
                                     sampler_name="euler", scheduler="normal", start_at_step=start_at_step)
    KSamplerAdvanced().run(inputs, ctx(tmp_path))
    sigma = float(ksampler_sigmas(model, "normal", "euler", STEPS)[start_at_step])
    x_in, _ = network.inputs[0]
    start = x_in * math.sqrt(sigma**2 + 1.0)
    scale = (math.sqrt(1.0 + sigma**2) if start_at_step == 0 else sigma) if add_noise else 0.0
    assert torch.allclose(start, latent + noise * scale, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_sample_without_sigma_max_keeps_the_plain_start(latent_and_noise) -> None:
    """run.sample scales a full-denoise start only when told the model's sigma_max."""
    latent, noise = latent_and_noise
    sigma_max = SAMPLINGS["eps"].sigma_max
    sigmas = torch.tensor([sigma_max, 0.0])
    seen: list[torch.Tensor] = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.zeros_like(x)

    sample(denoiser, SamplerChoice("euler"), sigmas, latent, noise)
    sample(denoiser, SamplerChoice("euler"), sigmas, latent, noise, sigma_max=sigma_max)
    assert torch.allclose(seen[0], latent + noise * sigma_max, rtol=1e-6, atol=1e-5)
    assert torch.allclose(seen[1], latent + noise * math.sqrt(1 + sigma_max**2), rtol=1e-6, atol=1e-5)
