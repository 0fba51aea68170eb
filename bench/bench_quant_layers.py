"""Relative output error of each quantization method on full-size SD 1.5 linear layers (random weights).

For every linear-layer type of an SD 1.5 transformer block (self-attention q/k/v/out, cross-attention q/out and
k/v, GEGLU projection, feed-forward output) at the widths of the UNet levels, a layer with torch's default
nn.Linear initialisation and synthetic activations shaped like diffusion activations: per-channel magnitudes
log-normal (sigma 1) plus 1% outlier channels at 20x. Calibration rows and test rows are drawn separately. The
error is ||y_q - y|| / ||y|| on the test rows against the fp32 layer, computed with velodiff's kernels.

Random weights have no low-rank structure of their own, so the gain of the low-rank branch here comes from the
outlier channels that smoothing moves into the weights, not from the weights: a lower bound on real models.

  python bench/bench_quant_layers.py [--widths 320 640 1280] [--tokens 1024] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import torch  # noqa: E402

from velodiff.quant.svdquant import LayerStats, quantize_layer  # noqa: E402

TEXT_DIM = 768
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def layer_types(c: int):
    """(name, in_features, out_features) of one SD 1.5 transformer block of width c."""
    return [("attn1.to_q/k/v/out.0, attn2.to_q/out.0", c, c), ("attn2.to_k/v", TEXT_DIM, c),
            ("ff.net.0.proj (GEGLU)", c, 8 * c), ("ff.net.2", 4 * c, c)]


def activations(rows: int, k: int, gen: torch.Generator, channel_scale: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, k, generator=gen) * channel_scale


def layer_cases(widths, types, calibration_rows: int, tokens: int):
    """For each width and layer type of ``types(width)``: (width, name, K, N, a seeded nn.Linear(K, N), calibration
    rows, test rows), the activations log-normal per channel with 1 % outlier channels x20."""
    for c in widths:
        for name, k, n in types(c):
            gen = torch.Generator().manual_seed(1000 * c + k + n)
            torch.manual_seed(1000 * c + k + n)
            linear = torch.nn.Linear(k, n)
            scale = torch.exp(torch.randn(k, generator=gen))
            outliers = torch.randperm(k, generator=gen)[: max(1, k // 100)]
            scale[outliers] *= 20.0
            yield (c, name, k, n, linear, activations(calibration_rows, k, gen, scale),
                   activations(tokens, k, gen, scale))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[320, 640, 1280])
    ap.add_argument("--tokens", type=int, default=1024, help="test rows per layer")
    ap.add_argument("--calibration-rows", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rows = []
    for c, name, k, n, linear, cal, test in layer_cases(args.widths, layer_types, args.calibration_rows,
                                                        args.tokens):
        stats = LayerStats(absmax=cal.abs().amax(0), sample=cal)
        with torch.no_grad():
            ref = linear(test).double()
        row = {"width": c, "layer": name, "K": k, "N": n}
        for method in ("svdquant", "naive-w4a4", "w8a8"):
            t0 = time.time()
            q = quantize_layer(linear.weight, linear.bias, method, stats, rank=args.rank, alphas=ALPHAS)
            with torch.no_grad():
                err = float((q(test).double() - ref).norm() / ref.norm())
            row[method] = round(err, 5)
            row[f"{method}_quantize_s"] = round(time.time() - t0, 2)
        rows.append(row)
        print(row, flush=True)
    write_results("quant_layers_sd15", rows,
                  ["width", "layer", "K", "N", "svdquant", "naive-w4a4", "w8a8", "svdquant_quantize_s"], args.out,
                  note=f"Relative output error vs the fp32 layer on {args.tokens} synthetic test rows "
                       f"(SVDQuant rank {args.rank}, alpha grid 0..1 step 0.1, {args.calibration_rows} calibration "
                       "rows; W4A4/W8A8 per group of 64). Weights: torch's nn.Linear init (random), activations: "
                       "log-normal channel scales with 1% outlier channels x20. velodiff CPU kernels.")


if __name__ == "__main__":
    main()
