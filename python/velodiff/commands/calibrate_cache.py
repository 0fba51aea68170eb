"""``velodiff calibrate-cache``: fit a DiT cache's calibration (TeaCache's rescale polynomial) on the model's own
uncached trajectories and write it as JSON for ``--optimize teacache:calibration=FILE``."""
from __future__ import annotations

import argparse
import os
import re
import shlex

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, step

#: library argument names -> this command's flags (for messages of the fitting code)
LIBRARY_NAMES = (("num_inference_steps", "--steps"), ("guidance_scale", "--guidance"), ("num_samples", "--num-samples"),
                 ("batch_size", "--batch-size"), ("prompts", "--prompt"), ("sampler", "--sampler"),
                 ("steps", "--steps"), ("degree", "--degree"))
#: pipeline classes (model_index.json ``_class_name``) whose denoiser the DiT caches work on
TRANSFORMER_PIPELINES = ("DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate-cache", help="fit TeaCache's rescale polynomial for a DiT / PixArt model (JSON file)",
        description="Run the model without a cache over --num-samples class labels (DiT) or --prompt texts "
                    "(PixArt), record at every model evaluation the relative L1 change of block 0's modulated "
                    "input (x) and of the transformer output (y) against the previous evaluation, per sample, and "
                    "fit numpy.polyfit(x, y, --degree): the TeaCache maintainers' procedure. The file records the "
                    "model's class and config hash; TeaCache refuses it for another model. Use it with "
                    "--optimize teacache:calibration=FILE.")
    p.add_argument("--model", required=True, metavar="NAME|PATH",
                   help="a built-in DiT model (digits-dit) or a DiT / PixArt diffusers pipeline folder")
    p.add_argument("--method", choices=["teacache"], required=True, help="the cache to calibrate")
    p.add_argument("--out", metavar="FILE.json", required=True, help="the calibration file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--num-samples", metavar="N", type=A.positive_int, default=64,
                   help="trajectories to record: class labels 0, 1, 2, ... cycled over the classes, or the "
                        "--prompt texts cycled (default: %(default)s)")
    p.add_argument("--prompt", metavar="TEXT", action="append", default=None,
                   help="text-conditioned models (PixArt): a prompt to calibrate on (repeatable; required there)")
    p.add_argument("--steps", metavar="N", type=A.positive_int, nargs="+", default=[20],
                   help="denoising steps; several values pool their trajectories (default: %(default)s)")
    p.add_argument("--sampler", metavar="NAME", type=A.sampler_name, default=None,
                   help=A.samplers_help("the folder's scheduler"))
    p.add_argument("--guidance", metavar="G", type=A.nonnegative_float, default=None, help=A.GUIDANCE_HELP)
    p.add_argument("--degree", metavar="D", type=A.positive_int, default=4,
                   help="degree of the polynomial, at most 7 (default: %(default)s, as TeaCache)")
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=0, help="(default: %(default)s)")
    p.add_argument("--batch-size", metavar="N", type=A.positive_int, default=16,
                   help="trajectories per pipeline call (default: %(default)s)")
    A.add_device_dtype(p)
    p.set_defaults(func=run)


def check_out(path: str, force: bool) -> None:
    """--out names a file that can be written (an existing one only with --force)."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path!r} is a folder; name the JSON file to write")
    if os.path.exists(path) and not force:
        raise UsageError(f"--out {path!r} exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path!r}: the folder {parent!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path!r}: the folder {parent!r} is not writable; name another")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this calibration (recorded in the file)."""
    parts = ["velodiff", "calibrate-cache", "--model", args.model, "--method", args.method, "--out", args.out,
             "--num-samples", str(args.num_samples), "--steps", *map(str, args.steps), "--degree", str(args.degree),
             "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
    for flag, value in (("--sampler", args.sampler), ("--guidance", args.guidance)):
        if value is not None:
            parts += [flag, str(value)]
    for prompt in args.prompt or ():
        parts += ["--prompt", prompt]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.model)
    if os.path.isfile(args.model):
        raise UsageError(f"--model {args.model!r} is a single file; calibrate-cache takes a DiT / PixArt pipeline "
                         "folder or digits-dit")
    index = A.read_model_index(args.model) or {}
    kind = index.get("_class_name")
    if kind not in TRANSFORMER_PIPELINES:
        raise UsageError(f"--model {args.model!r} is a {kind or 'pipeline of unknown class'}: {args.method} caches "
                         f"DiT / PixArt transformers ({', '.join(TRANSFORMER_PIPELINES)}), e.g. --model digits-dit")
    if kind != "DiTPipeline" and not args.prompt:
        raise UsageError(f"--prompt: --model {args.model!r} is text-conditioned ({kind}); give the prompts to "
                         "calibrate on with --prompt TEXT (repeatable)")
    if kind == "DiTPipeline" and args.prompt:
        raise UsageError(f"--prompt: --model {args.model!r} is class-conditional (DiTPipeline); drop --prompt "
                         "(class labels are cycled)")
    if args.degree > 7:
        raise UsageError(f"--degree must be at most 7 (8 coefficients), got {args.degree}")
    if any(n < 2 for n in args.steps):
        raise UsageError(f"--steps must be at least 2 (pairs of consecutive evaluations), got {args.steps}")
    check_out(args.out, args.force)

    import torch

    from velodiff.accel.cache.calibrate import fit_teacache, write_calibration
    from velodiff.pipelines import Pipeline

    device = A.check_device(args.device)
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, A.DTYPES[args.dtype]), device=device)
    pipe.set_progress_bar_config(disable=True)
    with step(None):
        try:
            data = fit_teacache(pipe, num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                                guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                degree=args.degree, prompts=args.prompt)
        except ValueError as e:  # the library's argument names as this command's flags
            text = str(e)
            for name, flag in LIBRARY_NAMES:
                text = re.sub(r"(?<![\w-])" + name + r"(?![\w-])", flag, text)
            raise UsageError(text) from None
    data["made_with"]["command"] = command_line(args)
    data["model"]["source"] = args.model if args.model in A.BUILTIN_NAMES else os.path.basename(
        os.path.abspath(args.model))
    with step(f"--out {args.out}"):
        write_calibration(data, args.out)
    fit = data["fit"]
    coefficients = ", ".join(f"{c:.6g}" for c in data["coefficients"])
    print(f"fitted {args.method} on {fit['points']} (x, y) pairs from {args.num_samples} trajectories x "
          f"{'/'.join(map(str, fit['steps']))} steps ({fit['sampler']}, guidance {fit['guidance']}) in "
          f"{fit['seconds']} s: coefficients [{coefficients}], R^2 {fit['r2']:.3f}, x in "
          f"[{fit['x_range'][0]:.4g}, {fit['x_range'][1]:.4g}]; wrote {args.out}")
    return 0
