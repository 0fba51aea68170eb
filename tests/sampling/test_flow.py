import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from velodiff.sampling import NoiseSchedule, build_plan, run_plan
from velodiff.sampling.schedules import FlowSchedule, flow_dynamic_mu
from parity import dummy_model, relative_error, velodiff_trajectory


def _x_init(seed=1):
    return torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def _flow_reference(scheduler, num_steps, x_init, **set_timesteps_kwargs):
    # FlowMatchEulerDiscreteScheduler has neither init_noise_sigma nor scale_model_input (flow pipelines feed the
    # unit-noise latents as they are), so parity.diffusers_trajectory cannot drive it; this is its loop without them.
    scheduler.set_timesteps(num_steps, **set_timesteps_kwargs)
    x = x_init
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(x, float(t)), t, x, generator=gen).prev_sample
        out.append(x.clone())
    return [float(t) for t in scheduler.timesteps], out


def _compare(ref, plan, num_steps, **set_timesteps_kwargs):
    x0 = _x_init()
    ref_ts, ref_xs = _flow_reference(ref, num_steps, x0.clone(), **set_timesteps_kwargs)
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert plan.init_noise_scale == 1.0 and all(c.input_scale == 1.0 for c in plan.calls)
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=1e-4)  # diffusers' timesteps are float32
    assert len(ours) == len(ref_xs)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"step {i}: relative error {err}"


def _pipeline_sigmas(n):
    return np.linspace(1.0, 1.0 / n, n)  # what Flux-style pipelines pass to set_timesteps


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("spacing", ["pipeline", "scheduler"])
@pytest.mark.parametrize("num_steps", [1, 7, 28])
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
def test_flow_euler_matches_diffusers(shift, spacing, num_steps, sigma_schedule):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, use_karras_sigmas=sigma_schedule == "karras",
                                          use_exponential_sigmas=sigma_schedule == "exponential")
    plan = build_plan("flow_euler", FlowSchedule(shift=shift), num_steps, spacing=spacing,
                      sigma_schedule=sigma_schedule)
    kwargs = dict(sigmas=_pipeline_sigmas(num_steps)) if spacing == "pipeline" else {}
    _compare(ref, plan, num_steps, **kwargs)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("spacing", ["pipeline", "scheduler"])
@pytest.mark.parametrize("shift_terminal", [None, 0.02])
def test_flow_euler_dynamic_shift_matches_diffusers(time_shift_type, spacing, shift_terminal):
    num_steps, mu = 9, flow_dynamic_mu(64 * 64)
    assert mu == pytest.approx(1.15)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type,
                                          shift_terminal=shift_terminal)
    fs = FlowSchedule(use_dynamic_shifting=True, time_shift_type=time_shift_type, shift_terminal=shift_terminal)
    plan = build_plan("flow_euler", fs, num_steps, mu=mu, spacing=spacing)
    if shift_terminal:
        assert plan.info["sigmas"][-2] == pytest.approx(shift_terminal)
    kwargs = dict(sigmas=_pipeline_sigmas(num_steps)) if spacing == "pipeline" else {}
    _compare(ref, plan, num_steps, mu=mu, **kwargs)


@pytest.mark.parametrize("num_steps", [1, 6])
def test_flow_euler_stochastic_matches_diffusers(num_steps):
    # x0_hat = x - s v, then fresh noise to s_next; same seed, same draws (diffusers' last draw has weight 0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    plan = build_plan("flow_euler", FlowSchedule(shift=3.0), num_steps, stochastic_sampling=True)
    _compare(ref, plan, num_steps, sigmas=_pipeline_sigmas(num_steps))


def test_flow_euler_explicit_sigmas_match_diffusers():
    # velodiff's sigmas= are the final [N+1] sigmas; diffusers' are the N base sigmas before its shift, so compare
    # with shift 1 (no shift) where both mean the same thing.
    base = [1.0, 0.9, 0.7, 0.45, 0.2, 0.05]
    ref = FlowMatchEulerDiscreteScheduler()
    plan = build_plan("flow_euler", None, None, sigmas=base + [0.0])
    _compare(ref, plan, None, sigmas=base)


def test_flow_euler_accepts_flow_noise_schedule_and_shift_override():
    a = build_plan("flow_euler", NoiseSchedule.sd("flow"), 5, shift=3.0)
    b = build_plan("flow_euler", FlowSchedule(shift=3.0), 5)
    c = build_plan("flow_euler", FlowSchedule(shift=1.0), 5, shift=3.0)
    assert a.info["sigmas"] == b.info["sigmas"] == c.info["sigmas"]
    assert a.timesteps == b.timesteps == [s * 1000 for s in b.info["sigmas"][:-1]]


def _instaflow_loop(model, latents, num_steps):
    # the InstaFlow / 2-rectified-flow SD 1.5 pipeline (gnobitab/InstaFlow code/pipeline_rf.py), transcribed:
    # t_k = (1 - k/N) * 1000, latents += v / N, the UNet's v pointing from noise to data
    dt = 1.0 / num_steps
    out = []
    for k in range(num_steps):
        t = (1.0 - k / num_steps) * 1000.0
        latents = latents + dt * model(latents, t)
        out.append(latents.clone())
    return out


@pytest.mark.parametrize("num_steps", [1, 4, 25])
def test_rectified_flow_convention_matches_instaflow_loop(num_steps):
    plan = build_plan("flow_euler", None, num_steps, convention="rectified_flow")
    assert plan.timesteps == pytest.approx([(1.0 - k / num_steps) * 1000.0 for k in range(num_steps)], rel=1e-14)
    x0 = _x_init()
    ref = _instaflow_loop(dummy_model, x0.clone(), num_steps)
    _, ours = velodiff_trajectory(plan, x0.clone())
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert relative_error(a, b) <= 1e-6, f"step {i}"


def test_rectified_flow_is_sign_flipped_flow_matching():
    # with the velocity negated, the rectified-flow plan is flow matching Euler on pipeline sigmas
    x0 = _x_init()
    rf = build_plan("flow_euler", None, 5, convention="rectified_flow")
    fm = build_plan("flow_euler", None, 5)
    a = run_plan(rf, dummy_model, x0.clone())
    b = run_plan(fm, lambda x, t: -dummy_model(x, t), x0.clone())
    assert relative_error(a, b) <= 1e-6


def test_flow_schedule_sigmas():
    fs = FlowSchedule(shift=3.0)
    s = fs.sigmas(4)
    base = np.array([1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(s, np.append(3 * base / (1 + 2 * base), 0.0), rtol=1e-15)
    # the scheduler spacing ends at the shifted 1/T, shifted again (diffusers applies the shift twice to that end)
    lo = 3e-3 / (1 + 2e-3)
    np.testing.assert_allclose(fs.sigmas(4, spacing="scheduler")[-2], 3 * lo / (1 + 2 * lo), rtol=1e-14)
    np.testing.assert_allclose(fs.timesteps(s), s[:-1] * 1000)


@pytest.mark.parametrize("kwargs,match", [
    (dict(convention="ddpm"), "convention"),
    (dict(spacing="linspace"), "spacing"),
    (dict(sigma_schedule="beta"), "sigma_schedule"),
    (dict(sigmas=[1.0, 1.5, 0.0]), "sigmas"),
    (dict(shift=3.0, convention="rectified_flow"), "shift"),
    (dict(shift=-1.0), "shift"),
])
def test_flow_euler_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_plan("flow_euler", None, None if "sigmas" in kwargs else 5, **kwargs)


def test_flow_euler_bad_schedules():
    with pytest.raises(ValueError, match="prediction_type"):
        build_plan("flow_euler", NoiseSchedule.sd(), 5)
    with pytest.raises(ValueError, match="mu"):
        build_plan("flow_euler", FlowSchedule(use_dynamic_shifting=True), 5)
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowSchedule(time_shift_type="cubic")
    with pytest.raises(ValueError, match="shift_terminal"):
        FlowSchedule(shift_terminal=1.5)
