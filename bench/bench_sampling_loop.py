"""Sampler overhead of a whole denoising loop: velodiff's plan + fused update vs diffusers' scheduler loop.

The "model" returns precomputed outputs (cond, uncond) so that only the sampler's own work is timed: CFG combine,
conversion, the multistep update, the scheduler's bookkeeping. 20 steps, SD 1.5 latents. The outputs are in the
dtype a pipeline runs there: fp32 on the CPU, fp16 on CUDA (``--dtype`` overrides). Both loops are timed
interleaved with bench/common.py's ``compare``; the ratio is taken per round, median (min-max) over the rounds.
Ratios > 1 mean velodiff's loop is faster. Usage:
  python bench/bench_sampling_loop.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--steps 20] [--rounds 10]
                                      [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

from velodiff.sampling import NoiseSchedule, build_plan, run_plan  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def diffusers_schedulers():
    import diffusers as d
    return {
        "ddim": (lambda: d.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False), {}),
        "euler": (lambda: d.EulerDiscreteScheduler(**SD), {}),
        "dpmpp_2m": (lambda: d.DPMSolverMultistepScheduler(**SD), {}),
        "unipc": (lambda: d.UniPCMultistepScheduler(**SD), {}),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="model-output dtype (default: fp32 on the CPU, fp16 on CUDA)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev, n, w = args.device, args.steps, 7.5
    dtype_name = args.dtype or ("fp16" if dev.startswith("cuda") else "fp32")
    out_dtype = DTYPES[dtype_name]
    load_start = load_average()
    shape = (args.batch, 4, 64, 64)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(shape, generator=g).to(out_dtype).to(dev)
    uncond = torch.randn(shape, generator=g).to(out_dtype).to(dev)
    x_init = torch.randn(shape, generator=g).to(dev)
    try:
        schedulers = diffusers_schedulers()
    except ImportError:
        print("bench_sampling_loop: diffusers is not installed; it is the baseline, so nothing to measure "
              "(on a machine without network, carry its wheel in .whl/, see bench/gpu_suite.sh)")
        return
    rows, timings = [], {}
    for name, (make, _) in schedulers.items():
        plan = build_plan(name, NoiseSchedule.sd(), n)
        table = plan.coefficient_table(w, 1.0, device=dev)

        def ours():
            return run_plan(plan, lambda x, t: (cond, uncond), x_init * plan.init_noise_scale, guidance_scale=w,
                            table=table)

        sched = make()

        def theirs():
            sched.set_timesteps(n, device=dev)
            x = x_init * sched.init_noise_sigma
            for t in sched.timesteps:
                x_in = sched.scale_model_input(x, t)  # noqa: F841  (a pipeline does this every step)
                eps = uncond + w * (cond - uncond)
                x = sched.step(eps, t, x).prev_sample
            return x

        res = compare({"velodiff": ours, "diffusers": theirs}, "diffusers", rounds=args.rounds, warmup=3,
                      device=dev)
        timings[name] = res.to_json()
        row = {"sampler": name, "steps": n, "velodiff_ms": res.stats("velodiff", 1e3),
               "diffusers_ms": res.stats("diffusers", 1e3), "diffusers/velodiff": res.ratio("velodiff")}
        rows.append(row)
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
    load_end = load_average()
    summary = summarise_ratios({r["sampler"]: r["diffusers/velodiff"]["median"] for r in rows})
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    path = write_results(f"sampling_loop_{tag}", rows,
                         ["sampler", "steps", "velodiff_ms", "diffusers_ms", "diffusers/velodiff"], args.out,
                         note=f"Whole {n}-step loop with CFG 7.5 on {shape} latents, model outputs precomputed "
                              f"({dtype_name}), so only sampler work is timed. Each cell is median (min-max) over "
                              f"{args.rounds} interleaved rounds; every timing spans >= 50 ms of back-to-back "
                              "loops. diffusers/velodiff: diffusers' time / velodiff's within each round, then "
                              f"median (min-max) over the rounds. Summary over rows: {summary['sentence']}.",
                         extra={"load_start": load_start, "load_end": load_end, "rounds": args.rounds,
                                "threads": args.threads,
                                "model_output_dtype": dtype_name, "summary": summary, "timing": timings})
    print(summary["sentence"])
    print("wrote", path)


if __name__ == "__main__":
    main()
