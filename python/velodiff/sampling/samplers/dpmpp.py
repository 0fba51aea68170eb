"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095): 2M, 3M, a corrected 3M, and SDE-DPM-Solver++ 2M,
in the form of diffusers' ``DPMSolverMultistepScheduler`` (algorithm_type dpmsolver++ / sde-dpmsolver++).

Every step evaluates the model once at the current grid point j, converts the output to a data prediction m_j,
keeps it in a ring buffer of ``order - 1`` slots (slot j % (order-1); the op reads the slot before overwriting it,
so the slot being written still holds m_{j-order+1} for this step), and moves x_j to x_{j+1} with the previous
predictions m_{j-1}, m_{j-2}.
"""
from __future__ import annotations

from typing import Dict, List

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import check_begin, start_info
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register
from velodiff.sampling.samplers.dpm_solver import (SOLVER_TYPES, add, check_bool, check_choice, data_phis,
                                                   dpm_points, make_call, sde_phis)


def multistep_orders(num_calls: int, order: int, *, lower_order_final: bool, euler_at_final: bool,
                     final_zero: bool, warm_start: bool, total_steps: int = None) -> List[int]:
    """The order of each step, as diffusers' ``step`` picks it.

    Warm-up: the k-th step (k = 0, 1, ...) has at most order k+1 (no warm-up with ``warm_start``). Last step:
    first order with ``euler_at_final``, when it ends at sigma = 0, or with ``lower_order_final`` when there are
    fewer than 15 steps (then the second-to-last step is at most second order). ``total_steps``: the N of that
    test (default ``num_calls``); diffusers compares the whole schedule's length, also when starting late.
    """
    n = num_calls
    short = (total_steps if total_steps is not None else n) < 15
    orders = []
    for c in range(n):
        available = order if warm_start else c + 1
        last = c == n - 1 and (euler_at_final or (lower_order_final and short) or final_zero)
        second = c == n - 2 and lower_order_final and short
        if order == 1 or available < 2 or last:
            orders.append(1)
        elif order == 2 or available < 3 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _multistep(name: str, order: int, schedule: sch.NoiseSchedule, num_steps, *, sde: bool, exact_d2: bool,
               solver_type: str, lower_order_final: bool, euler_at_final: bool, spacing: str, steps_offset: int,
               sigma_schedule: str, final_sigma: str, sigmas, round_timesteps: bool, warm_start: bool,
               info_order: int, extra_info: Dict, begin: int = 0) -> SamplerPlan:
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    euler_at_final = check_bool("euler_at_final", euler_at_final)
    warm_start = check_bool("warm_start", warm_start)
    pts = dpm_points(schedule, num_steps, spacing=spacing, steps_offset=steps_offset, sigma_schedule=sigma_schedule,
                     final_sigma=final_sigma, sigmas=sigmas, round_timesteps=round_timesteps)
    final_zero = float(pts.sigma[-1]) == 0.0
    k_slots = order - 1
    begin = check_begin(begin, pts.num_steps)
    if warm_start and begin:
        raise ValueError("begin and warm_start cannot be combined")
    start = k_slots if warm_start else begin
    n = pts.num_steps - start
    if n < 1:
        raise ValueError(f"warm_start needs more than {k_slots} sigma intervals, got {pts.num_steps}")
    orders = multistep_orders(n, order, lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                              final_zero=final_zero, warm_start=warm_start,
                              total_steps=pts.num_steps if begin else n)
    lam, alpha, sigma = pts.lambdas, pts.alpha, pts.sigma
    pred = schedule.prediction_type
    algorithm = "sde-dpmsolver++" if sde else "dpmsolver++"
    calls: List[Call] = []
    for c, o in enumerate(orders):
        j, t = start + c, start + c + 1
        h = float(lam[t] - lam[j])
        a_t, s_t = float(alpha[t]), float(sigma[t])
        slot_of = {i: i % k_slots for i in (j - 1, j - 2) if i >= begin} if k_slots else {}
        w: Dict[int, float] = {}
        c_z = 0.0
        if sde:
            # SDE-DPM-Solver++: exact linear part, x0 expanded in lambda, exact Gaussian increment (see sde_phis)
            decay, a1, a2, nz = sde_phis(h)
            c_x = s_t / float(sigma[j]) * decay
            add(w, j, a_t * a1)
            c_z = s_t * nz
            b1 = a_t * a2                      # weight of h x0' (heun)
            mid = 0.5 * a_t * a1               # midpoint weight of D1
            b2 = 0.0
        else:
            # DPM-Solver++ exponential integrator (2211.01095, data-prediction ODE solution + Taylor terms, see
            # data_phis): x_t = (sigma_t/sigma_s) x - alpha_t phi1 m + alpha_t phi2 (h m') - alpha_t phi3 (h^2 m'')
            p1, p2, p3 = data_phis(h)
            c_x = s_t / float(sigma[j])
            add(w, j, -a_t * p1)
            b1 = a_t * p2
            b2 = -a_t * p3
            mid = -0.5 * a_t * p1
        if h == 0.0:
            # a zero-length step: karras/exponential sigmas with final_sigma='sigma_min' end on sigma_min twice.
            # The exact step is the identity; diffusers' heun and third-order formulas give NaN there (0/0).
            w, c_x, c_z = {}, 1.0, 0.0
        elif o == 2:
            # DPM-Solver++(2M) (2211.01095 Alg. 2): D1 = (m_j - m_{j-1})/r0 ~ h m'
            r0 = float(lam[j] - lam[j - 1]) / h
            wd1 = mid if solver_type == "midpoint" else b1
            add(w, j, wd1 / r0)
            add(w, j - 1, -wd1 / r0)
        elif o == 3:
            # 3M: D1_0 = (m_j - m_{j-1})/r0, D1_1 = (m_{j-1} - m_{j-2})/r1 (r1 = (lambda_{j-1}-lambda_{j-2})/h);
            # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1) ~ h m'. The Newton divided difference (D1_0 - D1_1)/(r0+r1) is
            # ~ h^2 m''/2, but the phi3 weight multiplies h^2 m'': diffusers / dpm-solver / k-diffusion use it
            # as is (local error O(h^3): second order); the exact variant doubles it (third order; = UniP-3).
            r0 = float(lam[j] - lam[j - 1]) / h
            r1 = float(lam[j - 1] - lam[j - 2]) / h
            fac = 2.0 if exact_d2 else 1.0
            d1_0 = {j: 1.0 / r0, j - 1: -1.0 / r0}
            d1_1 = {j - 1: 1.0 / r1, j - 2: -1.0 / r1}
            for i in (j, j - 1, j - 2):
                a0, a1_ = d1_0.get(i, 0.0), d1_1.get(i, 0.0)
                d1 = a0 + r0 / (r0 + r1) * (a0 - a1_)
                d2 = fac * (a0 - a1_) / (r0 + r1)
                add(w, i, b1 * d1 + b2 * d2)
        write = j % k_slots if (k_slots and c < n - 1) else -1   # the last prediction is never read
        calls.append(make_call(pts, j, algorithm, pred, w, slot_of, k_slots, c_x=c_x, c_z=c_z, noise=sde,
                               write_slot=write))
    info = {"order": info_order, "orders": orders, "timesteps": [cl.timestep for cl in calls],
            "sigmas": pts.varsigma[start:].tolist(), "warm_start": [(i % k_slots, i) for i in range(start)],
            "lower_order_final": lower_order_final, "solver_type": solver_type, "algorithm_type": algorithm,
            "start": start_info(pts.timesteps[start], alpha[start], sigma[start])}
    info.update(extra_info)
    return SamplerPlan(name, calls, history_slots=k_slots, info=info)


_COMMON_DOC = """
    Options (diffusers ``DPMSolverMultistepScheduler`` semantics): ``solver_type`` midpoint | heun (the
    second-order formula), ``lower_order_final`` (default True: lower orders on the last two steps when N < 15),
    ``euler_at_final``, ``spacing`` linspace | leading | trailing, ``steps_offset``, ``sigma_schedule``
    default | karras | exponential, ``final_sigma`` zero | sigma_min (a step to sigma = 0 is always first
    order), ``sigmas`` (explicit descending VE sigmas [N+1]; ``num_steps`` is then ignored),
    ``round_timesteps``, ``warm_start``: when True the first order-1 entries of the grid are points before the
    start whose data predictions the caller puts in the ring buffer (``run_plan(initial_history=...)``, slots in
    ``plan.info["warm_start"]`` as (slot, grid index)); sampling starts at grid point order-1 at full order.
    ``begin``: start at point ``begin`` (fresh warm-up from there; the N < 15 rule of ``lower_order_final`` still
    counts all N steps, as diffusers; see :mod:`velodiff.sampling.begin`).
    plan.info: order, orders (per call), timesteps, sigmas (from the first sampled point), warm_start, start.
"""


def _builder(name: str, order: int, *, sde: bool = False, exact_d2: bool = False, info_order: int,
             doc: str, extra_info: Dict = None):
    def builder(schedule: sch.NoiseSchedule, num_steps=None, *, solver_type: str = "midpoint",
                lower_order_final: bool = True, euler_at_final: bool = False, spacing: str = "linspace",
                steps_offset: int = 0, sigma_schedule: str = "default", final_sigma: str = "zero", sigmas=None,
                round_timesteps: bool = True, warm_start: bool = False, begin: int = 0) -> SamplerPlan:
        return _multistep(name, order, schedule, num_steps, sde=sde, exact_d2=exact_d2, solver_type=solver_type,
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, spacing=spacing,
                          steps_offset=steps_offset, sigma_schedule=sigma_schedule, final_sigma=final_sigma,
                          sigmas=sigmas, round_timesteps=round_timesteps, warm_start=warm_start,
                          info_order=info_order, extra_info=dict(extra_info or {}), begin=begin)
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc + _COMMON_DOC
    return register(name)(builder)


dpmpp_2m = _builder(
    "dpmpp_2m", 2, info_order=2,
    doc="""DPM-Solver++(2M): second-order multistep on data predictions (diffusers DPMSolverMultistepScheduler,
    algorithm_type='dpmsolver++', solver_order=2).""")

dpmpp_3m = _builder(
    "dpmpp_3m", 3, info_order=2, extra_info={"nominal_order": 3},
    doc="""DPM-Solver++ 3M exactly as diffusers (solver_order=3) / LuChengTHU dpm-solver / k-diffusion implement
    it. Its second-derivative term uses the Newton divided difference (~ h^2 x0''/2) where the phi3 weight
    expects h^2 x0'', so the method is only second-order accurate: plan.info["order"] is 2 (nominal 3). See
    ``dpmpp_3m_exact`` for the third-order variant.""")

dpmpp_3m_exact = _builder(
    "dpmpp_3m_exact", 3, exact_d2=True, info_order=3,
    doc="""Corrected third-order DPM-Solver++ multistep: as ``dpmpp_3m`` but with D2 = 2 (D1_0 - D1_1)/(r0 + r1)
    (~ h^2 x0''), which makes it third order (and equal to UniP-3 on data predictions). Warm-up and final steps
    as diffusers' 3M.""")

dpmpp_2m_sde = _builder(
    "dpmpp_2m_sde", 2, sde=True, info_order=1, extra_info={"stochastic": True, "deterministic_order": 2},
    doc="""SDE-DPM-Solver++(2M) (diffusers algorithm_type='sde-dpmsolver++', solver_order=2). Every call draws
    fresh N(0, I) noise like diffusers (also on the last step, where its weight may be 0), so the same
    generator seed gives the same samples. plan.info["order"] is the strong order 1 (one Gaussian per step).""")
