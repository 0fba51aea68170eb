"""Euler, Euler-ancestral and Heun on the probability-flow ODE in VE form (Karras et al. 2022), for discrete VP
models, in the conventions of diffusers' EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete schedulers.

The state is the VE-scaled sample ``x = x_vp / alpha = x0 + varsigma * eps`` with ``varsigma = sigma/alpha``; the
model sees ``x / sqrt(varsigma^2 + 1)`` (= the VP sample). With the data prediction ``x0_hat(x, varsigma)`` the ODE
is ``dx/dvarsigma = d = (x - x0_hat) / varsigma`` (Karras et al. eq. 3 with s(t) = 1, sigma(t) = t).
"""
from __future__ import annotations

import math
from typing import Optional

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import points_start, tail
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register


def _check_vp(schedule: sch.NoiseSchedule, name: str) -> None:
    if schedule.prediction_type == "flow":
        raise ValueError(f"prediction_type 'flow' is not supported by {name!r}; use the 'flow_euler' sampler")


def _ve_x0(prediction_type: str, varsigma: float):
    """(p_x, p_m) with x0_hat = p_x * x_ve + p_m * model_output at VE sigma ``varsigma``."""
    alpha = 1.0 / math.sqrt(varsigma * varsigma + 1.0)
    p_x, p_m = sch.data_prediction_coefficients(prediction_type, alpha, varsigma * alpha)
    return p_x * alpha, p_m  # x_vp = alpha * x_ve


def _init_noise_scale(max_sigma: float, spacing: str) -> float:
    # diffusers' init_noise_sigma: the largest sigma for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
    # (the exact std of the VE state when the data has unit variance).
    return max_sigma if spacing in ("linspace", "trailing") else math.sqrt(max_sigma * max_sigma + 1.0)


def _points(schedule, num_steps, spacing, steps_offset, sigma_schedule, sigma_min, sigma_max, final_sigma,
            sigmas, begin=0):
    """(points from ``begin`` on, init_noise_scale of the full discretisation)."""
    if spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"spacing must be linspace|leading|trailing, got {spacing!r}")
    if sigmas is not None and num_steps is not None and len(sigmas) != num_steps + 1:
        raise ValueError(f"sigmas must have num_steps + 1 = {num_steps + 1} entries, got {len(sigmas)}")
    pts = sch.euler_discretize(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                               sigma_schedule=sigma_schedule, sigma_min=sigma_min, sigma_max=sigma_max,
                               final_sigma=final_sigma, sigmas=sigmas)
    return tail(pts, begin), _init_noise_scale(float(max(pts.varsigma)), spacing)


def _euler_call(prediction_type: str, s: float, s_to: float, timestep: float) -> Call:
    """One Euler step x + (s_to - s) d of the VE ODE from ``s`` evaluated at model timestep ``timestep``."""
    p_x, p_m = _ve_x0(prediction_type, s)
    r = s_to / s
    # x + (s_to - s)(x - x0)/s = (s_to/s) x + (1 - s_to/s) x0
    return Call(timestep=timestep, input_scale=1.0 / math.sqrt(s * s + 1.0), p_x=p_x, p_m=p_m, c_x=r, c_d=1.0 - r)


@register("euler")
def euler(schedule: sch.NoiseSchedule, num_steps: Optional[int], *, spacing: str = "linspace", steps_offset: int = 0,
          sigma_schedule: str = "default", sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
          final_sigma: str = "zero", timestep_type: str = "discrete", sigmas=None, begin: int = 0) -> SamplerPlan:
    """Euler on the VE probability-flow ODE (Karras et al. 2022, Algorithm 1 without the second-order correction).

    Options follow diffusers' EulerDiscreteScheduler: ``spacing`` (``timestep_spacing``), ``steps_offset``,
    ``sigma_schedule`` = ``default`` | ``karras`` (``use_karras_sigmas``) | ``exponential``
    (``use_exponential_sigmas``), ``sigma_min`` / ``sigma_max`` (their range), ``final_sigma`` = ``zero`` |
    ``sigma_min`` (``final_sigmas_type``), ``timestep_type`` = ``discrete`` | ``continuous`` (the model gets
    ``0.25 * log(varsigma)``, diffusers' convention for continuous-time v-prediction models). ``sigmas``:
    explicit descending VE sigmas [N+1] including the end (``num_steps`` may then be None).

    The state is VE-scaled: initial noise is scaled by ``plan.init_noise_scale`` (diffusers' rule, which depends
    on ``spacing``), and with ``final_sigma='sigma_min'`` the result is the VE state at that sigma, as in diffusers.
    No churn (``s_churn``): diffusers adds the churn noise after the model call, so it is not Karras' method.
    ``begin``: start at point ``begin`` of the N-step discretisation (see :mod:`velodiff.sampling.begin`);
    the VE state there is ``x0 + varsigma eps`` (diffusers' ``add_noise``).
    """
    _check_vp(schedule, "euler")
    if timestep_type not in ("discrete", "continuous"):
        raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {timestep_type!r}")
    if timestep_type == "continuous" and schedule.prediction_type != "v_prediction":
        # diffusers silently keeps discrete timesteps in that case
        raise ValueError("timestep_type 'continuous' is only defined for v_prediction models")
    pts, init = _points(schedule, num_steps, spacing, steps_offset, sigma_schedule, sigma_min, sigma_max,
                        final_sigma, sigmas, begin)
    s = [float(v) for v in pts.varsigma]
    calls = []
    for i in range(pts.num_steps):
        t = 0.25 * math.log(s[i]) if timestep_type == "continuous" else float(pts.timesteps[i])
        calls.append(_euler_call(schedule.prediction_type, s[i], s[i + 1], t))
    start = dict(points_start(pts, ve=True), timestep=calls[0].timestep)
    return SamplerPlan("euler", calls, init_noise_scale=init,
                       info={"order": 1, "timesteps": [c.timestep for c in calls], "sigmas": s, "start": start})


@register("euler_a")
def euler_ancestral(schedule: sch.NoiseSchedule, num_steps: Optional[int], *, eta: float = 1.0,
                    spacing: str = "linspace", steps_offset: int = 0, sigma_schedule: str = "default",
                    sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                    sigmas=None, begin: int = 0) -> SamplerPlan:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``; diffusers EulerAncestralDiscreteScheduler).

    A step from s to s_next splits s_next^2 = s_down^2 + s_up^2 with
    ``s_up = min(s_next, eta * sqrt(s_next^2 (s^2 - s_next^2) / s^2))``: a deterministic Euler step to s_down,
    then fresh noise of std s_up. eta = 1 (the default, and diffusers' only value) is the DDPM-like ancestral
    step; eta = 0 is plain Euler. One N(0, I) draw of the sample's shape per step, in step order (diffusers
    draws on the final step too, with zero weight; velodiff skips that draw). Options as :func:`euler`;
    ``sigma_schedule`` other than ``default`` is a velodiff extension (diffusers' ancestral scheduler has none).
    ``begin``: start at point ``begin`` of the N-step discretisation (see :mod:`velodiff.sampling.begin`).
    """
    _check_vp(schedule, "euler_a")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    pts, init = _points(schedule, num_steps, spacing, steps_offset, sigma_schedule, sigma_min, sigma_max, "zero",
                        sigmas, begin)
    s = [float(v) for v in pts.varsigma]
    calls = []
    for i in range(pts.num_steps):
        s_from, s_to = s[i], s[i + 1]
        s_up = min(s_to, eta * math.sqrt(max(s_to * s_to * (s_from * s_from - s_to * s_to), 0.0)) / s_from)
        s_down = math.sqrt(max(s_to * s_to - s_up * s_up, 0.0))
        call = _euler_call(schedule.prediction_type, s_from, s_down, float(pts.timesteps[i]))
        call.c_z = s_up
        call.noise = s_up > 0
        calls.append(call)
    return SamplerPlan("euler_a", calls, init_noise_scale=init,
                       info={"order": 1, "timesteps": [c.timestep for c in calls], "sigmas": s, "eta": eta,
                             "start": points_start(pts, ve=True)})


@register("heun")
def heun(schedule: sch.NoiseSchedule, num_steps: Optional[int], *, spacing: str = "linspace", steps_offset: int = 0,
         sigma_schedule: str = "default", sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
         final_sigma: str = "zero", sigmas=None, begin: int = 0) -> SamplerPlan:
    """Heun's second-order method on the VE ODE (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    Each step from s to s_next takes an Euler predictor x' = x + (s_next - s) d(x, s), then the trapezoidal
    corrector x_next = x + (s_next - s) (d(x, s) + d(x', s_next)) / 2: two model calls, the second at the
    timestep of s_next. A step ending at sigma 0 is Euler only (d is undefined there), so N steps to clean data
    take 2N - 1 calls, with the timesteps of diffusers' HeunDiscreteScheduler (every timestep but the first
    listed twice). Options as :func:`euler`. ``begin``: start at point ``begin`` of the N-step discretisation
    (see :mod:`velodiff.sampling.begin`)
    (diffusers: ``timesteps[2 * begin:]``, i.e. from the second copy of that timestep).
    """
    _check_vp(schedule, "heun")
    pts, init = _points(schedule, num_steps, spacing, steps_offset, sigma_schedule, sigma_min, sigma_max,
                        final_sigma, sigmas, begin)
    pt = schedule.prediction_type
    s = [float(v) for v in pts.varsigma]
    ts = [float(t) for t in pts.timesteps]
    calls = []
    for i in range(pts.num_steps):
        s_from, s_to = s[i], s[i + 1]
        pred = _euler_call(pt, s_from, s_to, ts[i])
        pred.step = i
        if s_to <= 0:
            calls.append(pred)
            continue
        pred.anchor = "x"  # keep the step's start x for the corrector
        calls.append(pred)
        # The corrector sees x' (its x) and the step start (anchor). With d(x, s) = (x' - x_start)/(s_next - s):
        # x_next = x_start + dt/2 (d + d') = x_start/2 + (1/2 + dt/(2 s_next)) x' - dt/(2 s_next) x0_hat(x').
        p_x, p_m = _ve_x0(pt, s_to)
        h = (s_to - s_from) / (2.0 * s_to)
        t_to = ts[i + 1] if i + 1 < pts.num_steps else float(schedule.sigma_to_t(s_to)[0])
        calls.append(Call(timestep=t_to, input_scale=1.0 / math.sqrt(s_to * s_to + 1.0), p_x=p_x, p_m=p_m,
                          c_x=0.5 + h, c_a=0.5, c_d=-h, step=i))
    return SamplerPlan("heun", calls, init_noise_scale=init,
                       info={"order": 2, "timesteps": [c.timestep for c in calls], "sigmas": s,
                             "start": points_start(pts, ve=True)})
