"""``velodiff quantize``: quantize a model's denoiser and write a pipeline folder that loads like any model."""
from __future__ import annotations

import argparse
import os
import sys

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, step


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's denoiser (SVDQuant W4A4, naive W4A4, W8A8, FP8, low-bit FP) into a loadable folder",
        description="Calibrate on the model's own sampling trajectory, quantize the linear layers of the "
                    "denoiser's transformer blocks and write a pipeline folder that generate and eval load (with "
                    "the source folder's settings, e.g. its default guidance). An existing --out is refused "
                    "unless --force.")
    A.add_model(p, "a diffusers pipeline folder")
    p.add_argument("--method", choices=["svdquant", "naive-w4a4", "w8a8", "fp8", "fp8-weight-only", "lowbit-fp",
                                        "lowbit-int"], required=True,
                   help="the quantizer (fp8: e4m3 weights per channel and activations per token; fp8-weight-only: "
                        "FP8 storage, 16-bit GEMMs; lowbit-fp: 4-bit float weights, their format (e1m2, e2m1, "
                        "e3m0) and clipping searched per layer; lowbit-int: int4 weights, the same search)")
    p.add_argument("--a-bits", type=_a_bits, default=8, metavar="{2..8,none}",
                   help="lowbit methods: activation bits per token (8: e4m3, on the FP8 GEMM; fewer: a float "
                        "format searched per layer, fake-quantized; none: unquantized; default: %(default)s)")
    p.add_argument("--learn-rounding", action="store_true",
                   help="lowbit-fp: learn each weight's rounding direction on the calibration data (AdaRound)")
    p.add_argument("--rounding-iters", type=A.positive_int, default=300, metavar="N",
                   help="lowbit-fp with --learn-rounding: Adam steps per layer (default: %(default)s)")
    p.add_argument("--fp8-format", choices=["e4m3", "e5m2"], default="e4m3",
                   help="fp8 methods: the code format (default: %(default)s)")
    p.add_argument("--clip-percentile", type=float, default=None, metavar="P",
                   help="fp8 methods: each weight row's scale from the P-th percentile of |w| (0 < P <= 100) "
                        "instead of its maximum")
    p.add_argument("--rank", metavar="R", type=A.positive_int, default=32,
                   help="svdquant: rank of the 16-bit low-rank branch (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", required=True, help="the folder to write")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out: the files this writes are replaced, other files there are kept")
    p.add_argument("--layers", choices=["default", "all"], default="default",
                   help="default: the linear layers of the transformer blocks; all: also convolutions, "
                        "cross-attention k/v and modulation layers (see velodiff.quant.ALL_LAYERS)")
    p.add_argument("--memory-budget", type=A.nonnegative_float, default=None, metavar="FRACTION",
                   help="svdquant: the denoiser's weight bytes at most FRACTION of its fp16 bytes (e.g. 0.3), met "
                        "by lowering the branch ranks where they matter least")
    p.add_argument("--split-shortcut", action="store_true",
                   help="svdquant, naive-w4a4, w8a8 with --layers all: quantize each UNet up-block resnet's conv1 / "
                        "conv_shortcut as two convolutions, one per part of its cat([hidden, skip]) input "
                        "(Q-Diffusion's split shortcut)")
    p.add_argument("--tfmq-temporal", action="store_true",
                   help="svdquant and lowbit methods: also quantize the temporal layers (timestep embedding MLP, a "
                        "UNet's time_emb_proj) with TFMQ-DM's treatment: calibrated on every training timestep, in "
                        "order, reconstructing the full-precision temporal features")
    p.add_argument("--calibration-images", metavar="N", type=A.positive_int, default=16, help="(default: %(default)s)")
    p.add_argument("--calibration-steps", metavar="N", type=A.positive_int, default=20, help="(default: %(default)s)")
    p.add_argument("--calibration-timesteps", choices=["all", "qdiffusion", "ptq4dm"], default="all",
                   help="which steps of the calibration trajectories to sample: all, Q-Diffusion's uniformly spaced "
                        "half, or PTQ4DM's normal weighting (default: %(default)s)")
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=0, help="(default: %(default)s)")
    A.add_device_dtype(p, dtype_default="fp16", device_default="cpu",
                       dtype_help="dtype of the stored floating parts (scales, low-rank branch, unquantized layers; "
                                  "default: %(default)s); the quantizer itself computes in fp32")
    p.set_defaults(func=run)


def _a_bits(text: str):
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be 2 to 8 or none, got {text!r}")
    return value


def _rank_text(rank: int, ranks: dict) -> str:
    if not rank:
        return ""
    if ranks["min"] == ranks["max"]:
        return f" (rank {rank})"
    return f" (ranks {ranks['min']}-{ranks['max']}, mean {ranks['mean']})"


def _size(path: str) -> str:
    n = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return f"{n / 2 ** 20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.model)
    if os.path.isfile(args.model):
        raise UsageError(f"--model {args.model!r} is a single file; quantize writes a folder beside the source's "
                         "other components, so convert it first: velodiff convert FILE FOLDER")
    A.read_model_index(args.model)
    if args.memory_budget is not None and args.method != "svdquant":
        raise UsageError("--memory-budget: only for --method svdquant")
    if args.clip_percentile is not None:
        if not args.method.startswith("fp8"):
            raise UsageError("--clip-percentile: only for --method fp8 or fp8-weight-only")
        if not 0 < args.clip_percentile <= 100:
            raise UsageError(f"--clip-percentile: must be in (0, 100], got {args.clip_percentile}")
    if args.fp8_format != "e4m3" and not args.method.startswith("fp8"):
        raise UsageError("--fp8-format: only for --method fp8 or fp8-weight-only")
    if args.split_shortcut and (args.method not in ("svdquant", "naive-w4a4", "w8a8") or args.layers != "all"):
        raise UsageError("--split-shortcut: only for --method svdquant, naive-w4a4 or w8a8 with --layers all (the "
                         "split layers are convolutions)")
    if args.tfmq_temporal and args.method not in ("svdquant", "lowbit-fp", "lowbit-int"):
        raise UsageError("--tfmq-temporal: only for --method svdquant, lowbit-fp or lowbit-int (the calibrated ones)")
    lowbit = args.method.startswith("lowbit")
    if args.a_bits != 8 and not lowbit:
        raise UsageError("--a-bits: only for --method lowbit-fp or lowbit-int")
    if args.learn_rounding and args.method != "lowbit-fp":
        raise UsageError("--learn-rounding: only for --method lowbit-fp")
    if args.rounding_iters > 100_000:
        raise UsageError(f"--rounding-iters: at most 100000 Adam steps per layer, got {args.rounding_iters}")
    if args.rounding_iters != 300 and not args.learn_rounding:
        raise UsageError("--rounding-iters: only with --learn-rounding")

    import torch

    from velodiff import quant
    from velodiff.loading.output import check_destination
    from velodiff.pipelines import Pipeline

    with step(f"--out {args.out}"):
        check_destination(args.out, folder=True, force=args.force)
    device = A.check_device(args.device)
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
    with step(None):
        rank = args.rank if args.method == "svdquant" else 0
        config = quant.QuantConfig(args.method, rank=rank, layers=args.layers, memory_budget=args.memory_budget,
                                   calibration_images=args.calibration_images,
                                   calibration_steps=args.calibration_steps, seed=args.seed,
                                   fp8_format=args.fp8_format, clip_percentile=args.clip_percentile,
                                   calibration_timesteps=args.calibration_timesteps, w_bits=4,
                                   a_bits=args.a_bits if lowbit else 8, learn_rounding=args.learn_rounding,
                                   rounding_iters=args.rounding_iters, split_shortcut=args.split_shortcut,
                                   tfmq_temporal=args.tfmq_temporal)
        report = quant.quantize(pipe, config, progress=sys.stderr.isatty())
    with step(f"--out {args.out}"):
        quant.save_quantized(pipe, args.out, dtype=getattr(torch, A.DTYPES[args.dtype]), force=args.force)
    print(f"quantized {report['layers']} layers of the {report['component']} with {args.method}"
          f"{_rank_text(report['rank'], report['ranks'])} in {report['seconds']:.1f} s: layer weights "
          f"{report['layer_bytes_before'] / 2 ** 20:.2f} MiB -> {report['layer_bytes_after'] / 2 ** 20:.2f} MiB "
          f"(denoiser {report['model_ratio']:.3f}x fp16); "
          f"wrote {args.out} ({_size(args.out)})")
    return 0
