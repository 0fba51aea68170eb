import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from velodiff import ops
from velodiff.sampling import NoiseSchedule, build_plan, run_plan
from parity import dummy_model, relative_error

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def make_ref(**cfg):
    return UniPCMultistepScheduler(**SD, **cfg)


def ref_trajectory(scheduler, num_steps, x):
    """diffusers' loop (UniPC's step takes no generator, so parity.diffusers_trajectory does not apply).

    Returns (timesteps, x after each step, last_sample = x_i^C after each step, newest x0-prediction after each
    step); a step that raises ends the lists early.
    """
    scheduler.set_timesteps(num_steps)
    xs, corrected, preds = [], [], []
    for t in scheduler.timesteps:
        try:
            x = scheduler.step(dummy_model(x, float(t)), t, x).prev_sample
        except RuntimeError:  # torch.linalg.solve on a singular system (see test_diffusers_quirks)
            break
        xs.append(x.clone())
        corrected.append(scheduler.last_sample.clone())
        preds.append(scheduler.model_outputs[-1].clone())
    return [float(t) for t in scheduler.timesteps], xs, corrected, preds


def our_trajectory(plan, x):
    """run_plan with the fused op; returns (x after each call, y of each call or None)."""
    xs, ys = [], []

    def update(*args, **kwargs):
        x_next, y = ops.sampler_update(*args, **kwargs)
        ys.append(y.clone() if y.numel() else None)
        return x_next, y

    run_plan(plan, dummy_model, x, update_fn=update, callback=lambda i, call, xn: xs.append(xn.clone()))
    return xs, ys


def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_steps_match(ours, ref, steps):
    for i in steps:
        err = relative_error(ours[i], ref[i])
        assert err <= 1e-5, f"step {i}: relative error {err:.3e}"


def diffusers_last_step_defined(order, solver_type, lower_order_final, final_sigma):
    """False where diffusers' last step is not finite (see test_diffusers_quirks)."""
    if final_sigma != "zero":
        return True
    return solver_type == "bh2" and (lower_order_final or order == 1)


CASES = [  # (spacing, num_steps, final_sigma, lower_order_final)
    ("linspace", 7, "zero", True),
    ("linspace", 20, "sigma_min", False),
    ("trailing", 10, "sigma_min", True),
    ("leading", 25, "zero", False),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing,num_steps,final_sigma,lower_order_final", CASES)
def test_unipc_matches_diffusers(order, solver_type, prediction_type, spacing, num_steps, final_sigma,
                                 lower_order_final):
    ref = make_ref(solver_order=order, solver_type=solver_type, prediction_type=prediction_type,
                   timestep_spacing=spacing, final_sigmas_type=final_sigma, lower_order_final=lower_order_final)
    plan = build_plan("unipc", NoiseSchedule.sd(prediction_type), num_steps, solver_order=order,
                      solver_type=solver_type, spacing=spacing, final_sigma=final_sigma,
                      lower_order_final=lower_order_final)
    ts, ref_xs, ref_corrected, _ = ref_trajectory(ref, num_steps, noise())
    assert plan.timesteps == ts
    # diffusers builds its table in float32 (cumprod of the betas, and 1 - abar_0 for sigma_min cancels):
    # up to ~1.3e-5 apart from the float64 one
    np.testing.assert_allclose(plan.info["sigmas"], ref.sigmas.double().numpy(), rtol=1e-4, atol=0)
    ours, ys = our_trajectory(plan, noise())
    last_ok = diffusers_last_step_defined(order, solver_type, lower_order_final, final_sigma)
    assert len(ref_xs) >= num_steps - 1
    assert_steps_match(ours, ref_xs, range(num_steps if last_ok else num_steps - 1))
    # the second output y is the corrected x_i^C, i.e. diffusers' last_sample after step i
    for i, y in enumerate(ys):
        if y is not None:
            assert relative_error(y, ref_corrected[i]) <= 1e-5, f"y of call {i}"
    assert all(torch.isfinite(x).all() for x in ours)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("final_sigma,num_steps", [("zero", 8), ("sigma_min", 15)])
def test_unipc_karras_matches_diffusers(order, solver_type, final_sigma, num_steps):
    ref = make_ref(solver_order=order, solver_type=solver_type, use_karras_sigmas=True,
                   final_sigmas_type=final_sigma)
    plan = build_plan("unipc", NoiseSchedule.sd(), num_steps, solver_order=order, solver_type=solver_type,
                      sigma_schedule="karras", final_sigma=final_sigma)
    ts, ref_xs, _, _ = ref_trajectory(ref, num_steps, noise())
    assert plan.timesteps == ts
    ours, _ = our_trajectory(plan, noise())
    last_ok = diffusers_last_step_defined(order, solver_type, True, final_sigma)
    assert_steps_match(ours, ref_xs, range(num_steps if last_ok else num_steps - 1))


@pytest.mark.parametrize("order,disable", [(2, [0]), (2, [1, 3, 4]), (3, [0, 2]), (1, [2])])
def test_unipc_disable_corrector(order, disable):
    n = 10
    ref = make_ref(solver_order=order, disable_corrector=disable)
    plan = build_plan("unipc", NoiseSchedule.sd(), n, solver_order=order, disable_corrector=disable)
    assert plan.info["corrector"] == [i >= 1 and i - 1 not in disable for i in range(n)]
    _, ref_xs, _, _ = ref_trajectory(ref, n, noise())
    ours, _ = our_trajectory(plan, noise())
    assert_steps_match(ours, ref_xs, range(n))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_predictor_only(order):
    n = 12
    ref = make_ref(solver_order=order, disable_corrector=list(range(n)), final_sigmas_type="sigma_min")
    plan = build_plan("unipc", NoiseSchedule.sd(), n, solver_order=order, use_corrector=False,
                      final_sigma="sigma_min")
    assert plan.info["order"] == order and not any(plan.info["corrector"])
    assert all(not c.want_y and c.anchor == "keep" for c in plan.calls)
    _, ref_xs, _, _ = ref_trajectory(ref, n, noise())
    ours, _ = our_trajectory(plan, noise())
    assert_steps_match(ours, ref_xs, range(n))


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_order3_long_last_step(solver_type, prediction_type):
    # Order 3, lower_order_final=False, 7 steps ending at sigma_min: the last step is ~5x longer in lambda than
    # the previous ones and its extrapolation weights reach +-20, so the result is sensitive to the sigma table
    # itself: diffusers' sigmas are float32 (from float32 alphas_cumprod), velodiff's float64, and that alone
    # moves the last sample by ~1.4e-5 (sample prediction; measured against a float64 run of diffusers).
    # Given the same table (and timesteps) both agree to ~2e-6 at every step.
    n = 7
    ref = make_ref(solver_order=3, solver_type=solver_type, prediction_type=prediction_type,
                   lower_order_final=False, final_sigmas_type="sigma_min")
    ts, ref_xs, _, _ = ref_trajectory(ref, n, noise())
    plan = build_plan("unipc", NoiseSchedule.sd(prediction_type), None, sigmas=ref.sigmas.double().numpy(),
                      solver_order=3, solver_type=solver_type, lower_order_final=False)
    assert plan.info["orders"] == [1, 2, 3, 3, 3, 3, 3]
    for call, t in zip(plan.calls, ts):
        call.timestep = t
    ours, _ = our_trajectory(plan, noise())
    assert_steps_match(ours, ref_xs, range(n))
    # with velodiff's own float64 discretisation every step but that last one matches too
    own = build_plan("unipc", NoiseSchedule.sd(prediction_type), n, solver_order=3, solver_type=solver_type,
                     lower_order_final=False, final_sigma="sigma_min")
    ours, _ = our_trajectory(own, noise())
    assert_steps_match(ours, ref_xs, range(n - 1))


def test_diffusers_quirks():
    """Where diffusers' last step is not finite, velodiff takes the well-defined limit."""
    n = 8
    # (a) bh1 ending at sigma = 0: B(h) = -h = -inf and the order-1 predictor computes -inf * 0 = NaN.
    # velodiff's last step is the order-1 limit x_N = m_{N-1}, the data prediction of the last model call.
    ref = make_ref(solver_order=2, solver_type="bh1")
    _, ref_xs, _, preds = ref_trajectory(ref, n, noise())
    assert torch.isnan(ref_xs[-1]).all()
    plan = build_plan("unipc", NoiseSchedule.sd(), n, solver_order=2, solver_type="bh1")
    ours, _ = our_trajectory(plan, noise())
    assert relative_error(ours[-1], preds[-1]) <= 1e-5
    # (b) lower_order_final=False ending at sigma = 0: UniP-p (p >= 2) has no limit there (inf for p = 2, a
    # singular solve for p = 3); velodiff takes that step with order 1.
    for order in (2, 3):
        ref = make_ref(solver_order=order, lower_order_final=False)
        _, ref_xs, _, preds = ref_trajectory(ref, n, noise())
        assert len(ref_xs) == n - 1 or not torch.isfinite(ref_xs[-1]).all()
        plan = build_plan("unipc", NoiseSchedule.sd(), n, solver_order=order, lower_order_final=False)
        assert plan.info["orders"][-1] == 1 and plan.info["orders"][-2] == order
        ours, _ = our_trajectory(plan, noise())
        assert_steps_match(ours, ref_xs, range(n - 1))
        assert torch.isfinite(ours[-1]).all()
    # (c) karras + sigma_min repeats sigma_min: the last step has h = 0 and diffusers' order-3 weights are 0/0.
    # velodiff's zero-length step is the identity, so the output is the corrected x_{N-1}^C (last_sample).
    ref = make_ref(solver_order=3, lower_order_final=False, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    _, ref_xs, ref_corrected, _ = ref_trajectory(ref, n, noise())
    assert torch.isnan(ref_xs[-1]).all()
    plan = build_plan("unipc", NoiseSchedule.sd(), n, solver_order=3, lower_order_final=False,
                      sigma_schedule="karras", final_sigma="sigma_min")
    ours, _ = our_trajectory(plan, noise())
    assert_steps_match(ours, ref_xs, range(n - 1))
    assert relative_error(ours[-1], ref_corrected[-1]) <= 1e-5


def test_fused_layout():
    plan = build_plan("unipc", NoiseSchedule.sd(), 6, solver_order=3)
    assert plan.history_slots == 3
    assert [c.write_slot for c in plan.calls] == [0, 1, 2, 0, 1, 2]
    assert plan.info["orders"] == [1, 2, 3, 3, 2, 1]
    assert plan.info["order"] == 4
    # call 0 is not corrected: the next corrector's anchor is its input x; later calls hand over y = x^C
    assert plan.calls[0].anchor == "x" and not plan.calls[0].want_y
    assert all(c.anchor == "y" and c.want_y for c in plan.calls[1:-1])
    assert plan.calls[-1].anchor == "keep" and not plan.calls[-1].want_y
    # the corrected calls do not use the uncorrected x at all
    assert all(c.c_x == 0.0 and c.e_x == 0.0 for c in plan.calls[1:-1])


# --- analytic convergence check (float64), with the warm start ---

def run_plan_f64(plan, model, x, initial_history=None):
    """The plan's calls executed in float64 straight from the Call fields (semantics of plan.py, no noise)."""
    x = x.to(torch.float64)
    hist = torch.zeros((plan.history_slots,) + tuple(x.shape), dtype=torch.float64)
    if initial_history is not None:
        hist.copy_(initial_history)
    anchor = torch.zeros_like(x)

    def hsum(weights):
        return sum((w * hist[k] for k, w in enumerate(weights) if w), torch.zeros_like(x))

    for i, c in enumerate(plan.calls):
        d = c.p_x * x + c.p_m * model(x * c.input_scale, i) + hsum(c.q)
        x_next = c.c_x * x + c.c_a * anchor + c.c_d * d + hsum(c.c_h)
        y = c.e_x * x + c.e_a * anchor + c.e_d * d + hsum(c.e_h) if c.want_y else None
        if c.write_slot >= 0:
            hist[c.write_slot] = d
        anchor = {"x": x, "y": y, "x_next": x_next}.get(c.anchor, anchor)
        x = x_next
    return x


def test_unipc_convergence_order_with_warm_start():
    # Data x0 ~ N(mu, s^2) per element: the x0-prediction and the probability-flow ODE solution are closed form
    # (shared reference notes, section 4.1). Uniform lambda steps ending at sigma > 0, exact history at the
    # order - 1 points before the start: the observed order is p + 1 with UniC and p without.
    gen = torch.Generator().manual_seed(0)
    size = 512
    mu = 0.5 * torch.randn(size, dtype=torch.float64, generator=gen)
    s2 = (0.3 + torch.rand(size, dtype=torch.float64, generator=gen)) ** 2
    z = torch.randn(size, dtype=torch.float64, generator=gen)

    def x0_star(x, a, sg):
        return mu + a * s2 * (x - a * mu) / (a * a * s2 + sg * sg)

    def flow(x, a0, sg0, a1, sg1):
        return a1 * mu + torch.sqrt((a1 * a1 * s2 + sg1 * sg1) / (a0 * a0 * s2 + sg0 * sg0)) * (x - a0 * mu)

    schedule = NoiseSchedule.sd("sample")
    lam0, lam1 = -1.5, 2.5
    for order in (1, 2, 3):
        for corrector in (True, False):
            errors, steps = [], (16, 32, 64) if order < 3 else (32, 64, 128)
            for n in steps:
                h = (lam1 - lam0) / n
                w = order - 1
                lams = lam0 + h * np.arange(-w, n + 1)
                varsigma = np.exp(-lams)
                plan = build_plan("unipc", schedule, None, sigmas=varsigma, solver_order=order,
                                  lower_order_final=False, warm_start=True, use_corrector=corrector)
                assert [j for _, j in plan.info["warm_start"]] == list(range(w))
                assert len(plan.calls) == n
                al = 1 / np.sqrt(varsigma ** 2 + 1)
                sg = varsigma * al
                x_start = al[w] * mu + torch.sqrt(al[w] ** 2 * s2 + sg[w] ** 2) * z
                hist = torch.zeros(order, size, dtype=torch.float64)
                for slot, j in plan.info["warm_start"]:
                    hist[slot] = x0_star(flow(x_start, al[w], sg[w], al[j], sg[j]), al[j], sg[j])
                out = run_plan_f64(plan, lambda x, i: x0_star(x, al[w + i], sg[w + i]), x_start, hist)
                exact = flow(x_start, al[w], sg[w], al[-1], sg[-1])
                errors.append(float((out - exact).pow(2).mean().sqrt()))
            slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
            expected = order + 1 if corrector else order
            assert plan.info["order"] == expected
            assert slopes[-1] >= expected - 0.1, (order, corrector, errors, slopes)


def test_bad_options():
    sd = NoiseSchedule.sd()
    with pytest.raises(ValueError, match="solver_order"):
        build_plan("unipc", sd, 10, solver_order=4)
    with pytest.raises(ValueError, match="solver_order"):
        build_plan("unipc", sd, 10, solver_order=True)
    with pytest.raises(ValueError, match="solver_type"):
        build_plan("unipc", sd, 10, solver_type="midpoint")
    with pytest.raises(ValueError, match="disable_corrector"):
        build_plan("unipc", sd, 10, disable_corrector=[0.5])
    with pytest.raises(ValueError, match="prediction_type"):
        build_plan("unipc", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="final_sigma"):
        build_plan("unipc", sd, 10, final_sigma="one")
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("unipc", sd, 0)
    with pytest.raises(ValueError, match="warm_start"):
        build_plan("unipc", sd, None, sigmas=[3.0, 2.0, 1.0], solver_order=3, warm_start=True)
    with pytest.raises(ValueError, match="sigmas"):
        build_plan("unipc", sd, None, sigmas=[3.0, 3.0, 1.0])
