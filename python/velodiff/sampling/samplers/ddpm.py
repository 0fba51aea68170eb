"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 / eq. 6-7) over a subsequence of the training timesteps,
in the discrete VP parameterisation of diffusers' DDPMScheduler."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, discrete_start
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def _check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or len(ts) < 1 or not np.all(ts == np.round(ts)):
        raise ValueError("timesteps must be a non-empty 1-D sequence of integers")
    ts = ts.astype(np.int64)
    if np.any(np.diff(ts) >= 0):
        raise ValueError("timesteps must be strictly descending")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps})")
    return ts


@register("ddpm")
def ddpm(schedule: sch.NoiseSchedule, num_steps: Optional[int], *, variance_type: str = "fixed_small",
         spacing: str = "leading", steps_offset: int = 0, timesteps: Optional[Sequence[int]] = None,
         begin: int = 0) -> SamplerPlan:
    """DDPM ancestral sampling from the discrete timesteps of ``spacing`` (diffusers defaults: ``leading``,
    ``steps_offset=0``), or from explicit descending integer ``timesteps`` (then ``num_steps`` may be None).

    Each step goes from t to the next scheduled timestep s (or to clean data after the last one), using the
    posterior q(x_s | x_t, x0_hat) of the skipped chain, with beta' = 1 - abar_t/abar_s.

    ``variance_type``: ``fixed_small`` (the posterior variance, Ho et al. sigma^2 = beta~), ``fixed_small_log``
    (the same numbers, diffusers computes them through a log), or ``fixed_large`` (sigma^2 = beta'). Learned
    variances (a per-element model output) are not a scalar-coefficient update and are rejected.

    The last step returns the posterior mean (no noise), as in Ho et al.'s Algorithm 2. diffusers adds noise on
    the last step whenever its timestep is > 0 (``trailing``, or ``leading`` with ``steps_offset >= 1``):
    negligible for ``fixed_small`` (std clamped to 1e-10), std sqrt(1 - abar_t) for ``fixed_large``.

    ``begin``: start at point ``begin`` of the N-step schedule (see :mod:`velodiff.sampling.begin`).
    """
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {DDPM_VARIANCE_TYPES} (learned variances need a "
                         f"per-element model output), got {variance_type!r}")
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not a VP model; use the 'flow_euler' sampler")
    n_train = schedule.num_train_timesteps
    if timesteps is not None:
        ts = _check_timesteps(timesteps, n_train)
        if num_steps is not None and num_steps != len(ts):
            raise ValueError(f"num_steps ({num_steps}) does not match len(timesteps) ({len(ts)})")
    else:
        ts = sch.ddim_timesteps(sch.check_num_steps(num_steps), n_train, spacing, steps_offset)
        if ts[0] >= n_train:
            raise ValueError(f"steps_offset ({steps_offset}) pushes the first timestep past {n_train - 1}")
    ts = ts[check_begin(begin, len(ts)):]
    ab = schedule.alphas_cumprod
    n = len(ts)
    calls = []
    for i, t in enumerate(ts):
        last = i + 1 == n
        ab_t = float(ab[t])
        ab_prev = 1.0 if last else float(ab[ts[i + 1]])
        alpha, sigma = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
        p_x, p_m = sch.data_prediction_coefficients(schedule.prediction_type, alpha, sigma)
        beta = 1.0 - ab_t / ab_prev  # the effective beta of the skipped step t -> prev
        # Ho et al. eq. 7: posterior mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_prev)
        # / (1 - abar_t) x_t; posterior variance beta~ = (1 - abar_prev) / (1 - abar_t) beta.
        c_d = math.sqrt(ab_prev) * beta / (1.0 - ab_t)
        c_x = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab_t)
        if last:
            std = 0.0
        elif variance_type == "fixed_large":
            std = math.sqrt(beta)
        else:
            std = math.sqrt(max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20))
        calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m, c_x=c_x, c_d=c_d, c_z=std, noise=std > 0))
    return SamplerPlan("ddpm", calls, info={"order": 1, "timesteps": ts.tolist(), "variance_type": variance_type,
                                                   "start": discrete_start(ab, ts[0])})
