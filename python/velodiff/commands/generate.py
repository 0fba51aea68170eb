"""``velodiff generate``: images from a model, written as DIR/000.png, DIR/001.png, ... and DIR/grid.png."""
from __future__ import annotations

import argparse
import os
import sys

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, flags_given, step

DEFAULT_STEPS = 20


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images and write DIR/000.png ... and DIR/grid.png",
                       description="Generate images with a built-in model, a diffusers pipeline folder, a single-file "
                                   "checkpoint or a quantized folder; writes DIR/000.png, DIR/001.png, ... and "
                                   "DIR/grid.png.", epilog=A.epilog())
    A.add_model(p)
    p.add_argument("--prompt", metavar="TEXT", default=None, help="the text prompt (text-to-image models)")
    p.add_argument("--class-label", metavar="N", type=A.nonnegative_int, default=None,
                   help="class-conditional models (DiT, e.g. digits-dit): the class to draw, instead of --prompt")
    p.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="text-to-image models: what to steer away from")
    p.add_argument("--steps", metavar="N", type=A.positive_int, default=DEFAULT_STEPS,
                   help="denoising steps (default: %(default)s)")
    p.add_argument("--sampler", metavar="NAME", type=A.sampler_name, default=None,
                   help=A.samplers_help("the model's scheduler"))
    p.add_argument("--guidance", metavar="G", type=A.nonnegative_float, default=None, help=A.GUIDANCE_HELP)
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=0,
                   help="seed of the initial noise (default: %(default)s)")
    p.add_argument("--height", metavar="H", type=A.positive_int, default=None,
                   help="image height in pixels (default: the model's)")
    p.add_argument("--width", metavar="W", type=A.positive_int, default=None,
                   help="image width in pixels (default: the model's)")
    p.add_argument("--num-images", metavar="N", type=A.positive_int, default=1,
                   help="images to draw (default: %(default)s)")
    A.add_device_dtype(p)
    A.add_optimize(p)
    A.add_lora(p)
    p.add_argument("--outdir", metavar="DIR", default="out",
                   help="the folder to write (created if needed; default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="single-file --model: a tokenizer folder, a diffusers pipeline folder or built-in model "
                        "name to take it from")
    p.add_argument("--tokenizer-2", metavar="PATH", default=None, help="single-file SDXL --model: the second tokenizer")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled weights (a .ckpt/.pt/.bin --model, or .bin files in its folders) with "
                        "torch.load(weights_only=True); only for files you trust")
    p.add_argument("--configs", metavar="JSON", default=None,
                   help="single-file --model: JSON (file or inline) of config overrides per component")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                   help="single-file --model: the scheduler's prediction type (SD 2.x 768-v: v_prediction)")
    p.set_defaults(func=run)


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


def _check_conditioning(args, index) -> None:
    """--prompt for text-to-image models, --class-label for class-conditional ones (from model_index.json)."""
    class_conditional = bool(index) and index.get("_class_name") == "DiTPipeline"
    if class_conditional:
        wrong = flags_given(args, ["prompt", "negative_prompt"])
        if wrong:
            raise UsageError(f"{', '.join(wrong)}: {args.model} is class-conditional (DiT) and takes no text; "
                             "pass --class-label N (the class to draw) instead")
        if args.class_label is None:
            raise UsageError(f"--class-label: {args.model} is class-conditional (DiT): pass --class-label N "
                             "(the class to draw)")
    else:
        if args.prompt is None:
            raise UsageError(f"--prompt: {args.model} is a text-to-image model: pass --prompt TEXT")
        if args.class_label is not None:
            raise UsageError(f"--class-label: only for class-conditional (DiT) models; {args.model} takes --prompt")


def _call_kwargs(args, pipe) -> dict:
    """The pipeline call's arguments from the flags (given ones only, so the model's defaults apply otherwise);
    a flag the pipeline has no argument for is an error, never silently dropped."""
    import inspect

    import torch

    kwargs = dict(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    optional = dict(sampler=args.sampler, guidance_scale=args.guidance, height=args.height, width=args.width,
                    negative_prompt=args.negative_prompt)
    params = inspect.signature(pipe.__call__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in optional.items():
        if value is None:
            continue
        if name not in params and not takes_any:
            flag = {"guidance_scale": "--guidance", "negative_prompt": "--negative-prompt"}.get(name, f"--{name}")
            raise UsageError(f"{flag}: {type(pipe).__name__} ({args.model}) has no {name} argument; drop {flag}")
        kwargs[name] = value
    return kwargs


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.model)
    A.check_pickle(args.model, args.allow_pickle)
    A.check_single_file_flags(args, args.model)
    index = A.read_model_index(args.model)
    _check_conditioning(args, index)
    A.check_outdir(args.outdir)
    configs = A.read_configs(args.configs)
    techniques = A.parse_optimize(args.optimize)
    loras = A.parse_loras(args.lora, args.model)

    import torch

    from velodiff.pipelines import Pipeline

    device = A.check_device(args.device)
    single = {k: v for k, v in dict(tokenizer=args.tokenizer, tokenizer_2=args.tokenizer_2, configs=configs,
                                    prediction_type=args.prediction_type).items() if v is not None}
    if args.allow_pickle:
        single["allow_pickle"] = True
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, A.DTYPES[args.dtype]), device=device,
                                        **single)
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
    A.load_loras(pipe, args.lora, loras)
    if techniques:
        from velodiff.accel import optimize
        with step("--optimize " + " --optimize ".join(args.optimize)):
            optimize(pipe, *techniques)
    kwargs = _call_kwargs(args, pipe)
    with step(None):
        if args.class_label is not None:
            out = pipe([args.class_label] * args.num_images, **kwargs)
        else:
            out = pipe(args.prompt, num_images_per_prompt=args.num_images, **kwargs)
    with step(f"--outdir {args.outdir}"):
        os.makedirs(args.outdir, exist_ok=True)
        for i, image in enumerate(out.images):
            image.save(os.path.join(args.outdir, f"{i:03d}.png"))
        make_grid(out.images).save(os.path.join(args.outdir, "grid.png"))
    print(f"wrote {len(out.images)} images and grid.png to {args.outdir} ({out.sampler}, "
          f"{out.num_model_evaluations} model evaluations)")
    return 0
