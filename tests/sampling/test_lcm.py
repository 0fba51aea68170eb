import pytest
import torch
from diffusers import LCMScheduler

from velodiff.sampling import NoiseSchedule, build_plan
from parity import diffusers_trajectory, relative_error, velodiff_trajectory


def _x_init(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _compare(ref, plan, num_steps, **set_timesteps_kwargs):
    x0 = _x_init()
    ref_ts, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone(), **set_timesteps_kwargs)
    ts, ours = velodiff_trajectory(plan, x0.clone())
    assert ts == ref_ts
    assert plan.init_noise_scale == ref.init_noise_sigma == 1.0
    assert len(ours) == len(ref_xs)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"step {i}: relative error {err}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 7, 8, 50])
def test_lcm_matches_diffusers(prediction_type, num_steps):
    # fresh noise on every step but the last: same seed, same draws
    ref = LCMScheduler(prediction_type=prediction_type)
    plan = build_plan("lcm", NoiseSchedule.sd(prediction_type), num_steps)
    _compare(ref, plan, num_steps)


@pytest.mark.parametrize("original_inference_steps,strength,num_steps", [(25, 1.0, 6), (100, 1.0, 9), (50, 0.5, 4),
                                                                         (50, 0.35, 5)])
def test_lcm_grid_options_match_diffusers(original_inference_steps, strength, num_steps):
    ref = LCMScheduler()
    plan = build_plan("lcm", NoiseSchedule.sd(), num_steps, original_inference_steps=original_inference_steps,
                      strength=strength)
    _compare(ref, plan, num_steps, original_inference_steps=original_inference_steps, strength=strength)


def test_lcm_timestep_scaling_matches_diffusers():
    ref = LCMScheduler(timestep_scaling=2.5, prediction_type="v_prediction")
    plan = build_plan("lcm", NoiseSchedule.sd("v_prediction"), 4, timestep_scaling=2.5)
    _compare(ref, plan, 4)


def test_lcm_custom_timesteps_match_diffusers():
    custom = [999, 759, 499, 259, 19]
    ref = LCMScheduler()
    plan = build_plan("lcm", NoiseSchedule.sd(), None, timesteps=custom)
    _compare(ref, plan, None, timesteps=custom)


def test_lcm_timesteps_table():
    # the reference notes' table (section 0.1): a subset of the 50-step distillation grid 19, 39, ..., 999
    sd = NoiseSchedule.sd()
    assert build_plan("lcm", sd, 4).timesteps == [999.0, 759.0, 499.0, 259.0]
    assert build_plan("lcm", sd, 2).timesteps == [999.0, 499.0]
    assert build_plan("lcm", sd, 8).timesteps == [999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]
    plan = build_plan("lcm", sd, 4)
    assert [c.noise for c in plan.calls] == [True, True, True, False]
    assert plan.info["order"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=51), "original_inference_steps"),
    (dict(num_steps=4, original_inference_steps=2000), "original_inference_steps"),
    (dict(num_steps=30, strength=0.5), "strength"),
    (dict(num_steps=4, strength=0.0), "strength"),
    (dict(num_steps=4, timestep_scaling=0.0), "timestep_scaling"),
    (dict(num_steps=None, timesteps=[19, 999]), "timesteps"),
    (dict(num_steps=3, timesteps=[999, 499]), "num_steps"),
])
def test_lcm_bad_options(kwargs, match):
    num_steps = kwargs.pop("num_steps")
    with pytest.raises(ValueError, match=match):
        build_plan("lcm", NoiseSchedule.sd(), num_steps, **kwargs)
