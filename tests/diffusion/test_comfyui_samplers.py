"""The samplers and schedulers added from ComfyUI's KSampler lists: each sampler against its formula
written out here (the maths of ComfyUI's k_diffusion/sampling.py), against diffusers where diffusers
implements it, in flow form, and by what it must do on Gaussian data (converge at its order, keep the
data distribution); the run and node plumbing they need (the unconditional prediction for CFG++,
the model's schedule for SA-Solver, KSampler's extra step)."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from nodegraph_diffusion.sampling import samplers as K
from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling.guidance import CFGGuider, GuidanceError
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.run import SamplerChoice, SamplingError, sample

from test_guidance import FakeUNet, entry

FLOW = K.NoiseForm.FLOW
SHAPE = (2, 3, 4, 4)
CFG = 2.0


def eps_cond(u: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a noise-predicting network on its scaled input."""
    return 0.8 * torch.tanh(u) + 0.1 * u + 0.05 * torch.sin(3 * u)


def eps_uncond(u: torch.Tensor) -> torch.Tensor:
    return 0.7 * torch.tanh(u) + 0.2 * u


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def ve_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _col(sigma, x)
    return x - s * eps_cond(x / (s**2 + 1) ** 0.5)


def ve_pair(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided by CFG, unconditional) denoised estimates."""
    s = _col(sigma, x)
    uncond = x - s * eps_uncond(x / (s**2 + 1) ** 0.5)
    return uncond + CFG * (ve_model(x, sigma) - uncond), uncond


def flow_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _col(sigma, x)
    return x - s * (0.8 * torch.tanh(x) + 0.1 * x - 0.3 * torch.sin(3 * x) * s)


def flow_pair(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _col(sigma, x)
    uncond = x - s * (0.7 * torch.tanh(x) + 0.2 * x)
    return uncond + CFG * (flow_model(x, sigma) - uncond), uncond


def same_pair(model: K.Denoiser) -> Callable:
    """A GuidedDenoiser whose unconditional prediction is the guided one (no guidance at all)."""
    return lambda x, sigma: (model(x, sigma), model(x, sigma))


def _x(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _shared_noise(n: int, seed: int = 5) -> tuple[list[torch.Tensor], Callable]:
    """n draws, and a noise sampler that hands them out in order (and fails when they run out)."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]
    pending = list(draws)
    return draws, lambda s, s_next: pending.pop(0)


def _ve_sigmas(n: int = 8) -> torch.Tensor:
    return S.sigmas_karras(n, 0.03, 14.6).to(torch.float64)


def _flow_sigmas(n: int = 8) -> torch.Tensor:
    return S.sigmas_normal(S.FlowSchedule(shift=3.0), n).to(torch.float64)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _split(s: torch.Tensor, s_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ancestral split of a VE step: (sigma_down, sigma_up)."""
    up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2).sqrt())
    return (s_next**2 - up**2).sqrt(), up


# ------------------------------------------------------------------------------------ the _gpu names


@pytest.mark.parametrize(
    "gpu,namesake,draws",
    [(K.sample_dpmpp_sde_gpu, K.sample_dpmpp_sde, 16), (K.sample_dpmpp_2m_sde_gpu, K.sample_dpmpp_2m_sde, 8),
     (K.sample_dpmpp_2m_sde_heun_gpu, K.sample_dpmpp_2m_sde_heun, 8),
     (K.sample_dpmpp_3m_sde_gpu, K.sample_dpmpp_3m_sde, 8)],
)
def test_gpu_names_written_out_as_their_namesakes_on_cpu_noise_ve_and_flow(gpu: Callable, namesake: Callable,
                                                                          draws: int) -> None:
    # ComfyUI's _gpu variants draw the same sampler's noise on the GPU; here noise is always drawn on the
    # CPU, so on the same noise the two are the same computation, bit for bit, in both forms
    doc = inspect.getdoc(gpu) or ""
    assert "noise" in doc and "GPU" in doc and "CPU" in doc
    for model, sigmas, form in ((ve_model, _ve_sigmas(), K.NoiseForm.VE), (flow_model, _flow_sigmas(), FLOW)):
        out = gpu(model, _x(1), sigmas, noise_sampler=_shared_noise(draws)[1], noise_form=form)
        assert torch.equal(out, namesake(model, _x(1), sigmas, noise_sampler=_shared_noise(draws)[1], noise_form=form))
    runs = [sample(ve_model, SamplerChoice(name), _ve_sigmas().float(), torch.zeros(SHAPE), _x(2).float(),
                   generator=torch.Generator().manual_seed(7))
            for name in (gpu.__name__.removeprefix("sample_"), namesake.__name__.removeprefix("sample_"))]
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------------------- dpmpp_2m_sde_heun


def _diffusers_vp_scheduler(name: str, **kw: object):  # noqa: ANN202
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, **kw)


def _run_diffusers_eps(sched, x: torch.Tensor, seed: int = 1) -> torch.Tensor:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(eps_cond(sched.scale_model_input(x, t)), t, x, **extra).prev_sample
    return x


@pytest.mark.parity
def test_dpmpp_2m_sde_heun_matches_diffusers_sde_multistep_heun() -> None:
    sched = _diffusers_vp_scheduler(
        "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun",
        timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True)
    sched.set_timesteps(8)
    sigmas = sched.sigmas
    x0 = _x(3).float() * sigmas[0]
    g = torch.Generator().manual_seed(1)
    ours = K.sample_dpmpp_2m_sde_heun(ve_model, x0.clone(), sigmas, noise_sampler=lambda s, t: torch.randn(
        SHAPE, generator=g))
    assert _max_err(ours, _run_diffusers_eps(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5)) <= 1e-4


def _sd3_raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity-predicting toy network with SD3's timestep (sigma * 1000)."""
    s = _col(t / 1000.0, x)
    return 0.8 * torch.tanh(x) + 0.1 * x - 0.3 * torch.sin(3 * x) * s


def _diffusers_flow_run(sched, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        v = _sd3_raw(x, (sched.sigmas[i] * 1000.0).expand(x.shape[0]))
        extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(v, t, x, **extra).prev_sample
    return x


@pytest.mark.parity
@pytest.mark.parametrize(
    "name,sampler,kw,config",
    [("DPMSolverMultistepScheduler", K.sample_dpmpp_2m_sde_heun, {"noise": True},
      dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun", final_sigmas_type="zero")),
     # diffusers' bh1 step to sigma 0 is B(h) * 0 with B(h) = -inf (NaN): compared ending at sigma_min
     ("UniPCMultistepScheduler", K.sample_uni_pc, {"order": 3},
      dict(predict_x0=True, solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"))],
)
def test_flow_prediction_matches_diffusers_flow_solvers(name: str, sampler: Callable, kw: dict, config: dict) -> None:
    import diffusers

    sched = getattr(diffusers, name)(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=3.0,
                                     prediction_type="flow_prediction", lower_order_final=True, **config)
    sched.set_timesteps(16)
    sigmas = sched.sigmas
    x0 = _x(8).float()
    if kw.pop("noise", False):
        g = torch.Generator().manual_seed(1)
        kw["noise_sampler"] = lambda s, s_next: torch.randn(SHAPE, generator=g)
    ours = sampler(ModelSampling.flow(3.0).denoiser(_sd3_raw), x0.clone(), sigmas, noise_form=FLOW, **kw)
    assert _max_err(ours, _diffusers_flow_run(sched, x0.clone())) <= 1e-4


# ------------------------------------------------------------------------------------------- CFG++


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_cfg_pp_euler_written_out_as_ddim_renoised_with_the_uncond_noise(eta: float) -> None:
    # CFG++ (Chung et al. 2024): step to the guided estimate D, re-noise with the noise that the
    # unconditional estimate U implies, eps_u = (x - U) / sigma; eta splits the step as k-diffusion does
    sigmas = _ve_sigmas()
    draws, noise = _shared_noise(8)
    x = _x(4, float(sigmas[0]))
    if eta == 0.0:
        ours = K.sample_euler_cfg_pp(ve_pair, x.clone(), sigmas)
    else:
        ours = K.sample_euler_ancestral_cfg_pp(ve_pair, x.clone(), sigmas, eta=eta, noise_sampler=noise)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = ve_pair(x, s.reshape(1))
        if s_next == 0:
            x = guided
            continue
        down, up = _split(s, s_next, eta)
        x = guided + down * (x - uncond) / s + up * draws[i]
    assert _max_err(ours, x) <= 1e-10


def test_cfg_pp_dpmpp_2s_ancestral_written_out_with_the_midpoint_uncond() -> None:
    # the 2S step from x + D - U; as in ComfyUI, the full step's shift takes U of the midpoint evaluation
    sigmas = _ve_sigmas()
    draws, noise = _shared_noise(8)
    x = _x(5, float(sigmas[0]))
    ours = K.sample_dpmpp_2s_ancestral_cfg_pp(ve_pair, x.clone(), sigmas, noise_sampler=noise)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = ve_pair(x, s.reshape(1))
        down, up = _split(s, s_next, 1.0)
        if down == 0:
            x = guided
        else:
            lam, lam_down = -s.log(), -down.log()
            s_mid = torch.exp(-(lam + lam_down) / 2)
            x_mid = (s_mid / s) * (x + guided - uncond) + (1 - s_mid / s) * guided
            guided_mid, uncond_mid = ve_pair(x_mid, s_mid.reshape(1))
            x = (down / s) * (x + guided - uncond_mid) + (1 - down / s) * guided_mid
        if s_next > 0:
            x = x + up * draws[i]
    assert _max_err(ours, x) <= 1e-10


def test_cfg_pp_dpmpp_2m_written_out() -> None:
    sigmas = _ve_sigmas()
    x = _x(6, float(sigmas[0]))
    ours = K.sample_dpmpp_2m_cfg_pp(ve_pair, x.clone(), sigmas)
    old_uncond, h_last = None, None
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = ve_pair(x, s.reshape(1))
        if s_next == 0:
            x = guided
            continue
        h = torch.log(s / s_next)
        x_new = guided + torch.exp(-h) * (x - uncond)
        if old_uncond is not None:
            x_new = x_new - torch.expm1(-h) * h / (2 * h_last) * (guided - old_uncond)
        x, old_uncond, h_last = x_new, uncond, h
    assert _max_err(ours, x) <= 1e-10


@pytest.mark.parametrize(
    "cfg_pp,base,noise_draws",
    [(K.sample_euler_cfg_pp, K.sample_euler, 0), (K.sample_euler_ancestral_cfg_pp, K.sample_euler_ancestral, 8),
     (K.sample_dpmpp_2m_cfg_pp, K.sample_dpmpp_2m, 0), (K.sample_res_multistep_cfg_pp, K.sample_res_multistep, 0),
     (K.sample_res_multistep_ancestral_cfg_pp, K.sample_res_multistep_ancestral, 8),
     (K.sample_gradient_estimation_cfg_pp, K.sample_gradient_estimation, 0)],
)
def test_cfg_pp_samplers_are_their_base_sampler_when_uncond_is_the_guided_prediction(
        cfg_pp: Callable, base: Callable, noise_draws: int) -> None:
    sigmas = _ve_sigmas()
    kw = lambda: {"noise_sampler": _shared_noise(noise_draws)[1]} if noise_draws else {}  # noqa: E731
    ours = cfg_pp(same_pair(ve_model), _x(7, 14.6), sigmas, **kw())
    assert _max_err(ours, base(ve_model, _x(7, 14.6), sigmas, **kw())) <= 1e-9


# ------------------------------------------------------------------------ res_multistep, gradient estimation


def _reference_res(pair: Callable, x: torch.Tensor, sigmas: torch.Tensor, eta: float, cfg_pp: bool,
                   draws: list[torch.Tensor]) -> torch.Tensor:
    """RES 2nd-order multistep (arXiv 2308.02157) in -log sigma, steps to sigma_down, then noise."""
    old, old_down = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = pair(x, s.reshape(1))
        down, up = _split(s, s_next, eta) if eta else (s_next, torch.zeros(()))
        if down == 0 or old is None:
            x = guided + down * (x - uncond) / s if cfg_pp else guided + (down / s) * (x - guided)
        else:
            h = torch.log(s / down)
            c2 = torch.log(old_down / sigmas[i - 1]) / h  # (lambda_prev - lambda_old_down) / h
            phi1 = (1 - torch.exp(-h)) / h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            start = x + guided - uncond if cfg_pp else x
            x = torch.exp(-h) * start + h * (b1 * (uncond if cfg_pp else guided) + b2 * old)
        if s_next > 0 and up > 0:
            x = x + up * draws[i]
        old, old_down = (uncond if cfg_pp else guided), down
    return x


@pytest.mark.parametrize(
    "sampler,eta,cfg_pp",
    [(K.sample_res_multistep, 0.0, False), (K.sample_res_multistep_cfg_pp, 0.0, True),
     (K.sample_res_multistep_ancestral, 1.0, False), (K.sample_res_multistep_ancestral_cfg_pp, 1.0, True),
     (K.sample_res_multistep_ancestral, 0.4, False)],
)
def test_res_multistep_family_written_out(sampler: Callable, eta: float, cfg_pp: bool) -> None:
    sigmas = _ve_sigmas()
    draws, noise = _shared_noise(8)
    kw = {"noise_sampler": noise} if "noise_sampler" in inspect.signature(sampler).parameters else {}
    if eta not in (0.0, 1.0):
        kw["eta"] = eta
    x = _x(9, 14.6)
    ours = sampler(ve_pair if cfg_pp else ve_model, x.clone(), sigmas, **kw)
    ref = _reference_res(ve_pair if cfg_pp else same_pair(ve_model), x.clone(), sigmas, eta, cfg_pp, draws)
    assert _max_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("cfg_pp", [False, True])
def test_gradient_estimation_written_out(cfg_pp: bool) -> None:
    # Euler on d, corrected by (gamma - 1)(d - d_prev) dt; CFG++: d from U and the Euler part from D
    sigmas, gamma = _ve_sigmas(), 2.0
    x = _x(10, 14.6)
    if cfg_pp:
        ours = K.sample_gradient_estimation_cfg_pp(ve_pair, x.clone(), sigmas)
    else:
        ours = K.sample_gradient_estimation(ve_model, x.clone(), sigmas)
    pair = ve_pair if cfg_pp else same_pair(ve_model)
    d_prev = None
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = pair(x, s.reshape(1))
        d = (x - uncond) / s
        if s_next == 0:
            x = guided
        else:
            x = guided + d * s_next
            if d_prev is not None:
                x = x + (gamma - 1) * (d - d_prev) * (s_next - s)
        d_prev = d
    assert _max_err(ours, x) <= 1e-10


# ------------------------------------------------------------------------- ODE solvers in sigma


def test_heunpp2_written_out() -> None:
    sigmas = _ve_sigmas(9)
    x = _x(11, 14.6)
    ours = K.sample_heunpp2(ve_model, x.clone(), sigmas)
    d_of = lambda x, s: (x - ve_model(x, s.reshape(1))) / s  # noqa: E731
    for i in range(9):
        s, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        d = d_of(x, s)
        if i == 8:  # the step to the last sigma is Euler
            x = x + d * dt
        elif i == 7:  # one sigma ahead: weight sigma_next / (2 sigma_0) on the derivative there
            d2 = d_of(x + d * dt, sigmas[i + 1])
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:  # two sigmas ahead, by two Euler steps
            x2 = x + d * dt
            d2 = d_of(x2, sigmas[i + 1])
            d3 = d_of(x2 + d2 * (sigmas[i + 2] - sigmas[i + 1]), sigmas[i + 2])
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    assert _max_err(ours, x) <= 1e-10


def test_ipndm_written_out_with_adams_bashforth_weights() -> None:
    sigmas = _ve_sigmas(9)
    x = _x(12, 14.6)
    ours = K.sample_ipndm(ve_model, x.clone(), sigmas)
    ds: list[torch.Tensor] = []
    for i in range(9):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = ve_model(x, s.reshape(1))
        ds.insert(0, (x - denoised) / s)
        order = min(4, i + 1)
        if s_next == 0:
            x = denoised
        elif order == 1:
            x = x + (s_next - s) * ds[0]
        elif order == 2:
            x = x + (s_next - s) * (3 * ds[0] - ds[1]) / 2
        elif order == 3:
            x = x + (s_next - s) * (23 * ds[0] - 16 * ds[1] + 5 * ds[2]) / 12
        else:
            x = x + (s_next - s) * (55 * ds[0] - 59 * ds[1] + 37 * ds[2] - 9 * ds[3]) / 24
    assert _max_err(ours, x) <= 1e-10


def _ipndm_v_reference_weights(t: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    # iPNDM-v's coefficients (diff-solvers, as ComfyUI has them), in their notation h_n, h_n_1, ...
    h_n = t[i + 1] - t[i]
    if order == 1:
        return [torch.ones(())]
    h_n_1 = t[i] - t[i - 1]
    if order == 2:
        return [(2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2]
    h_n_2 = t[i - 1] - t[i - 2]
    temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return [(2 + h_n / h_n_1) / 2 + temp, -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp, temp * h_n_1 / h_n_2]
    h_n_3 = t[i - 2] - t[i - 3]
    q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
             * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
    return [(2 + h_n / h_n_1) / 2 + temp + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp - (1 + h_n_1 / h_n_2 + q) * temp2,
            temp * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + q * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * q * h_n_1 / h_n_2]


def test_ipndm_v_weights_and_run_written_out() -> None:
    sigmas = _ve_sigmas(9)
    sig = sigmas.numpy()
    for order in (1, 2, 3, 4):
        weights = K.ipndm_v_weights(sigmas, 4, order)
        ref = _ipndm_v_reference_weights(sigmas, 4, order)
        assert [float(w) for w in weights] == pytest.approx([float(r) for r in ref], abs=1e-12)
        if order < 4:
            assert float(sum(weights)) == pytest.approx(1.0, abs=1e-12)  # consistent: exact for constant d
    # the 4th-order weights sum to 1 + t2 q (h2/h3 - h1/h2), not 1, where the step ratios change
    # (ComfyUI's and diff-solvers' formula, kept so that the images are ComfyUI's)
    h = [float(sigmas[5 - k] - sigmas[4 - k]) for k in range(4)]
    *_, w4 = _ipndm_v_reference_weights(sigmas, 4, 4)
    q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    t2 = float(-w4) / (q * h[1] / h[2])
    assert float(sum(K.ipndm_v_weights(sigmas, 4, 4))) == pytest.approx(1 + t2 * q * (h[2] / h[3] - h[1] / h[2]),
                                                                       abs=1e-12)
    # order 2 is the exact variable-step Adams-Bashforth rule; on equal steps order 3 is iPNDM's AB3
    h = sig[5] - sig[4]
    assert [float(w) * h for w in K.ipndm_v_weights(sigmas, 4, 2)] == pytest.approx(
        [K.lms_coefficient(2, sig, 4, j) for j in range(2)], abs=1e-12)
    equal = torch.linspace(10.0, 2.0, 9, dtype=torch.float64)
    assert [float(w) for w in K.ipndm_v_weights(equal, 4, 3)] == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    # ...but for order 4 the formula is not Adams-Bashforth's (55, -59, 37, -9) / 24 on equal steps either
    assert [float(w) for w in K.ipndm_v_weights(equal, 4, 4)] == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24])
    x = _x(13, 14.6)
    ours = K.sample_ipndm_v(ve_model, x.clone(), sigmas)
    ds: list[torch.Tensor] = []
    for i in range(9):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = ve_model(x, s.reshape(1))
        ds.insert(0, (x - denoised) / s)
        if s_next == 0:
            x = denoised
        else:
            x = x + (s_next - s) * sum(w * d for w, d in zip(_ipndm_v_reference_weights(sigmas, i, min(4, i + 1)), ds))
    assert _max_err(ours, x) <= 1e-10


def _deis_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma of the DEIS time: the VP-SDE with linear beta through sigma(1e-3) = 0.002, sigma(1) = 80."""
    log_min, log_max = math.log(1 + 0.002**2), math.log(1 + 80.0**2)
    beta_d = 2 * (log_min / 1e-3 - log_max) / (1e-3 - 1)
    beta_min = log_max - 0.5 * beta_d
    return torch.sqrt(torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def _deis_reference_weights(sigmas: torch.Tensor, i: int, order: int, points: int = 200001) -> list[float]:
    # the Lagrange basis in the DEIS time, integrated against dsigma with a fine trapezoid rule in t
    t_nodes = K.deis_time(sigmas[[i - k for k in range(order)]])
    t = torch.linspace(float(K.deis_time(sigmas[i])), float(K.deis_time(sigmas[i + 1])), points, dtype=torch.float64)
    sig = _deis_sigma(t)
    out = []
    for j in range(order):
        basis = torch.ones_like(t)
        for k in range(order):
            if k != j:
                basis = basis * (t - t_nodes[k]) / (t_nodes[j] - t_nodes[k])
        out.append(float(torch.trapezoid(basis, sig)))
    return out


def test_deis_time_weights_and_run_written_out() -> None:
    sig = torch.tensor([0.002, 0.03, 1.0, 14.6, 80.0], dtype=torch.float64)
    assert torch.allclose(_deis_sigma(K.deis_time(sig)), sig, rtol=1e-10)
    assert float(K.deis_time(torch.tensor(0.002, dtype=torch.float64))) == pytest.approx(1e-3, rel=1e-9)
    assert float(K.deis_time(torch.tensor(80.0, dtype=torch.float64))) == pytest.approx(1.0, rel=1e-9)
    sigmas = _ve_sigmas(9)
    for i, order in [(1, 2), (4, 3), (7, 3)]:
        weights = K.deis_weights(sigmas, i, order)
        assert weights == pytest.approx(_deis_reference_weights(sigmas, i, order), rel=1e-7, abs=1e-9)
        assert sum(weights) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=1e-10)
        # ComfyUI sums 10,000 points of the integrand in t (both ends included): the same to ~1e-4
        t = torch.linspace(float(K.deis_time(sigmas[i])), float(K.deis_time(sigmas[i + 1])), 10000,
                           dtype=torch.float64)
        dsigma_dt = torch.func.vmap(torch.func.grad(lambda u: _deis_sigma(u)))(t)
        t_nodes = K.deis_time(sigmas[[i - k for k in range(order)]])
        for j in range(order):
            basis = math.prod((t - t_nodes[k]) / (t_nodes[j] - t_nodes[k]) for k in range(order) if k != j)
            comfy = float((dsigma_dt * basis).sum() * (t[-1] - t[0]) / 10000)
            assert weights[j] == pytest.approx(comfy, rel=2e-3, abs=1e-6)
    x = _x(14, 14.6)
    ours = K.sample_deis(ve_model, x.clone(), sigmas)
    ds: list[torch.Tensor] = []
    for i in range(9):
        s, s_next = sigmas[i], sigmas[i + 1]
        ds.insert(0, (x - ve_model(x, s.reshape(1))) / s)
        order = 1 if s_next == 0 else min(3, i + 1)
        if order == 1:
            x = x + (s_next - s) * ds[0]
        else:
            x = x + sum(w * d for w, d in zip(_deis_reference_weights(sigmas, i, order), ds))
    assert _max_err(ours, x) <= 1e-7


@pytest.mark.parametrize("steps,orders", [(1, [1]), (2, [2]), (3, [2, 1]), (4, [3, 1]), (5, [3, 2]),
                                          (6, [3, 2, 1]), (7, [3, 3, 1]), (8, [3, 3, 2])])
def test_dpm_fast_written_out_spends_one_model_call_per_step(steps: int, orders: list[int]) -> None:
    # DPM-Solver-1/2/3 (Lu et al. 2022, eqs. 3.4-3.6 / Alg. 1-2 in VE form: alpha = 1, t = -log sigma) on
    # eps = (x - D) / sigma, uniform in t from sigmas[0] to the last nonzero sigma
    sigmas = S.sigmas_karras(steps, 0.03, 14.6).to(torch.float64)
    calls: list[float] = []

    def counting(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        return ve_model(x, sigma)

    x = _x(15, 14.6)
    ours = K.sample_dpm_fast(counting, x.clone(), sigmas)
    assert len(calls) == steps
    sig = lambda t: torch.exp(-t)  # noqa: E731
    eps = lambda x, t: (x - ve_model(x, sig(t).reshape(1))) / sig(t)  # noqa: E731
    last = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
    ts = torch.linspace(float(-sigmas[0].log()), float(-last.log()), len(orders) + 1, dtype=torch.float64)
    for order, t, t_next in zip(orders, ts[:-1], ts[1:]):
        h = t_next - t
        e = eps(x, t)
        if order == 1:
            x = x - sig(t_next) * torch.expm1(h) * e
        elif order == 2:
            s1 = t + h / 2
            e1 = eps(x - sig(s1) * torch.expm1(h / 2) * e, s1)
            x = x - sig(t_next) * torch.expm1(h) * e - sig(t_next) * torch.expm1(h) * (e1 - e)
        else:
            s1, s2 = t + h / 3, t + 2 * h / 3
            e1 = eps(x - sig(s1) * torch.expm1(h / 3) * e, s1)
            u2 = (x - sig(s2) * torch.expm1(2 * h / 3) * e
                  - sig(s2) * 2 * (torch.expm1(2 * h / 3) / (2 * h / 3) - 1) * (e1 - e))
            e2 = eps(u2, s2)
            x = x - sig(t_next) * torch.expm1(h) * e - sig(t_next) * 1.5 * (torch.expm1(h) / h - 1) * (e2 - e)
    assert _max_err(ours, x) <= 1e-10


def test_dpm_adaptive_written_out_with_its_step_size_controller() -> None:
    # DPM-Solver-23: a 2nd- and a 3rd-order step share their evaluations; their scaled RMS difference E
    # steers h by the factor 1 + atan(E^(-1/3) - 1) (integral control), a step is kept when the factor is
    # at least 0.81; from h = 0.05 in t = -log sigma to the last nonzero sigma
    sigmas = _ve_sigmas(10)
    x = _x(16, 14.6)
    ours = K.sample_dpm_adaptive(ve_model, x.clone(), sigmas)
    sig = lambda t: torch.exp(-t)  # noqa: E731
    eps = lambda x, t: (x - ve_model(x, sig(t).reshape(1))) / sig(t)  # noqa: E731
    s, t_end, h, x_prev, kept = -sigmas[0].log(), -sigmas[-2].log(), 0.05, x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + h)
        step = t - s
        e = eps(x, s)
        s1, s2 = s + step / 3, s + 2 * step / 3
        e1 = eps(x - sig(s1) * torch.expm1(step / 3) * e, s1)
        x_low = x - sig(t) * torch.expm1(step) * e - sig(t) * 1.5 * torch.expm1(step) * (e1 - e)
        u2 = (x - sig(s2) * torch.expm1(2 * step / 3) * e
              - sig(s2) * 2 * (torch.expm1(2 * step / 3) / (2 * step / 3) - 1) * (e1 - e))
        x_high = x - sig(t) * torch.expm1(step) * e - sig(t) * 1.5 * (torch.expm1(step) / step - 1) * (eps(u2, s2) - e)
        scale = torch.maximum(torch.tensor(0.0078, dtype=torch.float64),
                              0.05 * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.sqrt(((x_low - x_high) / scale).pow(2).mean()))
        factor = 1 + math.atan((1 / (error + 1e-8)) ** (1 / 3) - 1)
        if factor >= 0.81:
            x_prev, x, s, kept = x_low, x_high, t, kept + 1
        h *= factor
    assert kept >= 3
    assert _max_err(ours, x) <= 1e-10


# ------------------------------------------------------------------ SEEDS, exponential Heun, ER-SDE


def _reference_seeds_2(x: torch.Tensor, sigmas: torch.Tensor, eta: float, r: float, phi_2: bool,
                       noise: Callable | None, lam: Callable, alpha: Callable, sigma_of: Callable,
                       model: Callable) -> torch.Tensor:
    """SEEDS-2 (arXiv 2305.14267) in data prediction with the half-log-SNR lam and signal scale alpha."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = model(x, s.reshape(1))
        if s_next == 0:
            x = d
            continue
        h = lam(s_next) - lam(s)
        h_eta = h * (1 + eta)
        s_1 = sigma_of(lam(s) + r * h)
        x_1 = (s_1 / s) * torch.exp(-r * h * eta) * x + alpha(s_1) * (1 - torch.exp(-r * h_eta)) * d
        z = None
        if noise is not None and eta > 0:
            z = torch.sqrt(1 - torch.exp(-2 * r * h * eta)) * noise(s, s_1)
            x_1 = x_1 + s_1 * z
        d_1 = model(x_1, s_1.reshape(1))
        if phi_2:  # b2 = h' phi_2(-h') / r with phi_2(z) = (e^z - 1 - z) / z^2
            b2 = (torch.exp(-h_eta) - 1 + h_eta) / (-h_eta) / r
            combined = (torch.expm1(-h_eta) - b2) / torch.expm1(-h_eta) * d + b2 / torch.expm1(-h_eta) * d_1
        else:
            combined = d + (d_1 - d) / (2 * r)
        x = (s_next / s) * torch.exp(-h * eta) * x + alpha(s_next) * (1 - torch.exp(-h_eta)) * combined
        if z is not None:
            c = (r - 1) * h * eta
            z = z * torch.exp(c) + torch.sqrt(1 - torch.exp(2 * c)) * noise(s_1, s_next)
            x = x + s_next * z
    return x


VE_FORM = dict(lam=lambda s: -torch.log(s), alpha=lambda s: torch.ones_like(s), sigma_of=lambda l: torch.exp(-l),
               model=ve_model)
# ComfyUI's flow forms of these samplers: lambda = log((1 - sigma) / sigma), alpha = 1 - sigma
FLOW_FORM = dict(lam=lambda s: torch.log((1 - s) / s), alpha=lambda s: 1 - s, sigma_of=lambda l: torch.sigmoid(-l),
                 model=flow_model)


@pytest.mark.parametrize("form", ["ve", "flow"])
@pytest.mark.parametrize(
    "sampler,eta,r,phi_2",
    [(K.sample_seeds_2, 1.0, 0.5, False), (K.sample_seeds_2, 0.4, 0.5, False), (K.sample_exp_heun_2_x0, 0.0, 1.0, True),
     (K.sample_exp_heun_2_x0_sde, 1.0, 1.0, True)],
)
def test_seeds_2_and_exp_heun_written_out_ve_and_flow(sampler: Callable, eta: float, r: float, phi_2: bool,
                                                       form: str) -> None:
    sigmas = _ve_sigmas() if form == "ve" else _flow_sigmas()
    forms = VE_FORM if form == "ve" else FLOW_FORM
    kw: dict = {"noise_form": FLOW} if form == "flow" else {}
    if form == "flow":
        sigmas = sigmas.clone()
        sigmas[0] = 1 - 1e-4  # sigma 1 (lambda = -inf) starts just below it
    stochastic = "noise_sampler" in inspect.signature(sampler).parameters
    if stochastic:
        kw |= {"noise_sampler": _shared_noise(16)[1], "eta": eta}
    x = _x(17, float(sigmas[0]) if form == "ve" else 1.0)
    ours = sampler(forms["model"], x.clone(), sigmas, **kw)
    ref = _reference_seeds_2(x.clone(), sigmas, eta, r, phi_2, _shared_noise(16)[1] if stochastic else None, **forms)
    assert _max_err(ours, ref) <= 1e-9


@pytest.mark.parametrize("form", ["ve", "flow"])
def test_seeds_3_written_out_ve_and_flow(form: str) -> None:
    sigmas = _ve_sigmas() if form == "ve" else _flow_sigmas()
    f = VE_FORM if form == "ve" else FLOW_FORM
    if form == "flow":
        sigmas = sigmas.clone()
        sigmas[0] = 1 - 1e-4
    lam, alpha, sigma_of, model = f["lam"], f["alpha"], f["sigma_of"], f["model"]
    eta, r1, r2 = 1.0, 1 / 3, 2 / 3
    x = _x(18, float(sigmas[0]) if form == "ve" else 1.0)
    ours = K.sample_seeds_3(model, x.clone(), sigmas, noise_sampler=_shared_noise(24)[1],
                            noise_form=FLOW if form == "flow" else K.NoiseForm.VE)
    _, noise = _shared_noise(24)
    phi2 = lambda z: (torch.exp(z) - 1 - z) / z  # noqa: E731  (h phi_2(h) at z = h)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = model(x, s.reshape(1))
        if s_next == 0:
            x = d
            continue
        h = lam(s_next) - lam(s)
        he = h * (1 + eta)
        s1, s2 = sigma_of(lam(s) + r1 * h), sigma_of(lam(s) + r2 * h)
        x1 = (s1 / s) * torch.exp(-r1 * h * eta) * x - alpha(s1) * torch.expm1(-r1 * he) * d
        z = torch.sqrt(-torch.expm1(-2 * r1 * h * eta)) * noise(s, s1)
        d1 = model(x1 + s1 * z, s1.reshape(1))
        a = r2 / r1 * phi2(-r2 * he)
        x2 = (s2 / s) * torch.exp(-r2 * h * eta) * x - alpha(s2) * ((torch.expm1(-r2 * he) - a) * d + a * d1)
        c = (r1 - r2) * h * eta
        z = z * torch.exp(c) + torch.sqrt(-torch.expm1(2 * c)) * noise(s1, s2)
        d2 = model(x2 + s2 * z, s2.reshape(1))
        b = phi2(-he) / r2
        x = (s_next / s) * torch.exp(-h * eta) * x - alpha(s_next) * ((torch.expm1(-he) - b) * d + b * d2)
        c = (r2 - 1) * h * eta
        z = z * torch.exp(c) + torch.sqrt(-torch.expm1(2 * c)) * noise(s2, s_next)
        x = x + s_next * z
    assert _max_err(ours, x) <= 1e-9


@pytest.mark.parametrize("form", ["ve", "flow"])
def test_er_sde_written_out_ve_and_flow(form: str) -> None:
    # ER-SDE-Solver-3 on the VE noise level lam = sigma / alpha (for flow: ComfyUI's er_lambda), with
    # f(l) = l (e^(l^0.3) + 10) and its stage integrals as left Riemann sums of 200 points from lam_next
    sigmas = _ve_sigmas() if form == "ve" else _flow_sigmas()
    f = VE_FORM if form == "ve" else FLOW_FORM
    if form == "flow":
        sigmas = sigmas.clone()
        sigmas[0] = 1 - 1e-4
    alpha, model = f["alpha"], f["model"]
    x = _x(19, float(sigmas[0]) if form == "ve" else 1.0)
    ours = K.sample_er_sde(model, x.clone(), sigmas, noise_sampler=_shared_noise(8)[1],
                           noise_form=FLOW if form == "flow" else K.NoiseForm.VE)
    draws, _ = _shared_noise(8)
    fn = lambda l: l * (torch.exp(l**0.3) + 10)  # noqa: E731
    lams = sigmas / alpha(sigmas)
    old_d, old_slope = None, None
    for i in range(8):
        d = model(x, sigmas[i].reshape(1))
        if sigmas[i + 1] == 0:
            x = d
            old_d = d
            continue
        l, l_next = lams[i], lams[i + 1]
        a_next = alpha(sigmas[i + 1])
        r = fn(l_next) / fn(l)
        x = (a_next / alpha(sigmas[i])) * r * x + a_next * (1 - r) * d
        if i >= 1:
            width = (l - l_next) / 200
            pts = l_next + width * torch.arange(200, dtype=torch.float64)
            s1 = sum(width / fn(p) for p in pts)
            slope = (d - old_d) / (l - lams[i - 1])
            x = x + a_next * ((l_next - l) + s1 * fn(l_next)) * slope
            if i >= 2:
                s2 = sum(width * (p - l) / fn(p) for p in pts)
                curvature = (slope - old_slope) / ((l - lams[i - 2]) / 2)
                x = x + a_next * ((l_next - l) ** 2 / 2 + s2 * fn(l_next)) * curvature
            old_slope = slope
        x = x + a_next * torch.sqrt(torch.clamp(l_next**2 - l**2 * r**2, min=0)) * draws[i]
        old_d = d
    assert _max_err(ours, x) <= 1e-9


# ------------------------------------------------------------------------------------------ SA-Solver


def test_sa_solver_weights_are_the_integrals_of_the_lagrange_basis() -> None:
    lambdas = torch.tensor([-2.0, -1.2, -0.5, 0.1], dtype=torch.float64)
    u = torch.linspace(0.1, 0.9, 400001, dtype=torch.float64)
    for tau in (0.0, 1.0):
        for k in (1, 2, 3, 4):
            nodes = lambdas[-k:]
            weights = K.sa_solver_weights(nodes, torch.tensor(0.1, dtype=torch.float64),
                                          torch.tensor(0.9, dtype=torch.float64), tau)
            kernel = (1 + tau**2) * torch.exp(-(1 + tau**2) * (0.9 - u))
            for j in range(k):
                basis = math.prod((u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)
                assert float(weights[j]) == pytest.approx(float(torch.trapezoid(kernel * basis, u)), abs=1e-10)
            # constant data: the weights sum to the integral of the kernel, 1 - e^(-(1 + tau^2) h)
            assert float(weights.sum()) == pytest.approx(-math.expm1(-(1 + tau**2) * 0.8), abs=1e-12)


def _reference_sa_solver(x: torch.Tensor, sigmas: torch.Tensor, model: Callable, draws: list[torch.Tensor],
                         interval: tuple[float, float], eta: float, pece: bool) -> torch.Tensor:
    """SA-Solver (arXiv 2309.05019), data prediction, VE form: predictor of order up to 3, corrector up to
    4, orders lowered towards a final sigma of 0, noise tau = eta inside the interval."""
    lam = -torch.log(sigmas)
    n = len(sigmas) - 1
    preds, x_pred, tau, h, z = [], x, 0.0, 0.0, None
    draws = list(draws)  # drawn on the noisy steps only, in order

    def weights(nodes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float) -> list[torch.Tensor]:
        u = torch.linspace(float(a), float(b), 100001, dtype=torch.float64)
        kernel = (1 + tau**2) * torch.exp(-(1 + tau**2) * (b - u))
        return [torch.trapezoid(kernel * math.prod((u - nodes[m]) / (nodes[j] - nodes[m])
                                                   for m in range(len(nodes)) if m != j), u)
                for j in range(len(nodes))]

    for i in range(n):
        d = model(x_pred, sigmas[i].reshape(1))
        preds = (preds + [d])[-4:]
        p = min(3, len(preds), n - 1 - i)
        c = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(4, len(preds), n - i)
        if c == 0:
            x = x_pred
        else:
            w = weights(lam[i - c + 1: i + 1], lam[i - 1], lam[i], tau)
            x = (sigmas[i] / sigmas[i - 1]) * math.exp(-tau**2 * h) * x + sum(wj * dj for wj, dj in zip(w, preds[-c:]))
            if z is not None:
                x = x + z
            if pece:
                preds[-1] = model(x, sigmas[i].reshape(1))
        if sigmas[i + 1] == 0:
            x_pred = preds[-1]
            continue
        tau = eta if interval[0] >= sigmas[i + 1] > interval[1] else 0.0
        h = float(lam[i + 1] - lam[i])
        w = weights(lam[i - p + 1: i + 1], lam[i], lam[i + 1], tau)
        x_pred = (sigmas[i + 1] / sigmas[i]) * math.exp(-tau**2 * h) * x + sum(wj * dj for wj, dj in zip(w, preds[-p:]))
        z = None
        if tau > 0:
            z = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h)) * draws.pop(0)
            x_pred = x_pred + z
    return x_pred


@pytest.mark.parametrize("sampler,pece", [(K.sample_sa_solver, False), (K.sample_sa_solver_pece, True)])
def test_sa_solver_written_out(sampler: Callable, pece: bool) -> None:
    ms = ModelSampling.for_prediction("eps")
    sigmas = _ve_sigmas(10)
    x = _x(20, 14.6)
    draws, noise = _shared_noise(10)
    ours = sampler(ve_model, x.clone(), sigmas, noise_sampler=noise, percent_to_sigma=ms.percent_to_sigma)
    interval = (ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8))
    assert interval[0] > 1 > interval[1]  # noise on the middle of the schedule only
    ref = _reference_sa_solver(x.clone(), sigmas, ve_model, draws, interval, 1.0, pece)
    assert _max_err(ours, ref) <= 1e-7


# ------------------------------------------------------------------------------------------- flow forms


def _rescaled_ve(model: Callable) -> Callable:
    """The flow model seen as the VE process x / alpha with sigma / alpha."""
    def ve(x_ve: torch.Tensor, s: torch.Tensor) -> object:
        sigma = s / (1 + s)
        return model(x_ve * _col(1 - sigma, x_ve), sigma)
    return ve


@pytest.mark.parametrize(
    "sampler,draws,cfg_pp",
    [(K.sample_euler_cfg_pp, 0, True), (K.sample_euler_ancestral_cfg_pp, 1, True),
     (K.sample_dpmpp_2s_ancestral_cfg_pp, 1, True), (K.sample_dpmpp_2m_cfg_pp, 0, True),
     (K.sample_res_multistep_cfg_pp, 0, True), (K.sample_res_multistep_ancestral, 1, False),
     (K.sample_res_multistep_ancestral_cfg_pp, 1, True), (K.sample_gradient_estimation_cfg_pp, 0, True),
     (K.sample_seeds_2, 2, False), (K.sample_seeds_3, 3, False), (K.sample_exp_heun_2_x0, 0, False),
     (K.sample_exp_heun_2_x0_sde, 2, False), (K.sample_er_sde, 1, False), (K.sample_sa_solver, 1, False),
     (K.sample_sa_solver_pece, 1, False)],
)
def test_flow_form_written_out_as_the_ve_form_on_the_rescaled_process(sampler: Callable, draws: int,
                                                                      cfg_pp: bool) -> None:
    # x = (1 - s) x0 + s n divided by 1 - s is the VE process with sigma s / (1 - s) and the same
    # denoised estimates: samplers that add noise or use U take their flow form from it
    sigmas = _flow_sigmas(12)
    sigmas[0] = 0.97  # a finite VE-equivalent start
    model = flow_pair if cfg_pp else flow_model
    x = _x(21)
    kw: dict = {}
    if draws:
        kw["noise_sampler"] = _shared_noise(12 * draws)[1]
    if "percent_to_sigma" in inspect.signature(sampler).parameters:
        ms = ModelSampling.flow(3.0)
        kw["percent_to_sigma"] = ms.percent_to_sigma
    ours = sampler(model, x.clone(), sigmas, noise_form=FLOW, **kw)
    if draws:
        kw["noise_sampler"] = _shared_noise(12 * draws)[1]
    if "percent_to_sigma" in kw:
        kw["percent_to_sigma"] = lambda p: ms.percent_to_sigma(p) / (1 - ms.percent_to_sigma(p))
    ve = sampler(_rescaled_ve(model), x.clone() / (1 - sigmas[0]), sigmas / (1 - sigmas), **kw)
    assert _max_err(ours, ve) <= 1e-9


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_euler_ancestral_cfg_pp_flow_written_out_in_comfyui_flow_form(eta: float) -> None:
    # ComfyUI's flow formula: alpha = 1 - sigma; the split on the VE levels sigma / alpha, scaled back by alpha
    sigmas = _flow_sigmas()
    sigmas[0] = 1 - 1e-4
    draws, noise = _shared_noise(8)
    x = _x(22)
    if eta:
        ours = K.sample_euler_ancestral_cfg_pp(flow_pair, x.clone(), sigmas, noise_sampler=noise, noise_form=FLOW)
    else:
        ours = K.sample_euler_cfg_pp(flow_pair, x.clone(), sigmas, noise_form=FLOW)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided, uncond = flow_pair(x, s.reshape(1))
        if s_next == 0:
            x = guided
            continue
        a, a_next = 1 - s, 1 - s_next
        down, up = _split(s / a, s_next / a_next, eta) if eta else (s_next / a_next, 0.0)
        x = a_next * guided + a_next * down * (x - a * uncond) / s + a_next * up * draws[i]
    assert _max_err(ours, x) <= 1e-9


@pytest.mark.parametrize(
    "sampler,kw",
    [(K.sample_heunpp2, {}), (K.sample_ipndm, {}), (K.sample_ipndm_v, {}), (K.sample_deis, {}),
     (K.sample_dpm_fast, {}), (K.sample_dpm_adaptive, {}), (K.sample_res_multistep, {}),
     (K.sample_gradient_estimation, {})],
)
def test_flow_form_written_out_as_the_same_sigma_ode_step(sampler: Callable, kw: dict) -> None:
    # these are written in sigma (and -log sigma) alone: (x - D) / sigma is dx/dsigma in both forms, so
    # ComfyUI runs flow models through the same formula; each is checked written out in VE form above
    sigmas = _flow_sigmas()
    sigmas[0] = 0.98
    x = _x(23)
    ours = sampler(flow_model, x.clone(), sigmas, noise_form=FLOW, **kw)
    assert _max_err(ours, sampler(flow_model, x.clone(), sigmas, noise_form=K.NoiseForm.VE, **kw)) == 0.0


# ------------------------------------------------------------------------ behaviour on Gaussian data


VAR = 0.5


def gaussian_ve(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _col(sigma, x)
    return x * VAR / (VAR + s**2)


def gaussian_flow(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _col(sigma, x)
    return x * (1 - s) * VAR / ((1 - s) ** 2 * VAR + s**2)


def _flow_var(s: float) -> float:
    return (1 - s) ** 2 * VAR + s**2


def _eta0(sampler: Callable, **extra: object) -> Callable:
    return lambda m, x, s, **kw: sampler(m, x, s, eta=0.0, **extra, **kw)


# observed orders on these runs; the expected values are the methods' orders, or less where a first
# or last step of lower order caps it (heunpp2 and gradient estimation weight their stages by sigma)
CONVERGENCE = [
    (K.sample_res_multistep, 2), (K.sample_exp_heun_2_x0, 2), (_eta0(K.sample_seeds_2), 2),
    (_eta0(K.sample_seeds_3), 3), (K.sample_ipndm, 2), (K.sample_ipndm_v, 2), (K.sample_deis, 3),
    (K.sample_heunpp2, 1), (K.sample_gradient_estimation, 1), (_eta0(K.sample_res_multistep_ancestral), 2),
    (_eta0(K.sample_dpmpp_2m_sde_heun), 2), (_eta0(K.sample_sa_solver, percent_to_sigma=lambda p: 1.0), 3),
    (_eta0(K.sample_sa_solver_pece, percent_to_sigma=lambda p: 1.0), 3),
    (lambda m, x, s, **kw: K.sample_uni_pc(m, x, s, order=2, **kw), 2),
]


@pytest.mark.parametrize("sampler,order", CONVERGENCE)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(sampler: Callable, order: int) -> None:
    x0 = _x(24, 10.0)
    exact = x0 * math.sqrt((VAR + 0.1**2) / (VAR + 10.0**2))
    errs = []
    for n in (20, 40):
        sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.1), n + 1, dtype=torch.float64))
        errs.append(_max_err(sampler(gaussian_ve, x0.clone(), sigmas), exact))
    assert errs[1] < 0.05 * exact.abs().max().item()
    assert errs[0] / errs[1] > 2**order * 0.7, errs


@pytest.mark.parametrize("sampler,order", CONVERGENCE)
def test_deterministic_samplers_converge_to_the_exact_flow_ode_solution(sampler: Callable, order: int) -> None:
    s0, s_end = 0.95, 0.05
    x0 = _x(25) * math.sqrt(_flow_var(s0))
    exact = x0 * math.sqrt(_flow_var(s_end) / _flow_var(s0))
    errs = []
    for n in (20, 40):
        lam = torch.linspace(math.log((1 - s0) / s0), math.log((1 - s_end) / s_end), n + 1, dtype=torch.float64)
        errs.append(_max_err(sampler(gaussian_flow, x0.clone(), torch.sigmoid(-lam), noise_form=FLOW), exact))
    assert errs[1] < 0.05 * exact.abs().max().item()
    assert errs[0] / errs[1] > 2**order * 0.7, errs


STOCHASTIC = [
    (K.sample_euler_ancestral_cfg_pp, True), (K.sample_res_multistep_ancestral, False),
    (K.sample_res_multistep_ancestral_cfg_pp, True), (K.sample_seeds_2, False), (K.sample_seeds_3, False),
    (K.sample_exp_heun_2_x0_sde, False), (K.sample_er_sde, False), (K.sample_dpmpp_2m_sde_heun, False),
    (K.sample_sa_solver, False), (K.sample_sa_solver_pece, False),
]


@pytest.mark.parametrize("form", ["ve", "flow"])
@pytest.mark.parametrize("sampler,cfg_pp", STOCHASTIC)
def test_stochastic_samplers_produce_the_data_distribution(sampler: Callable, cfg_pp: bool, form: str) -> None:
    # 80 (VE) and 120 (flow, from pure noise) Karras steps bring each within ~8% (seen: 0.46-0.50)
    g = torch.Generator().manual_seed(3)
    if form == "ve":
        sigmas, model = S.sigmas_karras(80, 0.03, 14.6).to(torch.float64), gaussian_ve
        ms = ModelSampling.for_prediction("eps")
        x = torch.randn(64, 1, 32, 32, generator=g, dtype=torch.float64) * sigmas[0]
    else:
        table = S.FlowSchedule(shift=3.0)
        sigmas, model = S.sigmas_karras(120, table.sigma_min, table.sigma_max).to(torch.float64), gaussian_flow
        ms = ModelSampling.flow(3.0)
        x = torch.randn(64, 1, 32, 32, generator=g, dtype=torch.float64)
    kw: dict = {"generator": g, "noise_form": FLOW if form == "flow" else K.NoiseForm.VE}
    if "percent_to_sigma" in inspect.signature(sampler).parameters:
        kw["percent_to_sigma"] = ms.percent_to_sigma
    out = sampler(same_pair(model) if cfg_pp else model, x, sigmas, **kw)
    assert torch.isfinite(out).all()
    assert out.var().item() == pytest.approx(VAR, rel=0.1)


# ---------------------------------------------------------------------------- the run and the guider


class _PairOnly:
    """A denoiser with an unconditional prediction, recording the x it is called with."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return ve_pair(x, sigma)[0]

    def denoise_with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.clone())
        return ve_pair(x.double(), sigma.double())


def test_run_passes_the_unconditional_prediction_to_cfg_pp_samplers_and_masks_it() -> None:
    sigmas = _ve_sigmas(6).float()
    latent, noise = _x(26).float() * 0.5, _x(27).float()
    with pytest.raises(SamplingError, match="unconditional prediction"):
        sample(ve_model, SamplerChoice("euler_cfg_pp"), sigmas, latent, noise)
    model = _PairOnly()
    out = sample(model, SamplerChoice("euler_cfg_pp"), sigmas, latent, noise)
    ref = K.sample_euler_cfg_pp(ve_pair, (latent + sigmas[0] * noise).double(), sigmas.double())
    assert len(model.seen) == 6 and _max_err(out.double(), ref) <= 1e-4
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[..., :, :2] = 1.0
    masked = sample(_PairOnly(), SamplerChoice("dpmpp_2m_cfg_pp"), sigmas, latent, noise, noise_mask=mask)
    assert torch.equal(masked[..., 2:], latent[..., 2:])
    assert not torch.allclose(masked[..., :2], latent[..., :2])


def test_run_gives_sa_solver_the_model_schedule_or_refuses() -> None:
    ms = ModelSampling.for_prediction("eps")
    sigmas = S.sigmas_karras(6, ms.sigma_min, ms.sigma_max)
    with pytest.raises(SamplingError, match="percent_to_sigma"):
        sample(ve_model, SamplerChoice("sa_solver"), sigmas, torch.zeros(SHAPE), _x(28).float())
    out = sample(ve_model, SamplerChoice("sa_solver"), sigmas, torch.zeros(SHAPE), _x(28).float(),
                 percent_to_sigma=ms.percent_to_sigma, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()


def test_cfg_guider_returns_the_unconditional_prediction_even_at_cfg_one() -> None:
    sampling = ModelSampling.for_prediction("eps")
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 3.0)
    only = lambda cond: CFGGuider(FakeUNet(), sampling, [cond], [], 1.0)(x, sigma)  # noqa: E731
    cond, uncond = only(entry(1.0)), only(entry(-1.0))
    guider = CFGGuider(FakeUNet(), sampling, [entry(1.0)], [entry(-1.0)], cfg=7.5)
    guided, unconditional = guider.denoise_with_uncond(x, sigma)
    torch.testing.assert_close(guided, guider(x, sigma))
    torch.testing.assert_close(unconditional, uncond)
    unet = FakeUNet()
    at_one = CFGGuider(unet, sampling, [entry(1.0)], [entry(-1.0)], cfg=1.0)
    guided, unconditional = at_one.denoise_with_uncond(x, sigma)
    assert [calls for calls, _ in unet.calls] == [4]  # both sides, in one batched call
    torch.testing.assert_close(guided, cond)
    torch.testing.assert_close(unconditional, uncond)
    with pytest.raises(GuidanceError, match="negative"):
        CFGGuider(FakeUNet(), sampling, [entry(1.0)], [], 1.0).denoise_with_uncond(x, sigma)


def test_ksampler_takes_one_more_step_and_drops_the_penultimate_sigma_for_dpm_2_and_uni_pc() -> None:
    from nodegraph_diffusion.nodes.sampling import ksampler_sigmas, schedule_sigmas

    model = SimpleNamespace(sampling=ModelSampling.for_prediction("eps"))
    for sampler in ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"):
        longer = schedule_sigmas(model, "karras", 11)
        assert torch.equal(ksampler_sigmas(model, "karras", sampler, 10), torch.cat([longer[:-2], longer[-1:]]))
    for sampler in ("euler", "heun", "dpmpp_2m"):
        assert torch.equal(ksampler_sigmas(model, "karras", sampler, 10), schedule_sigmas(model, "karras", 10))
    assert ksampler_sigmas(model, "kl_optimal", "uni_pc", 1).shape == (2,)
    # the new schedulers read the model's own range: a flow model's runs from 1 to its sigma_min
    flow = SimpleNamespace(sampling=ModelSampling.flow(3.0))
    assert float(schedule_sigmas(flow, "linear_quadratic", 6)[0]) == 1.0
    kl = schedule_sigmas(flow, "kl_optimal", 6)
    assert float(kl[0]) == 1.0 and float(kl[-2]) == pytest.approx(flow.sampling.sigma_min, rel=1e-5)


def test_every_comfyui_sampler_and_scheduler_name_is_accepted_by_the_nodes() -> None:
    from nodegraph_diffusion.nodes.sampling import KSampler, Scheduler

    # ComfyUI's current KSampler.SAMPLERS and KSampler.SCHEDULERS (comfy/samplers.py)
    comfy_samplers = [
        "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
        "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
        "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
        "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
        "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
        "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
    comfy_schedulers = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                        "linear_quadratic", "kl_optimal"]
    assert list(KSampler.specs().inputs["sampler_name"].choices) == comfy_samplers
    assert list(K.SAMPLERS) == comfy_samplers
    assert sorted(KSampler.specs().inputs["scheduler"].choices) == sorted(comfy_schedulers)
    assert sorted(Scheduler.specs().inputs["scheduler"].choices) == sorted(comfy_schedulers)
    # each name is its own function: none is another's under a second name
    assert len({fn for fn in K.SAMPLERS.values()}) == len(K.SAMPLERS)
    assert sorted(K.CFG_PP_SAMPLERS) == sorted(name for name in comfy_samplers if "cfg_pp" in name)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sa_solver_stochastic_interval_is_on_the_model_schedule(eta: float) -> None:
    # noise only while start >= sigma_next > end: with the whole schedule inside, the run is stochastic
    sigmas = _ve_sigmas(10)
    inside = lambda p: {0.2: 100.0, 0.8: 0.0}[p]  # noqa: E731
    outside = lambda p: {0.2: 0.0, 0.8: -1.0}[p]  # noqa: E731
    calls: list[float] = []

    def noise(s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        calls.append(float(s_next))
        return torch.zeros(SHAPE, dtype=torch.float64)

    K.sample_sa_solver(ve_model, _x(29, 14.6), sigmas, eta=eta, noise_sampler=noise, percent_to_sigma=inside)
    assert len(calls) == 9  # every step but the last (to 0)
    calls.clear()
    K.sample_sa_solver(ve_model, _x(29, 14.6), sigmas, eta=eta, noise_sampler=noise, percent_to_sigma=outside)
    assert calls == []


# ------------------------------------------------------------------------- the nodes, end to end


@pytest.fixture(scope="module")
def executor(tmp_path_factory):  # noqa: ANN001, ANN201
    from nodegraph.cache import OutputCache
    from nodegraph.executor import Executor
    from nodegraph.plugins import build_registry

    from _pipeline_fixtures import write_models

    models = write_models(tmp_path_factory.mktemp("models"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        patch.setenv("NODEGRAPH_INPUTS", str(tmp_path_factory.mktemp("inputs")))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out"))


def _link(node: str, output: str) -> dict:
    return {"from": node, "output": output}


def _graph(sampler: str, scheduler: str, *, custom: bool = False) -> dict:
    nodes: dict = {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": _link("ckpt", "clip"), "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": _link("ckpt", "clip"), "text": ""}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": _link("ckpt", "model"), "width": 32, "height": 32}},
    }
    if custom:  # SamplerCustomAdvanced with BasicGuider: no negative conditioning
        nodes |= {
            "guider": {"type": "BasicGuider", "inputs": {"model": _link("ckpt", "model"),
                                                         "conditioning": _link("pos", "conditioning")}},
            "noise": {"type": "RandomNoise", "inputs": {"seed": 3}},
            "select": {"type": "SelectSampler", "inputs": {"sampler_name": sampler}},
            "sigmas": {"type": "Scheduler", "inputs": {"model": _link("ckpt", "model"), "scheduler": scheduler,
                                                       "steps": 4}},
            "sample": {"type": "Sample", "inputs": {
                "noise": _link("noise", "noise"), "guider": _link("guider", "guider"),
                "sampler": _link("select", "sampler"), "sigmas": _link("sigmas", "sigmas"),
                "latent": _link("empty", "latent")}},
        }
    else:
        nodes["sample"] = {"type": "KSampler", "inputs": {
            "model": _link("ckpt", "model"), "positive": _link("pos", "conditioning"),
            "negative": _link("neg", "conditioning"), "latent": _link("empty", "latent"), "seed": 3, "steps": 4,
            "cfg": 1.5, "sampler_name": sampler, "scheduler": scheduler}}
    return {"version": 1, "nodes": nodes}


@pytest.mark.slow
@pytest.mark.parametrize("sampler,scheduler", [("euler_cfg_pp", "kl_optimal"), ("uni_pc_bh2", "linear_quadratic"),
                                               ("sa_solver", "karras"), ("dpmpp_2m_sde_gpu", "normal")])
def test_ksampler_runs_the_new_names_on_a_checkpoint(executor, sampler: str, scheduler: str) -> None:  # noqa: ANN001
    result = executor.run(_graph(sampler, scheduler), outputs=["sample"])
    assert result.status == "succeeded", result.error
    latent = result.results["sample"].outputs.latent.samples
    assert latent.shape[:2] == (1, 4) and torch.isfinite(latent).all() and latent.std() > 0.1


@pytest.mark.slow
def test_a_cfg_pp_sampler_without_negative_conditioning_is_refused_naming_the_guider(executor) -> None:  # noqa: ANN001
    result = executor.run(_graph("euler_cfg_pp", "normal", custom=True), outputs=["sample"])
    assert result.status == "failed"
    assert result.error.node_id == "sample" and "guider" in str(result.error) and "negative" in str(result.error)
    assert executor.run(_graph("euler", "normal", custom=True), outputs=["sample"]).status == "succeeded"
