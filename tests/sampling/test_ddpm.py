import math

import pytest
import torch
from diffusers import DDPMScheduler

from velodiff.sampling import NoiseSchedule, build_plan
from parity import diffusers_trajectory, relative_error, velodiff_trajectory

BETAS = {"linear": ("linear", 0.0001, 0.02), "sd": ("scaled_linear", 0.00085, 0.012)}


def _setup(prediction_type, betas, spacing, steps_offset, variance_type):
    beta_schedule, beta_start, beta_end = BETAS[betas]
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                        prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset,
                        variance_type=variance_type, clip_sample=False)
    schedule = NoiseSchedule.from_config(beta_schedule, 1000, beta_start, beta_end, prediction_type)
    return ref, schedule


def _x_init(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _assert_steps_match(ours, theirs, upto=None):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(list(zip(ours, theirs))[:upto]):
        err = relative_error(a, b)
        assert err <= 1e-5, f"step {i}: relative error {err}"


# diffusers 0.42's DDPMScheduler steps to the next entry of its own timestep list (previous_timestep indexes
# self.timesteps once set_timesteps was called), not to t - T//N as DDIM does, so trailing spacing with N not
# dividing T (N = 7) is compared too. Cases whose last timestep is 0 (linspace, leading without offset) match on
# every step for both variance types; otherwise (trailing, leading with offset) diffusers adds noise on the final
# step, negligible under fixed_small (std 1e-10) but not under fixed_large: that step is checked in
# test_final_step_noise_quirk.
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,steps_offset,num_steps", [
    ("leading", 0, 7), ("leading", 0, 20), ("linspace", 0, 9), ("linspace", 0, 25), ("trailing", 0, 7),
    ("trailing", 0, 10), ("leading", 1, 10)])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("betas", ["linear", "sd"])
def test_ddpm_matches_diffusers(prediction_type, spacing, steps_offset, num_steps, variance_type, betas):
    ref, schedule = _setup(prediction_type, betas, spacing, steps_offset, variance_type)
    plan = build_plan("ddpm", schedule, num_steps, variance_type=variance_type, spacing=spacing,
                      steps_offset=steps_offset)
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone())
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert ts == ref_ts
    assert plan.init_noise_scale == float(ref.init_noise_sigma)
    last_t_positive = ts[-1] > 0
    # the final step differs only when diffusers adds noise there (t > 0) with a non-negligible std (fixed_large)
    upto = -1 if (last_t_positive and variance_type == "fixed_large") else None
    _assert_steps_match(ours, ref_xs, upto)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps_offset,num_steps", [("leading", 1, 10), ("trailing", 0, 7)])
def test_final_step_noise_quirk(prediction_type, spacing, steps_offset, num_steps):
    # diffusers adds noise on the final step whenever its timestep is > 0 (leading spacing with steps_offset=1 ends
    # at t = 1, trailing at t = T/N - 1), with std sqrt(beta') = sqrt(1 - abar_t) under fixed_large (beta' is taken
    # against abar = 1 after the end). velodiff ends on the posterior mean, as Ho et al.'s Algorithm 2. Check that
    # this one draw is the whole difference.
    ref, schedule = _setup(prediction_type, "sd", spacing, steps_offset, "fixed_large")
    plan = build_plan("ddpm", schedule, num_steps, variance_type="fixed_large", spacing=spacing,
                      steps_offset=steps_offset)
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone())
    _, ours = velodiff_trajectory(plan, x0.clone())
    t_last = int(ref_ts[-1])
    assert t_last > 0
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(x0.shape, generator=gen) for _ in range(num_steps)]  # one per diffusers step
    std = math.sqrt(1.0 - float(ref.alphas_cumprod[t_last]))
    assert relative_error(ours[-1] + std * draws[-1], ref_xs[-1]) <= 1e-5
    assert relative_error(ours[-1], ref_xs[-1]) > 1e-3


def test_fixed_small_log_is_fixed_small():
    num_steps = 8
    ref, schedule = _setup("epsilon", "linear", "leading", 0, "fixed_small_log")
    plan = build_plan("ddpm", schedule, num_steps, variance_type="fixed_small_log")
    plan_small = build_plan("ddpm", schedule, num_steps, variance_type="fixed_small")
    assert [c.c_z for c in plan.calls] == [c.c_z for c in plan_small.calls]
    x0 = _x_init()
    _, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone())
    _, ours = velodiff_trajectory(plan, x0.clone())
    _assert_steps_match(ours, ref_xs)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_custom_timesteps_match_diffusers(variance_type):
    custom = [961, 850, 700, 512, 300, 128, 40, 0]
    ref, schedule = _setup("epsilon", "linear", "leading", 0, variance_type)
    plan = build_plan("ddpm", schedule, None, variance_type=variance_type, timesteps=custom)
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, None, x0.clone(), timesteps=custom)
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert ts == ref_ts == [float(t) for t in custom]
    _assert_steps_match(ours, ref_xs)


def test_ddpm_plan_structure():
    plan = build_plan("ddpm", NoiseSchedule.sd(), 7, spacing="trailing")
    assert plan.timesteps == [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
    assert all(c.noise for c in plan.calls[:-1]) and not plan.calls[-1].noise and plan.calls[-1].c_z == 0.0
    assert plan.info["order"] == 1
    # the last step maps x0_hat to itself: abar_prev = 1
    last = plan.calls[-1]
    assert last.c_x == pytest.approx(0.0, abs=1e-15) and last.c_d == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(variance_type="fixed_large_log"), "variance_type"),
    (dict(spacing="karras"), "spacing"),
    (dict(timesteps=[10, 20]), "timesteps"),
    (dict(timesteps=[1000, 20]), "timesteps"),
    (dict(spacing="leading", steps_offset=1, num_steps=1000), "steps_offset"),
])
def test_ddpm_bad_options(kwargs, match):
    num_steps = kwargs.pop("num_steps", None if "timesteps" in kwargs else 10)
    with pytest.raises(ValueError, match=match):
        build_plan("ddpm", NoiseSchedule.sd(), num_steps, **kwargs)


def test_ddpm_rejects_flow_and_bad_steps():
    with pytest.raises(ValueError, match="flow"):
        build_plan("ddpm", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("ddpm", NoiseSchedule.sd(), 0)
    with pytest.raises(ValueError, match="num_steps"):
        build_plan("ddpm", NoiseSchedule.sd(), 3, timesteps=[500, 0])
