"""The ``velodiff`` command line: ``info``, ``generate``, ``convert``, ``eval`` and ``quantize``."""
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
#: default --guidance of the built-in models (measured best, see python/velodiff/data/*/README.md); other
#: models get the pipeline's own default (7.5 for Stable Diffusion)
BUILTIN_GUIDANCE = {"digits": 3.0, "digits-dit": 1.5}
#: model families of ``velodiff convert --family`` (velodiff.loading.FAMILIES, kept here so --help is cheap)
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "dit", "pixart")


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
    from velodiff.pipelines.base import is_class_conditional

    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    single = {}
    if os.path.isfile(args.model):  # a single-file checkpoint: it brings no tokenizer, configs or scheduler
        single = dict(tokenizer=args.tokenizer, tokenizer_2=args.tokenizer_2, allow_pickle=args.allow_pickle,
                      configs=_read_configs(args.configs), prediction_type=args.prediction_type)
    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=dtype, device=device, **single)
    except FileNotFoundError as e:
        print(f"velodiff generate: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = dict(num_inference_steps=args.steps, num_images_per_prompt=args.num_images, generator=generator,
                  sampler=args.sampler, height=args.height, width=args.width)
    guidance = args.guidance if args.guidance is not None else BUILTIN_GUIDANCE.get(args.model)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if is_class_conditional(pipe):
        if args.class_label is None:
            print(f"velodiff generate: {args.model} is class-conditional (DiT): pass --class-label N "
                  f"(0 <= N < {pipe.transformer.config.num_embeds_ada_norm}) instead of --prompt", file=sys.stderr)
            return 2
        for unused in ("height", "width", "negative_prompt"):
            kwargs.pop(unused, None)
        num = kwargs.pop("num_images_per_prompt")
        try:
            out = pipe([args.class_label] * num, **kwargs)
        except ValueError as e:
            print(f"velodiff generate: {e}", file=sys.stderr)
            return 2
    else:
        if args.prompt is None:
            print("velodiff generate: --prompt is required for text-to-image models", file=sys.stderr)
            return 2
        out = pipe(args.prompt, negative_prompt=args.negative_prompt, **kwargs)
    os.makedirs(args.outdir, exist_ok=True)
    for i, image in enumerate(out.images):
        image.save(os.path.join(args.outdir, f"{i:03d}.png"))
    make_grid(out.images).save(os.path.join(args.outdir, "grid.png"))
    print(f"wrote {len(out.images)} images and grid.png to {args.outdir} ({out.sampler}, "
          f"{out.num_model_evaluations} model evaluations)")
    return 0


def _read_configs(value: Optional[str]):
    """``--configs``: a JSON file, or inline JSON, of ``{component: {config key: value}}`` overrides."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        try:
            with open(value) as f:
                text = f.read()
        except OSError as e:
            raise SystemExit(f"velodiff: --configs {value!r}: cannot read the file: {e}")
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"velodiff: --configs {value!r}: not valid JSON: {e}")
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise SystemExit(f"velodiff: --configs {value!r}: expected {{\"unet\": {{...}}, \"vae\": {{...}}, ...}}")
    return configs


def _size(path: str) -> str:
    import os
    n = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return f"{n / 2 ** 20:.1f} MiB"


def _folder_to_file(args, dtype) -> str:
    import os

    from velodiff.loading import convert_diffusers_to_single_file, family_of_diffusers_folder

    if not os.path.isfile(os.path.join(args.src, "model_index.json")):
        raise ValueError(f"{args.src} is a folder without model_index.json, not a diffusers pipeline folder")
    if not args.dst.endswith(".safetensors"):
        raise ValueError(f"DST {args.dst!r}: a folder is converted to one .safetensors file; name it *.safetensors")
    unused = [flag for flag, value in (("--configs", args.configs), ("--prediction-type", args.prediction_type),
                                       ("--tokenizer", args.tokenizer), ("--tokenizer-2", args.tokenizer_2))
              if value is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)}: only for single file -> folder conversion")
    family = args.family or family_of_diffusers_folder(args.src)
    convert_diffusers_to_single_file(args.src, args.dst, family, dtype=dtype)
    return f"wrote {args.dst} ({family} single file, {_size(args.dst)})"


def _file_to_folder(args, dtype) -> str:
    import os

    from velodiff.loading import convert_single_file_to_diffusers

    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
        raise ValueError(f"DST {args.dst!r} exists and is not an empty folder; velodiff convert does not overwrite")
    index = convert_single_file_to_diffusers(args.src, args.dst, args.family, configs=_read_configs(args.configs),
                                             allow_pickle=args.allow_pickle, dtype=dtype,
                                             prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                                             tokenizer_2=args.tokenizer_2)
    notes = []
    missing = ["tokenizer" + enc[len("text_encoder"):] for enc in ("text_encoder", "text_encoder_2")
               if enc in index and "tokenizer" + enc[len("text_encoder"):] not in index]
    if missing:
        flags = " / ".join("--" + n.replace("_", "-") for n in missing)
        notes.append(f"note: a single file holds no tokenizer, so {', '.join(missing)} not written; pass {flags} "
                     f"(a tokenizer folder or a diffusers pipeline folder of the same family) or copy "
                     f"{'/ and '.join(missing)}/ from one into {args.dst}")
    parts = ", ".join(k for k in index if not k.startswith("_") and isinstance(index[k], list) and index[k][0])
    return "\n".join([f"wrote {args.dst} ({parts}; {_size(args.dst)})"] + notes)


def _cmd_convert(args: argparse.Namespace) -> int:
    import os

    import torch

    from velodiff.loading import CheckpointError, is_pickle_path

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        if os.path.isdir(args.src):
            message = _folder_to_file(args, dtype)
        elif os.path.isfile(args.src):
            message = _file_to_folder(args, dtype)
        else:
            raise FileNotFoundError(f"SRC {args.src!r}: no such file or folder")
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        hint = ""
        if is_pickle_path(args.src) and not args.allow_pickle and "allow_pickle" in str(e):
            hint = " (on the command line: --allow-pickle)"
        print(f"velodiff convert: {e}{hint}", file=sys.stderr)
        return 1
    print(message)
    return 0


def _number(kind: type, minimum, description: str):
    """An argparse type: ``kind(text)`` that must be >= ``minimum``, else a message using ``description``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, "a positive integer")
_nonnegative_int = _number(int, 0, "an integer >= 0")
_nonnegative_float = _number(float, 0.0, "a number >= 0")


def _sampler_name(text: str) -> str:
    from velodiff.sampling import SAMPLERS  # only when --sampler is given, so --help stays cheap
    if text not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; choose from {', '.join(SAMPLERS)}")
    return text


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from velodiff.eval import evaluate, format_table
    from velodiff.pipelines import Pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
    except (ValueError, TypeError, OSError) as e:
        print(f"velodiff eval: --model {args.model!r}: {e}", file=sys.stderr)
        return 2
    try:
        result = evaluate(pipe, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                          per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                          prompt_template=args.prompt_template, upsample=args.upsample)
    except ValueError as e:
        print(f"velodiff eval: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, **result}
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from velodiff import quant
    from velodiff.pipelines import Pipeline

    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=torch.float32, device=args.device)
        rank = args.rank if args.method == "svdquant" else 0
        config = quant.QuantConfig(args.method, rank=rank, layers=args.layers, memory_budget=args.memory_budget,
                                   calibration_images=args.calibration_images,
                                   calibration_steps=args.calibration_steps, seed=args.seed)
        report = quant.quantize(pipe, config)
        quant.save_quantized(pipe, args.out, dtype=getattr(torch, DTYPES[args.dtype]))
    except (ValueError, TypeError, OSError) as e:
        print(f"velodiff quantize: {e}", file=sys.stderr)
        return 2
    print(f"quantized {report['layers']} layers of the {report['component']} with {args.method}"
          f"{_rank_text(report['rank'], report['ranks'])} in {report['seconds']:.1f} s: layer weights "
          f"{report['layer_bytes_before'] / 2 ** 20:.2f} MiB -> {report['layer_bytes_after'] / 2 ** 20:.2f} MiB "
          f"(denoiser {report['model_ratio']:.3f}x fp16); "
          f"wrote {args.out} ({_size(args.out)})")
    return 0


def _rank_text(rank: int, ranks: dict) -> str:
    if not rank:
        return ""
    if ranks["min"] == ranks["max"]:
        return f" (rank {rank})"
    return f" (ranks {ranks['min']}-{ranks['max']}, mean {ranks['mean']})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velodiff", description="Fast, correct diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what this build contains: versions, CUDA archs, CPU ISA, ops")
    p_info.add_argument("--json", action="store_true", help="print JSON for machines")
    p_info.set_defaults(func=_cmd_info)

    p_gen = sub.add_parser("generate", help="generate images and write DIR/000.png ... and DIR/grid.png")
    p_gen.add_argument("--model", default="digits",
                       help="built-in model name (default: digits, 16x16 handwritten digits), a diffusers pipeline "
                            "folder or a single-file checkpoint")
    p_gen.add_argument("--prompt", default=None, help="the text prompt (text-to-image models)")
    p_gen.add_argument("--class-label", type=int, default=None,
                       help="class-conditional models (DiT, e.g. digits-dit): the class to draw")
    p_gen.add_argument("--negative-prompt", default=None)
    p_gen.add_argument("--steps", type=int, default=20)
    p_gen.add_argument("--sampler", default=None, help="a sampler name (default: the model's scheduler)")
    p_gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 3 for the built-in digits, "
                       "else the pipeline's default)")
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--height", type=int, default=None)
    p_gen.add_argument("--width", type=int, default=None)
    p_gen.add_argument("--num-images", type=int, default=1)
    p_gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p_gen.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_gen.add_argument("--outdir", default="out")
    p_gen.add_argument("--tokenizer", default=None,
                       help="single-file --model: a tokenizer folder or a diffusers pipeline folder to take it from")
    p_gen.add_argument("--tokenizer-2", default=None, help="single-file SDXL --model: the second tokenizer")
    p_gen.add_argument("--allow-pickle", action="store_true",
                       help="single-file --model: read a pickled .ckpt/.pt/.bin (only files you trust)")
    p_gen.add_argument("--configs", default=None,
                       help="single-file --model: JSON (file or inline) of config overrides per component")
    p_gen.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                       help="single-file --model: the scheduler's prediction type (SD 2.x 768-v: v_prediction)")
    p_gen.set_defaults(func=_cmd_generate)

    p_conv = sub.add_parser(
        "convert", help="diffusers folder <-> single-file checkpoint",
        description="Convert a diffusers SD1/SD2/SDXL pipeline folder to one original-layout .safetensors file, "
                    "or a single-file checkpoint (family auto-detected) to a diffusers pipeline folder.")
    p_conv.add_argument("src", metavar="SRC", help="a diffusers pipeline folder or a single-file checkpoint")
    p_conv.add_argument("dst", metavar="DST", help="the .safetensors file or the (new or empty) folder to write")
    p_conv.add_argument("--family", choices=list(FAMILIES), default=None,
                        help="override the detected model family")
    p_conv.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating weights (default: keep the stored dtypes)")
    p_conv.add_argument("--allow-pickle", action="store_true",
                        help="read a pickled SRC (.ckpt/.pt/.pth/.bin) with torch.load(weights_only=True); "
                             "only for files you trust")
    p_conv.add_argument("--configs", default=None,
                        help="file -> folder: JSON (file or inline) of config overrides, e.g. "
                             "'{\"unet\": {\"attention_head_dim\": 8}}'")
    p_conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                        help="file -> folder: the scheduler's prediction type (SD 2.x 768-v: v_prediction)")
    p_conv.add_argument("--tokenizer", default=None,
                        help="file -> folder: copy the tokenizer from this tokenizer folder or diffusers "
                             "pipeline folder (a pipeline folder also supplies tokenizer_2)")
    p_conv.add_argument("--tokenizer-2", default=None, help="file -> folder: the SDXL second tokenizer")
    p_conv.set_defaults(func=_cmd_convert)

    p_eval = sub.add_parser(
        "eval", help="judge a model on handwritten digits: conditional accuracy, Frechet distance, speed",
        description="Generate --per-class images of each digit 0..9 and judge them against scikit-learn's real "
                    "digits (see velodiff.eval for the classifier, the feature space and the conversions).")
    p_eval.add_argument("--model", default="digits", help="built-in model name or a diffusers pipeline folder")
    p_eval.add_argument("--sampler", type=_sampler_name, default="dpmpp_2m", help="a sampler name")
    p_eval.add_argument("--steps", type=_positive_int, default=20)
    p_eval.add_argument("--guidance", type=_nonnegative_float, default=5.0, help="classifier-free guidance scale")
    p_eval.add_argument("--per-class", type=_positive_int, default=100, help="images per digit")
    p_eval.add_argument("--seed", type=_nonnegative_int, default=0)
    p_eval.add_argument("--batch-size", type=_positive_int, default=100)
    p_eval.add_argument("--prompt-template", default="a handwritten {d}",
                        help="text-to-image models: the prompt, {d} = the digit, {word} = its name")
    p_eval.add_argument("--upsample", choices=["bilinear", "nearest", "none"], default="bilinear",
                        help="how real digits are rendered at the generated size before comparison")
    p_eval.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p_eval.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_eval.add_argument("--json", action="store_true", help="print JSON for machines")
    p_eval.set_defaults(func=_cmd_eval)

    p_q = sub.add_parser(
        "quantize", help="quantize a model's denoiser (SVDQuant W4A4, naive W4A4, W8A8) into a loadable folder",
        description="Calibrate on the model's own sampling trajectory, quantize the linear layers of the "
                    "denoiser's transformer blocks and write a pipeline folder that generate and eval load.")
    p_q.add_argument("--model", default="digits", help="built-in model name or a diffusers pipeline folder")
    p_q.add_argument("--method", choices=["svdquant", "naive-w4a4", "w8a8"], required=True)
    p_q.add_argument("--rank", type=_positive_int, default=32, help="svdquant: rank of the 16-bit low-rank branch")
    p_q.add_argument("--out", required=True, help="the folder to write")
    p_q.add_argument("--layers", choices=["default", "all"], default="default",
                     help="default: the linear layers of the transformer blocks; all: also convolutions, "
                          "cross-attention k/v and modulation layers (see velodiff.quant.ALL_LAYERS)")
    p_q.add_argument("--memory-budget", type=float, default=None, metavar="FRACTION",
                     help="svdquant: the denoiser's weight bytes at most FRACTION of its fp16 bytes (e.g. 0.3), met "
                          "by lowering the branch ranks where they matter least")
    p_q.add_argument("--calibration-images", type=_positive_int, default=16)
    p_q.add_argument("--calibration-steps", type=_positive_int, default=20)
    p_q.add_argument("--seed", type=_nonnegative_int, default=0)
    p_q.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                     help="dtype of the stored floating parts (scales, low-rank branch, unquantized layers); "
                          "the quantizer itself computes in fp32")
    p_q.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p_q.set_defaults(func=_cmd_quantize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
