"""``velodiff bench AREA``: measure a technique on your model, beside the same model without it.

AREA ``generate``: the wall-clock time of whole pipeline calls with the ``--optimize`` techniques against the same
calls without them, interleaved in rounds (every round runs both, in alternating order, on the same seed), with
the ratio taken within each round; and the fidelity of the optimized images to the plain ones (PSNR, same seed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from velodiff.commands import args as A
from velodiff.commands import generate as G
from velodiff.commands.errors import UsageError, step

AREAS = ("generate",)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time --optimize techniques on a model against the model without them",
                       description="AREA generate: whole pipeline calls with the --optimize techniques against the "
                                   "same calls without them, interleaved in rounds on the same seed; reports the "
                                   "per-round speed-up (median, min, max) and the PSNR of the optimized images "
                                   "to the plain ones.", epilog=A.epilog())
    p.add_argument("area", metavar="AREA", choices=AREAS, help=f"what to measure: {', '.join(AREAS)}")
    A.add_model(p, "a diffusers pipeline folder or a quantized folder")
    p.add_argument("--prompt", metavar="TEXT", default=None,
                   help="text-to-image models (default for the built-in digits: 'a handwritten 7')")
    p.add_argument("--class-label", metavar="N", type=A.nonnegative_int, default=None,
                   help="class-conditional models (default for DiT: 7)")
    p.add_argument("--steps", metavar="N", type=A.positive_int, default=G.DEFAULT_STEPS,
                   help="denoising steps (default: %(default)s)")
    p.add_argument("--sampler", metavar="NAME", type=A.sampler_name, default=None,
                   help=A.samplers_help("the model's scheduler"))
    p.add_argument("--guidance", metavar="G", type=A.nonnegative_float, default=None, help=A.GUIDANCE_HELP)
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--num-images", metavar="N", type=A.positive_int, default=4,
                   help="images per call (default: %(default)s)")
    p.add_argument("--rounds", metavar="R", type=A.positive_int, default=5,
                   help="timed rounds, each timing both variants once (default: %(default)s)")
    A.add_device_dtype(p)
    A.add_optimize(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=run, height=None, width=None, negative_prompt=None)


def psnr(a, b) -> float:
    """PSNR in dB of images ``a`` against ``b`` (float arrays in [0, 1]); inf when equal."""
    import numpy as np
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def run(args: argparse.Namespace) -> int:
    if not args.optimize:
        raise UsageError("--optimize: name at least one technique to measure (e.g. --optimize deepcache:interval=3)")
    A.check_model_path(args.model)
    if os.path.isfile(args.model):
        raise UsageError(f"--model {args.model!r} is a single file; bench takes a pipeline folder (convert it first "
                         "with velodiff convert)")
    index = A.read_model_index(args.model)
    if index and index.get("_class_name") == "DiTPipeline":
        args.class_label = 7 if args.class_label is None else args.class_label
    elif args.prompt is None:
        args.prompt = "a handwritten 7"
    G._check_conditioning(args, index)
    techniques = A.parse_optimize(args.optimize)

    import time

    import torch

    from velodiff.accel import optimize, restore
    from velodiff.pipelines import Pipeline
    from velodiff.timing import load_average, spread

    device = A.check_device(args.device)
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, A.DTYPES[args.dtype]), device=device)
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def call():
        kwargs = G._call_kwargs(args, pipe)  # a fresh generator on the same seed every call
        kwargs["output_type"] = "np"
        if args.class_label is not None:
            return pipe([args.class_label] * args.num_images, **kwargs)
        return pipe(args.prompt, num_images_per_prompt=args.num_images, **kwargs)

    def timed(optimized: bool):
        if optimized and not pipe._applied:
            with step("--optimize " + " --optimize ".join(args.optimize)):
                optimize(pipe, *techniques)
        elif not optimized and pipe._applied:
            restore(pipe)
        sync()
        t0 = time.perf_counter()
        with step(None):
            out = call()
        sync()
        return time.perf_counter() - t0, out

    load_before = load_average()
    _, plain = timed(False)  # warm-up of both variants, and the images to compare
    _, fast = timed(True)
    times = {"plain": [], "optimized": []}
    for r in range(args.rounds):
        for variant in (("plain", "optimized") if r % 2 == 0 else ("optimized", "plain")):
            times[variant].append(timed(variant == "optimized")[0])
    restore(pipe)
    ratios = [p / o for p, o in zip(times["plain"], times["optimized"])]
    per_image = [psnr(f, p) for f, p in zip(fast.images, plain.images)]
    result = {
        "area": args.area, "model": args.model, "optimize": list(args.optimize), "sampler": plain.sampler,
        "steps": args.steps, "num_images": args.num_images, "seed": args.seed, "rounds": args.rounds,
        "seconds_plain": spread(times["plain"]), "seconds_optimized": spread(times["optimized"]),
        "speedup": spread(ratios), "model_evaluations": {"plain": plain.num_model_evaluations,
                                                         "optimized": fast.num_model_evaluations},
        "psnr_db": {"mean": sum(per_image) / len(per_image), "min": min(per_image)},
        "load_average": {"before": load_before, "after": load_average()}, "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s, p = result["speedup"], result["psnr_db"]
    print(f"{args.model} ({plain.sampler}, {args.steps} steps, {args.num_images} images, {args.rounds} rounds, "
          f"{result['device']}, {result['threads']} threads, load {load_before})")
    print(f"  plain      {result['seconds_plain']['median']:.4f} s per call")
    print(f"  optimized  {result['seconds_optimized']['median']:.4f} s per call  "
          f"({', '.join(args.optimize)})")
    print(f"  speed-up   {s['median']:.3f}x (rounds: {s['min']:.3f}-{s['max']:.3f}x)")
    print(f"  fidelity   PSNR to the plain images {p['mean']:.2f} dB mean, {p['min']:.2f} dB worst"
          if math.isfinite(p["mean"]) else "  fidelity   identical images")
    sys.stdout.flush()
    return 0
