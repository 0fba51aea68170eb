"""velodiff.sampling.schedules against diffusers.

Precision: diffusers keeps betas and alphas_cumprod as float32 tensors (and derives its sigma table from them in
float32), velodiff computes them in float64. Where diffusers rounds to float32, velodiff is compared at float32
resolution (velodiff rounded to float32 equals diffusers, or a few float32 ulps after a float32 cumprod); where
both compute in float64 (rescale_zero_terminal_snr on float64 input, the Karras / exponential formulas and the
log-sigma interpolation given the same inputs) the tolerance is 1e-12; integer timesteps must be equal.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from velodiff.sampling import schedules as sch
from velodiff.sampling.schedules import NoiseSchedule

BETA_CONFIGS = [
    ("linear", 1e-4, 0.02),            # DDPM, DiT, PixArt
    ("scaled_linear", 0.00085, 0.012),  # Stable Diffusion 1.x / 2.x / XL
    ("squaredcos_cap_v2", 1e-4, 0.02),  # improved DDPM cosine (beta_start/end unused)
]
STEP_COUNTS = [1, 2, 3, 4, 7, 10, 20, 25, 33, 50, 100, 999, 1000]
SPACINGS = ["linspace", "leading", "trailing"]


def f32_ulps(a, b) -> np.ndarray:
    """|a - b| in units of the float32 spacing at b."""
    b32 = np.asarray(b, dtype=np.float32)
    return np.abs(np.asarray(a, dtype=np.float64) - b32.astype(np.float64)) / np.spacing(np.abs(b32)).astype(
        np.float64)


# --------------------------------------------------------------------------------------------------------------
# betas, alphas_cumprod, zero-terminal-SNR rescale
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", BETA_CONFIGS)
def test_betas_match_diffusers(beta_schedule, beta_start, beta_end):
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end).betas
    assert ref.dtype == torch.float32
    ours = sch.make_betas(beta_schedule, 1000, beta_start, beta_end)
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    if beta_schedule == "squaredcos_cap_v2":
        # diffusers evaluates the same float64 expression then rounds to float32: bitwise equal after rounding
        np.testing.assert_array_equal(ours.astype(np.float32), ref.numpy())
    else:
        # diffusers: torch.linspace in float32 (then squared in float32 for scaled_linear): a few ulps off the
        # float64 values
        assert f32_ulps(ours, ref.numpy()).max() <= 4
        # and in float64 velodiff is exactly the formula: linspace (of sqrt for scaled_linear)
        if beta_schedule == "linear":
            expect = torch.linspace(beta_start, beta_end, 1000, dtype=torch.float64).numpy()
        else:
            expect = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, 1000, dtype=torch.float64).numpy() ** 2
        np.testing.assert_allclose(ours, expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", BETA_CONFIGS)
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, beta_start, beta_end, rescale):
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                        rescale_betas_zero_snr=rescale).alphas_cumprod.numpy()
    ours = NoiseSchedule.from_config(beta_schedule, 1000, beta_start, beta_end,
                                     rescale_betas_zero_snr=rescale).alphas_cumprod
    assert ours.dtype == np.float64
    if rescale:
        assert ours[-1] == pytest.approx(0.0, abs=1e-15) and ref[-1] == pytest.approx(0.0, abs=1e-9)
        ours, ref = ours[:-1], ref[:-1]
    # diffusers' float32 cumprod over 1000 factors loses up to ~4e-5 relative on the smallest values (cosine
    # schedule, 2e-9 at t = 999), and its float32 rescale subtracts nearly equal numbers near the end
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-10 if rescale else 0)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", BETA_CONFIGS)
def test_rescale_zero_terminal_snr_matches_diffusers(beta_schedule, beta_start, beta_end):
    betas = sch.make_betas(beta_schedule, 1000, beta_start, beta_end)
    ref = diffusers_rescale(torch.from_numpy(betas.copy())).numpy()   # float64 in -> float64 out
    ours = sch.rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert ours[-1] == 1.0  # alpha_bar_T = 0
    # the schedule keeps its first alpha_bar and ends at zero SNR
    ab = np.cumprod(1 - ours)
    assert ab[0] == pytest.approx(np.cumprod(1 - betas)[0], rel=1e-12)
    assert ab[-1] == 0.0


# --------------------------------------------------------------------------------------------------------------
# timestep spacings
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    if (spacing, num_steps, steps_offset) == ("leading", 1000, 1):
        pytest.skip("diffusers gives timestep 1000, past the schedule: rejected (tests/sampling/test_step_limits.py)")
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = sch.ddim_timesteps(num_steps, 1000, spacing, steps_offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_ddim_timesteps_reject_too_many_steps():
    with pytest.raises(ValueError, match="num_inference_steps=1001 .* at most 1000"):
        sch.ddim_timesteps(1001, 1000)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [n for n in STEP_COUNTS if n < 999])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_multistep_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = sch.multistep_timesteps(num_steps, 1000, spacing, steps_offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [5, 10, 20, 50])
def test_default_discretization_matches_dpm_solver(spacing, num_steps):
    """The default sigma schedule: training sigmas at the spaced timesteps, then sigma_min or 0."""
    for final in ("zero", "sigma_min"):
        ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          timestep_spacing=spacing, final_sigmas_type=final)
        ref.set_timesteps(num_steps)
        pts = sch.discretize(NoiseSchedule.sd(), num_steps, spacing=spacing, final_sigma=final)
        np.testing.assert_array_equal(pts.timesteps, ref.timesteps.numpy().astype(np.float64))
        # diffusers' sigma table comes from float32 alphas_cumprod and is stored in float32; sigma_min =
        # sqrt((1 - abar_0)/abar_0) loses 1.3e-5 relative to the float32 cancellation in 1 - abar_0
        np.testing.assert_allclose(pts.varsigma, ref.sigmas.numpy().astype(np.float64), rtol=2e-5, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Karras / exponential sigmas and the log-sigma interpolation
# --------------------------------------------------------------------------------------------------------------

def _dpm(kind: str, num_steps: int, **cfg) -> DPMSolverMultistepScheduler:
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      use_karras_sigmas=kind == "karras", use_exponential_sigmas=kind == "exponential",
                                      **cfg)
    ref.set_timesteps(num_steps)
    return ref


def _diffusers_sigma_table(ref) -> np.ndarray:
    """The ascending VE sigma table diffusers builds in set_timesteps (float32 arithmetic on alphas_cumprod)."""
    return (((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy()


@pytest.mark.parametrize("num_steps", [2, 5, 10, 25, 50, 100])
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_exponential_formulas_match_diffusers(kind, num_steps):
    """Same end points in, same sigmas out (float64 on both sides)."""
    ref = _dpm(kind, num_steps)
    table = _diffusers_sigma_table(ref)
    in_sigmas = np.flip(table).copy()
    sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
    if kind == "karras":
        expect = ref._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=num_steps)
        ours = sch.karras_sigmas(sigma_min, sigma_max, num_steps)
    else:
        expect = ref._convert_to_exponential(in_sigmas=in_sigmas, num_inference_steps=num_steps)
        ours = sch.exponential_sigmas(sigma_min, sigma_max, num_steps)
    np.testing.assert_allclose(ours, np.asarray(expect, dtype=np.float64), rtol=1e-12, atol=0)
    assert ours[0] == pytest.approx(sigma_max, rel=1e-12) and ours[-1] == pytest.approx(sigma_min, rel=1e-12)


def test_sigma_to_t_matches_diffusers():
    """NoiseSchedule.sigma_to_t is diffusers' _sigma_to_t on velodiff's (float64) log-sigma table, including
    clamping outside the table."""
    schedule = NoiseSchedule.sd()
    log_sigmas = np.log(schedule.karras_sigmas_all)
    ref = DPMSolverMultistepScheduler()
    rng = np.random.default_rng(0)
    lo, hi = schedule.karras_sigmas_all.min(), schedule.karras_sigmas_all.max()
    probes = np.concatenate([
        np.exp(rng.uniform(np.log(lo), np.log(hi), 500)),
        schedule.karras_sigmas_all[::37],                      # on the nodes
        [lo, hi, lo * 0.5, hi * 2.0, 1e-12],                   # ends, and outside the table (clamped)
    ])
    expect = np.array([ref._sigma_to_t(np.float64(s), log_sigmas) for s in probes], dtype=np.float64).ravel()
    ours = schedule.sigma_to_t(probes)
    np.testing.assert_allclose(ours, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_steps", [2, 5, 10, 25, 50, 100])
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_exponential_sigmas_match_dpm_solver(kind, num_steps):
    """End to end: discretize(sigma_schedule=kind) sigmas against DPMSolverMultistepScheduler(use_{kind}_sigmas=True)
    (diffusers stores them in float32 and derives them from a float32 sigma table)."""
    ref = _dpm(kind, num_steps, final_sigmas_type="sigma_min")
    pts = sch.discretize(NoiseSchedule.sd(), num_steps, sigma_schedule=kind, final_sigma="sigma_min")
    np.testing.assert_allclose(pts.varsigma, ref.sigmas.numpy().astype(np.float64), rtol=2e-5, atol=0)


@pytest.mark.parametrize("num_steps", [2, 5, 10, 25, 50, 100])
def test_karras_timesteps_match_dpm_solver(num_steps):
    """diffusers rounds the interpolated Karras timesteps; so does velodiff: equal integers."""
    ref = _dpm("karras", num_steps)
    pts = sch.discretize(NoiseSchedule.sd(), num_steps, sigma_schedule="karras")
    np.testing.assert_array_equal(pts.timesteps, ref.timesteps.numpy().astype(np.float64))


@pytest.mark.parametrize("num_steps", [2, 5, 10, 25, 50, 100])
def test_exponential_timesteps_round_where_diffusers_truncates(num_steps):
    """A deliberate difference: diffusers (0.42) casts the interpolated exponential-sigma timesteps to int64
    (truncation; sigma_max even maps to 998 through its float32 table), velodiff rounds them like its Karras
    timesteps (999, 681, ... vs 998, 680, ...). The sigmas themselves agree (tested above), and the DPM samplers are
    checked against diffusers on exponential sigmas with a model that ignores t. So: velodiff's timesteps are the
    rounded, diffusers' the truncated values of the same interpolation, never more than one apart."""
    ref = _dpm("exponential", num_steps)
    pts = sch.discretize(NoiseSchedule.sd(), num_steps, sigma_schedule="exponential")
    unrounded = sch.discretize(NoiseSchedule.sd(), num_steps, sigma_schedule="exponential", round_timesteps=False)
    np.testing.assert_array_equal(pts.timesteps, np.round(unrounded.timesteps))
    theirs = ref.timesteps.numpy().astype(np.float64)
    assert np.all(np.abs(theirs - pts.timesteps) <= 1)
    assert np.all(theirs <= unrounded.timesteps + 1e-3)  # truncated, up to diffusers' float32 table


@pytest.mark.parametrize("num_steps", [5, 10, 25, 50])
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_unrounded_interpolated_timesteps_match_dpm_solver(kind, num_steps):
    """Before diffusers rounds/casts them, its interpolated timesteps are sigma_to_t of its sigmas: velodiff's
    unrounded timesteps agree to the precision of diffusers' float32 sigma table (1 - abar in float32 loses up to
    ~1e-4 relative at small t, ~1e-3 in t)."""
    ref = _dpm(kind, num_steps)
    table = _diffusers_sigma_table(ref)
    in_sigmas = np.flip(table).copy()
    convert = ref._convert_to_karras if kind == "karras" else ref._convert_to_exponential
    ref_sigmas = convert(in_sigmas=in_sigmas, num_inference_steps=num_steps)
    expect = np.array([ref._sigma_to_t(s, np.log(table)) for s in ref_sigmas], dtype=np.float64).ravel()
    pts = sch.discretize(NoiseSchedule.sd(), num_steps, sigma_schedule=kind, round_timesteps=False)
    np.testing.assert_allclose(pts.timesteps, expect, rtol=0, atol=5e-3)
