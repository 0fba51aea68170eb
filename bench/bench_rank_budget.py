"""SVDQuant's memory budget against a uniform rank at the same bytes, on the built-in models (velodiff.eval).

For each model (all layers quantized) and each small uniform rank r: quantize with rank r everywhere, note the
denoiser's bytes relative to fp16, then quantize again with ``rank=32, memory_budget=<that ratio>``: the same
bytes, spent where the ranks remove the most weight energy per byte (velodiff.quant.rank_budget). Both are
judged by accuracy and Frechet distance with 95% intervals (1000 images, 20 steps of dpmpp_2m).

  python bench/bench_rank_budget.py [--models digits digits-dit] [--ranks 2 4] [--per-class 100]
Writes <out>/quant_rank_budget_digits.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.cli import BUILTIN_GUIDANCE  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402


def run(model: str, config, per_class: int, steps: int):
    pipe = vd.Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    report = vd.quant.quantize(pipe, config, progress=False)
    r = evaluate(pipe, sampler="dpmpp_2m", steps=steps, guidance=BUILTIN_GUIDANCE[model], per_class=per_class,
                 seed=0, n_boot=500, fd_boot=100)
    return report, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits", "digits-dit"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for rank in args.ranks:
            uniform = vd.quant.SVDQuant(rank, layers="all")
            report, r = run(model, uniform, args.per_class, args.steps)
            budget = report["model_ratio"]
            runs = [(f"uniform rank {rank}", report, r)]
            report_b, r_b = run(model, vd.quant.SVDQuant(32, layers="all", memory_budget=budget), args.per_class,
                                args.steps)
            runs.append((f"rank <= 32, memory_budget={budget}", report_b, r_b))
            for label, rep, res in runs:
                row = {"model": model, "config": label, "model_ratio": rep["model_ratio"],
                       "ranks": f"{rep['ranks']['min']}-{rep['ranks']['max']} (mean {rep['ranks']['mean']})",
                       "accuracy": res["conditional_accuracy"],
                       "accuracy_ci": "[{:.3f}, {:.3f}]".format(*res["conditional_accuracy_ci"]),
                       "fd": res["frechet_distance"],
                       "fd_ci": "[{:.3f}, {:.3f}]".format(*res["frechet_distance_ci"]),
                       "quantize_s": rep["seconds"]}
                rows.append(row)
                print(row, flush=True)
    cols = ["model", "config", "model_ratio", "ranks", "accuracy", "accuracy_ci", "fd", "fd_ci", "quantize_s"]
    note = (f"layers='all', SVDQuant calibrated on 16 generated images x 20 steps; judged on {args.per_class} images "
            f"per digit, {args.steps} steps of dpmpp_2m, seed 0, guidance: the model's generate default. "
            "model_ratio: the whole denoiser's bytes (16-bit storage) over its fp16 bytes. CPU kernels.")
    print("wrote", write_results("quant_rank_budget_digits", rows, cols, args.out, note=note))


if __name__ == "__main__":
    main()
