"""Few-step generation with the built-in LCM-LoRA ``digits-lcm`` against its teacher (issue 16), judged by
velodiff.eval.

Rows (``digits``, seed 0, the same prompts): the teacher at 20 steps of dpmpp_2m with its guidance 3 (the
reference), the teacher at 4 steps of dpmpp_2m and of the lcm sampler (what few steps give without the adapter),
and the teacher with ``digits-lcm`` (scripts/distill_lcm.py) at 1, 2 and 4 steps of the lcm sampler with the
adapter's guidance 1 (no CFG: one model call per step instead of two). Columns: conditional accuracy and Frechet
distance with 95% intervals (the judge fitted on digits the models never saw), seconds per image on this CPU and
the speed-up over the 20-step teacher measured in the same run.

  python bench/bench_fewstep.py [--per-class 100]
Writes <out>/fewstep_digits.{json,md}.
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


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    check_ranges("bench_fewstep.py", (("--per-class", args.per_class, 1, 100),))
    load_start, rows = load_average(), []
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
                     "fd_ci": r["frechet_distance_ci"], "s_per_image": r["seconds_per_image"]})
        rows[-1]["speedup_vs_teacher_20"] = round(rows[0]["s_per_image"] / rows[-1]["s_per_image"], 2)
        print(rows[-1], flush=True)
    note = (f"velodiff.eval: {args.per_class} images per digit, seed 0, 95% intervals (bootstrap); the judge was "
            "fitted on digits the models never saw. digits-lcm: python/velodiff/data/digits/loras/"
            "digits-lcm.safetensors, made by scripts/distill_lcm.py (LoRA rank 8, latent consistency distillation "
            "of the guided teacher). s_per_image: the whole generation (text encoder, denoiser, VAE) on this 2-core "
            "CPU, in one run, so the speed-up column compares like with like.")
    path = write_results("fewstep_digits", rows,
                         ["model", "setup", "sampler", "steps", "guidance", "images", "accuracy", "accuracy_ci", "fd",
                          "fd_ci", "s_per_image", "speedup_vs_teacher_20"], args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average()})
    print("wrote", path)


if __name__ == "__main__":
    main()
