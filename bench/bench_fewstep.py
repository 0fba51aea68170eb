"""Few-step generation with the built-in LCM-LoRA ``digits-lcm`` against its teacher (issue 16), judged by
velodiff.eval.

Rows (``digits``, seed 0, the same prompts): the teacher at 20 steps of dpmpp_2m with its guidance 3 (the
reference), the teacher at 4 steps of dpmpp_2m and of the lcm sampler (what few steps give without the adapter),
and the teacher with ``digits-lcm`` (scripts/distill_lcm.py) at 1, 2 and 4 steps of the lcm sampler with the
adapter's guidance 1 (no CFG: one model call per step instead of two). Columns: conditional accuracy and Frechet
distance with 95% intervals (the judge fitted on digits the models never saw), seconds per image on this CPU and
the speed-up over the 20-step teacher, timed interleaved (rounds that take every setup in turn) with their spread.

With --style: the LCM-LoRA together with a style LoRA, ``digits-bold`` (scripts/train_style_lora.py: strokes
thickened), to measure style dilution: the style's effect is the mean ink of the images (pixel brightness in
[0, 1]); its size with the teacher at 20 steps against its size with digits-lcm at 4 steps; accuracy beside it.

  python bench/bench_fewstep.py [--per-class 100] [--style]
Writes <out>/fewstep_digits.{json,md} (--style: fewstep_style_digits).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_ranges, load_average, write_results  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402

#: (setup, LoRA, sampler, steps, guidance)
SETUPS = (("teacher", None, "dpmpp_2m", 20, 3.0), ("teacher", None, "dpmpp_2m", 4, 3.0),
          ("teacher", None, "lcm", 4, 3.0), ("teacher + digits-lcm", "digits-lcm", "lcm", 1, 1.0),
          ("teacher + digits-lcm", "digits-lcm", "lcm", 2, 1.0), ("teacher + digits-lcm", "digits-lcm", "lcm", 4, 1.0))


#: --style: (setup, {LoRA: strength}, sampler, steps, guidance)
STYLE_SETUPS = (("teacher", {}, "dpmpp_2m", 20, 3.0),
                ("teacher + digits-bold", {"digits-bold": 1.0}, "dpmpp_2m", 20, 3.0),
                ("digits-lcm", {"digits-lcm": 1.0}, "lcm", 4, 1.0),
                ("digits-lcm + digits-bold", {"digits-lcm": 1.0, "digits-bold": 1.0}, "lcm", 4, 1.0))


def mean_ink(pipe, sampler: str, steps: int, guidance: float, per_class: int) -> float:
    """Mean pixel brightness of ``per_class`` images of each digit (seed 0), in [0, 1]."""
    import torch
    total, count = 0.0, 0
    for d in range(10):
        images = pipe([f"a handwritten {d}"] * per_class, num_inference_steps=steps, guidance_scale=guidance,
                      sampler=sampler, generator=torch.Generator().manual_seed(d), output_type="np").images
        total, count = total + float(images.sum()), count + images.size
    return total / count


def time_interleaved(pipes, rows, rounds: int, images: int = 100) -> None:
    """Seconds per image of every setup, timed in ``rounds`` rounds that take the setups in turn (one batch of
    ``images`` prompts each); adds the median with its [min, max] and the speed-up over the first setup (the median
    of the per-round ratios, with their range)."""
    import statistics
    import time

    import torch
    prompts = [f"a handwritten {i % 10}" for i in range(images)]
    per_image = [[] for _ in pipes]
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for k, (pipe, row) in enumerate(zip(pipes, rows)):
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=row["steps"], guidance_scale=row["guidance"], sampler=row["sampler"],
                 generator=torch.Generator().manual_seed(0), output_type="np")
            per_image[k].append((time.perf_counter() - t0) / images)
    per_image = [t[1:] for t in per_image]
    for times, row in zip(per_image, rows):
        ratios = [a / b for a, b in zip(per_image[0], times)]
        row["s_per_image"] = round(statistics.median(times), 5)
        row["s_per_image_range"] = [round(min(times), 5), round(max(times), 5)]
        row["speedup_vs_teacher_20"] = round(statistics.median(ratios), 2)
        row["speedup_range"] = [round(min(ratios), 2), round(max(ratios), 2)]


def style_rows(per_class: int):
    rows = []
    for setup, loras, sampler, steps, guidance in STYLE_SETUPS:
        pipe = vd.Pipeline.from_pretrained("digits")
        pipe.set_progress_bar_config(disable=True)
        for name, strength in loras.items():
            pipe.load_lora(name, strength=strength)
        r = evaluate(pipe, sampler=sampler, steps=steps, guidance=guidance, per_class=per_class, seed=0, n_boot=1000,
                     fd_boot=200)
        rows.append({"model": "digits", "setup": setup, "sampler": sampler, "steps": steps, "guidance": guidance,
                     "images": r["num_images"], "accuracy": r["conditional_accuracy"],
                     "accuracy_ci": r["conditional_accuracy_ci"],
                     "mean_ink": round(mean_ink(pipe, sampler, steps, guidance, per_class), 4)})
        print(rows[-1], flush=True)
    plain, bold, lcm, lcm_bold = (row["mean_ink"] for row in rows)
    kept = (lcm_bold - lcm) / (bold - plain)
    for row in rows:
        row["style_effect"] = None
    rows[1]["style_effect"], rows[3]["style_effect"] = round(bold - plain, 4), round(lcm_bold - lcm, 4)
    rows[3]["style_kept"] = round(kept, 3)
    return rows


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--style", action="store_true", help="instead: digits-lcm with the style LoRA digits-bold")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    args = ap.parse_args()
    check_ranges("bench_fewstep.py", (("--per-class", args.per_class, 1, 100), ("--rounds", args.rounds, 1, 50)))
    load_start, rows, pipes = load_average(), [], []
    if args.style:
        rows = style_rows(args.per_class)
        note = (f"{args.per_class} images per digit, seed 0. mean_ink: mean pixel brightness of the images (the "
                "bold style adds ink); style_effect: the ink the style adds with the teacher at 20 steps and with "
                "digits-lcm at 4 steps; style_kept: the second over the first (1 = no dilution). Accuracy: "
                "velodiff.eval's judge, 95% intervals.")
        path = write_results("fewstep_style_digits", rows,
                             ["model", "setup", "sampler", "steps", "guidance", "images", "accuracy", "accuracy_ci",
                              "mean_ink", "style_effect", "style_kept"], args.out, note=note,
                             extra={"load_start": load_start, "load_end": load_average()})
        print("wrote", path)
        return
    for setup, lora, sampler, steps, guidance in SETUPS:
        pipe = vd.Pipeline.from_pretrained("digits")
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora(lora)
        r = evaluate(pipe, sampler=sampler, steps=steps, guidance=guidance, per_class=args.per_class, seed=0,
                     n_boot=1000, fd_boot=200)
        rows.append({"model": "digits", "setup": setup, "sampler": sampler, "steps": steps, "guidance": guidance,
                     "images": r["num_images"], "accuracy": r["conditional_accuracy"],
                     "accuracy_ci": r["conditional_accuracy_ci"], "fd": r["frechet_distance"],
                     "fd_ci": r["frechet_distance_ci"]})
        print(rows[-1], flush=True)
        pipes.append(pipe)
    time_interleaved(pipes, rows, args.rounds)
    note = (f"velodiff.eval: {args.per_class} images per digit, seed 0, 95% intervals (bootstrap); the judge was "
            "fitted on digits the models never saw. digits-lcm: python/velodiff/data/digits/loras/"
            "digits-lcm.safetensors, made by scripts/distill_lcm.py (LoRA rank 8, latent consistency distillation "
            f"of the guided teacher). s_per_image: the whole generation (text encoder, denoiser, VAE) of 100 "
            f"prompts on this 2-core CPU, median of {args.rounds} rounds that take the setups in turn (after a "
            "warm-up round), with [min, max]; speed-up: the median of the per-round ratios to the 20-step teacher, "
            "with their range.")
    path = write_results("fewstep_digits", rows,
                         ["model", "setup", "sampler", "steps", "guidance", "images", "accuracy", "accuracy_ci", "fd",
                          "fd_ci", "s_per_image", "s_per_image_range", "speedup_vs_teacher_20", "speedup_range"],
                         args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average()})
    print("wrote", path)


if __name__ == "__main__":
    main()
