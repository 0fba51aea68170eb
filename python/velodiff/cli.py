"""The ``velodiff`` command line. Subcommands arrive with the issues that build them; ``info`` is first."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from velodiff.info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        print(f"{key:<{width}}  {value}")
    return 0 if data["native_module"] else 1


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def make_grid(images, columns: int = None):
    """Tile PIL images of one size into a grid (row-major), ``columns`` default ceil(sqrt(n))."""
    import math

    from PIL import Image
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _cmd_generate(args: argparse.Namespace) -> int:
    import os

    import torch

    from velodiff.pipelines import Pipeline

    if args.model == "digits":
        print("velodiff generate: the built-in model 'digits' is not part of this build yet; "
              "pass --model PATH to a diffusers pipeline folder", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_pretrained(args.model, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = dict(num_inference_steps=args.steps, num_images_per_prompt=args.num_images, generator=generator,
                  sampler=args.sampler, height=args.height, width=args.width)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, **kwargs)
    os.makedirs(args.outdir, exist_ok=True)
    for i, image in enumerate(out.images):
        image.save(os.path.join(args.outdir, f"{i:03d}.png"))
    make_grid(out.images).save(os.path.join(args.outdir, "grid.png"))
    print(f"wrote {len(out.images)} images and grid.png to {args.outdir} ({out.sampler}, "
          f"{out.num_model_evaluations} model evaluations)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velodiff", description="Fast, correct diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what this build contains: versions, CUDA archs, CPU ISA, ops")
    p_info.add_argument("--json", action="store_true", help="print JSON for machines")
    p_info.set_defaults(func=_cmd_info)

    p_gen = sub.add_parser("generate", help="generate images and write DIR/000.png ... and DIR/grid.png")
    p_gen.add_argument("--model", default="digits", help="built-in model name or a diffusers pipeline folder")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--negative-prompt", default=None)
    p_gen.add_argument("--steps", type=int, default=20)
    p_gen.add_argument("--sampler", default=None, help="a sampler name (default: the model's scheduler)")
    p_gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--height", type=int, default=None)
    p_gen.add_argument("--width", type=int, default=None)
    p_gen.add_argument("--num-images", type=int, default=1)
    p_gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p_gen.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_gen.add_argument("--outdir", default="out")
    p_gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
