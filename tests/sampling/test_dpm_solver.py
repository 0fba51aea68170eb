"""Singlestep DPM-Solver-1/2/3 plans against diffusers' DPMSolverSinglestepScheduler, step by step (each diffusers
step is one grid stage = one plan call), plus the group structure and the order list."""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler
from diffusers.utils import logging as diffusers_logging

from velodiff.sampling import NoiseSchedule, SAMPLERS, build_plan
from velodiff.sampling import schedules as sch
from velodiff.sampling.samplers.dpm_solver import phi
from parity import diffusers_trajectory, dummy_model, relative_error, velodiff_trajectory

diffusers_logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates algorithm_type='dpmsolver'

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def time_free_model(x, t):
    # diffusers truncates its non-rounded exponential-sigma timesteps to int64 (from float32 log-sigmas), velodiff
    # keeps them fractional (round_timesteps=False); the solver only depends on the sigmas, so ignore t there.
    return dummy_model(x, 500.0)


def custom(spacing, n, offset=0):
    # diffusers' singlestep scheduler only has linspace spacing: other spacings are given as custom timesteps
    return dict(timesteps=sch.multistep_timesteps(n, 1000, spacing, offset).tolist())


# name -> (velodiff options, diffusers config, set_timesteps kwargs or None, num_steps, model)
CASES = {
    "linspace-10": ({}, {}, None, 10, dummy_model),
    "linspace-7-odd": ({}, {}, None, 7, dummy_model),
    "linspace-13-lof": (dict(lower_order_final=True), dict(lower_order_final=True), None, 13, dummy_model),
    "sigmamin-12-nolof": (dict(final_sigma="sigma_min"), dict(final_sigmas_type="sigma_min"), None, 12,
                          dummy_model),
    "sigmamin-11-odd": (dict(final_sigma="sigma_min"), dict(final_sigmas_type="sigma_min"), None, 11, dummy_model),
    "heun-9": (dict(solver_type="heun"), dict(solver_type="heun"), None, 9, dummy_model),
    "heun-sigmamin-12-nolof": (dict(solver_type="heun", final_sigma="sigma_min"),
                               dict(solver_type="heun", final_sigmas_type="sigma_min"), None, 12, dummy_model),
    "karras-9": (dict(sigma_schedule="karras"), dict(use_karras_sigmas=True), None, 9, dummy_model),
    "karras-sigmamin-12": (dict(sigma_schedule="karras", final_sigma="sigma_min"),
                           dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), None, 12, dummy_model),
    "exponential-10": (dict(sigma_schedule="exponential", round_timesteps=False), dict(use_exponential_sigmas=True),
                       None, 10, time_free_model),
    "leading-11": (dict(spacing="leading", steps_offset=1), {}, custom("leading", 11, 1), 11, dummy_model),
    "trailing-8": (dict(spacing="trailing"), {}, custom("trailing", 8), 8, dummy_model),
    "dpmsolver-sigmamin-9": (dict(algorithm_type="dpmsolver", final_sigma="sigma_min"),
                             dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), None, 9, dummy_model),
    "dpmsolver-heun-sigmamin-12": (dict(algorithm_type="dpmsolver", solver_type="heun", final_sigma="sigma_min"),
                                   dict(algorithm_type="dpmsolver", solver_type="heun",
                                        final_sigmas_type="sigma_min"), None, 12, dummy_model),
    "dpmsolver-karras-sigmamin-15": (dict(algorithm_type="dpmsolver", sigma_schedule="karras",
                                          final_sigma="sigma_min"),
                                     dict(algorithm_type="dpmsolver", use_karras_sigmas=True,
                                          final_sigmas_type="sigma_min"), None, 15, dummy_model),
    "one-step": ({}, {}, None, 1, dummy_model),
    "two-steps": ({}, {}, None, 2, dummy_model),
}


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("order,case", [(k, c) for k in (1, 2, 3) for c in CASES
                                        if not (k == 1 and "heun" in c)])  # heun changes no first-order step
def test_singlestep_matches_diffusers(order, case, prediction_type):
    opts, cfg, ts_kwargs, n, model = CASES[case]
    ref = DPMSolverSinglestepScheduler(**SD, **cfg, solver_order=order, prediction_type=prediction_type)
    schedule = NoiseSchedule(ref.alphas_cumprod.double().numpy(), prediction_type)  # diffusers' float32 values
    plan = build_plan(f"dpm_solver_{order}", schedule, n, **opts)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    if ts_kwargs is None:
        ref_ts, ref_xs = diffusers_trajectory(ref, n, x0.clone(), model=model)
    else:
        ref_ts, ref_xs = diffusers_trajectory(ref, None, x0.clone(), model=model, **ts_kwargs)
    assert plan.info["orders"] == list(ref.order_list)[:n]
    ts, xs = velodiff_trajectory(plan, x0.clone(), model=model)
    if model is time_free_model:
        assert np.allclose(ts, ref_ts, atol=1.0)
    else:
        assert ts == ref_ts
    assert len(xs) == len(ref_xs) == n
    for i, (a, b) in enumerate(zip(xs, ref_xs)):
        err = relative_error(a, b)
        assert err <= 1e-5, f"step {i} (order {plan.info['orders'][i]}): relative error {err}"


def test_default_sd_schedule_matches_diffusers():
    # velodiff's float64 schedule against diffusers' float32 alphas_cumprod: within the parity tolerance too
    ref = DPMSolverSinglestepScheduler(**SD, solver_order=3)
    plan = build_plan("dpm_solver_3", NoiseSchedule.sd(), 20)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, ref_xs = diffusers_trajectory(ref, 20, x0.clone())
    _, xs = velodiff_trajectory(plan, x0.clone())
    assert max(relative_error(a, b) for a, b in zip(xs, ref_xs)) <= 1e-5


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lof", [False, True])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_order_list_matches_diffusers(order, lof, final):
    for n in range(1, 22):
        ref = DPMSolverSinglestepScheduler(**SD, solver_order=order, lower_order_final=lof, final_sigmas_type=final)
        ref.set_timesteps(n)
        plan = build_plan(f"dpm_solver_{order}", NoiseSchedule.sd(), n, lower_order_final=lof, final_sigma=final)
        assert plan.info["orders"] == list(ref.order_list), n
        # diffusers switches lower_order_final on (persistently) for N % order != 0 and for a final sigma = 0
        assert plan.info["lower_order_final"] == ref.config.lower_order_final


def test_group_structure():
    plan = build_plan("dpm_solver_3", NoiseSchedule.sd(), 9, final_sigma="sigma_min")
    assert plan.info["orders"] == [1, 2, 3] * 3
    assert plan.history_slots == 2
    for stage, call in zip(plan.info["orders"], plan.calls):
        if stage == 1:
            assert call.anchor == "x" and call.c_a == 0 and call.c_x != 0 and call.write_slot == 0
        else:
            assert call.anchor == "keep" and call.c_x == 0 and call.c_a != 0
            assert call.write_slot == (1 if stage == 2 else -1)
    # the last stage-1 call of a run ending in a lone first-order step needs no anchor and no history write
    plan = build_plan("dpm_solver_2", NoiseSchedule.sd(), 7)
    assert plan.info["orders"] == [1, 2, 1, 2, 1, 2, 1]
    assert plan.calls[-1].anchor == "keep" and plan.calls[-1].write_slot == -1


def _group_error(name, algorithm, degree, h=0.6, r=(1 / 3, 2 / 3)):
    """One singlestep group on a prescribed prediction polynomial in lambda: error vs the exact solution."""
    order = int(name[-1])
    lam_s = -0.2
    fr = [0.0] + list(r)[: order - 1] + [1.0]
    lams = np.array([lam_s + f * h for f in fr])
    sig_ve = np.exp(-lams)
    pred_type = "sample" if algorithm == "dpmsolver++" else "epsilon"
    plan = build_plan(name, NoiseSchedule.sd(pred_type), None, sigmas=sig_ve, algorithm_type=algorithm,
                      solver_type="heun", final_sigma="sigma_min", lower_order_final=False)
    assert plan.info["orders"] == list(range(1, order + 1))
    coeffs = [0.3, -0.7, 0.45][: degree + 1]

    def pred(k):
        return sum(c * (lams[k] - lam_s) ** i for i, c in enumerate(coeffs))

    alpha = 1 / np.sqrt(sig_ve ** 2 + 1)
    sigma = sig_ve * alpha
    x_start = 1.7
    hist = [0.0, 0.0]
    x = x_start
    for k, call in enumerate(plan.calls):
        # the model output is the prescribed prediction itself (p_x = 0, p_m = 1 for these prediction types)
        assert call.p_x == 0 and call.p_m == 1
        d = pred(k)
        x_next = call.c_x * x + call.c_a * x_start + call.c_d * d + sum(c * v for c, v in zip(call.c_h, hist))
        if call.write_slot >= 0:
            hist[call.write_slot] = d
        x = x_next
    if algorithm == "dpmsolver++":
        exact = sigma[-1] / sigma[0] * x_start + alpha[-1] * sum(
            c * math.factorial(i) * h ** (i + 1) * phi(i + 1, -h) for i, c in enumerate(coeffs))
    else:
        exact = alpha[-1] / alpha[0] * x_start - sigma[-1] * sum(
            c * math.factorial(i) * h ** (i + 1) * phi(i + 1, h) for i, c in enumerate(coeffs))
    return abs(x - exact)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_heun_groups_are_exact_for_polynomials(algorithm):
    # a group of order k integrates predictions that are polynomials of degree k-1 in lambda exactly
    assert _group_error("dpm_solver_2", algorithm, 1) < 1e-13
    assert _group_error("dpm_solver_3", algorithm, 2) < 1e-13
    assert _group_error("dpm_solver_3", algorithm, 2, r=(0.25, 0.8)) < 1e-13
    assert _group_error("dpm_solver_2", algorithm, 2) > 1e-4


def test_info_and_docs():
    for k in (1, 2, 3):
        plan = SAMPLERS[f"dpm_solver_{k}"](NoiseSchedule.sd(), 6)
        assert plan.info["order"] == k and plan.info["warm_start"] == []
        assert SAMPLERS[f"dpm_solver_{k}"].__doc__


def test_warm_start_skips_points():
    sigmas = np.exp(-np.linspace(-2.5, 3.0, 11))
    plan = build_plan("dpm_solver_3", NoiseSchedule.sd(), None, sigmas=sigmas, warm_start=True,
                      final_sigma="sigma_min", lower_order_final=False)
    assert len(plan.calls) == 8 and plan.info["warm_start"] == []
    assert plan.info["sigmas"] == pytest.approx(sigmas[2:].tolist())
    assert plan.info["orders"][:3] == [1, 2, 3]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("option,value", [
    ("algorithm_type", "sde-dpmsolver"), ("solver_type", "bh1"), ("final_sigma", "min"),
    ("sigma_schedule", "beta"), ("spacing", "uniform"), ("lower_order_final", "no"), ("warm_start", 0),
    ("steps_offset", 1.5), ("round_timesteps", None),
])
def test_bad_options_raise(order, option, value):
    with pytest.raises(ValueError, match=option):
        build_plan(f"dpm_solver_{order}", NoiseSchedule.sd(), 10, **{option: value})


def test_noise_prediction_needs_sigma_min():
    with pytest.raises(ValueError, match="final_sigma"):
        build_plan("dpm_solver_2", NoiseSchedule.sd(), 10, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="final_sigma"):
        build_plan("dpm_solver_2", NoiseSchedule.sd(), None, algorithm_type="dpmsolver", sigmas=[3.0, 1.0, 0.0])
    with pytest.raises(ValueError):  # diffusers refuses the same configuration
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", final_sigmas_type="zero")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("dpm_solver_3", NoiseSchedule.sd(), -2)
    with pytest.raises(ValueError, match="flow"):
        build_plan("dpm_solver_3", NoiseSchedule.sd("flow"), 10)
