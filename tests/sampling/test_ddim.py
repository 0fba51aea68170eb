import pytest
import torch
from diffusers import DDIMScheduler

from velodiff.sampling import NoiseSchedule, build_plan
from parity import dummy_model, relative_error, velodiff_trajectory


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 7), ("leading", 20), ("trailing", 10), ("trailing", 25)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(prediction_type, spacing, eta, num_steps):
    # diffusers steps from t to t - T//N; where N does not divide T under trailing spacing that is not the next
    # timestep of its own schedule. velodiff always steps to the next entry, so parity is tested where both agree.
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
               timestep_spacing=spacing, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = DDIMScheduler(**cfg)
    schedule = NoiseSchedule.sd(prediction_type)
    plan = build_plan("ddim", schedule, num_steps, eta=eta, spacing=spacing, steps_offset=1)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    ref.set_timesteps(num_steps)
    assert plan.timesteps == [float(t) for t in ref.timesteps]

    def ref_step_eta(scheduler, n, x):
        # diffusers' DDIM takes eta as a step() argument
        scheduler.set_timesteps(n)
        gen = torch.Generator().manual_seed(0)
        out = []
        for t in scheduler.timesteps:
            m = dummy_model(x, float(t))
            x = scheduler.step(m, t, x, eta=eta, generator=gen).prev_sample
            out.append(x.clone())
        return out

    ref_xs = ref_step_eta(ref, num_steps, x0.clone())
    _, ours = velodiff_trajectory(plan, x0.clone())
    assert len(ours) == len(ref_xs)
    for i, (a, b) in enumerate(zip(ours, ref_xs)):
        assert relative_error(a, b) <= 1e-5, f"step {i}: {relative_error(a, b)}"


def test_ddim_steps_to_next_scheduled_timestep():
    plan = build_plan("ddim", NoiseSchedule.sd(), 7, spacing="trailing")
    assert plan.timesteps == [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
