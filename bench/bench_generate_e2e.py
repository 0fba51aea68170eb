"""End to end on this CPU: one 512x512 image, 20 steps, guidance 7.5, full-size SD 1.5 UNet and VAE with random
weights (issue 14's goal: velodiff at bf16 at least 2x diffusers).

The folder: bench_quantize_full.py's (SD 1.5's real UNet config with diffusers' seeded random init, fp16 file; the
digits model's tokenizer and DPM-Solver++ scheduler; a 2-layer random CLIP text encoder of width 768) with SD's
real VAE config (4 blocks, 128-512 channels, factor 8) in place of the digits VAE. Every engine loads that folder
through its public API and generates from the same initial latents (passed as ``latents=``), so the images differ
only by arithmetic:

  diffusers fp32 / bf16       StableDiffusionPipeline.from_pretrained(folder, torch_dtype=...)
  velodiff fp32 / bf16        vd.Pipeline.from_pretrained(folder, dtype=...) (its CPU default layout)
  velodiff_w8a8 bf16          the same, then vd.quant.quantize(pipe, W8A8()) (transformer-block linears)

Each engine runs once per round (whole generation: text encoder, 20 UNet steps with CFG, VAE decode), rounds
interleaved; ratio = diffusers fp32's seconds / the engine's, per round. psnr_vs_diffusers_fp32: of the uint8
image (random weights: a check that the arithmetic agrees, not a quality figure).

  python bench/bench_generate_e2e.py [--rounds 1] [--steps 20] [--size 512] [--threads N] [--out bench/results]
Writes <out>/generate_e2e_<size>px.{md,json}.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantize_full import build_folder  # noqa: E402
from common import compare, load_average, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402
from velodiff.commands.bench import psnr  # noqa: E402

BASELINE = "diffusers fp32"
PROMPT = "a handwritten seven"  # within the digits tokenizer's 16 tokens


def add_sd_vae(folder: str, seed: int) -> None:
    """Replace the folder's VAE with SD's real VAE config (random weights, fp16 file)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    shutil.rmtree(os.path.join(folder, "vae"))
    vae.to(torch.float16).save_pretrained(os.path.join(folder, "vae"))


def build_engines(folder: str, steps: int, size: int, names):
    from diffusers import StableDiffusionPipeline

    import velodiff as vd
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(guidance_scale=7.5, height=size, width=size)
    engines = {}
    for name in names:
        engine, precision = name.rsplit(" ", 1)
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        if engine == "diffusers":
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
            pipe.set_progress_bar_config(disable=True)

            def run(n=steps, pipe=pipe, dtype=dtype):
                image = pipe(PROMPT, latents=latents.to(dtype), num_inference_steps=n, output_type="pil",
                             **kwargs).images[0]
                return np.asarray(image)
        else:
            pipe = vd.Pipeline.from_pretrained(folder, dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            if engine == "velodiff_w8a8":
                vd.quant.quantize(pipe, vd.quant.W8A8(), progress=False)

            def run(n=steps, pipe=pipe, dtype=dtype):
                image = pipe(PROMPT, latents=latents.to(dtype), num_inference_steps=n, **kwargs).images[0]
                return np.asarray(image)
        engines[name] = run
    return engines


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 64)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--engines", default="diffusers fp32,diffusers bf16,velodiff bf16,velodiff_w8a8 bf16",
                    help="comma-separated names (diffusers fp32 is always run: it is the baseline)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    known = ("diffusers fp32", "diffusers bf16", "velodiff fp32", "velodiff bf16", "velodiff_w8a8 bf16")
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    for flag, value, most in (("--rounds", args.rounds, 100), ("--steps", args.steps, 1000),
                              ("--size", args.size, 2048), ("--threads", args.threads, os.cpu_count() or 1)):
        if not 1 <= value <= most:
            print(f"bench_generate_e2e.py: {flag}: must be from 1 to {most}, got {value}", file=sys.stderr)
            sys.exit(2)
    if args.size % 64:
        print(f"bench_generate_e2e.py: --size: must be a multiple of 64, got {args.size}", file=sys.stderr)
        sys.exit(2)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"bench_generate_e2e.py: --engines: unknown {unknown}; choose from {list(known)}", file=sys.stderr)
        sys.exit(2)
    names = [BASELINE] + [n for n in names if n != BASELINE]
    torch.set_num_threads(args.threads)
    load_start = load_average()
    work = tempfile.mkdtemp(prefix="vd-e2e-")
    try:
        folder = os.path.join(work, "sd15-random")
        build_folder(folder, args.size // 8, seed=0)
        add_sd_vae(folder, seed=1)
        engines = build_engines(folder, args.steps, args.size, names)
        images = {}

        def keep(name, fn):
            def run():
                images[name] = fn()
            return run
        with torch.inference_mode():
            for fn in engines.values():  # one-time costs (weight packing, allocator growth) out of the timing
                fn(n=1)
            res = compare({n: keep(n, f) for n, f in engines.items()}, BASELINE, rounds=args.rounds, warmup=0,
                          min_time=0.0, log=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name in names:
        engine, precision = name.rsplit(" ", 1)
        rows.append({"engine": engine, "precision": precision, "s_per_image": res.stats(name),
                     "x_diffusers_fp32": res.ratio(name, over=BASELINE),
                     "psnr_vs_diffusers_fp32": round(psnr(images[name] / 255.0, images[BASELINE] / 255.0), 2)})
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}, flush=True)
    note = (f"One {args.size}x{args.size} image per engine and round: prompt encoding, {args.steps} DPM-Solver++ "
            f"steps with guidance 7.5 (batch 2 per UNet call), VAE decode; full-size SD 1.5 UNet and VAE, random "
            f"weights, same initial latents; {args.threads} threads, {args.rounds} round(s) after a 1-step warm-up "
            "call per engine (one-time costs such as weight packing left out). Cells: median (min-max) over "
            "the rounds. psnr: of the uint8 image against diffusers fp32's (inf = identical).")
    path = write_results(f"generate_e2e_{args.size}px", rows,
                         ["engine", "precision", "s_per_image", "x_diffusers_fp32", "psnr_vs_diffusers_fp32"],
                         args.out, note=note, extra={"load_start": load_start, "load_end": load_average(),
                                                     "rounds": args.rounds, "steps": args.steps,
                                                     "threads": args.threads, "timing": res.to_json()})
    print("wrote", path)


if __name__ == "__main__":
    main()
