"""How many steps each sampler can take: the limits of diffusers' timestep spacings (diffusers' own schedulers are
the oracle, count by count), every sampler at its maximum (a well-formed plan; the same trajectory as diffusers'
scheduler where one exists) and one past it (a ValueError naming num_inference_steps and the maximum)."""
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.utils import logging as diffusers_logging

from velodiff.sampling import MAX_NUM_STEPS, SAMPLERS, NoiseSchedule, build_plan, max_num_steps, run_plan
from velodiff.sampling import schedules as sch
from velodiff.sampling.samplers import TIMESTEP_SOURCE
from parity import diffusers_trajectory, dummy_model, relative_error, velodiff_trajectory

diffusers_logging.set_verbosity_error()

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = ("linspace", "leading", "trailing")
# the spacing kind of velodiff's timestep functions -> (the function, the diffusers scheduler using that spacing)
KINDS = {"ddim": (sch.ddim_timesteps, DDIMScheduler), "multistep": (sch.multistep_timesteps,
                                                                    DPMSolverMultistepScheduler),
         "euler": (sch.euler_timesteps, EulerDiscreteScheduler)}


def diffusers_timesteps(kind: str, t: int, n: int, spacing: str, offset: int) -> np.ndarray:
    cls = KINDS[kind][1]
    ref = cls(num_train_timesteps=t, timestep_spacing=spacing, steps_offset=offset, **SD)
    ref.set_timesteps(n)
    return ref.timesteps.numpy().astype(np.float64)


def usable(ts: np.ndarray, t: int, n: int) -> bool:
    """N timesteps, strictly descending, inside the schedule [0, T-1]."""
    return len(ts) == n and bool(np.all(np.diff(ts) < 0)) and ts.min() >= 0 and ts.max() <= t - 1


# --------------------------------------------------------------------------------------------------------------
# the spacings, count by count, against diffusers
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_spacing_limit_is_diffusers_last_usable_count(kind, spacing, offset):
    """Over a 97-step schedule (every count 1..T+1) and the SD 1000-step one (the counts near T, and those where
    diffusers' trailing arange gives N + 1 timesteps): velodiff's timesteps are diffusers' first N for every count
    up to the limit, diffusers' first N are usable exactly up to the limit, and one more count is refused."""
    ours_fn = KINDS[kind][0]
    for t, counts in ((97, range(1, 99)), (1000, [61, 103, 121, 997, 998, 999, 1000, 1001])):
        n_max, why = sch.spaced_steps_limit(kind, t, spacing, offset)
        if kind == "euler" and spacing == "linspace":  # fractional timesteps: only the global cap
            assert n_max == MAX_NUM_STEPS
        for n in counts:
            fractional = kind == "euler" and spacing == "linspace"
            ref = diffusers_timesteps(kind, t, n, spacing, offset) if n <= t or fractional else None
            if n <= n_max:
                ours = ours_fn(n, t, spacing, offset).astype(np.float64)
                # diffusers keeps Euler's fractional timesteps in float32
                rtol = 1e-7 if fractional else 0
                np.testing.assert_allclose(ours, ref[:n], rtol=rtol, atol=0, err_msg=f"T={t} N={n}")
                if not fractional:
                    assert usable(ref[:n], t, n), f"T={t} N={n}: diffusers' first N are not usable"
            else:
                # every count in the (contiguous) range above the limit that diffusers accepts gives it unusable
                # timesteps: repeated, past T - 1, or (n > T) refused
                if ref is not None:
                    assert not usable(ref[:n], t, n), f"T={t} N={n} is usable in diffusers but refused"
                with pytest.raises(ValueError, match=f"num_inference_steps={n} is too many .*at most {n_max}"):
                    ours_fn(n, t, spacing, offset)


def test_trailing_spacing_gives_exactly_n_timesteps():
    """diffusers' arange(T, 0, -T/N) has N + 1 elements for 62 counts N <= 1000 (61, 103, ...), the last one -1,
    which indexes the end of the table (a step back to pure noise); velodiff's trailing spacing has N."""
    counts = [n for n in range(1, 1001) if len(np.arange(1000, 0, -1000 / n)) != n]
    assert len(counts) == 62 and counts[:3] == [61, 103, 121]
    for n in counts:
        for fn in (sch.ddim_timesteps, sch.multistep_timesteps, sch.euler_timesteps):
            ts = fn(n, 1000, "trailing")
            assert len(ts) == n and ts.min() >= 0 and np.all(np.diff(ts) < 0)


def test_euler_linspace_beyond_the_table_matches_diffusers():
    """Euler's linspace timesteps are fractional: more steps than training timesteps are fine (as in diffusers)."""
    for n in (1001, 2500):
        np.testing.assert_allclose(sch.euler_timesteps(n, 1000, "linspace"),
                                   diffusers_timesteps("euler", 1000, n, "linspace", 0), rtol=1e-7, atol=0)


def test_every_sampler_has_a_timestep_source():
    assert set(TIMESTEP_SOURCE) == set(SAMPLERS)


# --------------------------------------------------------------------------------------------------------------
# every sampler at its maximum and one past it
# --------------------------------------------------------------------------------------------------------------

DDIM_LIKE = ("ddim", "bdia", "ghvb")   # leading spacing, steps_offset 1 by default (diffusers' DDIMScheduler)
MULTISTEP = ("dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_exact",
             "dpmpp_2m_sde", "unipc")
EULER = ("euler", "euler_a", "heun")

# (sampler, options) -> the most steps on the SD schedule (T = 1000). These are diffusers' limits (checked count by
# count above): DDIM's leading spacing with steps_offset 1 reaches timestep 1000 at N = 1000 (diffusers then
# indexes past its table); the multistep grid needs N + 1 distinct points (999 for linspace; leading: T // (N+1)
# >= 1, and with steps_offset 1 the top timestep N + 1 <= 999); Euler's linspace timesteps are fractional, as are
# Karras and flow sigmas: only MAX_NUM_STEPS; LCM has its 50-point distillation grid.
EXPECTED = {}
for _name in DDIM_LIKE:
    EXPECTED.update({(_name, "linspace"): 1000, (_name, "leading"): 999, (_name, "trailing"): 1000})
EXPECTED.update({("ddpm", "linspace"): 1000, ("ddpm", "leading"): 1000, ("ddpm", "trailing"): 1000})
for _name in MULTISTEP:
    EXPECTED.update({(_name, "linspace"): 999, (_name, "leading"): 999, (_name, "leading+1"): 998,
                     (_name, "trailing"): 1000, (_name, "karras"): MAX_NUM_STEPS})
for _name in EULER:
    EXPECTED.update({(_name, "linspace"): MAX_NUM_STEPS, (_name, "leading"): 1000, (_name, "leading+1"): 999,
                     (_name, "trailing"): 1000})
EXPECTED.update({("lcm", "default"): 50, ("flow_euler", "default"): MAX_NUM_STEPS})
VARIANTS = {"linspace": dict(spacing="linspace"), "leading": dict(spacing="leading", steps_offset=0),
            "leading+1": dict(spacing="leading", steps_offset=1), "trailing": dict(spacing="trailing"),
            "karras": dict(sigma_schedule="karras"), "default": {}}
VARIANTS_DDIM = dict(VARIANTS, leading=dict(spacing="leading"))  # the builder's default offset (1; ddpm: 0)


def schedule_for(name: str):
    return None if name == "flow_euler" else NoiseSchedule.sd()


def options_for(name: str, variant: str):
    return dict((VARIANTS_DDIM if name in DDIM_LIKE + ("ddpm",) else VARIANTS)[variant])


def test_expected_table_covers_every_sampler():
    assert {name for name, _ in EXPECTED} == set(SAMPLERS)


def model_evaluations(name: str, n: int) -> int:
    return 2 * n - 1 if name == "heun" else n  # Heun: two per step but the last (to sigma = 0)


@pytest.mark.parametrize("name,variant", sorted(k for k, v in EXPECTED.items() if v < MAX_NUM_STEPS))
def test_sampler_at_its_maximum_and_one_past(name, variant):
    schedule, opts = schedule_for(name), options_for(name, variant)
    n_max = EXPECTED[name, variant]
    assert max_num_steps(name, schedule, **opts) == n_max
    with pytest.raises(ValueError, match=f"num_inference_steps={n_max + 1} is too many for sampler '{name}' on "
                                         f"this schedule: at most {n_max} "):
        build_plan(name, schedule, n_max + 1, **opts)
    plan = build_plan(name, schedule, n_max, **opts)
    assert len(plan.calls) == model_evaluations(name, n_max)
    for call in plan.calls:
        coefficients = (call.p_x, call.p_m, call.c_x, call.c_a, call.c_d, call.c_z, call.input_scale,
                        *call.q, *call.c_h, *call.e_h)
        assert all(math.isfinite(c) for c in coefficients)
    # the model sees N distinct timesteps inside the schedule, in descending order
    ts = np.unique(plan.timesteps)
    assert len(ts) == n_max and ts.min() >= 0 and ts.max() <= 999
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = run_plan(plan, dummy_model, x * plan.init_noise_scale, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,variant", sorted(k for k, v in EXPECTED.items() if v == MAX_NUM_STEPS))
def test_continuous_discretisations_stop_at_max_num_steps(name, variant):
    schedule, opts = schedule_for(name), options_for(name, variant)
    assert max_num_steps(name, schedule, **opts) == MAX_NUM_STEPS
    with pytest.raises(ValueError, match=f"num_inference_steps={MAX_NUM_STEPS + 1} is too many .*at most "
                                         f"{MAX_NUM_STEPS}"):
        build_plan(name, schedule, MAX_NUM_STEPS + 1, **opts)
    plan = build_plan(name, schedule, 2000, **opts)  # twice the training table: fine for continuous grids
    assert len(plan.calls) == model_evaluations(name, 2000)


@pytest.mark.parametrize("builder_call", [True, False])
def test_absurd_counts_are_refused_before_any_work(builder_call):
    """10**9 steps would take hours to plan: refused at once, also when the builder is called directly."""
    for name in SAMPLERS:
        call = SAMPLERS[name] if builder_call else (lambda s, n, _name=name: build_plan(_name, s, n))
        with pytest.raises(ValueError, match=f"num_inference_steps=1000000000 is too many .*at most"):
            call(schedule_for(name), 10 ** 9)


# --------------------------------------------------------------------------------------------------------------
# at the maximum, the same trajectory as diffusers' scheduler
# --------------------------------------------------------------------------------------------------------------

# (sampler, variant, diffusers scheduler, its config); diffusers' DDIM clips x0 to [-1, 1] and steps to
# alphas_cumprod = 1 by default, velodiff's builder (like the folders' configs) does neither
NO_CLIP = dict(clip_sample=False, set_alpha_to_one=False)
PARITY = [
    ("ddim", "leading", DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1, **NO_CLIP)),
    ("ddim", "linspace", DDIMScheduler, dict(timestep_spacing="linspace", steps_offset=1, **NO_CLIP)),
    ("ddpm", "trailing", DDPMScheduler, dict(timestep_spacing="trailing", clip_sample=False)),
    ("euler", "leading+1", EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    ("euler", "trailing", EulerDiscreteScheduler, dict(timestep_spacing="trailing")),
    ("heun", "leading", HeunDiscreteScheduler, dict(timestep_spacing="leading")),
    ("dpmpp_2m", "linspace", DPMSolverMultistepScheduler, dict(timestep_spacing="linspace")),
    ("dpmpp_2m", "leading+1", DPMSolverMultistepScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    ("dpmpp_3m", "trailing", DPMSolverMultistepScheduler, dict(timestep_spacing="trailing", solver_order=3)),
    ("unipc", "linspace", UniPCMultistepScheduler, dict(timestep_spacing="linspace")),
]


@pytest.mark.parametrize("name,variant,cls,config", PARITY, ids=[f"{p[0]}-{p[1]}" for p in PARITY])
def test_trajectory_at_the_maximum_matches_diffusers(name, variant, cls, config):
    """Step by step at the most steps the spacing gives (DDPM, which draws noise its own way: the timesteps and the
    number of steps only)."""
    n = EXPECTED[name, variant]
    ref = cls(num_train_timesteps=1000, **SD, **config)
    schedule = NoiseSchedule(ref.alphas_cumprod.double().numpy())  # diffusers' float32 table, as theirs
    plan = build_plan(name, schedule, n, **options_for(name, variant))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref_ts, ref_xs = diffusers_trajectory(ref, n, x.clone())
    ts, xs = velodiff_trajectory(plan, x.clone())
    assert ts == ref_ts
    assert len(xs) == len(ref_xs) == model_evaluations(name, n)
    if name == "ddpm":
        return
    err = max(relative_error(a, b) for a, b in zip(xs, ref_xs))
    assert err <= 1e-5, f"{name}/{variant} at N = {n}: largest relative difference over the steps {err}"
