"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): the UniP-p predictor and the UniC-p corrector, B(h) variants bh1/bh2, data prediction, laid out
step for step like diffusers' ``UniPCMultistepScheduler``.

Fused form. diffusers' ``step`` at point i (model evaluated at the *uncorrected* predictor x_i^P):

1. m_i = x0-prediction from the model output at x_i^P;
2. corrector (i > 0): x_i^C = UniC(last_sample = x_{i-1}^C, m_{i-1}, m_{i-2}, ..., m_i);
3. predictor: x_{i+1}^P = UniP(x_i^C, m_i, m_{i-1}, ...).

Both maps are linear in (anchor = x_{i-1}^C, history, D = m_i), so one update call does both: ``y`` = x_i^C
(kept as the anchor for the next call's corrector, i.e. diffusers' ``last_sample``) and ``x_next`` =
x_{i+1}^P, with D written to the ring buffer. No corrector is applied after the last predictor (there is no
further model evaluation), so the returned sample is x_N^P, as in diffusers.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import numpy as np

from velodiff.sampling import schedules as sch
from velodiff.sampling.begin import points_start, tail
from velodiff.sampling.plan import Call, SamplerPlan
from velodiff.sampling.samplers import register

SOLVER_TYPES = ("bh1", "bh2")
MAX_ORDER = 3
_ZERO_STEP = 1e-10  # |h| below this is a zero-length step (karras/exponential sigmas ending at sigma_min)


def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j+k)!  (phi_1(z) = expm1(z)/z), in float64 without cancellation."""
    if abs(z) < 1.0:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(60):
            total += term
            term *= z / (j + k + 1)
            if abs(term) < 1e-18 * abs(total):
                break
        return total + term
    value = math.expm1(z) / z
    for m in range(1, k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


def _b_times_bh(h: float, order: int) -> np.ndarray:
    """B(h) * b_i for i = 1..order, where b is the right-hand side of the UniPC order conditions.

    The order conditions of Theorem 3.1 (data prediction, hh = -h) have B(h) b_i = i! * hh * phi_{i+1}(hh),
    the same numbers diffusers builds with its ``h_phi_k`` recursion, but free of cancellation for small h.
    """
    hh = -h
    return np.array([math.factorial(i) * hh * _phi(i + 1, hh) for i in range(1, order + 1)], dtype=np.float64)


def _bh(h: float, solver_type: str) -> float:
    """B(h): bh1 = hh, bh2 = expm1(hh) with hh = -h."""
    return -h if solver_type == "bh1" else math.expm1(-h)


def _predictor_weights(h: float, rks: Sequence[float], order: int, solver_type: str) -> np.ndarray:
    """B(h) * rho_p for UniP-order (order - 1 entries, one per older prediction).

    rho_p solves R[:-1, :-1] rho = b[:-1] with R[i, k] = r_k^i (Corollary 3.2); diffusers hard-codes rho = 1/2 for
    order 2 (where bh1 and bh2 differ); B(h) cancels whenever rho is solved for.
    """
    if order == 1:
        return np.zeros(0)
    if order == 2:
        return np.array([0.5 * _bh(h, solver_type)])
    r = np.asarray(rks[:order - 1], dtype=np.float64)
    mat = np.stack([r ** i for i in range(order - 1)])
    return np.linalg.solve(mat, _b_times_bh(h, order)[:order - 1])


def _corrector_weights(h: float, rks: Sequence[float], order: int, solver_type: str) -> np.ndarray:
    """B(h) * rho_c for UniC-order (order entries: the older predictions, then the new one, r = 1).

    rho_c solves R rho = b with R[i, k] = r_k^i, r_order = 1 (Theorem 3.1, the new point included); diffusers
    hard-codes rho = 1/2 for order 1 (where bh1 and bh2 differ).
    """
    if order == 1:
        return np.array([0.5 * _bh(h, solver_type)])
    r = np.append(np.asarray(rks[:order - 1], dtype=np.float64), 1.0)
    mat = np.stack([r ** i for i in range(order)])
    return np.linalg.solve(mat, _b_times_bh(h, order))


def _check_indices(name: str, values: Iterable) -> set:
    try:
        out = set()
        for v in values:
            if isinstance(v, bool) or int(v) != v:
                raise TypeError
            out.add(int(v))
        return out
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integer step indices, got {values!r}") from None


@register("unipc")
def unipc(schedule: sch.NoiseSchedule, num_steps: Optional[int] = None, *, solver_order: int = 2,
          solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
          use_corrector: bool = True, spacing: str = "linspace", steps_offset: int = 0,
          sigma_schedule: str = "default", final_sigma: str = "zero", sigmas=None,
          warm_start: bool = False, begin: int = 0) -> SamplerPlan:
    """UniPC-p (UniP-p predictor + UniC-p corrector), data prediction, as diffusers' UniPCMultistepScheduler.

    Args:
        solver_order: p in 1..3 (diffusers ``solver_order``); the order ramps up 1, 2, .. over the first steps.
        solver_type: ``bh1`` (B(h) = h) or ``bh2`` (B(h) = e^h - 1); they differ only where rho is fixed to 1/2
            (UniP-2 and UniC-1).
        lower_order_final: cap the order at the number of remaining steps (diffusers applies it for any N).
        disable_corrector: predictor steps whose result is not corrected (diffusers semantics: step i skips UniC
            when i - 1 is listed). ``use_corrector=False`` disables UniC everywhere (plain UniP-p).
        spacing, steps_offset, sigma_schedule, final_sigma: the discretisation (see
            :func:`velodiff.sampling.schedules.discretize`; ``final_sigma`` is diffusers' ``final_sigmas_type``,
            ``sigma_schedule='karras'`` its ``use_karras_sigmas``).
        sigmas: explicit descending VE sigmas [N+1] including the end point; ``num_steps`` is then ignored.
        warm_start: the first ``solver_order - 1`` points of the discretisation lie *before* the start: their data
            predictions must be put in the ring buffer by the caller (``run_plan(initial_history=...)``), slots in
            ``plan.info['warm_start']`` as (slot, point index); sampling starts at point ``solver_order - 1`` with
            full order.
        begin: start at point ``begin`` of the N-step discretisation (fresh warm-up, no corrector on the first
            call; ``disable_corrector`` keeps counting steps of the whole schedule, as diffusers' step index does).

    A step that ends at sigma = 0 is taken with order 1 (x_N = m_{N-1}): the higher-order UniP limit does not
    exist there (diffusers returns inf/NaN or fails to solve for ``lower_order_final=False``, and NaN for bh1
    even at order 1). A zero-length final step (karras/exponential sigmas with ``final_sigma='sigma_min'``
    repeat sigma_min) is the identity, so the last model evaluation only feeds the corrector.
    ``plan.info['order']`` is p + 1 when UniC runs at every step that has one, else p (warm-up steps and a
    final step to sigma = 0 lower the order observed in practice).
    """
    if isinstance(solver_order, bool) or solver_order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"solver_order must be an integer in 1..{MAX_ORDER}, got {solver_order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if schedule.prediction_type == "flow":
        raise ValueError("prediction_type 'flow' is not supported by unipc (VP discretisations only)")
    disabled = _check_indices("disable_corrector", disable_corrector)
    if sigmas is None:
        num_steps = sch.check_num_steps(num_steps)
    pts = sch.discretize(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                         sigma_schedule=sigma_schedule, final_sigma=final_sigma, sigmas=sigmas)
    if warm_start and begin:
        raise ValueError("begin and warm_start cannot be combined")
    pts = tail(pts, begin)
    alpha, sigma, lam = pts.alpha, pts.sigma, pts.lambdas
    k_slots = solver_order
    warm = solver_order - 1 if warm_start else 0
    n_calls = len(alpha) - 1 - warm
    if n_calls < 1:
        raise ValueError(f"warm_start with solver_order={solver_order} needs at least {warm + 2} points in "
                         f"sigmas, got {len(alpha)}")
    for j in range(len(alpha) - 1):  # every step but the last must have positive length; the last may be empty
        if not lam[j + 1] - lam[j] > (-_ZERO_STEP if j == len(alpha) - 2 else _ZERO_STEP):
            raise ValueError(f"the discretisation must strictly decrease in sigma (points {j} and {j + 1})")

    # Predictor order per call (diffusers step(): lower_order_final, then the warm-up ramp).
    orders: List[int] = []
    for i in range(n_calls):
        j = warm + i
        p = min(solver_order, n_calls - i) if lower_order_final else solver_order
        p = min(p, min(j, solver_order) + 1)
        if sigma[j + 1] == 0.0:
            p = 1
        orders.append(p)
    corrected = [use_corrector and i >= 1 and (begin + i - 1) not in disabled for i in range(n_calls)]

    # Linear combinations over the basis [x, anchor, D, H_0 .. H_{K-1}].
    nb = 3 + k_slots
    X, A, DN = 0, 1, 2

    def unit(idx: int) -> np.ndarray:
        v = np.zeros(nb)
        v[idx] = 1.0
        return v

    def hist(point: int) -> np.ndarray:
        return unit(3 + point % k_slots)

    calls: List[Call] = []
    for i in range(n_calls):
        j = warm + i
        d_new = unit(DN)
        # --- UniC-p_c: x_j^C from x_{j-1}^C (the anchor), m_{j-1}, older m's and the new D = m_j.
        if corrected[i]:
            pc, s = orders[i - 1], j - 1
            h = lam[j] - lam[s]
            rks = [(lam[s - k] - lam[s]) / h for k in range(1, pc)]
            w = _corrector_weights(h, rks, pc, solver_type)
            m0 = hist(s)
            # UniC-p: x_t^C = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m0
            #                 - alpha_t B(h) (sum_k rho_k (m_k - m0)/r_k + rho_p (m_t - m0))
            xc = sigma[j] / sigma[s] * unit(A) - alpha[j] * math.expm1(-h) * m0
            for k in range(1, pc):
                xc = xc - alpha[j] * w[k - 1] / rks[k - 1] * (hist(s - k) - m0)
            xc = xc - alpha[j] * w[-1] * (d_new - m0)
        else:
            xc = unit(X)
        # --- UniP-p: x_{j+1}^P from x_j^C, D = m_j and older m's.
        p = orders[i]
        if sigma[j + 1] == 0.0:
            xn = alpha[j + 1] * d_new  # lim h->inf of the order-1 step: sigma_t/sigma_s -> 0, expm1(-h) -> -1
        elif abs(lam[j + 1] - lam[j]) <= _ZERO_STEP:
            xn = xc  # zero-length step: the identity (diffusers' formulas give x_t = x for p <= 2)
        else:
            h = lam[j + 1] - lam[j]
            rks = [(lam[j - k] - lam[j]) / h for k in range(1, p)]
            w = _predictor_weights(h, rks, p, solver_type)
            # UniP-p: x_t^P = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_k rho_k (m_k - m0)/r_k
            xn = sigma[j + 1] / sigma[j] * xc - alpha[j + 1] * math.expm1(-h) * d_new
            for k in range(1, p):
                xn = xn - alpha[j + 1] * w[k - 1] / rks[k - 1] * (hist(j - k) - d_new)
        # The next call's corrector needs x_j^C as its anchor: this call's y, or x itself when uncorrected.
        want_y, anchor = False, "keep"
        if i + 1 < n_calls and corrected[i + 1]:
            want_y, anchor = (True, "y") if corrected[i] else (False, "x")
        p_x, p_m = sch.data_prediction_coefficients(schedule.prediction_type, float(alpha[j]), float(sigma[j]))
        calls.append(Call(
            timestep=float(pts.timesteps[j]), p_x=p_x, p_m=p_m,
            c_x=float(xn[X]), c_a=float(xn[A]), c_d=float(xn[DN]), c_h=xn[3:].tolist(),
            e_x=float(xc[X]) if want_y else 0.0, e_a=float(xc[A]) if want_y else 0.0,
            e_d=float(xc[DN]) if want_y else 0.0, e_h=xc[3:].tolist() if want_y else (),
            write_slot=j % k_slots, want_y=want_y, anchor=anchor))

    full_corrector = use_corrector and all(corrected[1:])
    info = {
        "order": solver_order + 1 if full_corrector and n_calls > 1 else solver_order,
        "timesteps": [float(t) for t in pts.timesteps[warm:warm + n_calls]],
        "sigmas": pts.varsigma.tolist(),
        "orders": orders,
        "corrector": corrected,
        "warm_start": [(j % k_slots, j) for j in range(warm)],
        "solver_type": solver_type,
        "start": points_start(pts),
    }
    return SamplerPlan("unipc", calls, history_slots=k_slots, info=info)
