"""Euler for flow-matching / rectified-flow models (SD3, Flux, InstaFlow), in the conventions of diffusers'
FlowMatchEulerDiscreteScheduler.

Path ``x_s = (1 - s) x0 + s eps`` (s = 1 noise, s = 0 data); the model predicts the velocity ``v = dx/ds``, which
for the straight path is ``eps - x0`` (Lipman et al. 2023; Esser et al. 2024, SD3, eq. 2-3 with a = 1 - t, b = t).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, start_info
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

FLOW_CONVENTIONS = ("flow_matching", "rectified_flow")


def _flow_schedule(schedule, shift: Optional[float]) -> sch.FlowSchedule:
    if schedule is None:
        return sch.FlowSchedule(shift=1.0 if shift is None else shift)
    if isinstance(schedule, sch.FlowSchedule):
        if shift is None or shift == schedule.shift:
            return schedule
        return sch.FlowSchedule(shift=shift, num_train_timesteps=schedule.num_train_timesteps,
                                use_dynamic_shifting=schedule.use_dynamic_shifting,
                                time_shift_type=schedule.time_shift_type, shift_terminal=schedule.shift_terminal)
    if isinstance(schedule, sch.NoiseSchedule):
        if schedule.prediction_type != "flow":
            raise ValueError(f"flow_euler needs a FlowSchedule or a NoiseSchedule with prediction_type 'flow', "
                             f"got prediction_type {schedule.prediction_type!r}")
        return sch.FlowSchedule(shift=1.0 if shift is None else shift, num_train_timesteps=schedule.num_train_timesteps)
    raise ValueError(f"schedule must be a FlowSchedule, a flow NoiseSchedule or None, got {type(schedule).__name__}")


@register("flow_euler")
def flow_euler(schedule, num_steps: Optional[int], *, shift: Optional[float] = None, mu: Optional[float] = None,
               spacing: str = "pipeline", sigma_schedule: str = "default", stochastic_sampling: bool = False,
               convention: str = "flow_matching", sigmas=None, begin: int = 0) -> SamplerPlan:
    """Euler on the flow ODE: ``x_next = x + (s_next - s) v(x, s*T)``; the model input is x itself.

    Args:
        schedule: a :class:`~velodiff.sampling.schedules.FlowSchedule` (shift, dynamic shifting, terminal stretch),
            a NoiseSchedule with ``prediction_type='flow'`` (only its T is used) or None (T = 1000).
        shift: overrides the schedule's static shift (SD3 uses 3.0).
        mu: the dynamic shift (Flux; :func:`~velodiff.sampling.schedules.flow_dynamic_mu`), required when the
            schedule has ``use_dynamic_shifting``.
        spacing: ``pipeline`` (base sigmas ``linspace(1, 1/N, N)``, what Flux-style pipelines pass) or
            ``scheduler`` (diffusers' scheduler default when no sigmas are given, used by the SD3 pipeline).
        sigma_schedule: ``default`` | ``karras`` | ``exponential`` (diffusers' use_karras_sigmas /
            use_exponential_sigmas, re-spacing between the shifted end points).
        stochastic_sampling: diffusers' stochastic variant: ``x0_hat = x - s v``, then
            ``x_next = (1 - s_next) x0_hat + s_next z`` with fresh noise (none on the last step, where s_next = 0).
        convention: ``flow_matching`` (velocity ``eps - x0``, SD3/Flux) or ``rectified_flow``: the InstaFlow /
            2-rectified-flow SD 1.5 pipelines (Liu et al. 2023), whose UNet predicts the opposite velocity
            ``x0 - eps`` and which step ``x <- x + v / N`` at model timesteps ``t_k = (1 - k/N) * 1000``; that is
            this sampler with the velocity negated and unshifted ``pipeline`` sigmas (shift must stay 1).
        sigmas: explicit descending flow sigmas [N+1] in [0, 1], including the end point, used as given (no shift);
            ``num_steps`` may then be None.
        begin: start at point ``begin`` (diffusers' ``scale_noise``: ``x = (1 - s) x0 + s eps`` there).
    """
    if convention not in FLOW_CONVENTIONS:
        raise ValueError(f"convention must be one of {FLOW_CONVENTIONS}, got {convention!r}")
    fs = _flow_schedule(schedule, shift)
    if convention == "rectified_flow" and (fs.shift != 1.0 or fs.use_dynamic_shifting or fs.shift_terminal):
        raise ValueError("convention 'rectified_flow' uses unshifted sigmas 1 - k/N; shift must be 1")
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim != 1 or len(s) < 2 or np.any(np.diff(s) >= 0) or s[-1] < 0 or s[0] > 1:
            raise ValueError("sigmas must be a strictly descending 1-D sequence of >= 2 values in [0, 1]")
        if num_steps is not None and len(s) != num_steps + 1:
            raise ValueError(f"sigmas must have num_steps + 1 = {num_steps + 1} entries, got {len(s)}")
    else:
        s = fs.sigmas(num_steps, spacing=spacing, mu=mu, sigma_schedule=sigma_schedule)
    s = s[check_begin(begin, len(s) - 1):]
    ts = fs.timesteps(s)
    sign = -1.0 if convention == "rectified_flow" else 1.0  # model output = sign * (eps - x0)
    calls = []
    for i in range(len(ts)):
        s_from, s_to = float(s[i]), float(s[i + 1])
        if stochastic_sampling:
            # x0_hat = x - s v;  x_next = (1 - s_next) x0_hat + s_next z
            calls.append(Call(timestep=float(ts[i]), p_x=1.0, p_m=-s_from * sign, c_d=1.0 - s_to, c_z=s_to,
                              noise=s_to > 0))
        else:
            calls.append(Call(timestep=float(ts[i]), p_x=0.0, p_m=sign, c_x=1.0, c_d=s_to - s_from))
    return SamplerPlan("flow_euler", calls, info={"order": 1, "timesteps": ts.tolist(), "sigmas": s.tolist(),
                                                  "convention": convention,
                                                  "start": start_info(ts[0], 1.0 - s[0], s[0])})
