"""Quality and speed of ``linfusion`` on the built-in ``digits`` model with its shipped LinFusion weights.

At the native 16x16: plain vs linfusion, ``--per-class`` images of every digit (prompt "a handwritten {d}", 20 steps
of dpmpp_2m, the model's default guidance 3, image i seeded with velodiff.eval.image_seeds(seed)[i], the same seeds
for both). Reported: velodiff.eval.judge's conditional accuracy and Frechet distance (95% bootstrap intervals, the
real-vs-real floor), velodiff.eval.judge_highres's accuracy at 16x16 (prompted digit AND digit-like), the PSNR of
each linfusion image to the plain image of the same seed (mean and median over images; [0, 1] pixels), and seconds
per image. The two pipelines run batch by batch interleaved (alternating which goes first), so load drift on a
shared machine hits both alike.

Above the native size (``--sizes``, default 32): plain and linfusion (and with ``--with-hidiffusion`` linfusion +
hidiffusion; bench/bench_highres.py has the full high-resolution table) on ``--per-class-highres`` images per digit
(same seeds), judged by velodiff.eval.judge_highres at 16x16.

  nice -n 19 python bench/bench_linfusion.py [--per-class 100] [--per-class-highres 10] [--out bench/results]
Writes <out>/linfusion_digits.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.accel import HiDiffusion, LinFusion  # noqa: E402
from velodiff.eval import DEFAULT_PROMPT, image_seeds, judge, judge_highres  # noqa: E402

STEPS = 20
SAMPLER = "dpmpp_2m"
NATIVE = 16


def draw(pipe, labels, seeds, size):
    with torch.inference_mode():
        out = pipe([DEFAULT_PROMPT.format(d=int(d)) for d in labels], num_inference_steps=STEPS, sampler=SAMPLER,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], height=size, width=size,
                   output_type="np")
    return np.asarray(out.images)


def interleaved(pipes, labels, seeds, size, batch):
    """{name: (images, seconds per image)}: every pipeline on every batch, the order alternating per batch; one
    untimed single-image warm-up call each first."""
    names = list(pipes)
    for name in names:
        draw(pipes[name], labels[:1], seeds[:1], size)
    images = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    for k, start in enumerate(range(0, len(labels), batch)):
        idx = slice(start, min(start + batch, len(labels)))
        for name in (names if k % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            images[name].append(draw(pipes[name], labels[idx], seeds[idx], size))
            seconds[name] += time.perf_counter() - t0
    return {n: (np.concatenate(images[n]), seconds[n] / len(labels)) for n in names}


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [N, H, W, C] images in [0, 1] (inf where identical)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--per-class-highres", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32])
    ap.add_argument("--with-hidiffusion", action="store_true", help="also linfusion + hidiffusion above 16x16")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    for flag, value in (("--per-class", args.per_class), ("--per-class-highres", args.per_class_highres),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if any(s < NATIVE or s % 8 for s in args.sizes):
        ap.error(f"--sizes must be multiples of 8 of at least {NATIVE}, got {args.sizes}")
    load_start = load_average()

    def pipeline(*configs):
        pipe = vd.Pipeline.from_pretrained("digits")
        pipe.set_progress_bar_config(disable=True)
        return vd.optimize(pipe, *configs) if configs else pipe

    rows = []
    labels = np.repeat(np.arange(10), args.per_class)
    seeds = image_seeds(args.seed, len(labels))
    pipes = {"plain": pipeline(), "linfusion": pipeline(LinFusion())}
    out = interleaved(pipes, labels, seeds, NATIVE, args.batch_size)
    plain_images = out["plain"][0]
    for method, (images, seconds) in out.items():
        j = judge(images, labels)
        h = judge_highres(images, labels)
        p = psnr(images, plain_images)
        finite = p[np.isfinite(p)]
        row = {"method": method, "size": NATIVE, "images": len(labels), "accuracy": j["conditional_accuracy"],
               "accuracy_ci": "[{:.3f}, {:.3f}]".format(*j["conditional_accuracy_ci"]),
               "accuracy_16": h["accuracy"], "fd": j["frechet_distance"],
               "fd_ci": "[{:.3f}, {:.3f}]".format(*j["frechet_distance_ci"]), "fd_floor": j["frechet_distance_floor"],
               "psnr_to_plain_mean": float(finite.mean()) if len(finite) else float("inf"),
               "psnr_to_plain_median": float(np.median(p)), "s_per_image": seconds}
        rows.append(row)
        print(row, flush=True)

    high_labels = np.repeat(np.arange(10), args.per_class_highres)
    high_seeds = image_seeds(args.seed, len(high_labels))
    high_pipes = {"plain": pipes["plain"], "linfusion": pipes["linfusion"]}
    if args.with_hidiffusion:
        high_pipes["linfusion + hidiffusion"] = pipeline(LinFusion(), HiDiffusion())
    for size in args.sizes:
        out = interleaved(high_pipes, high_labels, high_seeds, size, args.batch_size)
        for method, (images, seconds) in out.items():
            h = judge_highres(images, high_labels)
            row = {"method": method, "size": size, "images": len(high_labels), "accuracy_16": h["accuracy"],
                   "accuracy_16_ci": "[{:.3f}, {:.3f}]".format(*h["accuracy_ci"]),
                   "digit_like": h["digit_like_rate"], "classifier_16": h["classifier_accuracy"],
                   "fd_16": h["frechet_distance"], "s_per_image": seconds}
            rows.append(row)
            print(row, flush=True)

    note = (f"digits, prompt 'a handwritten {{d}}', {STEPS} steps of {SAMPLER}, guidance 3 (the model's default), "
            f"seed {args.seed} (velodiff.eval.image_seeds: the same per-image seeds for every method); linfusion: the "
            "shipped weights python/velodiff/data/digits/linfusion (scripts/distill_linfusion.py). At 16x16: "
            "accuracy / fd: velodiff.eval.judge (the 8x8 judge, the built-in README's numbers; 95% bootstrap "
            "intervals; fd_floor: as many real training digits' distance); accuracy_16: velodiff.eval.judge_highres "
            "(the 16x16 classifier's digit is the prompted one AND the image is digit-like); psnr_to_plain: PSNR of "
            "each image to the plain image of the same seed ([0, 1] pixels; plain to itself is inf). Above 16: "
            "judge_highres only (accuracy_16 with its 95% interval, digit_like rate, classifier_16 = the prompted "
            "digit alone, fd_16). s_per_image: generation wall clock, the methods interleaved batch by batch; "
            "indicative only on a shared machine.")
    columns = ["method", "size", "images", "accuracy", "accuracy_ci", "accuracy_16", "accuracy_16_ci", "digit_like",
               "classifier_16", "fd", "fd_ci", "fd_floor", "fd_16", "psnr_to_plain_mean", "psnr_to_plain_median",
               "s_per_image"]
    print("wrote", write_results("linfusion_digits", rows, columns, args.out, note=note,
                                 extra={"load_average_start": load_start, "load_average_end": load_average(),
                                        "per_class": args.per_class, "per_class_highres": args.per_class_highres}))


if __name__ == "__main__":
    main()
