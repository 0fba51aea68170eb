import math

import pytest
import torch

from velodiff.sampling import NoiseSchedule, build_plan
from velodiff.sampling import schedules as sch
from parity import dummy_model, relative_error, velodiff_trajectory


def to_eps(prediction_type, out, z, abar):
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return math.sqrt(abar) * out + math.sqrt(1 - abar) * z
    return (z - math.sqrt(abar) * out) / math.sqrt(1 - abar)


def phi(z, eps, ab_from, ab_to):
    """The DDIM step Phi_{from->to}(z, eps), float64."""
    return (math.sqrt(ab_to / ab_from) * z
            + (math.sqrt(1 - ab_to) - math.sqrt(ab_to * (1 - ab_from) / ab_from)) * eps)


def schedule_points(schedule, num_steps, spacing="leading", steps_offset=1):
    ts = sch.ddim_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset)
    abar = [float(schedule.alphas_cumprod[t]) for t in ts] + [float(schedule.alphas_cumprod[0])]
    return [float(t) for t in ts], abar


def bdia_forward(schedule, num_steps, z0, gamma, model=dummy_model, **kw):
    """BDIA-DDIM from the paper's equations, float64; returns [z_0, z_1, .., z_N] (sampling order)."""
    ts, abar = schedule_points(schedule, num_steps, **kw)
    zs = [z0.to(torch.float64)]
    for i, t in enumerate(ts):
        z = zs[-1]
        eps = to_eps(schedule.prediction_type, model(z, t).to(torch.float64), z, abar[i])
        z_next = phi(z, eps, abar[i], abar[i + 1])
        if i > 0:
            z_next = z_next + gamma * (zs[-2] - phi(z, eps, abar[i], abar[i - 1]))
        zs.append(z_next)
    return zs


def bdia_inverse(schedule, num_steps, z_last, z_before_last, gamma, model=dummy_model, **kw):
    """The exact inverse recursion z_{i-1} = (z_{i+1} - Phi_{i->i+1}(z_i)) / gamma + Phi_{i->i-1}(z_i), float64,
    from (z_N, z_{N-1}) down to z_0; returns [z_0, .., z_N]."""
    ts, abar = schedule_points(schedule, num_steps, **kw)
    n = len(ts)
    zs = {n: z_last.to(torch.float64), n - 1: z_before_last.to(torch.float64)}
    for i in range(n - 1, 0, -1):
        z = zs[i]
        eps = to_eps(schedule.prediction_type, model(z, ts[i]).to(torch.float64), z, abar[i])
        zs[i - 1] = (zs[i + 1] - phi(z, eps, abar[i], abar[i + 1])) / gamma + phi(z, eps, abar[i], abar[i - 1])
    return [zs[i] for i in range(n + 1)]


def run_plan_f64(plan, model, x):
    """The plan's calls executed in float64 straight from the Call fields (semantics of plan.py, no noise)."""
    x = x.to(torch.float64)
    anchor = torch.zeros_like(x)
    out = []
    for c in plan.calls:
        d = c.p_x * x + c.p_m * model(x * c.input_scale, c.timestep).to(torch.float64)
        x_next = c.c_x * x + c.c_a * anchor + c.c_d * d
        if c.anchor == "x":
            anchor = x
        x = x_next
        out.append(x)
    return out


def noise(dtype=torch.float32):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 25)])
def test_gamma_zero_is_ddim(prediction_type, spacing, num_steps):
    schedule = NoiseSchedule.sd(prediction_type)
    ours = build_plan("bdia", schedule, num_steps, gamma=0.0, spacing=spacing)
    ddim = build_plan("ddim", schedule, num_steps, spacing=spacing)
    assert ours.timesteps == ddim.timesteps
    assert all(c.c_a == 0.0 and c.anchor == "keep" for c in ours.calls)
    # the same update up to float64 rounding of the coefficients (DDIM builds them from x0, BDIA from eps)
    torch.testing.assert_close(ours.coefficient_table().double(), ddim.coefficient_table().double(),
                               rtol=1e-6, atol=1e-7)
    _, a = velodiff_trajectory(ours, noise())
    _, b = velodiff_trajectory(ddim, noise())
    for i in range(num_steps):
        assert relative_error(a[i], b[i]) <= 1e-6, f"step {i}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 40)])
def test_bdia_matches_paper_equations(prediction_type, gamma, spacing, num_steps):
    schedule = NoiseSchedule.sd(prediction_type)
    plan = build_plan("bdia", schedule, num_steps, gamma=gamma, spacing=spacing)
    ref = bdia_forward(schedule, num_steps, noise(), gamma, spacing=spacing)[1:]
    exact = run_plan_f64(plan, dummy_model, noise())
    _, ours = velodiff_trajectory(plan, noise())
    for i in range(num_steps):
        assert relative_error(exact[i], ref[i]) <= 1e-12, f"step {i} (float64 plan)"
        assert relative_error(ours[i], ref[i]) <= 1e-5, f"step {i} (fp32 run_plan)"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma,num_steps", [(0.5, 10), (1.0, 40), (0.8, 25)])
def test_exact_inversion_round_trip(prediction_type, gamma, num_steps):
    schedule = NoiseSchedule.sd(prediction_type)
    plan = build_plan("bdia", schedule, num_steps, gamma=gamma)
    z0 = noise(torch.float64)
    # sample with the plan's own coefficients (float64), then run the inverse recursion from the last two states
    forward = [z0] + run_plan_f64(plan, dummy_model, z0)
    back = bdia_inverse(schedule, num_steps, forward[-1], forward[-2], gamma)
    # The inverse divides by gamma every step, so it amplifies round-off by up to gamma^-N (forward sampling
    # damps the anchor term by gamma instead): float64 round-off times that factor.
    tol = 1e-13 * gamma ** -num_steps
    for i in range(num_steps + 1):
        assert relative_error(back[i], forward[i]) <= tol, f"z_{i}"
    if gamma == 1.0:
        # with gamma = 1 nothing is amplified: the fp32 loop's own states, fed to the float64 inverse, return
        # z_0 to fp32 round-off accumulated over the steps (with gamma < 1 this degrades like gamma^-N)
        _, ours = velodiff_trajectory(plan, z0.float())
        back32 = bdia_inverse(schedule, num_steps, ours[-1], ours[-2], gamma)
        assert relative_error(back32[0], z0) <= 1e-4
    # whereas plain DDIM inversion (Phi_{i->i+1} with eps at the less noisy point) does not return to z_0
    ddim_plan = build_plan("ddim", schedule, num_steps)
    z = run_plan_f64(ddim_plan, dummy_model, z0)[-1]
    ts, abar = schedule_points(schedule, num_steps)
    for j in range(num_steps, 0, -1):  # from point j to the noisier point j - 1, eps evaluated at point j
        t_j = ts[j] if j < num_steps else 0.0
        eps = to_eps(prediction_type, dummy_model(z, t_j).to(torch.float64), z, abar[j])
        z = phi(z, eps, abar[j], abar[j - 1])
    assert relative_error(z, z0) > 1e-4


def test_layout():
    plan = build_plan("bdia", NoiseSchedule.sd(), 5, gamma=0.5)
    assert plan.history_slots == 0
    assert [c.anchor for c in plan.calls] == ["x"] * 5
    assert plan.calls[0].c_a == 0.0 and all(c.c_a == 0.5 for c in plan.calls[1:])
    assert len(plan.info["abar"]) == 6 and plan.info["gamma"] == 0.5


def test_bad_options():
    sd = NoiseSchedule.sd()
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            build_plan("bdia", sd, 10, gamma=bad)
    with pytest.raises(ValueError, match="spacing"):
        build_plan("bdia", sd, 10, spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        build_plan("bdia", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("bdia", sd, -3)
