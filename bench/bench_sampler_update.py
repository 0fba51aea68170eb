"""Fused sampler update vs the unfused PyTorch sequence and vs diffusers' scheduler step.

One DPM-Solver++(2M) step with classifier-free guidance on SD 1.5 / SDXL latents: CFG combine, epsilon -> x0
conversion, the second-order multistep update and the history write. The model outputs are in the dtype a
pipeline runs there: fp32 on the CPU (no CPU pipeline runs fp16), fp16 on CUDA (``--dtype`` overrides).
  fused      velodiff::sampler_update, one pass
  unfused    the same arithmetic as separate torch ops (what a scheduler does)
  diffusers  guidance combine + DPMSolverMultistepScheduler.step (when diffusers is installed)
All three are timed interleaved with bench/common.py's ``compare`` (rounds, rotated order); ratios against the
fused time are taken per round and given as median (min-max) over the rounds. Usage:
  python bench/bench_sampler_update.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--rounds 10]
                                       [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

from velodiff.ops import reference as ref  # noqa: E402
from velodiff.ops import sampler_update  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="model-output dtype (default: fp32 on the CPU, fp16 on CUDA)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    dtype_name = args.dtype or ("fp16" if dev.startswith("cuda") else "fp32")
    out_dtype = DTYPES[dtype_name]
    load_start = load_average()
    alpha_s, sigma_s, alpha_t, sigma_t = 0.6, 0.8, 0.7, math.sqrt(1 - 0.49)
    h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
    r, w = 0.9, 7.5
    coef = coefficients(alpha_s, sigma_s, alpha_t, sigma_t, h, r, w).to(dev)
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        DPMSolverMultistepScheduler = None
    rows, timings = [], {}
    for name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dev)
        out = torch.randn((2,) + shape, generator=g).to(out_dtype).to(dev)
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

        candidates = {"fused": fused, "unfused": unfused}
        if DPMSolverMultistepScheduler is not None:
            sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            sched.set_timesteps(20, device=dev)
            t = sched.timesteps[5]

            def diffusers_step():
                eps = uncond + w * (cond - uncond)
                sched._step_index = 5
                return sched.step(eps, t, x).prev_sample

            candidates["diffusers"] = diffusers_step
        res = compare(candidates, "fused", rounds=args.rounds, warmup=3, device=dev)
        timings[name] = res.to_json()
        row = {"shape": name, "elements": x.numel(), "fused_us": res.stats("fused", 1e6),
               "unfused_us": res.stats("unfused", 1e6), "unfused/fused": res.ratio("fused", over="unfused")}
        if "diffusers" in candidates:
            row["diffusers_us"] = res.stats("diffusers", 1e6)
            row["diffusers/fused"] = res.ratio("fused", over="diffusers")
        rows.append(row)
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
    load_end = load_average()
    summary = {"unfused/fused": summarise_ratios({r["shape"]: r["unfused/fused"]["median"] for r in rows})}
    if all("diffusers/fused" in r for r in rows):
        summary["diffusers/fused"] = summarise_ratios({r["shape"]: r["diffusers/fused"]["median"] for r in rows})
    sentences = " ".join(f"{k}: {v['sentence']}." for k, v in summary.items())
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    path = write_results(f"sampler_update_{tag}", rows,
                         ["shape", "elements", "fused_us", "unfused_us", "unfused/fused", "diffusers_us",
                          "diffusers/fused"], args.out,
                         note=f"One DPM-Solver++(2M) step with CFG ({dtype_name} model outputs, fp32 state). Each "
                              f"cell is median (min-max) over {args.rounds} interleaved rounds; every timing spans "
                              ">= 50 ms of back-to-back calls. Ratios: the other's time / fused time within each "
                              "round, then median (min-max) over the rounds; > 1 means the fused kernel is "
                              f"faster. Summary over rows: {sentences}",
                         extra={"load_start": load_start, "load_end": load_end, "rounds": args.rounds,
                                "threads": args.threads,
                                "model_output_dtype": dtype_name, "summary": summary, "timing": timings})
    print(sentences)
    print("wrote", path)


if __name__ == "__main__":
    main()
