"""Analytic Gaussian data: the exact denoiser and the exact probability-flow ODE solution, for sampler tests.

Data ``x0 ~ N(mu, diag(s^2))`` per element; a noisy state on the path ``x = alpha*x0 + sigma*eps`` (VP:
``alpha^2 + sigma^2 = 1``; flow matching: ``alpha = 1 - sigma``). Per element, with ``v = alpha^2 s^2 + sigma^2``
the marginal variance of ``x``::

    eps*(x)  = sigma (x - alpha mu) / v
    x0*(x)   = mu + alpha s^2 (x - alpha mu) / v
    v*       = alpha eps* - sigma x0*          (v-prediction)
    u*       = eps* - x0*                      (flow velocity)

and along the probability-flow ODE ``y = (x - alpha mu)/sqrt(v)`` is invariant, so from (x_s, s) to t::

    x_t = alpha_t mu + sqrt(v_t / v_s) (x_s - alpha_s mu)

(checked against a numerical ODE solve in tests/sampling/test_convergence.py). Everything here is float64; the
model callable returns fp32 like a network would.

Timesteps. A sampler built from explicit VE sigmas ``varsigma = sigma/alpha`` hands the model
``t = NoiseSchedule.sigma_to_t(varsigma)``: linear interpolation of ``log varsigma`` between the training steps.
:func:`t_to_varsigma` is its exact inverse (the same piecewise-linear interpolation read the other way), so the
model recovers the very (alpha, sigma) the sampler's coefficients were computed from. Integer timesteps land on
the training nodes, where this gives ``varsigma = sqrt((1 - abar_t)/abar_t)`` of that step. Flow-matching models
get ``t = 1000 * sigma``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from velodiff.sampling.schedules import NoiseSchedule

FLOW_TIMESTEP_SCALE = 1000.0


# --- the data -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GaussianData:
    """Per-element mean and standard deviation [D] (float64)."""

    mu: torch.Tensor
    s: torch.Tensor

    @classmethod
    def random(cls, d: int, seed: int = 0, mu_range: Tuple[float, float] = (-1.0, 1.0),
               s_range: Tuple[float, float] = (0.1, 1.5)) -> "GaussianData":
        g = torch.Generator().manual_seed(seed)
        mu = mu_range[0] + (mu_range[1] - mu_range[0]) * torch.rand(d, generator=g, dtype=torch.float64)
        s = s_range[0] + (s_range[1] - s_range[0]) * torch.rand(d, generator=g, dtype=torch.float64)
        return cls(mu, s)

    @property
    def dim(self) -> int:
        return self.mu.numel()

    def marginal_var(self, alpha, sigma) -> torch.Tensor:
        return alpha ** 2 * self.s ** 2 + sigma ** 2

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        x = x.double()
        return sigma * (x - alpha * self.mu) / self.marginal_var(alpha, sigma)

    def x0(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        x = x.double()
        return self.mu + alpha * self.s ** 2 * (x - alpha * self.mu) / self.marginal_var(alpha, sigma)

    def prediction(self, prediction_type: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The exact model output for ``prediction_type`` at the state ``x`` of the path (alpha, sigma)."""
        if prediction_type == "epsilon":
            return self.eps(x, alpha, sigma)
        if prediction_type == "sample":
            return self.x0(x, alpha, sigma)
        if prediction_type == "v_prediction":
            return alpha * self.eps(x, alpha, sigma) - sigma * self.x0(x, alpha, sigma)
        if prediction_type == "flow":
            return self.eps(x, alpha, sigma) - self.x0(x, alpha, sigma)
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def flow(self, x_s: torch.Tensor, alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
        """The exact probability-flow ODE solution at (alpha_t, sigma_t) from x_s at (alpha_s, sigma_s)."""
        ratio = torch.sqrt(self.marginal_var(alpha_t, sigma_t) / self.marginal_var(alpha_s, sigma_s))
        return alpha_t * self.mu + ratio * (x_s.double() - alpha_s * self.mu)

    def sample_marginal(self, alpha, sigma, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[batch, D] float64 draws of x = alpha*x0 + sigma*eps."""
        z = torch.randn(batch, self.dim, generator=generator, dtype=torch.float64)
        return alpha * self.mu + torch.sqrt(self.marginal_var(alpha, sigma)) * z


# --- timesteps <-> (alpha, sigma) -----------------------------------------------------------------------------

def t_to_varsigma(schedule: NoiseSchedule, t) -> np.ndarray:
    """Inverse of ``schedule.sigma_to_t``: VE sigma at a (fractional) discrete timestep, by piecewise-linear
    interpolation of log varsigma over the integer training steps."""
    log_sigmas = np.log(schedule.karras_sigmas_all)
    grid = np.arange(len(log_sigmas), dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if np.any(t < 0) or np.any(t > grid[-1]):
        raise ValueError(f"timestep {t} outside [0, {grid[-1]:g}]")
    return np.exp(np.interp(t, grid, log_sigmas))


def vp_from_varsigma(varsigma) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of the VP path at VE sigma ``varsigma`` (alpha = 1/sqrt(varsigma^2 + 1))."""
    vs = np.asarray(varsigma, dtype=np.float64)
    alpha = 1.0 / np.sqrt(vs ** 2 + 1.0)
    return alpha, vs * alpha


def alpha_sigma_at(schedule: Optional[NoiseSchedule], t: float, path: str = "vp") -> Tuple[float, float]:
    """(alpha, sigma) the model associates with the timestep ``t`` it is given."""
    if path == "vp":
        a, s = vp_from_varsigma(t_to_varsigma(schedule, float(t)))
        return float(a), float(s)
    if path == "flow":
        sigma = float(t) / FLOW_TIMESTEP_SCALE
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"flow timestep {t} outside [0, {FLOW_TIMESTEP_SCALE:g}]")
        return 1.0 - sigma, sigma
    raise ValueError(f"path must be 'vp' or 'flow', got {path!r}")


# --- the model ------------------------------------------------------------------------------------------------

class ExactModel:
    """``model(x_in, timestep) -> fp32`` returning the exact prediction of ``prediction_type``.

    ``x_in`` is the state on the path of ``path`` (for a VE-space sampler ``x_in = x_ve / sqrt(varsigma^2 + 1)``,
    which is the VP state). Records the timesteps it was called with.
    """

    def __init__(self, data: GaussianData, schedule: Optional[NoiseSchedule], prediction_type: str = "epsilon",
                 path: str = "vp", out_dtype: torch.dtype = torch.float32):
        self.data, self.schedule, self.prediction_type, self.path = data, schedule, prediction_type, path
        self.out_dtype = out_dtype
        self.timesteps = []

    def alpha_sigma(self, t: float) -> Tuple[float, float]:
        return alpha_sigma_at(self.schedule, t, self.path)

    def __call__(self, x_in: torch.Tensor, t: float) -> torch.Tensor:
        self.timesteps.append(float(t))
        alpha, sigma = self.alpha_sigma(t)
        return self.data.prediction(self.prediction_type, x_in, alpha, sigma).to(self.out_dtype)


# --- discretisations ------------------------------------------------------------------------------------------

def lambda_range(schedule: NoiseSchedule) -> Tuple[float, float]:
    """(lambda at the largest training sigma, lambda at the smallest): about (-2.68, 3.53) for SD."""
    vs = schedule.karras_sigmas_all
    return -math.log(float(vs.max())), -math.log(float(vs.min()))


def lambda_uniform_varsigmas(schedule: NoiseSchedule, num_steps: int, num_before: int = 0) -> np.ndarray:
    """Descending VE sigmas [num_before + num_steps + 1], uniform in lambda = -log varsigma.

    The last ``num_steps + 1`` go from the schedule's largest to its smallest sigma (ending at sigma_min > 0);
    the first ``num_before`` continue the grid beyond the start (warm-start points, never evaluated)."""
    lam0, lam1 = lambda_range(schedule)
    h = (lam1 - lam0) / num_steps
    lam = lam0 + h * np.arange(-num_before, num_steps + 1, dtype=np.float64)
    vs = np.exp(-lam)
    # pin the extremes to the schedule's exact values (exp(-log) can be off by an ulp, outside the table)
    vs[num_before] = float(schedule.karras_sigmas_all.max())
    vs[-1] = float(schedule.karras_sigmas_all.min())
    return vs


def flow_uniform_sigmas(num_steps: int, sigma_max: float = 1.0, sigma_min: float = 0.02) -> np.ndarray:
    """Descending flow sigmas [num_steps + 1], uniform in sigma, ending at sigma_min > 0."""
    return np.linspace(sigma_max, sigma_min, num_steps + 1)


# --- running a plan -------------------------------------------------------------------------------------------

def is_ve_plan(plan) -> bool:
    """True when the plan keeps its state in VE space, x_ve = x_vp / alpha (euler, euler_a, heun): the model sees
    the state rescaled by 1/sqrt(varsigma^2 + 1), never 1 for varsigma > 0. VP and flow plans pass it as is."""
    return plan.calls[0].input_scale != 1.0


def initial_state(plan, vp_state: torch.Tensor) -> torch.Tensor:
    """The sampler state whose model input (``x * calls[0].input_scale``) is the VP state ``vp_state``."""
    return (vp_state.double() / plan.calls[0].input_scale).to(torch.float32)


def final_vp_state(plan, out: torch.Tensor, alpha_end: float) -> torch.Tensor:
    """The VP state of the plan's output at a final point with alpha = ``alpha_end``."""
    raw = out.double() / plan.output_scale
    return raw * alpha_end if is_ve_plan(plan) else raw


def warm_start_history(plan, data: GaussianData, x_start: torch.Tensor, alpha_sigma_of_index: Callable,
                       start_index: int, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Exact ring-buffer values for a plan built with ``warm_start=True``.

    ``plan.info["warm_start"]`` lists (slot, index into the builder's sigmas); the value stored is the exact
    data prediction x0* at the exact state at that point (x_start carried back along the ODE).
    """
    entries = plan.info.get("warm_start") or []
    if not entries:
        return None
    a0, s0 = alpha_sigma_of_index(start_index)
    hist = torch.zeros((plan.history_slots,) + tuple(x_start.shape), dtype=dtype)
    for slot, idx in entries:
        a, s = alpha_sigma_of_index(idx)
        x_there = data.flow(x_start, a0, s0, a, s)
        hist[slot] = data.x0(x_there, a, s).to(dtype)
    return hist


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))


def loglog_slope(ns: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope of -log(error) against log(N): the observed order."""
    x = np.log(np.asarray(ns, dtype=np.float64))
    y = -np.log(np.asarray(errors, dtype=np.float64))
    return float(np.polyfit(x, y, 1)[0])


def standardized_moments(samples: torch.Tensor, data: GaussianData) -> Tuple[float, float, int]:
    """Pooled mean and variance of (x - mu)/s over all samples [B, D]; N(0, 1) when x ~ N(mu, s^2)."""
    z = (samples.double() - data.mu) / data.s
    return float(z.mean()), float(z.var()), z.numel()


def output_moments(plan, model, start_mean: torch.Tensor, start_var: torch.Tensor):
    """Exact per-element mean and variance of a plan's output when the model is affine in x (the exact model
    is) and the initial model input (the VP state) is N(start_mean, start_var) per element.

    The output is then ``A x_T + b + sum_i c_i z_i`` per element (x_T the initial VP state, z_i the N(0, 1) draws
    of the noise calls): one batched run with rows (x_T = 0), (x_T = 1), and one row per noise call with that
    call's draw set to 1 and all others 0 recovers A, b and every c_i. Returns float64 (mean [D], var [D]).
    """
    noise_calls = [i for i, c in enumerate(plan.calls) if c.noise]
    row_of = {i: 2 + k for k, i in enumerate(noise_calls)}
    d = start_mean.numel()
    rows = 2 + len(noise_calls)
    x = torch.zeros(rows, d, dtype=torch.float64)
    x[1] = 1.0

    def noise_fn(i, shape):
        z = torch.zeros(shape, dtype=torch.float32)
        z[row_of[i]] = 1.0
        return z

    from velodiff.sampling import run_plan
    out = run_plan(plan, model, initial_state(plan, x), noise_fn=noise_fn).double()
    b = out[0]
    a = out[1] - b
    c = out[2:] - b
    mean = a * start_mean + b
    var = a ** 2 * start_var + (c ** 2).sum(dim=0)
    return mean, var


class ConsistencyModel(ExactModel):
    """The exact latent-consistency model: ``c_skip x + c_out x0_hat`` is the probability-flow ODE solution at
    clean data, f(x) = mu + s (x - alpha mu)/sqrt(alpha^2 s^2 + sigma^2), with LCM's boundary scalings
    c_skip = sd^2/((k t)^2 + sd^2), c_out = k t/sqrt((k t)^2 + sd^2) (sigma_data sd = 0.5, timestep_scaling
    k = 10, diffusers' LCMScheduler). Returns the output of ``prediction_type`` that encodes that x0_hat.
    """

    def __init__(self, data: GaussianData, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__(data, schedule, prediction_type, "vp")
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def __call__(self, x_in: torch.Tensor, t: float) -> torch.Tensor:
        self.timesteps.append(float(t))
        alpha, sigma = self.alpha_sigma(t)
        u = self.timestep_scaling * float(t)
        c_skip = self.sigma_data ** 2 / (u * u + self.sigma_data ** 2)
        c_out = u / math.sqrt(u * u + self.sigma_data ** 2)
        x = x_in.double()
        target = self.data.flow(x, alpha, sigma, 1.0, 0.0)
        x0_hat = (target - c_skip * x) / c_out
        eps_hat = (x - alpha * x0_hat) / sigma
        out = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": alpha * eps_hat - sigma * x0_hat}
        return out[self.prediction_type].to(self.out_dtype)


class Float64Update:
    """An ``update_fn`` for :func:`run_plan` that runs the reference update entirely in float64: the plan's
    float64 coefficients (run_plan passes them rounded to fp32; each row is checked against that) and a float64
    ring buffer of its own (run_plan's buffer is fp32 like the state it was given; it is left untouched).

    For measuring high orders whose asymptotic regime lies below the fp32 round-off floor (~5e-7 RMS with the
    fp32 state, ~3e-9 with a float64 state but fp32 history). The state is float64 after the first call; give
    run_plan an fp32-representable initial state and compute the reference from exactly that.
    """

    def __init__(self, plan, initial_history: Optional[torch.Tensor] = None):
        from velodiff.ops import reference
        self._update = reference.sampler_update
        k = plan.history_slots
        self.rows = torch.tensor([c.folded().row(k, 1.0, 1.0) for c in plan.calls], dtype=torch.float64)
        self.history = None if initial_history is None else initial_history.to(torch.float64).clone()
        self.calls = 0

    def __call__(self, x, cond, uncond, anchor, noise, history, coef, write_slot=-1, guidance_rescale=0.0,
                 want_y=False):
        row = self.rows[self.calls]
        self.calls += 1
        if not torch.equal(row.to(torch.float32), coef.to(torch.float32)):
            raise AssertionError("run_plan passed a coefficient row that is not the plan's row rounded to fp32")
        if history is not None and self.history is None:
            self.history = torch.zeros(history.shape, dtype=torch.float64)
        return self._update(x, cond, uncond, anchor, noise, self.history, row, write_slot=write_slot,
                            guidance_rescale=guidance_rescale, want_y=want_y, compute_dtype=torch.float64)


def grid_schedule(kind: str, num_train_timesteps: int = 2049, prediction_type: str = "epsilon",
                  reference: Optional[NoiseSchedule] = None) -> NoiseSchedule:
    """A training table whose steps are uniform in ``kind`` ('lambda' or 'varsigma'), between the extremes of
    ``reference`` (default NoiseSchedule.sd()): index 0 is the least noisy point.

    For samplers that only step through the discrete table (ddim, ghvb, bdia: no ``sigmas=`` option): with
    ``spacing='leading'`` and ``steps_offset = (T - 1) // N`` their N steps go exactly through table indices
    (T-1, T-1-s, .., s) and then to index 0, i.e. a uniform grid of N steps, when N divides T - 1.
    """
    ref = reference if reference is not None else NoiseSchedule.sd()
    vs = ref.karras_sigmas_all
    lo, hi = float(vs.min()), float(vs.max())
    if kind == "lambda":
        grid = np.exp(np.linspace(math.log(lo), math.log(hi), num_train_timesteps))
    elif kind == "varsigma":
        grid = np.linspace(lo, hi, num_train_timesteps)
    else:
        raise ValueError(f"kind must be 'lambda' or 'varsigma', got {kind!r}")
    return NoiseSchedule(1.0 / (1.0 + grid ** 2), prediction_type)


def table_grid_options(schedule: NoiseSchedule, num_steps: int) -> dict:
    """The DDIM-style builder options that step through the table of :func:`grid_schedule` uniformly."""
    t = schedule.num_train_timesteps
    if (t - 1) % num_steps:
        raise ValueError(f"N = {num_steps} does not divide T - 1 = {t - 1}")
    return dict(spacing="leading", steps_offset=(t - 1) // num_steps)


class FlowMapModel(ExactModel):
    """A flow-matching model whose clean-data estimate ``x - s u`` is the ODE solution at clean data (what a
    few-step distilled flow model approximates), rather than the posterior mean: ``u = (x - f(x)) / s``."""

    def __init__(self, data: GaussianData, out_dtype: torch.dtype = torch.float32):
        super().__init__(data, None, "flow", "flow", out_dtype)

    def __call__(self, x_in: torch.Tensor, t: float) -> torch.Tensor:
        self.timesteps.append(float(t))
        alpha, sigma = self.alpha_sigma(t)
        x = x_in.double()
        return ((x - self.data.flow(x, alpha, sigma, 1.0, 0.0)) / sigma).to(self.out_dtype)
