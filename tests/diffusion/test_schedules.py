"""Schedules against their formulas written out here and against diffusers' schedulers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nodegraph_diffusion.sampling import schedules as S

SCHED = S.sd_discrete_schedule()


def _reference_sigma_table() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    return np.sqrt((1 - ac) / ac)


def _ref_t_to_sigma(t: float, table: np.ndarray) -> float:
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def test_training_sigmas_match_scaled_linear_formula() -> None:
    np.testing.assert_allclose(SCHED.sigmas.numpy(), _reference_sigma_table(), rtol=1e-12)
    assert SCHED.sigma_min == pytest.approx(0.0291671, abs=1e-6)
    assert SCHED.sigma_max == pytest.approx(14.614641, abs=1e-5)


def test_sigma_timestep_roundtrip() -> None:
    ts = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    sig = SCHED.t_to_sigma(ts)
    table = _reference_sigma_table()
    for t, s in zip(ts.tolist(), sig.tolist()):
        assert s == pytest.approx(_ref_t_to_sigma(t, table), rel=1e-10)
    torch.testing.assert_close(SCHED.sigma_to_t(sig), ts, atol=1e-8, rtol=0)


def test_normal_and_sgm_uniform_formulas() -> None:
    table = _reference_sigma_table()
    n = 7
    ts = np.linspace(999, 0, n)
    ref = [_ref_t_to_sigma(t, table) for t in ts] + [0.0]
    np.testing.assert_allclose(S.sigmas_normal(SCHED, n).numpy(), ref, rtol=1e-5)
    ts = np.linspace(999, 0, n + 1)[:-1]
    ref = [_ref_t_to_sigma(t, table) for t in ts] + [0.0]
    np.testing.assert_allclose(S.sigmas_sgm_uniform(SCHED, n).numpy(), ref, rtol=1e-5)


def test_karras_and_exponential_formulas() -> None:
    n, lo, hi, rho = 6, 0.03, 14.6, 7.0
    ref = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    np.testing.assert_allclose(S.sigmas_karras(n, lo, hi, rho).numpy(), ref, rtol=1e-6)
    ref = [hi * (lo / hi) ** (i / (n - 1)) for i in range(n)] + [0.0]
    np.testing.assert_allclose(S.sigmas_exponential(n, lo, hi).numpy(), ref, rtol=1e-6)


def test_simple_and_ddim_uniform_formulas() -> None:
    table = _reference_sigma_table()
    n = 6
    ref = [table[999 - int(i * 1000 / n)] for i in range(n)] + [0.0]
    np.testing.assert_allclose(S.sigmas_simple(SCHED, n).numpy(), ref, rtol=1e-6)
    ref = [table[1 + k * (1000 // n)] for k in reversed(range(n))] + [0.0]
    np.testing.assert_allclose(S.sigmas_ddim_uniform(SCHED, n).numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.05, 0.3, 0.5, 0.77, 1.0])
def test_beta_ppf_against_closed_forms(q: float) -> None:
    assert S.beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-10)  # uniform
    assert S.beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-10)  # arcsine
    assert S.beta_ppf(q, 2.5, 1.0) == pytest.approx(q ** (1 / 2.5), abs=1e-10)  # CDF x**a
    assert S.beta_ppf(q, 1.0, 3.0) == pytest.approx(1 - (1 - q) ** (1 / 3), abs=1e-10)  # CDF 1-(1-x)**b


def test_beta_cdf_against_numerical_integral() -> None:
    # Beta(0.6, 0.6) density integrated with the substitution x = u**(1/a), which removes the x**(a-1) pole
    a = b = 0.6
    x = 0.3
    u = np.linspace(0, x**a, 200001)
    xs = u ** (1 / a)
    integrand = (1 - xs) ** (b - 1) / a
    integral = np.trapezoid(integrand, u) / math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    assert S.beta_cdf(x, a, b) == pytest.approx(integral, abs=1e-7)
    assert S.beta_ppf(0.5, a, b) == pytest.approx(0.5, abs=1e-12)  # symmetric


def test_beta_schedule() -> None:
    table = _reference_sigma_table()
    n = 5
    ts = [1.0, 0.8, 0.6, 0.4, 0.2]
    # for alpha=beta=0.5 the quantile is sin^2(pi q / 2); exercises the same code path with a known answer
    ref = [table[round(math.sin(math.pi * q / 2) ** 2 * 999)] for q in ts] + [0.0]
    np.testing.assert_allclose(S.sigmas_beta(SCHED, n, 0.5, 0.5).numpy(), ref, rtol=1e-6)
    s = S.sigmas_beta(SCHED, 10)
    assert s.shape == (11,) and bool((s[:-1] > s[1:]).all())


def test_denoise_and_split() -> None:
    make = lambda n: S.sigmas_karras(n, 0.03, 14.6)  # noqa: E731
    out = S.sigmas_for_denoise(make, 10, 0.4)
    torch.testing.assert_close(out, make(25)[-11:])
    torch.testing.assert_close(S.sigmas_for_denoise(make, 10, 1.0), make(10))
    assert S.sigmas_for_denoise(make, 10, 0.0).numel() == 0
    hi, lo = S.split_sigmas(make(10), 4)
    assert hi.numel() == 5 and lo.numel() == 7 and hi[-1] == lo[0]
    with pytest.raises(S.ScheduleError, match="split step"):
        S.split_sigmas(make(10), 11)
    with pytest.raises(S.ScheduleError, match="denoise"):
        S.sigmas_for_denoise(make, 10, 1.5)
    with pytest.raises(S.ScheduleError, match="at least 1 step"):
        S.sigmas_karras(0, 0.03, 14.6)


def _diffusers_euler(**kw: object) -> "object":
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, **kw
    )
    return sch


@pytest.mark.parity
def test_normal_matches_diffusers_linspace() -> None:
    # n=10 puts linspace(0, 999, n) on integer timesteps, where diffusers' linear-in-sigma lookup is exact
    sch = _diffusers_euler(timestep_spacing="linspace")
    sch.set_timesteps(10)
    np.testing.assert_allclose(S.sigmas_normal(SCHED, 10).numpy(), sch.sigmas.numpy(), atol=1e-4)


@pytest.mark.parity
def test_karras_matches_diffusers() -> None:
    sch = _diffusers_euler(use_karras_sigmas=True)
    sch.set_timesteps(12)
    ours = S.sigmas_karras(12, SCHED.sigma_min, SCHED.sigma_max)
    np.testing.assert_allclose(ours.numpy(), sch.sigmas.numpy(), atol=1e-4)


@pytest.mark.parity
def test_exponential_matches_diffusers() -> None:
    sch = _diffusers_euler(use_exponential_sigmas=True)
    sch.set_timesteps(9)
    ours = S.sigmas_exponential(9, SCHED.sigma_min, SCHED.sigma_max)
    np.testing.assert_allclose(ours.numpy(), sch.sigmas.numpy(), atol=1e-4)


@pytest.mark.parity
def test_ddim_uniform_matches_diffusers_ddim_timesteps() -> None:
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    sch.set_timesteps(8)
    ac = sch.alphas_cumprod[sch.timesteps]
    ref = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    np.testing.assert_allclose(S.sigmas_ddim_uniform(SCHED, 8).numpy(), ref.numpy(), atol=1e-4)


# ---------------------------------------------------------------- rectified-flow tables (SD3, Flux)
# ComfyUI's semantics: the table is shift(i / T) for i = 1..T, "normal" goes linearly in timestep from
# timestep(sigma_max) to timestep(sigma_min) and maps back through the shift, the table pickers index
# the table. SD3: shift 3 on 1,000 entries; Flux (ModelSamplingFlux): shift e^mu on 10,000 entries.
FLOW_TABLES = [(3.0, 1000.0, 1000), (math.exp(1.15), 1.0, 10000), (1.0, 1.0, 1000)]


def _shift(u: np.ndarray | float, s: float) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64)
    return s * u / (1 + (s - 1) * u)


@pytest.mark.parametrize("shift,multiplier,length", FLOW_TABLES)
def test_flow_table_and_timestep_maps(shift: float, multiplier: float, length: int) -> None:
    table = S.FlowSchedule(shift, multiplier, length)
    np.testing.assert_allclose(table.sigmas.numpy(), _shift(np.arange(1, length + 1) / length, shift), rtol=1e-12)
    assert table.sigma_max == 1.0 and table.sigma_min == pytest.approx(float(_shift(1 / length, shift)))
    sig = torch.tensor([0.02, 0.5, 0.93], dtype=torch.float64)
    torch.testing.assert_close(table.sigma_to_t(sig), sig * multiplier)
    torch.testing.assert_close(table.t_to_sigma(sig * multiplier), torch.from_numpy(_shift(sig.numpy(), shift)))
    assert table.percent_to_sigma(0.0) == 1.0 and table.percent_to_sigma(1.0) == 0.0
    assert table.percent_to_sigma(0.3) == pytest.approx(float(_shift(0.7, shift)))


@pytest.mark.parametrize("shift,multiplier,length", FLOW_TABLES)
def test_every_scheduler_on_a_flow_table_matches_comfyui_formulas(shift: float, multiplier: float, length: int) -> None:
    table = S.FlowSchedule(shift, multiplier, length)
    ref_table = _shift(np.arange(1, length + 1) / length, shift)
    lo = float(ref_table[0])
    for n in (1, 4, 7, 8):
        ref = list(_shift(np.linspace(1.0, lo, n), shift)) + [0.0]
        np.testing.assert_allclose(S.sigmas_normal(table, n).numpy(), ref, rtol=1e-6, atol=1e-7)
        ref = list(_shift(np.linspace(1.0, lo, n + 1)[:-1], shift)) + [0.0]
        np.testing.assert_allclose(S.sigmas_sgm_uniform(table, n).numpy(), ref, rtol=1e-6, atol=1e-7)
        ref = [ref_table[length - 1 - math.floor(x * length / n)] for x in range(n)] + [0.0]
        np.testing.assert_allclose(S.sigmas_simple(table, n).numpy(), ref, rtol=1e-6)
        ref = [ref_table[1 + k * (length // n)] for k in reversed(range(n))] + [0.0]
        np.testing.assert_allclose(S.sigmas_ddim_uniform(table, n).numpy(), ref, rtol=1e-6)
        if n % 2:  # Beta(1/2, 1/2) has the quantile sin^2(pi q / 2); even n would put q = 1/2 on a rounding tie
            ref = [ref_table[round(math.sin(math.pi * (1 - i / n) / 2) ** 2 * (length - 1))] for i in range(n)]
            np.testing.assert_allclose(S.sigmas_beta(table, n, 0.5, 0.5).numpy(), ref + [0.0], rtol=1e-6)
        ref = [(1.0 + i / max(n - 1, 1) * (lo ** (1 / 7) - 1.0)) ** 7 for i in range(n)] + [0.0]
        np.testing.assert_allclose(S.sigmas_karras(n, table.sigma_min, table.sigma_max).numpy(), ref, rtol=1e-5)
        ref = [lo ** (i / max(n - 1, 1)) for i in range(n)] + [0.0]
        np.testing.assert_allclose(S.sigmas_exponential(n, table.sigma_min, table.sigma_max).numpy(), ref, rtol=1e-5)
    # the timestep unit (SD3 sigma * 1000, Flux sigma) does not move any scheduler's sigmas
    other = S.FlowSchedule(shift, 1000.0 if multiplier == 1.0 else 1.0, length)
    torch.testing.assert_close(S.sigmas_normal(other, 9), S.sigmas_normal(table, 9))


def test_flow_schedule_rejects_bad_parameters() -> None:
    with pytest.raises(S.ScheduleError, match="shift > 0"):
        S.FlowSchedule(shift=-1.0)
    with pytest.raises(S.ScheduleError, match="multiplier > 0"):
        S.FlowSchedule(multiplier=0.0)
    with pytest.raises(S.ScheduleError, match="at least 2 timesteps"):
        S.FlowSchedule(num_timesteps=1)


def test_flux_shift_is_the_constant_shift_with_e_to_the_mu() -> None:
    # ComfyUI/diffusers write Flux's shift as e^mu / (e^mu + 1/t - 1)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    mu = 0.83
    torch.testing.assert_close(S.flow_time_shift(t, math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / t - 1))
    assert S.flux_mu(1024, 1024) == pytest.approx(1.15) and S.flux_mu(256, 256) == pytest.approx(0.5)


# ------------------------------------------------------------------------ linear_quadratic, kl_optimal


@pytest.mark.parity
@pytest.mark.parametrize("n", [2, 3, 5, 10, 30, 50])
@pytest.mark.parametrize("sigma_max", [1.0, 14.6])
def test_linear_quadratic_matches_diffusers_mochi_schedule(n: int, sigma_max: float) -> None:
    pytest.importorskip("diffusers")
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    # diffusers' Mochi fractions without the final 0; ComfyUI scales them by the model's sigma_max
    ref = np.array(linear_quadratic_schedule(n, 0.025) + [0.0]) * sigma_max
    np.testing.assert_allclose(S.sigmas_linear_quadratic(n, sigma_max).numpy(), ref, rtol=1e-6, atol=1e-7)


def test_linear_quadratic_formula() -> None:
    # 1 - u: u linear to threshold_noise over n // 2 steps, then the quadratic through that point with
    # the same slope that reaches 1 at step n (second differences constant); one step is [max, 0]
    n, tau = 12, 0.025
    u = 1 - S.sigmas_linear_quadratic(n, 1.0).to(torch.float64).numpy()
    k = n // 2
    np.testing.assert_allclose(u[:k], np.arange(k) * tau / k, atol=1e-7)
    quad = u[k:]
    assert quad[0] == pytest.approx(tau, abs=1e-7) and quad[-1] == pytest.approx(1.0, abs=1e-7)
    second = np.diff(quad, 2)
    np.testing.assert_allclose(second, second[0], atol=2e-6)
    a = second[0] / 2  # u(i) = a i^2 + b i + c around i = k: u'(k) = 2 a k + b = tau / k
    b = quad[1] - quad[0] - a * (2 * k + 1)
    assert 2 * a * k + b == pytest.approx(tau / k, abs=1e-5)
    torch.testing.assert_close(S.sigmas_linear_quadratic(1, 14.6), torch.tensor([14.6, 0.0]))
    torch.testing.assert_close(S.sigmas_linear_quadratic(8, 2.0, linear_steps=3)[:3],
                               2.0 * (1 - torch.arange(3) * 0.025 / 3))
    with pytest.raises(S.ScheduleError, match="linear_steps"):
        S.sigmas_linear_quadratic(8, 1.0, linear_steps=8)


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_kl_optimal_is_uniform_in_arctan_sigma(n: int) -> None:
    lo, hi = SCHED.sigma_min, SCHED.sigma_max
    sigmas = S.sigmas_kl_optimal(n, lo, hi)
    assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
    ref = [math.tan(math.atan(hi) + i / max(n - 1, 1) * (math.atan(lo) - math.atan(hi))) for i in range(n)]
    np.testing.assert_allclose(sigmas[:-1].numpy(), ref, rtol=1e-6)
    assert float(sigmas[0]) == pytest.approx(hi, rel=1e-6)
    if n > 1:
        assert float(sigmas[-2]) == pytest.approx(lo, rel=1e-5)
        np.testing.assert_allclose(np.diff(np.arctan(sigmas[:-1].double().numpy())),
                                   (math.atan(lo) - math.atan(hi)) / (n - 1), rtol=1e-5)


def test_without_penultimate_sigma() -> None:
    sigmas = S.sigmas_karras(6, 0.03, 14.6)
    out = S.without_penultimate_sigma(sigmas)
    assert out.shape == (6,) and torch.equal(out[:-1], sigmas[:-2]) and out[-1] == sigmas[-1]
    with pytest.raises(S.ScheduleError, match="at least 3"):
        S.without_penultimate_sigma(torch.tensor([1.0, 0.0]))
