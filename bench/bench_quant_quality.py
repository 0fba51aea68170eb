"""Quality of quantized built-in models, judged by velodiff.eval: fp32 vs SVDQuant W4A4 (rank 32 and a smaller
rank), naive W4A4 and W8A8, for ``digits`` and ``digits-dit``. One row per (model, method): conditional accuracy
and Frechet distance with 95% intervals, plus the quantized layers' bytes relative to fp16.

The built-in models are tiny (widths 32..96), so a rank-32 branch is a large share of each layer (for width-32
layers it is the whole weight); the smaller-rank rows show the method where the branch cannot hold everything.
"all layers" rows use the ``layers="all"`` preset (convolutions, cross-attention k/v and modulation layers too).

  python bench/bench_quant_quality.py [--per-class 100] [--models digits digits-dit] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402


import velodiff as vd  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402
from velodiff.eval.harness import default_guidance  # noqa: E402

METHODS = [("fp32", None), ("svdquant r32", vd.quant.SVDQuant(32)), ("svdquant r8", vd.quant.SVDQuant(8)),
           ("svdquant r4", vd.quant.SVDQuant(4)), ("naive-w4a4", vd.quant.NaiveW4A4()), ("w8a8", vd.quant.W8A8()),
           ("svdquant r32, all layers", vd.quant.SVDQuant(32, layers="all")),
           ("svdquant r8, all layers", vd.quant.SVDQuant(8, layers="all")),
           ("naive-w4a4, all layers", vd.quant.NaiveW4A4(layers="all")),
           ("w8a8, all layers", vd.quant.W8A8(layers="all"))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits", "digits-dit"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None,
                    help="default: the model folder's own default (digits 3, digits-dit 1.5)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for label, config in METHODS:
            pipe = vd.Pipeline.from_pretrained(model)
            pipe.set_progress_bar_config(disable=True)
            t0 = time.time()
            report = vd.quant.quantize(pipe, config, progress=False) if config is not None else None
            t_quant = time.time() - t0
            guidance = args.guidance if args.guidance is not None else default_guidance(pipe)
            r = evaluate(pipe, sampler="dpmpp_2m", steps=args.steps, guidance=guidance,
                         per_class=args.per_class, seed=0, n_boot=500, fd_boot=100)
            row = {"model": model, "method": label, "guidance": guidance, "layers": report["layers"] if report else 0,
                   "layer_bytes_vs_fp16": round(report["layer_bytes_after"] / report["layer_bytes_before"], 3) if report else 1.0,
                   "accuracy": r["conditional_accuracy"],
                   "accuracy_ci": "[{:.3f}, {:.3f}]".format(*r["conditional_accuracy_ci"]),
                   "fd": r["frechet_distance"], "fd_ci": "[{:.3f}, {:.3f}]".format(*r["frechet_distance_ci"]),
                   "fd_floor": r["frechet_distance_floor"],
                   "quantize_s": round(t_quant, 1), "s_per_image": r["seconds_per_image"]}
            rows.append(row)
            print(row, flush=True)
    write_results("quant_quality_digits", rows,
                  ["model", "method", "guidance", "layers", "layer_bytes_vs_fp16", "accuracy", "accuracy_ci", "fd", "fd_ci",
                   "fd_floor", "quantize_s", "s_per_image"], args.out,
                  note=f"{args.steps} steps of dpmpp_2m, {args.per_class} images per digit, "
                       "seed 0 (digits: prompt 'a handwritten {d}'; digits-dit: class label d). Quantized: the "
                       "linear layers of the denoiser's transformer blocks (velodiff.quant.DEFAULT_LAYERS), 'all layers': "
                       "velodiff.quant.ALL_LAYERS; "
                       "SVDQuant calibrated on 16 generated images x 20 steps. layer_bytes_vs_fp16: bytes of the "
                       "quantized layers (int codes, scales, branch, smoothing, bias) over the same layers in fp16. "
                       "CPU kernels (velodiff::quantize_act / qgemm). The judge (velodiff.eval.reference) is fitted "
                       "only on the 450 held-out digits of split.json, which the generators never saw; fd_floor: the "
                       "mean distance of as many real training digits (unseen by the judge), a perfect generator's "
                       "score at this sample size. s_per_image: wall time on a shared machine, indicative only.")


if __name__ == "__main__":
    main()
