"""Singlestep DPM-Solver of order 1, 2, 3 (Lu et al. 2022, arXiv 2206.00927; data-prediction form from
DPM-Solver++, Lu et al. 2022, arXiv 2211.01095), in the grid-stage form of diffusers'
``DPMSolverSinglestepScheduler``.

The solver works on a grid of points (see :func:`velodiff.sampling.schedules.discretize`). A step of order k is a
*group* of k consecutive grid intervals: the k model evaluations of the group sit at the group's first k grid points,
and each of them moves the state from the group's start sample (the anchor) to the next grid point using all the
predictions of the group made so far. So stage 1 is a first-order step, stage 2 a second-order update from the
group start over two intervals, stage 3 a third-order update from the group start over three intervals. Groups
follow diffusers' order list (``[1, 2, 3] * ...`` with lower-order final groups).

This module also holds the helpers the multistep builders of :mod:`.dpmpp` share (phi functions, option checks,
linear combinations of predictions -> calls).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, start_info
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
SIGMA_SCHEDULES = ("default", "karras", "exponential")
FINAL_SIGMAS = ("zero", "sigma_min")


# --------------------------------------------------------------------------------------------------------------
# phi functions, float64
# --------------------------------------------------------------------------------------------------------------

def phi(k: int, z: float) -> float:
    """The exponential-integrator function phi_k(z) = sum_{n>=0} z^n / (n+k)!  (phi_0 = e^z), in float64.

    phi_1 is expm1(z)/z; higher ones follow phi_{j+1}(z) = (phi_j(z) - 1/j!) / z. Near z = 0 that recurrence
    cancels, so |z| < 1 uses the power series instead (30 terms: truncation < 1e-30).
    """
    if k < 0:
        raise ValueError(f"phi order must be >= 0, got {k}")
    if not math.isfinite(z):
        raise ValueError(f"phi needs a finite argument, got {z}")
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        total, term = 0.0, 1.0 / math.factorial(k)
        for n in range(30):
            total += term
            term *= z / (n + k + 1)
        return total
    val = math.expm1(z) / z
    for j in range(1, k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def data_phis(h: float):
    """(phi1, phi2, phi3) of the data-prediction exponential integrator over a log-SNR step h (DPM-Solver++).

    With x0(lambda) expanded at the step start, lambda = lambda_s + tau:
        x_t = (sigma_t/sigma_s) x_s + alpha_t int_0^h e^{tau-h} x0(lambda_s + tau) dtau
            = (sigma_t/sigma_s) x_s - alpha_t phi1 x0 + alpha_t phi2 (h x0') - alpha_t phi3 (h^2 x0'') + O(h^4)
    where phi1 = expm1(-h), phi2 = phi1/h + 1 = h phi_2(-h), phi3 = phi2/h - 1/2 = -h phi_3(-h) (the naming of the
    diffusers / LuChengTHU code). h = +inf (a step to sigma = 0) is allowed for phi1 only.
    """
    p1 = math.expm1(-h)
    if math.isinf(h):
        return p1, math.nan, math.nan
    return p1, h * phi(2, -h), -h * phi(3, -h)


def noise_phis(h: float):
    """(psi1, psi2, psi3) of the noise-prediction exponential integrator (DPM-Solver, arXiv 2206.00927 eq. 3.4):
        x_t = (alpha_t/alpha_s) x_s - sigma_t psi1 eps - sigma_t psi2 (h eps') - sigma_t psi3 (h^2 eps'') + O(h^4)
    with psi1 = expm1(h), psi2 = psi1/h - 1 = h phi_2(h), psi3 = psi2/h - 1/2 = h phi_3(h).
    """
    if not math.isfinite(h):
        raise ValueError("the noise-prediction solver cannot step to sigma = 0")
    return math.expm1(h), h * phi(2, h), h * phi(3, h)


def sde_phis(h: float):
    """Coefficients of the data-prediction SDE integrator (SDE-DPM-Solver++, arXiv 2211.01095), over a log-SNR
    step h:  x_t = (sigma_t/sigma_s) e^{-h} x_s + 2 alpha_t int_0^h e^{-2(h-tau)} x0(lambda_s+tau) dtau
    + sigma_t sqrt(1 - e^{-2h}) z. Returns (e^{-h}, a1, a2, noise) with
    a1 = 1 - e^{-2h} = -expm1(-2h) (weight of x0), a2 = expm1(-2h)/(2h) + 1 = 2h phi_2(-2h) (weight of h x0'),
    noise = sqrt(-expm1(-2h)).
    """
    a1 = -math.expm1(-2.0 * h)
    a2 = math.nan if math.isinf(h) else 2.0 * h * phi(2, -2.0 * h)
    return math.exp(-h), a1, a2, math.sqrt(a1)


# --------------------------------------------------------------------------------------------------------------
# options shared by the DPM builders
# --------------------------------------------------------------------------------------------------------------

def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {'|'.join(map(str, choices))}, got {value!r}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def dpm_points(schedule: sch.NoiseSchedule, num_steps, *, spacing: str, steps_offset: int, sigma_schedule: str,
               final_sigma: str, sigmas, round_timesteps: bool) -> sch.Points:
    """The grid of a DPM builder; checks the options (ValueError naming the option)."""
    if not isinstance(schedule, sch.NoiseSchedule):
        raise ValueError(f"schedule must be a VP NoiseSchedule, got {type(schedule).__name__} (flow-matching "
                         f"schedules are not supported by the DPM builders)")
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not supported: the DPM builders step along the VP path of "
                         "schedules.discretize (use a flow sampler)")
    check_choice("spacing", spacing, ("linspace", "leading", "trailing"))
    check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    if not isinstance(steps_offset, (int, np.integer)) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    check_bool("round_timesteps", round_timesteps)
    if sigmas is None:
        sch.check_num_steps(num_steps)
    return sch.discretize(schedule, num_steps, spacing=spacing, steps_offset=int(steps_offset),
                          sigma_schedule=sigma_schedule, final_sigma=final_sigma, sigmas=sigmas,
                          round_timesteps=round_timesteps)


def prediction_coefficients(algorithm: str, prediction_type: str, alpha: float, sigma: float):
    """(p_x, p_m) of the prediction the solver integrates: x0 for dpmsolver++ / SDE, eps for dpmsolver."""
    if algorithm == "dpmsolver":
        return sch.noise_prediction_coefficients(prediction_type, alpha, sigma)
    return sch.data_prediction_coefficients(prediction_type, alpha, sigma)


def make_call(points: sch.Points, j: int, algorithm: str, prediction_type: str, weights: Dict[int, float],
              slot_of: Dict[int, int], history_slots: int, *, c_x: float = 0.0, c_a: float = 0.0,
              c_z: float = 0.0, noise: bool = False, write_slot: int = -1, anchor: str = "keep") -> Call:
    """The call evaluating the model at grid point j, with x_next = c_x x + c_a anchor + sum_i weights[i] m_i + c_z z.

    ``weights`` maps grid indices to the weight of their prediction m_i: index j is this call's new prediction D,
    every other index must be in ``slot_of`` (its ring-buffer slot).
    """
    p_x, p_m = prediction_coefficients(algorithm, prediction_type, float(points.alpha[j]), float(points.sigma[j]))
    c_h = [0.0] * history_slots
    c_d = 0.0
    for i, w in weights.items():
        if i == j:
            c_d += w
        else:
            c_h[slot_of[i]] += w
    return Call(timestep=float(points.timesteps[j]), p_x=p_x, p_m=p_m, c_x=c_x, c_a=c_a, c_d=c_d, c_z=c_z,
                c_h=c_h if history_slots else (), write_slot=write_slot, noise=noise, anchor=anchor)


def add(acc: Dict[int, float], i: int, w: float) -> None:
    acc[i] = acc.get(i, 0.0) + w


# --------------------------------------------------------------------------------------------------------------
# singlestep
# --------------------------------------------------------------------------------------------------------------

def singlestep_orders(num_steps: int, order: int, lower_order_final: bool, final_zero: bool) -> List[int]:
    """diffusers' order list: the order of each grid step (stage k of a group has order k).

    Groups of ``order`` steps; with lower_order_final a shorter final group takes the remainder (and for
    N % 3 == 0 at order 3 the last full group becomes [1, 2] + [1]); a step to sigma = 0 is always first order.
    Callers make lower_order_final True whenever N % order != 0, as diffusers does.
    """
    n = num_steps
    if lower_order_final:
        if order == 3:
            if n % 3 == 0:
                orders = [1, 2, 3] * (n // 3 - 1) + [1, 2] + [1]
            elif n % 3 == 1:
                orders = [1, 2, 3] * (n // 3) + [1]
            else:
                orders = [1, 2, 3] * (n // 3) + [1, 2]
        elif order == 2:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1] * n
    else:
        orders = list(range(1, order + 1)) * (n // order)
    orders = orders[:n]
    if final_zero and orders:
        orders[-1] = 1
    return orders


def _singlestep(order: int, schedule: sch.NoiseSchedule, num_steps, *, algorithm_type: str = "dpmsolver++",
                solver_type: str = "midpoint", lower_order_final: bool = False, spacing: str = "linspace",
                steps_offset: int = 0, sigma_schedule: str = "default", final_sigma: str = "zero", sigmas=None,
                round_timesteps: bool = True, warm_start: bool = False, begin: int = 0) -> SamplerPlan:
    check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    warm_start = check_bool("warm_start", warm_start)
    pts = dpm_points(schedule, num_steps, spacing=spacing, steps_offset=steps_offset, sigma_schedule=sigma_schedule,
                     final_sigma=final_sigma, sigmas=sigmas, round_timesteps=round_timesteps)
    final_zero = float(pts.sigma[-1]) == 0.0
    if algorithm_type == "dpmsolver" and final_zero:
        raise ValueError("final_sigma='zero' (or sigmas ending at 0) is not supported with algorithm_type="
                         "'dpmsolver': the noise-prediction update is undefined at sigma = 0; use 'sigma_min'")
    # A singlestep method needs no history from before its start; with warm_start the first order-1 points are
    # skipped so that sampling starts at sigmas[order-1] like the multistep builders (nothing to pre-fill).
    begin = check_begin(begin, pts.num_steps)
    if warm_start and begin:
        raise ValueError("begin and warm_start cannot be combined")
    start = order - 1 if warm_start else begin
    n_total = pts.num_steps
    n = n_total - start
    if n < 1:
        raise ValueError(f"warm_start needs more than {order - 1} sigma intervals, got {n_total}")
    # diffusers switches lower_order_final on when N is not a multiple of the order, or when the last step
    # goes to sigma = 0 (set_timesteps, persistently in the scheduler config).
    # With begin, diffusers keeps the order list of all N steps and lowers an order where fewer predictions than
    # it needs were made since the start (step(): `while model_outputs[-order] is None`).
    n_list = n_total if begin else n
    lof = lower_order_final or (n_list % order != 0) or final_zero
    orders = singlestep_orders(n_list, order, lof, final_zero)[begin:]
    orders = [min(o, c + 1) for c, o in enumerate(orders)]

    lam = pts.lambdas
    alpha, sigma = pts.alpha, pts.sigma
    k_slots = order - 1
    pred = schedule.prediction_type
    calls: List[Call] = []
    for c, stage in enumerate(orders):
        j = start + c               # grid point of this call (the model is evaluated here)
        g = j - (stage - 1)         # the group's start point (the anchor's grid index)
        t = j + 1                   # target point
        h = float(lam[t] - lam[g])  # the group's whole log-SNR step so far
        nxt = orders[c + 1] if c + 1 < len(orders) else 1
        write = stage - 1 if nxt == stage + 1 else -1   # keep m_j only if a later stage of this group needs it
        slot_of = {g + k: k for k in range(stage - 1)}  # stage k's prediction sits in slot k-1
        a_t, s_t = float(alpha[t]), float(sigma[t])
        w: Dict[int, float] = {}
        if algorithm_type == "dpmsolver++":
            x_coef = s_t / float(sigma[g])
            p1, p2, p3 = data_phis(h)
            add(w, g, -a_t * p1)      # zeroth-order term, x0 at the group start
            b1 = a_t * p2             # weight of the h x0' estimate (phi2 term)
            b2 = -a_t * p3            # weight of the h^2 x0'' estimate (phi3 term)
            mid = -0.5 * a_t * p1     # midpoint rule: x0' h ~ D1 weighted by (1 - e^{-h})/2 instead of phi2
        else:
            x_coef = float(alpha[t]) / float(alpha[g])
            p1, p2, p3 = noise_phis(h)
            add(w, g, -s_t * p1)
            b1 = -s_t * p2
            b2 = -s_t * p3
            mid = -0.5 * s_t * p1
        if stage == 2:
            # DPM-Solver-2 / DPM-Solver++(2S) (2206.00927 Alg. 1; 2211.01095 Alg. 1) with the intermediate point on
            # the grid: D1 = (m_j - m_g)/r0 estimates h * m' (r0 = (lambda_j - lambda_g)/h).
            r0 = float(lam[j] - lam[g]) / h
            wd1 = mid if solver_type == "midpoint" else b1
            add(w, j, wd1 / r0)
            add(w, g, -wd1 / r0)
        elif stage == 3:
            # DPM-Solver-3 (2206.00927 Alg. 2): stages at r1 = (lambda_{g+1}-lambda_g)/h, r0 = (lambda_j-lambda_g)/h.
            r0 = float(lam[j] - lam[g]) / h
            r1 = float(lam[g + 1] - lam[g]) / h
            if solver_type == "midpoint":
                # only the last stage: phi2 * (m_j - m_g)/r0 (third order when r0 = 2/3, as in the paper)
                add(w, j, b1 / r0)
                add(w, g, -b1 / r0)
            else:
                # Taylor: D1 = h m' and D2 = h^2 m'' from the divided differences of (m_g, m_{g+1}, m_j)
                d1_0 = {g + 1: 1.0 / r1, g: -1.0 / r1}     # (m_{g+1} - m_g)/r1
                d1_1 = {j: 1.0 / r0, g: -1.0 / r0}         # (m_j - m_g)/r0
                for i in {g, g + 1, j}:
                    a0, a1 = d1_0.get(i, 0.0), d1_1.get(i, 0.0)
                    d1 = (r0 * a0 - r1 * a1) / (r0 - r1)
                    d2 = 2.0 * (a1 - a0) / (r0 - r1)
                    add(w, i, b1 * d1 + b2 * d2)
        if stage == 1:
            call = make_call(pts, j, algorithm_type, pred, w, slot_of, k_slots, c_x=x_coef, write_slot=write,
                             anchor="x" if nxt == 2 else "keep")
        else:
            call = make_call(pts, j, algorithm_type, pred, w, slot_of, k_slots, c_a=x_coef, write_slot=write)
        calls.append(call)
    name = f"dpm_solver_{order}"
    info = {"order": order, "orders": orders, "timesteps": [cl.timestep for cl in calls],
            "sigmas": pts.varsigma[start:].tolist(), "lower_order_final": lof, "algorithm_type": algorithm_type,
            "solver_type": solver_type, "warm_start": [],
            "start": start_info(pts.timesteps[start], alpha[start], sigma[start])}
    return SamplerPlan(name, calls, history_slots=k_slots, info=info)


_SINGLESTEP_DOC = """Singlestep DPM-Solver-{k} on the grid of ``schedules.discretize`` (diffusers'
    ``DPMSolverSinglestepScheduler`` with ``solver_order={k}``).

    Options: ``algorithm_type`` dpmsolver++ (data prediction, default) | dpmsolver (noise prediction; needs
    ``final_sigma='sigma_min'``); ``solver_type`` midpoint | heun (second/third-order stage formulas);
    ``lower_order_final`` (diffusers semantics: forced on when N % {k} != 0 or the end point is sigma = 0);
    ``spacing``, ``steps_offset``, ``sigma_schedule`` (default | karras | exponential), ``final_sigma``
    (zero | sigma_min), ``sigmas`` (explicit descending VE sigmas [N+1]; ``num_steps`` is then ignored),
    ``round_timesteps``; ``warm_start`` (starts at sigmas[{km1}], skipping the points before it: a singlestep
    method needs no history, so plan.info['warm_start'] is empty); ``begin`` (start at point ``begin``: the
    order list of all N steps from there on, each order capped by the predictions made since the start, as
    diffusers; see :mod:`velodiff.sampling.begin`).
    plan.info: order, orders (per call), timesteps, sigmas, lower_order_final (effective), warm_start ([]).
    The theoretical order {k} holds when each group's stages sit at equal log-SNR spacing (e.g. uniform-lambda
    sigmas); on other grids the third-order group formulas are only second order.
    """


def _make_singlestep(k: int):
    def builder(schedule: sch.NoiseSchedule, num_steps=None, *, algorithm_type: str = "dpmsolver++",
                solver_type: str = "midpoint", lower_order_final: bool = False, spacing: str = "linspace",
                steps_offset: int = 0, sigma_schedule: str = "default", final_sigma: str = "zero", sigmas=None,
                round_timesteps: bool = True, warm_start: bool = False, begin: int = 0) -> SamplerPlan:
        return _singlestep(k, schedule, num_steps, algorithm_type=algorithm_type, solver_type=solver_type,
                           lower_order_final=lower_order_final, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule, final_sigma=final_sigma, sigmas=sigmas,
                           round_timesteps=round_timesteps, warm_start=warm_start, begin=begin)
    builder.__name__ = builder.__qualname__ = f"dpm_solver_{k}"
    builder.__doc__ = _SINGLESTEP_DOC.format(k=k, km1=k - 1)
    return register(f"dpm_solver_{k}")(builder)


dpm_solver_1 = _make_singlestep(1)
dpm_solver_2 = _make_singlestep(2)
dpm_solver_3 = _make_singlestep(3)
