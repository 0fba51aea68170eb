import math

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from velodiff.sampling import NoiseSchedule, build_plan, run_plan
from parity import diffusers_trajectory, relative_error, velodiff_trajectory

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = [("linspace", 7), ("linspace", 20), ("leading", 9), ("trailing", 7), ("trailing", 10), ("trailing", 1)]


def _x_init(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _compare(ref, plan, num_steps, **set_timesteps_kwargs):
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone(), **set_timesteps_kwargs)
    assert plan.init_noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert len(ts) == len(ref_ts)
    # diffusers' timesteps are float32, and those it interpolates from sigmas (karras/exponential, explicit sigmas)
    # come from its float32 alphas_cumprod, whose rounding moves log-sigma by ~1e-6 and t by up to ~1e-3; velodiff
    # uses float64 throughout. The states below are still compared at 1e-5.
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=2e-3)
    assert len(ours) == len(ref_xs)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"step {i}: relative error {err}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", SPACINGS)
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
def test_euler_matches_diffusers(prediction_type, spacing, num_steps, sigma_schedule):
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                                 use_karras_sigmas=sigma_schedule == "karras",
                                 use_exponential_sigmas=sigma_schedule == "exponential")
    plan = build_plan("euler", NoiseSchedule.sd(prediction_type), num_steps, spacing=spacing, steps_offset=1,
                      sigma_schedule=sigma_schedule)
    _compare(ref, plan, num_steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
def test_euler_matches_diffusers_on_float64_schedule(prediction_type, sigma_schedule):
    # Most of the per-step difference above (up to ~5e-6) is diffusers' float32 alphas_cumprod (its sigmas and
    # interpolated timesteps). Given the same float64 schedule, diffusers' own algorithm agrees to fp32 roundoff.
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type,
                                 use_karras_sigmas=sigma_schedule == "karras",
                                 use_exponential_sigmas=sigma_schedule == "exponential")
    ref.alphas_cumprod = torch.from_numpy(NoiseSchedule.sd().alphas_cumprod)
    plan = build_plan("euler", NoiseSchedule.sd(prediction_type), 13, sigma_schedule=sigma_schedule)
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, 13, x0.clone())
    ts, ours = velodiff_trajectory(plan, x0.clone())
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=1e-4)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        assert relative_error(a, b) <= 1e-6, f"step {i}: relative error {relative_error(a, b)}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_schedule", ["default", "karras"])
def test_euler_final_sigma_min_matches_diffusers(prediction_type, sigma_schedule):
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, final_sigmas_type="sigma_min",
                                 use_karras_sigmas=sigma_schedule == "karras")
    plan = build_plan("euler", NoiseSchedule.sd(prediction_type), 11, final_sigma="sigma_min",
                      sigma_schedule=sigma_schedule)
    _compare(ref, plan, 11)


def test_euler_karras_range_override_matches_diffusers():
    ref = EulerDiscreteScheduler(**SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)
    plan = build_plan("euler", NoiseSchedule.sd(), 8, sigma_schedule="karras", sigma_min=0.1, sigma_max=10.0)
    assert plan.info["sigmas"][0] == pytest.approx(10.0) and plan.info["sigmas"][-2] == pytest.approx(0.1)
    _compare(ref, plan, 8)


def test_euler_continuous_timesteps_match_diffusers():
    ref = EulerDiscreteScheduler(**SD, prediction_type="v_prediction", timestep_type="continuous")
    plan = build_plan("euler", NoiseSchedule.sd("v_prediction"), 9, timestep_type="continuous")
    _compare(ref, plan, 9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("end", [0.0, 0.05])
def test_euler_explicit_sigmas_match_diffusers(prediction_type, end):
    sigmas = [14.0, 9.5, 5.0, 2.25, 1.0, 0.4, 0.12, end]
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type)
    plan = build_plan("euler", NoiseSchedule.sd(prediction_type), None, sigmas=sigmas)
    assert plan.info["sigmas"] == sigmas
    _compare(ref, plan, None, sigmas=sigmas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,num_steps", SPACINGS)
def test_euler_ancestral_matches_diffusers(prediction_type, spacing, num_steps):
    # same generator seed -> same draws: one per step, of the sample's shape, in step order
    ref = EulerAncestralDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing,
                                          steps_offset=1)
    plan = build_plan("euler_a", NoiseSchedule.sd(prediction_type), num_steps, spacing=spacing, steps_offset=1)
    assert all(c.noise for c in plan.calls[:-1]) and not plan.calls[-1].noise
    _compare(ref, plan, num_steps)


def test_euler_ancestral_eta0_is_euler():
    schedule = NoiseSchedule.sd()
    a = build_plan("euler_a", schedule, 12, eta=0.0, sigma_schedule="karras")
    e = build_plan("euler", schedule, 12, sigma_schedule="karras")
    assert not any(c.noise for c in a.calls)
    for ca, ce in zip(a.calls, e.calls):
        assert (ca.c_x, ca.c_d, ca.p_x, ca.p_m, ca.timestep) == pytest.approx((ce.c_x, ce.c_d, ce.p_x, ce.p_m,
                                                                               ce.timestep), rel=1e-12)


def test_euler_ancestral_step_preserves_variance_split():
    # s_down^2 + s_up^2 = s_next^2 on every step
    plan = build_plan("euler_a", NoiseSchedule.sd(), 10)
    s = plan.info["sigmas"]
    for i, c in enumerate(plan.calls):
        s_down = c.c_x * s[i]
        assert s_down ** 2 + c.c_z ** 2 == pytest.approx(s[i + 1] ** 2, rel=1e-12, abs=1e-15)


def _gaussian_model(schedule, mu=0.3, sd=0.5):
    """Exact eps-prediction for data N(mu, sd^2) per element, on the VP input at (fractional) timestep t."""
    log_sig = np.log(schedule.karras_sigmas_all)

    def model(x_in, t):
        s = float(np.exp(np.interp(t, np.arange(len(log_sig)), log_sig)))  # exact inverse of sigma_to_t
        x = x_in * math.sqrt(s * s + 1.0)
        d = (sd * sd * x + s * s * mu) / (sd * sd + s * s)
        return (x - d) / s

    def exact(x_start, s_from, s_to):
        return mu + (x_start - mu) * math.sqrt(sd * sd + s_to * s_to) / math.sqrt(sd * sd + s_from * s_from)

    return model, exact


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_gaussian_data(name, order):
    # Solve the VE probability-flow ODE of Gaussian data (closed form) from sigma 10 to 0.1 with log-uniform
    # explicit sigmas; the error must fall as N^-order.
    schedule = NoiseSchedule.sd()
    model, exact = _gaussian_model(schedule)
    x_start = _x_init(3).double() * 10.0
    errs = []
    steps = [4, 8, 16]
    for n in steps:
        sig = np.exp(np.linspace(math.log(10.0), math.log(0.1), n + 1))
        plan = build_plan(name, schedule, n, sigmas=sig)
        assert plan.info["order"] == order
        out = run_plan(plan, model, x_start.float()).double()
        ref = exact(x_start, 10.0, 0.1)
        errs.append(float((out - ref).norm() / ref.norm()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(r > order - 0.25 for r in rates), (errs, rates)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(spacing="karras"), "spacing"),
    (dict(sigma_schedule="beta"), "sigma_schedule"),
    (dict(sigmas=[1.0, 2.0, 0.0]), "sigmas"),
    (dict(sigma_schedule="karras", sigma_min=5.0, sigma_max=1.0), "sigma_min"),
])
def test_bad_options(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_plan(name, NoiseSchedule.sd(), None if "sigmas" in kwargs else 10, **kwargs)


def test_bad_options_specific():
    with pytest.raises(ValueError, match="final_sigma"):
        build_plan("euler", NoiseSchedule.sd(), 10, final_sigma="one")
    with pytest.raises(ValueError, match="timestep_type"):
        build_plan("euler", NoiseSchedule.sd(), 10, timestep_type="log")
    with pytest.raises(ValueError, match="timestep_type"):
        build_plan("euler", NoiseSchedule.sd("epsilon"), 10, timestep_type="continuous")
    with pytest.raises(ValueError, match="eta"):
        build_plan("euler_a", NoiseSchedule.sd(), 10, eta=-1.0)
    with pytest.raises(ValueError, match="flow"):
        build_plan("euler", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="sigmas"):
        build_plan("euler", NoiseSchedule.sd(), 3, sigmas=[3.0, 1.0, 0.0])
