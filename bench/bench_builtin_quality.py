"""Quality of the built-in models at the guidance scales their READMEs quote, judged by velodiff.eval.

``digits`` (prompt "a handwritten {d}") and ``digits-dit`` (class label d), 20 steps of dpmpp_2m, 100 images per
digit, seed 0: conditional accuracy and Frechet distance with 95% intervals, the Frechet floor at the same sample
size, and the judge's own accuracy on digits it was not fitted on.

  python bench/bench_builtin_quality.py [--per-class 100] [--out bench/results]
Writes <out>/builtin_quality_digits.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, write_results  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402
from velodiff.eval.reference import FLOOR_DRAWS  # noqa: E402

#: model -> the guidance scales its README and the top-level README quote
GUIDANCE = {"digits": [2.0, 3.0, 4.0, 6.0, 7.5], "digits-dit": [1.5, 3.0, 4.0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=sorted(GUIDANCE))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    load_start, rows = load_average(), []
    for model in args.models:
        pipe = vd.Pipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        for guidance in GUIDANCE[model]:
            r = evaluate(pipe, sampler="dpmpp_2m", steps=args.steps, guidance=guidance, per_class=args.per_class,
                         seed=0, n_boot=1000, fd_boot=200)
            row = {"model": model, "guidance": guidance, "images": r["num_images"],
                   "accuracy": r["conditional_accuracy"],
                   "accuracy_ci": "[{:.3f}, {:.3f}]".format(*r["conditional_accuracy_ci"]),
                   "fd": r["frechet_distance"], "fd_ci": "[{:.3f}, {:.3f}]".format(*r["frechet_distance_ci"]),
                   "fd_floor": r["frechet_distance_floor"], "judge_accuracy_unseen": r["classifier_heldout_accuracy"],
                   "judge_accuracy_cv": r["classifier_cv_accuracy"], "s_per_image": r["seconds_per_image"]}
            rows.append(row)
            print(row, flush=True)
    note = (f"{args.steps} steps of dpmpp_2m, {args.per_class} images per digit, seed 0 (digits: prompt "
            "'a handwritten {d}'; digits-dit: class label d). The judge (velodiff.eval.reference) is fitted only on "
            "the 450 held-out digits of split.json, which the generators never saw; judge_accuracy_unseen: its "
            "accuracy on the 1347 training digits (which it never saw), judge_accuracy_cv: 5-fold cross-validated on "
            "its own 450. fd_floor: the mean Frechet distance of as many real training digits with the same class "
            f"counts ({FLOOR_DRAWS} draws), a perfect generator's score at this sample size. s_per_image: wall time "
            "on a shared machine, indicative only.")
    print("wrote", write_results("builtin_quality_digits", rows,
                                 ["model", "guidance", "images", "accuracy", "accuracy_ci", "fd", "fd_ci", "fd_floor",
                                  "judge_accuracy_unseen", "judge_accuracy_cv", "s_per_image"], args.out, note=note,
                                 extra={"load_average_start": load_start, "load_average_end": load_average()}))


if __name__ == "__main__":
    main()
