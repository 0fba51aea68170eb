"""Argument types, shared options and checks of the ``velodiff`` command line. Nothing here imports torch, so
``velodiff --help`` and argument errors answer at once."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from velodiff.commands.errors import UsageError, step

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: model families of ``velodiff convert --family`` (velodiff.loading.FAMILIES; tests/test_cli_errors.py checks)
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "dit", "pixart")
#: sampler names (velodiff.sampling.SAMPLERS, kept here so --help imports no torch; tests/test_cli_errors.py
#: checks the two agree)
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_a", "heun", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3",
                 "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_exact", "dpmpp_2m_sde", "unipc", "lcm", "flow_euler", "ghvb",
                 "bdia")
#: technique names for ``--optimize`` (velodiff.accel.TECHNIQUES, kept here so --help imports no torch; the test
#: that checks SAMPLER_NAMES checks this against it)
TECHNIQUE_NAMES: tuple = ("attention_backend", "cpu_conv_prepack", "split_cfg", "deepcache", "faster_diffusion", "tgate",
                          "fbcache", "teacache", "dbcache", "taylorseer", "hidiffusion", "tiled_vae",
                          "multidiffusion", "fstd", "linfusion")
#: the built-in models and their folders (velodiff.loading.BUILTIN_MODELS, which imports torch; checked by the
#: same test)
BUILTIN_NAMES = ("digits", "digits-dit")
_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GUIDANCE_HELP = ("classifier-free guidance scale, a finite number >= 0 (default: the model's own: digits 3, "
                 "digits-dit 1.5, Stable Diffusion 7.5, SDXL 5, DiT 4, PixArt 4.5; a folder's model_index.json "
                 "_velodiff_defaults can set it)")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``velodiff generate: argument --steps: ...; see --help``) and
    exit code 2, without the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind: type, minimum, description: str, finite: bool = True):
    """An argparse type: ``kind(text)`` that must be finite and >= ``minimum``, else a message using
    ``description``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if (finite and isinstance(value, float) and not math.isfinite(value)) or not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value
    parse.__name__ = description  # what argparse names in "invalid ... value"
    return parse


positive_int = _number(int, 1, "a positive integer")
nonnegative_int = _number(int, 0, "an integer >= 0")
nonnegative_float = _number(float, 0.0, "a finite number >= 0")
positive_float = _number(float, 1e-300, "a finite number > 0")


def sampler_name(text: str) -> str:
    if text not in SAMPLER_NAMES:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; choose from {', '.join(SAMPLER_NAMES)}")
    return text


def samplers_help(default: str) -> str:
    return f"the sampler, one of: {', '.join(SAMPLER_NAMES)} (default: {default})"


def epilog() -> Optional[str]:
    """The technique list for --help (``vd.accel.TECHNIQUES``)."""
    if not TECHNIQUE_NAMES:
        return None
    return (f"techniques for --optimize: {', '.join(TECHNIQUE_NAMES)} (options: velodiff.accel.technique_help, "
            "e.g. --optimize attention_backend:backend=math)")


def add_optimize(parser) -> None:
    parser.add_argument("--optimize", metavar="NAME[:key=value,...]", action="append", default=[],
                        help="apply a technique (repeatable; names below), e.g. --optimize "
                             "cpu_conv_prepack:components=unet/vae (a tuple option takes a/b/c)")


def add_lora(parser) -> None:
    parser.add_argument("--lora", metavar="PATH[:STRENGTH]", action="append", default=[],
                        help="load a LoRA .safetensors (diffusers / PEFT, kohya or LyCORIS LoCon keys) at STRENGTH "
                             "(default 1); repeatable")


def parse_loras(specs, model: Optional[str] = None) -> list:
    """[(path, strength)] of the ``--lora`` flags, checked before any model loads: the file exists and is a
    .safetensors (a bare name: the adapter ``--model``'s folder ships in ``loras/``, e.g. digits-lcm), the strength a
    finite number."""
    if not specs:
        return []
    from velodiff.lora.adapters import find_lora
    folder = (builtin_folder(model) or model) if model else None
    out = []
    for spec in specs:
        path, strength = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                strength = float(tail)
                path = head
            except ValueError:
                pass  # a path with a colon in it
        if not math.isfinite(strength):
            raise UsageError(f"--lora {spec}: the strength must be a finite number")
        path = find_lora(path, folder if folder and os.path.isdir(folder) else None)
        if not os.path.isfile(path):
            raise UsageError(f"--lora {spec}: no such file {path!r}")
        if not path.endswith(".safetensors"):
            raise UsageError(f"--lora {spec}: only .safetensors LoRA files are read")
        out.append((path, strength))
    return out


def load_loras(pipe, specs, loras) -> None:
    """Load the parsed ``--lora`` flags into ``pipe``; a file that does not fit is a one-line error naming it."""
    names = set()
    for spec, (path, strength) in zip(specs, loras):
        name = os.path.basename(path).rsplit(".", 1)[0]
        while name in names:
            name += "_"
        names.add(name)
        with step(f"--lora {spec}"):
            pipe.load_lora(path, name=name, strength=strength)


def parse_optimize(specs, flag: str = "--optimize") -> list:
    """The technique configs of the ``--optimize`` flags, parsed and validated before any model loads (imports
    velodiff.accel, hence torch); a bad spec is a UsageError naming the flag."""
    if not specs:
        return []
    from velodiff.accel import parse_technique
    configs = []
    for spec in specs:
        try:
            configs.append(parse_technique(spec))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{flag} {spec}: {e}") from None
    return configs


def add_model(parser, what: str = "a diffusers pipeline folder, a single-file checkpoint or a quantized folder"):
    parser.add_argument("--model", default="digits", metavar="NAME|PATH",
                        help=f"a built-in model ({', '.join(BUILTIN_NAMES)}; default: %(default)s) or {what}")


def add_device_dtype(parser, dtype_default: str = "fp32", device_default: Optional[str] = None, dtype_help=None):
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=dtype_default,
                        help=dtype_help or "the weights' and activations' dtype (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=device_default,
                        help="where to run (default: " + (device_default or "cuda when available, else cpu") + ")")


# ---------------------------------------------------------------------------------------------------------------
# Checks made before anything is loaded
# ---------------------------------------------------------------------------------------------------------------

def builtin_folder(name: str) -> Optional[str]:
    """The folder of the built-in model ``name``, None for any other name."""
    return os.path.join(_DATA, name) if name in BUILTIN_NAMES else None


def check_model_path(value: str, flag: str = "--model") -> str:
    """``value`` is a built-in name or an existing file or folder (else a UsageError naming ``flag``)."""
    if value in BUILTIN_NAMES or os.path.exists(value):
        return value
    raise UsageError(f"{flag} {value!r}: no such file or folder, and not a built-in model "
                     f"({', '.join(BUILTIN_NAMES)}); pass a diffusers pipeline folder or a single-file checkpoint")


def check_pickle(value: str, allow_pickle: bool, flag: str = "--model") -> None:
    """A pickled checkpoint (.ckpt / .pt / .pth / .bin) needs ``--allow-pickle``."""
    if os.path.isfile(value) and value.lower().endswith((".ckpt", ".bin", ".pt", ".pth")) and not allow_pickle:
        raise UsageError(f"{flag} {value!r} is a pickled checkpoint: unpickling can run arbitrary code, so it is not "
                         "read by default; convert it to .safetensors, or pass --allow-pickle if you trust the file "
                         "(it is then read with torch.load(weights_only=True))")


def check_single_file_flags(args, model: str, flag: str = "--model") -> None:
    """``--tokenizer``, ``--tokenizer-2``, ``--configs``, ``--prediction-type`` only go with a single file."""
    given = [f for f, value in (("--tokenizer", args.tokenizer), ("--tokenizer-2", args.tokenizer_2),
                                ("--configs", args.configs), ("--prediction-type", args.prediction_type))
             if value is not None]
    if given and not os.path.isfile(model):
        raise UsageError(f"{', '.join(given)}: only for a single-file {flag}; {model!r} is a pipeline folder, which "
                         "carries its own tokenizers, configs and scheduler (drop the flag)")


def check_device(device: Optional[str]) -> str:
    """The device to run on: ``device`` or, when None, cuda if available; ``cuda`` without CUDA is an error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu")
    return device


def check_outdir(path: str, flag: str = "--outdir") -> None:
    """``path`` is or can become a writable folder (checked before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; name a folder (it is created if needed)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: {parent!r} is a file, so the folder cannot be created; name another")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: {parent!r} is not writable; name a folder you can write")


def read_configs(value: Optional[str]):
    """``--configs``: a JSON file, or inline JSON, of ``{component: {config key: value}}`` overrides."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        try:
            with open(value) as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--configs {value!r}: cannot read the file ({e.strerror or e}); pass a JSON file or "
                             "inline JSON such as '{\"unet\": {\"attention_head_dim\": 8}}'") from None
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--configs {value!r}: not valid JSON ({e}); expected {{\"unet\": {{...}}, "
                         "\"vae\": {...}, ...}") from None
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise UsageError(f"--configs {value!r}: expected {{\"unet\": {{...}}, \"vae\": {{...}}, ...}}")
    return configs


def read_model_index(model: str, flag: str = "--model") -> Optional[dict]:
    """The folder's model_index.json (built-in names resolved; None for a file), read without torch: a missing
    or invalid one is reported here, before anything is loaded."""
    folder = builtin_folder(model) or model
    if not os.path.isdir(folder):
        return None
    path = os.path.join(folder, "model_index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{flag} {model!r} is a folder without model_index.json, so not a diffusers pipeline "
                         "folder; pass the pipeline's top folder (model_index.json plus unet/, vae/, ...)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {model!r}: {path} is not valid JSON ({e}); repair or replace the file") from None
    if not isinstance(index, dict):
        raise UsageError(f"{flag} {model!r}: {path} must hold a JSON object")
    return index
