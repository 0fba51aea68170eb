"""HiDiffusion's speed on a full-size SD 1.5 UNet at 1024x1024 (random weights) on this machine (issue 13).

One denoising step (a 1-step plan through the pipeline's loop, so the technique sees its step), batch 1 without
CFG (CFG doubles every configuration alike), fp32, 128x128 latents, random text embeddings, the default attention
backend ("auto": velodiff's attention op on the CPU). Four configurations, timed in interleaved rounds (each round
runs all four, the order rotating):

  plain        the UNet as trained (global self-attention over 16384 tokens on level 0)
  plain (sdpa) the same with torch's SDPA for every attention layer (what the default was before)
  raunet+msw   hidiffusion:fraction=1.0 (the first steps of a run: RAU-Net's dilated downsampler puts levels 1-3 at
               the trained 64x64 latent's sizes, MSW-MSA windows level 0's self-attention 2x2)
  msw only     hidiffusion:fraction=0.0 (the remaining steps: MSW-MSA alone)

A run of n steps at the reference's fraction 0.4 spends 0.4 n steps in the first and 0.6 n in the second
configuration, so its ratio over plain is t_plain / (0.4 t_raunet+msw + 0.6 t_msw) (reported), as well as each
configuration's own ratio.

  python bench/bench_hidiffusion_sd15.py [--rounds 3] [--size 1024] [--out bench/results]
Writes <out>/hidiffusion_sd15_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, write_results  # noqa: E402

import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.accel import parse_technique  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(os.path.dirname(HERE), "python", "velodiff", "data", "digits")
CONFIGS = {"plain": None, "plain (sdpa)": "attention_backend:backend=sdpa", "raunet+msw": "hidiffusion:fraction=1.0",
           "msw only": "hidiffusion:fraction=0.0"}
FRACTION = 0.4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration first (default 1)")
    ap.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("bench_hidiffusion_sd15.py: --rounds: must be at least 1", file=sys.stderr)
        sys.exit(2)
    if args.size < 64 or args.size % 64:
        print("bench_hidiffusion_sd15.py: --size: must be a multiple of 64", file=sys.stderr)
        sys.exit(2)
    from diffusers import UNet2DConditionModel as DUNet

    from bench_unet import SD15, share_weights
    from velodiff.pipelines.stable_diffusion import StableDiffusionPipeline
    with open(os.path.join(DIGITS, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    torch.manual_seed(0)
    unet = share_weights(DUNet(**SD15).eval())
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    pipes = {}
    for name, spec in CONFIGS.items():
        pipe = StableDiffusionPipeline({"unet": unet, "scheduler": scheduler}, torch.float32, "cpu")
        pipe.set_progress_bar_config(disable=True)
        if spec:
            vd.optimize(pipe, parse_technique(spec))
        pipes[name] = pipe

    def step(pipe):
        plan = pipe.make_plan("ddim", 1)
        return pipe.run_denoising(plan, pipe.unet_fn(cond, None), latents, None, None)

    names = list(CONFIGS)
    times = {n: [] for n in names}
    load_before = load_average()
    with torch.inference_mode():
        for _ in range(max(0, args.warmup)):  # untimed
            for name in names:
                step(pipes[name])
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                step(pipes[name])
                times[name].append(time.perf_counter() - t0)
                print(f"round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    run_ratio = med["plain"] / (FRACTION * med["raunet+msw"] + (1 - FRACTION) * med["msw only"])
    rows = [{"config": n, "spec": CONFIGS[n] or "-", "median_s": med[n], "min_s": min(times[n]),
             "max_s": max(times[n]), "speedup": med["plain"] / med[n], "x_plain_sdpa": med["plain (sdpa)"] / med[n]}
            for n in names]
    rows.append({"config": f"run at fraction {FRACTION}", "spec": "hidiffusion", "median_s":
                 FRACTION * med["raunet+msw"] + (1 - FRACTION) * med["msw only"], "min_s": None, "max_s": None,
                 "speedup": run_ratio,
                 "x_plain_sdpa": med["plain (sdpa)"] / (FRACTION * med["raunet+msw"] + (1 - FRACTION) * med["msw only"])})
    note = (f"SD 1.5 UNet (diffusers init, seed 0), {args.size}x{args.size} px, one step, batch 1, fp32, default "
            f"attention backend (auto: velodiff's op); {args.rounds} interleaved rounds, medians; speedup: over "
            f"plain, x_plain_sdpa: over plain with SDPA; load before {load_before}, after {load_average()}.")
    write_results("hidiffusion_sd15_cpu", rows,
                  ["config", "spec", "median_s", "min_s", "max_s", "speedup", "x_plain_sdpa"],
                  args.out, note=note)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
