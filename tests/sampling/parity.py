"""Step-by-step parity of a velodiff sampler plan against a diffusers scheduler on the same model outputs."""
from __future__ import annotations

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
    x = x_init * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        m = model(x_in, float(t))
        x = scheduler.step(m, t, x, generator=gen).prev_sample
        out.append(x.clone())
    return [float(t) for t in scheduler.timesteps], out


def velodiff_trajectory(plan, x_init: torch.Tensor, model=dummy_model, seed: int = 0):
    """Run velodiff's plan on the same model; return (timesteps, samples after each call)."""
    samples = []
    gen = torch.Generator().manual_seed(seed)
    run_plan(plan, model, x_init * plan.init_noise_scale, generator=gen,
             callback=lambda i, call, x: samples.append(x.clone()))
    return plan.timesteps, samples
