"""GHVB: generalized heavy-ball momentum for diffusion ODEs (Wizadwongsa, Chinchuthakun, Khungurn, Raj and
Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", ICLR 2024, arXiv 2307.11118;
reference code sWizad/momentum-diffusion).

In DDIM's scaled variables xbar = x / alpha, varsigma = sigma / alpha, the probability-flow ODE is
d xbar / d varsigma = eps, and DDIM is its Euler method. GHVB of "order" k - 1 + beta (e.g. 3.8: k = 4,
beta = 0.8) takes, per step,

    v_n       = (1 - beta) v_{n-1} + beta eps_n                 (heavy-ball momentum, v_{-1} := eps_0)
    e_n       = mixer_k(v_n, .., v_{n-k+1}; beta) / beta         (Adams-Bashforth-like combination)
    xbar_next = xbar_n + (varsigma_next - varsigma_n) e_n

with a lower-order warm-up (min(k, n + 1) velocities). beta = 1 is k-step Adams-Bashforth on eps (PLMS
without its Runge-Kutta warm-up); order 1 (k = 1, beta = 1) is DDIM.

Convergence order (tests/sampling/test_convergence.py: closed-form Gaussian PF-ODE, data scales s in [0.1, 1.5],
varsigma from 14.6 to 0.029, float64 updates):

- Steps uniform in varsigma: order k = ceil(order), for every beta. Along the smooth velocity v(varsigma),
  eps_n = v_n + ((1 - beta)/beta)(v_n - v_{n-1}) holds exactly and the mixer integrates polynomials of degree
  < k exactly (:func:`mixer_weights`), so a step's local error is O(h^{k+1}). Measured slopes 2.00 / 3.04 / 3.97
  / 5.00 for order 1.8 / 2.8 / 3.8 / 4.7 and 2.00 / 3.11 / 3.97 / 4.99 for 2 / 3 / 4 / 5 (N = 8192-32768, exact
  start-up). The asymptotic regime needs steps well below the smallest data scale: k = 4 measures only 3.0-3.3
  at N = 512-2048 (h = 14.6/N is s_min/3.5 .. s_min/14) and 3.7-3.9 at N = 2048-8192.
- The warm-up (an Euler step, then k - 2 lower-order mixers) and the momentum's start from v_0 = eps_0 add
  O(h^2) error terms, so strictly the shipped start-up makes every k >= 2 second order as N -> infinity. Their
  constants are tiny because sampling starts at high noise, where eps hardly changes with varsigma
  (d eps / d varsigma ~ s^2 / varsigma^3): they show only beyond N ~ 8192 (errors ~1e-11; order 4.7: slopes
  4.85, 4.67, 2.71, 2.02 between N = 2048, 4096, .., 32768, while the same runs with exact start-up give 5.0).
- Steps not uniform in varsigma (DDIM timesteps of a real schedule, grids uniform in lambda): the weights are
  those of equal steps, which leaves a local error (h^3 / 12) eps'(u) varsigma''(u) (derivatives along the step
  index u) for every k >= 3, so the order is min(k, 2): measured 2.00 for orders 2, 3, 3.8 and 4 on a
  lambda-uniform grid. On SD's own timesteps (uniform in t: steps in varsigma differ up to 119-fold at N = 50)
  the errors of k >= 3 are not even monotone in N up to 500 (order 4: 1.4e-3, 7.3e-5, 2.1e-4, 8.5e-5 at N =
  50, 100, 200, 500) and order 2 measures slopes of 1.5-1.8.

``plan.info["order"]`` states this: k when the plan's steps are uniform in varsigma, else min(k, 2);
``plan.info["nominal_order"]`` is k, the mixer's order on uniform steps.

Fused form: D = v_n = beta*(p_x x + p_m g) + (1 - beta) H[v_{n-1}] goes to the ring buffer (k slots), and
x_next = (alpha_next/alpha) x + alpha_next dvarsigma (w_0 D + sum_j w_j H[v_{n-j}]).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import List, Sequence, Tuple

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, discrete_start
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

MAX_K = 5  # the paper's code provides mixers up to 5 velocities


def _solve_exact(rows: List[List[Fraction]], rhs: List[Fraction]) -> List[Fraction]:
    """Gauss-Jordan elimination in exact rational arithmetic (tiny Vandermonde systems)."""
    n = len(rhs)
    m = [list(r) + [b] for r, b in zip(rows, rhs)]
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _backward_weights(k: int, moments: Sequence[Fraction]) -> List[Fraction]:
    """Weights w_j on v(t - j h), j = 0..k-1, exact for polynomials of degree < k: sum_j w_j (-j)^m = moments[m]."""
    rows = [[Fraction((-j) ** m) for j in range(k)] for m in range(k)]
    return _solve_exact(rows, list(moments[:k]))


def mixer_weights(k: int) -> Tuple[List[Fraction], List[Fraction]]:
    """(A, C) with mixer_k(beta) = beta * A + (1 - beta) * C, weights on v_n, v_{n-1}, .., v_{n-k+1}.

    Derivation (checked against the paper's table in the tests). Since eps_n = v_n + ((1-beta)/beta)(v_n - v_{n-1}),
    the exact step average (1/h) int_{t}^{t+h} eps is approximated by
      A: (1/h) int_0^h v(t+s) ds            -> moments int_0^1 s^m ds = 1/(m+1)   (k-step Adams-Bashforth)
      C: (1/h) int_0^h v(t+s) - v(t+s-h) ds -> moments (1 - (-1)^m)/(m+1)
    and e = A + ((1-beta)/beta) C = (beta A + (1-beta) C) / beta. For k = 4 this gives the paper's
    ((46+9b) v0 - (78-19b) v1 + (42-5b) v2 - (10-b) v3) / 24.
    """
    ab = _backward_weights(k, [Fraction(1, m + 1) for m in range(k)])
    c = _backward_weights(k, [Fraction(1 - (-1) ** m, m + 1) for m in range(k)])
    return ab, c


def mixer_coefficients(k: int, beta: float) -> List[float]:
    """e = sum_j w_j v_{n-j}: the mixer of k velocities divided by beta, in float64."""
    ab, c = mixer_weights(k)
    return [(beta * float(a) + (1.0 - beta) * float(cc)) / beta for a, cc in zip(ab, c)]


def split_order(order: float) -> Tuple[int, float]:
    """The paper's order k - 1 + beta -> (k, beta), beta in (0, 1]; integers give beta = 1."""
    if isinstance(order, bool) or not isinstance(order, numbers.Real) or not math.isfinite(order):
        raise ValueError(f"order must be a number in (0, {MAX_K}], got {order!r}")
    if not 0 < order <= MAX_K:
        raise ValueError(f"order must be in (0, {MAX_K}], got {order!r}")
    order = float(order)
    k = max(1, math.ceil(round(order, 12)))
    beta = round(order - (k - 1), 12)  # 3.8 - 3 = 0.7999999999999998 -> 0.8
    return k, beta


def _uniform(steps: Sequence[float], rtol: float = 1e-9) -> bool:
    """Whether the steps in varsigma are equal to ``rtol`` of their mean (float64 round-off of varsigma from
    alphas_cumprod is ~1e-12 of a step on the tables where they are equal by construction)."""
    mean = sum(steps) / len(steps)
    return all(abs(d - mean) <= rtol * abs(mean) for d in steps)


@register("ghvb")
def ghvb(schedule: sch.NoiseSchedule, num_steps: int, *, order: float = 1.8, spacing: str = "leading",
         steps_offset: int = 1, set_alpha_to_one: bool = False, begin: int = 0) -> SamplerPlan:
    """GHVB of the paper's ``order`` = k - 1 + beta over DDIM timesteps (like :func:`ddim`).

    Args:
        order: in (0, 5]; k = ceil(order) velocities are mixed, beta = order - (k - 1) is the momentum weight
            (1.8: second-order mixer with beta = 0.8; integers are momentum-free Adams-Bashforth, 1 is DDIM).
            The reference code leaves the choice to the user (their sweeps use 0.7 .. 4.0); 1.8 is our default.
        spacing, steps_offset, set_alpha_to_one: the DDIM discretisation (see :func:`velodiff.sampling.samplers.
            ddim.ddim`); each step goes to the next scheduled timestep.
        begin: start at point ``begin`` of the N-step schedule, momentum and warm-up fresh from there.

    ``plan.info['order']`` is the convergence order of this plan: k = ceil(order) when its steps are uniform in
    varsigma, else min(k, 2), since the mixer's weights are those of equal steps (as in the paper and PLMS);
    ``plan.info['nominal_order']`` is k. DDIM timesteps of a real schedule are far from uniform in varsigma, so
    ``order`` above 2 buys stability and damping (the paper's aim), not a higher order. See the module
    docstring for the derivation and the measurements.
    """
    n = sch.check_num_steps(num_steps)
    k, beta = split_order(order)
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not supported by ghvb (DDIM discretisation of a VP schedule)")
    ab = schedule.alphas_cumprod
    ts = sch.ddim_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset)[check_begin(begin, n):]
    n = len(ts)
    final_ab = 1.0 if set_alpha_to_one else float(ab[0])
    slots = k if (k > 1 or beta < 1.0) else 0  # order 1 keeps no history: exactly DDIM's single-input update
    mixers = {m: mixer_coefficients(m, beta) for m in range(1, k + 1)}
    calls, d_varsigmas = [], []
    for i, t in enumerate(ts):
        ab_t = float(ab[t])
        ab_next = float(ab[ts[i + 1]]) if i + 1 < n else final_ab
        alpha, sigma = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
        alpha_next, sigma_next = math.sqrt(ab_next), math.sqrt(1.0 - ab_next)
        d_varsigma = sigma_next / alpha_next - sigma / alpha
        d_varsigmas.append(d_varsigma)
        p_x, p_m = sch.noise_prediction_coefficients(schedule.prediction_type, alpha, sigma)
        q = [0.0] * slots
        if i > 0 and beta < 1.0:
            # GHVB momentum first: v_n = (1 - beta) v_{n-1} + beta eps_n, with v_0 = eps_0
            p_x, p_m = beta * p_x, beta * p_m
            q[(i - 1) % slots] = 1.0 - beta
        w = mixers[min(k, i + 1)]
        # xbar_next = xbar + dvarsigma * e,  x = alpha * xbar,  e = sum_j w_j v_{n-j}
        scale = alpha_next * d_varsigma
        c_h = [0.0] * slots
        for j in range(1, len(w)):
            c_h[(i - j) % slots] += scale * w[j]
        calls.append(Call(timestep=float(t), p_x=p_x, p_m=p_m, q=q, c_x=alpha_next / alpha, c_d=scale * w[0],
                          c_h=c_h, write_slot=i % slots if slots else -1))
    info = {"order": k if _uniform(d_varsigmas) else min(k, 2), "nominal_order": k, "ghvb_order": order, "k": k,
            "beta": beta, "timesteps": ts.tolist(), "start": discrete_start(ab, ts[0])}
    return SamplerPlan("ghvb", calls, history_slots=slots, info=info)
