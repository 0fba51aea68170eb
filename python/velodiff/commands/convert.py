"""``velodiff convert SRC DST``: a diffusers pipeline folder (or built-in model) <-> one original-layout file."""
from __future__ import annotations

import argparse
import os

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, flags_given, step

FILE_TO_FOLDER_FLAGS = ("configs", "prediction_type", "tokenizer", "tokenizer_2", "allow_pickle")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="diffusers folder <-> single-file checkpoint",
        description="Convert a diffusers SD1/SD2/SDXL (or DiT) pipeline folder, or a built-in model, to one "
                    "original-layout .safetensors file (its configs and settings recorded in the file's metadata, "
                    "so converting back is lossless), or a single-file checkpoint (family auto-detected) to a "
                    "diffusers pipeline folder. An existing DST is refused unless --force.")
    p.add_argument("src", metavar="SRC", help="a diffusers pipeline folder, a built-in model name "
                                              f"({', '.join(A.BUILTIN_NAMES)}) or a single-file checkpoint")
    p.add_argument("dst", metavar="DST", help="the .safetensors file or the folder to write")
    p.add_argument("--force", action="store_true",
                   help="replace an existing DST: the files this writes are replaced, other files there are kept")
    p.add_argument("--family", choices=list(A.FAMILIES), default=None, help="override the detected model family")
    p.add_argument("--dtype", choices=sorted(A.DTYPES), default=None,
                   help="cast floating weights (default: keep the stored dtypes)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickled SRC (.ckpt/.pt/.pth/.bin) with torch.load(weights_only=True); "
                        "only for files you trust")
    p.add_argument("--configs", metavar="JSON", default=None,
                   help="file -> folder: JSON (file or inline) of config overrides, e.g. "
                        "'{\"unet\": {\"attention_head_dim\": 8}}'")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                   help="file -> folder: the scheduler's prediction type (SD 2.x 768-v: v_prediction)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="file -> folder: copy the tokenizer from this tokenizer folder, diffusers pipeline folder or "
                        "built-in model (a pipeline folder also supplies tokenizer_2)")
    p.add_argument("--tokenizer-2", metavar="PATH", default=None, help="file -> folder: the SDXL second tokenizer")
    p.set_defaults(func=run)


def _size(path: str) -> str:
    n = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return f"{n / 2 ** 20:.1f} MiB"


def _folder_to_file(args, src: str, dtype) -> str:
    from velodiff.loading import convert_diffusers_to_single_file, family_of_diffusers_folder

    if not args.dst.endswith(".safetensors"):
        raise UsageError(f"DST {args.dst!r}: a folder is converted to one .safetensors file; name it *.safetensors")
    unused = flags_given(args, FILE_TO_FOLDER_FLAGS)
    if unused:
        raise UsageError(f"{', '.join(unused)}: only for single file -> folder conversion; drop it")
    with step(f"SRC {args.src}"):
        family = args.family or family_of_diffusers_folder(src)
    with step(f"DST {args.dst}"):
        from velodiff.loading.output import check_destination
        check_destination(args.dst, folder=False, force=args.force)
    with step(f"SRC {args.src}"):
        convert_diffusers_to_single_file(src, args.dst, family, dtype=dtype, force=args.force)
    return f"wrote {args.dst} ({family} single file, {_size(args.dst)})"


def _file_to_folder(args, dtype) -> str:
    from velodiff.loading import convert_single_file_to_diffusers
    from velodiff.loading.output import check_destination

    A.check_pickle(args.src, args.allow_pickle, flag="SRC")
    configs = A.read_configs(args.configs)
    with step(f"DST {args.dst}"):
        check_destination(args.dst, folder=True, force=args.force)
    with step(f"SRC {args.src}"):
        index = convert_single_file_to_diffusers(args.src, args.dst, args.family, configs=configs,
                                                 allow_pickle=args.allow_pickle, dtype=dtype,
                                                 prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                                                 tokenizer_2=args.tokenizer_2, force=args.force)
    notes = []
    missing = ["tokenizer" + enc[len("text_encoder"):] for enc in ("text_encoder", "text_encoder_2")
               if enc in index and "tokenizer" + enc[len("text_encoder"):] not in index]
    if missing:
        flags = " / ".join("--" + n.replace("_", "-") for n in missing)
        notes.append(f"note: a single file holds no tokenizer, so {', '.join(missing)} not written; pass {flags} "
                     f"(a tokenizer folder, a diffusers pipeline folder of the same family or a built-in model) or "
                     f"copy {'/ and '.join(missing)}/ from one into {args.dst}")
    parts = ", ".join(k for k in index if not k.startswith("_") and isinstance(index[k], list) and index[k][0])
    return "\n".join([f"wrote {args.dst} ({parts}; {_size(args.dst)})"] + notes)


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.src, flag="SRC")
    src = A.builtin_folder(args.src) or args.src
    if os.path.abspath(src) == os.path.abspath(args.dst):
        raise UsageError(f"DST {args.dst!r} is SRC; name another destination")

    import torch

    dtype = getattr(torch, A.DTYPES[args.dtype]) if args.dtype else None
    if os.path.isdir(src):
        if A.read_model_index(args.src, flag="SRC") is None:
            raise UsageError(f"SRC {args.src!r} is not a diffusers pipeline folder")
        message = _folder_to_file(args, src, dtype)
    else:
        message = _file_to_folder(args, dtype)
    print(message)
    return 0
