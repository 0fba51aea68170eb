"""BDIA-DDIM: bi-directional integration approximation (Zhang, Lewis, Kleijn, ECCV 2024; guoqiang-zhang-x/BDIA),
an exactly invertible variant of DDIM.

With Phi_{i->j}(z, eps) = a_ij z + b_ij eps the DDIM step from point i to point j using eps evaluated at z_i,
a_ij = sqrt(abar_j / abar_i), b_ij = sqrt(1 - abar_j) - sqrt(abar_j (1 - abar_i) / abar_i), and
Delta(t_i -> t_j | z_i) = Phi_{i->j}(z_i) - z_i, the paper's update (README form; indices descend as it samples)

    z_{i-1} = z_{i+1} - (1 - gamma)(z_{i+1} - z_i) - gamma Delta(t_i -> t_{i+1} | z_i) + Delta(t_i -> t_{i-1} | z_i)

reads, with points renumbered in sampling order (z_0 = noise, z_N = sample),

    z_1     = Phi_{0->1}(z_0)                                                 (plain DDIM)
    z_{i+1} = Phi_{i->i+1}(z_i) + gamma * (z_{i-1} - Phi_{i->i-1}(z_i)),   i >= 1

i.e. the forward DDIM step plus gamma times the residual of a backward DDIM step to the previous state. Given
z_i and z_{i+1} the previous state is recovered exactly,
z_{i-1} = (z_{i+1} - Phi_{i->i+1}(z_i)) / gamma + Phi_{i->i-1}(z_i), which is what makes BDIA invertible.

Fused form: one call per step with the previous state as the anchor (``anchor='x'`` hands z_i to call i+1):
x_next = (a_{i,i+1} - gamma a_{i,i-1}) x + gamma anchor + (b_{i,i+1} - gamma b_{i,i-1}) eps.
"""
from __future__ import annotations

import math
import numbers

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, discrete_start
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register


def ddim_map(ab_from: float, ab_to: float):
    """(a, b) of Phi_{from->to}(z, eps) = a z + b eps, the deterministic DDIM step (Song et al. eq. 12)."""
    a = math.sqrt(ab_to / ab_from)
    b = math.sqrt(1.0 - ab_to) - math.sqrt(ab_to * (1.0 - ab_from) / ab_from)
    return a, b


@register("bdia")
def bdia(schedule: sch.NoiseSchedule, num_steps: int, *, gamma: float = 1.0, spacing: str = "leading",
         steps_offset: int = 1, set_alpha_to_one: bool = False, begin: int = 0) -> SamplerPlan:
    """BDIA-DDIM over DDIM timesteps (like :func:`velodiff.sampling.samplers.ddim.ddim` with eta = 0).

    Args:
        gamma: in [0, 1]; 0 is DDIM. The BDIA README recommends 0.5 for 10 steps and 1.0 for 40 steps; 1.0 is
            the default (the best-conditioned exact inverse: the inverse divides by gamma every step).
        spacing, steps_offset, set_alpha_to_one: the DDIM discretisation; each step goes to the next scheduled
            timestep, the last one to abar_0 (or 1 with ``set_alpha_to_one``).
        begin: start at point ``begin`` of the N-step schedule (its first step a plain DDIM step).

    ``plan.info['abar']`` lists abar at the N + 1 points, for the inverse recursion.
    """
    n = sch.check_num_steps(num_steps)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    gamma = float(gamma)
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not supported by bdia (DDIM discretisation of a VP schedule)")
    ab = schedule.alphas_cumprod
    ts = sch.ddim_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset)[check_begin(begin, n):]
    abar = [float(ab[t]) for t in ts] + [1.0 if set_alpha_to_one else float(ab[0])]
    calls = []
    for i, t in enumerate(ts):
        alpha, sigma = math.sqrt(abar[i]), math.sqrt(1.0 - abar[i])
        p_x, p_m = sch.noise_prediction_coefficients(schedule.prediction_type, alpha, sigma)
        a_fwd, b_fwd = ddim_map(abar[i], abar[i + 1])
        if i == 0 or gamma == 0.0:
            c_x, c_a, c_d = a_fwd, 0.0, b_fwd
        else:
            # z_{i+1} = Phi_{i->i+1}(z_i) + gamma (z_{i-1} - Phi_{i->i-1}(z_i))
            a_bwd, b_bwd = ddim_map(abar[i], abar[i - 1])
            c_x, c_a, c_d = a_fwd - gamma * a_bwd, gamma, b_fwd - gamma * b_bwd
        calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m, c_x=c_x, c_a=c_a, c_d=c_d,
                          anchor="x" if gamma > 0.0 else "keep"))
    # The forward and backward DDIM steps share their leading local error C h^2, so a BDIA step's local error is
    # (1 - gamma) C h^2 + O(h^3): first order for gamma < 1, second order at gamma = 1 (measured in
    # tests/sampling/test_convergence.py).
    info = {"order": 2 if gamma == 1.0 else 1, "gamma": gamma, "timesteps": ts.tolist(), "abar": abar,
            "start": discrete_start(ab, ts[0])}
    return SamplerPlan("bdia", calls, info=info)
