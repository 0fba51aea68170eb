"""High-resolution quality of the built-in ``digits`` model (issue 13), judged at its native 16x16.

The model was trained at 16x16. Sampled at 32, 48 and 64 px (64 is the 4x cap of VELODIFF_MAX_SIZE_FACTOR), each
method generates ``--per-class`` images of every digit (prompt "a handwritten {d}", 20 steps of dpmpp_2m, the
model's default guidance 3, image i seeded with velodiff.eval.image_seeds(seed)[i]: the same seeds at every size
and for every method) and every image is judged by velodiff.eval.judge_highres: area-averaged to 16x16, the
prompted digit by a 16x16 classifier AND digit-like (its residual off a PCA of real digits within the range real
digits have). Also reported: the 8x8 judge's accuracy (velodiff.eval.judge), which textures fool, and seconds per
image (generation wall clock, one untimed warm-up call per method and size first; the machine may be shared).

Methods: ``plain`` (no technique) and every technique spec given with --methods, as ``--optimize`` takes them
(``hidiffusion``, ``hidiffusion:fraction=0.7``, ``linfusion+hidiffusion`` for two at once, ...; each part parsed
by velodiff.accel.parse_technique; a spec that does not
parse or whose technique does not fit the model is skipped with a message). A ``plain`` row at the native 16x16 is
the reference. The peer: the ``hidiffusion`` PyPI package (apply_hidiffusion) on diffusers' StableDiffusionPipeline
loaded from the same built-in folder, same seeds; when it does not import or run, its error is recorded.

  python bench/bench_highres.py [--sizes 32 48 64] [--methods hidiffusion ...] [--per-class 50] [--no-peer]
                                [--out bench/results]
Writes <out>/highres_digits.json, .md and .png (one row per method, one block per size, the same seeds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.eval import DEFAULT_PROMPT, image_seeds, judge, judge_highres  # noqa: E402
from velodiff.pipelines import BUILTIN_MODELS  # noqa: E402

NATIVE = 16
STEPS = 20
SAMPLER = "dpmpp_2m"
#: images shown per (method, size) in the picture: the first image of each digit
SHOW = 10
#: display side of each image in the picture (pixels)
CELL = 64

Generator = Callable[[List[str], List[torch.Generator], int], np.ndarray]


def _fail(flag: str, message: str) -> None:
    print(f"bench_highres.py: {flag}: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64], help="image sides in px (default 32 48 64)")
    ap.add_argument("--methods", nargs="*", default=[], help="technique specs NAME[:key=value,...] besides plain")
    ap.add_argument("--per-class", type=int, default=50, help="images per digit per method and size (default 50)")
    ap.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-image seeds (default 0)")
    ap.add_argument("--no-peer", action="store_true", help="leave out the hidiffusion package row")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if any(s < NATIVE or s % 8 for s in args.sizes):
        _fail("--sizes", f"each size must be a multiple of 8 and at least {NATIVE}, got {args.sizes}")
    if args.per_class < 1:
        _fail("--per-class", f"must be at least 1, got {args.per_class}")
    if args.batch_size < 1:
        _fail("--batch-size", f"must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        _fail("--seed", f"must be >= 0, got {args.seed}")
    return args


def parse_methods(specs: List[str]) -> Dict[str, list]:
    """{spec: [technique configs]} for the specs that parse (``a+b`` applies both, in order); the others are
    skipped with a message on stderr."""
    from velodiff.accel import parse_technique
    configs: Dict[str, object] = {}
    for spec in specs:
        try:
            configs[spec] = [parse_technique(part) for part in spec.split("+")]
        except ValueError as e:
            print(f"skipping method {spec!r}: {e}", file=sys.stderr, flush=True)
    return configs


# ----------------------------------------------------------------------------------------------------------------
# generators: velodiff's pipeline (plain or with a technique) and the peer package on diffusers
# ----------------------------------------------------------------------------------------------------------------

def velodiff_generator(pipe) -> Generator:
    def run(prompts, generators, size):
        with torch.inference_mode():
            out = pipe(prompts, generator=generators, num_inference_steps=STEPS, sampler=SAMPLER, height=size,
                       width=size, output_type="np")
        return np.asarray(out.images)
    return run


def peer_generator() -> Generator:
    """The hidiffusion package applied to diffusers' pipeline over the built-in digits folder (its own scheduler,
    DPMSolverMultistep, i.e. dpmpp_2m; the model's default guidance 3). Raises whatever the package raises."""
    from diffusers import StableDiffusionPipeline
    from hidiffusion import apply_hidiffusion
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODELS["digits"], safety_checker=None,
                                                       requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    apply_hidiffusion(pipe)

    def run(prompts, generators, size):
        with torch.inference_mode():
            return np.asarray(pipe(prompts, generator=generators, num_inference_steps=STEPS, guidance_scale=3.0,
                                   height=size, width=size, output_type="np").images)
    return run


def generate(run: Generator, labels: np.ndarray, seeds: List[int], size: int, batch_size: int):
    """(images [N, size, size, 3] in [0, 1], seconds per image); one untimed warm-up call first."""
    prompts = [DEFAULT_PROMPT.format(d=int(d)) for d in labels]
    run(prompts[:1], [torch.Generator().manual_seed(seeds[0])], size)
    images, t0 = [], time.perf_counter()
    for start in range(0, len(labels), batch_size):
        idx = range(start, min(start + batch_size, len(labels)))
        images.append(run([prompts[i] for i in idx], [torch.Generator().manual_seed(seeds[i]) for i in idx], size))
    return np.concatenate(images), (time.perf_counter() - t0) / len(labels)


def judged_row(method: str, size: int, images: np.ndarray, labels: np.ndarray, seconds: float) -> dict:
    high = judge_highres(images, labels)
    old = judge(images, labels, n_boot=200, fd_boot=20)
    ci = lambda key: "[{:.3f}, {:.3f}]".format(*high[key])  # noqa: E731
    return {"method": method, "size": size, "images": len(labels), "accuracy": high["accuracy"],
            "accuracy_ci": ci("accuracy_ci"), "digit_like": high["digit_like_rate"],
            "digit_like_ci": ci("digit_like_rate_ci"), "classifier_16": high["classifier_accuracy"],
            "judge_8x8": old["conditional_accuracy"], "fd_16": high["frechet_distance"],
            "fd_16_ci": ci("frechet_distance_ci"), "fd_16_floor": high["frechet_distance_floor"],
            "s_per_image": seconds}


# ----------------------------------------------------------------------------------------------------------------
# the picture
# ----------------------------------------------------------------------------------------------------------------

def draw_picture(shown: Dict[str, Dict[int, np.ndarray]], sizes: List[int], path: str) -> None:
    """One row per method, one block per size (SHOW images, the first of each digit, nearest-upscaled to CELL px);
    a missing (method, size) is left blank."""
    from PIL import Image, ImageDraw
    label_w, gap, head, pad = 200, 12, 18, 2
    block = SHOW * (CELL + pad)
    width = label_w + len(sizes) * (block + gap)
    height = head + len(shown) * (CELL + gap)
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for j, size in enumerate(sizes):
        draw.text((label_w + j * (block + gap), 2), f"{size}x{size}", fill=(255, 255, 255))
    for i, (method, per_size) in enumerate(shown.items()):
        y = head + i * (CELL + gap)
        draw.text((4, y + CELL // 2 - 6), method[:32], fill=(255, 255, 255))
        for j, size in enumerate(sizes):
            if size not in per_size:
                continue
            for k, im in enumerate(per_size[size][:SHOW]):
                tile = Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)).resize(
                    (CELL, CELL), Image.NEAREST)
                canvas.paste(tile, (label_w + j * (block + gap) + k * (CELL + pad), y))
    canvas.save(path)


def main(argv=None):
    args = parse_args(argv)
    configs = parse_methods(args.methods)
    labels = np.repeat(np.arange(10), args.per_class)
    seeds = image_seeds(args.seed, len(labels))
    first_of_each = np.arange(10) * args.per_class
    load_start, rows, skipped, errors = load_average(), [], {}, {}
    shown: Dict[str, Dict[int, np.ndarray]] = {}

    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    plan = [("plain", None, [NATIVE] + [s for s in args.sizes if s != NATIVE])]
    plan += [(spec, cfg, args.sizes) for spec, cfg in configs.items()]
    for method, cfg, sizes in plan:
        if cfg is not None:
            try:
                vd.optimize(pipe, *cfg)
            except ValueError as e:
                print(f"skipping method {method!r}: {e}", file=sys.stderr, flush=True)
                skipped[method] = str(e)
                continue
        try:
            for size in sizes:
                try:
                    images, seconds = generate(velodiff_generator(pipe), labels, seeds, size, args.batch_size)
                except ValueError as e:  # e.g. a size beyond the 4x cap
                    print(f"{method} at {size}: {e}", file=sys.stderr, flush=True)
                    errors[f"{method} {size}"] = str(e)
                    continue
                row = judged_row(method, size, images, labels, seconds)
                rows.append(row)
                shown.setdefault(method, {})[size] = images[first_of_each]
                print(row, flush=True)
        finally:
            if cfg is not None:
                vd.restore(pipe)

    peer: Dict[str, object] = {"package": "hidiffusion", "version": _version("hidiffusion"),
                               "diffusers": _version("diffusers")}
    if not args.no_peer:
        try:
            run = peer_generator()
        except Exception as e:  # the package does not import or apply on this diffusers: record what it says
            peer["error"] = f"{type(e).__name__}: {e}"
            print(f"peer hidiffusion package: {peer['error']}", file=sys.stderr, flush=True)
        else:
            for size in args.sizes:
                try:
                    images, seconds = generate(run, labels, seeds, size, args.batch_size)
                except Exception as e:
                    errors[f"peer hidiffusion {size}"] = f"{type(e).__name__}: {e}"
                    continue
                row = judged_row("peer: hidiffusion package (diffusers)", size, images, labels, seconds)
                rows.append(row)
                shown.setdefault(row["method"], {})[size] = images[first_of_each]
                print(row, flush=True)

    os.makedirs(args.out, exist_ok=True)
    all_sizes = sorted({r["size"] for r in rows})
    draw_picture(shown, all_sizes, os.path.join(args.out, "highres_digits.png"))
    note = (f"digits, prompt 'a handwritten {{d}}', {STEPS} steps of {SAMPLER}, guidance 3 (the model's default), "
            f"{args.per_class} images per digit, seed {args.seed} (the same per-image seeds at every size and for "
            "every method). Judged by velodiff.eval.judge_highres at the native 16x16 (exact area averaging): "
            "accuracy = the 16x16 classifier's digit is the prompted one AND the image is digit-like (relative "
            "residual off a 21-component PCA of the 450 held-out real digits <= the 99th percentile of the 1347 "
            "training digits' residuals, so real digits pass 99% of the time); classifier_16: the prompted digit "
            "alone; judge_8x8: velodiff.eval.judge's accuracy after shrinking to 8x8, which stroke textures fool; "
            "fd_16: Frechet distance in a PCA-20 space of the held-out digits at 16x16, fd_16_floor: as many real "
            "training digits' distance. Intervals: 95% bootstrap. s_per_image: generation wall clock after a "
            "warm-up call, indicative only on a shared machine.")
    if skipped:
        note += " Skipped methods: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "."
    if "error" in peer:
        note += f" Peer (hidiffusion {peer['version']} on diffusers {peer['diffusers']}): {peer['error']}."
    columns = ["method", "size", "images", "accuracy", "accuracy_ci", "digit_like", "digit_like_ci", "classifier_16",
               "judge_8x8", "fd_16", "fd_16_ci", "fd_16_floor", "s_per_image"]
    print("wrote", write_results("highres_digits", rows, columns, args.out, note=note,
                                 extra={"peer": peer, "skipped_methods": skipped, "errors": errors,
                                        "load_average_start": load_start, "load_average_end": load_average()}))


def _version(name: str) -> Optional[str]:
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
