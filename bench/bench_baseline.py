"""Baseline quality table of the built-in model: every sampler x {5, 10, 20, 50} steps on ``digits``, judged by
velodiff.eval (conditional accuracy and Frechet distance with their 95% intervals, the real-vs-real floor).

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
                   "fd_real_vs_real": r["real_vs_real_frechet_distance"], "s_per_image": r["seconds_per_image"]}
            rows.append(row)
            print(row, flush=True)
    write_results(f"baseline_{args.model}", rows,
                  ["sampler", "steps", "nfe", "accuracy", "accuracy_ci", "fd", "fd_ci", "fd_real_vs_real",
                   "s_per_image", "note"], args.out,
                  note=f"Model {args.model}, guidance {args.guidance}, {args.per_class} images per digit, seed 0, "
                       "prompt 'a handwritten {d}'. accuracy: SVC judge; fd: Frechet distance in the harness' "
                       "PCA-20 space (velodiff.eval.reference), with bootstrap 95% intervals.")


if __name__ == "__main__":
    main()
