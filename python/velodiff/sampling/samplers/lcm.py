"""Multistep latent-consistency sampling (Luo et al. 2023, LCM, Algorithm 1; Song et al. 2023 consistency models),
in the conventions of diffusers' LCMScheduler."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, discrete_start
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

SIGMA_DATA = 0.5


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50,
                  strength: float = 1.0) -> np.ndarray:
    """The N inference timesteps: an evenly indexed subset (floor of N points in [0, M), M the grid size) of
    the distillation grid ``k*(j+1) - 1`` (j < M = int(original_inference_steps * strength),
    k = T // original_inference_steps), descending."""
    n = sch.check_num_steps(num_steps)
    if original_inference_steps > num_train_timesteps or original_inference_steps < 1:
        raise ValueError(f"original_inference_steps must be in [1, {num_train_timesteps}], "
                         f"got {original_inference_steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if n > original_inference_steps:
        raise ValueError(f"num_inference_steps ({n}) cannot exceed original_inference_steps "
                         f"({original_inference_steps})")
    k = num_train_timesteps // original_inference_steps
    grid = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    if len(grid) < n:
        raise ValueError(f"original_inference_steps x strength = {original_inference_steps} x {strength} gives "
                         f"{len(grid)} grid timesteps, fewer than num_inference_steps ({n}); raise strength")
    grid = grid[::-1]
    idx = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return grid[idx].astype(np.int64)


def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0) -> tuple:
    """(c_skip, c_out) of the consistency parameterisation f(x, t) = c_skip x + c_out x0_hat (Song et al. 2023,
    eq. 7 / appendix C with sigma_data = 0.5), evaluated at the scaled time ``timestep_scaling * t``."""
    u = timestep * timestep_scaling
    denom = u * u + SIGMA_DATA * SIGMA_DATA
    return SIGMA_DATA * SIGMA_DATA / denom, u / math.sqrt(denom)


@register("lcm")
def lcm(schedule: sch.NoiseSchedule, num_steps: Optional[int], *, original_inference_steps: int = 50,
        timestep_scaling: float = 10.0, strength: float = 1.0,
        timesteps: Optional[Sequence[int]] = None, begin: int = 0) -> SamplerPlan:
    """Multistep LCM sampling: at each timestep t the consistency function
    ``denoised = c_skip(t) x + c_out(t) x0_hat(x, t)`` estimates clean data, which is re-noised to the next
    timestep with fresh noise ``x_next = alpha_next * denoised + sigma_next * z`` (LCM Algorithm 1); the last step
    returns ``denoised``. One N(0, I) draw per step but the last, in step order (as diffusers).

    ``original_inference_steps``: size of the distillation grid (50 for the published LCMs); ``strength`` < 1
    restricts the grid to its low-noise part (img2img). ``timesteps``: explicit descending integer timesteps
    (then ``num_steps`` may be None). Initial noise is unit (``init_noise_scale = 1``).
    ``begin``: start at point ``begin`` of the N-step schedule (see :mod:`velodiff.sampling.begin`).
    """
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not supported by 'lcm'")
    if not timestep_scaling > 0:
        raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling}")
    n_train = schedule.num_train_timesteps
    if timesteps is not None:
        ts = np.asarray(timesteps)
        if ts.ndim != 1 or len(ts) < 1 or not np.all(ts == np.round(ts)) or np.any(np.diff(ts) >= 0) \
                or ts[0] >= n_train or ts[-1] < 0:
            raise ValueError(f"timesteps must be strictly descending integers in [0, {n_train})")
        if num_steps is not None and num_steps != len(ts):
            raise ValueError(f"num_steps ({num_steps}) does not match len(timesteps) ({len(ts)})")
        ts = ts.astype(np.int64)
    else:
        ts = lcm_timesteps(num_steps, n_train, original_inference_steps, strength)
    ts = ts[check_begin(begin, len(ts)):]
    ab = schedule.alphas_cumprod
    n = len(ts)
    calls = []
    for i, t in enumerate(ts):
        ab_t = float(ab[t])
        p_x, p_m = sch.data_prediction_coefficients(schedule.prediction_type, math.sqrt(ab_t), math.sqrt(1 - ab_t))
        c_skip, c_out = lcm_boundary_scalings(float(t), timestep_scaling)
        if i + 1 == n:
            calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m, c_x=c_skip, c_d=c_out))
        else:
            ab_next = float(ab[ts[i + 1]])
            a_next, s_next = math.sqrt(ab_next), math.sqrt(1.0 - ab_next)
            calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m, c_x=a_next * c_skip, c_d=a_next * c_out,
                              c_z=s_next, noise=True))
    return SamplerPlan("lcm", calls, info={"order": 1, "timesteps": ts.tolist(), "start": discrete_start(ab, ts[0])})
