"""DDIM (Song et al. 2021, eq. 12) with eta, in the discrete VP parameterisation of diffusers' DDIMScheduler."""
from __future__ import annotations

import math

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, discrete_start
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register


@register("ddim")
def ddim(schedule: sch.NoiseSchedule, num_steps: int, *, eta: float = 0.0, spacing: str = "leading",
         steps_offset: int = 1, set_alpha_to_one: bool = False, begin: int = 0) -> SamplerPlan:
    """DDIM from the discrete timesteps of ``spacing``; each step goes to the next entry of the schedule
    (diffusers uses ``t - T//N``, which is the same for leading and trailing spacing).
    ``begin``: start at point ``begin`` of the N-step schedule (see :mod:`velodiff.sampling.begin`)."""
    n = sch.check_num_steps(num_steps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ab = schedule.alphas_cumprod
    ts = sch.ddim_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset)[check_begin(begin, n):]
    n = len(ts)
    final_ab = 1.0 if set_alpha_to_one else float(ab[0])
    calls = []
    for i, t in enumerate(ts):
        ab_t = float(ab[t])
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < n else final_ab
        alpha, sigma = math.sqrt(ab_t), math.sqrt(1 - ab_t)
        p_x, p_m = sch.data_prediction_coefficients(schedule.prediction_type, alpha, sigma)
        # eq. 16: sigma_eta^2 = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = eta * math.sqrt(max(var, 0.0))
        direction = math.sqrt(max(1 - ab_prev - std ** 2, 0.0))
        # x_prev = sqrt(abar_prev) x0 + direction * eps + std z,  eps = (x - alpha x0)/sigma
        calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m,
                          c_x=direction / sigma, c_d=math.sqrt(ab_prev) - direction * alpha / sigma,
                          c_z=std, noise=eta > 0))
    return SamplerPlan("ddim", calls, info={"order": 1, "timesteps": ts.tolist(), "start": discrete_start(ab, ts[0])})
