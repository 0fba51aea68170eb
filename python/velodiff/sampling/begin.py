"""Starting a sampler part-way through its discretisation (image-to-image, SDEdit).

Every builder takes ``begin``: the plan is a fresh run from point ``begin`` of the discretisation it computed for
``num_steps`` (multistep history empty, lower-order warm-up from that point), which is what diffusers does after
``set_timesteps(N)``, slicing ``timesteps[begin * order:]`` and ``set_begin_index(begin * order)``. The plan
records where it starts in ``plan.info["start"]`` so that a pipeline can noise clean latents to that point:
``x_start = state_scale * (alpha * x0 + sigma * eps)`` with the VP ``alpha``, ``sigma`` of the first point, and
``state_scale`` = 1 for samplers whose state is the VP sample, ``1 / alpha`` for samplers whose state is the
VE-scaled sample ``x0 + (sigma/alpha) eps`` (euler, euler_a, heun; diffusers' ``add_noise`` of those schedulers).
"""
from __future__ import annotations

import numbers
from typing import Dict

import numpy as np

from velodiff.sampling.schedules import Points


def check_begin(begin, num_points: int) -> int:
    """``begin`` as an int in [0, num_points); ValueError naming ``begin`` otherwise."""
    if isinstance(begin, bool) or not isinstance(begin, numbers.Integral) or not 0 <= begin < num_points:
        raise ValueError(f"begin must be an integer in [0, {num_points}) (the number of steps), got {begin!r}")
    return int(begin)


def tail(points: Points, begin: int) -> Points:
    """The points from index ``begin`` on (model evaluations ``begin..N-1`` and the end point)."""
    begin = check_begin(begin, points.num_steps)
    if begin == 0:
        return points
    return Points(points.timesteps[begin:], points.alpha[begin:], points.sigma[begin:])


def start_info(timestep: float, alpha: float, sigma: float, ve: bool = False) -> Dict[str, float]:
    """``plan.info["start"]``: the model timestep and VP (alpha, sigma) of the first point, and the factor
    ``state_scale`` from the VP sample ``alpha x0 + sigma eps`` to the sampler's state (1/alpha in VE space)."""
    alpha, sigma = float(alpha), float(sigma)
    return {"timestep": float(timestep), "alpha": alpha, "sigma": sigma,
            "state_scale": 1.0 / alpha if ve else 1.0}


def points_start(points: Points, ve: bool = False) -> Dict[str, float]:
    """:func:`start_info` of the first of ``points``."""
    return start_info(float(points.timesteps[0]), float(points.alpha[0]), float(points.sigma[0]), ve)


def discrete_start(alphas_cumprod: np.ndarray, t: int) -> Dict[str, float]:
    """:func:`start_info` of a discrete training timestep ``t`` (DDIM-style samplers)."""
    ab = float(alphas_cumprod[int(t)])
    return start_info(float(t), ab ** 0.5, (1.0 - ab) ** 0.5)
