"""DPM-Solver++ multistep plans (dpmpp_2m, dpmpp_3m, dpmpp_3m_exact, dpmpp_2m_sde) against diffusers'
DPMSolverMultistepScheduler, step by step, plus the properties diffusers cannot check (the corrected 3M, warm start)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from velodiff.sampling import NoiseSchedule, SAMPLERS, build_plan, run_plan
from velodiff.sampling.samplers.dpm_solver import data_phis, phi
from velodiff.sampling.schedules import FlowSchedule
from parity import diffusers_trajectory, dummy_model, relative_error, velodiff_trajectory

diffusers_logging.set_verbosity_error()

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def time_free_model(x, t):
    # diffusers casts its non-rounded exponential-sigma timesteps to int64 (truncation, from float32 log-sigmas:
    # 998 where velodiff has 999.0), velodiff keeps them fractional (round_timesteps=False). The solver math only
    # depends on the sigmas, so those cases use a model that ignores t.
    return dummy_model(x, 500.0)


# (velodiff options, diffusers config, num_steps, model). Names in ids.
MULTISTEP_CASES = {
    "linspace-10": ({}, {}, 10, dummy_model),
    "linspace-7-odd": ({}, {}, 7, dummy_model),
    "leading-9": (dict(spacing="leading", steps_offset=1), dict(timestep_spacing="leading", steps_offset=1), 9,
                  dummy_model),
    "trailing-11": (dict(spacing="trailing"), dict(timestep_spacing="trailing"), 11, dummy_model),
    "karras-13": (dict(sigma_schedule="karras"), dict(use_karras_sigmas=True), 13, dummy_model),
    "karras-12-sigmamin": (dict(sigma_schedule="karras", final_sigma="sigma_min"),
                           dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 12, dummy_model),
    "karras-20-nolof": (dict(sigma_schedule="karras", lower_order_final=False),
                        dict(use_karras_sigmas=True, lower_order_final=False), 20, dummy_model),
    "exponential-9": (dict(sigma_schedule="exponential", round_timesteps=False), dict(use_exponential_sigmas=True),
                      9, time_free_model),
    "sigmamin-25": (dict(final_sigma="sigma_min"), dict(final_sigmas_type="sigma_min"), 25, dummy_model),
    "sigmamin-5": (dict(final_sigma="sigma_min"), dict(final_sigmas_type="sigma_min"), 5, dummy_model),
    "heun-8": (dict(solver_type="heun"), dict(solver_type="heun"), 8, dummy_model),
    "heun-sigmamin-nolof-15": (dict(solver_type="heun", final_sigma="sigma_min", lower_order_final=False),
                               dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False), 15,
                               dummy_model),
    "euler-at-final-sigmamin-17": (dict(euler_at_final=True, final_sigma="sigma_min"),
                                   dict(euler_at_final=True, final_sigmas_type="sigma_min"), 17, dummy_model),
    "one-step": ({}, {}, 1, dummy_model),
}


def check_parity(name, ref, plan, num_steps, model, seed=0):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref_ts, ref_xs = diffusers_trajectory(ref, num_steps, x0.clone(), model=model, seed=seed)
    ts, xs = velodiff_trajectory(plan, x0.clone(), model=model, seed=seed)
    if model is time_free_model:
        assert np.allclose(ts, ref_ts, atol=1.0)
    else:
        assert ts == ref_ts
    assert len(xs) == len(ref_xs) == num_steps
    for i, (a, b) in enumerate(zip(xs, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"{name} step {i}: relative error {err}"


def same_schedule(ref, prediction_type):
    # diffusers builds alphas_cumprod in float32; take exactly those values so only the solver arithmetic differs
    return NoiseSchedule(ref.alphas_cumprod.double().numpy(), prediction_type)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("case", list(MULTISTEP_CASES))
@pytest.mark.parametrize("name,solver_order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_multistep_matches_diffusers(name, solver_order, case, prediction_type):
    opts, cfg, n, model = MULTISTEP_CASES[case]
    ref = DPMSolverMultistepScheduler(**SD, **cfg, solver_order=solver_order, prediction_type=prediction_type,
                                      algorithm_type="dpmsolver++")
    plan = build_plan(name, same_schedule(ref, prediction_type), n, **opts)
    check_parity(name, ref, plan, n, model)


SDE_CASES = ["linspace-10", "linspace-7-odd", "trailing-11", "karras-12-sigmamin", "heun-8",
             "euler-at-final-sigmamin-17", "leading-9"]


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("case", SDE_CASES)
def test_dpmpp_2m_sde_matches_diffusers_same_seed(case, prediction_type):
    opts, cfg, n, model = MULTISTEP_CASES[case]
    ref = DPMSolverMultistepScheduler(**SD, **cfg, solver_order=2, prediction_type=prediction_type,
                                      algorithm_type="sde-dpmsolver++")
    plan = build_plan("dpmpp_2m_sde", same_schedule(ref, prediction_type), n, **opts)
    assert all(c.noise for c in plan.calls)  # one draw per step, as diffusers, so generators stay in step
    check_parity("dpmpp_2m_sde", ref, plan, n, model, seed=1234)


def test_dpmpp_2m_sde_seed_determines_samples():
    plan = build_plan("dpmpp_2m_sde", NoiseSchedule.sd(), 8)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, a = velodiff_trajectory(plan, x0.clone(), seed=3)
    _, b = velodiff_trajectory(plan, x0.clone(), seed=3)
    _, c = velodiff_trajectory(plan, x0.clone(), seed=4)
    assert torch.equal(a[-1], b[-1])
    assert relative_error(a[-1], c[-1]) > 1e-3


@pytest.mark.parametrize("name,cfg", [("dpmpp_2m", dict(solver_order=2)),
                                      ("dpmpp_2m", dict(solver_order=2, solver_type="heun")),
                                      ("dpmpp_3m", dict(solver_order=3))])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_zero_length_last_step_quirk(name, cfg, sigma_schedule):
    # diffusers quirk: karras/exponential sigmas already end at sigma_min, and final_sigmas_type='sigma_min' appends
    # it again, so the last step has h = 0. Its first-order and 2M-midpoint formulas give the identity, but the
    # heun and third-order ones divide 0 by 0 and return NaN once lower_order_final no longer applies (N >= 15).
    # velodiff takes the exact limit, the identity: all steps before the last match diffusers.
    n = 16
    opts = dict(solver_type=cfg.get("solver_type", "midpoint"))
    ref = DPMSolverMultistepScheduler(**SD, **cfg, final_sigmas_type="sigma_min",
                                      **{f"use_{sigma_schedule}_sigmas": True})
    plan = build_plan(name, same_schedule(ref, "epsilon"), n, sigma_schedule=sigma_schedule,
                      final_sigma="sigma_min", round_timesteps=sigma_schedule == "karras", **opts)
    assert plan.info["sigmas"][-1] == pytest.approx(plan.info["sigmas"][-2], rel=1e-12)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, ref_xs = diffusers_trajectory(ref, n, x0.clone(), model=time_free_model)
    _, xs = velodiff_trajectory(plan, x0.clone(), model=time_free_model)
    for i in range(n - 1):
        assert relative_error(xs[i], ref_xs[i]) <= 1e-5, f"step {i}"
    assert relative_error(xs[-1], xs[-2]) <= 1e-6
    nan_in_diffusers = name == "dpmpp_3m" or cfg.get("solver_type") == "heun"
    assert bool(torch.isnan(ref_xs[-1]).any()) == nan_in_diffusers
    if not nan_in_diffusers:
        assert relative_error(xs[-1], ref_xs[-1]) <= 1e-5


def test_default_sd_schedule_matches_diffusers():
    # velodiff's float64 schedule vs diffusers' float32 alphas_cumprod: still within the parity tolerance
    ref = DPMSolverMultistepScheduler(**SD, solver_order=2)
    check_parity("dpmpp_2m", ref, build_plan("dpmpp_2m", NoiseSchedule.sd(), 20), 20, dummy_model)


# ---------------------------------------------------------------------------------------------------------------
# the corrected 3M: polynomial exactness of one third-order step (what makes a method third order)
# ---------------------------------------------------------------------------------------------------------------

def _one_step_error(name, degree, h=0.4, r=(0.7, 1.3)):
    """Apply the 3rd-order step of ``name`` to data predictions that are a polynomial of ``degree`` in lambda and
    compare with the exact variation-of-constants solution (float64). Returns the absolute error."""
    lam_s = 0.3
    lams = [lam_s - r[0] * h - r[1] * h, lam_s - r[0] * h, lam_s, lam_s + h]
    sigmas = np.exp(-np.array(lams))
    plan = build_plan(name, NoiseSchedule.sd("sample"), None, sigmas=sigmas, warm_start=True,
                      lower_order_final=False, final_sigma="sigma_min")
    assert plan.info["orders"] == [3]
    call = plan.calls[0]
    coeffs = [0.3, -0.7, 0.45][: degree + 1]

    def x0(lam):
        return sum(c * (lam - lam_s) ** k for k, c in enumerate(coeffs))

    hist = np.zeros(2)
    for slot, idx in plan.info["warm_start"]:
        hist[slot] = x0(lams[idx])
    x = 1.7
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)
    sig = sigmas * alpha
    d = call.p_x * x + call.p_m * x0(lams[2])
    x_next = call.c_x * x + call.c_d * d + sum(c * hh for c, hh in zip(call.c_h, hist))
    # exact: x_t = (sigma_t/sigma_s) x + alpha_t int_0^h e^{tau-h} x0(lambda_s+tau) dtau, and for monomials
    # int_0^h e^{tau-h} tau^k dtau = k! h^{k+1} phi_{k+1}(-h)
    exact = sig[3] / sig[2] * x + alpha[3] * sum(
        c * math.factorial(k) * h ** (k + 1) * phi(k + 1, -h) for k, c in enumerate(coeffs))
    return abs(x_next - exact)


def test_dpmpp_3m_exact_integrates_quadratics_exactly():
    assert _one_step_error("dpmpp_3m_exact", 2) < 1e-13
    assert _one_step_error("dpmpp_3m_exact", 1) < 1e-13


def test_dpmpp_3m_as_diffusers_is_exact_for_lines_only():
    # the diffusers 3M halves the x0'' term: exact for linear x0, off by ~alpha phi3 h^2 x0''/2 for quadratics
    assert _one_step_error("dpmpp_3m", 1) < 1e-13
    h = 0.4
    expected = abs(-data_phis(h)[2] * h ** 2 * 0.45) / math.sqrt(math.exp(-2 * (0.3 + h)) + 1)
    assert _one_step_error("dpmpp_3m", 2) == pytest.approx(expected, rel=1e-9)


def test_dpmpp_3m_exact_differs_from_dpmpp_3m_only_in_third_order_steps():
    a = build_plan("dpmpp_3m", NoiseSchedule.sd(), 20, final_sigma="sigma_min")
    b = build_plan("dpmpp_3m_exact", NoiseSchedule.sd(), 20, final_sigma="sigma_min")
    assert a.info["orders"] == b.info["orders"]
    for o, ca, cb in zip(a.info["orders"], a.calls, b.calls):
        assert (ca == cb) == (o < 3)


def test_orders_info():
    assert SAMPLERS["dpmpp_2m"](NoiseSchedule.sd(), 5).info["order"] == 2
    p3 = SAMPLERS["dpmpp_3m"](NoiseSchedule.sd(), 5)
    assert p3.info["order"] == 2 and p3.info["nominal_order"] == 3
    assert SAMPLERS["dpmpp_3m_exact"](NoiseSchedule.sd(), 5).info["order"] == 3
    assert SAMPLERS["dpmpp_2m_sde"](NoiseSchedule.sd(), 5).info["order"] == 1
    for name in ("dpmpp_2m", "dpmpp_3m", "dpmpp_3m_exact", "dpmpp_2m_sde"):
        assert SAMPLERS[name].__doc__


@pytest.mark.parametrize("n,lof,final,expected", [
    (10, True, "zero", [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]),
    (10, False, "zero", [1, 2, 3, 3, 3, 3, 3, 3, 3, 1]),
    (10, False, "sigma_min", [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]),
    (15, True, "sigma_min", [1, 2] + [3] * 13),
    (2, True, "sigma_min", [1, 1]),
])
def test_3m_order_schedule(n, lof, final, expected):
    plan = build_plan("dpmpp_3m", NoiseSchedule.sd(), n, lower_order_final=lof, final_sigma=final)
    assert plan.info["orders"] == expected


# ---------------------------------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3), ("dpmpp_3m_exact", 3),
                                        ("dpmpp_2m_sde", 2)])
def test_warm_start_plan(name, order):
    sigmas = np.exp(-np.linspace(-2.5, 3.0, 13))
    full = build_plan(name, NoiseSchedule.sd(), None, sigmas=sigmas, lower_order_final=False)
    warm = build_plan(name, NoiseSchedule.sd(), None, sigmas=sigmas, lower_order_final=False, warm_start=True)
    assert warm.info["warm_start"] == [(i % (order - 1), i) for i in range(order - 1)]
    assert len(warm.calls) == len(full.calls) - (order - 1)
    assert warm.info["orders"] == [order] * len(warm.calls)
    assert warm.info["sigmas"] == pytest.approx(sigmas[order - 1:].tolist())
    # after the warm-up of the full plan the two are the same calls (same slots)
    assert warm.calls == full.calls[order - 1:]
    assert any(c != 0 for c in warm.calls[0].c_h)  # the first call reads the pre-filled slots


def test_warm_start_with_run_plan_initial_history():
    # a warm-started 2M plan over sigmas [s0, s1, ..] starts at s1 and its first call reads m(s0) from the slot
    # named in plan.info["warm_start"], filled through run_plan(initial_history=...)
    sigmas = np.exp(-np.linspace(-2.0, 2.0, 6))
    plan = build_plan("dpmpp_2m", NoiseSchedule.sd("sample"), None, sigmas=sigmas, warm_start=True,
                      lower_order_final=False)
    x = torch.ones(1, 8)
    m_prev = torch.full((1, 8), 0.25)
    hist = torch.zeros(plan.history_slots, 1, 8)
    (slot, idx), = plan.info["warm_start"]
    assert idx == 0
    hist[slot] = m_prev
    outs = []
    run_plan(plan, lambda xin, t: torch.full_like(xin, 0.5), x, initial_history=hist,
             callback=lambda i, c, xn: outs.append(xn.clone()))
    c0 = plan.calls[0]
    expected = c0.c_x * 1.0 + c0.c_d * 0.5 + c0.c_h[slot] * 0.25
    assert torch.allclose(outs[0], torch.full((1, 8), expected, dtype=torch.float32), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_3m_exact", "dpmpp_2m_sde"])
@pytest.mark.parametrize("option,value", [
    ("solver_type", "bh2"), ("final_sigma", "one"), ("sigma_schedule", "beta"), ("spacing", "uniform"),
    ("lower_order_final", "yes"), ("euler_at_final", 1), ("warm_start", None), ("steps_offset", -1),
])
def test_bad_options_raise(name, option, value):
    with pytest.raises(ValueError, match=option):
        build_plan(name, NoiseSchedule.sd(), 10, **{option: value})


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("dpmpp_2m", NoiseSchedule.sd(), 0)
    with pytest.raises(ValueError, match="flow"):
        build_plan("dpmpp_2m", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="schedule"):
        build_plan("dpmpp_2m", FlowSchedule(), 10)
    with pytest.raises(ValueError, match="sigmas"):
        build_plan("dpmpp_2m", NoiseSchedule.sd(), None, sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="warm_start"):
        build_plan("dpmpp_3m", NoiseSchedule.sd(), None, sigmas=[2.0, 1.0, 0.5], warm_start=True)


def test_phi_matches_closed_forms():
    for z in (-30.0, -3.0, -0.999, -0.3, -1e-4, 1e-6, 0.5, 2.0):
        assert phi(1, z) == pytest.approx(math.expm1(z) / z, rel=1e-14)
        # phi_2 = (e^z - 1 - z)/z^2, phi_3 = (e^z - 1 - z - z^2/2)/z^3 via an exact rational series
        from fractions import Fraction
        zf = Fraction(z)
        e = sum(zf ** n / math.factorial(n) for n in range(200))
        p2 = float((e - 1 - zf) / zf ** 2)
        p3 = float((e - 1 - zf - zf ** 2 / 2) / zf ** 3)
        assert phi(2, z) == pytest.approx(p2, rel=1e-13)
        assert phi(3, z) == pytest.approx(p3, rel=1e-13)
    p1, p2, p3 = data_phis(math.inf)
    assert p1 == -1.0 and math.isnan(p2) and math.isnan(p3)
