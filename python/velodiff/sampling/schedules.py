"""Noise schedules, timestep spacings and sigma discretisations, in float64 numpy.

Conventions (shared reference notes, section 0): discrete training schedule with ``T`` steps,
``alphas_cumprod[i] = prod_{k<=i} (1 - beta_k)``; ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``
(VP); the VE / Karras sigma ``varsigma_t = sigma_t / alpha_t`` (diffusers' ``scheduler.sigmas``); half
log-SNR ``lambda_t = log alpha_t - log sigma_t``. Flow-matching models use ``x_s = (1 - s) x0 + s eps``,
i.e. alpha = 1 - s, sigma = s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Training betas [T] float64, as diffusers builds them."""
    t = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, t, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008; betas capped at 0.999.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / t) / abar(i / t), 0.999) for i in range(t)], dtype=np.float64)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2305.08891, Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP training schedule (``alphas_cumprod``) and the model's prediction type."""

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def from_config(cls, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                    beta_start: float = 0.00085, beta_end: float = 0.012, prediction_type: str = "epsilon",
                    rescale_betas_zero_snr: bool = False) -> "NoiseSchedule":
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(np.cumprod(1.0 - betas), prediction_type)

    @classmethod
    def sd(cls, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """Stable Diffusion 1.x / 2.x / XL: scaled_linear 0.00085 .. 0.012, T = 1000."""
        return cls.from_config("scaled_linear", 1000, 0.00085, 0.012, prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # --- per discrete (integer) timestep ---
    def alpha(self, t) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod[np.asarray(t, dtype=np.int64)])

    def sigma(self, t) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod[np.asarray(t, dtype=np.int64)])

    @property
    def karras_sigmas_all(self) -> np.ndarray:
        """varsigma_t = sigma_t / alpha_t for every training step [T] (diffusers ``scheduler.sigmas`` before
        spacing)."""
        ab = self.alphas_cumprod
        return np.sqrt((1.0 - ab) / ab)

    def sigma_to_t(self, varsigma) -> np.ndarray:
        """Fractional timestep of a VE sigma by linear interpolation in log-sigma (diffusers ``_sigma_to_t``)."""
        log_sigmas = np.log(self.karras_sigmas_all)
        s = np.atleast_1d(np.asarray(varsigma, dtype=np.float64))
        log_s = np.log(np.maximum(s, 1e-10))
        dists = log_s[:, None] - log_sigmas[None, :]
        low = np.clip(np.cumsum(dists >= 0, axis=1).argmax(axis=1), 0, len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = np.clip((lo - log_s) / (lo - hi), 0, 1)
        return (1 - w) * low + w * high


# --- timestep spacings (diffusers; table 2 of Lin et al. 2305.08891) ---

# --- how many steps a spacing can give ---

#: The most steps any plan is built for, whatever the discretisation (continuous ones, e.g. Euler's fractional
#: ``linspace`` timesteps, Karras sigmas or flow sigmas, have no other limit). Every step is at least one model
#: evaluation and one precomputed coefficient row; DDPM's 1000 is the most any published sampler uses. It keeps
#: a typo (``num_inference_steps=10**9``) from building a plan for hours; raise it here if you truly need more.
MAX_NUM_STEPS = 10_000
SPACINGS = ("linspace", "leading", "trailing")
#: ``ddim``: N timesteps (diffusers' DDIM / DDPM / Euler leading and trailing); ``multistep``: N + 1 grid points
#: of which the last is dropped (DPM-Solver, UniPC); ``euler``: as ``ddim`` but ``linspace`` is fractional.
TIMESTEP_KINDS = ("ddim", "multistep", "euler")


def _check_spacing(spacing) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be linspace|leading|trailing, got {spacing!r}")


def spaced_steps_limit(kind: str, num_train_timesteps: int, spacing: str, steps_offset: int = 0) -> Tuple[int, str]:
    """(N_max, why): the largest N such that every count 1..N gets N distinct timesteps in [0, T) from
    ``spacing`` (T = ``num_train_timesteps``), at most :data:`MAX_NUM_STEPS`; ``why`` says what sets it.

    Closed forms (diffusers' spacings, checked count by count against diffusers' schedulers in
    tests/sampling/test_step_limits.py): ``linspace`` rounds N points of [0, T-1] (``ddim``: N <= T) or N + 1
    points (``multistep``: N <= T - 1; ``euler`` keeps them fractional: no limit); ``trailing`` takes
    round(T - k T/N) - 1, k < N (N <= T); ``leading`` takes k * stride + steps_offset with stride T // N
    (``ddim``, ``euler``, k < N) or T // (N + 1) (``multistep``, k = 1..N), so it needs stride >= 1 and the
    largest timestep (N - 1) * stride + steps_offset (resp. N * stride + steps_offset) <= T - 1.
    """
    if kind not in TIMESTEP_KINDS:
        raise ValueError(f"kind must be one of {TIMESTEP_KINDS}, got {kind!r}")
    _check_spacing(spacing)
    t = int(num_train_timesteps)
    cap = (MAX_NUM_STEPS, f"velodiff.sampling.schedules.MAX_NUM_STEPS = {MAX_NUM_STEPS}")
    if spacing == "linspace":
        if kind == "euler":
            return cap
        n_max = t if kind == "ddim" else t - 1
        why = (f"'linspace' spacing rounds {'N' if kind == 'ddim' else 'N + 1'} points of [0, {t - 1}], which "
               f"are distinct up to N = {n_max}")
    elif spacing == "trailing":
        n_max, why = t, f"'trailing' spacing has {t} distinct timesteps in a {t}-step training schedule"
    else:
        n = np.arange(1, t + 1, dtype=np.int64)
        if kind == "multistep":
            stride = t // (n + 1)
            top = n * stride + steps_offset
        else:
            stride = t // n
            top = (n - 1) * stride + steps_offset
        ok = (stride >= 1) & (top <= t - 1) & (steps_offset >= 0)
        n_max = int(np.argmin(ok)) if not ok.all() else t  # the first failing count - 1
        why = (f"'leading' spacing with steps_offset={steps_offset} puts the largest timestep past {t - 1} "
               f"(or repeats timesteps) beyond N = {n_max}")
    return (n_max, why) if n_max <= MAX_NUM_STEPS else cap


def check_steps_limit(num_steps: int, limit: Tuple[int, str], what: str = "this schedule") -> int:
    """``num_steps`` if it is at most ``limit[0]`` (from :func:`spaced_steps_limit`); otherwise a ValueError
    naming ``num_inference_steps``, the maximum and why."""
    n_max, why = limit
    if num_steps > n_max:
        raise ValueError(f"num_inference_steps={num_steps} is too many for {what}: at most {n_max} ({why})")
    return num_steps


def trailing_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' ``trailing`` timesteps round(T - k T/N) - 1, k = 0..N-1, float64 [N] descending.

    diffusers computes them as ``np.arange(T, 0, -T/N).round() - 1``; for N = 61, 103, 121, ... (62 counts up to
    T = 1000) the floating-point step makes that arange one element longer, its last timestep -1 (which then
    indexes the end of the schedule: a step back to noise). velodiff keeps the first N of the same arange (the same
    floating-point values, so the same rounding as diffusers)."""
    t, n = num_train_timesteps, num_steps
    return np.round(np.arange(t, 0, -t / n)[:n]) - 1


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """Discrete timesteps of diffusers' DDIM/DDPM/LCM-style schedulers (descending), int64 [num_steps].
    ValueError naming ``num_inference_steps`` beyond :func:`spaced_steps_limit` ("ddim")."""
    t, n = num_train_timesteps, check_num_steps(num_steps)
    check_steps_limit(n, spaced_steps_limit("ddim", t, spacing, steps_offset))
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n).round()[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (t // n)).round()[::-1].copy() + steps_offset
    else:  # trailing
        ts = trailing_timesteps(n, t)
    return ts.astype(np.int64)


def multistep_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                        steps_offset: int = 0) -> np.ndarray:
    """Discrete timesteps of diffusers' DPM-Solver / UniPC / Euler schedulers (descending) [num_steps].
    ValueError naming ``num_inference_steps`` beyond :func:`spaced_steps_limit` ("multistep")."""
    t, n = num_train_timesteps, check_num_steps(num_steps)
    check_steps_limit(n, spaced_steps_limit("multistep", t, spacing, steps_offset))
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n + 1).round()[::-1][:-1].copy()
    elif spacing == "leading":
        step_ratio = t // (n + 1)
        ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy() + steps_offset
    else:  # trailing
        ts = trailing_timesteps(n, t)
    return ts.astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: [num_steps] descending VE sigmas, no trailing zero."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Log-uniform VE sigmas, descending [num_steps]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3-style timestep shift: s' = shift*s / (1 + (shift - 1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Flux dynamic shift: s' = e^mu / (e^mu + (1/s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


# --- conversions of a model output to the data prediction ---

def data_prediction_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple:
    """(p_x, p_m) with x0_hat = p_x * x + p_m * model_output for a VP state x = alpha*x0 + sigma*eps.

    epsilon: x0 = (x - sigma*eps)/alpha; v (v = alpha*eps - sigma*x0): x0 = alpha*x - sigma*v when
    alpha^2 + sigma^2 = 1; sample: x0 = m; flow (v = eps - x0, alpha = 1 - sigma): x0 = x - sigma*v.
    """
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow":
        return 1.0, -sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def noise_prediction_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple:
    """(p_x, p_m) with eps_hat = p_x * x + p_m * model_output for a VP state x = alpha*x0 + sigma*eps."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    if prediction_type == "flow":
        return 1.0, 1.0 - sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def half_log_snr(alpha: float, sigma: float) -> float:
    return math.log(alpha) - math.log(sigma)


def check_num_steps(num_steps: Optional[int]) -> int:
    """``num_steps`` as an int in [1, :data:`MAX_NUM_STEPS`]; ValueError naming ``num_inference_steps``."""
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    return check_steps_limit(int(num_steps), (MAX_NUM_STEPS, f"velodiff.sampling.schedules.MAX_NUM_STEPS"),
                             "any sampler")


# --- discretisations: the points a sampler steps through ---

@dataclass(frozen=True)
class Points:
    """N model evaluations and N+1 points of the VP path x = alpha*x0 + sigma*eps.

    ``timesteps[i]`` is what the model is given at point i; ``alpha[N], sigma[N]`` is where sampling ends
    (sigma = 0: clean data). All float64.
    """

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def varsigma(self) -> np.ndarray:
        """VE sigma sigma/alpha at each point (0 at a clean end)."""
        return self.sigma / self.alpha

    @property
    def lambdas(self) -> np.ndarray:
        """Half log-SNR log(alpha/sigma); +inf at a clean end."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)


def points_from_varsigmas(varsigmas, timesteps) -> Points:
    """Points from VE sigmas [N+1] (descending, last may be 0) and model timesteps [N] (VP models)."""
    s = np.asarray(varsigmas, dtype=np.float64)
    alpha = 1.0 / np.sqrt(s ** 2 + 1.0)
    return Points(np.asarray(timesteps, dtype=np.float64), alpha, s * alpha)


def final_sigma_value(final_sigma: str, training_varsigmas: np.ndarray) -> float:
    """Where sampling ends: ``zero`` (clean data) or ``sigma_min`` (the training schedule's sigma at t = 0)."""
    if final_sigma == "zero":
        return 0.0
    if final_sigma == "sigma_min":
        return float(training_varsigmas[0])
    raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")


def discretize(schedule: NoiseSchedule, num_steps: int, *, spacing: str = "linspace", steps_offset: int = 0,
               sigma_schedule: str = "default", final_sigma: str = "zero", sigmas=None,
               round_timesteps: bool = True) -> Points:
    """The points of diffusers' multistep schedulers (DPM-Solver, UniPC, Euler, Heun) for a VP schedule.

    Args:
        spacing: ``linspace`` | ``leading`` | ``trailing`` (diffusers ``timestep_spacing``), for the default
            sigma schedule.
        sigma_schedule: ``default`` (the training sigmas at the spaced timesteps), ``karras`` (Karras et al.
            eq. 5, rho = 7) or ``exponential`` (log-uniform), the latter two between the training
            schedule's smallest and largest sigma, with timesteps interpolated in log-sigma.
        final_sigma: ``zero`` (end on clean data) or ``sigma_min`` (end at the sigma of t = 0).
        sigmas: explicit descending VE sigmas [N+1] including the end point; overrides the above.
        round_timesteps: round interpolated timesteps to integers as diffusers does (karras/exponential).
    """
    all_s = schedule.karras_sigmas_all
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim != 1 or len(s) < 2 or np.any(np.diff(s) >= 0) or s[-1] < 0:
            raise ValueError("sigmas must be a strictly descending 1-D sequence of >= 2 values ending >= 0")
        return points_from_varsigmas(s, schedule.sigma_to_t(s[:-1]))
    n = check_num_steps(num_steps)
    end = final_sigma_value(final_sigma, all_s)
    if sigma_schedule == "default":
        ts = multistep_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset)
        s = all_s[ts]
        timesteps = ts.astype(np.float64)
    elif sigma_schedule in ("karras", "exponential"):
        make = karras_sigmas if sigma_schedule == "karras" else exponential_sigmas
        s = make(float(all_s[0]), float(all_s[-1]), n)
        timesteps = schedule.sigma_to_t(s)
        if round_timesteps:
            timesteps = np.round(timesteps)
    else:
        raise ValueError(f"sigma_schedule must be default|karras|exponential, got {sigma_schedule!r}")
    return points_from_varsigmas(np.append(s, end), timesteps)


# --- Euler / Heun discretisation (diffusers EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete) ---

def euler_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                    steps_offset: int = 0) -> np.ndarray:
    """Timesteps of diffusers' Euler/Heun schedulers (descending) [num_steps], float64.

    Unlike :func:`multistep_timesteps`, ``linspace`` here takes N points of [0, T-1] *without* rounding
    (fractional timesteps, e.g. 999, 888, ... for N = 10), and ``leading`` uses the stride T // N.
    """
    t, n = num_train_timesteps, check_num_steps(num_steps)
    check_steps_limit(n, spaced_steps_limit("euler", t, spacing, steps_offset))
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (t // n)).round()[::-1].astype(np.float64) + steps_offset
    else:  # trailing
        ts = trailing_timesteps(n, t)
    return ts.astype(np.float64)


def euler_discretize(schedule: NoiseSchedule, num_steps: Optional[int], *, spacing: str = "linspace",
                     steps_offset: int = 0, sigma_schedule: str = "default", sigma_min: Optional[float] = None,
                     sigma_max: Optional[float] = None, final_sigma: str = "zero", sigmas=None) -> Points:
    """The points of diffusers' Euler / Euler-ancestral / Heun schedulers for a VP schedule.

    ``default``: the VE sigmas interpolated linearly (in sigma, not log-sigma) at the possibly fractional
    :func:`euler_timesteps`. ``karras`` / ``exponential``: N sigmas between ``sigma_min`` and ``sigma_max``,
    which default to the interpolated sigmas at the *last and first spaced timesteps* (so they depend on
    ``spacing``, as in diffusers), with unrounded timesteps from log-sigma interpolation. ``final_sigma``:
    ``zero`` or ``sigma_min`` (the training sigma at t = 0). ``sigmas``: explicit descending VE sigmas [N+1]
    including the end point; overrides everything else.
    """
    if sigmas is not None:
        return discretize(schedule, num_steps, sigmas=sigmas)
    n = check_num_steps(num_steps)
    all_s = schedule.karras_sigmas_all
    ts = euler_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset)
    s = np.interp(ts, np.arange(len(all_s), dtype=np.float64), all_s)
    if sigma_schedule in ("karras", "exponential"):
        lo = float(s[-1]) if sigma_min is None else float(sigma_min)
        hi = float(s[0]) if sigma_max is None else float(sigma_max)
        if not 0 < lo <= hi:
            raise ValueError(f"sigma_min ({lo}) and sigma_max ({hi}) must satisfy 0 < sigma_min <= sigma_max")
        s = (karras_sigmas if sigma_schedule == "karras" else exponential_sigmas)(lo, hi, n)
        ts = schedule.sigma_to_t(s)
    elif sigma_schedule != "default":
        raise ValueError(f"sigma_schedule must be default|karras|exponential, got {sigma_schedule!r}")
    end = final_sigma_value(final_sigma, all_s)
    return points_from_varsigmas(np.append(s, end), ts)


# --- flow matching (SD3, Flux, rectified flow): x_s = (1 - s) x0 + s eps, s in [0, 1] ---

FLOW_SPACINGS = ("pipeline", "scheduler")


def flow_dynamic_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the number of latent tokens (diffusers
    ``calculate_shift``), ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching noise schedule in the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    The path is ``x_s = (1 - s) x0 + s eps`` (alpha = 1 - s, sigma = s); the model is given ``s * T``
    (``T = num_train_timesteps``). Sigmas are built as: N base sigmas (:meth:`base_sigmas`), then the shift
    (static ``shift``: ``shift*s / (1 + (shift-1)*s)``, SD3; or, with ``use_dynamic_shifting``, a
    resolution-dependent ``mu``, Flux: ``e^mu / (e^mu + 1/s - 1)`` or, ``time_shift_type='linear'``,
    ``mu / (mu + 1/s - 1)``), then the optional terminal stretch (``shift_terminal``), then an optional
    Karras / exponential re-spacing between the shifted end points, and a final 0.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: Optional[float] = None

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")
        if int(self.num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def shifted(self, s, mu: Optional[float] = None) -> np.ndarray:
        """Apply the static or dynamic shift to flow sigmas ``s`` in (0, 1]."""
        s = np.asarray(s, dtype=np.float64)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be given when use_dynamic_shifting is set (see flow_dynamic_mu)")
            if self.time_shift_type == "exponential":
                return flux_time_shift(mu, s)
            return mu / (mu + (1 / s - 1))
        return flow_shift(s, self.shift)

    def base_sigmas(self, num_steps: int, spacing: str = "pipeline") -> np.ndarray:
        """The N unshifted sigmas, descending from 1.

        ``pipeline``: ``linspace(1, 1/N, N)``, what the Flux (and most flow) pipelines pass to the scheduler;
        this is also the rectified-flow / InstaFlow grid ``1 - k/N``. ``scheduler``: the scheduler's own
        default when no sigmas are passed (SD3 pipeline): ``linspace(1, s_min, N)`` with ``s_min`` the
        *shifted* 1/T under a static shift (so the static shift is applied to that end point twice, as in
        diffusers) and 1/T under dynamic shifting.
        """
        n = check_num_steps(num_steps)
        if spacing == "pipeline":
            return np.linspace(1.0, 1.0 / n, n)
        if spacing == "scheduler":
            lo = 1.0 / self.num_train_timesteps
            if not self.use_dynamic_shifting:
                lo = float(flow_shift(np.float64(lo), self.shift))
            return np.linspace(1.0, lo, n)
        raise ValueError(f"spacing must be one of {FLOW_SPACINGS}, got {spacing!r}")

    def sigmas(self, num_steps: int, *, spacing: str = "pipeline", mu: Optional[float] = None,
               sigma_schedule: str = "default") -> np.ndarray:
        """[N+1] descending flow sigmas ending with 0."""
        s = self.shifted(self.base_sigmas(num_steps, spacing), mu)
        if self.shift_terminal:
            # stretch 1 - s so that the last (smallest) sigma lands exactly on shift_terminal
            one_minus = 1.0 - s
            s = 1.0 - one_minus * ((1.0 - self.shift_terminal) / one_minus[-1])
        if sigma_schedule in ("karras", "exponential"):
            lo, hi = float(s[-1]), float(s[0])
            s = (karras_sigmas if sigma_schedule == "karras" else exponential_sigmas)(lo, hi, len(s))
        elif sigma_schedule != "default":
            raise ValueError(f"sigma_schedule must be default|karras|exponential, got {sigma_schedule!r}")
        return np.append(s, 0.0)

    def timesteps(self, sigmas) -> np.ndarray:
        """The model timesteps ``s * T`` of the first N of [N+1] sigmas."""
        return np.asarray(sigmas, dtype=np.float64)[:-1] * self.num_train_timesteps
