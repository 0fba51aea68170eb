"""Fused sampler update vs the unfused PyTorch sequence and vs diffusers' scheduler step.

One DPM-Solver++(2M) step with classifier-free guidance on SD 1.5 / SDXL latents: CFG combine (fp16 model
output), epsilon -> x0 conversion, the second-order multistep update and the history write.
  fused      velodiff::sampler_update, one pass
  unfused    the same arithmetic as separate torch ops (what a scheduler does)
  diffusers  guidance combine + DPMSolverMultistepScheduler.step (when diffusers is installed)
Ratios are against the fused time measured in the same run. Usage:
  python bench/bench_sampler_update.py [--device cpu|cuda] [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_fn, write_results  # noqa: E402

from velodiff.ops import reference as ref  # noqa: E402
from velodiff.ops import sampler_update  # noqa: E402

SHAPES = {"sd15-b1": (1, 4, 64, 64), "sd15-b4": (4, 4, 64, 64), "sdxl-b1": (1, 4, 128, 128),
          "sdxl-b4": (4, 4, 128, 128)}


def coefficients(alpha_s, sigma_s, alpha_t, sigma_t, h, r, w):
    """DPM-Solver++(2M) midpoint: x_t = (s_t/s_s) x - a_t expm1(-h) [(1 + 1/(2r)) m0 - 1/(2r) m1]."""
    phi = math.expm1(-h)
    coef = torch.zeros(ref.sampler_coef_count(1), dtype=torch.float64)
    coef[ref.COEF_W], coef[ref.COEF_DELTA] = w, 1.0
    coef[ref.COEF_PX], coef[ref.COEF_PM] = 1 / alpha_s, -sigma_s / alpha_s
    coef[ref.COEF_CX] = sigma_t / sigma_s
    coef[ref.COEF_CD] = -alpha_t * phi * (1 + 0.5 / r)
    coef[ref.COEF_HEADER + 1] = alpha_t * phi * 0.5 / r
    return coef.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    dev = args.device
    alpha_s, sigma_s, alpha_t, sigma_t = 0.6, 0.8, 0.7, math.sqrt(1 - 0.49)
    h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
    r, w = 0.9, 7.5
    coef = coefficients(alpha_s, sigma_s, alpha_t, sigma_t, h, r, w).to(dev)
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        DPMSolverMultistepScheduler = None
    rows = []
    for name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dev)
        out = torch.randn((2,) + shape, generator=g).half().to(dev)
        cond, uncond = out[0], out[1]
        hist = torch.randn((1,) + shape, generator=g).to(dev)

        def fused():
            return sampler_update(x, cond, uncond, None, None, hist, coef, write_slot=0)

        def unfused():
            c32, u32 = cond.float(), uncond.float()
            eps = u32 + w * (c32 - u32)
            x0 = (x - sigma_s * eps) / alpha_s
            d1 = (x0 - hist[0]) / r
            phi = math.expm1(-h)
            x_next = (sigma_t / sigma_s) * x - alpha_t * phi * x0 - 0.5 * alpha_t * phi * d1
            hist[0].copy_(x0)
            return x_next

        row = {"shape": name, "elements": x.numel(), "fused_us": time_fn(fused, dev) * 1e6,
               "unfused_us": time_fn(unfused, dev) * 1e6}
        row["unfused/fused"] = row["unfused_us"] / row["fused_us"]
        if DPMSolverMultistepScheduler is not None:
            sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            sched.set_timesteps(20, device=dev)
            t = sched.timesteps[5]

            def diffusers_step():
                eps = uncond + w * (cond - uncond)
                sched._step_index = 5
                return sched.step(eps, t, x).prev_sample

            row["diffusers_us"] = time_fn(diffusers_step, dev) * 1e6
            row["diffusers/fused"] = row["diffusers_us"] / row["fused_us"]
        rows.append(row)
        print(row, flush=True)
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    path = write_results(f"sampler_update_{tag}", rows,
                         ["shape", "elements", "fused_us", "unfused_us", "unfused/fused", "diffusers_us",
                          "diffusers/fused"], args.out,
                         note="One DPM-Solver++(2M) step with CFG (fp16 model output, fp32 state). "
                              "Ratios > 1 mean the fused kernel is faster.")
    print("wrote", path)


if __name__ == "__main__":
    main()
