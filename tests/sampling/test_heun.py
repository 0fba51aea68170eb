import numpy as np
import pytest
import torch
from diffusers import HeunDiscreteScheduler

from velodiff.sampling import NoiseSchedule, build_plan
from parity import dummy_model, relative_error, velodiff_trajectory

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _x_init(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _heun_reference(scheduler, num_steps, x_init):
    # diffusers builds alphas_cumprod in float32: at t = 0, 1 - abar = 8.5e-4 keeps only ~4 significant digits, so
    # its smallest sigma is off by ~1.3e-5 relative, and the corrector ending there amplifies that to ~1.2e-5 in
    # the state (velodiff's schedule is float64). Give the oracle the same float64 schedule: its own algorithm and
    # float32 sigmas/states, without the schedule rounding. (test_euler compares against the stock float32 schedule.)
    scheduler.alphas_cumprod = torch.from_numpy(NoiseSchedule.sd().alphas_cumprod)
    scheduler.set_timesteps(num_steps)
    x = x_init * scheduler.init_noise_sigma
    out = []
    for t in scheduler.timesteps:
        m = dummy_model(scheduler.scale_model_input(x, t), float(t))
        x = scheduler.step(m, t, x).prev_sample
        out.append(x.clone())
    return [float(t) for t in scheduler.timesteps], out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("linspace", 7), ("linspace", 20), ("leading", 9), ("trailing", 7),
                                               ("trailing", 10), ("trailing", 1)])
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
def test_heun_matches_diffusers(prediction_type, spacing, num_steps, sigma_schedule):
    # diffusers lists every timestep but the first twice (2N - 1 model calls); each of its step() calls, predictor
    # or corrector, returns a state, and velodiff's calls are compared one to one with them.
    ref = HeunDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                                use_karras_sigmas=sigma_schedule == "karras",
                                use_exponential_sigmas=sigma_schedule == "exponential")
    plan = build_plan("heun", NoiseSchedule.sd(prediction_type), num_steps, spacing=spacing, steps_offset=1,
                      sigma_schedule=sigma_schedule)
    x0 = _x_init()
    ref_ts, ref_xs = _heun_reference(ref, num_steps, x0.clone())
    assert plan.init_noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert len(ts) == len(ref_ts) == 2 * num_steps - 1
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=1e-4)  # diffusers' timesteps are float32
    assert len(ours) == len(ref_xs)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"call {i}: relative error {err}"


def test_heun_plan_layout():
    plan = build_plan("heun", NoiseSchedule.sd(), 4)
    assert plan.timesteps == [999.0, 666.0, 666.0, 333.0, 333.0, 0.0, 0.0]
    assert [c.anchor for c in plan.calls] == ["x", "keep"] * 3 + ["keep"]
    assert [c.c_a for c in plan.calls] == [0.0, 0.5] * 3 + [0.0]
    assert plan.info["order"] == 2 and not any(c.noise for c in plan.calls)


def test_heun_full_last_step_when_final_sigma_positive():
    plan = build_plan("heun", NoiseSchedule.sd(), None, sigmas=[10.0, 3.0, 1.0, 0.2])
    assert len(plan.calls) == 6
    assert plan.calls[-1].c_a == 0.5
    # the last corrector runs at the timestep of sigma 0.2
    assert plan.timesteps[-1] == pytest.approx(float(NoiseSchedule.sd().sigma_to_t(0.2)[0]))
    with pytest.raises(ValueError, match="final_sigma"):
        build_plan("heun", NoiseSchedule.sd(), 10, final_sigma="max")
