"""``velodiff eval``: judge a model on handwritten digits (conditional accuracy, Frechet distance, speed)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, step

#: modules ``velodiff eval`` needs beyond velodiff's own dependencies (the ``eval`` extra), by pip name
EVAL_MODULES = {"sklearn": "scikit-learn", "scipy": "scipy"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="judge a model on handwritten digits: conditional accuracy, Frechet distance, speed",
        description="Generate --per-class images of each digit 0..9 and judge them against real digits the "
                    "generators never saw (see velodiff.eval for the classifier, the feature space and the "
                    "conversions). Needs scikit-learn and scipy: pip install 'velodiff[eval]'.",
        epilog=A.epilog())
    A.add_model(p, "a diffusers pipeline folder or a quantized folder")
    p.add_argument("--sampler", metavar="NAME", type=A.sampler_name, default="dpmpp_2m",
                   help=A.samplers_help("%(default)s"))
    p.add_argument("--steps", metavar="N", type=A.positive_int, default=20,
                   help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", metavar="G", type=A.nonnegative_float, default=None, help=A.GUIDANCE_HELP)
    p.add_argument("--per-class", metavar="N", type=A.positive_int, default=100,
                   help="images per digit (default: %(default)s, so 1000 images)")
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=0,
                   help="seed of the images' noise (default: %(default)s)")
    p.add_argument("--batch-size", metavar="N", type=A.positive_int, default=100,
                   help="images per call (default: %(default)s)")
    p.add_argument("--prompt-template", metavar="TEXT", default="a handwritten {d}",
                   help="text-to-image models: the prompt, {d} = the digit, {word} = its name "
                        "(default: '%(default)s')")
    p.add_argument("--upsample", choices=["bilinear", "nearest", "none"], default="bilinear",
                   help="how real digits are rendered at the generated size before comparison (default: %(default)s)")
    A.add_device_dtype(p)
    A.add_optimize(p)
    A.add_lora(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=run)


def check_eval_dependencies() -> None:
    """scikit-learn and scipy are importable (checked before any image is generated)."""
    missing = [pip for module, pip in EVAL_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"velodiff eval needs {' and '.join(missing)}, which are not installed: "
                         f"pip install 'velodiff[eval]' (or pip install {' '.join(missing)})")


def run(args: argparse.Namespace) -> int:
    check_eval_dependencies()
    A.check_model_path(args.model)
    if os.path.isfile(args.model):
        raise UsageError(f"--model {args.model!r} is a single file; eval takes a pipeline folder (a single file "
                         "holds no tokenizer): convert it first with velodiff convert FILE FOLDER --tokenizer ...")
    A.read_model_index(args.model)
    techniques = A.parse_optimize(args.optimize)
    loras = A.parse_loras(args.lora, args.model)

    import torch

    from velodiff.eval import evaluate, format_table
    from velodiff.pipelines import Pipeline

    device = A.check_device(args.device)
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, A.DTYPES[args.dtype]), device=device)
    A.load_loras(pipe, args.lora, loras)
    if techniques:
        from velodiff.accel import optimize
        with step("--optimize " + " --optimize ".join(args.optimize)):
            optimize(pipe, *techniques)
    with step(None):
        result = evaluate(pipe, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                          per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                          prompt_template=args.prompt_template, upsample=args.upsample,
                          progress=sys.stderr.isatty())
    result = {"model": args.model, "optimize": list(args.optimize), **result}
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
