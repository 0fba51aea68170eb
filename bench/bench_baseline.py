"""Baseline quality table of the built-in model: every sampler x {5, 10, 20, 50} steps on ``digits``, judged by
velodiff.eval (conditional accuracy and Frechet distance with their 95% intervals, and the Frechet floor: what the
same number of real digits unseen by the judge scores).

Later issues add one row per technique (caching, quantisation) from the same harness. Usage:
  python bench/bench_baseline.py [--per-class 30] [--guidance 3.0] [--steps 5 10 20 50] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402
from velodiff.eval.reference import FLOOR_DRAWS  # noqa: E402
from velodiff.sampling import SAMPLERS  # noqa: E402

# Samplers that do not apply to an epsilon-prediction SD-style model: flow_euler needs a flow-matching model.
NOT_APPLICABLE = {"flow_euler": "needs a flow-matching model"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--samplers", nargs="+", default=sorted(SAMPLERS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    pipe = vd.Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for sampler in args.samplers:
        if sampler in NOT_APPLICABLE:
            rows.append({"sampler": sampler, "note": NOT_APPLICABLE[sampler]})
            continue
        for steps in args.steps:
            r = evaluate(pipe, sampler=sampler, steps=steps, guidance=args.guidance, per_class=args.per_class,
                         seed=0, n_boot=300, fd_boot=100)
            row = {"sampler": sampler, "steps": steps, "nfe": r["model_evaluations_per_image"],
                   "accuracy": r["conditional_accuracy"],
                   "accuracy_ci": "[{:.3f}, {:.3f}]".format(*r["conditional_accuracy_ci"]),
                   "fd": r["frechet_distance"], "fd_ci": "[{:.3f}, {:.3f}]".format(*r["frechet_distance_ci"]),
                   "fd_floor": r["frechet_distance_floor"], "s_per_image": r["seconds_per_image"]}
            rows.append(row)
            print(row, flush=True)
    write_results(f"baseline_{args.model}", rows,
                  ["sampler", "steps", "nfe", "accuracy", "accuracy_ci", "fd", "fd_ci", "fd_floor",
                   "s_per_image", "note"], args.out,
                  note=f"Model {args.model}, guidance {args.guidance}, {args.per_class} images per digit, seed 0, "
                       "prompt 'a handwritten {d}'. The judge (velodiff.eval.reference) is fitted only on the 450 "
                       "held-out digits of split.json, which the generator never saw. accuracy: its SVC; fd: Frechet "
                       "distance to those 450 digits in its PCA-20 space, with bootstrap 95% intervals; fd_floor: "
                       "the mean distance of as many real training digits (unseen by the judge, same class counts; "
                       f"{FLOOR_DRAWS} draws), the score of a perfect generator at this sample size. s_per_image: "
                       "wall time on a shared machine (other jobs ran), indicative only.")


if __name__ == "__main__":
    main()
