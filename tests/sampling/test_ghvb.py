import math
from fractions import Fraction

import pytest
import torch

from velodiff.sampling import NoiseSchedule, build_plan
from velodiff.sampling import schedules as sch
from velodiff.sampling.samplers import max_num_steps
from velodiff.sampling.samplers.ghvb import mixer_weights
from analytic import grid_schedule, table_grid_options
from parity import dummy_model, relative_error, velodiff_trajectory


def paper_mixer(k, vs, b):
    """The mixer of the paper / sWizad/momentum-diffusion (vs[-1] newest), before the division by b."""
    if k == 1:
        return b * vs[-1]
    if k == 2:
        return ((2 + b) * vs[-1] - (2 - b) * vs[-2]) / 2
    if k == 3:
        return ((18 + 5 * b) * vs[-1] - (24 - 8 * b) * vs[-2] + (6 - b) * vs[-3]) / 12
    if k == 4:
        return ((46 + 9 * b) * vs[-1] - (78 - 19 * b) * vs[-2] + (42 - 5 * b) * vs[-3] - (10 - b) * vs[-4]) / 24
    if k == 5:
        return ((1650 + 251 * b) * vs[-1] - (3420 - 646 * b) * vs[-2] + (2880 - 264 * b) * vs[-3]
                - (1380 - 106 * b) * vs[-4] + (270 - 19 * b) * vs[-5]) / 720
    raise ValueError(k)


def ghvb_reference(schedule, num_steps, x, k, beta, model=dummy_model, spacing="leading", steps_offset=1):
    """GHVB from the paper's equations, float64, in DDIM's scaled variables. Returns x after each step."""
    ab = schedule.alphas_cumprod
    ts = sch.ddim_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset)
    x = x.to(torch.float64)
    vel, history, out = None, [], []
    for i, t in enumerate(ts):
        a_t = float(ab[t])
        a_next = float(ab[ts[i + 1]]) if i + 1 < len(ts) else float(ab[0])
        m = model(x, float(t)).to(torch.float64)
        if schedule.prediction_type == "epsilon":
            eps = m
        elif schedule.prediction_type == "v_prediction":
            eps = math.sqrt(a_t) * m + math.sqrt(1 - a_t) * x
        else:
            eps = (x - math.sqrt(a_t) * m) / math.sqrt(1 - a_t)
        vel = eps if vel is None else (1 - beta) * vel + beta * eps
        history = (history + [vel])[-k:]
        e = paper_mixer(min(k, len(history)), history, beta) / beta
        d_varsigma = math.sqrt((1 - a_next) / a_next) - math.sqrt((1 - a_t) / a_t)
        x = (x / math.sqrt(a_t) + d_varsigma * e) * math.sqrt(a_next)
        out.append(x)
    return out


def run_plan_f64(plan, model, x):
    """The plan's calls executed in float64 straight from the Call fields (semantics of plan.py, no noise)."""
    x = x.to(torch.float64)
    hist = torch.zeros((plan.history_slots,) + tuple(x.shape), dtype=torch.float64)
    anchor = torch.zeros_like(x)

    def hsum(weights):
        return sum((w * hist[k] for k, w in enumerate(weights) if w), torch.zeros_like(x))

    out = []
    for c in plan.calls:
        d = c.p_x * x + c.p_m * model(x * c.input_scale, c.timestep).to(torch.float64) + hsum(c.q)
        x_next = c.c_x * x + c.c_a * anchor + c.c_d * d + hsum(c.c_h)
        if c.write_slot >= 0:
            hist[c.write_slot] = d
        if c.anchor == "x":
            anchor = x
        x = x_next
        out.append(x)
    return out


def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_mixer_derivation_matches_paper_table(k):
    ab, c = mixer_weights(k)
    for b in (Fraction(1), Fraction(4, 5), Fraction(3, 10), Fraction(1, 7)):
        table = []
        for j in range(k):  # weight on v_{n-j}: feed the unit vector e_j as v_{n-j}, zeros elsewhere
            vs = [Fraction(0)] * k
            vs[k - 1 - j] = Fraction(1)
            table.append(paper_mixer(k, vs, b))
        derived = [b * a + (1 - b) * cc for a, cc in zip(ab, c)]
        assert derived == table
    # beta = 1: k-step Adams-Bashforth; the weights of a consistent method sum to 1 (A) and 0 (C)
    assert sum(ab) == 1 and sum(c) == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("order", [0.5, 1.0, 1.8, 2.0, 2.5, 3.3, 3.8, 4.0, 4.7])
def test_ghvb_matches_paper_equations(order, prediction_type):
    n = 12
    schedule = NoiseSchedule.sd(prediction_type)
    plan = build_plan("ghvb", schedule, n, order=order)
    k = math.ceil(order)
    beta = order - (k - 1)
    assert plan.info["k"] == k and abs(plan.info["beta"] - beta) < 1e-12
    ref = ghvb_reference(schedule, n, noise(), k, beta)
    exact = run_plan_f64(plan, dummy_model, noise())
    _, ours = velodiff_trajectory(plan, noise())
    for i in range(n):
        assert relative_error(exact[i], ref[i]) <= 1e-12, f"step {i} (float64 plan)"
        assert relative_error(ours[i], ref[i]) <= 1e-5, f"step {i} (fp32 run_plan)"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ghvb_spacings(spacing):
    schedule = NoiseSchedule.sd()
    plan = build_plan("ghvb", schedule, 9, order=2.7, spacing=spacing, steps_offset=0)
    ref = ghvb_reference(schedule, 9, noise(), 3, 0.7, spacing=spacing, steps_offset=0)
    _, ours = velodiff_trajectory(plan, noise())
    assert plan.timesteps == [float(t) for t in sch.ddim_timesteps(9, 1000, spacing, 0)]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert relative_error(a, b) <= 1e-5, f"step {i}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 25)])
def test_order_one_is_ddim(prediction_type, spacing, num_steps):
    schedule = NoiseSchedule.sd(prediction_type)
    ours = build_plan("ghvb", schedule, num_steps, order=1.0, spacing=spacing)
    ddim = build_plan("ddim", schedule, num_steps, spacing=spacing)
    assert ours.history_slots == 0 and ours.timesteps == ddim.timesteps
    # the same update up to float64 rounding of the coefficients (DDIM builds them from x0, GHVB from eps)
    torch.testing.assert_close(ours.coefficient_table().double(), ddim.coefficient_table().double(),
                               rtol=1e-6, atol=1e-7)
    _, a = velodiff_trajectory(ours, noise())
    _, b = velodiff_trajectory(ddim, noise())
    for i in range(num_steps):
        assert relative_error(a[i], b[i]) <= 1e-6, f"step {i}"


def test_momentum_layout():
    plan = build_plan("ghvb", NoiseSchedule.sd(), 6, order=2.8)
    assert plan.history_slots == 3
    assert [c.write_slot for c in plan.calls] == [0, 1, 2, 0, 1, 2]
    first, second = plan.calls[0], plan.calls[1]
    assert list(first.q) == [0.0, 0.0, 0.0] and first.p_m == 1.0      # v_0 = eps_0
    assert list(second.q) == pytest.approx([0.2, 0.0, 0.0]) and second.p_m == pytest.approx(0.8)
    assert plan.info["nominal_order"] == 3 and plan.info["ghvb_order"] == 2.8
    assert plan.info["order"] == 2  # SD's timesteps are not uniform in varsigma (test_claimed_order_follows_the_grid)


@pytest.mark.parametrize("order", [0.6, 1.0, 1.8, 2.0, 2.8, 3.0, 4.0, 4.7])
def test_claimed_order_follows_the_grid(order):
    """plan.info["order"]: k = ceil(order) on steps uniform in varsigma, min(k, 2) on any other grid (the mixer's
    weights are those of equal steps); both measured in tests/sampling/test_convergence.py (ghvb-* cases)."""
    k = math.ceil(order)
    uniform = grid_schedule("varsigma", 2049)
    for n in (8, 64, 2048):
        plan = build_plan("ghvb", uniform, n, order=order, **table_grid_options(uniform, n))
        assert (plan.info["order"], plan.info["nominal_order"]) == (k, k), n
    lam = grid_schedule("lambda", 2049)
    for schedule, options in ((lam, table_grid_options(lam, 64)), (NoiseSchedule.sd(), {}),
                              (NoiseSchedule.sd(), dict(spacing="trailing"))):
        plan = build_plan("ghvb", schedule, 64, order=order, **options)
        assert (plan.info["order"], plan.info["nominal_order"]) == (min(k, 2), k)


@pytest.mark.parametrize("spacing,n_max", [("leading", 999), ("trailing", 1000), ("linspace", 1000)])
def test_largest_step_count(spacing, n_max):
    """The most steps SD's 1000-step table gives (velodiff.sampling.samplers.build_plan refuses more): 'leading'
    spacing with steps_offset=1 would need timestep 1000 at N = 1000 (it was an IndexError), so 999; trailing and
    linspace reach every timestep. The plan equals the paper's equations at every step: float64 to round-off
    (measured 4.6e-15), fp32 run_plan within 1e-5 (measured 2.0e-6 after 1000 fp32 updates, about sqrt(1000)
    times one update's rounding)."""
    schedule = NoiseSchedule.sd()
    assert max_num_steps("ghvb", schedule, spacing=spacing) == n_max
    plan = build_plan("ghvb", schedule, n_max, order=3.8, spacing=spacing)
    assert plan.timesteps[0] == 999 and len(set(plan.timesteps)) == n_max == len(plan.calls)
    ref = ghvb_reference(schedule, n_max, noise(), 4, 0.8, spacing=spacing)
    exact = run_plan_f64(plan, dummy_model, noise())
    _, ours = velodiff_trajectory(plan, noise())
    assert max(relative_error(a, b) for a, b in zip(exact, ref)) <= 1e-12
    assert max(relative_error(a, b) for a, b in zip(ours, ref)) <= 1e-5
    with pytest.raises(ValueError, match=f"num_inference_steps={n_max + 1} .*at most {n_max}"):
        build_plan("ghvb", schedule, n_max + 1, order=3.8, spacing=spacing)


def test_bad_options():
    sd = NoiseSchedule.sd()
    for bad in (0, -1.0, 5.5, float("nan"), "2", True):
        with pytest.raises(ValueError, match="order"):
            build_plan("ghvb", sd, 10, order=bad)
    with pytest.raises(ValueError, match="spacing"):
        build_plan("ghvb", sd, 10, spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        build_plan("ghvb", NoiseSchedule.sd("flow"), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_plan("ghvb", sd, 0)
