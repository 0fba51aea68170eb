"""Step-by-step parity of a velodiff sampler plan against a diffusers scheduler on the same model outputs."""
from __future__ import annotations

import inspect
import math

import torch

from velodiff.sampling import run_plan


def dummy_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth, nonlinear, timestep-dependent stand-in for a denoiser (fp32 in, fp32 out)."""
    return torch.tanh(x) * math.cos(float(t) / 400.0) + 0.1 * x + 0.05 * math.sin(float(t) / 97.0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def diffusers_trajectory(scheduler, num_steps: int, x_init: torch.Tensor, model=dummy_model, seed: int = 0,
                         **set_timesteps_kwargs):
    """Run diffusers' loop; return (timesteps, samples after each step). x_init is unit Gaussian noise."""
    scheduler.set_timesteps(num_steps, **set_timesteps_kwargs)
    x = x_init * getattr(scheduler, "init_noise_sigma", 1.0)
    gen = torch.Generator().manual_seed(seed)
    # Not every scheduler takes a generator (Heun, UniPC) or scales its input (flow matching).
    step_kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    out = []
    for t in scheduler.timesteps:
        m = model(scale(x, t), float(t))
        x = scheduler.step(m, t, x, **step_kwargs).prev_sample
        out.append(x.clone())
    return [float(t) for t in scheduler.timesteps], out


def velodiff_trajectory(plan, x_init: torch.Tensor, model=dummy_model, seed: int = 0):
    """Run velodiff's plan on the same model; return (timesteps, samples after each call)."""
    samples = []
    gen = torch.Generator().manual_seed(seed)
    run_plan(plan, model, x_init * plan.init_noise_scale, generator=gen,
             callback=lambda i, call, x: samples.append(x.clone()))
    return plan.timesteps, samples
